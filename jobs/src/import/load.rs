//! The import itself: a blocking reader thread checks and encodes rows into COPY text chunks;
//! the async side streams them into a staging table, then applies the staging table to the
//! target in one transaction that also records the import as done (so a retry after a crash
//! never applies it twice).

use shared::{
    connections::{Target, TargetError},
    datasets,
    usage::Meter,
    JobContext,
};
use sqlx::{postgres::PgPoolCopyExt, PgPool};
use std::{borrow::Cow, path::PathBuf, sync::atomic::Ordering, time::Instant};
use tokio::sync::mpsc;
use uuid::Uuid;

use contracts::{
    import::{
        shown_name, ImportOutput, ImportedColumn, TableOutputs, MAX_NAME_BYTES, STAGING_PREFIX,
    },
    Artifact,
};

use super::{
    quote_ident,
    source::{self, CsvSettings, Opened, Row, RowError},
    stream,
    types::{push_copy_text, PgType},
    EncodingErrors, ImportPayload, Mode, OnError, DEFAULT_MAX_ERRORS,
};
use crate::{JobError, Services};

/// A COPY message this size or larger goes out.
const CHUNK_BYTES: usize = 1 << 20;
/// Chunks in flight between the reader thread and COPY: bounds memory.
const CHUNKS_IN_FLIGHT: usize = 4;

/// The table's columns and their types, in order.
async fn table_columns(
    pool: &PgPool,
    schema: &str,
    table: &str,
) -> sqlx::Result<Vec<(String, String)>> {
    sqlx::query_as(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
         FROM pg_attribute a
         WHERE a.attrelid = to_regclass(format('%I.%I', $1::text, $2::text))
           AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(pool)
    .await
}

/// A database error that another attempt may not hit again (connection lost, deadlock, a
/// server shutting down) is retryable; a data or schema error is not.
pub(super) fn db_error(e: sqlx::Error) -> JobError {
    let retryable = match &e {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || code.starts_with("57P") || code == "40001" || code == "40P01"
        }),
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Protocol(_) => true,
        _ => false,
    };
    let text = format!("target database: {}", crate::target_error_text(&e));
    if retryable {
        JobError::Retryable(text)
    } else {
        JobError::Permanent(text)
    }
}

/// One column of the import: where it comes from in the file, and its type in the table.
#[derive(Clone, Debug)]
struct Planned {
    source: usize,
    name: String,
    ty: PgType,
    /// The importer created the column and may widen it when a value does not fit.
    widen: bool,
}

/// COPY text of whole rows, for the COPY side. Empty: a column widened, and the reader reads
/// on for the types the file needs.
struct Chunk {
    data: Vec<u8>,
    rows: u64,
}

#[derive(Default)]
struct Summary {
    rows_read: u64,
    rows_rejected: u64,
    /// A later value did not fit a created column: nothing read since was sent, and these are
    /// the types (every column's) that the whole file fits, to read it again with.
    widened: Option<Vec<PgType>>,
}

/// What a pass of the checked path came to.
enum Checked {
    Copied(u64, Summary, Vec<Artifact>),
    /// The file must be read again into a staging table of these column types.
    Widen(Vec<PgType>),
}

/// How the reader thread treats values.
struct ReadRules {
    nulls: Vec<Vec<u8>>,
    encoding: EncodingErrors,
    on_error: OnError,
    max_errors: u64,
    /// Typed formats (Parquet, where values come typed): no client-side checks.
    trusted: bool,
    width: usize,
    csv: bool,
}

pub async fn run(
    services: &Services,
    ctx: &JobContext,
    payload: &ImportPayload,
) -> Result<ImportOutput, JobError> {
    let started = Instant::now();
    let tenant = ctx.tenant_id();
    let dataset = datasets::get(&services.pool, tenant, payload.dataset_id)
        .await
        .map_err(|e| JobError::Retryable(e.to_string()))?
        .ok_or_else(|| {
            JobError::Permanent(format!("dataset {} no longer exists", payload.dataset_id))
        })?;
    let target = services
        .targets
        .target(tenant, payload.target.connection_id)
        .await
        .map_err(|e| match e {
            TargetError::UnknownConnection(id) => {
                JobError::Permanent(format!("connection {id} no longer exists"))
            }
            refused @ TargetError::RefusedConnection(..) => {
                JobError::Permanent(refused.to_string())
            }
            e @ (TargetError::UnreachableConnection(_) | TargetError::Other(_)) => {
                JobError::Retryable(e.to_string())
            }
        })?;
    let schema = payload.schema_on(&target);
    if let Some(reason) = target.refuse_schema(schema) {
        return Err(JobError::Permanent(format!("target.schema: {reason}")));
    }
    prepare(&target.platform).await.map_err(db_error)?;
    if let Some(result) = already_done(&target.platform, ctx)
        .await
        .map_err(db_error)?
    {
        // The attempt that committed them may not have heard its commit succeed. (On a
        // tenant's own database the ledger is the tenant's to write: the meter bounds it.)
        let rows = i64::try_from(result.rows_imported).unwrap_or(Meter::MOST);
        Meter::add(&ctx.meter().rows_written, rows);
        return Ok(result);
    }
    let staging = staging_table(schema, ctx.job_id());
    // A previous attempt may have died mid-copy.
    sqlx::query(&format!("DROP TABLE IF EXISTS {staging}"))
        .execute(&target.pool)
        .await
        .map_err(db_error)?;
    let outcome = import(services, ctx, payload, &dataset, &target, &staging, started).await;
    if outcome.is_err() {
        if let Err(e) = sqlx::query(&format!("DROP TABLE IF EXISTS {staging}"))
            .execute(&target.pool)
            .await
        {
            tracing::warn!(job = %ctx.job_id(), error = %shared::telemetry::Untrusted(&e), "staging table not dropped; the next attempt drops it");
        }
        // An earlier attempt of the job, rescued from a worker thought lost, may have
        // committed meanwhile: this one then failed on what it wrote (the table it creates,
        // the ledger's key), and the import is done, once.
        if let Ok(Some(result)) = already_done(&target.platform, ctx).await {
            tracing::info!(job = %ctx.job_id(), "an earlier attempt committed the import");
            // Counted here, as above: the earlier attempt's own outcome is not recorded.
            let rows = i64::try_from(result.rows_imported).unwrap_or(Meter::MOST);
            Meter::add(&ctx.meter().rows_written, rows);
            return Ok(result);
        }
    }
    outcome
}

/// The staging table of an import job into `schema`: it lives beside its target table, the
/// tenant's role creates and fills it, and `create`/`replace` rename it into place.
pub fn staging_table(schema: &str, job: Uuid) -> String {
    format!(
        "{}.{}",
        quote_ident(schema),
        quote_ident(&format!("{STAGING_PREFIX}{}", job.simple()))
    )
}

/// Staging tables one sweep of a target reads, at most, drawn at random so that those it
/// leaves (of jobs not ended, or not this deployment's) hold up no others for good: a tenant's
/// own database could hold, or a server pretending to be one answer, millions.
const SWEEP_TABLES: i64 = 1000;

/// Drops the staging tables in `target` of jobs that ended (in the control plane `control`)
/// without dropping their own: a job whose last attempt died with its worker. Tables of jobs
/// this control plane does not know are left alone: another deployment may share the target.
/// (`conveyor.import_<job>` is where staging tables were before they moved beside the target.)
pub async fn sweep_staging(target: &PgPool, control: &PgPool) -> sqlx::Result<Vec<String>> {
    let tables: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text, substring(c.relname from '[0-9a-f]{32}$')
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'r'
           AND (c.relname ~ '^conveyor_import_[0-9a-f]{32}$'
                OR (n.nspname = 'conveyor' AND c.relname ~ '^import_[0-9a-f]{32}$'))
         ORDER BY random() LIMIT $1",
    )
    .bind(SWEEP_TABLES)
    .fetch_all(target)
    .await?;
    let jobs: Vec<Uuid> = tables
        .iter()
        .filter_map(|(_, _, id)| Uuid::parse_str(id).ok())
        .collect();
    let ended: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE id = ANY($1) AND status IN ('succeeded', 'failed', 'cancelled')",
    )
    .bind(&jobs)
    .fetch_all(control)
    .await?;
    let mut dropped = Vec::new();
    for (schema, table, id) in tables {
        if !Uuid::parse_str(&id).is_ok_and(|job| ended.contains(&job)) {
            continue;
        }
        let staging = format!("{}.{}", quote_ident(&schema), quote_ident(&table));
        sqlx::query(&format!("DROP TABLE IF EXISTS {staging}"))
            .execute(target)
            .await?;
        dropped.push(staging);
    }
    Ok(dropped)
}

/// The record of finished imports in the target's `conveyor` schema. On the default target the
/// schema comes from the bootstrap (the platform may not create schemas there); on a tenant's
/// own database the connection's role creates it.
async fn prepare(target: &PgPool) -> sqlx::Result<()> {
    let mut tx = target.begin().await?;
    // Concurrent first imports would race on CREATE ... IF NOT EXISTS.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('conveyor.prepare'))")
        .execute(&mut *tx)
        .await?;
    let exists: bool = sqlx::query_scalar("SELECT to_regnamespace('conveyor') IS NOT NULL")
        .fetch_one(&mut *tx)
        .await?;
    if !exists {
        sqlx::query("CREATE SCHEMA conveyor")
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS conveyor.imports (
             job_id uuid PRIMARY KEY, result jsonb NOT NULL, finished_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// The result an earlier attempt of this job committed with its import, if one did.
async fn already_done(target: &PgPool, ctx: &JobContext) -> sqlx::Result<Option<ImportOutput>> {
    let recorded: Option<sqlx::types::Json<ImportOutput>> =
        sqlx::query_scalar("SELECT result FROM conveyor.imports WHERE job_id = $1")
            .bind(ctx.job_id())
            .fetch_optional(target)
            .await?;
    Ok(recorded.map(|json| json.0))
}

async fn import(
    services: &Services,
    ctx: &JobContext,
    payload: &ImportPayload,
    dataset: &datasets::Dataset,
    target: &Target,
    staging: &str,
    started: Instant,
) -> Result<ImportOutput, JobError> {
    let schema = payload.schema_on(target);
    let target = &target.pool;
    let table = &payload.target.table;
    let qualified = format!("{}.{}", quote_ident(schema), quote_ident(table));
    let existing = table_columns(target, schema, table)
        .await
        .map_err(db_error)?;
    let exists = !existing.is_empty();
    match payload.mode {
        Mode::Create if exists => {
            return Err(JobError::Permanent(format!(
                "{schema}.{table} exists; use mode append, replace or upsert"
            )))
        }
        Mode::Append | Mode::Upsert if !exists => {
            return Err(JobError::Permanent(format!(
                "{schema}.{table} does not exist; use mode create"
            )))
        }
        _ => {}
    }

    let path = services
        .objects
        .dataset_file(dataset)
        .await
        .map_err(|e| JobError::Retryable(format!("fetching the dataset: {e}")))?;
    let csv_settings = CsvSettings {
        delimiter: payload.csv.delimiter.as_bytes()[0],
        quote: payload.csv.quote.as_bytes()[0],
        header: payload.csv.header,
    };
    let known: Vec<String> = dataset.schema.iter().map(|c| c.name.clone()).collect();
    let (format, compression) = (dataset.format, dataset.compression);
    let limits = services.limits;
    let open = || {
        let (path, known, meter) = (path.to_path_buf(), known.clone(), ctx.meter().clone());
        let settings = csv_settings.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                meter.timed(|| source::open(&path, format, compression, &settings, &known, &limits))
            })
            .await
            .map_err(JobError::crashed)?
            .map_err(JobError::Permanent)
        }
    };
    let mut opened = open().await?;

    let mut plan = plan_columns(payload, dataset, &opened.header, &existing)?;
    let column_list = plan
        .iter()
        .map(|p| quote_ident(&p.name))
        .collect::<Vec<_>>()
        .join(", ");
    let create_staging = |plan: &[Planned]| {
        if exists {
            let like = if payload.mode == Mode::Replace {
                "INCLUDING ALL"
            } else {
                "INCLUDING DEFAULTS"
            };
            format!("CREATE TABLE {staging} (LIKE {qualified} {like})")
        } else {
            let columns = plan
                .iter()
                .map(|p| format!("{} {}", quote_ident(&p.name), p.ty.sql()))
                .collect::<Vec<_>>()
                .join(", ");
            format!("CREATE TABLE {staging} ({columns})")
        }
    };
    sqlx::query(&create_staging(&plan))
        .execute(target)
        .await
        .map_err(db_error)?;

    let in_file_order = plan.len() == opened.header.len()
        && plan
            .iter()
            .enumerate()
            .all(|(i, p)| p.source == i && !p.widen);
    let (imported, summary, artifacts) = if stream::applies(payload, format, in_file_order) {
        drop(opened);
        let size = dataset.size_bytes as u64;
        let rows = stream::copy(
            ctx,
            payload,
            format,
            target,
            staging,
            &column_list,
            path.to_path_buf(),
            compression,
            size,
            limits,
        )
        .await?;
        let summary = Summary {
            rows_read: rows,
            ..Summary::default()
        };
        (rows, summary, Vec::new())
    } else {
        let mut widened_at = None;
        loop {
            let columns = (staging, column_list.as_str());
            let checked = copy_checked(
                services,
                ctx,
                payload,
                dataset,
                target,
                columns,
                opened,
                &plan,
                &mut widened_at,
            )
            .await?;
            let types = match checked {
                Checked::Copied(imported, summary, artifacts) => {
                    break (imported, summary, artifacts)
                }
                Checked::Widen(types) => types,
            };
            // Each pass widens at least one column, to types the whole file fits: the
            // second pass copies.
            if plan.iter().map(|p| &p.ty).eq(types.iter()) {
                return Err(JobError::Permanent(
                    "a pass over the file widened no column".into(),
                ));
            }
            for (column, ty) in plan.iter_mut().zip(types) {
                if column.ty != ty {
                    ctx.log(format!(
                        "column {} widened to {} by a later value; reading the file again",
                        column.name,
                        ty.sql()
                    ))
                    .await;
                    column.ty = ty;
                }
            }
            sqlx::query(&format!("DROP TABLE {staging}"))
                .execute(target)
                .await
                .map_err(db_error)?;
            sqlx::query(&create_staging(&plan))
                .execute(target)
                .await
                .map_err(db_error)?;
            opened = open().await?;
        }
    };

    let meter = ctx.meter();
    Meter::add(&meter.rows_read, summary.rows_read as i64);
    Meter::add(&meter.bytes_read, dataset.size_bytes);
    let mut result = ImportOutput {
        table: format!("{schema}.{table}"),
        mode: payload.mode,
        rows_read: summary.rows_read,
        rows_imported: imported,
        rows_rejected: summary.rows_rejected,
        rows_applied: 0,
        bytes: dataset.size_bytes,
        columns: plan
            .iter()
            .map(|p| ImportedColumn {
                name: p.name.clone(),
                sql_type: p.ty.sql().to_owned(),
            })
            .collect(),
        artifacts,
        duration_ms: 0,
        rows_per_sec: 0,
        outputs: TableOutputs {
            table: format!("{schema}.{table}"),
        },
    };
    apply(
        ctx,
        payload,
        target,
        staging,
        &qualified,
        exists,
        &plan,
        &mut result,
        started,
    )
    .await?;
    // Written once committed: a failed or retried apply (whose rows never landed) counted
    // them against `max_rows_per_day`.
    Meter::add(&meter.rows_written, imported as i64);
    Ok(result)
}

/// The job's progress with `read` of the file read in this pass. A pass that finds a column to
/// widen when `w` of the bar is shown reads the file to its end and then once more: those
/// 2 - w files of reading share the 1 - w of the bar left, so that it never moves back.
fn pass_progress(widened_at: Option<f32>, later_pass: bool, read: f32) -> f32 {
    let shown = match widened_at {
        None => read,
        Some(w) => {
            let since = if later_pass {
                1.0 - w + read
            } else {
                (read - w).max(0.0)
            };
            w + (1.0 - w) * since / (2.0 - w)
        }
    };
    shown.min(0.99)
}

/// The checked path: the reader thread parses, checks and encodes every row (rejected rows to
/// a scratch CSV, then the `rejected.csv` artifact); the rows go to `staging` by text `COPY`.
/// Returns the rows imported, the counts and the artifacts; or, where a later value did not fit
/// a created column, nothing copied and the types to read the file again with. (Casting the
/// rows already copied would lose their text: `02134` copied as bigint reads `2134` as text.)
#[allow(clippy::too_many_arguments)]
async fn copy_checked(
    services: &Services,
    ctx: &JobContext,
    payload: &ImportPayload,
    dataset: &datasets::Dataset,
    target: &PgPool,
    (staging, column_list): (&str, &str),
    opened: Opened,
    plan: &[Planned],
    widened_at: &mut Option<f32>,
) -> Result<Checked, JobError> {
    // The reader thread: parse, check, encode; rejected rows to a scratch CSV.
    // Removed on every way out (a failed COPY included); a rejected.csv kept is moved away.
    let rejected_path = services
        .objects
        .scratch_file()
        .await
        .map_err(|e| JobError::Retryable(e.to_string()))?;
    let rules = ReadRules {
        nulls: payload
            .csv
            .null
            .iter()
            .map(|n| n.as_bytes().to_vec())
            .collect(),
        encoding: payload.csv.encoding_errors,
        on_error: payload.on_error,
        max_errors: payload.max_errors.unwrap_or(DEFAULT_MAX_ERRORS),
        trusted: dataset.format == shared::datasets::Format::Parquet,
        width: opened.header.len(),
        csv: matches!(
            dataset.format,
            shared::datasets::Format::Csv | shared::datasets::Format::Tsv
        ),
    };
    let bytes_read = opened.bytes_read.clone();
    let (tx, mut rx) = mpsc::channel::<Chunk>(CHUNKS_IN_FLIGHT);
    let reader_plan = plan.to_vec();
    let reader_rejected = rejected_path.to_path_buf();
    let meter = ctx.meter().clone();
    let reader = tokio::task::spawn_blocking(move || {
        meter.timed(|| read_rows(opened, reader_plan, rules, tx, reader_rejected))
    });

    // The COPY side.
    let copy_sql = format!("COPY {staging} ({column_list}) FROM STDIN");
    let total_bytes = dataset.size_bytes.max(1) as f32;
    let mut imported = 0u64;
    let mut copy = target.copy_in_raw(&copy_sql).await.map_err(db_error)?;
    let later_pass = widened_at.is_some();
    let mut cancelled = false;
    while let Some(chunk) = rx.recv().await {
        if ctx.is_cancelled() {
            cancelled = true;
            break;
        }
        let Chunk { data, rows } = chunk;
        if data.is_empty() {
            widened_at.get_or_insert(ctx.current_progress());
        } else {
            copy.send(data).await.map_err(db_error)?;
            imported += rows;
        }
        let read = (bytes_read.load(Ordering::Relaxed) as f32 / total_bytes).min(1.0);
        // Never back: the reader may have passed the widening before this chunk is counted.
        let shown = pass_progress(*widened_at, later_pass, read).max(ctx.current_progress());
        let note = match (*widened_at, later_pass) {
            (Some(_), false) => "a column widens: reading on for its type".to_owned(),
            (_, true) => format!("{imported} rows (read again with widened columns)"),
            (None, _) => format!("{imported} rows"),
        };
        ctx.progress(shown, note).await;
    }
    if cancelled {
        drop(rx);
        let _ = copy.abort("import cancelled").await;
        let _ = reader.await;
        return Err(JobError::Cancelled(shared::Cancelled));
    }
    let read = reader.await.map_err(JobError::crashed)?;
    let mut summary = match read {
        Ok(summary) => summary,
        Err(reason) => {
            let _ = copy.abort(&reason).await;
            return Err(JobError::Permanent(reason));
        }
    };
    if let Some(types) = summary.widened.take() {
        widened_at.get_or_insert(ctx.current_progress());
        let _ = copy.abort("a created column widens").await;
        return Ok(Checked::Widen(types));
    }
    copy.finish().await.map_err(db_error)?;
    ctx.checkpoint()?;

    let mut artifacts = Vec::new();
    if summary.rows_rejected > 0 {
        let size = services
            .objects
            .put_artifact_file(&rejected_path, ctx.job_id(), "rejected.csv")
            .await
            .map_err(|e| JobError::Retryable(format!("storing rejected.csv: {e}")))?;
        artifacts.push(Artifact::of_job(ctx.job_id(), "rejected.csv", size));
    }
    Ok(Checked::Copied(imported, summary, artifacts))
}

/// Which file column feeds each table column, and with which type.
fn plan_columns(
    payload: &ImportPayload,
    dataset: &datasets::Dataset,
    header: &[String],
    existing: &[(String, String)],
) -> Result<Vec<Planned>, JobError> {
    let specs: Vec<(String, String, Option<String>)> = match &payload.columns {
        Some(specs) => specs
            .iter()
            .map(|c| {
                (
                    c.source.clone(),
                    c.name.clone().unwrap_or_else(|| c.source.clone()),
                    c.data_type.clone(),
                )
            })
            .collect(),
        None => header
            .iter()
            .map(|h| (h.clone(), h.clone(), None))
            .collect(),
    };
    let mut plan = Vec::with_capacity(specs.len());
    for (source, name, declared) in specs {
        // A header's name becomes the column's: PostgreSQL would cut it (two names alike in
        // their first 63 bytes became one), and errors and rejected rows quoted it whole.
        if name.len() > MAX_NAME_BYTES {
            return Err(JobError::Permanent(format!(
                "the file's column {:?} has a name past the 63 bytes a PostgreSQL column's \
                 holds: name it in `columns` (`{{\"source\": ..., \"name\": ...}}`)",
                shown_name(&name)
            )));
        }
        let index = header.iter().position(|h| *h == source).ok_or_else(|| {
            JobError::Permanent(format!("the file has no column {:?}", shown_name(&source)))
        })?;
        let planned = if existing.is_empty() {
            // A new table: the declared type, else the type inferred from the file's head.
            let inferred = dataset
                .schema
                .iter()
                .find(|c| c.name == source)
                .map(|c| c.data_type.as_str());
            match declared {
                Some(t) => Planned {
                    source: index,
                    name,
                    ty: PgType::from_sql(&t),
                    widen: false,
                },
                None => Planned {
                    source: index,
                    name,
                    ty: PgType::inferred(inferred.unwrap_or("text")),
                    widen: true,
                },
            }
        } else {
            let (_, sql_type) = existing
                .iter()
                .find(|(column, _)| *column == name)
                .ok_or_else(|| JobError::Permanent(format!("the table has no column {name:?}")))?;
            Planned {
                source: index,
                name,
                ty: PgType::from_sql(sql_type),
                widen: false,
            }
        };
        plan.push(planned);
    }
    Ok(plan)
}

/// Applies the staging table to the target in one transaction with the record of the import.
#[allow(clippy::too_many_arguments)]
async fn apply(
    ctx: &JobContext,
    payload: &ImportPayload,
    target: &PgPool,
    staging: &str,
    qualified: &str,
    exists: bool,
    plan: &[Planned],
    result: &mut ImportOutput,
    started: Instant,
) -> Result<(), JobError> {
    let columns = plan
        .iter()
        .map(|p| quote_ident(&p.name))
        .collect::<Vec<_>>()
        .join(", ");
    let table = quote_ident(&payload.target.table);
    let mut tx = target.begin().await.map_err(db_error)?;
    let mut statements: Vec<String> = Vec::new();
    match payload.mode {
        Mode::Create | Mode::Replace => {
            if exists {
                statements.push(format!("DROP TABLE {qualified}"));
            }
            statements.push(format!("ALTER TABLE {staging} RENAME TO {table}"));
        }
        Mode::Append => {
            statements.push(format!(
                "INSERT INTO {qualified} ({columns}) SELECT {columns} FROM {staging}"
            ));
            statements.push(format!("DROP TABLE {staging}"));
        }
        Mode::Upsert => {
            let keys = payload
                .key_columns
                .iter()
                .map(|k| quote_ident(k))
                .collect::<Vec<_>>()
                .join(", ");
            let updates: Vec<String> = plan
                .iter()
                .filter(|p| !payload.key_columns.contains(&p.name))
                .map(|p| format!("{0} = EXCLUDED.{0}", quote_ident(&p.name)))
                .collect();
            let action = if updates.is_empty() {
                "DO NOTHING".to_owned()
            } else {
                format!("DO UPDATE SET {}", updates.join(", "))
            };
            // A key repeated in the file: its last row wins (ctid follows COPY's order).
            statements.push(format!(
                "INSERT INTO {qualified} ({columns})
                 SELECT DISTINCT ON ({keys}) {columns} FROM {staging} ORDER BY {keys}, ctid DESC
                 ON CONFLICT ({keys}) {action}"
            ));
            statements.push(format!("DROP TABLE {staging}"));
        }
    }
    let mut applied = result.rows_imported;
    for statement in statements {
        let done = sqlx::query(&statement)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        if statement.starts_with("INSERT") {
            applied = done.rows_affected();
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    result.rows_applied = applied;
    result.duration_ms = (seconds * 1000.0) as u64;
    result.rows_per_sec = (result.rows_imported as f64 / seconds.max(1e-3)) as u64;
    // The ledger is the platform's: the tenant's role cannot write it, so this transaction
    // steps out of that role (on a registered connection there is none to step out of).
    shared::tenancy::step_out(&mut tx).await.map_err(db_error)?;
    sqlx::query("INSERT INTO conveyor.imports (job_id, result) VALUES ($1, $2)")
        .bind(ctx.job_id())
        .bind(sqlx::types::Json(&*result))
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    // The last chance to stop: after the commit the import is done.
    ctx.checkpoint()?;
    let _committing = ctx.committing().await?;
    tx.commit().await.map_err(db_error)?;
    Ok(())
}

/// The reader thread. Returns why the import must stop (`on_error=abort`, too many rejected
/// rows, an unreadable file), or what it read.
fn read_rows(
    mut opened: Opened,
    mut plan: Vec<Planned>,
    rules: ReadRules,
    tx: mpsc::Sender<Chunk>,
    rejected_path: PathBuf,
) -> Result<Summary, String> {
    let mut summary = Summary::default();
    let mut rejected: Option<csv::Writer<std::fs::File>> = None;
    let mut reject = |summary: &mut Summary, error: RowError, column: &str| -> Result<(), String> {
        let place = if column.is_empty() {
            format!("line {}", error.line)
        } else {
            format!("line {}, column {column:?}", error.line)
        };
        if rules.on_error == OnError::Abort {
            return Err(format!("{place}: {}", error.reason));
        }
        summary.rows_rejected += 1;
        if summary.rows_rejected > rules.max_errors {
            return Err(format!(
                "more than {} rows rejected (max_errors); the last: {place}: {}",
                rules.max_errors, error.reason
            ));
        }
        if rejected.is_none() {
            let file = std::fs::File::create(&rejected_path).map_err(|e| e.to_string())?;
            let mut writer = csv::Writer::from_writer(file);
            writer
                .write_record(["line", "column", "reason", "record"])
                .map_err(|e| e.to_string())?;
            rejected = Some(writer);
        }
        let writer = rejected.as_mut().expect("created above");
        writer
            .write_record([
                error.line.to_string().as_bytes(),
                column.as_bytes(),
                error.reason.as_bytes(),
                &kept_of_record(&error.raw),
            ])
            .map_err(|e| e.to_string())
    };

    let mut chunk = Vec::with_capacity(CHUNK_BYTES + (64 << 10));
    let mut chunk_rows = 0u64;
    let mut widened = false;
    let mut line_buffer = Vec::with_capacity(4096);
    let mut row = Row::default();
    let send = |chunk: Chunk| {
        tx.blocking_send(chunk)
            .map_err(|_| "the import stopped".to_owned())
    };
    loop {
        match opened.source.next(&mut row) {
            Ok(true) => {}
            Ok(false) => break,
            Err(Ok(error)) => {
                summary.rows_read += 1;
                reject(&mut summary, error, "")?;
                continue;
            }
            Err(Err(reason)) => return Err(reason),
        }
        summary.rows_read += 1;
        if rules.csv && row.fields.len() != rules.width {
            // A blank line is no row at all.
            if row.fields.len() == 1 && row.fields[0].is_empty() {
                summary.rows_read -= 1;
                continue;
            }
            let error = RowError {
                line: row.line,
                reason: format!(
                    "expected {} fields, found {}",
                    rules.width,
                    row.fields.len()
                ),
                raw: raw_record(&row),
            };
            reject(&mut summary, error, "")?;
            continue;
        }
        line_buffer.clear();
        let mut bad: Option<(String, String)> = None;
        for (i, column) in plan.iter_mut().enumerate() {
            if i > 0 {
                line_buffer.push(b'\t');
            }
            let raw = &row.fields[column.source];
            if row.is_null(column.source) || (rules.csv && rules.nulls.iter().any(|n| n == raw)) {
                line_buffer.extend_from_slice(b"\\N");
                continue;
            }
            let text: Cow<str> = match std::str::from_utf8(raw) {
                Ok(text) => Cow::Borrowed(text),
                Err(e) if rules.encoding == EncodingErrors::Strict => {
                    bad = Some((
                        column.name.clone(),
                        format!("invalid UTF-8 at byte {}", e.valid_up_to()),
                    ));
                    break;
                }
                Err(_) => String::from_utf8_lossy(raw),
            };
            if rules.trusted {
                push_copy_text(&mut line_buffer, &text);
                continue;
            }
            match column.ty.check(&text) {
                Ok(value) => push_copy_text(&mut line_buffer, &value),
                Err(_) if column.widen => {
                    // Nothing more is copied: the file is read to its end for the types it
                    // needs, then read again into a staging table of those types. The column
                    // widens to a type that holds the value, so a row is judged here as the
                    // last pass judges it; only a value no column holds (a NUL) is its row's
                    // error.
                    let wider = column.ty.widened_for(&text);
                    if wider != column.ty {
                        column.ty = wider;
                        widened = true;
                    }
                    match column.ty.check(&text) {
                        Ok(value) => push_copy_text(&mut line_buffer, &value),
                        Err(reason) => {
                            bad = Some((column.name.clone(), reason));
                            break;
                        }
                    }
                }
                Err(reason) => {
                    bad = Some((column.name.clone(), reason));
                    break;
                }
            }
        }
        if let Some((column, reason)) = bad {
            let error = RowError {
                line: row.line,
                reason,
                raw: raw_record(&row),
            };
            reject(&mut summary, error, &column)?;
            continue;
        }
        if widened {
            // An empty chunk now and then reports the reading (and sees a dropped import,
            // whose send fails).
            if summary.rows_read % 4096 == 0 {
                send(Chunk {
                    data: Vec::new(),
                    rows: 0,
                })?;
            }
            continue;
        }
        line_buffer.push(b'\n');
        chunk.extend_from_slice(&line_buffer);
        chunk_rows += 1;
        if chunk.len() >= CHUNK_BYTES {
            send(Chunk {
                data: std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_BYTES + (64 << 10))),
                rows: chunk_rows,
            })?;
            chunk_rows = 0;
        }
    }
    if widened {
        summary.widened = Some(plan.into_iter().map(|column| column.ty).collect());
    } else if !chunk.is_empty() {
        send(Chunk {
            data: chunk,
            rows: chunk_rows,
        })?;
    }
    if let Some(mut writer) = rejected {
        writer.flush().map_err(|e| e.to_string())?;
    }
    Ok(summary)
}

/// How much of a rejected record `rejected.csv` keeps: records may be up to the record cap
/// each (16 MiB), and a thousand of them, CSV-quoted, filled the worker's disk with gigabytes
/// from a small compressed file.
const REJECTED_RECORD_BYTES: usize = 4096;

/// The record as `rejected.csv` keeps it: whole up to [`REJECTED_RECORD_BYTES`], else its
/// start, its length and its SHA-256.
fn kept_of_record(raw: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    use sha2::Digest;
    if raw.len() <= REJECTED_RECORD_BYTES {
        return raw.into();
    }
    let mut kept = raw[..REJECTED_RECORD_BYTES].to_vec();
    let digest = hex::encode(sha2::Sha256::digest(raw));
    kept.extend_from_slice(format!("… ({} bytes, sha256 {digest})", raw.len()).as_bytes());
    kept.into()
}

/// The row as the file had it (fields joined by commas, CSV-quoted), for `rejected.csv`.
fn raw_record(row: &Row) -> Vec<u8> {
    let mut writer = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b' '))
        .from_writer(Vec::new());
    let _ = writer.write_byte_record(&row.fields);
    let mut bytes = writer.into_inner().unwrap_or_default();
    bytes.pop();
    bytes
}

#[cfg(test)]
mod tests {
    use super::pass_progress;

    /// Through a widening found at 0.6 of the file and the pass after it, the bar only moves
    /// on, and ends short of done (the job's end says done).
    #[test]
    fn progress_never_moves_back_across_passes() {
        let steps = [
            (None, false, 0.2),
            (None, false, 0.6),
            (Some(0.6), false, 0.6),
            (Some(0.6), false, 0.8),
            (Some(0.6), false, 1.0),
            (Some(0.6), true, 0.0),
            (Some(0.6), true, 0.5),
            (Some(0.6), true, 1.0),
        ];
        let shown: Vec<f32> = steps
            .iter()
            .map(|&(at, later, read)| pass_progress(at, later, read))
            .collect();
        assert!(shown.windows(2).all(|w| w[0] <= w[1]), "{shown:?}");
        assert_eq!(shown.last(), Some(&0.99));
        assert_eq!(pass_progress(None, false, 0.5), 0.5);
    }
}
