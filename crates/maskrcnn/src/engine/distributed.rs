//! Data-parallel training over several GPUs of one machine: one process per
//! GPU (started by `maskrcnn launch`, or by any torchrun-style launcher),
//! gradients summed by an NCCL all-reduce and divided by the world size, as
//! PyTorch's DistributedDataParallel does. Processes on the CPU sum over TCP
//! instead (through rank 0, like torch's gloo backend serves CPU tensors):
//! the same training logic then runs, and is tested, without GPUs.
//!
//! The process group comes from torchrun's environment: `RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK` (the GPU), `MASTER_ADDR`, `MASTER_PORT`. Every
//! rank connects to rank 0 at `MASTER_ADDR:MASTER_PORT` and names its rank;
//! rank 0 answers with NCCL's unique id (GPUs) or keeps the connections for
//! the CPU all-reduce.
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

/// The connections a rendezvous leaves: rank 0 holds one per other rank,
/// ordered by rank (1, 2, ...); every other rank holds one to rank 0 and rank
/// 0's answer.
#[derive(Debug)]
pub enum Rendezvous {
    Root(Vec<TcpStream>),
    Peer { stream: TcpStream, answer: Vec<u8> },
}

/// Connects every rank of `env` to rank 0: rank 0 listens at the master
/// address until the `world_size - 1` others have connected and named their
/// rank, and sends each of them `answer` (`Some` on rank 0 only); the others
/// connect (retrying until the timeout) and read `answer_len` bytes.
pub fn rendezvous(env: &DistEnv, answer: Option<&[u8]>, answer_len: usize) -> Result<Rendezvous, DistError> {
    let addr = env.addr();
    let err = |message: String| DistError::Rendezvous { addr: addr.clone(), message };
    let started = Instant::now();
    if env.rank == 0 {
        let answer = answer.ok_or_else(|| err("rank 0 has nothing to hand over".into()))?;
        // A peer's connect attempt can briefly hold the port (see
        // `connect_to_root`): retry the bind until the timeout.
        let listener = loop {
            match TcpListener::bind(("0.0.0.0", env.master_port)) {
                Ok(l) => break l,
                Err(e) if started.elapsed() > RENDEZVOUS_TIMEOUT => return Err(err(format!("cannot listen: {e}"))),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        accept_ranks(&listener, answer, env.world_size, started).map(Rendezvous::Root).map_err(err)
    } else {
        let (stream, answer) = connect_to_root(&addr, env.rank, answer_len, started).map_err(err)?;
        Ok(Rendezvous::Peer { stream, answer })
    }
}

/// Rank 0's side: accepts connections on `listener` until ranks
/// `1..world_size` have each named themselves (a `u32` little-endian) and
/// been sent `answer`, giving up `RENDEZVOUS_TIMEOUT` after `started`. A
/// connection that does not name a missing rank is dropped. Returns the
/// streams ordered by rank.
fn accept_ranks(
    listener: &TcpListener,
    answer: &[u8],
    world_size: usize,
    started: Instant,
) -> Result<Vec<TcpStream>, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut joined: Vec<Option<TcpStream>> = (1..world_size).map(|_| None).collect();
    while joined.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
                let mut rank = [0u8; 4];
                if stream.read_exact(&mut rank).is_err() {
                    continue;
                }
                let rank = u32::from_le_bytes(rank) as usize;
                let Some(slot @ None) = rank.checked_sub(1).and_then(|i| joined.get_mut(i)) else {
                    continue;
                };
                stream.write_all(answer).map_err(|e| format!("answering rank {rank}: {e}"))?;
                stream.set_read_timeout(None).map_err(|e| e.to_string())?;
                let _ = stream.set_nodelay(true);
                *slot = Some(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if started.elapsed() > RENDEZVOUS_TIMEOUT {
                    let joined = joined.iter().filter(|s| s.is_some()).count();
                    return Err(format!(
                        "only {joined} of {} other ranks connected within {} s",
                        world_size - 1,
                        RENDEZVOUS_TIMEOUT.as_secs()
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(joined.into_iter().flatten().collect())
}

/// The other ranks' side: connects to rank 0 at `addr`, names `rank` and
/// reads `answer_len` bytes, retrying until `RENDEZVOUS_TIMEOUT` after
/// `started` while nobody listens yet or a connection closes before the
/// whole answer arrived (a listener that was not rank 0's: another job's,
/// gone since, on a machine whose ports several jobs share).
fn connect_to_root(
    addr: &str,
    rank: usize,
    answer_len: usize,
    started: Instant,
) -> Result<(TcpStream, Vec<u8>), String> {
    loop {
        let failure = match TcpStream::connect(addr) {
            // Connecting on localhost to a port nobody listens on yet can
            // connect the socket to itself (TCP simultaneous open, when the
            // kernel picks that same port as the local one): drop it.
            Ok(stream) if stream.local_addr().ok() == stream.peer_addr().ok() => "connected to itself".to_string(),
            Ok(mut stream) => {
                stream.set_read_timeout(Some(RENDEZVOUS_TIMEOUT)).map_err(|e| e.to_string())?;
                let mut answer = vec![0u8; answer_len];
                match stream.write_all(&(rank as u32).to_le_bytes()).and_then(|()| stream.read_exact(&mut answer)) {
                    Ok(()) => {
                        stream.set_read_timeout(None).map_err(|e| e.to_string())?;
                        let _ = stream.set_nodelay(true);
                        return Ok((stream, answer));
                    }
                    Err(e) => format!("waiting for rank 0's answer: {e}"),
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

/// The whole group, as this process takes part in it.
pub struct ProcessGroup {
    pub env: DistEnv,
    transport: Transport,
}

/// How the group sums tensors.
enum Transport {
    /// An NCCL communicator on this process's GPU, with the GPU's primary
    /// context (held for the communicator's lifetime, made current before
    /// each collective).
    Nccl { api: NcclApi, comm: NcclComm, ctx: std::sync::Arc<cudarc::driver::CudaContext> },
    /// CPU tensors: every rank sends its values to rank 0, which adds them in
    /// rank order and sends the sum back (the same bits on every rank).
    Tcp(Rendezvous),
}

// SAFETY: the communicator is used from the training thread only; moving it
// between threads is allowed by NCCL.
unsafe impl Send for ProcessGroup {}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match self.transport {
            Transport::Nccl { .. } => "nccl",
            Transport::Tcp(_) => "tcp",
        };
        f.debug_struct("ProcessGroup").field("env", &self.env).field("backend", &backend).finish()
    }
}

impl ProcessGroup {
    /// Joins the group of `env`: over NCCL on `cuda:LOCAL_RANK` when `cuda`
    /// (made this thread's current device first: NCCL binds the communicator
    /// to it), else over TCP for CPU tensors. Ends with an all-reduce
    /// self-test.
    pub fn join(env: DistEnv, cuda: bool) -> Result<ProcessGroup, DistError> {
        let transport = if cuda { Self::join_nccl(&env)? } else { Transport::Tcp(rendezvous(&env, Some(&[1]), 1)?) };
        let group = ProcessGroup { env, transport };
        group.self_test()?;
        Ok(group)
    }

    fn join_nccl(env: &DistEnv) -> Result<Transport, DistError> {
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
        // The connections end here: NCCL makes its own.
        if let Rendezvous::Peer { answer, .. } =
            rendezvous(env, (env.rank == 0).then_some(bytes.as_slice()), NCCL_UNIQUE_ID_BYTES)?
        {
            for (dst, src) in id.internal.iter_mut().zip(&answer) {
                *dst = *src as c_char;
            }
        }
        let mut comm: NcclComm = std::ptr::null_mut();
        // SAFETY: valid out-pointer; every rank passes the same id.
        api.check("ncclCommInitRank", unsafe {
            (api.comm_init_rank)(&mut comm, env.world_size as c_int, id, env.rank as c_int)
        })?;
        Ok(Transport::Nccl { api, comm, ctx })
    }

    /// The device whose tensors this group sums.
    pub fn device(&self) -> tch::Device {
        match self.transport {
            Transport::Nccl { .. } => tch::Device::Cuda(self.env.local_rank),
            Transport::Tcp(_) => tch::Device::Cpu,
        }
    }

    /// Sums `rank + 1` over the group: a broken transport fails here, named,
    /// instead of corrupting training.
    fn self_test(&self) -> Result<(), DistError> {
        let mut t = Tensor::from_slice(&[self.env.rank as f32 + 1.0]).to_device(self.device());
        self.all_reduce_sum(&mut t)?;
        let got = t.double_value(&[0]);
        let n = self.env.world_size as f64;
        let expected = n * (n + 1.0) / 2.0;
        if got != expected {
            return Err(DistError::Nccl(format!("all-reduce self-test: sum of rank+1 is {got}, expected {expected}")));
        }
        Ok(())
    }

    /// Sums the contiguous float32 tensor `t` (on [`ProcessGroup::device`])
    /// over all ranks, in place. NCCL runs on the legacy default stream:
    /// ordered with libtorch's work, which runs on that stream too (as this
    /// crate's NVRTC kernels rely on), so no host synchronization is needed
    /// before or after.
    pub fn all_reduce_sum(&self, t: &mut Tensor) -> Result<(), DistError> {
        if t.kind() != Kind::Float || !t.is_contiguous() || t.device() != self.device() {
            return Err(DistError::Nccl(format!(
                "all-reduce needs a contiguous float32 tensor on {:?}",
                self.device()
            )));
        }
        match &self.transport {
            Transport::Nccl { api, comm, ctx } => {
                let ptr = t.data_ptr();
                let ctx_err =
                    |e: cudarc::driver::DriverError| DistError::Nccl(format!("cuda:{}: {e}", self.env.local_rank));
                ctx.bind_to_thread().map_err(ctx_err)?;
                // SAFETY: `ptr` addresses numel() float32 values on this
                // rank's GPU, alive until the call returns and ordered on the
                // null stream.
                api.check("ncclAllReduce", unsafe {
                    (api.all_reduce)(ptr, ptr, t.numel(), NCCL_FLOAT32, NCCL_SUM, *comm, std::ptr::null_mut())
                })
            }
            Transport::Tcp(links) => {
                let mut values = Vec::<f32>::try_from(&*t).map_err(|e| DistError::Nccl(e.to_string()))?;
                tcp_sum(links, &mut values).map_err(|e| DistError::Nccl(format!("TCP all-reduce: {e}")))?;
                tch::no_grad(|| t.copy_(&Tensor::from_slice(&values).view_as(t)));
                Ok(())
            }
        }
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

/// The TCP all-reduce: `values` becomes the sum over ranks, added on rank 0
/// in rank order.
fn tcp_sum(links: &Rendezvous, values: &mut [f32]) -> std::io::Result<()> {
    let mut bytes = vec![0u8; values.len() * 4];
    match links {
        Rendezvous::Root(peers) => {
            for mut peer in peers {
                peer.read_exact(&mut bytes)?;
                for (v, b) in values.iter_mut().zip(bytes.chunks_exact(4)) {
                    *v += f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            for (b, v) in bytes.chunks_exact_mut(4).zip(values.iter()) {
                b.copy_from_slice(&v.to_le_bytes());
            }
            for mut peer in peers {
                peer.write_all(&bytes)?;
            }
        }
        Rendezvous::Peer { stream, .. } => {
            for (b, v) in bytes.chunks_exact_mut(4).zip(values.iter()) {
                b.copy_from_slice(&v.to_le_bytes());
            }
            let mut stream = stream;
            stream.write_all(&bytes)?;
            stream.read_exact(&mut bytes)?;
            for (v, b) in values.iter_mut().zip(bytes.chunks_exact(4)) {
                *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
    Ok(())
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Transport::Nccl { api, comm, .. } = &self.transport {
            // SAFETY: `comm` came from ncclCommInitRank and is destroyed once.
            unsafe { (api.comm_destroy)(*comm) };
        }
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
    fn rendezvous_hands_rank_zeros_answer_to_every_rank() {
        // Rank 0's listener on a port the kernel picks, bound before any
        // client starts: a fixed port could be another job's on a machine
        // whose network several CI jobs share.
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let id: Vec<u8> = (0..128u8).collect();
        let started = Instant::now();
        let others: Vec<_> = [2, 1]
            .into_iter()
            .map(|rank| {
                let addr = addr.clone();
                std::thread::spawn(move || connect_to_root(&addr, rank, 128, started))
            })
            .collect();
        let streams = accept_ranks(&listener, &id, 3, started).unwrap();
        assert_eq!(streams.len(), 2);
        for h in others {
            assert_eq!(h.join().unwrap().unwrap().1, id);
        }
    }

    #[test]
    fn a_connection_closed_before_the_answer_is_retried() {
        // A listener that closes without answering (another job's) must not
        // end the rendezvous: the client retries until rank 0 answers.
        let foreign = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = foreign.local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let started = Instant::now();
        let client = std::thread::spawn(move || connect_to_root(&addr, 1, 4, started));
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
        accept_ranks(&listener, &[7, 8, 9, 10], 2, started).unwrap();
        assert_eq!(client.join().unwrap().unwrap().1, vec![7, 8, 9, 10]);
    }

    #[test]
    fn cpu_groups_sum_and_average_over_tcp() {
        // Three ranks in threads, each joining through the environment path.
        let port = TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port();
        let ranks: Vec<_> = (0..3)
            .map(|rank| {
                std::thread::spawn(move || {
                    let env = DistEnv {
                        rank,
                        world_size: 3,
                        local_rank: rank,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                    };
                    let g = ProcessGroup::join(env, false).unwrap();
                    // 1.1 + 2.2 + 3.3 in rank order, and a mean of two tensors.
                    let mut t = Tensor::from_slice(&[1.1f32 * (rank + 1) as f32, -1.0]);
                    g.all_reduce_sum(&mut t).unwrap();
                    let a = Tensor::from_slice(&[rank as f32; 4]).view([2, 2]);
                    let b = Tensor::from_slice(&[10.0 * rank as f32]);
                    g.all_reduce_mean(&[a.shallow_clone(), b.shallow_clone()]).unwrap();
                    (
                        Vec::<f32>::try_from(&t).unwrap(),
                        Vec::<f32>::try_from(a.reshape([-1])).unwrap(),
                        b.double_value(&[0]),
                    )
                })
            })
            .collect();
        // Rank 0 adds in rank order: every rank gets exactly these bits.
        let expected = (1.1f32 * 1.0 + 1.1f32 * 2.0) + 1.1f32 * 3.0;
        for h in ranks {
            let (sum, a, b) = h.join().unwrap();
            assert_eq!(sum, vec![expected, -3.0]);
            assert_eq!(a, vec![1.0; 4]);
            assert!((b - 10.0).abs() < 1e-6, "{b}");
        }
    }
}
