//! The seeds of private syntheses' noise, one per job: every attempt of a job draws the same
//! noise for the same rows, so a retry releases what the first attempt did rather than the
//! same private data again with other noise (see the migration `noise_seeds`).

use sqlx::PgPool;
use uuid::Uuid;

/// The rows of a job's first private fit and those of a later attempt differ: the same noise
/// over both would tell their difference exactly.
#[derive(Debug, PartialEq, Eq)]
pub struct OtherRows;

/// The noise seed of `job`'s private fit over the dataset whose file hashes to
/// `dataset_sha256`: the one an earlier attempt stored, else `fresh`, stored now.
pub async fn seed_for(
    pool: &PgPool,
    job: Uuid,
    dataset_sha256: &str,
    fresh: [u8; 32],
) -> sqlx::Result<Result<[u8; 32], OtherRows>> {
    // Two statements: an insert that met another attempt's row waits for its commit, which a
    // read in the same statement would not see.
    sqlx::query(
        "INSERT INTO noise_seeds (job_id, seed, dataset_sha256) VALUES ($1, $2, $3)
         ON CONFLICT (job_id) DO NOTHING",
    )
    .bind(job)
    .bind(&fresh[..])
    .bind(dataset_sha256)
    .execute(pool)
    .await?;
    let (seed, rows): (Vec<u8>, String) =
        sqlx::query_as("SELECT seed, dataset_sha256 FROM noise_seeds WHERE job_id = $1")
            .bind(job)
            .fetch_one(pool)
            .await?;
    if rows != dataset_sha256 {
        return Ok(Err(OtherRows));
    }
    let seed = seed
        .try_into()
        .map_err(|_| sqlx::Error::Decode("a noise seed is 32 bytes".into()))?;
    Ok(Ok(seed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestDatabase;

    /// The first attempt's seed is every later attempt's, for the same rows only; it goes with
    /// its job.
    #[tokio::test]
    async fn a_jobs_attempts_share_one_seed_for_one_table() {
        let db = TestDatabase::new().await;
        let pool = &db.pool;
        let tenant = Uuid::now_v7();
        let job = Uuid::now_v7();
        sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, 'acme')")
            .bind(tenant)
            .execute(pool)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO jobs (id, tenant_id, kind, status, payload)
             VALUES ($1, $2, 'synthesis', 'running', '{}')",
        )
        .bind(job)
        .bind(tenant)
        .execute(pool)
        .await
        .unwrap();
        let first = seed_for(pool, job, "abc", [1; 32]).await.unwrap();
        assert_eq!(first, Ok([1; 32]));
        let again = seed_for(pool, job, "abc", [2; 32]).await.unwrap();
        assert_eq!(again, Ok([1; 32]), "a retry drew fresh noise");
        let other = seed_for(pool, job, "def", [3; 32]).await.unwrap();
        assert_eq!(other, Err(OtherRows));
        sqlx::query("DELETE FROM jobs WHERE id = $1")
            .bind(job)
            .execute(pool)
            .await
            .unwrap();
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM noise_seeds")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(left, 0);
    }
}
