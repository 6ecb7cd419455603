//! Parsers that a hostile file could crash, run in a child process: the worker binary
//! re-executed with a subcommand (`conveyor-worker extract ...`, `conveyor-worker inspect ...`),
//! the input on stdin, the answer on stdout, under limits on address space, CPU seconds and
//! stack, with no environment, killed at a deadline. A file that makes a parser recurse without
//! end (which no `catch_unwind` can catch), allocate without bound or spin ends that child, not
//! the API or the worker. Waiting for the child is asynchronous, so no heartbeat starves.

use crate::Settings;
use std::{
    os::unix::process::ExitStatusExt,
    path::PathBuf,
    process::{ExitStatus, Stdio},
    time::Duration,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The child's stack: deep enough for any sane file, small enough to fail fast.
const STACK_BYTES: u64 = 8 << 20;
/// What of the child's complaint is kept.
const STDERR_BYTES: u64 = 4096;
/// The binary that serves the subcommands.
const WORKER: &str = "conveyor-worker";

/// Why a child gave no answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// The program did not start (a deployment problem, logged).
    NotStarted,
    /// Past the deadline; the child was killed.
    TimedOut,
    /// It wrote more than the caller would read.
    TooLarge,
    /// It refused the input (exit 1) with this reason, the last line of its stderr.
    Refused(String),
    /// Past its CPU seconds.
    OutOfCpu,
    /// It died otherwise: out of stack or memory, or a signal.
    Died,
    /// Its answer was lost (a wait error).
    Lost(String),
    /// Every child slot stayed taken for as long as a child may run: not started.
    Busy,
}

/// Runs subcommands of the worker binary in limited child processes.
#[derive(Clone, Debug)]
pub struct Isolated {
    program: PathBuf,
    pub timeout: Duration,
    pub memory: u64,
    /// Children running at once in this process, at most one a core: each may take a core
    /// and `memory` (many uploads at once started as many inspectors).
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    /// How long a run may wait for a slot (`None`: as long as it takes, for a worker whose
    /// runs are its own jobs' turns).
    slot_wait: Option<Duration>,
}

impl Isolated {
    /// `CONVEYOR_EXTRACTOR`, else `conveyor-worker` beside the running executable (the worker
    /// itself, or the API installed next to it).
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        let program = match &settings.extractor {
            Some(path) => path.clone(),
            None => {
                let exe = std::env::current_exe()?;
                match exe.file_name().and_then(|n| n.to_str()) {
                    Some(WORKER) => exe,
                    _ => exe.with_file_name(WORKER),
                }
            }
        };
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Self {
            program,
            timeout: settings.extract_timeout,
            memory: settings.extract_memory_bytes,
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(cores)),
            slot_wait: None,
        })
    }

    /// Runs that wait for a slot longer than a run may take fail with [`Failure::Busy`]: for
    /// a request's client, which would otherwise wait behind every run queued before it.
    pub fn waiting_no_longer_than_a_run(self) -> Self {
        Self {
            slot_wait: Some(self.timeout),
            ..self
        }
    }

    /// Runs `conveyor-worker ARGS` with `input` on stdin; its stdout, at most `output` bytes.
    pub async fn run(
        &self,
        args: &[&str],
        input: Vec<u8>,
        output: u64,
    ) -> Result<Vec<u8>, Failure> {
        let slot = self.slots.acquire();
        let _slot = match self.slot_wait {
            Some(wait) => tokio::time::timeout(wait, slot)
                .await
                .map_err(|_| Failure::Busy)?,
            None => slot.await,
        }
        .map_err(|_| Failure::Died)?;
        let mut command = tokio::process::Command::new(&self.program);
        command
            .args(args)
            // The child parses hostile bytes: it gets none of the parent's secrets.
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let cpu = self.timeout.as_secs().max(1);
        // (resource, soft, hard): past the soft CPU limit comes SIGXCPU, then SIGKILL.
        let limits = [
            (libc::RLIMIT_AS, self.memory, self.memory),
            (libc::RLIMIT_CPU, cpu, cpu + 1),
            (libc::RLIMIT_STACK, STACK_BYTES, STACK_BYTES),
            (libc::RLIMIT_CORE, 0, 0),
        ];
        // SAFETY: between fork and exec only setrlimit runs, which is async-signal-safe, on
        // values computed before the fork.
        unsafe {
            command.pre_exec(move || {
                for (resource, soft, hard) in limits {
                    let limit = libc::rlimit {
                        rlim_cur: soft as libc::rlim_t,
                        rlim_max: hard as libc::rlim_t,
                    };
                    if libc::setrlimit(resource, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| {
            tracing::error!(program = %self.program.display(), error = %e, "cannot start the isolated parser");
            Failure::NotStarted
        })?;
        let mut stdin = child.stdin.take().expect("piped");
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let run = async {
            let write = async move {
                // A child that stopped reading has its own story to tell: ignore the pipe.
                let _ = stdin.write_all(&input).await;
            };
            let read = async move {
                let mut answer = Vec::new();
                let _ = (&mut stdout)
                    .take(output + 1)
                    .read_to_end(&mut answer)
                    .await;
                // Dropping stdout here stops a child that writes past the cap.
                answer
            };
            let complain = async move {
                let mut complaint = Vec::new();
                let _ = (&mut stderr)
                    .take(STDERR_BYTES)
                    .read_to_end(&mut complaint)
                    .await;
                complaint
            };
            let ((), answer, complaint) = tokio::join!(write, read, complain);
            (child.wait().await, answer, complaint)
        };
        // On a timeout `kill_on_drop` ends the child with the dropped future's handle.
        let (status, answer, complaint) = tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| Failure::TimedOut)?;
        if answer.len() as u64 > output {
            return Err(Failure::TooLarge);
        }
        let status = status.map_err(|e| Failure::Lost(e.to_string()))?;
        if status.success() {
            return Ok(answer);
        }
        Err(failure(status, &complaint))
    }
}

fn failure(status: ExitStatus, complaint: &[u8]) -> Failure {
    let complaint = String::from_utf8_lossy(complaint);
    let last = complaint.lines().rev().find(|l| !l.trim().is_empty());
    match (status.code(), status.signal(), last) {
        (Some(1), _, Some(reason)) => Failure::Refused(reason.trim().to_owned()),
        (_, Some(libc::SIGXCPU), _) => Failure::OutOfCpu,
        (_, signal, reason) => {
            tracing::warn!(?signal, code = ?status.code(), reason, "the isolated parser died");
            Failure::Died
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cat` in a process of one slot, with a deadline of `timeout`.
    fn cat(timeout: Duration) -> Isolated {
        Isolated {
            program: "/bin/cat".into(),
            timeout,
            memory: 1 << 30,
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(1)),
            slot_wait: None,
        }
        .waiting_no_longer_than_a_run()
    }

    #[tokio::test]
    async fn a_run_waits_for_a_slot_no_longer_than_a_run_may_take() {
        let isolated = cat(Duration::from_millis(300));
        assert_eq!(
            isolated.run(&[], b"hello".to_vec(), 16).await.unwrap(),
            b"hello"
        );
        let taken = isolated.slots.clone().acquire_owned().await.unwrap();
        let waited = tokio::time::timeout(
            Duration::from_secs(5),
            isolated.run(&[], b"hello".to_vec(), 16),
        )
        .await
        .expect("waited for a slot without end");
        assert_eq!(waited, Err(Failure::Busy));
        drop(taken);
        assert!(isolated.run(&[], b"again".to_vec(), 16).await.is_ok());
    }
}
