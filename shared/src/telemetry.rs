//! Structured logs through `tracing` (`RUST_LOG` filters, `CONVEYOR_LOG_FORMAT=json` for machines), and
//! the signal that stops a process.

use tracing_subscriber::{fmt, EnvFilter};

/// `json` for JSON logs; read here, not with the other settings, since logging starts first.
pub const LOG_FORMAT: &str = "CONVEYOR_LOG_FORMAT";

pub fn init(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = if std::env::var(LOG_FORMAT).as_deref() == Ok("json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // A second init (tests start several components in one process) keeps the first.
    let _ = result;
}

/// Resolves on SIGTERM (an orchestrator stopping the process) or Ctrl-C.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
