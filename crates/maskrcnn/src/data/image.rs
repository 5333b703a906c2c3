//! Reading images from disk into the tensors the model takes.

use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Why an image could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {message}")]
    Decode { path: PathBuf, message: String },
}

/// A decoded image: RGB bytes, row-major, 3 per pixel.
#[derive(Debug, Clone)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// Decodes a JPEG or PNG file (the format is read from its content).
    /// JPEGs decode with zune-jpeg in strict mode: a truncated or corrupt
    /// file is an error, not a silently grey-filled image.
    pub fn open(path: &Path) -> Result<RgbImage, ImageError> {
        // Decoder messages can span lines; errors here are one line.
        let err =
            |message: String| ImageError::Decode { path: path.to_path_buf(), message: crate::text::one_line(&message) };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let (width, height, pixels) = if bytes.starts_with(&[0xFF, 0xD8]) {
            decode_jpeg(&bytes).map_err(err)?
        } else {
            let reader = image::ImageReader::new(std::io::Cursor::new(&bytes));
            let reader = reader.with_guessed_format().map_err(|e| err(e.to_string()))?;
            let img = reader.decode().map_err(|e| err(e.to_string()))?.to_rgb8();
            let (w, h) = img.dimensions();
            (w, h, img.into_raw())
        };
        if width == 0 || height == 0 {
            return Err(err("image has no pixels".into()));
        }
        Ok(RgbImage { width, height, pixels })
    }

    /// `[3, H, W]` float RGB in [0, 1] on `device`.
    pub fn to_tensor(&self, device: Device) -> Tensor {
        Tensor::from_slice(&self.pixels)
            .reshape([self.height as i64, self.width as i64, 3])
            .to_device(device)
            .permute([2, 0, 1])
            .to_kind(Kind::Float)
            / 255.0
    }
}

/// `(width, height, RGB bytes)` of a JPEG, strictly.
fn decode_jpeg(bytes: &[u8]) -> Result<(u32, u32, Vec<u8>), String> {
    let options = zune_core::options::DecoderOptions::default()
        .set_strict_mode(true)
        .jpeg_set_out_colorspace(zune_core::colorspace::ColorSpace::RGB);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(zune_core::bytestream::ZCursor::new(bytes), options);
    let pixels = decoder.decode().map_err(|e| format!("corrupt or truncated JPEG: {e:?}"))?;
    let (w, h) = decoder.dimensions().ok_or("JPEG without dimensions")?;
    if pixels.len() != w * h * 3 {
        return Err(format!("JPEG decoded to {} bytes, expected {}x{}x3", pixels.len(), w, h));
    }
    Ok((w as u32, h as u32, pixels))
}

/// Decodes `paths` on up to one thread per core; results in input order.
pub fn open_many(paths: &[PathBuf]) -> Vec<Result<RgbImage, ImageError>> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(paths.len().max(1));
    if threads <= 1 {
        return paths.iter().map(|p| RgbImage::open(p)).collect();
    }
    let chunk = paths.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = paths
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().map(|p| RgbImage::open(p)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .zip(paths.chunks(chunk))
            .flat_map(|(h, part)| {
                h.join().unwrap_or_else(|_| {
                    part.iter()
                        .map(|p| Err(ImageError::Decode { path: p.clone(), message: "decoder thread failed".into() }))
                        .collect()
                })
            })
            .collect()
    })
}
