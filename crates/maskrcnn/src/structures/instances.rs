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

/// Polygons of a batch packed for the GPU rasterizer: every polygon's
/// vertices in one array, and for each (image, instance) slot the range of
/// its polygons.
#[derive(Debug)]
pub struct PackedPolygons {
    /// `[V, 2]` float64 vertices (x, y), image pixels.
    pub coords: Tensor,
    /// `[P + 1]` int32: polygon `p` has vertices `starts[p]..starts[p + 1]`.
    pub starts: Tensor,
    /// `[B, G, 2]` int32: first polygon and polygon count of each instance
    /// (0 polygons: a bitmap image, a crowd region or padding).
    pub instances: Tensor,
}

/// The ground truth of a batch padded to `G` instances per image (the
/// largest count, at least 1), in resized-image pixels on the model's
/// device: what the batched matchers and loss functions read.
#[derive(Debug)]
pub struct TargetBatch {
    /// `[B, G, 4]` float32 xyxy boxes (zeros on padding).
    pub boxes: Tensor,
    /// `[B, G]` int64 labels (0 on padding).
    pub labels: Tensor,
    /// `[B, G]` bool: a real instance (crowd regions included).
    pub valid: Tensor,
    /// `[B, G]` bool: a crowd region.
    pub crowd: Tensor,
    /// Each image's masks, resized (bitmaps on the device).
    pub masks: Vec<InstanceMasks>,
    /// The polygon images' polygons, packed (`None` when no image has any).
    pub polygons: Option<PackedPolygons>,
}

impl TargetBatch {
    /// Pads `targets` (already resized, boxes and polygons on the host,
    /// bitmaps anywhere) and moves them to `device` without blocking the
    /// host (from page-locked memory).
    pub fn new(targets: Vec<Target>, device: tch::Device) -> TargetBatch {
        use tch::Kind;
        let g = targets.iter().map(|t| t.len()).max().unwrap_or(0).max(1);
        // Padded on the host (a no-op move for the loader's targets).
        let host = |t: &Tensor| t.to_device(tch::Device::Cpu);
        // Zeros after each image's rows (constant_pad_nd lists the last dimension first).
        let pad = |t: &Tensor| {
            let mut spec = vec![0i64; 2 * (t.dim() - 1)];
            spec.extend([0, g - t.size()[0]]);
            t.constant_pad_nd(spec)
        };
        let boxes = Tensor::stack(
            &targets.iter().map(|t| pad(&host(&t.boxes).to_kind(Kind::Float).reshape([-1, 4]))).collect::<Vec<_>>(),
            0,
        );
        let labels =
            Tensor::stack(&targets.iter().map(|t| pad(&host(&t.labels).to_kind(Kind::Int64))).collect::<Vec<_>>(), 0);
        let valid = Tensor::stack(
            &targets.iter().map(|t| pad(&Tensor::ones([t.len()], (Kind::Bool, tch::Device::Cpu)))).collect::<Vec<_>>(),
            0,
        );
        let crowd = Tensor::stack(
            &targets
                .iter()
                .map(|t| match &t.iscrowd {
                    Some(c) => pad(&host(c).to_kind(Kind::Bool)),
                    None => Tensor::zeros([g], (Kind::Bool, tch::Device::Cpu)),
                })
                .collect::<Vec<_>>(),
            0,
        );
        let polygons = pack_polygons(&targets, g);
        let up = |t: &Tensor| crate::host_sync::upload(t, device);
        TargetBatch {
            boxes: up(&boxes),
            labels: up(&labels),
            valid: up(&valid),
            crowd: up(&crowd),
            polygons: polygons.map(|p| PackedPolygons {
                coords: up(&p.coords),
                starts: up(&p.starts),
                instances: up(&p.instances),
            }),
            masks: targets
                .into_iter()
                .map(|t| match t.masks {
                    InstanceMasks::Bitmaps(m) => InstanceMasks::Bitmaps(crate::host_sync::upload(&m, device)),
                    polygons => polygons,
                })
                .collect(),
        }
    }

    /// Images in the batch.
    pub fn len(&self) -> i64 {
        self.boxes.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The polygons of the batch's polygon images on the host (`None` when
/// there are none).
fn pack_polygons(targets: &[Target], g: i64) -> Option<PackedPolygons> {
    if !targets.iter().any(|t| matches!(&t.masks, InstanceMasks::Polygons(p) if !p.is_empty())) {
        return None;
    }
    let (mut coords, mut starts, mut instances) = (Vec::new(), vec![0i32], Vec::new());
    for t in targets {
        let polys: &[Vec<Vec<f64>>] = match &t.masks {
            InstanceMasks::Polygons(p) => p,
            InstanceMasks::Bitmaps(_) => &[],
        };
        for k in 0..g as usize {
            let first = (starts.len() - 1) as i32;
            let inst = polys.get(k).map(|v| v.as_slice()).unwrap_or(&[]);
            for poly in inst {
                coords.extend_from_slice(poly);
                starts.push((coords.len() / 2) as i32);
            }
            instances.extend([first, inst.len() as i32]);
        }
    }
    Some(PackedPolygons {
        coords: Tensor::from_slice(&coords).reshape([-1, 2]),
        starts: Tensor::from_slice(&starts),
        instances: Tensor::from_slice(&instances).reshape([targets.len() as i64, g, 2]),
    })
}
