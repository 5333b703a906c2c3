//! Ground-truth instances of one training image.

use tch::Tensor;

/// The annotations of one image, in its pixel coordinates.
#[derive(Debug)]
pub struct Target {
    /// `[G, 4]` float xyxy boxes.
    pub boxes: Tensor,
    /// `[G]` int64 contiguous labels in `1..num_classes`.
    pub labels: Tensor,
    /// `[G, H, W]` uint8 binary masks, the image's size.
    pub masks: Tensor,
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

    /// Same target on `device`.
    pub fn to_device(&self, device: tch::Device) -> Target {
        Target {
            boxes: self.boxes.to_device(device),
            labels: self.labels.to_device(device),
            masks: self.masks.to_device(device),
            iscrowd: self.iscrowd.as_ref().map(|c| c.to_device(device)),
        }
    }
}
