//! Who leads the workers' maintenance: the process holding one PostgreSQL advisory lock. The
//! leader names itself in its lock connection's `application_name`, so anyone on the control
//! plane (the API's `GET /v1/workers`, `/metrics`, an operator in `psql`) can see which worker
//! it is.

use sha2::{Digest, Sha256};
use sqlx::PgPool;

/// How tenants see a worker: its name holds the host and process id, which are the operators'
/// to read (logs, `psql`), not the tenants'. The same worker has the same public name, and the
/// worker logs both at start.
pub fn public_name(worker: &str) -> String {
    let digest = Sha256::digest(worker.as_bytes());
    format!("worker-{}", hex::encode(&digest[..6]))
}

/// Advisory lock key of maintenance ("conveyor" in ASCII, shortened).
pub const LOCK_KEY: i64 = 0x636f6e7665796f;

/// The `application_name` of the leader's lock connection.
pub fn application_name(worker: &str) -> String {
    format!("{APPLICATION_PREFIX}{worker}")
}

const APPLICATION_PREFIX: &str = "conveyor maintenance ";

/// The name of the worker leading maintenance now, if any. Read from `pg_locks`: a leader that
/// died has no session, so it holds no lock, whatever its row in `workers` says.
pub async fn current(pool: &PgPool) -> sqlx::Result<Option<String>> {
    let name: Option<String> = sqlx::query_scalar(
        // A bigint key is split into classid (high 32 bits) and objid (low), objsubid 1.
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND (l.classid::bigint << 32 | l.objid::bigint) = $1",
    )
    .bind(LOCK_KEY)
    .fetch_optional(pool)
    .await?;
    Ok(name.and_then(|n| n.strip_prefix(APPLICATION_PREFIX).map(str::to_owned)))
}
