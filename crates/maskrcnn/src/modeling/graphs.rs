//! CUDA graphs by key: a computation whose host-side decisions depend only
//! on a key (input shapes, dtypes, autocast mode, ...) is run eagerly the
//! first time a key is seen (cuDNN picks its algorithms, lazily built
//! constants and kernels come into being), recorded the second time, and
//! replayed from then on with one launch instead of hundreds; a key whose
//! recording or replay fails stays eager. [`GraphCache`] is that rule;
//! [`BackboneGraphs`] applies it to the inference backbone and FPN, and
//! `engine::step_graphs` to the training step.

use crate::modeling::backbone::BackboneWithFpn;
use crate::shim::{CudaGraph, ShimError};
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// The most shapes the inference backbone records: with a shared memory
/// pool their activations take the largest one's memory, but each keeps
/// its outputs (a few hundred MB per image at 800×1333).
pub const MAX_GRAPHS: usize = 8;

/// Inputs of a recorded computation: a recording reads copies that outlive
/// it (its static inputs), refilled with each later call's values.
pub trait GraphInputs: Sized {
    /// Copies of `self` in `arena`'s memory, taken before recording: each
    /// tensor through [`StaticArena::copy`], in a fixed order.
    fn to_static(&self, arena: &mut StaticArena) -> Self;
    /// Copies `values` (of the same key, hence the same shapes) into `self`.
    fn refill(&self, values: &Self);
}

impl GraphInputs for Tensor {
    fn to_static(&self, arena: &mut StaticArena) -> Tensor {
        arena.copy(self)
    }

    fn refill(&self, values: &Tensor) {
        tch::no_grad(|| self.shallow_clone().copy_(values));
    }
}

/// Device memory for the static inputs of one cache's graphs, shared by
/// its keys: calls run one at a time and a replay refills its inputs
/// first, so the `i`-th input tensor of every key can live in the same
/// buffer (each key would otherwise keep its own copy of, say, a padded
/// image batch: hundreds of MB at batch 16). A buffer too small for a new
/// key is replaced by a larger one; graphs recorded on the old one keep it
/// alive through their views.
#[derive(Debug, Default)]
pub struct StaticArena {
    /// Byte buffers by position in a key's [`GraphInputs::to_static`].
    buffers: Vec<Tensor>,
    /// The position of the next [`StaticArena::copy`].
    next: usize,
}

impl StaticArena {
    /// A copy of `t` (same shape, dtype and strides) in the buffer of the
    /// next position, growing it when `t` does not fit. A tensor whose
    /// strides leave gaps (not a permuted dense layout) gets memory of its
    /// own.
    pub fn copy(&mut self, t: &Tensor) -> Tensor {
        let (size, stride) = (t.size(), t.stride());
        let numel: i64 = size.iter().product();
        let span = 1 + size.iter().zip(&stride).map(|(&n, &s)| (n - 1) * s).sum::<i64>();
        if numel == 0 || span != numel || stride.iter().any(|&s| s < 0) {
            return t.copy();
        }
        let bytes = numel * t.kind().elt_size_in_bytes() as i64;
        let position = self.next;
        self.next += 1;
        if self.buffers.len() <= position {
            self.buffers.push(Tensor::empty([0], (Kind::Uint8, t.device())));
        }
        let buffer = &mut self.buffers[position];
        if buffer.size()[0] < bytes || buffer.device() != t.device() {
            // A quarter more: the next, slightly larger key fits too.
            *buffer = Tensor::empty([bytes + bytes / 4], (Kind::Uint8, t.device()));
        }
        let view = buffer.narrow(0, 0, bytes).view_dtype(t.kind()).as_strided(&size, &stride, 0);
        tch::no_grad(|| view.shallow_clone().copy_(t));
        view
    }

    /// Starts the static inputs of another key (positions from 0).
    fn begin(&mut self) {
        self.next = 0;
    }

    /// Bytes held now (buffers replaced by larger ones are not counted).
    pub fn bytes(&self) -> i64 {
        self.buffers.iter().map(|b| b.size()[0]).sum()
    }
}

/// One recorded key: the graph, its static inputs and the tensors it
/// writes (rewritten by every replay).
struct Recorded<S, O> {
    graph: CudaGraph,
    inputs: S,
    outputs: O,
}

enum Entry<S, O> {
    /// Run eagerly once; recorded at the next call.
    Seen,
    Recorded(Recorded<S, O>),
    /// Recording or replay failed (logged), or too many keys: eager.
    Eager,
}

/// Graphs of one computation by key, at most `max` recorded, all in one
/// memory pool (calls run one at a time on one stream, so recorded graphs
/// never need their working memory at once), within a memory budget.
pub struct GraphCache<K, S, O> {
    entries: HashMap<K, Entry<S, O>>,
    /// Where the recorded keys' static inputs live.
    arena: StaticArena,
    max: usize,
    /// What the computation is, for log lines.
    what: &'static str,
    replays: u64,
    /// The most bytes the CUDA caching allocator may hold after a recording
    /// (`None`: no limit); see [`GraphCache::run`].
    budget: Option<u64>,
    /// Calls that were not replays (first seen, recorded, failed), and
    /// their wall seconds: the time outside steady steps.
    unsteady: (u64, f64),
}

impl<K: Eq + Hash + Clone + std::fmt::Debug, S: GraphInputs, O> GraphCache<K, S, O> {
    pub fn new(what: &'static str, max: usize) -> GraphCache<K, S, O> {
        GraphCache {
            entries: HashMap::new(),
            arena: StaticArena::default(),
            max,
            what,
            replays: 0,
            budget: None,
            unsteady: (0, 0.0),
        }
    }

    /// Limits the memory the CUDA caching allocator holds after a recording
    /// to `bytes`: past it every graph is dropped, the memory released and
    /// fewer keys recorded from then on (see [`GraphCache::run`]).
    pub fn with_budget(mut self, bytes: Option<u64>) -> GraphCache<K, S, O> {
        self.budget = bytes;
        self
    }

    /// `read(&f(&inputs))` for a key on CUDA device `device`: eager the first
    /// time `key` is seen, else recorded (`f` on static copies of `inputs`,
    /// captured; nothing runs until the replay) and replayed. `f` must issue
    /// the same device work for every call with the same key and must not
    /// synchronize with the host; `read` takes what the caller keeps from
    /// the outputs before the next call of this key overwrites them. When a
    /// recording leaves the allocator holding more than the budget, every
    /// graph is dropped and its memory released, and at most half as many
    /// keys are recorded from then on (the others run eagerly): memory
    /// stays bounded whatever the number of shapes.
    pub fn run<T>(&mut self, device: usize, key: K, inputs: S, f: impl FnMut(&S) -> O, read: impl Fn(&O) -> T) -> T {
        let started = std::time::Instant::now();
        let replays = self.replays;
        let out = self.run_timed(device, key, inputs, f, read);
        if self.replays == replays {
            self.unsteady.0 += 1;
            self.unsteady.1 += started.elapsed().as_secs_f64();
        }
        out
    }

    fn run_timed<T>(
        &mut self,
        device: usize,
        key: K,
        inputs: S,
        mut f: impl FnMut(&S) -> O,
        read: impl Fn(&O) -> T,
    ) -> T {
        let fresh = match self.entries.get(&key) {
            None => {
                let limited = self.entries.len() >= self.max;
                self.entries.insert(key, if limited { Entry::Eager } else { Entry::Seen });
                let out = read(&f(&inputs));
                // An eager call's working memory stays cached in the
                // allocator's general pool, beside the graphs' own pool that
                // holds as much again: released while graphs hold theirs.
                if self.recorded() > 0 {
                    release_cache();
                }
                return out;
            }
            Some(Entry::Eager) => return read(&f(&inputs)),
            Some(Entry::Seen) => match self.record(device, &key, &inputs, &mut f) {
                // The static inputs hold this call's values already.
                Ok(r) => {
                    self.entries.insert(key.clone(), Entry::Recorded(r));
                    // The eager call before the recording left its memory
                    // cached (the first graph's, for one): released, so the
                    // process holds the graphs' pool and little else.
                    release_cache();
                    if self.over_budget(device) {
                        return read(&f(&inputs));
                    }
                    true
                }
                Err(e) => return self.fall_back(key, e, read(&f(&inputs))),
            },
            Some(Entry::Recorded(_)) => false,
        };
        let replayed = match self.entries.get(&key) {
            Some(Entry::Recorded(r)) => {
                if !fresh {
                    r.inputs.refill(&inputs);
                }
                r.graph.replay().map(|()| read(&r.outputs))
            }
            _ => Err(ShimError("no graph recorded".into())),
        };
        match replayed {
            Ok(out) => {
                self.replays += 1;
                out
            }
            Err(e) => self.fall_back(key, e, read(&f(&inputs))),
        }
    }

    /// Logs why `key`'s graph failed and keeps it eager from now on;
    /// `eager` is the call's result computed eagerly. A failed recording
    /// (out of memory, say) leaves the memory it took cached: released.
    fn fall_back<T>(&mut self, key: K, e: ShimError, eager: T) -> T {
        tracing::warn!("CUDA graph of the {} failed ({e}); running this shape eagerly", self.what);
        self.entries.insert(key, Entry::Eager);
        release_cache();
        eager
    }

    /// Whether the allocator holds more than the budget now; if so, every
    /// graph is dropped, the memory released and `max` halved (keys seen so
    /// far record again, up to the new `max`).
    fn over_budget(&mut self, device: usize) -> bool {
        let Some(budget) = self.budget else { return false };
        let Some((_, reserved)) = crate::shim::cuda_memory_now(device) else { return false };
        if reserved <= budget {
            return false;
        }
        let recorded = self.recorded();
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        self.clear();
        self.max = (recorded / 2).max(usize::from(recorded > 1));
        tracing::warn!(
            "CUDA graphs of the {}: {recorded} recorded shapes hold {:.1} GiB, over precision.graph_memory_gb ({:.1} GiB): dropped, at most {} recorded from now on",
            self.what,
            gib(reserved),
            gib(budget),
            self.max
        );
        true
    }

    /// Records `f` on static copies of `inputs`, in the pool of the graphs
    /// already recorded.
    fn record(
        &mut self,
        device: usize,
        key: &K,
        inputs: &S,
        f: &mut impl FnMut(&S) -> O,
    ) -> Result<Recorded<S, O>, ShimError> {
        let share = self.entries.values().find_map(|e| match e {
            Entry::Recorded(r) => Some(&r.graph),
            _ => None,
        });
        self.arena.begin();
        let statics = inputs.to_static(&mut self.arena);
        let (graph, outputs) = CudaGraph::capture(device, share, || f(&statics))?;
        let (allocated, reserved) = crate::shim::cuda_memory_now(device).unwrap_or_default();
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        tracing::debug!(
            "recorded a CUDA graph of the {} for {key:?}; CUDA memory now {:.2} GiB allocated, {:.2} GiB reserved; static inputs {:.2} GiB",
            self.what,
            gib(allocated),
            gib(reserved),
            gib(self.arena.bytes() as u64)
        );
        Ok(Recorded { graph, inputs: statics, outputs })
    }

    /// Drops every graph and returns its memory to the driver (the next
    /// calls record again; waits for the device when a graph was
    /// recorded). A graph reads the tensors it was recorded with: clear
    /// after replacing tensors the computation reads (not after in-place
    /// updates).
    pub fn clear(&mut self) {
        let had = self.recorded() > 0;
        self.entries.clear();
        self.arena = StaticArena::default();
        // libtorch frees a dropped graph's pool only when an allocation
        // fails, which a later recording cannot do: released now.
        if had {
            release_cache();
        }
    }

    /// Calls that were not replays so far, and their wall seconds.
    pub fn unsteady(&self) -> (u64, f64) {
        self.unsteady
    }

    /// Keys replayed from a graph.
    pub fn recorded(&self) -> usize {
        self.entries.values().filter(|e| matches!(e, Entry::Recorded(_))).count()
    }

    /// Calls answered by a replay so far.
    pub fn replays(&self) -> u64 {
        self.replays
    }
}

/// Returns the CUDA caching allocator's unused memory to the driver
/// (dropped graphs' pools included; waits for the device).
fn release_cache() {
    if let Err(e) = crate::shim::release_cached_cuda_memory() {
        tracing::debug!("could not release cached CUDA memory: {e}");
    }
}

/// An input's shape, dtype and autocast state (`shim::autocast_state`).
type ShapeKey = (Vec<i64>, Kind, i32);

/// The inference backbone's graphs by input shape, dtype and autocast mode.
pub struct BackboneGraphs {
    cache: Mutex<GraphCache<ShapeKey, Tensor, Vec<Tensor>>>,
}

impl Default for BackboneGraphs {
    fn default() -> BackboneGraphs {
        BackboneGraphs { cache: Mutex::new(GraphCache::new("backbone", MAX_GRAPHS)) }
    }
}

impl std::fmt::Debug for BackboneGraphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackboneGraphs({} recorded)", self.recorded())
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
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.run(
            index,
            key,
            images.shallow_clone(),
            |input| backbone.forward(input, false),
            |features| features.iter().map(Tensor::shallow_clone).collect(),
        )
    }

    /// Drops every graph and its memory (see [`GraphCache::clear`]).
    pub fn clear(&self) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Shapes replayed from a graph.
    pub fn recorded(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).recorded()
    }
}

#[cfg(test)]
mod tests {
    use super::StaticArena;
    use tch::{Device, Kind, Tensor};

    /// Static inputs of different keys share the arena's buffers: a key's
    /// copies have the values, shape, dtype and strides (channels-last too)
    /// of their tensors; a smaller key reuses the buffers of the first, a
    /// larger one gets larger buffers; a tensor with gaps gets its own memory.
    #[test]
    fn static_inputs_of_keys_share_the_arena() {
        let opts = (Kind::Float, Device::Cpu);
        let mut arena = StaticArena::default();
        let same = |a: &Tensor, b: &Tensor| {
            assert_eq!((a.size(), a.stride(), a.kind()), (b.size(), b.stride(), b.kind()));
            assert!(a.equal(b), "values differ");
        };
        let channels_last = |t: Tensor| t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
        let first = [channels_last(Tensor::rand([2, 3, 8, 8], opts)), Tensor::arange(10, (Kind::Int64, Device::Cpu))];
        arena.begin();
        let statics: Vec<Tensor> = first.iter().map(|t| arena.copy(t)).collect();
        first.iter().zip(&statics).for_each(|(t, s)| same(t, s));
        let held = arena.bytes();

        let smaller = [channels_last(Tensor::rand([2, 3, 6, 8], opts)), Tensor::arange(7, (Kind::Int64, Device::Cpu))];
        arena.begin();
        let again: Vec<Tensor> = smaller.iter().map(|t| arena.copy(t)).collect();
        smaller.iter().zip(&again).for_each(|(t, s)| same(t, s));
        for (a, b) in statics.iter().zip(&again) {
            assert_eq!(a.data_ptr(), b.data_ptr(), "a smaller key reuses the buffer");
        }
        assert_eq!(arena.bytes(), held);

        let larger = Tensor::rand([4, 3, 8, 8], opts);
        arena.begin();
        let grown = arena.copy(&larger);
        same(&larger, &grown);
        assert_ne!(grown.data_ptr(), statics[0].data_ptr());
        assert!(arena.bytes() > held);

        let gapped = larger.narrow(3, 0, 4);
        let own = arena.copy(&gapped);
        same(&gapped.contiguous(), &own.contiguous());
        assert_ne!(own.data_ptr(), statics[1].data_ptr());
    }

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
