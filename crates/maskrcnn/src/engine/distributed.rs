//! Data-parallel training over several GPUs of one machine: one process per
//! GPU (started by `maskrcnn launch`, or by any torchrun-style launcher),
//! gradients summed by an NCCL all-reduce and divided by the world size, as
//! PyTorch's DistributedDataParallel does.
//!
//! The process group comes from torchrun's environment: `RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK` (the GPU), `MASTER_ADDR`, `MASTER_PORT`. Rank 0
//! creates NCCL's unique id and hands it to the others over one TCP
//! connection each at `MASTER_ADDR:MASTER_PORT`.
//!
//! NCCL is opened at run time from `libnccl.so.2` (the library torch's
//! wheels ship and libtorch already loads). cudarc's `nccl` module looks only
//! for other file names (`libnccl.so`, `libnccl.so.13`, ...), which this
//! wheel does not have, so the five entry points used here are bound directly.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

/// Why the process group could not be formed or used.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("distributed environment: {0}")]
    Env(String),
    #[error("rendezvous at {addr}: {message}")]
    Rendezvous { addr: String, message: String },
    #[error("NCCL: {0}")]
    Nccl(String),
}

/// This process's place in the group, from torchrun's variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    /// The GPU of this process (`cuda:LOCAL_RANK`).
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl DistEnv {
    /// The group described by `var` (the process environment in practice):
    /// `None` when `WORLD_SIZE` is unset or 1 (single-process training).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>, DistError> {
        let world_size: usize = match var("WORLD_SIZE") {
            None => return Ok(None),
            Some(v) => parse("WORLD_SIZE", &v)?,
        };
        if world_size <= 1 {
            return Ok(None);
        }
        let need = |name: &str| var(name).ok_or_else(|| DistError::Env(format!("WORLD_SIZE is set but {name} is not")));
        let rank: usize = parse("RANK", &need("RANK")?)?;
        let local_rank: usize = parse("LOCAL_RANK", &var("LOCAL_RANK").unwrap_or_else(|| rank.to_string()))?;
        if rank >= world_size {
            return Err(DistError::Env(format!("RANK {rank} is not below WORLD_SIZE {world_size}")));
        }
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let master_port: u16 = parse("MASTER_PORT", &need("MASTER_PORT")?)?;
        Ok(Some(DistEnv { rank, world_size, local_rank, master_addr, master_port }))
    }

    /// The group of this process's environment.
    pub fn from_process() -> Result<Option<DistEnv>, DistError> {
        DistEnv::from_vars(|name| std::env::var(name).ok())
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }
}

fn parse<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, DistError> {
    value.trim().parse().map_err(|_| DistError::Env(format!("{name}={value:?} is not a valid number")))
}

/// How long ranks wait for each other at the rendezvous.
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(120);

/// Hands rank 0's `id` to every other rank: rank 0 listens at the master
/// address and writes `id` to each of the `world_size - 1` connections; the
/// others connect (retrying until the timeout) and read it.
pub fn exchange_id(env: &DistEnv, id: Option<&[u8]>, len: usize) -> Result<Vec<u8>, DistError> {
    let addr = env.addr();
    let err = |message: String| DistError::Rendezvous { addr: addr.clone(), message };
    let started = Instant::now();
    if env.rank == 0 {
        let id = id.ok_or_else(|| err("rank 0 has no id to share".into()))?;
        // A peer's connect attempt can briefly hold the port (see
        // `fetch_id`): retry the bind until the timeout.
        let listener = loop {
            match TcpListener::bind(("0.0.0.0", env.master_port)) {
                Ok(l) => break l,
                Err(e) if started.elapsed() > RENDEZVOUS_TIMEOUT => return Err(err(format!("cannot listen: {e}"))),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        serve_id(&listener, id, env.world_size - 1, started).map_err(err)?;
        Ok(id.to_vec())
    } else {
        fetch_id(&addr, len, started).map_err(err)
    }
}

/// Rank 0's side: writes `id` to each of the first `others` connections
/// accepted on `listener`, giving up `RENDEZVOUS_TIMEOUT` after `started`.
fn serve_id(listener: &TcpListener, id: &[u8], others: usize, started: Instant) -> Result<(), String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut served = 0;
    while served < others {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                stream.write_all(id).map_err(|e| format!("sending the NCCL id: {e}"))?;
                served += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if started.elapsed() > RENDEZVOUS_TIMEOUT {
                    return Err(format!(
                        "only {served} of {others} other ranks connected within {} s",
                        RENDEZVOUS_TIMEOUT.as_secs()
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// The other ranks' side: connects to rank 0 at `addr` and reads `len`
/// bytes, retrying until `RENDEZVOUS_TIMEOUT` after `started` while nobody
/// listens yet or a connection closes before the whole id arrived (a
/// listener that was not rank 0's: another job's, gone since, on a machine
/// whose ports several jobs share).
fn fetch_id(addr: &str, len: usize, started: Instant) -> Result<Vec<u8>, String> {
    loop {
        let failure = match TcpStream::connect(addr) {
            // Connecting on localhost to a port nobody listens on yet can
            // connect the socket to itself (TCP simultaneous open, when the
            // kernel picks that same port as the local one): drop it.
            Ok(stream) if stream.local_addr().ok() == stream.peer_addr().ok() => "connected to itself".to_string(),
            Ok(mut stream) => {
                stream.set_read_timeout(Some(RENDEZVOUS_TIMEOUT)).map_err(|e| e.to_string())?;
                let mut buf = vec![0u8; len];
                match stream.read_exact(&mut buf) {
                    Ok(()) => return Ok(buf),
                    Err(e) => format!("reading the NCCL id: {e}"),
                }
            }
            Err(e) => e.to_string(),
        };
        if started.elapsed() > RENDEZVOUS_TIMEOUT {
            return Err(format!("rank 0 not reachable within {} s: {failure}", RENDEZVOUS_TIMEOUT.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// NCCL's ABI (nccl.h): the unique id is 128 bytes passed by value; results
// and enums are C ints.
const NCCL_UNIQUE_ID_BYTES: usize = 128;
const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;

#[repr(C)]
#[derive(Clone, Copy)]
struct NcclUniqueId {
    internal: [c_char; NCCL_UNIQUE_ID_BYTES],
}

type NcclComm = *mut c_void;

struct NcclApi {
    _lib: libloading::Library,
    get_unique_id: unsafe extern "C" fn(*mut NcclUniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut NcclComm, c_int, NcclUniqueId, c_int) -> c_int,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, NcclComm, *mut c_void) -> c_int,
    comm_destroy: unsafe extern "C" fn(NcclComm) -> c_int,
    error_string: unsafe extern "C" fn(c_int) -> *const c_char,
}

impl NcclApi {
    fn open() -> Result<NcclApi, DistError> {
        let mut last = String::new();
        for name in ["libnccl.so.2", "libnccl.so"] {
            // SAFETY: loading NCCL runs no initialization with preconditions.
            match unsafe { libloading::Library::new(name) } {
                Ok(lib) => {
                    // SAFETY: the signatures are NCCL 2's (nccl.h).
                    unsafe {
                        let get_unique_id = *lib.get(b"ncclGetUniqueId\0").map_err(sym)?;
                        let comm_init_rank = *lib.get(b"ncclCommInitRank\0").map_err(sym)?;
                        let all_reduce = *lib.get(b"ncclAllReduce\0").map_err(sym)?;
                        let comm_destroy = *lib.get(b"ncclCommDestroy\0").map_err(sym)?;
                        let error_string = *lib.get(b"ncclGetErrorString\0").map_err(sym)?;
                        return Ok(NcclApi {
                            _lib: lib,
                            get_unique_id,
                            comm_init_rank,
                            all_reduce,
                            comm_destroy,
                            error_string,
                        });
                    }
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(DistError::Nccl(format!(
            "cannot load libnccl.so.2 ({last}); put torch's nvidia/nccl/lib on LD_LIBRARY_PATH"
        )))
    }

    fn check(&self, what: &str, code: c_int) -> Result<(), DistError> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: NCCL returns a static string for any result code.
        let text = unsafe { CStr::from_ptr((self.error_string)(code)) }.to_string_lossy().into_owned();
        Err(DistError::Nccl(format!("{what} failed: {text} (code {code})")))
    }
}

fn sym(e: libloading::Error) -> DistError {
    DistError::Nccl(format!("libnccl lacks a symbol: {e}"))
}

/// An NCCL communicator of the whole group, on this process's GPU.
pub struct ProcessGroup {
    pub env: DistEnv,
    api: NcclApi,
    comm: NcclComm,
    /// This GPU's primary context, held for the communicator's lifetime and
    /// made current before each collective.
    ctx: std::sync::Arc<cudarc::driver::CudaContext>,
}

// SAFETY: the communicator is used from the training thread only; moving it
// between threads is allowed by NCCL.
unsafe impl Send for ProcessGroup {}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup").field("env", &self.env).finish()
    }
}

impl ProcessGroup {
    /// Joins the group of `env` on `cuda:LOCAL_RANK` (made this thread's
    /// current device first: NCCL binds the communicator to it).
    pub fn join(env: DistEnv) -> Result<ProcessGroup, DistError> {
        let api = NcclApi::open()?;
        let ctx = cudarc::driver::CudaContext::new(env.local_rank)
            .map_err(|e| DistError::Nccl(format!("cuda:{}: {e}", env.local_rank)))?;
        ctx.bind_to_thread().map_err(|e| DistError::Nccl(format!("cuda:{}: {e}", env.local_rank)))?;
        let mut id = NcclUniqueId { internal: [0; NCCL_UNIQUE_ID_BYTES] };
        if env.rank == 0 {
            // SAFETY: `id` is a valid out-pointer.
            api.check("ncclGetUniqueId", unsafe { (api.get_unique_id)(&mut id) })?;
        }
        let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
        let shared = exchange_id(&env, (env.rank == 0).then_some(bytes.as_slice()), NCCL_UNIQUE_ID_BYTES)?;
        for (dst, src) in id.internal.iter_mut().zip(&shared) {
            *dst = *src as c_char;
        }
        let mut comm: NcclComm = std::ptr::null_mut();
        // SAFETY: valid out-pointer; every rank passes the same id.
        api.check("ncclCommInitRank", unsafe {
            (api.comm_init_rank)(&mut comm, env.world_size as c_int, id, env.rank as c_int)
        })?;
        let group = ProcessGroup { env, api, comm, ctx };
        group.self_test()?;
        Ok(group)
    }

    /// Sums `rank + 1` over the group: a broken transport fails here, named,
    /// instead of corrupting training.
    fn self_test(&self) -> Result<(), DistError> {
        let device = tch::Device::Cuda(self.env.local_rank);
        let mut t = Tensor::from_slice(&[self.env.rank as f32 + 1.0]).to_device(device);
        self.all_reduce_sum(&mut t)?;
        let got = t.double_value(&[0]);
        let n = self.env.world_size as f64;
        let expected = n * (n + 1.0) / 2.0;
        if got != expected {
            return Err(DistError::Nccl(format!("all-reduce self-test: sum of rank+1 is {got}, expected {expected}")));
        }
        Ok(())
    }

    /// Sums the contiguous float32 CUDA tensor `t` over all ranks, in place,
    /// on the legacy default stream: ordered with libtorch's work, which runs
    /// on that stream too (as this crate's NVRTC kernels rely on), so no host
    /// synchronization is needed before or after.
    pub fn all_reduce_sum(&self, t: &mut Tensor) -> Result<(), DistError> {
        if t.kind() != Kind::Float || !t.is_contiguous() || !t.device().is_cuda() {
            return Err(DistError::Nccl("all-reduce needs a contiguous float32 CUDA tensor".into()));
        }
        let ptr = t.data_ptr();
        let ctx_err = |e: cudarc::driver::DriverError| DistError::Nccl(format!("cuda:{}: {e}", self.env.local_rank));
        self.ctx.bind_to_thread().map_err(ctx_err)?;
        // SAFETY: `ptr` addresses numel() float32 values on this rank's GPU,
        // alive until the call returns and ordered on the null stream.
        self.api.check("ncclAllReduce", unsafe {
            (self.api.all_reduce)(ptr, ptr, t.numel(), NCCL_FLOAT32, NCCL_SUM, self.comm, std::ptr::null_mut())
        })
    }

    /// Averages `tensors` (same shapes, in the same order on every rank) over
    /// all ranks in one all-reduce of their concatenation, writing the means
    /// back.
    pub fn all_reduce_mean(&self, tensors: &[Tensor]) -> Result<(), DistError> {
        if tensors.is_empty() {
            return Ok(());
        }
        let flat: Vec<Tensor> = tensors.iter().map(|t| t.detach().to_kind(Kind::Float).reshape([-1])).collect();
        let mut buffer = Tensor::cat(&flat, 0);
        self.all_reduce_sum(&mut buffer)?;
        let _ = buffer.g_mul_scalar_(1.0 / self.env.world_size as f64);
        let mut offset = 0;
        tch::no_grad(|| {
            for t in tensors {
                let n = t.numel() as i64;
                let mut dst = t.shallow_clone();
                dst.copy_(&buffer.narrow(0, offset, n).view_as(t));
                offset += n;
            }
        });
        Ok(())
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `comm` came from ncclCommInitRank and is destroyed once.
        unsafe { (self.api.comm_destroy)(self.comm) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> Result<Option<DistEnv>, DistError> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        DistEnv::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn environment_is_read_like_torchrun() {
        assert_eq!(env_of(&[]).unwrap(), None);
        assert_eq!(env_of(&[("WORLD_SIZE", "1")]).unwrap(), None);
        let e = env_of(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_PORT", "29500")]).unwrap().unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank, e.master_addr.as_str()), (1, 2, 1, "127.0.0.1"));
        let bad = env_of(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_PORT", "1")]).unwrap_err();
        assert!(bad.to_string().contains("RANK 2 is not below WORLD_SIZE 2"), "{bad}");
        let missing = env_of(&[("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).unwrap_err();
        assert!(missing.to_string().contains("RANK is not"), "{missing}");
        let junk = env_of(&[("WORLD_SIZE", "two")]).unwrap_err();
        assert!(junk.to_string().contains("WORLD_SIZE"), "{junk}");
    }

    #[test]
    fn rendezvous_hands_rank_zeros_id_to_every_rank() {
        // Rank 0's listener on a port the kernel picks, bound before any
        // client starts: a fixed port could be another job's on a machine
        // whose network several CI jobs share.
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let id: Vec<u8> = (0..128u8).collect();
        let started = Instant::now();
        let others: Vec<_> = (1..3)
            .map(|_| {
                let addr = addr.clone();
                std::thread::spawn(move || fetch_id(&addr, 128, started))
            })
            .collect();
        serve_id(&listener, &id, 2, started).unwrap();
        for h in others {
            assert_eq!(h.join().unwrap().unwrap(), id);
        }
    }

    #[test]
    fn a_connection_closed_before_the_id_is_retried() {
        // A listener that closes without writing (another job's) must not
        // end the rendezvous: the client retries until rank 0 answers.
        let foreign = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = foreign.local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let started = Instant::now();
        let client = std::thread::spawn(move || fetch_id(&addr, 4, started));
        let (stream, _) = foreign.accept().unwrap();
        drop(stream);
        drop(foreign);
        let listener = loop {
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
                break l;
            }
            assert!(started.elapsed() < RENDEZVOUS_TIMEOUT, "port {port} not free again");
            std::thread::sleep(Duration::from_millis(20));
        };
        serve_id(&listener, &[7, 8, 9, 10], 1, started).unwrap();
        assert_eq!(client.join().unwrap().unwrap(), vec![7, 8, 9, 10]);
    }
}
