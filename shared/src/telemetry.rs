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

/// Text another party wrote (a tenant's server's error, its service's answer), as a log field:
/// control characters escaped (in the text format a raw newline forges a log line, an escape
/// sequence reaches the operator's terminal) and at most [`Untrusted::MAX`] bytes (a hostile
/// endpoint answers a megabyte a request).
pub struct Untrusted<T>(pub T);

use std::fmt::Write as _;

impl<T> Untrusted<T> {
    pub const MAX: usize = 1024;
}

impl<T: std::fmt::Display> std::fmt::Display for Untrusted<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = self.0.to_string();
        let mut end = text.len().min(Self::MAX);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        for c in text[..end].chars() {
            // Control characters, and those that reorder or break lines on a terminal.
            let bidi_or_break = matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if c.is_control() || bidi_or_break {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        if end < text.len() {
            write!(f, "... ({} bytes in all)", text.len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod untrusted_tests {
    use super::Untrusted;

    #[test]
    fn another_partys_text_is_escaped_and_bounded() {
        let forged = "denied\n2026-12-07T00:00:00Z ERROR forged line\x1b]52;c;aGk=\x07\u{202e}";
        let shown = Untrusted(forged).to_string();
        assert!(!shown.contains('\n') && !shown.contains('\x1b'), "{shown}");
        assert!(!shown.contains('\u{202e}'), "{shown}");
        assert!(shown.starts_with("denied\\n2026"), "{shown}");
        let long = Untrusted("é".repeat(1 << 20)).to_string();
        assert!(
            long.len() < 1100 && long.ends_with("(2097152 bytes in all)"),
            "{}",
            long.len()
        );
    }
}
