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
    /// `[G]` bool: the instance has a mask (a box-only annotation trains
    /// the box losses but not the mask loss). `None`: every one has.
    pub has_mask: Option<Tensor>,
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
            has_mask: self.has_mask.as_ref().map(move_),
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

/// Bitmap masks of a batch in one tensor: what the mask-target kernel reads.
#[derive(Debug)]
pub struct BitmapBatch {
    /// `[B, G, H, W]` uint8 on the model's device (`H`, `W`: the padded
    /// image batch's): image `b`'s bitmaps in the top-left `sizes[b]`
    /// corner of its first instances' planes, zeros elsewhere.
    pub masks: Tensor,
    /// `[B, 2]` int32 on the device: each image's bitmap `(height, width)`,
    /// `(0, 0)` for an image without bitmaps (polygons, or no masks).
    pub sizes: Tensor,
    /// `sizes` on the host.
    pub host_sizes: Vec<(i64, i64)>,
}

/// How far a batch's ground truth is padded. A padded instance is invalid
/// and padded polygon storage is never read, so padding does not change
/// any loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TargetPadding {
    /// To the batch's largest instance count (at least 1); polygons as
    /// they are.
    #[default]
    Exact,
    /// Instance count, polygon vertices and polygon count rounded up to
    /// powers of two, at least the floor's: batches then share a few
    /// shapes, so a CUDA graph recorded for one serves the next.
    Buckets(PaddingFloor),
}

/// The least padded sizes of [`TargetPadding::Buckets`]: the smallest
/// buckets by default; raised to what earlier batches needed (see
/// [`PaddingFloor::cover`]), so a run's batches converge on one set of
/// sizes instead of alternating between neighbouring buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PaddingFloor {
    /// Instance slots per image.
    pub slots: i64,
    /// Packed polygon vertices.
    pub vertices: i64,
    /// Packed polygons.
    pub polygons: i64,
    /// Pack polygons (possibly none) even for a batch without any.
    pub pack_polygons: bool,
}

impl Default for PaddingFloor {
    fn default() -> PaddingFloor {
        PaddingFloor { slots: 8, vertices: 1024, polygons: 64, pack_polygons: false }
    }
}

impl PaddingFloor {
    /// Raises the floor to `batch`'s padded sizes.
    pub fn cover(&mut self, batch: &TargetBatch) {
        self.slots = self.slots.max(batch.slots());
        if let Some(p) = &batch.polygons {
            self.vertices = self.vertices.max(p.coords.size()[0]);
            self.polygons = self.polygons.max(p.starts.size()[0] - 1);
            self.pack_polygons = true;
        }
    }
}

impl TargetPadding {
    /// The smallest buckets.
    pub fn buckets() -> TargetPadding {
        TargetPadding::Buckets(PaddingFloor::default())
    }

    fn pad(self, n: i64, least: impl Fn(&PaddingFloor) -> i64) -> i64 {
        match self {
            TargetPadding::Exact => n,
            TargetPadding::Buckets(floor) => (n.max(least(&floor)) as u64).next_power_of_two() as i64,
        }
    }
}

/// The ground truth of a batch padded to `G` instances per image (the
/// largest count, at least 1, or more per [`TargetPadding`]), in
/// resized-image pixels on the model's device: what the batched matchers
/// and loss functions read.
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
    /// `[B, G]` bool: an instance with a mask (false on padding and for
    /// box-only annotations, which the mask loss leaves out).
    pub has_mask: Tensor,
    /// The polygon images' polygons, packed (`None` when no image has any).
    pub polygons: Option<PackedPolygons>,
    /// The bitmap images' masks (`None` when no image has bitmaps).
    pub bitmaps: Option<BitmapBatch>,
}

impl TargetBatch {
    /// Pads `targets` (already resized, boxes and polygons on the host,
    /// bitmaps anywhere, at most `canvas` `(H, W)`: the padded image batch)
    /// per `padding` and moves them to `device` without blocking the host
    /// (from page-locked memory).
    pub fn new(targets: Vec<Target>, device: tch::Device, canvas: (i64, i64), padding: TargetPadding) -> TargetBatch {
        use tch::Kind;
        let g = padding.pad(targets.iter().map(|t| t.len()).max().unwrap_or(0).max(1), |f| f.slots);
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
        let has_mask = Tensor::stack(
            &targets
                .iter()
                .map(|t| match &t.has_mask {
                    Some(m) => pad(&host(m).to_kind(Kind::Bool)),
                    None => pad(&Tensor::ones([t.len()], (Kind::Bool, tch::Device::Cpu))),
                })
                .collect::<Vec<_>>(),
            0,
        );
        let polygons = pack_polygons(&targets, g, padding);
        let up = |t: &Tensor| crate::host_sync::upload(t, device);
        TargetBatch {
            boxes: up(&boxes),
            labels: up(&labels),
            valid: up(&valid),
            crowd: up(&crowd),
            has_mask: up(&has_mask),
            polygons: polygons.map(|p| PackedPolygons {
                coords: up(&p.coords),
                starts: up(&p.starts),
                instances: up(&p.instances),
            }),
            bitmaps: pack_bitmaps(targets, g, canvas, device),
        }
    }

    /// Images in the batch.
    pub fn len(&self) -> i64 {
        self.boxes.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Instance slots per image (`G`).
    pub fn slots(&self) -> i64 {
        self.boxes.size()[1]
    }
}

impl PackedPolygons {
    /// Per image, per instance slot, its polygons, on the host (one device
    /// read when they are on the GPU: for the host rasterizer only).
    pub fn to_lists(&self) -> Vec<Vec<Vec<Vec<f64>>>> {
        let coords: Vec<f64> = Vec::try_from(crate::host_sync::to_host(&self.coords).reshape([-1])).unwrap_or_default();
        let starts: Vec<i32> = Vec::try_from(crate::host_sync::to_host(&self.starts)).unwrap_or_default();
        let slots: Vec<i32> =
            Vec::try_from(crate::host_sync::to_host(&self.instances).reshape([-1])).unwrap_or_default();
        let polygon = |p: usize| coords[2 * starts[p] as usize..2 * starts[p + 1] as usize].to_vec();
        let per_slot: Vec<Vec<Vec<f64>>> =
            slots.chunks(2).map(|s| (s[0] as usize..(s[0] + s[1]) as usize).map(polygon).collect()).collect();
        let g = self.instances.size().get(1).copied().unwrap_or(1).max(1) as usize;
        per_slot.chunks(g).map(<[_]>::to_vec).collect()
    }
}

/// The bitmap images' masks of a batch in one `[B, G, H, W]` tensor on
/// `device` (`None` when no image has bitmaps).
fn pack_bitmaps(targets: Vec<Target>, g: i64, (h, w): (i64, i64), device: tch::Device) -> Option<BitmapBatch> {
    use tch::Kind;
    if !targets.iter().any(|t| matches!(t.masks, InstanceMasks::Bitmaps(_))) {
        return None;
    }
    let masks = Tensor::zeros([targets.len() as i64, g, h, w], (Kind::Uint8, device));
    let mut host_sizes = Vec::with_capacity(targets.len());
    for (b, t) in targets.into_iter().enumerate() {
        let size = match t.masks {
            InstanceMasks::Bitmaps(m) => {
                let s = m.size();
                let (n, mh, mw) = (s[0], s[1].min(h), s[2].min(w));
                if n > 0 {
                    let m = crate::host_sync::upload(&m, device).narrow(1, 0, mh).narrow(2, 0, mw);
                    masks.get(b as i64).narrow(0, 0, n).narrow(1, 0, mh).narrow(2, 0, mw).copy_(&m);
                }
                (mh, mw)
            }
            InstanceMasks::Polygons(_) => (0, 0),
        };
        host_sizes.push(size);
    }
    let flat: Vec<i32> = host_sizes.iter().flat_map(|&(a, b)| [a as i32, b as i32]).collect();
    let sizes = crate::host_sync::upload(&Tensor::from_slice(&flat).reshape([-1, 2]), device);
    Some(BitmapBatch { masks, sizes, host_sizes })
}

/// The polygons of the batch's polygon images on the host (`None` when
/// there are none).
fn pack_polygons(targets: &[Target], g: i64, padding: TargetPadding) -> Option<PackedPolygons> {
    let always = matches!(padding, TargetPadding::Buckets(f) if f.pack_polygons);
    if !always && !targets.iter().any(|t| matches!(&t.masks, InstanceMasks::Polygons(p) if !p.is_empty())) {
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
    // Padding: vertices never read, empty polygons after the last.
    let vertices = padding.pad((coords.len() / 2) as i64, |f| f.vertices) as usize;
    coords.resize(2 * vertices, 0.0);
    let polygons = padding.pad((starts.len() - 1) as i64, |f| f.polygons) as usize;
    starts.resize(polygons + 1, *starts.last().unwrap_or(&0));
    Some(PackedPolygons {
        coords: Tensor::from_slice(&coords).reshape([-1, 2]),
        starts: Tensor::from_slice(&starts),
        instances: Tensor::from_slice(&instances).reshape([targets.len() as i64, g, 2]),
    })
}
