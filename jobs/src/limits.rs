//! Caps on what one dataset may cost a worker: decompressed bytes, bytes per record or line,
//! bytes per document. Readers enforce them as they go, so a small file that inflates to tens
//! of GB stops at the cap instead of exhausting the process (and every other tenant's jobs in
//! it). Going past a cap fails the job for good: the file will not shrink on a retry.

use shared::Settings;
use std::io::{self, Read};

use crate::JobError;

/// The caps, from [`Settings`].
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub decompressed: u64,
    pub in_memory: u64,
    pub record: u64,
    pub document: u64,
}

impl Limits {
    pub fn new(settings: &Settings) -> Self {
        Self {
            decompressed: settings.max_decompressed_bytes,
            in_memory: settings.max_in_memory_bytes,
            record: settings.max_record_bytes,
            document: settings.max_document_bytes,
        }
    }

    /// The cap on decompressed bytes that streaming readers (imports) apply.
    pub fn streamed(&self) -> Cap {
        Cap::new(
            self.decompressed,
            "CONVEYOR_MAX_DECOMPRESSED_BYTES",
            "the dataset",
        )
    }

    /// The cap on decompressed bytes a job holding its data in memory applies.
    pub fn held(&self) -> Cap {
        Cap::new(
            self.in_memory,
            "CONVEYOR_MAX_IN_MEMORY_BYTES",
            "the dataset",
        )
    }

    pub fn record(&self) -> Cap {
        Cap::new(self.record, "CONVEYOR_MAX_RECORD_BYTES", "one record")
    }

    /// Whether a synthetic table of `rows` of `row_bytes` each fits the in-memory cap as it
    /// is drawn and written; refused before any is drawn (see
    /// [`contracts::synthesis::output_too_large`]).
    pub fn output(&self, rows: u64, row_bytes: u64) -> Result<(), JobError> {
        match contracts::synthesis::output_too_large(rows, row_bytes, self.in_memory) {
            None => Ok(()),
            Some(why) => Err(JobError::Permanent(why)),
        }
    }

    pub fn document(&self) -> Cap {
        Cap::new(self.document, "CONVEYOR_MAX_DOCUMENT_BYTES", "one document")
    }
}

/// One cap: how many bytes, the setting that sets it, and what it bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    pub bytes: u64,
    pub setting: &'static str,
    pub what: &'static str,
}

impl Cap {
    pub const fn new(bytes: u64, setting: &'static str, what: &'static str) -> Self {
        Self {
            bytes,
            setting,
            what,
        }
    }

    /// The same cap with a smaller budget (what earlier datasets of the job left).
    pub fn with_bytes(self, bytes: u64) -> Self {
        Self { bytes, ..self }
    }

    pub fn exceeded(self) -> CapExceeded {
        CapExceeded(self)
    }
}

/// The error of going past a cap; it travels inside `io::Error`s through the readers.
#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
#[error("{} is larger than the {} cap ({})", .0.what, human(.0.bytes), .0.setting)]
pub struct CapExceeded(pub Cap);

impl CapExceeded {
    /// The cap an I/O error reports, if it is one.
    pub fn in_io(e: &io::Error) -> Option<Self> {
        e.get_ref()?.downcast_ref::<Self>().copied()
    }
}

impl From<CapExceeded> for io::Error {
    fn from(e: CapExceeded) -> Self {
        io::Error::other(e)
    }
}

impl From<CapExceeded> for JobError {
    fn from(e: CapExceeded) -> Self {
        JobError::Permanent(e.to_string())
    }
}

/// `1 MiB`, `64 MiB`, `4 GiB`, or bytes.
pub fn human(bytes: u64) -> String {
    const UNITS: [(&str, u32); 3] = [("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (unit, shift) in UNITS {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

/// A reader that fails with [`CapExceeded`] once more than the cap's bytes came through it.
pub struct Capped<R> {
    inner: R,
    left: u64,
    cap: Cap,
}

impl<R> Capped<R> {
    pub fn new(inner: R, cap: Cap) -> Self {
        Self {
            inner,
            left: cap.bytes,
            cap,
        }
    }
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // One byte past the cap tells a file of exactly the cap from a larger one.
        let want = buf
            .len()
            .min(self.left.saturating_add(1).min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n as u64 > self.left {
            return Err(self.cap.exceeded().into());
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Reads all of `reader` into memory, failing at the cap before holding more than it.
pub fn read_capped(reader: impl Read, cap: Cap) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    Capped::new(reader, cap).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// How records end in a stream: at line breaks outside quotes, by the rules of the parser
/// that reads it (they differ on a quote in the middle of a field).
#[derive(Clone, Copy, Debug)]
pub enum Framing {
    /// CSV/TSV read by the csv crate: a quote opens a quoted field only at the start of the
    /// field; elsewhere it is an ordinary character.
    Csv { quote: u8, delimiter: u8 },
    /// CSV read by PostgreSQL's `COPY ... (FORMAT csv)`, which toggles quoting at every quote.
    CopyCsv { quote: u8 },
    /// NDJSON, read line by line up to each `\n`: JSON strings hold no raw line breaks, so
    /// every `\n` ends a record. A bare `\r` does not (the readers above do not split there,
    /// and JSON allows it between tokens).
    Lines,
}

/// Where a CSV reader is within a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Position {
    FieldStart,
    Unquoted,
    Quoted,
    /// A quote inside a quoted field: a second one is a literal quote, anything else ends
    /// the quoting.
    QuoteInQuoted,
}

/// A reader that fails with [`CapExceeded`] once one record grows past the cap, before a
/// parser above it buffers the record whole. It follows only line breaks, quotes and
/// delimiters as the parser above sees them, so it costs one pass over the bytes.
pub struct RecordCapped<R> {
    inner: R,
    framing: Framing,
    position: Position,
    record: u64,
    cap: Cap,
}

impl<R> RecordCapped<R> {
    pub fn new(inner: R, framing: Framing, cap: Cap) -> Self {
        Self {
            inner,
            framing,
            position: Position::FieldStart,
            record: 0,
            cap,
        }
    }

    /// Follows one byte; true when it ends the record.
    fn ends_record(&mut self, byte: u8) -> bool {
        use Position::*;
        let line_break = byte == b'\n' || byte == b'\r';
        match self.framing {
            Framing::Lines => byte == b'\n',
            Framing::CopyCsv { quote } => {
                if byte == quote {
                    self.position = if self.position == Quoted {
                        Unquoted
                    } else {
                        Quoted
                    };
                }
                line_break && self.position != Quoted
            }
            Framing::Csv { quote, delimiter } => {
                self.position = match (self.position, byte) {
                    (Quoted, b) if b == quote => QuoteInQuoted,
                    (Quoted, _) => Quoted,
                    (QuoteInQuoted | FieldStart, b) if b == quote => Quoted,
                    (_, b) if b == delimiter => FieldStart,
                    (_, b'\n' | b'\r') => {
                        self.position = FieldStart;
                        return true;
                    }
                    _ => Unquoted,
                };
                false
            }
        }
    }
}

impl<R: Read> Read for RecordCapped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        for &byte in &buf[..n] {
            if self.ends_record(byte) {
                self.record = 0;
                continue;
            }
            self.record += 1;
            if self.record > self.cap.bytes {
                return Err(self.cap.exceeded().into());
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Cap = Cap::new(8, "CONVEYOR_TEST_CAP", "the thing");

    fn read_all(reader: impl Read) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut reader = io::BufReader::with_capacity(3, reader);
        reader.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn synthetic_output_is_held_to_the_in_memory_cap() {
        let limits = Limits {
            decompressed: 0,
            in_memory: 64 << 20,
            record: 0,
            document: 0,
        };
        let row = |columns| contracts::synthesis::row_bytes(columns, []);
        assert!(limits.output(100_000, row(20)).is_ok());
        let JobError::Permanent(why) = limits.output(10_000_000, row(500)).unwrap_err() else {
            panic!("not permanent")
        };
        assert!(why.contains("more than the 64 MiB cap"), "{why}");
        assert!(limits.output(u64::MAX, row(usize::MAX)).is_err());
        // A 64 KiB label drawn into 1,000 rows is 128 MiB with its frame's copy.
        assert!(limits.output(1_000, row(2)).is_ok());
        assert!(limits
            .output(1_000, contracts::synthesis::row_bytes(2, [64 << 10]))
            .is_err());
    }

    #[test]
    fn capped_reads_up_to_the_cap_and_fails_one_byte_past_it() {
        assert_eq!(
            read_all(Capped::new(&b"12345678"[..], CAP)).unwrap().len(),
            8
        );
        let error = read_all(Capped::new(&b"123456789"[..], CAP)).unwrap_err();
        assert_eq!(CapExceeded::in_io(&error), Some(CapExceeded(CAP)));
        assert_eq!(
            error.to_string(),
            "the thing is larger than the 8 bytes cap (CONVEYOR_TEST_CAP)"
        );
        let error = read_capped(io::repeat(0), Cap::new(1 << 20, "X", "it")).unwrap_err();
        assert_eq!(error.to_string(), "it is larger than the 1 MiB cap (X)");
    }

    #[test]
    fn record_cap_counts_each_record_and_skips_quoted_line_breaks() {
        let csv = Framing::Csv {
            quote: b'"',
            delimiter: b',',
        };
        // Many short records: fine however long the file.
        let many = "1234567\n".repeat(1000);
        assert!(read_all(RecordCapped::new(many.as_bytes(), csv, CAP)).is_ok());
        // Line breaks and doubled quotes inside quotes do not end the record.
        let quoted = b"\"a\"\"\nb\ncdefgh\"\n";
        let error = read_all(RecordCapped::new(&quoted[..], csv, CAP)).unwrap_err();
        assert!(CapExceeded::in_io(&error).is_some(), "{error}");
        // As lines, the same bytes are short records.
        assert!(read_all(RecordCapped::new(&quoted[..], Framing::Lines, CAP)).is_ok());
        // Found by scripts/fuzz: a quote inside an unquoted field is an ordinary character to
        // the csv crate; counting it as an opening quote let the next quoted field's line
        // breaks look like record ends, so one record of any size passed the cap.
        let mut sneaky = b"a\"b,\"".to_vec();
        sneaky.extend_from_slice(&b"123\n".repeat(100));
        sneaky.extend_from_slice(b"\"\n");
        let error = read_all(RecordCapped::new(&sneaky[..], csv, CAP)).unwrap_err();
        assert!(CapExceeded::in_io(&error).is_some(), "{error}");
        // PostgreSQL's COPY toggles at every quote: there the same bytes are short records.
        let copy = Framing::CopyCsv { quote: b'"' };
        assert!(read_all(RecordCapped::new(&sneaky[..], copy, CAP)).is_ok());
        let long = b"{\"a\": \"123456789\"}\n";
        let error = read_all(RecordCapped::new(&long[..], Framing::Lines, CAP)).unwrap_err();
        assert!(CapExceeded::in_io(&error).is_some(), "{error}");
        // Carriage returns between a JSON line's tokens end no line for its reader.
        let returns = b"[0,\r0,\r0,\r0,\r0,\r0]\n";
        let error = read_all(RecordCapped::new(&returns[..], Framing::Lines, CAP)).unwrap_err();
        assert!(CapExceeded::in_io(&error).is_some(), "{error}");
    }
}
