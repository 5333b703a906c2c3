//! Batched IoU matching of predictions (anchors or proposals) to padded
//! ground truth in two kernels, without the `[B, G, P]` IoU tensor:
//! `match_best_per_gt` finds each ground truth's highest IoU over the
//! predictions (torchvision's low-quality rule needs it), `match_assign`
//! gives each prediction its best ground truth (first index on ties, as
//! `max(dim=0)`), marks it below/between the thresholds, restores low-quality
//! matches, and flags predictions that overlap a crowd region. IoU uses
//! `torchvision.ops.box_iou`'s float32 operations in its order (rounded
//! intrinsics: no fused multiply-adds), so results equal the tensor path.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use tch::{Device, Kind, Tensor};

pub(crate) const SOURCE: &str = r#"
__device__ __forceinline__ float box_iou_rn(const float* a, const float* b) {
  float area_a = __fmul_rn(__fsub_rn(a[2], a[0]), __fsub_rn(a[3], a[1]));
  float area_b = __fmul_rn(__fsub_rn(b[2], b[0]), __fsub_rn(b[3], b[1]));
  float w = fmaxf(__fsub_rn(fminf(a[2], b[2]), fmaxf(a[0], b[0])), 0.0f);
  float h = fmaxf(__fsub_rn(fminf(a[3], b[3]), fmaxf(a[1], b[1])), 0.0f);
  float inter = __fmul_rn(w, h);
  return __fdiv_rn(inter, __fsub_rn(__fadd_rn(area_a, area_b), inter));
}

// best[b * G + g] (float bits as int, initialized to -1.0f's bits by the
// caller) = max over predictions of IoU(gt[b, g], pred[b, p]) for the rows
// that match (match_rows). Grid: (ceil(P / 256), B); shared memory: G ints.
extern "C" __global__ void match_best_per_gt(const float* gt, const unsigned char* match_rows, int G,
    const float* preds, long long pred_batch_stride, int P, int* best) {
  extern __shared__ int block_best[];
  const int b = blockIdx.y;
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  for (int g = threadIdx.x; g < G; g += blockDim.x) block_best[g] = __float_as_int(-1.0f);
  __syncthreads();
  const float* pb = preds + b * pred_batch_stride + (long long)p * 4;
  for (int g = 0; g < G; g++) {
    if (!match_rows[b * G + g]) continue;
    float v = p < P ? box_iou_rn(gt + ((long long)b * G + g) * 4, pb) : -1.0f;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if ((threadIdx.x & 31) == 0 && v >= 0.0f) atomicMax(block_best + g, __float_as_int(v));
  }
  __syncthreads();
  for (int g = threadIdx.x; g < G; g += blockDim.x)
    if (block_best[g] >= 0) atomicMax(best + b * G + g, block_best[g]);
}

// matched[b, p]: the best matching row (first on ties), -1 below `low`, -2
// between `low` and `high`; with `allow_low_quality` a prediction that
// reaches some row's best IoU keeps its best row. crowd[b, p]: IoU >=
// `crowd_thresh` with some crowd row. Grid: (ceil(P / 256), B).
extern "C" __global__ void match_assign(const float* gt, const unsigned char* match_rows,
    const unsigned char* crowd_rows, int G, const float* preds, long long pred_batch_stride, int P,
    const int* best, float low, float high, int allow_low_quality, float crowd_thresh, long long* matched,
    unsigned char* crowd) {
  const int b = blockIdx.y;
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= P) return;
  const float* pb = preds + b * pred_batch_stride + (long long)p * 4;
  float max_v = -1.0f, crowd_v = -1.0f;
  int arg = 0;
  bool reaches_best = false;
  for (int g = 0; g < G; g++) {
    bool m = match_rows[b * G + g], c = crowd_rows[b * G + g];
    if (!m && !c) continue;
    float v = box_iou_rn(gt + ((long long)b * G + g) * 4, pb);
    if (m) {
      if (v > max_v) { max_v = v; arg = g; }
      if (allow_low_quality && __float_as_int(v) == best[b * G + g]) reaches_best = true;
    }
    if (c) crowd_v = fmaxf(crowd_v, v);
  }
  long long out = arg;
  if (max_v < low) out = -1;
  else if (max_v < high) out = -2;
  if (reaches_best) out = arg;
  matched[(long long)b * P + p] = out;
  crowd[(long long)b * P + p] = crowd_v >= crowd_thresh ? 1 : 0;
}
"#;

/// What [`assign`] computes for a batch: `matched` `[B, P]` int64 (ground
/// truth index, or -1 / -2) and `crowd` `[B, P]` bool.
pub struct Assignment {
    pub matched: Tensor,
    pub crowd: Tensor,
}

/// Thresholds of one matching.
#[derive(Debug, Clone, Copy)]
pub struct MatchParams {
    pub low: f64,
    pub high: f64,
    pub allow_low_quality: bool,
    pub crowd_thresh: f64,
}

/// Matches `preds` (`[1, P, 4]` shared by the images, or `[B, P, 4]`)
/// against `gt` `[B, G, 4]` rows flagged in `match_rows` `[B, G]` (bool);
/// `crowd_rows` `[B, G]` are the crowd regions. CUDA only; `None` when the
/// kernels are unavailable.
pub fn assign(
    gt: &Tensor,
    match_rows: &Tensor,
    crowd_rows: &Tensor,
    preds: &Tensor,
    params: MatchParams,
) -> Option<Assignment> {
    let Device::Cuda(index) = gt.device() else { return None };
    let kernels = super::device_kernels(index)?;
    let (best_fn, assign_fn) = (kernels.function("match_best_per_gt")?, kernels.function("match_assign")?);
    let device = gt.device();
    let gt = gt.to_kind(Kind::Float).contiguous();
    let preds = preds.to_kind(Kind::Float).contiguous();
    let match_rows = match_rows.to_kind(Kind::Bool).contiguous();
    let crowd_rows = crowd_rows.to_kind(Kind::Bool).contiguous();
    let (b, g) = (gt.size()[0], gt.size()[1]);
    let p = preds.size()[1];
    let stride: i64 = if preds.size()[0] == 1 { 0 } else { p * 4 };
    let matched = Tensor::empty([b, p], (Kind::Int64, device));
    let crowd = Tensor::empty([b, p], (Kind::Bool, device));
    if b == 0 || p == 0 {
        return Some(Assignment { matched, crowd });
    }
    let best = Tensor::full([b, g.max(1)], -1.0, (Kind::Float, device)).view_dtype(Kind::Int);
    let (gp, mp, cp, pp, bp) = (
        gt.data_ptr() as u64,
        match_rows.data_ptr() as u64,
        crowd_rows.data_ptr() as u64,
        preds.data_ptr() as u64,
        best.data_ptr() as u64,
    );
    let (gi, pi) = (g as i32, p as i32);
    let grid = (((p + 255) / 256) as u32, b as u32, 1);
    let stream = kernels.stream();
    if params.allow_low_quality && g > 0 {
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (256, 1, 1), shared_mem_bytes: (g * 4) as u32 };
        let mut l = stream.launch_builder(best_fn);
        l.arg(&gp).arg(&mp).arg(&gi).arg(&pp).arg(&stride).arg(&pi).arg(&bp);
        // SAFETY: contiguous float32 gt [B, G, 4], bool rows [B, G], preds
        // [1 or B, P, 4], int32 best [B, G]; all alive until later work on
        // this stream.
        super::launched("match_best_per_gt", unsafe { l.launch(cfg) })?;
    }
    let (low, high, crowd_thresh) = (params.low as f32, params.high as f32, params.crowd_thresh as f32);
    let lq = i32::from(params.allow_low_quality);
    let (op, crp) = (matched.data_ptr() as u64, crowd.data_ptr() as u64);
    let cfg = LaunchConfig { grid_dim: grid, block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut l = stream.launch_builder(assign_fn);
    l.arg(&gp).arg(&mp).arg(&cp).arg(&gi).arg(&pp).arg(&stride).arg(&pi).arg(&bp);
    l.arg(&low).arg(&high).arg(&lq).arg(&crowd_thresh).arg(&op).arg(&crp);
    // SAFETY: as above, plus int64 matched and bool crowd outputs [B, P].
    super::launched("match_assign", unsafe { l.launch(cfg) })?;
    Some(Assignment { matched, crowd })
}
