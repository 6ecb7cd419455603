//! Text extraction from documents whose parser is not ours (PDF) in a child process
//! ([`shared::isolated`]): `conveyor-worker extract --format pdf`, the document on stdin, its
//! text on stdout. A document that kills the parser fails alone; the worker goes on.

use shared::{
    isolated::{Failure, Isolated},
    Settings,
};
use std::{
    io::{Read, Write},
    process::ExitCode,
};

use super::extract::{self, DocFormat};
use crate::limits::{human, Cap};

/// The worker's subcommand that runs one extraction.
pub const SUBCOMMAND: &str = "extract";

/// Runs extractions in child processes.
#[derive(Clone, Debug)]
pub struct Extractor {
    isolated: Isolated,
}

impl Extractor {
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        Ok(Self {
            isolated: Isolated::new(settings)?,
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
        let args = [SUBCOMMAND, "--format", name];
        let text = self
            .isolated
            .run(&args, document, output.bytes)
            .await
            .map_err(|failure| match failure {
                Failure::NotStarted => {
                    format!("cannot extract the {name} document: the extractor did not start")
                }
                Failure::TimedOut => format!(
                    "cannot extract the {name} document: it took longer than {} s \
                     (CONVEYOR_EXTRACT_TIMEOUT_SECS)",
                    self.isolated.timeout.as_secs()
                ),
                Failure::TooLarge => format!("its text: {}", output.exceeded()),
                Failure::Refused(reason) => reason,
                Failure::OutOfCpu => format!(
                    "unreadable {name}: it took more than {} s of CPU (CONVEYOR_EXTRACT_TIMEOUT_SECS)",
                    self.isolated.timeout.as_secs()
                ),
                Failure::Died => format!(
                    "unreadable {name}: the parser died on it (out of stack or of its {} of \
                     memory, CONVEYOR_EXTRACT_MEMORY_BYTES)",
                    human(self.isolated.memory)
                ),
                Failure::Lost(e) => format!("the extractor was lost: {e}"),
                Failure::Busy => "the extractor was busy; try again".into(),
            })?;
        String::from_utf8(text).map_err(|_| "the extractor wrote no text".into())
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
