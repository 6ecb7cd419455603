//! The direct path for CSV and TSV: the file's bytes go to `COPY ... (FORMAT csv)` unchanged and
//! PostgreSQL parses and checks them, as `psql \copy` has it do. Taken only when the result is
//! the one the checked path would give: every file column imported in order into a column of
//! known type, bad rows abort the import, invalid UTF-8 is an error, one NULL string. The
//! worker then only streams (and decompresses) bytes, so an import runs at close to the
//! server's own COPY speed.

use shared::{
    datasets::{Compression, Format},
    JobContext,
};
use sqlx::{postgres::PgPoolCopyExt, PgPool};
use std::{
    io::Read,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
};
use tokio::sync::mpsc;

use super::{source, EncodingErrors, ImportPayload, OnError};
use crate::{
    limits::{CapExceeded, Framing, Limits},
    JobError,
};

/// Bytes per COPY message, and messages read ahead of the connection.
const MESSAGE: usize = 1 << 20;
const MESSAGES_IN_FLIGHT: usize = 4;

/// Whether PostgreSQL can parse the file itself with the same outcome as the checked path.
/// `in_file_order`: each file column feeds the table column at its position, and no column's
/// type may still be widened by a later value.
pub fn applies(payload: &ImportPayload, format: Format, in_file_order: bool) -> bool {
    matches!(format, Format::Csv | Format::Tsv)
        && payload.on_error == OnError::Abort
        && payload.csv.encoding_errors == EncodingErrors::Strict
        && payload.csv.null.len() == 1
        && in_file_order
}

/// Streams the file into `staging` through one `COPY`; returns the rows copied.
#[allow(clippy::too_many_arguments)]
pub async fn copy(
    ctx: &JobContext,
    payload: &ImportPayload,
    format: Format,
    target: &PgPool,
    staging: &str,
    columns: &str,
    path: PathBuf,
    compression: Compression,
    size: u64,
    limits: Limits,
) -> Result<u64, JobError> {
    let literal = |s: &str| format!("'{}'", s.replace('\'', "''"));
    // A TSV dataset's default delimiter is a tab, as on the checked path.
    let delimiter = match (format, payload.csv.delimiter.as_str()) {
        (Format::Tsv, ",") => "\t",
        (_, delimiter) => delimiter,
    };
    let copy_sql = format!(
        "COPY {staging} ({columns}) FROM STDIN WITH (FORMAT csv, HEADER {}, DELIMITER {}, \
         QUOTE {}, NULL {}, FORCE_NULL ({columns}))",
        payload.csv.header,
        literal(delimiter),
        literal(&payload.csv.quote),
        literal(&payload.csv.null[0]),
    );
    let read = Arc::default();
    let counter = Arc::clone(&read);
    let (tx, mut rx) = mpsc::channel::<std::io::Result<Vec<u8>>>(MESSAGES_IN_FLIGHT);
    let framing = Framing::CopyCsv {
        quote: payload.csv.quote.as_bytes()[0],
    };
    let meter = ctx.meter().clone();
    let reader = tokio::task::spawn_blocking(move || {
        meter.timed(|| {
            let mut file = match source::open_raw(&path, compression, counter, &limits, framing) {
                Ok(file) => file,
                Err(e) => return drop(tx.blocking_send(Err(e))),
            };
            loop {
                let mut message = vec![0u8; MESSAGE];
                let filled = match fill(&mut file, &mut message) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) => return drop(tx.blocking_send(Err(e))),
                };
                message.truncate(filled);
                if tx.blocking_send(Ok(message)).is_err() {
                    return; // the copy stopped
                }
            }
        })
    });
    let mut sink = target.copy_in_raw(&copy_sql).await.map_err(copy_error)?;
    let total = size.max(1) as f32;
    while let Some(message) = rx.recv().await {
        if ctx.is_cancelled() {
            drop(rx);
            let _ = sink.abort("import cancelled").await;
            let _ = reader.await;
            return Err(JobError::Cancelled(shared::Cancelled));
        }
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                let _ = sink.abort("the file could not be read").await;
                return Err(match CapExceeded::in_io(&e) {
                    Some(cap) => cap.into(),
                    None => JobError::Retryable(format!("reading the dataset: {e}")),
                });
            }
        };
        sink.send(message).await.map_err(copy_error)?;
        let done = read.load(Ordering::Relaxed);
        let note = format!("{} of {} MB read", done >> 20, size >> 20);
        ctx.progress((done as f32 / total).min(0.99), note).await;
    }
    let rows = sink.finish().await.map_err(copy_error)?;
    ctx.progress(0.99, format!("{rows} rows")).await;
    Ok(rows)
}

/// Reads until `buffer` is full or the file ends.
fn fill(file: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A COPY failure as the checked path words it: `line 3, column "amount": invalid input syntax
/// for type integer: "12x"`. Bad data fails for good; a lost connection is retried.
fn copy_error(e: sqlx::Error) -> JobError {
    let sqlx::Error::Database(db) = &e else {
        return super::load::db_error(e);
    };
    let code = db.code().unwrap_or_default().into_owned();
    if !(code.starts_with("22") || code.starts_with("23")) {
        return super::load::db_error(e);
    }
    // The context reads `COPY import_…, line 3, column amount: "12x"`.
    let context = db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .and_then(|pg| pg.r#where())
        .unwrap_or_default();
    let place =
        context
            .split_once(", line ")
            .map(|(_, place)| match place.split_once(", column ") {
                Some((line, column)) => {
                    let column = column.split_once(':').map_or(column, |(name, _)| name);
                    format!("line {line}, column \"{column}\": ")
                }
                None => format!("line {}: ", place.split(':').next().unwrap_or(place)),
            });
    JobError::Permanent(format!("{}{}", place.unwrap_or_default(), db.message()))
}
