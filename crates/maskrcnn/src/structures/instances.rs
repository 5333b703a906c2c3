//! Ground-truth instances of one training image.

use tch::Tensor;

/// The annotations of one image, in its pixel coordinates.
#[derive(Debug)]
pub struct Target {
    /// `[G, 4]` float xyxy boxes.
    pub boxes: Tensor,
    /// `[G]` int64 contiguous labels in `1..num_classes`.
    pub labels: Tensor,
    /// The instances' masks, as bitmaps or polygons.
    pub masks: InstanceMasks,
    /// `[G]` bool: crowd regions, never positives (and what overlaps them
    /// strongly is ignored rather than background). `None`: no crowds.
    pub iscrowd: Option<Tensor>,
}

impl Target {
    /// Number of instances.
    pub fn len(&self) -> i64 {
        self.boxes.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Same target on `device`. Copies do not block the host (from pinned
    /// memory they overlap with the GPU's work).
    pub fn to_device(&self, device: tch::Device) -> Target {
        let move_ = |t: &Tensor| t.to_device_(device, t.kind(), true, false);
        Target {
            boxes: move_(&self.boxes),
            labels: move_(&self.labels),
            masks: match &self.masks {
                InstanceMasks::Bitmaps(m) => InstanceMasks::Bitmaps(move_(m)),
                InstanceMasks::Polygons(p) => InstanceMasks::Polygons(p.clone()),
            },
            iscrowd: self.iscrowd.as_ref().map(move_),
        }
    }
}

/// Instance masks in one of COCO's two forms.
#[derive(Debug)]
pub enum InstanceMasks {
    /// `[G, H, W]` uint8 binary masks, the image's size (on the model's
    /// device: mask targets are cropped from them there by RoIAlign).
    Bitmaps(Tensor),
    /// Per instance, its polygons, each `[x0, y0, x1, y1, ...]` in image
    /// pixels. Only the positive RoIs' targets are rasterized (at 28×28),
    /// never a full-image bitmap.
    Polygons(Vec<Vec<Vec<f64>>>),
}

impl InstanceMasks {
    /// Number of instances.
    pub fn len(&self) -> i64 {
        match self {
            InstanceMasks::Bitmaps(m) => m.size()[0],
            InstanceMasks::Polygons(p) => p.len() as i64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
