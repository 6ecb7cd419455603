//! Reading a dataset row by row, in bounded memory, whatever its format: CSV/TSV (plain, gzip or
//! zstd) through the csv crate, NDJSON line by line, Parquet slice by slice through polars.
//! Text stops at the caps on decompressed bytes and on bytes per record ([`Limits`]).

use crate::limits::{Cap, Capped, Framing, Limits, RecordCapped};
use contracts::import::{shown_name, MAX_COLUMNS};
use csv::ByteRecord;
use polars::prelude::*;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use shared::datasets::{Compression, Format};
use std::{
    borrow::Cow,
    collections::HashMap,
    fmt,
    fs::File,
    io::{BufRead, BufReader, Read},
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

/// Rows read from Parquet at a time, at most.
const PARQUET_SLICE: usize = 64 * 1024;

/// What one Parquet slice may hold once decoded, by the file's own account: a wide file or a
/// file of long values is read in fewer rows at a time.
const PARQUET_SLICE_BYTES: u64 = 64 << 20;

/// Opens a file, undoing its compression. Uncapped: the caller bounds what it reads.
pub fn open_decompressed(
    path: &Path,
    compression: Compression,
) -> std::io::Result<Box<dyn Read + Send>> {
    open_counted(path, compression, Arc::default())
}

/// An open file's (decompressed) bytes.
pub fn decompressed(file: File, compression: Compression) -> std::io::Result<Box<dyn Read + Send>> {
    decompressing(file, compression, Arc::default())
}

/// The file's (decompressed) bytes up to the caps; `counter` counts the bytes read from disk.
pub fn open_raw(
    path: &Path,
    compression: Compression,
    counter: Arc<AtomicU64>,
    limits: &Limits,
    framing: Framing,
) -> std::io::Result<Box<dyn Read + Send>> {
    Ok(capped(
        open_counted(path, compression, counter)?,
        limits,
        framing,
    ))
}

/// Fails the read past the cap on decompressed bytes, or on one record's bytes.
fn capped(reader: Box<dyn Read + Send>, limits: &Limits, framing: Framing) -> Box<dyn Read + Send> {
    let whole = Capped::new(reader, limits.streamed());
    Box::new(RecordCapped::new(whole, framing, limits.record()))
}

fn open_counted(
    path: &Path,
    compression: Compression,
    counter: Arc<AtomicU64>,
) -> std::io::Result<Box<dyn Read + Send>> {
    decompressing(File::open(path)?, compression, counter)
}

fn decompressing(
    file: File,
    compression: Compression,
    counter: Arc<AtomicU64>,
) -> std::io::Result<Box<dyn Read + Send>> {
    let file = Counted {
        inner: file,
        counter,
    };
    Ok(match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(
            1 << 16,
            file,
        ))),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(file)?),
    })
}

/// Counts the bytes read from the file on disk (compressed), for progress.
struct Counted<R> {
    inner: R,
    counter: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// CSV parsing options (the payload's `csv`).
#[derive(Clone, Debug)]
pub struct CsvSettings {
    pub delimiter: u8,
    pub quote: u8,
    pub header: bool,
}

/// One row: its fields as bytes, which of them are NULL when the format says so (JSON null,
/// Parquet null; CSV decides by its null strings later), and the line it started on.
#[derive(Default)]
pub struct Row {
    pub fields: ByteRecord,
    pub nulls: Vec<bool>,
    pub line: u64,
}

impl Row {
    pub fn is_null(&self, i: usize) -> bool {
        self.nulls.get(i).copied().unwrap_or(false)
    }
}

pub enum Source {
    Csv(csv::Reader<Box<dyn Read + Send>>),
    Ndjson {
        lines: BufReader<Box<dyn Read + Send>>,
        /// Each column's position, by name.
        columns: HashMap<String, usize>,
        buffer: Vec<u8>,
        line: u64,
    },
    Parquet {
        path: std::path::PathBuf,
        total: usize,
        offset: usize,
        /// Rows read at a time.
        slice: usize,
        frame: Option<DataFrame>,
        next_in_frame: usize,
        /// The caps, counted in the rows' text as the other formats count their bytes: a
        /// compressed column of repeats is small on disk and any size once read.
        record: Cap,
        dataset: Cap,
        /// The dataset cap's bytes not yet used.
        left: u64,
        /// The file's size and the progress counter: a Parquet file is read by row slices, so
        /// its bytes count as read in proportion to the rows read.
        size: u64,
        bytes_read: Arc<AtomicU64>,
    },
}

pub struct Opened {
    pub source: Source,
    /// Column names, from the header (or `column_1`...).
    pub header: Vec<String>,
    /// Bytes of the file read so far.
    pub bytes_read: Arc<AtomicU64>,
}

/// Opens a dataset file. `known_columns` (from the dataset's schema) names NDJSON columns.
pub fn open(
    path: &Path,
    format: Format,
    compression: Compression,
    csv_settings: &CsvSettings,
    known_columns: &[String],
    limits: &Limits,
) -> Result<Opened, String> {
    let bytes_read = Arc::new(AtomicU64::new(0));
    let io = |e: std::io::Error| format!("cannot read the dataset: {e}");
    match format {
        Format::Csv | Format::Tsv => {
            let delimiter = if format == Format::Tsv && csv_settings.delimiter == b',' {
                b'\t'
            } else {
                csv_settings.delimiter
            };
            let framing = Framing::Csv {
                quote: csv_settings.quote,
                delimiter,
            };
            let open = || open_raw(path, compression, bytes_read.clone(), limits, framing);
            let reader = open().map_err(io)?;
            // Flexible: a ragged row is the row's error, reported with its line, not the file's.
            let csv_reader = |reader| {
                csv::ReaderBuilder::new()
                    .delimiter(delimiter)
                    .quote(csv_settings.quote)
                    .has_headers(false)
                    .flexible(true)
                    .buffer_capacity(1 << 20)
                    .from_reader(reader)
            };
            let mut csv = csv_reader(reader);
            let mut first = ByteRecord::new();
            let has_first = csv
                .read_byte_record(&mut first)
                .map_err(|e| e.to_string())?;
            // Before its fields become names: a record of millions of delimiters made a header
            // of millions of strings (and a plan of them) that took the worker's memory.
            too_wide(first.len())?;
            let header = if csv_settings.header {
                if !has_first {
                    return Err("the file is empty: no header line".into());
                }
                first
                    .iter()
                    .map(|f| String::from_utf8_lossy(f).trim().to_owned())
                    .collect()
            } else {
                // Without a header the first record is data: read the file again from the top.
                let count = first.len();
                let reader = open().map_err(io)?;
                csv = csv_reader(reader);
                bytes_read.store(0, Ordering::Relaxed);
                (1..=count).map(|i| format!("column_{i}")).collect()
            };
            Ok(Opened {
                source: Source::Csv(csv),
                header,
                bytes_read,
            })
        }
        Format::Ndjson => {
            too_wide(known_columns.len())?;
            let mut columns = HashMap::with_capacity(known_columns.len());
            for (i, name) in known_columns.iter().enumerate() {
                // Keys that differ only by a NUL and a U+FFFD were told apart when the file was
                // inspected and stored as one name (PostgreSQL holds no NUL): each row's values
                // had one slot for two columns.
                if columns.insert(name.clone(), i).is_some() {
                    return Err(format!(
                        "the file has two keys named {:?} (keys that differ only by a NUL \
                         character read as one name; PostgreSQL holds no NUL)",
                        shown_name(name)
                    ));
                }
            }
            let reader = open_raw(
                path,
                compression,
                bytes_read.clone(),
                limits,
                Framing::Lines,
            )
            .map_err(io)?;
            Ok(Opened {
                header: known_columns.to_vec(),
                source: Source::Ndjson {
                    lines: BufReader::with_capacity(1 << 20, reader),
                    columns,
                    buffer: Vec::new(),
                    line: 0,
                },
                bytes_read,
            })
        }
        Format::Document => Err("a document, not a table".into()),
        Format::Parquet => {
            // A bucket's object reaches here without the upload's inspection.
            super::parquet_footer::check(path)
                .map_err(|why| format!("not a readable Parquet file: {why}"))?;
            let file = File::open(path).map_err(io)?;
            let mut reader = ParquetReader::new(file);
            let metadata = reader.get_metadata().map_err(|e| e.to_string())?;
            let total = super::parquet_footer::rows(metadata)
                .map_err(|why| format!("not a readable Parquet file: {why}"))?;
            let decoded = super::parquet_footer::decoded_bytes(metadata);
            let dataset = limits.streamed();
            if decoded > dataset.bytes {
                return Err(dataset.exceeded().to_string());
            }
            // Read a slice at a time, but a slice decodes a list column's pages whole.
            let held = limits.held();
            let lists = super::parquet_footer::list_bytes(metadata);
            if lists.max().is_some_and(|bytes| bytes > held.bytes) {
                let cap = Cap {
                    what: "one row group's list columns, decoded,",
                    ..held
                };
                return Err(cap.exceeded().to_string());
            }
            let per_row = decoded / total.max(1) as u64;
            let slice = (PARQUET_SLICE_BYTES / per_row.max(1)).clamp(1, PARQUET_SLICE as u64);
            let schema = reader.schema().map_err(|e| e.to_string())?;
            too_wide(schema.len())?;
            let header = schema.iter_names().map(|n| n.to_string()).collect();
            Ok(Opened {
                source: Source::Parquet {
                    path: path.to_owned(),
                    total,
                    offset: 0,
                    slice: slice as usize,
                    frame: None,
                    next_in_frame: 0,
                    record: limits.record(),
                    dataset,
                    left: dataset.bytes,
                    size: std::fs::metadata(path).map_err(io)?.len(),
                    bytes_read: bytes_read.clone(),
                },
                header,
                bytes_read,
            })
        }
    }
}

/// A file wider than any PostgreSQL table can be is refused before its columns are planned.
fn too_wide(columns: usize) -> Result<(), String> {
    if columns > MAX_COLUMNS {
        return Err(format!(
            "the file has {columns} columns; a PostgreSQL table holds at most {MAX_COLUMNS}"
        ));
    }
    Ok(())
}

/// What went wrong with one row as a whole (its fields are checked later).
pub struct RowError {
    pub line: u64,
    pub reason: String,
    pub raw: Vec<u8>,
}

impl Source {
    /// Reads the next row into `row`; Ok(false) at the end. A row that cannot be read at all
    /// (bad JSON) is returned as `Err(Ok(RowError))`; a failure to read the file as `Err(Err)`.
    pub fn next(&mut self, row: &mut Row) -> Result<bool, Result<RowError, String>> {
        row.nulls.clear();
        match self {
            Source::Csv(csv) => {
                let more = csv
                    .read_byte_record(&mut row.fields)
                    .map_err(|e| Err(e.to_string()))?;
                row.line = row.fields.position().map_or(0, |p| p.line());
                Ok(more)
            }
            Source::Ndjson {
                lines,
                columns,
                buffer,
                line,
            } => loop {
                buffer.clear();
                let n = lines
                    .read_until(b'\n', buffer)
                    .map_err(|e| Err(format!("cannot read the dataset: {e}")))?;
                if n == 0 {
                    return Ok(false);
                }
                *line += 1;
                row.line = *line;
                if buffer.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                // Raw values keep numbers exactly as written (no detour through f64); each goes
                // straight to its column's slot, keys and plain strings borrowed from the line.
                let mut json = serde_json::Deserializer::from_slice(buffer);
                let values = ColumnSlots(columns)
                    .deserialize(&mut json)
                    .and_then(|values| json.end().map(|()| values))
                    .map_err(|e| {
                        Ok(RowError {
                            line: *line,
                            reason: format!("not a JSON object: {e}"),
                            raw: buffer.clone(),
                        })
                    })?;
                row.fields.clear();
                for value in values {
                    match value.map(RawValue::get) {
                        None | Some("null") => {
                            row.fields.push_field(b"");
                            row.nulls.push(true);
                        }
                        Some(text) => {
                            let text = unquoted(text).ok_or_else(|| {
                                Ok(RowError {
                                    line: *line,
                                    reason: "a string that is not Unicode (an unpaired \
                                             surrogate escape)"
                                        .into(),
                                    raw: buffer.clone(),
                                })
                            })?;
                            row.fields.push_field(text.as_bytes());
                            row.nulls.push(false);
                        }
                    }
                }
                return Ok(true);
            },
            Source::Parquet {
                path,
                total,
                offset,
                slice: slice_rows,
                frame,
                next_in_frame,
                record,
                dataset,
                left,
                size,
                bytes_read,
            } => {
                let exhausted = frame.as_ref().is_none_or(|f| *next_in_frame >= f.height());
                if exhausted {
                    if *offset >= *total {
                        return Ok(false);
                    }
                    let file = File::open(&*path).map_err(|e| Err(e.to_string()))?;
                    let slice = ParquetReader::new(file)
                        .with_slice(Some((*offset, *slice_rows)))
                        .finish()
                        .map_err(|e| Err(e.to_string()))?;
                    *offset += slice.height().max(1);
                    let done = (*offset).min(*total) as f64 / (*total).max(1) as f64;
                    bytes_read.store((*size as f64 * done) as u64, Ordering::Relaxed);
                    *frame = Some(slice);
                    *next_in_frame = 0;
                }
                let current = frame.as_ref().expect("frame loaded above");
                let index = *next_in_frame;
                *next_in_frame += 1;
                row.line = (*offset - current.height() + index + 1) as u64;
                row.fields.clear();
                // A field, its separator: the row's size as a line of text.
                let mut bytes = 0u64;
                for column in current.columns() {
                    let value = column.get(index).map_err(|e| Err(e.to_string()))?;
                    if value.is_null() {
                        row.fields.push_field(b"");
                        row.nulls.push(true);
                        bytes += 1;
                    } else {
                        // Lists and structs are written only as far as the record's cap.
                        let room = record.bytes.saturating_sub(bytes);
                        let limit = usize::try_from(room).unwrap_or(usize::MAX);
                        let text = parquet_text(&value, limit).map_err(|reason| {
                            Ok(RowError {
                                line: row.line,
                                reason: format!("column {:?}: {reason}", shown_name(column.name())),
                                raw: Vec::new(),
                            })
                        })?;
                        bytes += text.len() as u64 + 1;
                        if bytes > record.bytes {
                            return Err(Err(record.exceeded().to_string()));
                        }
                        row.fields.push_field(text.as_bytes());
                        row.nulls.push(false);
                    }
                }
                if bytes > record.bytes {
                    return Err(Err(record.exceeded().to_string()));
                }
                *left = left
                    .checked_sub(bytes)
                    .ok_or_else(|| Err(dataset.exceeded().to_string()))?;
                Ok(true)
            }
        }
    }
}

/// A Parquet value as PostgreSQL reads it. Polars' display text is for people: it rounds
/// floats to six significant digits (1234567.891 became 1.2346e6), names zones by
/// abbreviations PostgreSQL reads otherwise (IST is Israel's to it), panics on a date past
/// chrono's range, shows a list as its first items and its last (`[1, 2, … 7]`) and a struct's
/// values without their names. Lists and structs are JSON ([`push_json`]), written only until the
/// text passes `limit` bytes: the caller fails the import for a record past its cap. Other
/// types keep their display text.
fn parquet_text<'a>(value: &'a AnyValue<'a>, limit: usize) -> Result<Cow<'a, str>, String> {
    let float = |v: f64, text: String| match v {
        v if v.is_nan() => "NaN".to_owned(),
        v if v == f64::INFINITY => "Infinity".to_owned(),
        v if v == f64::NEG_INFINITY => "-Infinity".to_owned(),
        // Rust's shortest text that reads back as the same number.
        _ => text,
    };
    let out_of_range = || "a date or time out of range".to_owned();
    Ok(Cow::Owned(match value {
        AnyValue::Float64(v) => float(*v, v.to_string()),
        AnyValue::Float32(v) => float(f64::from(*v), v.to_string()),
        AnyValue::Date(days) => {
            // Days since 1970-01-01, which is day 719,163 of the common era.
            let date = days
                .checked_add(719_163)
                .and_then(chrono::NaiveDate::from_num_days_from_ce_opt)
                .ok_or_else(out_of_range)?;
            era_text(date.and_time(chrono::NaiveTime::MIN), "%Y-%m-%d")?
        }
        AnyValue::Datetime(v, unit, zone) => instant_text(*v, *unit, zone.is_some())?,
        AnyValue::DatetimeOwned(v, unit, zone) => instant_text(*v, *unit, zone.is_some())?,
        AnyValue::Decimal(v, _, scale) => decimal_text(*v, *scale),
        // Whole, as `bytea` writes it: polars' display cut them at 60 bytes.
        AnyValue::Binary(bytes) => format!("\\x{}", hex::encode(bytes)),
        AnyValue::BinaryOwned(bytes) => format!("\\x{}", hex::encode(bytes)),
        AnyValue::List(_) | AnyValue::Struct(..) | AnyValue::StructOwned(_) => {
            let mut json = Vec::new();
            push_json(&mut json, value, 0, limit)?;
            String::from_utf8(json).map_err(|e| e.to_string())?
        }
        other => return Ok(other.str_value()),
    }))
}

/// Levels a list or struct value may nest; deeper, it is its row's error (as many as the footer
/// check allows the file's metadata).
const MAX_NESTING: usize = 32;

/// A list or struct value, `depth` levels in, appended to `out` as JSON, as `jsonb` reads it:
/// numbers as numbers (NaN and the infinities, which JSON has not, as null), decimals in full,
/// nulls as null, a struct as an object by its fields' names; other values as strings of the
/// text a column of their own holds (bytes as `\x` hex, which `(v ->> 'k')::bytea` reads
/// back; times with a `T`, as `to_jsonb` writes them). Stops once `out` passes `limit` bytes.
fn push_json(
    out: &mut Vec<u8>,
    value: &AnyValue,
    depth: usize,
    limit: usize,
) -> Result<(), String> {
    match value {
        AnyValue::Null => out.extend_from_slice(b"null"),
        AnyValue::Boolean(v) => put(out, v),
        AnyValue::Int8(v) => put(out, v),
        AnyValue::Int16(v) => put(out, v),
        AnyValue::Int32(v) => put(out, v),
        AnyValue::Int64(v) => put(out, v),
        AnyValue::Int128(v) => put(out, v),
        AnyValue::UInt8(v) => put(out, v),
        AnyValue::UInt16(v) => put(out, v),
        AnyValue::UInt32(v) => put(out, v),
        AnyValue::UInt64(v) => put(out, v),
        AnyValue::UInt128(v) => put(out, v),
        // The shortest text that reads back as the same number, or null.
        AnyValue::Float32(v) => put(out, v),
        AnyValue::Float64(v) => put(out, v),
        AnyValue::Decimal(v, _, scale) => {
            out.extend_from_slice(decimal_text(*v, *scale).as_bytes())
        }
        AnyValue::String(text) => put_string(out, text)?,
        AnyValue::StringOwned(text) => put_string(out, text)?,
        AnyValue::List(items) => {
            let depth = deeper(depth)?;
            out.push(b'[');
            // `iter` reads the value's chunk; an empty list may have none.
            if !items.is_empty() {
                for (i, item) in items.iter().enumerate() {
                    if out.len() > limit {
                        return Ok(());
                    }
                    if i > 0 {
                        out.push(b',');
                    }
                    push_json(out, &item, depth, limit)?;
                }
            }
            out.push(b']');
        }
        AnyValue::Struct(_, _, fields) => {
            let names = fields.iter().map(|f| f.name().as_str());
            push_object(out, names.zip(value._iter_struct_av()), depth, limit)?
        }
        AnyValue::StructOwned(payload) => {
            let (values, fields) = &**payload;
            let names = fields.iter().map(|f| f.name().as_str());
            let values = values.iter().map(AnyValue::as_borrowed);
            push_object(out, names.zip(values), depth, limit)?
        }
        scalar => {
            let text = parquet_text(scalar, limit)?;
            match scalar {
                AnyValue::Datetime(..) | AnyValue::DatetimeOwned(..) => {
                    put_string(out, &text.replacen(' ', "T", 1))?
                }
                _ => put_string(out, &text)?,
            }
        }
    }
    Ok(())
}

/// A struct's fields as a JSON object.
fn push_object<'n, 'v>(
    out: &mut Vec<u8>,
    fields: impl Iterator<Item = (&'n str, AnyValue<'v>)>,
    depth: usize,
    limit: usize,
) -> Result<(), String> {
    let depth = deeper(depth)?;
    out.push(b'{');
    for (i, (name, value)) in fields.enumerate() {
        if out.len() > limit {
            return Ok(());
        }
        if i > 0 {
            out.push(b',');
        }
        put_string(out, name)?;
        out.push(b':');
        push_json(out, &value, depth, limit)?;
    }
    out.push(b'}');
    Ok(())
}

fn deeper(depth: usize) -> Result<usize, String> {
    match depth < MAX_NESTING {
        true => Ok(depth + 1),
        false => Err(format!("a value nested deeper than {MAX_NESTING} levels")),
    }
}

/// A JSON number, boolean or string (NaN and the infinities as null, as serde_json writes
/// them); writing one into memory cannot fail.
fn put(out: &mut Vec<u8>, value: impl serde::Serialize) {
    let _ = serde_json::to_writer(out, &value);
}

/// jsonb holds no `\u0000`: a NUL is the row's error here, and failed the whole COPY there.
fn put_string(out: &mut Vec<u8>, text: &str) -> Result<(), String> {
    if text.contains('\0') {
        return Err("a NUL character, which jsonb cannot hold".into());
    }
    put(out, text);
    Ok(())
}

/// A decimal (`v` scaled by 10^`scale`) written out in full, as `numeric` reads it: polars'
/// display trims zeros and follows its display settings.
pub(crate) fn decimal_text(v: i128, scale: usize) -> String {
    let sign = if v < 0 { "-" } else { "" };
    let digits = v.unsigned_abs().to_string();
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let digits = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = digits.split_at(digits.len() - scale);
    format!("{sign}{whole}.{fraction}")
}

/// A Parquet timestamp (UTC, in `unit`s since 1970) as text: with its offset when it is zoned
/// (zoned timestamps are stored as UTC instants), plain otherwise.
fn instant_text(v: i64, unit: TimeUnit, zoned: bool) -> Result<String, String> {
    let at = match unit {
        TimeUnit::Nanoseconds => Some(chrono::DateTime::from_timestamp_nanos(v)),
        TimeUnit::Microseconds => chrono::DateTime::from_timestamp_micros(v),
        TimeUnit::Milliseconds => chrono::DateTime::from_timestamp_millis(v),
    }
    .ok_or("a timestamp out of range")?;
    era_text(
        at.naive_utc(),
        match zoned {
            true => "%Y-%m-%d %H:%M:%S%.f+00:00",
            false => "%Y-%m-%d %H:%M:%S%.f",
        },
    )
}

/// `at` in `format` as PostgreSQL reads it: a year before 1 as its year BC (PostgreSQL has no
/// year 0, and reads neither `0000` nor `-0001`), one past 9999 unsigned, and an error before
/// PostgreSQL's first day
/// (4714-11-24 BC), which it refuses.
fn era_text(at: chrono::NaiveDateTime, format: &str) -> Result<String, String> {
    use chrono::Datelike;
    let first = chrono::NaiveDate::from_ymd_opt(-4713, 11, 24).expect("a valid date");
    if at.date() < first {
        return Err("a date or time before 4714-11-24 BC, PostgreSQL's first day".into());
    }
    if (1..=9999).contains(&at.year()) {
        return Ok(at.format(format).to_string());
    }
    // chrono writes years past 9999 as `+10000`, which PostgreSQL does not read either.
    let rest = at.format(&format.replacen("%Y", "", 1)).to_string();
    if at.year() > 9999 {
        return Ok(format!("{}{rest}", at.year()));
    }
    // The same day and time with the year counted back from 1 BC (astronomical year 0).
    Ok(format!("{:04}{rest} BC", 1 - at.year()))
}

/// One NDJSON line's values in column order (`None`: the key is absent); keys that name no
/// column are skipped, and a key given twice keeps its last value, as a JSON map would.
struct ColumnSlots<'c>(&'c HashMap<String, usize>);

impl<'de> DeserializeSeed<'de> for ColumnSlots<'_> {
    type Value = Vec<Option<&'de RawValue>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ColumnSlots<'_> {
    type Value = Vec<Option<&'de RawValue>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut slots = vec![None; self.0.len()];
        while let Some(Key(key)) = map.next_key()? {
            match self.0.get(key.as_ref()) {
                Some(&i) => slots[i] = Some(map.next_value()?),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(slots)
    }
}

/// An object's key, borrowed from the line unless it had escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }

            fn visit_borrowed_str<E>(self, key: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(key)))
            }

            fn visit_str<E>(self, key: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(key.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// A raw JSON value as a field's text: a string's content (unescaped only when it has escapes),
/// anything else as written; `None` for a string that is not Unicode (`"\ud800"`: a raw
/// value takes any escape, a Rust string does not), which was stored as an empty string.
fn unquoted(text: &str) -> Option<Cow<'_, str>> {
    match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(inner) if !inner.as_bytes().contains(&b'\\') => Some(Cow::Borrowed(inner)),
        Some(_) => serde_json::from_str(text).ok().map(Cow::Owned),
        None => Some(Cow::Borrowed(text)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Binary values (a UUID's 16 bytes, an un-annotated byte array) arrive whole, as `bytea`
    /// text: polars' display wrote `b"..."` cut at 60 bytes, and the import succeeded.
    #[test]
    fn binary_values_are_written_whole() {
        let bytes: Vec<u8> = (0..100).collect();
        let value = AnyValue::Binary(&bytes);
        let text = parquet_text(&value, usize::MAX).unwrap();
        assert_eq!(text, format!("\\x{}", hex::encode(&bytes)));
    }

    /// Lists and structs arrive whole, as JSON: polars' display wrote `[1, null, … 7]` (two
    /// items, an ellipsis and the last) and a struct's values without their names, and the
    /// import succeeded.
    #[test]
    fn nested_values_are_written_as_json() {
        let json = |value: AnyValue| parquet_text(&value, usize::MAX).map(Cow::into_owned);
        let numbers = Series::new(
            "".into(),
            (1..=7i64)
                .map(|i| (i != 2).then_some(i))
                .collect::<Vec<_>>(),
        );
        assert_eq!(json(AnyValue::List(numbers)).unwrap(), "[1,null,3,4,5,6,7]");
        let floats = Series::new("".into(), [0.1f32, f32::NAN, f32::INFINITY]);
        assert_eq!(json(AnyValue::List(floats)).unwrap(), "[0.1,null,null]");
        let fields = [
            Series::new("s".into(), ["tab\t\"q\" é"]),
            Series::new("b".into(), [&[0u8, 255][..]]),
            Series::new("d".into(), [19_723i32])
                .cast(&DataType::Date)
                .unwrap(),
            Series::new("t".into(), [1_700_000_000_000_000i64])
                .cast(&DataType::Datetime(
                    TimeUnit::Microseconds,
                    Some(TimeZone::UTC),
                ))
                .unwrap(),
            Series::new("l".into(), [Series::new("".into(), Vec::<i64>::new())]),
        ];
        let row = StructChunked::from_series("".into(), 1, fields.iter())
            .unwrap()
            .into_series();
        assert_eq!(
            json(row.get(0).unwrap()).unwrap(),
            r#"{"s":"tab\t\"q\" é","b":"\\x00ff","d":"2024-01-01","t":"2023-11-14T22:13:20+00:00","l":[]}"#
        );
        // What jsonb refuses is the row's error, not the whole COPY's; so is a value deeper than
        // the bound.
        let nul = Series::new("".into(), ["a\0b"]);
        assert!(json(AnyValue::List(nul)).unwrap_err().contains("NUL"));
        let mut deep = Series::new("".into(), [1i64]);
        for _ in 0..MAX_NESTING {
            deep = Series::new("".into(), [deep]);
        }
        assert!(json(AnyValue::List(deep))
            .unwrap_err()
            .contains("nested deeper"));
        // Past `limit` the text stops (the caller fails the import for the record's cap).
        let long = Series::new("".into(), vec![0i64; 1000]);
        let long = AnyValue::List(long);
        let cut = parquet_text(&long, 10).unwrap();
        assert!((11..20).contains(&cut.len()), "{cut}");
    }

    #[test]
    fn decimals_are_written_in_full() {
        for (v, scale, text) in [
            (125, 2, "1.25"),
            (-250, 2, "-2.50"),
            (-1, 10, "-0.0000000001"),
            (0, 3, "0.000"),
            (42, 0, "42"),
            (i128::MIN, 0, "-170141183460469231731687303715884105728"),
        ] {
            assert_eq!(decimal_text(v, scale), text);
        }
    }

    /// Years before 1 are written as PostgreSQL reads them (it reads no year 0 nor `-0001`);
    /// a day before its first is the row's error, not the COPY's.
    #[test]
    fn times_before_year_one_are_written_bc() {
        let at = |y, m, d| {
            chrono::NaiveDate::from_ymd_opt(y, m, d)
                .unwrap()
                .and_hms_opt(10, 0, 0)
                .unwrap()
        };
        let (naive, day, zoned) = (
            "%Y-%m-%d %H:%M:%S%.f",
            "%Y-%m-%d",
            "%Y-%m-%d %H:%M:%S%.f+00:00",
        );
        for (at, format, text) in [
            (at(2024, 2, 29), naive, "2024-02-29 10:00:00"),
            (at(0, 12, 31), naive, "0001-12-31 10:00:00 BC"),
            (at(-4713, 11, 24), day, "4714-11-24 BC"),
            (at(10000, 1, 2), naive, "10000-01-02 10:00:00"),
            (at(-99, 1, 2), zoned, "0100-01-02 10:00:00+00:00 BC"),
        ] {
            assert_eq!(era_text(at, format).unwrap(), text);
        }
        assert!(era_text(at(-4713, 11, 23), day).is_err());
    }

    /// Two of the dataset's columns with one name (keys told apart by a NUL at inspection,
    /// one name once stored) fail the import with the name: each row indexed past its slots.
    #[test]
    fn ndjson_columns_of_one_name_are_refused() {
        let text = r#"{"a\u0000": 1, "a\ufffd": 2}"#;
        let Err(error) = open_ndjson(text, &["a\u{FFFD}", "a\u{FFFD}"]).1 else {
            panic!("opened");
        };
        assert!(error.contains("two keys named \"a\u{FFFD}\""), "{error}");
    }

    /// `text` in a file (kept while the first value lives), opened as NDJSON of `columns`.
    fn open_ndjson(
        text: &str,
        columns: &[&str],
    ) -> (tempfile::NamedTempFile, Result<Opened, String>) {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        let limits = Limits {
            decompressed: 1 << 20,
            in_memory: 1 << 20,
            record: 1 << 10,
            document: 1 << 20,
        };
        let columns: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
        let csv = CsvSettings {
            delimiter: b',',
            quote: b'"',
            header: true,
        };
        let opened = open(
            file.path(),
            Format::Ndjson,
            Compression::None,
            &csv,
            &columns,
            &limits,
        );
        (file, opened)
    }

    fn read_ndjson(text: &str, columns: &[&str]) -> Vec<Result<Vec<Option<String>>, String>> {
        let (_file, opened) = open_ndjson(text, columns);
        let mut opened = opened.unwrap();
        let mut rows = Vec::new();
        let mut row = Row::default();
        loop {
            match opened.source.next(&mut row) {
                Ok(false) => break,
                Ok(true) => rows.push(Ok((0..row.fields.len())
                    .map(|i| {
                        (!row.is_null(i))
                            .then(|| String::from_utf8(row.fields[i].to_vec()).unwrap())
                    })
                    .collect())),
                Err(Ok(error)) => rows.push(Err(format!("line {}: {}", error.line, error.reason))),
                Err(Err(e)) => panic!("{e}"),
            }
        }
        rows
    }

    /// A slice of rows decodes every page it touches whole: a row group of one row holding a
    /// million list elements is 12 MB however small its slice, past an in-memory cap of 1 MiB.
    #[test]
    fn a_parquet_row_group_past_the_in_memory_cap_is_refused() {
        let list = Series::new("".into(), vec![0i64; 1_000_000]);
        let mut frame = df!("x" => [list]).unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        ParquetWriter::new(std::fs::File::create(file.path()).unwrap())
            .finish(&mut frame)
            .unwrap();
        let limits = Limits {
            decompressed: 1 << 30,
            in_memory: 1 << 20,
            record: 1 << 10,
            document: 1 << 20,
        };
        let csv = CsvSettings {
            delimiter: b',',
            quote: b'"',
            header: true,
        };
        let open_file = || {
            open(
                file.path(),
                Format::Parquet,
                Compression::None,
                &csv,
                &[],
                &limits,
            )
        };
        let error = open_file().err().expect("refused");
        assert!(error.contains("one row group"), "{error}");

        // A flat column's slice reads its pages only as far as its rows: a row group of 200,000
        // numbers (1.6 MB decoded) streams under the same cap.
        let mut flat = df!("x" => (0..200_000i64).collect::<Vec<_>>()).unwrap();
        ParquetWriter::new(std::fs::File::create(file.path()).unwrap())
            .finish(&mut flat)
            .unwrap();
        let opened = open_file();
        assert!(opened.is_ok(), "{:?}", opened.err());
    }

    #[test]
    fn ndjson_values_land_in_their_columns_as_written() {
        let text = concat!(
            r#"{"b": 1.50, "a": "plain", "extra": {"nested": [1, {"x": null}]}}"#,
            "\n\n",
            r#"{"a": "tab\there \"quoted\" \u00e9", "b": null}"#,
            "\n",
            r#"{"\u0061": "escaped key", "b": 12345678901234567890, "a": "last wins"}"#,
            "\n",
            r#"{"b": true}"#,
            "\n",
        );
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(
            read_ndjson(text, &["a", "b"]),
            [
                Ok(vec![some("plain"), some("1.50")]),
                Ok(vec![some("tab\there \"quoted\" é"), None]),
                Ok(vec![some("last wins"), some("12345678901234567890")]),
                Ok(vec![None, some("true")]),
            ]
        );
    }

    /// A string with an unpaired surrogate escape is its row's error: it was stored as an
    /// empty string, the row not rejected.
    #[test]
    fn a_string_that_is_not_unicode_is_its_rows_error() {
        let text = concat!(r#"{"a": "x\ud800y"}"#, "\n", r#"{"a": "ok \u00e9"}"#, "\n");
        let rows = read_ndjson(text, &["a"]);
        assert!(
            matches!(&rows[0], Err(e) if e.starts_with("line 1: a string that is not Unicode")),
            "{rows:?}"
        );
        assert_eq!(rows[1], Ok(vec![Some("ok é".to_owned())]));
    }

    #[test]
    fn a_line_that_is_not_one_json_object_is_that_rows_error() {
        let text = "[1, 2]\n{\"a\": 1} trailing\n{\"a\": \n{\"a\": 2}\n";
        let rows = read_ndjson(text, &["a"]);
        assert_eq!(rows.len(), 4);
        for (i, row) in rows[..3].iter().enumerate() {
            let error = row.as_ref().unwrap_err();
            assert!(
                error.starts_with(&format!("line {}: not a JSON object", i + 1)),
                "{error}"
            );
        }
        assert_eq!(rows[3], Ok(vec![Some("2".to_owned())]));
    }
}
