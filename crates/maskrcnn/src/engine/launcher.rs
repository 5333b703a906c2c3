//! `maskrcnn launch`: starts one training process per GPU with torchrun's
//! environment (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`,
//! `MASTER_PORT`) and supervises them: Ctrl-C reaches every rank once (each
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

/// The torchrun variables of `rank` among `world_size` local processes, the
/// launch's `MASKRCNN_RUN_ID` (ranks of another launch are refused at the
/// rendezvous), and (unless already set) `OMP_NUM_THREADS` sharing the
/// cores between them, as torchrun does, so the ranks' libtorch thread
/// pools do not oversubscribe.
pub fn rank_env(rank: usize, world_size: usize, port: u16, run_id: u64) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("RANK", rank.to_string()),
        ("LOCAL_RANK", rank.to_string()),
        ("WORLD_SIZE", world_size.to_string()),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", port.to_string()),
        ("MASKRCNN_RUN_ID", format!("{run_id:016x}")),
    ];
    if std::env::var_os("OMP_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        env.push(("OMP_NUM_THREADS", (cores / world_size.max(1)).max(1).to_string()));
    }
    env
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

/// Runs `command(rank)` for every rank in `0..n`, each in its own process
/// group (the terminal's Ctrl-C reaches the launcher only), until all exit.
/// `interrupt` set (by the launcher's Ctrl-C handler) is forwarded once to
/// every rank as SIGINT. The first rank to fail stops the others (SIGKILL:
/// SIGTERM would ask them for a checkpoint, which a group missing a rank
/// cannot reach).
pub fn run_ranks(n: usize, command: impl Fn(usize) -> Command, interrupt: Arc<AtomicBool>) -> Result<(), LaunchError> {
    use std::os::unix::process::CommandExt;
    let mut children: Vec<Option<Child>> = Vec::with_capacity(n);
    for rank in 0..n {
        let mut cmd = command(rank);
        cmd.process_group(0);
        match cmd.spawn() {
            Ok(child) => children.push(Some(child)),
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
        for rank in 0..n {
            let Some(child) = children[rank].as_mut() else { continue };
            match child.try_wait() {
                Ok(None) => running += 1,
                Ok(Some(status)) if status.success() => children[rank] = None,
                Ok(Some(status)) => {
                    children[rank] = None;
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

fn signal_all(children: &mut [Option<Child>], signal: libc::c_int) {
    for child in children.iter().flatten() {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    }
}

fn wait_all(children: &mut [Option<Child>]) {
    for child in children.iter_mut().flatten() {
        let _ = child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            c.envs(rank_env(r, 3, 29500, 1));
            c
        };
        run_ranks(3, command, stop).unwrap();
    }

    #[test]
    fn a_failing_rank_stops_the_others() {
        let stop = Arc::new(AtomicBool::new(false));
        let started = std::time::Instant::now();
        let e = run_ranks(2, |r| if r == 1 { sh("exit 3") } else { sh("sleep 30") }, stop).unwrap_err();
        assert!(matches!(e, LaunchError::RankFailed { rank: 1, .. }), "{e}");
        assert!(e.to_string().contains("rank 1 failed") && e.to_string().contains('3'), "{e}");
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
            2,
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
