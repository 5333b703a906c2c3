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
    /// The CPU ranks' all-reduce over the rendezvous sockets failed at the
    /// link to `peer` (it died, or its machine is unreachable).
    #[error("TCP all-reduce: lost rank {peer} (it failed or stopped)")]
    Tcp {
        peer: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("all-reduce input")]
    Tensor(#[source] tch::TchError),
    /// The gradient buckets' CUDA events or stream.
    #[error(transparent)]
    Buckets(#[from] crate::distributed::grad_buckets::BucketError),
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
    /// Identifies one launch (`MASKRCNN_RUN_ID`, else torchrun's
    /// `TORCHELASTIC_RUN_ID`, hashed; 0 without either): ranks of another
    /// run are refused at the rendezvous.
    pub run_id: u64,
    /// How long the rendezvous waits (`MASKRCNN_RENDEZVOUS_TIMEOUT`, seconds).
    pub timeout: Duration,
    /// How long a training step may go without progress before the rank
    /// ends itself (`MASKRCNN_COLLECTIVE_TIMEOUT`, seconds; see
    /// [`crate::distributed::watchdog`]).
    pub collective_timeout: Duration,
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
        let run_id = var("MASKRCNN_RUN_ID")
            .or_else(|| var("TORCHELASTIC_RUN_ID"))
            .map_or(0, |id| crate::random::fnv1a(id.as_bytes()));
        let timeout = seconds(&var, "MASKRCNN_RENDEZVOUS_TIMEOUT", DEFAULT_RENDEZVOUS_TIMEOUT)?;
        let collective_timeout = seconds(&var, "MASKRCNN_COLLECTIVE_TIMEOUT", DEFAULT_COLLECTIVE_TIMEOUT)?;
        Ok(Some(DistEnv {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
            run_id,
            timeout,
            collective_timeout,
        }))
    }

    /// The group of this process's environment.
    pub fn from_process() -> Result<Option<DistEnv>, DistError> {
        DistEnv::from_vars(|name| std::env::var(name).ok())
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }
}

/// A duration in seconds (> 0) from variable `name`, else `default`.
fn seconds(var: &impl Fn(&str) -> Option<String>, name: &str, default: Duration) -> Result<Duration, DistError> {
    let Some(v) = var(name) else { return Ok(default) };
    let s: f64 = parse(name, &v)?;
    if !(s > 0.0 && s.is_finite()) {
        return Err(DistError::Env(format!("{name}={v:?} must be > 0 seconds")));
    }
    Ok(Duration::from_secs_f64(s))
}

fn parse<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, DistError> {
    value.trim().parse().map_err(|_| DistError::Env(format!("{name}={value:?} is not a valid number")))
}

/// How long ranks wait for each other at the rendezvous unless
/// `MASKRCNN_RENDEZVOUS_TIMEOUT` (seconds) says otherwise.
const DEFAULT_RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a training step may make no progress unless
/// `MASKRCNN_COLLECTIVE_TIMEOUT` (seconds) says otherwise: far above any
/// step (evaluations are not timed: the watchdog pauses for them).
const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(1800);

/// How often a waiting rank says what it waits for.
const PROGRESS_EVERY: Duration = Duration::from_secs(15);

/// Every rendezvous message starts with these bytes and the protocol
/// version, so rank 0 and its peers recognize each other and anything else
/// listening or connecting at the address is refused, not misread.
const MAGIC: &[u8; 8] = b"MRCNNRDV";
const PROTOCOL: u32 = 1;

/// A peer's greeting: magic, protocol, rank, world size, run id.
fn hello(rank: usize, world_size: usize, run_id: u64) -> Vec<u8> {
    let mut m = MAGIC.to_vec();
    m.extend(PROTOCOL.to_le_bytes());
    m.extend((rank as u32).to_le_bytes());
    m.extend((world_size as u32).to_le_bytes());
    m.extend(run_id.to_le_bytes());
    m
}
const HELLO_BYTES: usize = 8 + 4 + 4 + 4 + 8;

/// A greeting's `(rank, world_size, run_id)`, or why it is not one.
fn parse_hello(m: &[u8; HELLO_BYTES]) -> Result<(usize, usize, u64), String> {
    if &m[..8] != MAGIC {
        return Err("not a maskrcnn rank".into());
    }
    let u32_at = |i: usize| u32::from_le_bytes([m[i], m[i + 1], m[i + 2], m[i + 3]]);
    if u32_at(8) != PROTOCOL {
        return Err(format!("rendezvous protocol {} (this build speaks {PROTOCOL})", u32_at(8)));
    }
    let run = u64::from_le_bytes(m[20..28].try_into().unwrap_or_default());
    Ok((u32_at(12) as usize, u32_at(16) as usize, run))
}

/// Rank 0's reply: magic, then 0 and the answer, or 1 and a reason.
fn reply(answer: Result<&[u8], &str>) -> Vec<u8> {
    let mut m = MAGIC.to_vec();
    match answer {
        Ok(a) => {
            m.push(0);
            m.extend(a);
        }
        Err(reason) => {
            m.push(1);
            m.extend((reason.len() as u32).to_le_bytes());
            m.extend(reason.as_bytes());
        }
    }
    m
}

/// The connections a rendezvous leaves: rank 0 holds one per other rank,
/// in rank order; the others hold theirs to rank 0 and rank 0's answer.
pub enum Rendezvous {
    Root(Vec<TcpStream>),
    Peer { stream: TcpStream, answer: Vec<u8> },
}

/// Connects every rank of `env` to rank 0: rank 0 listens at the master
/// address until the `world_size - 1` others have connected and greeted it
/// (magic, protocol, rank, world size, run id), and sends each of them
/// `answer` (`Some` on rank 0 only); the others connect (retrying while
/// nobody listens) and read `answer_len` bytes. Waiting ranks say what they
/// wait for every 15 s and give up after `env.timeout`; a master address
/// that does not resolve, a port another program holds, or a stranger
/// answering fail at once.
pub fn rendezvous(env: &DistEnv, answer: Option<&[u8]>, answer_len: usize) -> Result<Rendezvous, DistError> {
    let addr = env.addr();
    let err = |message: String| DistError::Rendezvous { addr: addr.clone(), message };
    let started = Instant::now();
    if env.rank == 0 {
        let answer = answer.ok_or_else(|| err("rank 0 has nothing to hand over".into()))?;
        // A peer's connect attempt can briefly hold the port (see
        // `connect_to_root`): retry the bind a few seconds, not longer (a
        // port held that long is another program's).
        let listener = loop {
            match TcpListener::bind(("0.0.0.0", env.master_port)) {
                Ok(l) => break l,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && started.elapsed() < Duration::from_secs(5) => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    return Err(err(format!(
                        "port {} is in use by another program; set MASTER_PORT (launch --master-port) to a free one",
                        env.master_port
                    )))
                }
                Err(e) => return Err(err(format!("cannot listen: {e}"))),
            }
        };
        let roster = Roster { world_size: env.world_size, run_id: env.run_id, timeout: env.timeout };
        accept_ranks(&listener, answer, &roster, started).map(Rendezvous::Root).map_err(err)
    } else {
        // A name that does not resolve never will: fail now.
        std::net::ToSocketAddrs::to_socket_addrs(&addr.as_str())
            .map_err(|e| err(format!("MASTER_ADDR {:?} does not resolve: {e}", env.master_addr)))?;
        let greeting = hello(env.rank, env.world_size, env.run_id);
        let (stream, answer) = connect_to_root(&addr, &greeting, answer_len, started, env.timeout).map_err(err)?;
        Ok(Rendezvous::Peer { stream, answer })
    }
}

/// What rank 0 expects of its peers.
struct Roster {
    world_size: usize,
    run_id: u64,
    timeout: Duration,
}

/// Rank 0's side: accepts connections on `listener` until ranks
/// `1..world_size` have each greeted it and been sent `answer`, giving up
/// `roster.timeout` after `started`. A connection that is not a maskrcnn
/// rank is dropped (said once); a rank of another run, world size or
/// protocol, or one already joined, is told why it is refused. Returns the
/// streams ordered by rank.
fn accept_ranks(
    listener: &TcpListener,
    answer: &[u8],
    roster: &Roster,
    started: Instant,
) -> Result<Vec<TcpStream>, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut joined: Vec<Option<TcpStream>> = (1..roster.world_size).map(|_| None).collect();
    let mut said = Instant::now();
    let mut warned_stranger = false;
    while joined.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((mut stream, from)) => {
                stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
                let mut greeting = [0u8; HELLO_BYTES];
                if stream.read_exact(&mut greeting).is_err() {
                    continue;
                }
                let refuse = |stream: &mut TcpStream, reason: &str| {
                    let _ = stream.write_all(&reply(Err(reason)));
                };
                let (rank, world, run) = match parse_hello(&greeting) {
                    Ok(h) => h,
                    Err(e) => {
                        if !warned_stranger {
                            tracing::warn!("rendezvous: dropped a connection from {from}: {e}");
                            warned_stranger = true;
                        }
                        continue;
                    }
                };
                if world != roster.world_size || run != roster.run_id {
                    let reason = format!(
                        "rank 0 runs WORLD_SIZE {} (run {:x}); this rank has WORLD_SIZE {world} (run {run:x})",
                        roster.world_size, roster.run_id
                    );
                    refuse(&mut stream, &reason);
                    continue;
                }
                let Some(slot) = rank.checked_sub(1).and_then(|i| joined.get_mut(i)) else {
                    refuse(&mut stream, &format!("rank {rank} is not in 1..{}", roster.world_size));
                    continue;
                };
                if slot.is_some() {
                    refuse(&mut stream, &format!("rank {rank} has joined already"));
                    continue;
                }
                stream.write_all(&reply(Ok(answer))).map_err(|e| format!("answering rank {rank}: {e}"))?;
                stream.set_read_timeout(None).map_err(|e| e.to_string())?;
                let _ = stream.set_nodelay(true);
                *slot = Some(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let missing: Vec<String> =
                    (1..roster.world_size).filter(|r| joined[r - 1].is_none()).map(|r| r.to_string()).collect();
                if started.elapsed() > roster.timeout {
                    return Err(format!(
                        "ranks {} did not connect within {} s (MASKRCNN_RENDEZVOUS_TIMEOUT)",
                        missing.join(", "),
                        roster.timeout.as_secs()
                    ));
                }
                if said.elapsed() > PROGRESS_EVERY {
                    tracing::info!(
                        "rendezvous: rank 0 waiting for ranks {} ({:.0} s of {} s)",
                        missing.join(", "),
                        started.elapsed().as_secs_f64(),
                        roster.timeout.as_secs()
                    );
                    said = Instant::now();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(joined.into_iter().flatten().collect())
}

/// The other ranks' side: connects to rank 0 at `addr`, sends `greeting`
/// and reads rank 0's reply with `answer_len` bytes, retrying until
/// `timeout` after `started` while nobody listens yet or a connection
/// closes before any reply (a listener gone since). A reply that is not
/// rank 0's (another program at the address) or a refusal fails at once.
fn connect_to_root(
    addr: &str,
    greeting: &[u8],
    answer_len: usize,
    started: Instant,
    timeout: Duration,
) -> Result<(TcpStream, Vec<u8>), String> {
    let mut said = Instant::now();
    loop {
        let failure = match TcpStream::connect(addr) {
            // Connecting on localhost to a port nobody listens on yet can
            // connect the socket to itself (TCP simultaneous open, when the
            // kernel picks that same port as the local one): drop it.
            Ok(stream) if stream.local_addr().ok() == stream.peer_addr().ok() => "connected to itself".to_string(),
            Ok(mut stream) => {
                stream
                    .set_read_timeout(Some(timeout.saturating_sub(started.elapsed()).max(Duration::from_secs(1))))
                    .map_err(|e| e.to_string())?;
                let mut head = [0u8; 9];
                match stream.write_all(greeting).and_then(|()| stream.read_exact(&mut head)) {
                    Ok(()) if &head[..8] != MAGIC => {
                        let shown: String =
                            String::from_utf8_lossy(&head).chars().filter(|c| !c.is_control()).collect();
                        return Err(format!("what answers there is not a maskrcnn rank 0 (it sent {shown:?}…)"));
                    }
                    Ok(()) if head[8] != 0 => {
                        let mut len = [0u8; 4];
                        let mut reason = String::new();
                        if stream.read_exact(&mut len).is_ok() {
                            let n = u32::from_le_bytes(len).min(4096) as usize;
                            let mut text = vec![0u8; n];
                            let _ = stream.read_exact(&mut text);
                            reason = String::from_utf8_lossy(&text).into_owned();
                        }
                        return Err(format!("rank 0 refused this rank: {reason}"));
                    }
                    Ok(()) => {
                        let mut answer = vec![0u8; answer_len];
                        match stream.read_exact(&mut answer) {
                            Ok(()) => {
                                stream.set_read_timeout(None).map_err(|e| e.to_string())?;
                                let _ = stream.set_nodelay(true);
                                return Ok((stream, answer));
                            }
                            Err(e) => format!("reading rank 0's answer: {e}"),
                        }
                    }
                    Err(e) => format!("waiting for rank 0's reply: {e}"),
                }
            }
            Err(e) => e.to_string(),
        };
        if started.elapsed() > timeout {
            return Err(format!(
                "rank 0 not reachable within {} s (MASKRCNN_RENDEZVOUS_TIMEOUT): {failure}",
                timeout.as_secs()
            ));
        }
        if said.elapsed() > PROGRESS_EVERY {
            tracing::info!(
                "rendezvous: waiting for rank 0 at {addr} ({:.0} s of {} s; last: {failure})",
                started.elapsed().as_secs_f64(),
                timeout.as_secs()
            );
            said = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// NCCL's ABI (nccl.h): the unique id is 128 bytes passed by value; results
// and enums are C ints.
const NCCL_UNIQUE_ID_BYTES: usize = 128;
const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;
const NCCL_AVG: c_int = 4;

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
    watchdog: crate::distributed::watchdog::Watchdog,
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
        let watchdog = crate::distributed::watchdog::Watchdog::start(env.rank, env.collective_timeout, None);
        let group = ProcessGroup { env, transport, watchdog };
        group.self_test()?;
        Ok(group)
    }

    /// Training progressed (a step starts): the next beat must come within
    /// the collective timeout, or this rank ends itself.
    pub fn heartbeat(&self) {
        self.watchdog.beat();
    }

    /// Nothing to watch until the next step's beat (an evaluation runs, or
    /// training ended).
    pub fn pause_watchdog(&self) {
        self.watchdog.pause();
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
        self.all_reduce(t, NCCL_SUM, std::ptr::null_mut())
    }

    /// Averages the contiguous float32 tensor `t` over all ranks, in place
    /// (NCCL's `ncclAvg`: no separate scaling pass on the GPU).
    pub fn all_reduce_mean_in_place(&self, t: &mut Tensor) -> Result<(), DistError> {
        self.all_reduce(t, NCCL_AVG, std::ptr::null_mut())
    }

    /// [`all_reduce_mean_in_place`](Self::all_reduce_mean_in_place) queued
    /// on the CUDA stream `stream` (a raw `CUstream`; null: the legacy
    /// default stream) instead: the caller orders it with other work. The
    /// CPU ranks' all-reduce ignores it.
    ///
    /// # Safety
    /// `stream` must be null or a live stream of this rank's GPU, and `t`
    /// must stay allocated until the all-reduce has run on it.
    pub unsafe fn all_reduce_mean_on(&self, t: &mut Tensor, stream: *mut c_void) -> Result<(), DistError> {
        self.all_reduce(t, NCCL_AVG, stream)
    }

    /// `t` reduced in place over the ranks by `op` (`NCCL_SUM` or
    /// `NCCL_AVG`), on `stream` under NCCL.
    fn all_reduce(&self, t: &mut Tensor, op: c_int, stream: *mut c_void) -> Result<(), DistError> {
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
                // rank's GPU, alive until the all-reduce ran (the null
                // stream's order, or the caller's on its `stream`).
                api.check("ncclAllReduce", unsafe {
                    (api.all_reduce)(ptr, ptr, t.numel(), NCCL_FLOAT32, op, *comm, stream)
                })
            }
            Transport::Tcp(links) => {
                let mut values = Vec::<f32>::try_from(&*t).map_err(DistError::Tensor)?;
                tcp_sum(links, &mut values).map_err(|(peer, source)| DistError::Tcp { peer, source })?;
                if op == NCCL_AVG {
                    let n = self.env.world_size as f32;
                    values.iter_mut().for_each(|v| *v /= n);
                }
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
        self.all_reduce_mean_in_place(&mut buffer)?;
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

/// The CPU ranks' all-reduce (sum) of `values` over the rendezvous
/// sockets: rank 0 adds its peers' values (rank 1, 2, ... in order) and
/// sends the sum back. An error names the rank at the other end.
fn tcp_sum(links: &Rendezvous, values: &mut [f32]) -> Result<(), (usize, std::io::Error)> {
    let mut bytes = vec![0u8; values.len() * 4];
    match links {
        Rendezvous::Root(peers) => {
            for (i, mut peer) in peers.iter().enumerate() {
                peer.read_exact(&mut bytes).map_err(|e| (i + 1, e))?;
                for (v, b) in values.iter_mut().zip(bytes.chunks_exact(4)) {
                    *v += f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            for (b, v) in bytes.chunks_exact_mut(4).zip(values.iter()) {
                b.copy_from_slice(&v.to_le_bytes());
            }
            for (i, mut peer) in peers.iter().enumerate() {
                peer.write_all(&bytes).map_err(|e| (i + 1, e))?;
            }
        }
        Rendezvous::Peer { stream, .. } => {
            for (b, v) in bytes.chunks_exact_mut(4).zip(values.iter()) {
                b.copy_from_slice(&v.to_le_bytes());
            }
            let mut stream = stream;
            stream.write_all(&bytes).map_err(|e| (0, e))?;
            stream.read_exact(&mut bytes).map_err(|e| (0, e))?;
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
        assert_eq!((e.run_id, e.timeout), (0, DEFAULT_RENDEZVOUS_TIMEOUT));
        let vars = [("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_PORT", "1"), ("MASKRCNN_RENDEZVOUS_TIMEOUT", "2.5")];
        let e = env_of(&[&vars[..], &[("TORCHELASTIC_RUN_ID", "job-7")]].concat()).unwrap().unwrap();
        assert_eq!((e.run_id, e.timeout), (crate::random::fnv1a(b"job-7"), Duration::from_millis(2500)));
        let zero = env_of(&[&vars[..3], &[("MASKRCNN_RENDEZVOUS_TIMEOUT", "0")]].concat()).unwrap_err();
        assert!(zero.to_string().contains("must be > 0"), "{zero}");
        assert_eq!(e.collective_timeout, DEFAULT_COLLECTIVE_TIMEOUT);
        let e = env_of(&[&vars[..3], &[("MASKRCNN_COLLECTIVE_TIMEOUT", "90")]].concat()).unwrap().unwrap();
        assert_eq!(e.collective_timeout, Duration::from_secs(90));
        let bad = env_of(&[&vars[..3], &[("MASKRCNN_COLLECTIVE_TIMEOUT", "-1")]].concat()).unwrap_err();
        assert!(bad.to_string().contains("MASKRCNN_COLLECTIVE_TIMEOUT"), "{bad}");
    }

    /// A test group's environment: rank `rank` of `world` at `port`.
    fn test_env(rank: usize, world: usize, master_addr: &str, port: u16, timeout_s: f64) -> DistEnv {
        DistEnv {
            rank,
            world_size: world,
            local_rank: rank,
            master_addr: master_addr.into(),
            master_port: port,
            run_id: 42,
            timeout: Duration::from_secs_f64(timeout_s),
            collective_timeout: DEFAULT_COLLECTIVE_TIMEOUT,
        }
    }

    /// Every start-up failure ends within its timeout with one line naming
    /// what was awaited (they hung for minutes, silently, or misread an
    /// HTTP reply as a rank): no rank 0 at all; a master name that does not
    /// resolve (at once); rank 0's port held by another program (within a
    /// few seconds); another program answering at the address; a peer of
    /// another world size (told so by rank 0).
    #[test]
    fn rendezvous_failures_end_in_time_naming_the_cause() {
        let free = TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port();
        let timed = |env: DistEnv| {
            let t = Instant::now();
            let e = rendezvous(&env, (env.rank == 0).then_some(&[1u8][..]), 1).err().expect("fails").to_string();
            (e, t.elapsed())
        };
        let (e, took) = timed(test_env(1, 2, "127.0.0.1", free, 1.0));
        assert!(e.contains("rank 0 not reachable within 1 s"), "{e}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        let (e, took) = timed(test_env(0, 2, "127.0.0.1", free, 1.0));
        assert!(e.contains("ranks 1 did not connect within 1 s"), "{e}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        let (e, took) = timed(test_env(1, 2, "no-such-host.invalid", free, 60.0));
        assert!(e.contains("does not resolve"), "{e}");
        assert!(took < Duration::from_secs(20), "{took:?}");
        // Another program holding the port.
        let held = TcpListener::bind(("0.0.0.0", 0)).unwrap();
        let port = held.local_addr().unwrap().port();
        let (e, took) = timed(test_env(0, 2, "127.0.0.1", port, 60.0));
        assert!(e.contains(&format!("port {port} is in use by another program")), "{e}");
        assert!(took < Duration::from_secs(15), "{took:?}");
        // Another program answering (an HTTP server, say).
        let web = std::thread::spawn(move || {
            let (mut s, _) = held.accept().unwrap();
            let mut buf = [0u8; HELLO_BYTES];
            let _ = s.read_exact(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        });
        let (e, _) = timed(test_env(1, 2, "127.0.0.1", port, 60.0));
        assert!(e.contains("not a maskrcnn rank 0") && e.contains("HTTP/1.1"), "{e}");
        web.join().unwrap();
        // A peer of another world size is refused with the reason.
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let started = Instant::now();
        let wrong = std::thread::spawn(move || {
            connect_to_root(&addr, &hello(1, 3, 42), 1, started, Duration::from_secs(30)).expect_err("refused")
        });
        let roster = Roster { world_size: 2, run_id: 42, timeout: Duration::from_secs(2) };
        let _ = accept_ranks(&listener, &[1], &roster, started);
        let e = wrong.join().unwrap();
        assert!(e.contains("refused this rank") && e.contains("WORLD_SIZE 3"), "{e}");
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
        let timeout = Duration::from_secs(60);
        let others: Vec<_> = [2, 1]
            .into_iter()
            .map(|rank| {
                let addr = addr.clone();
                std::thread::spawn(move || connect_to_root(&addr, &hello(rank, 3, 9), 128, started, timeout))
            })
            .collect();
        let roster = Roster { world_size: 3, run_id: 9, timeout };
        let streams = accept_ranks(&listener, &id, &roster, started).unwrap();
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
        let timeout = Duration::from_secs(60);
        let client = std::thread::spawn(move || connect_to_root(&addr, &hello(1, 2, 0), 4, started, timeout));
        let (stream, _) = foreign.accept().unwrap();
        drop(stream);
        drop(foreign);
        let listener = loop {
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
                break l;
            }
            assert!(started.elapsed() < timeout, "port {port} not free again");
            std::thread::sleep(Duration::from_millis(20));
        };
        accept_ranks(&listener, &[7, 8, 9, 10], &Roster { world_size: 2, run_id: 0, timeout }, started).unwrap();
        assert_eq!(client.join().unwrap().unwrap().1, vec![7, 8, 9, 10]);
    }

    #[test]
    fn cpu_groups_sum_and_average_over_tcp() {
        // Three ranks in threads, each joining through the environment path.
        let port = TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port();
        let ranks: Vec<_> = (0..3)
            .map(|rank| {
                std::thread::spawn(move || {
                    let env = test_env(rank, 3, "127.0.0.1", port, 60.0);
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
