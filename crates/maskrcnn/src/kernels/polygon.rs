//! Mask targets from polygons on the GPU: each positive RoI's ground-truth
//! polygons are shifted to the box origin, scaled to `M`×`M` and rasterized
//! with COCO's polygon rule (pycocotools' `rleFrPoly`: vertices upsampled by
//! 5 and rounded, every edge walked point by point, a crossing recorded
//! where the walk enters a new pixel column at a pixel centre, pixels
//! inside where an odd number of crossings precede them in column-major
//! order), the instance's polygons united — the same arithmetic as
//! [`crate::structures::masks::polygon_mask_targets`] on the host (double
//! precision, rounded intrinsics so nothing is fused), so the same targets.
//! One block per RoI, one thread per polygon edge.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use tch::{Device, Kind, Tensor};

pub(crate) const SOURCE: &str = r#"
// Point d of edge (xs, ys) -> (xe, ye) of the upsampled polygon, as rleFrPoly
// generates it (u: column, v: row, upsampled).
__device__ __forceinline__ void edge_point(int x0, int y0, int x1, int y1, int d, int* u, int* v) {
  int xs = x0, xe = x1, ys = y0, ye = y1;
  int dx = abs(xe - xs), dy = abs(ys - ye);
  bool flip = (dx >= dy && xs > xe) || (dx < dy && ys > ye);
  if (flip) { int t = xs; xs = xe; xe = t; t = ys; ys = ye; ye = t; }
  if (dx >= dy) {
    double s = dx == 0 ? 0.0 : __ddiv_rn((double)(ye - ys), (double)dx);
    int t = flip ? dx - d : d;
    *u = t + xs;
    *v = (int)__dadd_rn(__dadd_rn((double)ys, __dmul_rn(s, (double)t)), 0.5);
  } else {
    double s = __ddiv_rn((double)(xe - xs), (double)dy);
    int t = flip ? dy - d : d;
    *v = t + ys;
    *u = (int)__dadd_rn(__dadd_rn((double)xs, __dmul_rn(s, (double)t)), 0.5);
  }
}

__device__ __forceinline__ int edge_length(int x0, int y0, int x1, int y1) {
  return max(abs(x1 - x0), abs(y1 - y0));
}

// The crossing between consecutive boundary points, if any, toggled into
// `toggles` (column-major index x * m + y, 0..m*m).
__device__ __forceinline__ void cross(int u0, int v0, int u1, int v1, int m, int* toggles) {
  if (u1 == u0) return;
  double xd = (double)(u1 < u0 ? u1 : u1 - 1);
  xd = __dsub_rn(__ddiv_rn(__dadd_rn(xd, 0.5), 5.0), 0.5);
  if (floor(xd) != xd || xd < 0.0 || xd > (double)(m - 1)) return;
  double yd = (double)(v1 < v0 ? v1 : v0);
  yd = __dsub_rn(__ddiv_rn(__dadd_rn(yd, 0.5), 5.0), 0.5);
  if (yd < 0.0) yd = 0.0; else if (yd > (double)m) yd = (double)m;
  yd = ceil(yd);
  int pos = (int)xd * m + (int)yd;
  if (pos < m * m) atomicXor(toggles + pos, 1);
}

// Upsampled, rounded vertex j (wrapping) of the polygon whose vertices start
// at `xy`, shifted by (x0, y0) and scaled by (sx, sy).
// Coordinates are clamped to ±5·2^22 (as hotcoco does; far beyond any real
// polygon) so a diverged box cannot make an edge walk endless.
__device__ __forceinline__ int upsample(double c, double origin, double s) {
  const double limit = 5.0 * 4194304.0;
  double v = __dadd_rn(__dmul_rn(5.0, __dmul_rn(__dsub_rn(c, origin), s)), 0.5);
  return (int)fmin(fmax(v, -limit), limit);
}

__device__ __forceinline__ void vertex(const double* xy, int k, int j, double x0, double y0, double sx, double sy,
    int* x, int* y) {
  j = j % k;
  *x = upsample(xy[2 * j], x0, sx);
  *y = upsample(xy[2 * j + 1], y0, sy);
}

// out[slot] (M×M row-major float) for slot = blockIdx.x of B×Q RoIs: boxes
// [B*Q, 4] float32, matched [B*Q] int64 (instance within the image),
// use_slot [B*Q] bool (false: zeros). instances [B, G, 2] int32.
extern "C" __global__ void polygon_mask_targets(const double* coords, const int* starts, const int* instances,
    int G, int Q, const float* boxes, const long long* matched, const unsigned char* use_slot, int m,
    float* out) {
  extern __shared__ int shared[];
  int* toggles = shared;          // m*m
  int* inside = shared + m * m;   // m*m
  const int slot = blockIdx.x, b = slot / Q;
  float* target = out + (long long)slot * m * m;
  for (int i = threadIdx.x; i < m * m; i += blockDim.x) inside[i] = 0;
  __syncthreads();
  int first = 0, count = 0;
  if (use_slot[slot]) {
    const int* inst = instances + ((long long)b * G + (int)matched[slot]) * 2;
    first = inst[0];
    count = inst[1];
  }
  const float* box = boxes + (long long)slot * 4;
  double x0 = (double)box[0], y0 = (double)box[1];
  double w = fmax(__dsub_rn((double)box[2], x0), 1.0), h = fmax(__dsub_rn((double)box[3], y0), 1.0);
  double sx = __ddiv_rn((double)m, w), sy = __ddiv_rn((double)m, h);
  for (int p = first; p < first + count; p++) {
    const double* xy = coords + 2 * (long long)starts[p];
    int k = starts[p + 1] - starts[p];
    if (k < 3) continue;
    for (int i = threadIdx.x; i < m * m; i += blockDim.x) toggles[i] = 0;
    __syncthreads();
    for (int e = threadIdx.x; e < k; e += blockDim.x) {
      int ax, ay, bx, by;
      vertex(xy, k, e, x0, y0, sx, sy, &ax, &ay);
      vertex(xy, k, e + 1, x0, y0, sx, sy, &bx, &by);
      int pu, pv;
      int d0 = 0;
      if (e > 0) {
        int cx, cy;
        vertex(xy, k, e - 1, x0, y0, sx, sy, &cx, &cy);
        edge_point(cx, cy, ax, ay, edge_length(cx, cy, ax, ay), &pu, &pv);
      } else {
        edge_point(ax, ay, bx, by, 0, &pu, &pv);
        d0 = 1;
      }
      int len = edge_length(ax, ay, bx, by);
      for (int d = d0; d <= len; d++) {
        int u, v;
        edge_point(ax, ay, bx, by, d, &u, &v);
        cross(pu, pv, u, v, m, toggles);
        pu = u;
        pv = v;
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int parity = 0;
      for (int i = 0; i < m * m; i++) {
        parity ^= toggles[i];
        if (parity) inside[(i % m) * m + i / m] = 1;
      }
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < m * m; i += blockDim.x) target[i] = (float)inside[i];
}
"#;

/// `[K, M, M]` float {0, 1} targets for `K` RoIs `boxes` `[K, 4]` (resized
/// image pixels) of `Q` per image, slot `k` of image `k / Q` rasterizing
/// that image's instance `matched[k]` from the packed polygons; slots where
/// `use_slot` `[K]` is false stay zero. CUDA only; `None` when the kernel is
/// unavailable.
#[allow(clippy::too_many_arguments)]
pub fn polygon_mask_targets(
    coords: &Tensor,
    starts: &Tensor,
    instances: &Tensor,
    boxes: &Tensor,
    matched: &Tensor,
    use_slot: &Tensor,
    per_image: i64,
    m: i64,
) -> Option<Tensor> {
    let Device::Cuda(index) = boxes.device() else { return None };
    let kernels = super::device_kernels(index)?;
    let f = kernels.function("polygon_mask_targets")?;
    let coords = coords.to_kind(Kind::Double).contiguous();
    let starts = starts.to_kind(Kind::Int).contiguous();
    let instances = instances.to_kind(Kind::Int).contiguous();
    let boxes = boxes.to_kind(Kind::Float).contiguous();
    let matched = matched.to_kind(Kind::Int64).contiguous();
    let use_slot = use_slot.to_kind(Kind::Bool).contiguous();
    let k = boxes.size()[0];
    let out = Tensor::empty([k, m, m], (Kind::Float, boxes.device()));
    if k == 0 {
        return Some(out);
    }
    let g = instances.size()[1] as i32;
    let (q, mi) = (per_image as i32, m as i32);
    let ptrs = [&coords, &starts, &instances, &boxes, &matched, &use_slot, &out].map(|t| t.data_ptr() as u64);
    let cfg =
        LaunchConfig { grid_dim: (k as u32, 1, 1), block_dim: (64, 1, 1), shared_mem_bytes: (2 * m * m * 4) as u32 };
    let stream = kernels.stream();
    let mut l = stream.launch_builder(f);
    l.arg(&ptrs[0]).arg(&ptrs[1]).arg(&ptrs[2]).arg(&g).arg(&q).arg(&ptrs[3]).arg(&ptrs[4]).arg(&ptrs[5]);
    l.arg(&mi).arg(&ptrs[6]);
    // SAFETY: contiguous tensors of the documented dtypes on this device:
    // coords [V, 2] f64, starts [P + 1] i32, instances [B, G, 2] i32 whose
    // ranges index starts, boxes [K, 4] f32, matched [K] i64 in 0..G,
    // use_slot [K] bool, out [K, M, M] f32; alive until later work on this
    // stream.
    super::launched("polygon_mask_targets", unsafe { l.launch(cfg) })?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::structures::masks::polygon_mask_targets as on_host;

    /// The kernel's targets equal the host path's (hotcoco's rasterizer,
    /// itself checked against pycocotools) exactly: star-shaped and
    /// multi-part instances, RoIs much smaller and larger than their
    /// instance, partly outside it, and slots left out.
    #[test]
    fn gpu_polygon_targets_equal_the_host_rasterizer() {
        let Some(device) = crate::test_support::cuda_or_skip("gpu_polygon_targets_equal_the_host_rasterizer") else {
            return;
        };
        let mut rng = crate::random::Rng::new(7);
        let mut uniform = |lo: f64, hi: f64| rng.range_f64(lo, hi);
        let instances: Vec<Vec<Vec<f64>>> = (0..6)
            .map(|i| {
                (0..1 + i % 3)
                    .map(|_| {
                        let (cx, cy, r) = (uniform(20.0, 180.0), uniform(20.0, 140.0), uniform(5.0, 60.0));
                        let k = 3 + (uniform(0.0, 12.0) as usize);
                        (0..k)
                            .flat_map(|j| {
                                let a = j as f64 / k as f64 * std::f64::consts::TAU;
                                let rr = r * uniform(0.4, 1.0);
                                [cx + rr * a.cos(), cy + rr * a.sin()]
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let q = 40i64;
        let boxes: Vec<f32> = (0..q)
            .flat_map(|_| {
                let (x, y) = (uniform(-20.0, 190.0), uniform(-20.0, 150.0));
                let (w, h) = (uniform(0.5, 120.0), uniform(0.5, 120.0));
                [x as f32, y as f32, (x + w) as f32, (y + h) as f32]
            })
            .collect();
        let boxes = Tensor::from_slice(&boxes).reshape([q, 4]);
        let matched = Tensor::from_slice(&(0..q).map(|k| k % 6).collect::<Vec<i64>>());
        let use_slot = Tensor::from_slice(&(0..q).map(|k| k % 7 != 3).collect::<Vec<bool>>());
        let expected = on_host(&instances, &boxes, &matched, 28, tch::Device::Cpu)
            * use_slot.to_kind(Kind::Float).reshape([q, 1, 1]);
        // Packed as TargetBatch packs one image of 6 instances, padded to
        // buckets (padded storage is never read).
        let target = crate::structures::Target {
            boxes: Tensor::zeros([6, 4], (Kind::Float, Device::Cpu)),
            labels: Tensor::ones([6], (Kind::Int64, Device::Cpu)),
            masks: crate::structures::InstanceMasks::Polygons(instances),
            iscrowd: None,
            has_mask: None,
        };
        let gpu = device;
        let padding = crate::structures::TargetPadding::buckets();
        let batch = crate::structures::TargetBatch::new(vec![target], gpu, (256, 256), padding);
        let p = batch.polygons.expect("packed polygons");
        let got = polygon_mask_targets(
            &p.coords,
            &p.starts,
            &p.instances,
            &boxes.to_device(gpu),
            &matched.to_device(gpu),
            &use_slot.to_device(gpu),
            q,
            28,
        )
        .expect("kernel available")
        .to_device(Device::Cpu);
        let differing = got.ne_tensor(&expected).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(differing, 0, "{differing} target pixels differ from the host rasterizer");
    }
}
