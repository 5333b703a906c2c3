//! `maskrcnn launch`: starts one training process per GPU of this node with
//! torchrun's environment (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`,
//! `LOCAL_WORLD_SIZE`, `GROUP_RANK`, `MASTER_ADDR`, `MASTER_PORT`; several
//! nodes number their ranks node by node and meet at rank 0's address) and
//! supervises them: Ctrl-C reaches every rank once (each
//! checkpoints and stops at the same iteration), and when one rank fails the
//! others are stopped instead of waiting forever in a collective.

use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Why the group of ranks failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot start rank {rank}: {source}")]
    Spawn { rank: usize, source: std::io::Error },
    #[error("rank {rank} failed ({status}); the other ranks were stopped")]
    RankFailed { rank: usize, status: ExitStatus },
    #[error("{0}")]
    Setup(String),
}

/// Where one rank sits: its global rank, its index on its node (its GPU),
/// and the sizes of the whole group and of its node's share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankPlace {
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    pub local_world_size: usize,
    /// This node's index among the nodes (torchrun's `GROUP_RANK`).
    pub node_rank: usize,
}

impl RankPlace {
    /// Local rank `local_rank` of node `node_rank` among `nnodes` nodes of
    /// `nproc_per_node` ranks each (global ranks numbered node by node).
    pub fn of(node_rank: usize, nnodes: usize, nproc_per_node: usize, local_rank: usize) -> RankPlace {
        RankPlace {
            rank: node_rank * nproc_per_node + local_rank,
            local_rank,
            world_size: nnodes * nproc_per_node,
            local_world_size: nproc_per_node,
            node_rank,
        }
    }
}

/// The torchrun variables of a rank at `place` meeting at
/// `master_addr:port`, the launch's `MASKRCNN_RUN_ID` (ranks of another
/// launch are refused at the rendezvous), and (unless already set)
/// `OMP_NUM_THREADS` sharing this node's cores between its ranks, as
/// torchrun does, so the ranks' libtorch thread pools do not oversubscribe.
pub fn rank_env(place: RankPlace, master_addr: &str, port: u16, run_id: u64) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("RANK", place.rank.to_string()),
        ("LOCAL_RANK", place.local_rank.to_string()),
        ("WORLD_SIZE", place.world_size.to_string()),
        ("LOCAL_WORLD_SIZE", place.local_world_size.to_string()),
        ("GROUP_RANK", place.node_rank.to_string()),
        ("MASTER_ADDR", master_addr.to_string()),
        ("MASTER_PORT", port.to_string()),
        ("MASKRCNN_RUN_ID", format!("{run_id:016x}")),
    ];
    if std::env::var_os("OMP_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        env.push(("OMP_NUM_THREADS", (cores / place.local_world_size.max(1)).max(1).to_string()));
    }
    env
}

/// The CPUs this process may run on (its affinity mask), ascending; empty
/// when the mask cannot be read.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity
    // fills at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

/// Local rank `local_rank`'s share of `cpus` among `ranks` ranks: equal
/// contiguous runs (the first `len % ranks` one CPU longer), so neighbouring
/// cores (and their caches) go to one rank; empty when there are fewer CPUs
/// than ranks (then nobody is pinned).
pub fn cpu_share(cpus: &[usize], local_rank: usize, ranks: usize) -> Vec<usize> {
    if ranks == 0 || cpus.len() < ranks || local_rank >= ranks {
        return Vec::new();
    }
    let (base, extra) = (cpus.len() / ranks, cpus.len() % ranks);
    let start = local_rank * base + local_rank.min(extra);
    cpus[start..start + base + usize::from(local_rank < extra)].to_vec()
}

/// Restricts the process `cmd` starts to `cpus` (its loader workers and
/// libtorch threads then stay on them, and `available_parallelism` counts
/// them); nothing for an empty list.
pub fn pin_to(cmd: &mut Command, cpus: Vec<usize>) {
    use std::os::unix::process::CommandExt;
    if cpus.is_empty() {
        return;
    }
    // SAFETY: the closure runs in the child between fork and exec and only
    // fills a stack cpu_set_t and calls sched_setaffinity (async-signal-safe).
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &c in &cpus {
                libc::CPU_SET(c, &mut set);
            }
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The run id every node of a multi-node launch derives alike: from the
/// user's `--rdzv-id` when given, else from the rendezvous address (only
/// one run can hold it at a time). FNV-1a, so it is the same on every
/// machine and Rust version.
pub fn shared_run_id(rdzv_id: Option<&str>, master_addr: &str, port: u16) -> u64 {
    let key = match rdzv_id {
        Some(id) => format!("id:{id}"),
        None => format!("addr:{master_addr}:{port}"),
    };
    crate::random::fnv1a(key.as_bytes())
}

/// A free TCP port on this machine for the rendezvous, below Linux's
/// ephemeral range (32768–60999) where the kernel picks client ports (torchrun
/// uses 29500): a client retrying a port of that range can end up holding it.
/// The search starts at a point drawn from the clock, so concurrent launches
/// (even in containers with equal process ids) rarely probe the same ports.
pub fn free_port() -> Result<u16, LaunchError> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let offset = ((nanos ^ std::process::id()) % 12_000) as u16;
    (0..2_000u16)
        .map(|i| 20_000 + (offset + i * 7) % 12_000)
        .find(|&p| std::net::TcpListener::bind(("0.0.0.0", p)).is_ok())
        .ok_or_else(|| LaunchError::Setup("no free port in 20000..32000 for the rendezvous".into()))
}

/// Runs `command(rank)` for every rank of `ranks` (this node's global
/// ranks), each in its own process group (the terminal's Ctrl-C reaches the
/// launcher only), until all exit. `interrupt` set (by the launcher's
/// Ctrl-C handler) is forwarded once to every rank as SIGINT. The first rank
/// to fail stops the others (SIGKILL: SIGTERM would ask them for a
/// checkpoint, which a group missing a rank cannot reach); the error names
/// it by its global rank.
pub fn run_ranks(
    ranks: std::ops::Range<usize>,
    command: impl Fn(usize) -> Command,
    interrupt: Arc<AtomicBool>,
) -> Result<(), LaunchError> {
    use std::os::unix::process::CommandExt;
    let mut children: Vec<(usize, Option<Child>)> = Vec::with_capacity(ranks.len());
    for rank in ranks {
        let mut cmd = command(rank);
        cmd.process_group(0);
        match cmd.spawn() {
            Ok(child) => children.push((rank, Some(child))),
            Err(source) => {
                signal_all(&mut children, libc::SIGKILL);
                wait_all(&mut children);
                return Err(LaunchError::Spawn { rank, source });
            }
        }
    }
    let mut forwarded = false;
    loop {
        if interrupt.load(Ordering::SeqCst) && !forwarded {
            signal_all(&mut children, libc::SIGINT);
            forwarded = true;
        }
        let mut running = 0;
        for i in 0..children.len() {
            let rank = children[i].0;
            let Some(child) = children[i].1.as_mut() else { continue };
            match child.try_wait() {
                Ok(None) => running += 1,
                Ok(Some(status)) if status.success() => children[i].1 = None,
                Ok(Some(status)) => {
                    children[i].1 = None;
                    signal_all(&mut children, libc::SIGKILL);
                    wait_all(&mut children);
                    return Err(LaunchError::RankFailed { rank, status });
                }
                Err(e) => return Err(LaunchError::Setup(format!("rank {rank}: {e}"))),
            }
        }
        if running == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal_all(children: &mut [(usize, Option<Child>)], signal: libc::c_int) {
    for child in children.iter().filter_map(|(_, c)| c.as_ref()) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    }
}

fn wait_all(children: &mut [(usize, Option<Child>)]) {
    for child in children.iter_mut().filter_map(|(_, c)| c.as_mut()) {
        let _ = child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranks get equal contiguous runs of the CPUs, together all of them,
    /// the first ones one longer when they do not divide; nobody is pinned
    /// with fewer CPUs than ranks.
    #[test]
    fn cpus_are_shared_out_in_contiguous_runs() {
        let cpus: Vec<usize> = (0..10).collect();
        let shares: Vec<Vec<usize>> = (0..4).map(|r| cpu_share(&cpus, r, 4)).collect();
        assert_eq!(shares, [vec![0, 1, 2], vec![3, 4, 5], vec![6, 7], vec![8, 9]]);
        assert_eq!(cpu_share(&[4, 5, 6, 7], 1, 2), [6, 7]);
        assert!(cpu_share(&[0], 0, 2).is_empty());
        assert!(cpu_share(&cpus, 4, 4).is_empty());
        assert!(!allowed_cpus().is_empty(), "this process's affinity mask");
    }

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn all_ranks_succeeding_is_success() {
        let stop = Arc::new(AtomicBool::new(false));
        let command = |r| {
            let mut c = sh(&format!("test \"$RANK/$WORLD_SIZE\" = {r}/3"));
            c.envs(rank_env(RankPlace::of(0, 1, 3, r), "127.0.0.1", 29500, 1));
            c
        };
        run_ranks(0..3, command, stop).unwrap();
    }

    /// Node 1 of 2 with 2 ranks each holds global ranks 2 and 3 on its
    /// GPUs 0 and 1, and every node derives the same run id.
    #[test]
    fn nodes_number_their_ranks_node_by_node() {
        let place = RankPlace::of(1, 2, 2, 1);
        assert_eq!((place.rank, place.local_rank, place.world_size, place.local_world_size), (3, 1, 4, 2));
        let env: std::collections::HashMap<_, _> = rank_env(place, "10.0.0.1", 29500, 7).into_iter().collect();
        assert_eq!(env["RANK"], "3");
        assert_eq!(env["LOCAL_RANK"], "1");
        assert_eq!(env["GROUP_RANK"], "1");
        assert_eq!(env["MASTER_ADDR"], "10.0.0.1");
        assert_eq!(shared_run_id(None, "10.0.0.1", 29500), shared_run_id(None, "10.0.0.1", 29500));
        assert_ne!(shared_run_id(None, "10.0.0.1", 29500), shared_run_id(None, "10.0.0.1", 29501));
        assert_ne!(shared_run_id(Some("a"), "10.0.0.1", 29500), shared_run_id(Some("b"), "10.0.0.1", 29500));
    }

    #[test]
    fn a_failing_rank_stops_the_others() {
        let stop = Arc::new(AtomicBool::new(false));
        let started = std::time::Instant::now();
        let e = run_ranks(4..6, |r| if r == 5 { sh("exit 3") } else { sh("sleep 30") }, stop).unwrap_err();
        assert!(matches!(e, LaunchError::RankFailed { rank: 5, .. }), "{e}");
        assert!(e.to_string().contains("rank 5 failed") && e.to_string().contains('3'), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10), "rank 0 was not stopped");
    }

    #[test]
    fn interrupt_reaches_every_rank_once() {
        let dir = tempfile::tempdir().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        // Interrupt once both ranks have set their trap (a SIGINT before that
        // would kill the shell instead: a loaded machine can be that slow).
        let ready = dir.path().to_path_buf();
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            while !(0..2).all(|r| ready.join(format!("ready{r}")).exists())
                && started.elapsed() < Duration::from_secs(60)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            flag.store(true, Ordering::SeqCst);
        });
        // Each rank counts SIGINTs into a file and exits 0 on the first.
        let d = dir.path().to_path_buf();
        run_ranks(
            0..2,
            |r| {
                let d = d.display();
                sh(&format!(
                    "trap 'echo int >> {d}/r{r}; exit 0' INT; touch {d}/ready{r}; while true; do sleep 0.05; done"
                ))
            },
            stop,
        )
        .unwrap();
        for r in 0..2 {
            assert_eq!(std::fs::read_to_string(dir.path().join(format!("r{r}"))).unwrap(), "int\n");
        }
    }
}
