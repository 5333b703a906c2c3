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

/// How image files are decoded (`input.max_image_pixels`, `input.exif`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Larger images are refused from their header, before decoding.
    pub max_pixels: u64,
    /// Apply the EXIF orientation (the image is returned upright).
    pub exif: bool,
}

impl Default for DecodeOptions {
    fn default() -> DecodeOptions {
        DecodeOptions { max_pixels: DEFAULT_MAX_PIXELS, exif: true }
    }
}

impl DecodeOptions {
    /// The options `input` asks for.
    pub fn of(input: &crate::config::InputConfig) -> DecodeOptions {
        DecodeOptions { max_pixels: input.max_image_pixels, exif: input.exif }
    }
}

/// A decoded image: RGB bytes, row-major, 3 per pixel.
#[derive(Debug, Clone)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
    /// The file's EXIF orientation (1..=8; 1 also when it has none), whether
    /// or not it was applied.
    pub orientation: u8,
    /// Whether `orientation` was applied to `pixels` (`DecodeOptions::exif`).
    pub oriented: bool,
}

impl RgbImage {
    /// Decodes a JPEG or PNG file (the format is read from its content),
    /// turned upright per its EXIF orientation when `options.exif` (as PIL's
    /// `ImageOps.exif_transpose`). JPEGs decode with zune-jpeg in strict
    /// mode: a truncated or corrupt file is an error, not a silently
    /// grey-filled image. An image of more than `options.max_pixels` pixels
    /// is an error read from its header, before any decoding.
    pub fn open(path: &Path, options: DecodeOptions) -> Result<RgbImage, ImageError> {
        // Decoder messages can span lines; errors here are one line.
        let err =
            |message: String| ImageError::Decode { path: path.to_path_buf(), message: crate::text::one_line(&message) };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let jpeg = bytes.starts_with(&[0xFF, 0xD8]);
        let reader = || image::ImageReader::new(std::io::Cursor::new(&bytes)).with_guessed_format();
        let header = if jpeg {
            jpeg_header(&bytes).map_err(err)?
        } else {
            other_header(reader().map_err(|e| err(e.to_string()))?).map_err(err)?
        };
        let (w, h) = (header.width, header.height);
        if u64::from(w) * u64::from(h) > options.max_pixels {
            return Err(err(format!(
                "{w}x{h} is {:.0} megapixels, above input.max_image_pixels ({:.0} megapixels)",
                f64::from(w) * f64::from(h) / 1e6,
                options.max_pixels as f64 / 1e6
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
        let image = RgbImage { width, height, pixels, orientation: header.orientation, oriented: false };
        Ok(if options.exif { image.upright() } else { image })
    }

    /// The image with its EXIF orientation applied (PIL's `exif_transpose`:
    /// 2 mirror, 3 rotate 180°, 4 flip, 5 transpose, 6 rotate 90°
    /// clockwise, 7 transverse, 8 rotate 90° counter-clockwise).
    pub fn upright(self) -> RgbImage {
        let o = self.orientation;
        if self.oriented || !(2..=8).contains(&o) {
            return RgbImage { oriented: true, ..self };
        }
        let (w, h) = (self.width as usize, self.height as usize);
        let swaps = o >= 5;
        let (ow, oh) = if swaps { (h, w) } else { (w, h) };
        let mut out = vec![0u8; self.pixels.len()];
        for y in 0..oh {
            for x in 0..ow {
                // The stored pixel that lands at (x, y).
                let (sx, sy) = match o {
                    2 => (w - 1 - x, y),
                    3 => (w - 1 - x, h - 1 - y),
                    4 => (x, h - 1 - y),
                    5 => (y, x),
                    6 => (y, h - 1 - x),
                    7 => (w - 1 - y, h - 1 - x),
                    _ => (w - 1 - y, x),
                };
                let (d, s) = (3 * (y * ow + x), 3 * (sy * w + sx));
                out[d..d + 3].copy_from_slice(&self.pixels[s..s + 3]);
            }
        }
        RgbImage { width: ow as u32, height: oh as u32, pixels: out, orientation: o, oriented: true }
    }

    /// Why this image's size is not the annotated `width`×`height` (`None`
    /// when it is), naming the EXIF orientation when it explains the
    /// difference: annotations made on the stored (sideways) pixels while
    /// `input.exif` turns the image upright, or the other way round.
    pub fn size_mismatch(&self, width: u32, height: u32) -> Option<String> {
        if (self.width, self.height) == (width, height) {
            return None;
        }
        let swapped = (self.height, self.width) == (width, height);
        let turns = (5..=8).contains(&self.orientation);
        let hint = match (swapped && turns, self.oriented) {
            (true, true) => format!(
                " (its EXIF orientation {} turns the stored {}x{} upright; the annotations match the stored pixels: set input.exif = false)",
                self.orientation, self.height, self.width
            ),
            (true, false) => format!(
                " (the annotations match it turned upright by its EXIF orientation {}: set input.exif = true)",
                self.orientation
            ),
            (false, _) => String::new(),
        };
        Some(format!("is {}x{} but the annotations say {width}x{height}{hint}", self.width, self.height))
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

/// What a file's header says: the stored size and the EXIF orientation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    pub width: u32,
    pub height: u32,
    /// 1..=8 (1: none or unreadable).
    pub orientation: u8,
}

impl ImageHeader {
    /// Reads the header of the JPEG or PNG file `path` (no pixel decoding).
    pub fn read(path: &Path) -> Result<ImageHeader, ImageError> {
        let err =
            |message: String| ImageError::Decode { path: path.to_path_buf(), message: crate::text::one_line(&message) };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        if bytes.starts_with(&[0xFF, 0xD8]) {
            jpeg_header(&bytes).map_err(err)
        } else {
            let reader = image::ImageReader::new(std::io::Cursor::new(&bytes))
                .with_guessed_format()
                .map_err(|e| err(e.to_string()))?;
            other_header(reader).map_err(err)
        }
    }

    /// The size the image has once decoded with `exif` (upright or stored).
    pub fn decoded_size(&self, exif: bool) -> (u32, u32) {
        if exif && (5..=8).contains(&self.orientation) {
            (self.height, self.width)
        } else {
            (self.width, self.height)
        }
    }
}

/// Size and EXIF orientation of a JPEG from its header.
fn jpeg_header(bytes: &[u8]) -> Result<ImageHeader, String> {
    let mut decoder = zune_jpeg::JpegDecoder::new(zune_core::bytestream::ZCursor::new(bytes));
    decoder.decode_headers().map_err(|e| format!("corrupt or truncated JPEG: {e:?}"))?;
    let (w, h) = decoder.dimensions().ok_or("JPEG without dimensions")?;
    let orientation = decoder
        .exif()
        .and_then(|chunk| image::metadata::Orientation::from_exif_chunk(chunk))
        .map_or(1, image::metadata::Orientation::to_exif);
    Ok(ImageHeader { width: w as u32, height: h as u32, orientation })
}

/// Size and EXIF orientation (PNG eXIf) of another format from its header.
fn other_header<R: std::io::BufRead + std::io::Seek>(reader: image::ImageReader<R>) -> Result<ImageHeader, String> {
    use image::ImageDecoder;
    let mut decoder = reader.into_decoder().map_err(|e| e.to_string())?;
    let (width, height) = decoder.dimensions();
    let orientation = decoder.orientation().map_or(1, image::metadata::Orientation::to_exif);
    Ok(ImageHeader { width, height, orientation })
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

/// Decodes `paths` per `options` on up to one thread per core; results
/// in input order.
pub fn open_many(paths: &[PathBuf], options: DecodeOptions) -> Vec<Result<RgbImage, ImageError>> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(paths.len().max(1));
    if threads <= 1 {
        return paths.iter().map(|p| RgbImage::open(p, options)).collect();
    }
    let chunk = paths.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = paths
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().map(|p| RgbImage::open(p, options)).collect::<Vec<_>>()))
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
