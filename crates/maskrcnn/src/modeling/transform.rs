//! Input and output transforms around the network, as torchvision's
//! `GeneralizedRCNNTransform`: normalize, resize (short side to `min_size`,
//! long side at most `max_size`, bilinear), batch with zero padding to a
//! multiple of `size_divisibility`; and map detections back to the original
//! image size.

use crate::config::{InputConfig, PixelFormat};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};

/// A padded batch and the size of each image inside it before padding.
#[derive(Debug)]
pub struct ImageList {
    /// `[N, 3, H, W]`, H and W multiples of `size_divisibility`.
    pub tensors: Tensor,
    /// `(height, width)` of each resized image.
    pub image_sizes: Vec<(i64, i64)>,
    /// `[N, 2]` float32: `image_sizes` on the batch's device (sent without
    /// blocking), for the device work that clips to them.
    pub sizes: Tensor,
}

/// The preprocessing parameters of one model.
#[derive(Debug, Clone)]
pub struct Transform {
    pub pixel_format: PixelFormat,
    pub mean: [f64; 3],
    pub std: [f64; 3],
    pub size_divisibility: i64,
    /// `[3, 1, 1]` mean and std per device and dtype, made once (a copy to
    /// the GPU per image would wait for it).
    constants: Arc<Mutex<HashMap<(Device, Kind), MeanStd>>>,
}

/// `[3, 1, 1]` mean and std on one device in one dtype.
type MeanStd = (Tensor, Tensor);

impl Transform {
    pub fn new(cfg: &InputConfig) -> Transform {
        let three = |v: &[f64]| [v[0], v[1], v[2]];
        Transform {
            pixel_format: cfg.pixel_format,
            mean: three(&cfg.pixel_mean),
            std: three(&cfg.pixel_std),
            size_divisibility: cfg.size_divisibility as i64,
            constants: Arc::default(),
        }
    }

    /// `image` `[3, H, W]` float RGB in [0, 1] → normalized per `pixel_format`.
    pub fn normalize(&self, image: &Tensor) -> Tensor {
        self.normalized(image, false)
    }

    /// The normalization, writing into `image`'s own storage when `reuse`
    /// (its last user gives it up: a large photo is gigabytes in float32)
    /// and into one new tensor otherwise.
    fn normalized(&self, image: &Tensor, reuse: bool) -> Tensor {
        let (mean, std) = self.constants(image.device(), image.kind());
        let mut out = match self.pixel_format {
            PixelFormat::Rgb if reuse => {
                let mut x = image.shallow_clone();
                let _ = x.g_sub_(&mean);
                x
            }
            PixelFormat::Rgb => image - &mean,
            PixelFormat::Bgr255 => image.flip([0]) * 255.0 - &mean,
        };
        let _ = out.g_div_(&std);
        out
    }

    /// Mean and std `[3, 1, 1]` in `kind` on `device`, made once.
    fn constants(&self, device: Device, kind: Kind) -> (Tensor, Tensor) {
        let mut constants = self.constants.lock().unwrap_or_else(|e| e.into_inner());
        let (m, s) = constants.entry((device, kind)).or_insert_with(|| {
            let make = |v: &[f64; 3]| Tensor::from_slice(v).to_kind(kind).to_device(device).reshape([3, 1, 1]);
            (make(&self.mean), make(&self.std))
        });
        (m.shallow_clone(), s.shallow_clone())
    }

    /// Normalizes, resizes and batches `images` (each `[3, H, W]` float RGB in
    /// [0, 1], all on one device) for the given short/long side limits.
    pub fn prepare(&self, images: &[Tensor], min_size: i64, max_size: i64) -> ImageList {
        self.prepare_covering(images, min_size, max_size, &[])
    }

    /// [`prepare`](Self::prepare) into a batch large enough for `cover`'s
    /// images too (original `(height, width)`s, resized alike): ranks that
    /// each cover their whole global batch pad to one shape.
    pub fn prepare_covering(&self, images: &[Tensor], min_size: i64, max_size: i64, cover: &[(i64, i64)]) -> ImageList {
        let resized: Vec<Tensor> =
            images.iter().map(|im| resize_image(&self.normalize(im), min_size, max_size)).collect();
        let canvas = cover
            .iter()
            .map(|&(h, w)| resized_size(h, w, min_size, max_size))
            .fold((0, 0), |(a, b), (h, w)| (a.max(h), b.max(w)));
        self.batched(resized, canvas)
    }

    /// [`prepare`](Self::prepare) that consumes `images` and normalizes
    /// each in place (same arithmetic): a large photo then costs one
    /// float32 copy instead of two. The tensors' storage must not be shared
    /// with tensors the caller still uses.
    pub fn prepare_owned(&self, images: Vec<Tensor>, min_size: i64, max_size: i64) -> ImageList {
        let resized: Vec<Tensor> =
            images.into_iter().map(|im| resize_image(&self.normalized(&im, true), min_size, max_size)).collect();
        self.batched(resized, (0, 0))
    }

    fn batched(&self, resized: Vec<Tensor>, at_least: (i64, i64)) -> ImageList {
        let image_sizes: Vec<(i64, i64)> = resized.iter().map(|t| (t.size()[1], t.size()[2])).collect();
        let tensors = self.batch(&resized, at_least);
        let flat: Vec<f32> = image_sizes.iter().flat_map(|&(h, w)| [h as f32, w as f32]).collect();
        let sizes = crate::host_sync::upload(&Tensor::from_slice(&flat).reshape([-1, 2]), tensors.device());
        ImageList { tensors, image_sizes, sizes }
    }

    /// Zero-pads `images` to a common size, at least `at_least` `(H, W)`,
    /// rounded up to `size_divisibility`.
    pub fn batch(&self, images: &[Tensor], at_least: (i64, i64)) -> Tensor {
        let d = self.size_divisibility;
        let max_h = images.iter().map(|t| t.size()[1]).max().unwrap_or(0).max(at_least.0);
        let max_w = images.iter().map(|t| t.size()[2]).max().unwrap_or(0).max(at_least.1);
        let (h, w) = (round_up(max_h, d), round_up(max_w, d));
        let (kind, device) = images.first().map(|t| (t.kind(), t.device())).unwrap_or((Kind::Float, Device::Cpu));
        let batch = Tensor::zeros([images.len() as i64, 3, h, w], (kind, device));
        for (i, im) in images.iter().enumerate() {
            let (ih, iw) = (im.size()[1], im.size()[2]);
            batch.get(i as i64).narrow(1, 0, ih).narrow(2, 0, iw).copy_(im);
        }
        batch
    }
}

fn round_up(x: i64, d: i64) -> i64 {
    (x + d - 1) / d * d
}

/// The resized `(height, width)` of an `h`×`w` image: scale so the short side
/// is `min_size` unless the long side would exceed `max_size`
/// (torchvision computes the factor in double precision and floors).
pub fn resized_size(h: i64, w: i64, min_size: i64, max_size: i64) -> (i64, i64) {
    let scale = resize_scale(h, w, min_size, max_size);
    ((h as f64 * scale).floor() as i64, (w as f64 * scale).floor() as i64)
}

fn resize_scale(h: i64, w: i64, min_size: i64, max_size: i64) -> f64 {
    let (short, long) = (h.min(w) as f64, h.max(w) as f64);
    (min_size as f64 / short).min(max_size as f64 / long)
}

/// Bilinear resize of `image` `[C, H, W]` (align_corners=false), as
/// `F.interpolate(..., scale_factor, recompute_scale_factor=True)`.
pub fn resize_image(image: &Tensor, min_size: i64, max_size: i64) -> Tensor {
    let (h, w) = (image.size()[1], image.size()[2]);
    let (oh, ow) = resized_size(h, w, min_size, max_size);
    image.unsqueeze(0).upsample_bilinear2d([oh.max(1), ow.max(1)], false, None, None).squeeze_dim(0)
}

/// Resizes a training target from an `original` `(H, W)` image to the
/// `resized` one: boxes scaled (torchvision's `resize_boxes`, where they
/// are), bitmap masks moved to `masks_on` without blocking and resized there
/// by nearest-neighbour interpolation, polygons by the same ratios as the
/// boxes.
pub fn resize_target(
    target: &crate::structures::Target,
    original: (i64, i64),
    resized: (i64, i64),
    masks_on: Device,
) -> crate::structures::Target {
    use crate::structures::InstanceMasks;
    let masks = match &target.masks {
        InstanceMasks::Bitmaps(m) if m.size()[0] == 0 => {
            InstanceMasks::Bitmaps(Tensor::zeros([0, resized.0, resized.1], (Kind::Uint8, masks_on)))
        }
        InstanceMasks::Bitmaps(m) => InstanceMasks::Bitmaps(
            crate::host_sync::upload(m, masks_on)
                .unsqueeze(1)
                .to_kind(Kind::Float)
                .upsample_nearest2d([resized.0, resized.1], None, None)
                .squeeze_dim(1)
                .to_kind(Kind::Uint8),
        ),
        InstanceMasks::Polygons(polys) => {
            // The same float32 ratios as the boxes.
            let rh = f64::from(resized.0 as f32 / original.0 as f32);
            let rw = f64::from(resized.1 as f32 / original.1 as f32);
            InstanceMasks::Polygons(
                polys
                    .iter()
                    .map(|inst| {
                        inst.iter().map(|p| p.chunks(2).flat_map(|xy| [xy[0] * rw, xy[1] * rh]).collect()).collect()
                    })
                    .collect(),
            )
        }
    };
    crate::structures::Target {
        boxes: crate::ops::boxes::resize_boxes(&target.boxes, original, resized),
        labels: target.labels.shallow_clone(),
        masks,
        iscrowd: target.iscrowd.as_ref().map(|c| c.shallow_clone()),
        has_mask: target.has_mask.as_ref().map(|c| c.shallow_clone()),
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    /// A batch prepared to cover other images is padded to their resized
    /// size (rounded up to 32), its own images in place, zeros around.
    #[test]
    fn a_covering_batch_fits_the_other_images() {
        let transform = super::Transform::new(&crate::config::InputConfig::default());
        let images = [Tensor::rand([3, 100, 150], (Kind::Float, Device::Cpu))];
        let own = transform.prepare(&images, 200, 400);
        assert_eq!(own.tensors.size(), [1, 3, 224, 320]);
        // 100 x 250 resizes to 160 x 400 (long side capped), 300 x 100 to 400 x 133.
        let covering = transform.prepare_covering(&images, 200, 400, &[(100, 150), (100, 250), (300, 100)]);
        assert_eq!(covering.tensors.size(), [1, 3, 416, 416]);
        assert_eq!(covering.image_sizes, own.image_sizes);
        assert!(covering.tensors.narrow(2, 0, 224).narrow(3, 0, 320).equal(&own.tensors));
        assert_eq!(covering.tensors.narrow(2, 224, 192).abs().sum(Kind::Double).double_value(&[]), 0.0);
    }
}
