//! Reading images from disk into the tensors the model takes.

use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Why an image could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {message}")]
    Decode { path: PathBuf, message: String },
}

/// The default of `input.max_image_pixels` (see the config).
pub const DEFAULT_MAX_PIXELS: u64 = crate::config::DEFAULT_MAX_IMAGE_PIXELS;

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
    /// file is an error, not a silently grey-filled image. An image of more
    /// than `max_pixels` pixels is an error read from its header, before
    /// any decoding.
    pub fn open(path: &Path, max_pixels: u64) -> Result<RgbImage, ImageError> {
        // Decoder messages can span lines; errors here are one line.
        let err =
            |message: String| ImageError::Decode { path: path.to_path_buf(), message: crate::text::one_line(&message) };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let jpeg = bytes.starts_with(&[0xFF, 0xD8]);
        let reader = || image::ImageReader::new(std::io::Cursor::new(&bytes)).with_guessed_format();
        let (w, h) = if jpeg {
            jpeg_dimensions(&bytes).map_err(err)?
        } else {
            reader().map_err(|e| err(e.to_string()))?.into_dimensions().map_err(|e| err(e.to_string()))?
        };
        if u64::from(w) * u64::from(h) > max_pixels {
            return Err(err(format!(
                "{w}x{h} is {:.0} megapixels, above input.max_image_pixels ({:.0} megapixels)",
                f64::from(w) * f64::from(h) / 1e6,
                max_pixels as f64 / 1e6
            )));
        }
        let (width, height, pixels) = if jpeg {
            decode_jpeg(&bytes).map_err(err)?
        } else {
            let reader = reader().map_err(|e| err(e.to_string()))?;
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
        let mut t = Tensor::from_slice(&self.pixels)
            .reshape([self.height as i64, self.width as i64, 3])
            .to_device(device)
            .permute([2, 0, 1])
            .to_kind(Kind::Float);
        // In place: no second float32 copy of a possibly huge image.
        let _ = t.g_div_scalar_(255.0);
        t
    }
}

/// `(width, height)` of a JPEG from its header.
fn jpeg_dimensions(bytes: &[u8]) -> Result<(u32, u32), String> {
    let mut decoder = zune_jpeg::JpegDecoder::new(zune_core::bytestream::ZCursor::new(bytes));
    decoder.decode_headers().map_err(|e| format!("corrupt or truncated JPEG: {e:?}"))?;
    let (w, h) = decoder.dimensions().ok_or("JPEG without dimensions")?;
    Ok((w as u32, h as u32))
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

/// Decodes `paths` (at most `max_pixels` each) on up to one thread per
/// core; results in input order.
pub fn open_many(paths: &[PathBuf], max_pixels: u64) -> Vec<Result<RgbImage, ImageError>> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(paths.len().max(1));
    if threads <= 1 {
        return paths.iter().map(|p| RgbImage::open(p, max_pixels)).collect();
    }
    let chunk = paths.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = paths
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().map(|p| RgbImage::open(p, max_pixels)).collect::<Vec<_>>()))
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
