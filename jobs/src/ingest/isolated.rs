//! Text extraction from documents whose parser is not ours (PDF) in a child process: the
//! worker binary re-executed as `conveyor-worker extract --format pdf`, the document on stdin,
//! its text on stdout, under limits on address space, CPU seconds and stack, and killed at a
//! deadline. A file that makes the parser recurse without end (which no `catch_unwind` can
//! catch), allocate without bound or spin ends that child, not the worker: its document fails
//! and the worker goes on with its other jobs. Waiting for the child is asynchronous, so the
//! worker's heartbeat never starves.

use shared::Settings;
use std::{
    io::{Read, Write},
    os::unix::process::ExitStatusExt,
    path::PathBuf,
    process::{ExitCode, Stdio},
    time::Duration,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::extract::{self, DocFormat};
use crate::limits::{human, Cap};

/// The worker's subcommand that runs one extraction.
pub const SUBCOMMAND: &str = "extract";
/// The child's stack: deep enough for any sane document, small enough to fail fast.
const STACK_BYTES: u64 = 8 << 20;
/// What of the child's complaint is kept for the error.
const STDERR_BYTES: u64 = 4096;

/// Runs extractions in child processes.
#[derive(Clone, Debug)]
pub struct Extractor {
    program: PathBuf,
    timeout: Duration,
    memory: u64,
}

impl Extractor {
    /// `CONVEYOR_EXTRACTOR`, else the running executable (in production: `conveyor-worker`).
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        let program = match &settings.extractor {
            Some(path) => path.clone(),
            None => std::env::current_exe()?,
        };
        Ok(Self {
            program,
            timeout: settings.extract_timeout,
            memory: settings.extract_memory_bytes,
        })
    }

    /// The text of `document`, at most `output`'s bytes; the error says why there is none.
    pub async fn extract(
        &self,
        format: DocFormat,
        document: Vec<u8>,
        output: Cap,
    ) -> Result<String, String> {
        let name = format.name();
        let mut command = tokio::process::Command::new(&self.program);
        command
            .args([SUBCOMMAND, "--format", name])
            // The child parses hostile bytes: it gets none of the worker's secrets.
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
            tracing::error!(program = %self.program.display(), error = %e, "cannot start the extractor");
            format!("cannot extract the {name} document: the extractor did not start")
        })?;
        let mut stdin = child.stdin.take().expect("piped");
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let run = async {
            let write = async move {
                // A child that stopped reading has its own story to tell: ignore the pipe.
                let _ = stdin.write_all(&document).await;
            };
            let read = async move {
                let mut text = Vec::new();
                let _ = (&mut stdout)
                    .take(output.bytes + 1)
                    .read_to_end(&mut text)
                    .await;
                // Dropping stdout here stops a child that writes past the cap.
                text
            };
            let complain = async move {
                let mut complaint = Vec::new();
                let _ = (&mut stderr)
                    .take(STDERR_BYTES)
                    .read_to_end(&mut complaint)
                    .await;
                complaint
            };
            let ((), text, complaint) = tokio::join!(write, read, complain);
            (child.wait().await, text, complaint)
        };
        let (status, text, complaint) = match tokio::time::timeout(self.timeout, run).await {
            Ok(done) => done,
            Err(_) => {
                // `kill_on_drop` ends the child with the dropped future's handle.
                return Err(format!(
                    "cannot extract the {name} document: it took longer than {} s \
                     (CONVEYOR_EXTRACT_TIMEOUT_SECS)",
                    self.timeout.as_secs()
                ));
            }
        };
        if text.len() as u64 > output.bytes {
            return Err(format!("its text: {}", output.exceeded()));
        }
        let status = status.map_err(|e| format!("the extractor was lost: {e}"))?;
        if status.success() {
            return String::from_utf8(text).map_err(|_| "the extractor wrote no text".into());
        }
        let complaint = String::from_utf8_lossy(&complaint);
        let last = complaint.lines().rev().find(|l| !l.trim().is_empty());
        Err(match (status.code(), status.signal(), last) {
            (Some(1), _, Some(reason)) => reason.trim().to_owned(),
            (_, Some(libc::SIGXCPU), _) => format!(
                "unreadable {name}: it took more than {} s of CPU (CONVEYOR_EXTRACT_TIMEOUT_SECS)",
                self.timeout.as_secs()
            ),
            (_, signal, reason) => {
                tracing::warn!(?signal, code = ?status.code(), reason, "the extractor died");
                format!(
                    "unreadable {name}: the parser died on it (out of stack or of its {} of \
                     memory, CONVEYOR_EXTRACT_MEMORY_BYTES)",
                    human(self.memory)
                )
            }
        })
    }
}

/// The child's side: the document on stdin, its text on stdout; a bad document exits 1 with
/// the reason as the last line on stderr.
pub fn serve(format: &str) -> ExitCode {
    let Ok(format) = serde_json::from_value::<DocFormat>(format.into()) else {
        eprintln!("unknown document format {format:?}");
        return ExitCode::from(2);
    };
    let mut document = Vec::new();
    if let Err(e) = std::io::stdin().lock().read_to_end(&mut document) {
        eprintln!("cannot read the document: {e}");
        return ExitCode::from(2);
    }
    match extract::document_text(&document, format) {
        Ok(text) => match std::io::stdout().lock().write_all(text.as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::from(2),
        },
        Err(reason) => {
            eprintln!("{reason}");
            ExitCode::FAILURE
        }
    }
}
