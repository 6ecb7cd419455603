//! A tenant's submission quotas (`max_queued`, `max_chunks`, `max_rows_per_day`,
//! `max_dataset_bytes`) and what it holds against them. One check for every way a job comes to
//! be: the API's submissions, a schedule's firings and a pipeline's later steps.

use serde::Serialize;
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

/// The quotas a submission is checked against (`tenant_limits`; `None`: no quota).
#[derive(Clone, Copy, Debug, Default, sqlx::FromRow)]
pub struct Quotas {
    pub max_queued: Option<i64>,
    pub max_chunks: Option<i64>,
    pub max_rows_per_day: Option<i64>,
    pub max_dataset_bytes: Option<i64>,
}

impl Quotas {
    /// The tenant's quotas, read in the caller's transaction.
    pub async fn of(db: &mut PgConnection, tenant: Uuid) -> sqlx::Result<Self> {
        let row = sqlx::query_as(
            "SELECT max_queued, max_chunks, max_rows_per_day, max_dataset_bytes FROM tenant_limits
             WHERE tenant_id = $1",
        )
        .bind(tenant)
        .fetch_optional(db)
        .await?;
        Ok(row.unwrap_or_default())
    }
}

/// What a tenant holds now, against its quotas.
#[derive(Clone, Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct TenantUsage {
    /// Jobs scheduled, queued, running or retrying.
    pub live_jobs: i64,
    /// Steps of running pipelines waiting for what they need: each will be a job, so
    /// `max_queued` counts them with the live jobs.
    pub waiting_steps: i64,
    pub dataset_bytes: i64,
    pub chunks: i64,
    /// Rows written by imports that finished today (UTC).
    pub rows_imported_today: i64,
}

/// Checks, in `tx`, that `size` more bytes of datasets (or models) fit the tenant's `max_dataset_bytes`,
/// the tenant's row locked until `tx` ends so that its datasets are recorded one at a time
/// (uploads and jobs' outputs alike); the refusal if they do not.
pub async fn hold_dataset_room(
    tx: &mut PgConnection,
    tenant: Uuid,
    limit: Option<i64>,
    size: u64,
) -> sqlx::Result<Result<(), OverQuota>> {
    let Some(limit) = limit else {
        return Ok(Ok(()));
    };
    lock_tenant(tx, tenant).await?;
    let used = dataset_bytes(&mut *tx, tenant).await?;
    if used.saturating_add(size as i64) <= limit {
        return Ok(Ok(()));
    }
    Ok(Err(OverQuota {
        quota: "max_dataset_bytes",
        limit: format!("{limit} bytes of datasets and models"),
        used: format!("{used} in use, and this adds {size}"),
    }))
}

/// The bytes `max_dataset_bytes` counts of tenant `$1`: its datasets' files and its saved
/// models' (a model is a file of its own, and can outweigh its training data).
macro_rules! stored_bytes {
    () => {
        "(SELECT coalesce(sum(size_bytes), 0) FROM datasets WHERE tenant_id = $1)::bigint
         + (SELECT coalesce(sum(size_bytes), 0) FROM models WHERE tenant_id = $1)::bigint"
    };
}

/// Bytes of the tenant's datasets and saved models, what `max_dataset_bytes` counts.
pub async fn dataset_bytes<'c>(db: impl sqlx::PgExecutor<'c>, tenant: Uuid) -> sqlx::Result<i64> {
    sqlx::query_scalar(concat!("SELECT ", stored_bytes!()))
        .bind(tenant)
        .fetch_one(db)
        .await
}

impl TenantUsage {
    /// What `max_queued` counts: live jobs, and pipeline steps that will be jobs (a pipeline's
    /// submission counted them; fan-outs submitted one after another each passed otherwise).
    pub fn queued(&self) -> i64 {
        self.live_jobs + self.waiting_steps
    }
}

/// Which of a tenant's figures to count: each is a query of its own. Its chunks are the
/// counts on its collections' rows (migration 20261220000001), one row a collection.
#[derive(Clone, Copy, Debug)]
pub struct Measures {
    /// Live jobs and waiting steps, what `max_queued` counts.
    pub queued: bool,
    pub dataset_bytes: bool,
    pub chunks: bool,
    pub rows_imported_today: bool,
}

impl Measures {
    pub const ALL: Self = Self {
        queued: true,
        dataset_bytes: true,
        chunks: true,
        rows_imported_today: true,
    };
    pub const QUEUED: Self = Self {
        queued: true,
        ..Self::NONE
    };
    pub const NONE: Self = Self {
        queued: false,
        dataset_bytes: false,
        chunks: false,
        rows_imported_today: false,
    };
}

pub async fn usage(db: &mut PgConnection, tenant: Uuid) -> sqlx::Result<TenantUsage> {
    usage_of(db, tenant, Measures::ALL).await
}

/// The tenant's figures that `measures` names; the others read 0.
pub async fn usage_of(
    db: &mut PgConnection,
    tenant: Uuid,
    measures: Measures,
) -> sqlx::Result<TenantUsage> {
    // A subquery under a false CASE is never run.
    sqlx::query_as(concat!(
        "SELECT
             CASE WHEN $2 THEN (SELECT count(*) FROM jobs WHERE tenant_id = $1 AND ",
        crate::live_jobs!("jobs"),
        ") ELSE 0 END AS live_jobs,
             CASE WHEN $2 THEN
                 (SELECT count(*) FROM pipeline_steps s JOIN pipelines p ON p.id = s.pipeline_id
                  WHERE p.tenant_id = $1 AND p.status = 'running' AND s.state = 'waiting')
             ELSE 0 END AS waiting_steps,
             CASE WHEN $3 THEN ",
        stored_bytes!(),
        " ELSE 0 END AS dataset_bytes,
             CASE WHEN $4 THEN
                 (SELECT coalesce(sum(chunks), 0)::bigint FROM collections WHERE tenant_id = $1)
             ELSE 0 END AS chunks,
             CASE WHEN $5 THEN
                 (SELECT coalesce(sum(rows_written), 0)::bigint FROM usage_sums
                  WHERE tenant_id = $1 AND kind = 'import'
                    AND finished_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
             ELSE 0 END AS rows_imported_today"
    ))
    .bind(tenant)
    .bind(measures.queued)
    .bind(measures.dataset_bytes)
    .bind(measures.chunks)
    .bind(measures.rows_imported_today)
    .fetch_one(db)
    .await
}

/// A quota a submission would go past: its name, its limit and the use it met.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverQuota {
    pub quota: &'static str,
    pub limit: String,
    pub used: String,
}

impl OverQuota {
    /// `max_queued`'s refusal, `used` saying what the tenant holds (and would add).
    pub fn max_queued(limit: i64, used: String) -> Self {
        Self {
            quota: "max_queued",
            limit: format!("{limit} jobs waiting or running"),
            used,
        }
    }
}

impl std::fmt::Display for OverQuota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "over the tenant's quota {}: {} allowed; {}",
            self.quota, self.limit, self.used
        )
    }
}

/// What an ingest into `collection` changes, for [`check_chunks`]: the documents it replaces
/// (their chunks go), its watched sources (`(field, source)`: their documents not in `present`
/// go too), and the chunks it adds.
pub struct IngestChange<'a> {
    pub collection: Uuid,
    pub replacing: &'a [String],
    pub watched: &'a [(&'a str, &'a str)],
    pub present: &'a [String],
    pub adding: usize,
}

/// Whether `change` (by `job`) takes the tenant past `max_chunks`. Checked once the job's
/// chunks are counted, before any is embedded: the check at an attempt's start saw only what
/// was stored, and one job could pass the quota by millions of chunks. Not checked once an
/// earlier attempt entered its commit (part of its work is stored), as [`check_output`].
///
/// What passes is reserved for the job (`chunk_reservations`) while it runs, and the check
/// counts the other running ingests' reservations, with the tenant locked: ingests that each
/// fit alone no longer all pass together. A reservation is what the job adds net of what it
/// replaces, less what it has stored ([`reserved_chunks_stored`]).
pub async fn check_chunks(
    pool: &sqlx::PgPool,
    tenant: Uuid,
    job: Uuid,
    change: IngestChange<'_>,
) -> sqlx::Result<Result<(), OverQuota>> {
    let IngestChange {
        collection,
        replacing,
        watched,
        present,
        adding,
    } = change;
    let mut tx = pool.begin().await?;
    let Some(limit) = Quotas::of(&mut tx, tenant).await?.max_chunks else {
        return Ok(Ok(()));
    };
    if entered_commit(&mut tx, job).await? {
        return Ok(Ok(()));
    }
    let replaced = replaced_chunks(&mut tx, collection, replacing, watched, present).await?;
    // Locked for the counts alone: the tenant's submissions and firings wait on it.
    lock_tenant(&mut tx, tenant).await?;
    // The reservations of ingests that ended (or went back to the queue) count no more.
    let reserved: i64 = sqlx::query_scalar(
        "WITH ended AS (
             DELETE FROM chunk_reservations r
             WHERE r.tenant_id = $1
               AND (r.job_id = $2
                    OR NOT EXISTS (SELECT 1 FROM jobs j
                                   WHERE j.id = r.job_id AND j.status = 'running'))
             RETURNING r.job_id
         )
         SELECT coalesce(sum(chunks), 0)::int8 FROM chunk_reservations
         WHERE tenant_id = $1 AND job_id NOT IN (SELECT job_id FROM ended)",
    )
    .bind(tenant)
    .bind(job)
    .fetch_one(&mut *tx)
    .await?;
    let measures = Measures {
        chunks: true,
        ..Measures::NONE
    };
    let stored = usage_of(&mut tx, tenant, measures).await?.chunks;
    let grows = (adding as i64 - replaced).max(0);
    if stored + reserved - replaced + adding as i64 > limit {
        let others = match reserved {
            0 => String::new(),
            n => format!(", {n} more held by the tenant's running ingests"),
        };
        return Ok(Err(OverQuota {
            quota: "max_chunks",
            limit: format!("{limit} chunks in all collections"),
            used: format!("{stored} stored{others}, and this job's documents make {adding}"),
        }));
    }
    if grows > 0 {
        sqlx::query(
            "INSERT INTO chunk_reservations (job_id, tenant_id, chunks) VALUES ($1, $2, $3)",
        )
        .bind(job)
        .bind(tenant)
        .bind(grows)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Ok(()))
}

/// The chunks of the documents an ingest replaces, and of a watched source's documents it
/// deletes (those not `present`).
async fn replaced_chunks(
    conn: &mut PgConnection,
    collection: Uuid,
    replacing: &[String],
    watched: &[(&str, &str)],
    present: &[String],
) -> sqlx::Result<i64> {
    let (fields, sources): (Vec<&str>, Vec<&str>) = watched.iter().copied().unzip();
    sqlx::query_scalar(
        "SELECT coalesce(sum(chunks), 0)::int8 FROM documents d
         WHERE d.collection_id = $1
           AND (d.id = ANY($2)
                OR (NOT d.id = ANY($5)
                    AND EXISTS (SELECT 1 FROM unnest($3::text[], $4::text[]) w (field, source)
                                WHERE d.metadata ->> w.field = w.source)))",
    )
    .bind(collection)
    .bind(replacing)
    .bind(fields)
    .bind(sources)
    .bind(present)
    .fetch_one(conn)
    .await
}

/// Takes what `job` stored (`grown` chunks more in all) off its reservation, in the
/// transaction that stores them: counted once, as stored chunks, from then on.
pub async fn reserved_chunks_stored(
    tx: &mut PgConnection,
    job: Uuid,
    grown: i64,
) -> sqlx::Result<()> {
    if grown > 0 {
        sqlx::query(
            "UPDATE chunk_reservations SET chunks = greatest(chunks - $2, 0) WHERE job_id = $1",
        )
        .bind(job)
        .bind(grown)
        .execute(tx)
        .await?;
    }
    Ok(())
}

/// Whether jobs of `kind` add to a quota on output (rows imported, chunks, dataset bytes).
pub fn counts_output(kind: &str) -> bool {
    ["import", "ingest", "synthesis", "sample"].contains(&kind)
}

/// The quotas on what `job` (of `kind`) produces, checked again as each attempt starts: the
/// submission's check counted only what ended jobs had used, so a batch of a thousand imports
/// submitted at once all passed it. The jobs running meanwhile may still go past a quota,
/// each by what it adds. Not checked once an earlier attempt entered its commit: its work may
/// be published, which the attempt reports rather than refuses. No query for kinds without
/// such a quota.
pub async fn check_output(
    pool: &sqlx::PgPool,
    tenant: Uuid,
    job: Uuid,
    kind: &str,
) -> sqlx::Result<Result<(), OverQuota>> {
    if !counts_output(kind) {
        return Ok(Ok(()));
    }
    let mut conn = pool.acquire().await?;
    if entered_commit(&mut conn, job).await? {
        return Ok(Ok(()));
    }
    let quotas = Quotas::of(&mut conn, tenant).await?;
    check(&mut conn, tenant, &quotas, &[kind], false).await
}

/// Whether an attempt of `job` entered its commit (its work may be stored already).
async fn entered_commit(conn: &mut PgConnection, job: Uuid) -> sqlx::Result<bool> {
    let committed: Option<bool> =
        sqlx::query_scalar("SELECT committing_attempt IS NOT NULL FROM jobs WHERE id = $1")
            .bind(job)
            .fetch_optional(conn)
            .await?;
    Ok(committed == Some(true))
}

/// Whether jobs of these kinds would take the tenant past a quota: for ingest jobs,
/// `max_chunks` already stored; for imports, `max_rows_per_day` already imported today; and,
/// when `count_queued`, `max_queued` jobs waiting or running with these added. A job that
/// crosses a quota while it runs finishes (its overrun shows in the usage); the next one is
/// refused.
pub async fn check(
    db: &mut PgConnection,
    tenant: Uuid,
    quotas: &Quotas,
    kinds: &[&str],
    count_queued: bool,
) -> sqlx::Result<Result<(), OverQuota>> {
    let needs = |kind: &str| kinds.contains(&kind);
    let max_chunks = quotas.max_chunks.filter(|_| needs("ingest"));
    let max_rows = quotas.max_rows_per_day.filter(|_| needs("import"));
    let max_queued = quotas.max_queued.filter(|_| count_queued);
    // Syntheses and samples register their output as a dataset of the tenant.
    let max_bytes = quotas
        .max_dataset_bytes
        .filter(|_| needs("synthesis") || needs("sample"));
    if max_chunks.is_none() && max_rows.is_none() && max_queued.is_none() && max_bytes.is_none() {
        return Ok(Ok(()));
    }
    let measures = Measures {
        queued: max_queued.is_some(),
        dataset_bytes: max_bytes.is_some(),
        chunks: max_chunks.is_some(),
        rows_imported_today: max_rows.is_some(),
    };
    let usage = usage_of(db, tenant, measures).await?;
    if let Some(limit) = max_chunks.filter(|&l| usage.chunks >= l) {
        return Ok(Err(OverQuota {
            quota: "max_chunks",
            limit: format!("{limit} chunks in all collections"),
            used: format!("{} stored", usage.chunks),
        }));
    }
    if let Some(limit) = max_rows.filter(|&l| usage.rows_imported_today >= l) {
        return Ok(Err(OverQuota {
            quota: "max_rows_per_day",
            limit: format!("{limit} rows imported a day"),
            used: format!("{} imported today (UTC)", usage.rows_imported_today),
        }));
    }
    if let Some(limit) = max_bytes.filter(|&l| usage.dataset_bytes >= l) {
        return Ok(Err(OverQuota {
            quota: "max_dataset_bytes",
            limit: format!("{limit} bytes of datasets and models"),
            used: format!("{} in use", usage.dataset_bytes),
        }));
    }
    let adding = kinds.len() as i64;
    let queued = usage.queued();
    if let Some(limit) = max_queued.filter(|&l| queued + adding > l) {
        let used = format!("{queued} in use, and this adds {adding}");
        return Ok(Err(OverQuota::max_queued(limit, used)));
    }
    Ok(Ok(()))
}

/// Locks the tenant's row until the transaction ends, so that creates of one tenant checked
/// against a cap wait for each other: two cannot both pass a cap only one fits under.
/// (`FOR NO KEY UPDATE`: the tenant's submissions, whose foreign keys share the row, do not
/// wait.)
pub async fn lock_tenant(conn: &mut PgConnection, tenant: Uuid) -> sqlx::Result<()> {
    sqlx::query("SELECT 1 FROM tenants WHERE id = $1 FOR NO KEY UPDATE")
        .bind(tenant)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Refuses (409) one more row of `table` (a table with a `tenant_id`, named as the API names
/// it) once the tenant holds `most`. Counted with the tenant locked ([`lock_tenant`]), in the
/// transaction that adds the row: requests racing each other cannot all pass.
pub async fn room_for_one(
    conn: &mut PgConnection,
    tenant: Uuid,
    table: &'static str,
    most: i64,
) -> Result<(), crate::Problem> {
    lock_tenant(conn, tenant).await?;
    seen_room_for_one(conn, tenant, table, most).await
}

/// [`room_for_one`] without the lock: a cheap check before slow work (an outbound probe), made
/// again, locked, where the row is added.
pub async fn seen_room_for_one(
    conn: &mut PgConnection,
    tenant: Uuid,
    table: &'static str,
    most: i64,
) -> Result<(), crate::Problem> {
    let held: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {table} WHERE tenant_id = $1"
    ))
    .bind(tenant)
    .fetch_one(&mut *conn)
    .await?;
    if held >= most {
        return Err(crate::Problem::conflict(format!(
            "the tenant already has {held} {table}, the most it may have; delete one first"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestDatabase;

    /// A check counts only the figures its quotas need: with `max_queued` alone, a tenant's
    /// chunks were counted too (millions of index entries) at every submit and every
    /// schedule firing.
    #[tokio::test]
    async fn a_check_counts_only_what_its_quotas_need() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        let collection = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO collections (id, tenant_id, name, model, max_tokens, overlap)
             VALUES ($1, $2, 'notes', 'all-MiniLM-L6-v2', 200, 32)",
        )
        .bind(collection)
        .bind(tenant)
        .execute(&db.pool)
        .await
        .unwrap();
        for sql in [
            "INSERT INTO documents (collection_id, id, content_hash, chunks, job_id)
             VALUES ($1, 'doc', 'x', 100, $1)",
            "INSERT INTO chunks (collection_id, document_id, ordinal, text, embedding)
             SELECT $1, 'doc', o, 'chunk', array_fill(0.1, ARRAY[384])::real[]::vector
             FROM generate_series(0, 99) AS o",
        ] {
            sqlx::query(sql)
                .bind(collection)
                .execute(&db.pool)
                .await
                .unwrap();
        }
        let quotas = Quotas {
            max_queued: Some(10),
            ..Default::default()
        };
        let chunk_blocks = "SELECT sum(pg_stat_get_xact_blocks_fetched(oid))::bigint FROM pg_class
             WHERE oid = 'chunks'::regclass
                OR oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'chunks'::regclass)";
        let mut tx = db.pool.begin().await.unwrap();
        let checked = check(&mut tx, tenant, &quotas, &["canary"], true).await;
        assert_eq!(checked.unwrap(), Ok(()));
        let read: i64 = sqlx::query_scalar(chunk_blocks)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(read, 0, "the check read {read} blocks of chunks");
        // With `max_chunks`, they are counted.
        let quotas = Quotas {
            max_chunks: Some(100),
            ..Default::default()
        };
        let over = check(&mut tx, tenant, &quotas, &["ingest"], true).await;
        assert_eq!(over.unwrap().unwrap_err().quota, "max_chunks");
    }

    /// A tenant's live jobs are counted through the indexes that hold them, however many of its
    /// jobs have ended: an `IN` list of the live statuses matches none of those partial
    /// indexes, so the whole table was read.
    #[tokio::test]
    async fn live_jobs_are_counted_from_their_indexes() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        sqlx::query(
            "INSERT INTO jobs (id, tenant_id, kind, status, payload, attempt, finished_at)
             SELECT conveyor_uuidv7(), $1, 'canary', s, '{}', 1,
                    CASE WHEN s = 'succeeded' THEN now() END
             FROM unnest(array_fill('succeeded'::text, ARRAY[5000])
                         || '{queued,queued,running,scheduled,retrying}'::text[]) AS s",
        )
        .bind(tenant)
        .execute(&db.pool)
        .await
        .unwrap();
        sqlx::query("ANALYZE jobs").execute(&db.pool).await.unwrap();

        // The backend's counts not yet reported (its earlier transactions') are in the view too.
        let seq_scans = "SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'jobs'";
        let mut tx = db.pool.begin().await.unwrap();
        let before: i64 = sqlx::query_scalar(seq_scans)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        let used = usage(&mut tx, tenant).await.unwrap();
        let after: i64 = sqlx::query_scalar(seq_scans)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(used.live_jobs, 5);
        assert_eq!(after - before, 0, "jobs read by a sequential scan");
    }

    async fn new_collection(db: &TestDatabase, tenant: Uuid, name: &str) -> Uuid {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO collections (id, tenant_id, name, model, max_tokens, overlap)
             VALUES ($1, $2, $3, 'all-MiniLM-L6-v2', 200, 32)",
        )
        .bind(id)
        .bind(tenant)
        .bind(name)
        .execute(&db.pool)
        .await
        .unwrap();
        id
    }

    /// 20 documents of `chunks` chunks each in `collection`.
    async fn fill(db: &TestDatabase, collection: Uuid, chunks: i32) {
        for sql in [
            "INSERT INTO documents (collection_id, id, content_hash, chunks, job_id)
             SELECT $1, 'doc' || d, 'x', $2, $1 FROM generate_series(1, 20) AS d",
            "INSERT INTO chunks (collection_id, document_id, ordinal, text, embedding)
             SELECT $1, 'doc' || d, o, 'chunk', array_fill(0.1, ARRAY[384])::real[]::vector
             FROM generate_series(1, 20) AS d, generate_series(0, $2 - 1) AS o",
        ] {
            sqlx::query(sql)
                .bind(collection)
                .bind(chunks)
                .execute(&db.pool)
                .await
                .unwrap();
        }
    }

    async fn running_ingest(db: &TestDatabase, tenant: Uuid) -> Uuid {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO jobs (id, tenant_id, kind, status, payload, attempt)
             VALUES ($1, $2, 'ingest', 'running', '{}', 1)",
        )
        .bind(id)
        .bind(tenant)
        .execute(&db.pool)
        .await
        .unwrap();
        id
    }

    /// Two ingests that each fit `max_chunks` alone, checked before either stored anything,
    /// passed together: the second now counts what the first holds while it runs, and no
    /// longer once it ended. A retried attempt does not count its own earlier hold.
    #[tokio::test]
    async fn running_ingests_count_what_the_others_hold() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        let collection = new_collection(&db, tenant, "notes").await;
        sqlx::query("INSERT INTO tenant_limits (tenant_id, max_chunks) VALUES ($1, 100)")
            .bind(tenant)
            .execute(&db.pool)
            .await
            .unwrap();
        let (first, second) = (
            running_ingest(&db, tenant).await,
            running_ingest(&db, tenant).await,
        );
        let adding = |n| IngestChange {
            collection,
            replacing: &[],
            watched: &[],
            present: &[],
            adding: n,
        };
        let check = |job, n| check_chunks(&db.pool, tenant, job, adding(n));
        assert_eq!(check(first, 60).await.unwrap(), Ok(()));
        assert_eq!(check(first, 70).await.unwrap(), Ok(()), "its own hold");
        let over = check(second, 60).await.unwrap().unwrap_err();
        assert_eq!(
            (over.quota, over.used.as_str()),
            (
                "max_chunks",
                "0 stored, 70 more held by the tenant's running ingests, \
                 and this job's documents make 60"
            )
        );
        assert_eq!(check(second, 30).await.unwrap(), Ok(()));
        // What the first stores comes off its hold: counted once.
        fill(&db, collection, 2).await;
        let mut tx = db.pool.begin().await.unwrap();
        reserved_chunks_stored(&mut tx, first, 40).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(check(second, 30).await.unwrap(), Ok(()), "40 + 30 + 30");
        assert!(check(second, 31).await.unwrap().is_err());
        sqlx::query("UPDATE jobs SET status = 'succeeded' WHERE id = $1")
            .bind(first)
            .execute(&db.pool)
            .await
            .unwrap();
        assert_eq!(check(second, 60).await.unwrap(), Ok(()));
        let held: Vec<(Uuid, i64)> =
            sqlx::query_as("SELECT job_id, chunks FROM chunk_reservations")
                .fetch_all(&db.pool)
                .await
                .unwrap();
        assert_eq!(held, [(second, 60)]);
    }

    /// `max_chunks` and `GET /v1/tenant` read the tenant's chunks from its collections' rows
    /// (migration 20261220000001): each counted every chunk of the tenant, millions of index
    /// entries perhaps, at every ingest submission, schedule firing and pipeline step.
    #[tokio::test]
    async fn chunks_are_counted_without_reading_them() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        let collection = new_collection(&db, tenant, "notes").await;
        fill(&db, collection, 100).await;
        let chunk_blocks = "SELECT sum(pg_stat_get_xact_blocks_fetched(oid))::bigint FROM pg_class
             WHERE oid = 'chunks'::regclass
                OR oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'chunks'::regclass)";
        let mut tx = db.pool.begin().await.unwrap();
        let before: i64 = sqlx::query_scalar(chunk_blocks)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        let at_limit = Quotas {
            max_chunks: Some(2000),
            ..Default::default()
        };
        let over = check(&mut tx, tenant, &at_limit, &["ingest"], false).await;
        assert_eq!(over.unwrap().unwrap_err().used, "2000 stored");
        let under = Quotas {
            max_chunks: Some(2001),
            ..Default::default()
        };
        let checked = check(&mut tx, tenant, &under, &["ingest"], false).await;
        assert_eq!(checked.unwrap(), Ok(()));
        assert_eq!(usage(&mut tx, tenant).await.unwrap().chunks, 2000);
        let after: i64 = sqlx::query_scalar(chunk_blocks)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let read = after - before;
        assert_eq!(read, 0, "{read} blocks of chunks read to count them");
    }

    /// Migration 20261220000001 fills in the counts of the collections that were there before
    /// it: run here again, its function, triggers and columns gone, over collections written
    /// without them.
    #[tokio::test]
    async fn the_counts_migration_fills_in_existing_collections() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        for sql in [
            "DROP FUNCTION collections_count_documents() CASCADE",
            "ALTER TABLE collections DROP COLUMN documents, DROP COLUMN chunks",
            "DELETE FROM _sqlx_migrations WHERE version = 20261220000001",
        ] {
            sqlx::query(sql).execute(&db.pool).await.unwrap();
        }
        let notes = new_collection(&db, tenant, "notes").await;
        new_collection(&db, tenant, "empty").await;
        fill(&db, notes, 5).await;
        crate::db::migrate(&db.pool).await.unwrap();
        let counts: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT name, documents, chunks FROM collections WHERE tenant_id = $1 ORDER BY name",
        )
        .bind(tenant)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        let expected = [
            ("empty".to_owned(), 0_i64, 0_i64),
            ("notes".to_owned(), 20, 100),
        ];
        assert_eq!(counts, expected);
        let mut conn = db.pool.acquire().await.unwrap();
        assert_eq!(usage(&mut conn, tenant).await.unwrap().chunks, 100);
    }
}
