//! Schema and preview of an uploaded file, read by polars from the file's head only, so an
//! upload of any size is inspected in bounded time and memory.

use polars::prelude::*;
use serde_json::Value;
use shared::datasets::{Column, Compression, Format, Inspected};
use std::{
    io::{Cursor, Read},
    path::Path,
};

use super::source::open_decompressed;

/// Bytes of (decompressed) text read to infer a schema.
const HEAD_BYTES: usize = 1 << 20;
const PREVIEW_ROWS: usize = 20;

pub fn inspect(
    path: &Path,
    format: Format,
    compression: Compression,
) -> Result<(Vec<Column>, Vec<Value>), String> {
    let frame = match format {
        Format::Document => return Ok((Vec::new(), Vec::new())),
        Format::Parquet => {
            super::parquet_footer::check(path)?;
            let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
            ParquetReader::new(file)
                .with_slice(Some((0, 1000)))
                .finish()
                .map_err(|e| e.to_string())?
        }
        Format::Csv | Format::Tsv => {
            let head = read_head(path, compression)?;
            let separator = if format == Format::Tsv { b'\t' } else { b',' };
            let mut frame = CsvReadOptions::default()
                .with_has_header(true)
                .with_infer_schema_length(Some(1000))
                .with_n_rows(Some(1000))
                .with_ignore_errors(true)
                .map_parse_options(|o| {
                    o.with_separator(separator)
                        .with_try_parse_dates(true)
                        .with_truncate_ragged_lines(true)
                        .with_encoding(CsvEncoding::LossyUtf8)
                })
                .into_reader_with_file_handle(Cursor::new(&head))
                .finish()
                .map_err(|e| e.to_string())?;
            // The names as the import's reader (the csv crate) decodes and trims them: polars
            // keeps a quoted header's `""` escapes, and `id, amount`'s second name is `amount`
            // to the import; the import would not find such a column, nor its type.
            let header = csv::ReaderBuilder::new()
                .delimiter(separator)
                .from_reader(Cursor::new(&head))
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|name| name.trim().to_owned())
                        .collect::<Vec<_>>()
                });
            if let Ok(names) = header {
                let distinct: std::collections::HashSet<&String> = names.iter().collect();
                if names.len() == frame.width() && distinct.len() == names.len() {
                    frame.set_column_names(&names).map_err(|e| e.to_string())?;
                }
            }
            frame
        }
        Format::Ndjson => {
            let head = read_head(path, compression)?;
            JsonReader::new(Cursor::new(head))
                .with_json_format(JsonFormat::JsonLines)
                .with_ignore_errors(true)
                .finish()
                .map_err(|e| e.to_string())?
        }
    };
    if frame.width() == 0 {
        return Err("no columns found".into());
    }
    let columns = frame
        .columns()
        .iter()
        .map(|c| Column {
            name: c.name().to_string(),
            data_type: pg_type(c.dtype()).to_owned(),
            nullable: c.null_count() > 0,
        })
        .collect();
    Ok((columns, preview(&frame.head(Some(PREVIEW_ROWS)))))
}

/// The first [`HEAD_BYTES`] of decompressed text, cut after the last complete line.
fn read_head(path: &Path, compression: Compression) -> Result<Vec<u8>, String> {
    let reader = open_decompressed(path, compression).map_err(|e| e.to_string())?;
    let mut head = Vec::with_capacity(HEAD_BYTES);
    reader
        .take(HEAD_BYTES as u64)
        .read_to_end(&mut head)
        .map_err(|e| format!("cannot read the file: {e}"))?;
    if head.len() == HEAD_BYTES {
        if let Some(end) = head.iter().rposition(|&b| b == b'\n') {
            head.truncate(end + 1);
        }
    }
    Ok(head)
}

/// The child's side of [`shared::datasets::inspect`]: the file at `path`, its inspection as
/// JSON on stdout; an unreadable file exits 1 with the reason on stderr.
pub fn serve(format: &str, compression: &str, path: &Path) -> std::process::ExitCode {
    use std::process::ExitCode;
    let parsed = serde_json::from_value::<Format>(format.into())
        .ok()
        .zip(serde_json::from_value::<Compression>(compression.into()).ok());
    let Some((format, compression)) = parsed else {
        eprintln!("unknown format {format:?} or compression {compression:?}");
        return ExitCode::from(2);
    };
    match inspect(path, format, compression) {
        Ok((schema, preview)) => {
            let answer = Inspected { schema, preview };
            match serde_json::to_writer(std::io::stdout().lock(), &answer) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::from(2),
            }
        }
        Err(reason) => {
            eprintln!("{reason}");
            ExitCode::FAILURE
        }
    }
}

/// The PostgreSQL type an import creates for a polars type.
pub fn pg_type(dtype: &DataType) -> &'static str {
    match dtype {
        DataType::Boolean => "boolean",
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => "smallint",
        DataType::Int32 | DataType::UInt16 => "integer",
        DataType::Int64 | DataType::UInt32 => "bigint",
        DataType::UInt64 | DataType::Decimal(..) => "numeric",
        DataType::Float32 => "real",
        DataType::Float64 => "double precision",
        DataType::Date => "date",
        DataType::Datetime(_, None) => "timestamp",
        DataType::Datetime(_, Some(_)) => "timestamptz",
        // Nested values arrive as JSON: NDJSON's as the file wrote them, Parquet's as
        // `source::parquet_text` writes them.
        DataType::List(_) | DataType::Struct(_) => "jsonb",
        _ => "text",
    }
}

fn preview(frame: &DataFrame) -> Vec<Value> {
    (0..frame.height())
        .map(|row| {
            let object = frame
                .columns()
                .iter()
                .map(|c| {
                    let value = c.get(row).map(json).unwrap_or(Value::Null);
                    (c.name().to_string(), value)
                })
                .collect();
            Value::Object(object)
        })
        .collect()
}

fn json(value: AnyValue) -> Value {
    match value {
        AnyValue::Null => Value::Null,
        AnyValue::Boolean(b) => Value::Bool(b),
        AnyValue::Int8(v) => v.into(),
        AnyValue::Int16(v) => v.into(),
        AnyValue::Int32(v) => v.into(),
        AnyValue::Int64(v) => v.into(),
        AnyValue::UInt8(v) => v.into(),
        AnyValue::UInt16(v) => v.into(),
        AnyValue::UInt32(v) => v.into(),
        AnyValue::UInt64(v) => v.into(),
        AnyValue::Float32(v) => {
            serde_json::Number::from_f64(v as f64).map_or(Value::Null, Value::Number)
        }
        AnyValue::Float64(v) => serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number),
        // As text: a JSON number would round it to a double.
        AnyValue::Decimal(v, _, scale) => Value::String(super::source::decimal_text(v, scale)),
        other => Value::String(other.str_value().into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quoted_header_is_named_as_the_import_reads_it() {
        let dir = std::env::temp_dir().join(format!("inspect-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("quoted.csv");
        std::fs::write(&path, "\"a \"\"b\"\"\",\"c, d\", e\n1,x,2.5\n").unwrap();
        let (columns, preview) = inspect(&path, Format::Csv, Compression::None).unwrap();
        let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
        // ` e` is `e`, trimmed as the import trims it (its type was not found, nor a mapping).
        assert_eq!(names, ["a \"b\"", "c, d", "e"]);
        assert_eq!(preview[0]["a \"b\""], 1);
        assert_eq!(columns[2].data_type, "double precision");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Zoned timestamps, as pandas and pyarrow write tz-aware data: a timestamptz column and
    /// its values in the preview (the parser panicked on them, and the upload was refused).
    #[test]
    fn a_parquet_file_with_zoned_timestamps_is_inspected() {
        let dir = std::env::temp_dir().join(format!("inspect-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("zoned.parquet");
        let zoned = DataType::Datetime(TimeUnit::Microseconds, Some(TimeZone::UTC));
        let created = Series::new("created".into(), &[1_700_000_000_000_000i64])
            .cast(&zoned)
            .unwrap();
        let mut frame = DataFrame::new(1, vec![created.into()]).unwrap();
        ParquetWriter::new(std::fs::File::create(&path).unwrap())
            .finish(&mut frame)
            .unwrap();
        let (columns, preview) = inspect(&path, Format::Parquet, Compression::None).unwrap();
        assert_eq!(columns[0].name, "created");
        assert_eq!(columns[0].data_type, "timestamptz");
        let shown = preview[0]["created"].as_str().unwrap().to_owned();
        assert!(shown.starts_with("2023-11-14 22:13:20"), "{shown}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
