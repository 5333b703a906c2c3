//! CUDA graphs of the inference network: the backbone and FPN recorded once
//! per padded input shape and replayed, so a batch costs one launch there
//! instead of hundreds (at batch 1 the host's launches, not the GPU, set
//! the pace). A shape is run eagerly the first time (cuDNN picks its
//! algorithms, autocast caches its weight casts), recorded the second, and
//! replayed from then on; a shape whose recording fails stays eager.

use crate::modeling::backbone::BackboneWithFpn;
use crate::shim::CudaGraph;
use std::collections::HashMap;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// The most shapes recorded: each holds its activations' memory (a few
/// hundred MB per image at 800×1333); further shapes run eagerly.
pub const MAX_GRAPHS: usize = 8;

/// One recorded shape: the static input the graph reads and the feature
/// maps it writes.
struct Recorded {
    graph: CudaGraph,
    input: Tensor,
    features: Vec<Tensor>,
}

impl Recorded {
    /// Copies `images` into the recorded input and replays: the features.
    fn replay(&self, images: &Tensor) -> Result<Vec<Tensor>, crate::shim::ShimError> {
        let mut input = self.input.shallow_clone();
        input.copy_(images);
        self.graph.replay()?;
        Ok(self.features.iter().map(Tensor::shallow_clone).collect())
    }
}

enum ShapeState {
    /// Run eagerly once; recorded at the next call.
    Seen,
    Recorded(Recorded),
    /// Recording failed (logged): eager from now on.
    Eager,
}

/// An input's shape, dtype and autocast state (`shim::autocast_state`).
type ShapeKey = (Vec<i64>, Kind, i32);

/// The backbone's graphs by input shape, dtype and autocast mode.
#[derive(Default)]
pub struct BackboneGraphs {
    shapes: Mutex<HashMap<ShapeKey, ShapeState>>,
}

impl std::fmt::Debug for BackboneGraphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.shapes.lock().map(|s| s.len()).unwrap_or(0);
        write!(f, "BackboneGraphs({n} shapes)")
    }
}

impl BackboneGraphs {
    /// `backbone.forward(images, false)` (inference) for `images`
    /// `[B, 3, H, W]` on a CUDA device: replayed from its shape's graph
    /// once recorded. The returned feature maps are the graph's own
    /// outputs: the next call with this shape overwrites them, so they must
    /// be used up before (as one inference call does).
    pub fn forward(&self, backbone: &BackboneWithFpn, images: &Tensor) -> Vec<Tensor> {
        let Device::Cuda(index) = images.device() else { return backbone.forward(images, false) };
        let key = (images.size(), images.kind(), crate::shim::autocast_state());
        let mut shapes = self.shapes.lock().unwrap_or_else(|e| e.into_inner());
        let replayed = match shapes.get(&key) {
            None => {
                let state = if shapes.len() < MAX_GRAPHS { ShapeState::Seen } else { ShapeState::Eager };
                shapes.insert(key, state);
                return backbone.forward(images, false);
            }
            Some(ShapeState::Eager) => return backbone.forward(images, false),
            Some(ShapeState::Recorded(r)) => r.replay(images),
            Some(ShapeState::Seen) => {
                let input = images.copy();
                match CudaGraph::capture(index, || backbone.forward(&input, false)) {
                    Ok((graph, features)) => {
                        let r = Recorded { graph, input, features };
                        let out = r.replay(images);
                        shapes.insert(key.clone(), ShapeState::Recorded(r));
                        out
                    }
                    Err(e) => Err(e),
                }
            }
        };
        replayed.unwrap_or_else(|e| {
            tracing::warn!("CUDA graph of the backbone failed ({e}); running it eagerly for {:?}", key.0);
            shapes.insert(key, ShapeState::Eager);
            backbone.forward(images, false)
        })
    }

    /// Drops every graph and its memory (the next calls record again). A
    /// graph reads the tensors it was recorded with: clear after replacing
    /// the model's tensors (not after in-place updates such as SGD steps).
    pub fn clear(&self) {
        self.shapes.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Shapes replayed from a graph.
    pub fn recorded(&self) -> usize {
        let shapes = self.shapes.lock().unwrap_or_else(|e| e.into_inner());
        shapes.values().filter(|s| matches!(s, ShapeState::Recorded(_))).count()
    }
}

#[cfg(test)]
mod tests {
    use tch::{Kind, Tensor};

    /// Replayed feature maps equal the eager backbone's on the same input
    /// (new values copied into the recorded input each time), in fp32 and
    /// under fp16 autocast, for two shapes; each shape is recorded once.
    #[test]
    fn gpu_replayed_features_equal_eager_ones() {
        let Some(device) = crate::test_support::cuda_or_skip("gpu_replayed_features_equal_eager_ones") else {
            return;
        };
        let mut config = crate::Config::default();
        config.model.norm = crate::config::NormKind::FrozenBn;
        let mut model = crate::MaskRcnn::new(&config, device).expect("model");
        model.to_channels_last();
        tch::no_grad(|| {
            for amp in [None, Some(crate::shim::AutocastDtype::Fp16)] {
                let _autocast = crate::shim::AutocastGuard::new(amp);
                for shape in [[1i64, 3, 384, 512], [2, 3, 320, 448]] {
                    for call in 0..4 {
                        let images = Tensor::rand(shape, (Kind::Float, device));
                        let replayed = model.inference_features(&images);
                        let eager = model.backbone.forward(&images, false);
                        for (level, (a, b)) in replayed.iter().zip(&eager).enumerate() {
                            let d = (a - b).abs().max().to_kind(Kind::Double).double_value(&[]);
                            assert_eq!(d, 0.0, "{amp:?} {shape:?} call {call} level {level}: max |Δ| {d}");
                        }
                    }
                }
            }
        });
        assert_eq!(model.recorded_graphs(), 4, "two shapes in two precisions");
    }
}
