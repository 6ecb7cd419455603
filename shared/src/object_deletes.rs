//! Stored files whose rows are gone: a deleted dataset's or saved model's, or one whose row
//! was never recorded (an upload or a job's output refused by a quota, a process stopped
//! between storing a file and recording it). Each is marked in the database, so that a store
//! that fails, or a process that stops, leaves a mark for the worker's object-deletes duty
//! rather than a file no route shows and no quota counts.
//!
//! The mark's row is the lock between a deleter and a writer of the same id (a retried job
//! stores its output again under its id): a deleter holds it while it deletes the file, and a
//! writer takes it ([`hold`]) before it stores one, waiting for a deletion under way and
//! putting the mark off past its own store, then takes it back ([`unmark`]) where it records
//! the file.

use sqlx::{PgConnection, PgPool};
use std::time::Duration;
use uuid::Uuid;

use crate::objects::{DeleteTimedOut, ObjectStore};

/// What a stored file belonged to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    Dataset,
    Model,
}

impl Owner {
    fn name(self) -> &'static str {
        match self {
            Self::Dataset => "dataset",
            Self::Model => "model",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        match name {
            "dataset" => Some(Self::Dataset),
            "model" => Some(Self::Model),
            _ => None,
        }
    }
}

/// How long a file being stored is kept from the duty: past any store of one file. A writer
/// that stopped before recording its file leaves the mark to fire then.
const WRITE_HOLD: &str = "1 hour";

/// Marks the file of the tenant's `owner` `id` for deletion, in the transaction that deletes
/// its row (or on its own, for a file whose row was never recorded).
pub async fn mark(
    conn: &mut PgConnection,
    tenant: Uuid,
    owner: Owner,
    id: Uuid,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO object_deletes (kind, id, tenant_id) VALUES ($1, $2, $3)
         ON CONFLICT (kind, id) DO UPDATE SET due_at = now(), attempts = 0",
    )
    .bind(owner.name())
    .bind(id)
    .bind(tenant)
    .execute(conn)
    .await?;
    Ok(())
}

/// Before a file is stored under `id`: waits for a deletion of it under way, and marks it to
/// go only past [`WRITE_HOLD`], so that a writer that stops before recording it leaves no
/// file for ever. [`unmark`], in the transaction that records the file, takes the mark back.
pub async fn hold(pool: &PgPool, tenant: Uuid, owner: Owner, id: Uuid) -> sqlx::Result<()> {
    sqlx::query(&format!(
        "INSERT INTO object_deletes (kind, id, tenant_id, due_at)
         VALUES ($1, $2, $3, now() + interval '{WRITE_HOLD}')
         ON CONFLICT (kind, id)
         DO UPDATE SET due_at = now() + interval '{WRITE_HOLD}', attempts = 0"
    ))
    .bind(owner.name())
    .bind(id)
    .bind(tenant)
    .execute(pool)
    .await?;
    Ok(())
}

/// Takes back the mark of a file recorded, in the transaction that records it.
pub async fn unmark(conn: &mut PgConnection, owner: Owner, id: Uuid) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM object_deletes WHERE kind = $1 AND id = $2")
        .bind(owner.name())
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Deletes a marked file now, within the store's delete timeout, and then its mark. A failure
/// is logged and leaves the mark to the duty.
pub async fn delete_marked(pool: &PgPool, objects: &ObjectStore, owner: Owner, id: Uuid) {
    if let Err(e) = delete_one(pool, objects, owner, id, false).await {
        tracing::warn!(%id, owner = owner.name(), error = %e, "a stored file was not removed: the object-deletes duty tries again");
    }
}

/// Marks and deletes at once the file of a row that was never recorded.
pub async fn discard(pool: &PgPool, objects: &ObjectStore, tenant: Uuid, owner: Owner, id: Uuid) {
    let marked = async { mark(&mut *pool.acquire().await?, tenant, owner, id).await };
    if let Err(e) = marked.await {
        tracing::warn!(%id, error = %e, "a discarded file was not marked");
        return;
    }
    delete_marked(pool, objects, owner, id).await;
}

/// Deletes the file of the mark `(owner, id)` if it is due, holding the mark's row meanwhile
/// (a writer of the same id waits); the mark goes with the file, or is put off (a minute,
/// doubling to an hour an attempt) when the store fails. `skip_locked`: pass over a mark
/// another deleter holds. Whether a due mark was found.
async fn delete_one(
    pool: &PgPool,
    objects: &ObjectStore,
    owner: Owner,
    id: Uuid,
    skip_locked: bool,
) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    let tenant: Option<Uuid> = sqlx::query_scalar(&format!(
        "SELECT tenant_id FROM object_deletes WHERE kind = $1 AND id = $2 AND due_at <= now()
         FOR UPDATE {}",
        if skip_locked { "SKIP LOCKED" } else { "" }
    ))
    .bind(owner.name())
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(tenant) = tenant else {
        return Ok(false);
    };
    let deleted = delete_file(objects, tenant, owner, id).await;
    let settled = match &deleted {
        Ok(()) => "DELETE FROM object_deletes WHERE kind = $1 AND id = $2",
        Err(_) => {
            "UPDATE object_deletes SET attempts = attempts + 1,
                 due_at = now() + least(interval '1 hour',
                                        interval '1 minute' * 2 ^ least(attempts, 6))
             WHERE kind = $1 AND id = $2"
        }
    };
    sqlx::query(settled)
        .bind(owner.name())
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    deleted.map(|()| true)
}

async fn delete_file(
    objects: &ObjectStore,
    tenant: Uuid,
    owner: Owner,
    id: Uuid,
) -> anyhow::Result<()> {
    let deleting = async {
        match owner {
            Owner::Dataset => objects.delete_dataset(tenant, id).await,
            Owner::Model => objects.delete_model(tenant, id).await,
        }
    };
    let timeout: Duration = objects.delete_timeout();
    tokio::time::timeout(timeout, deleting)
        .await
        .map_err(|_| DeleteTimedOut(timeout))?
}

/// Deletes the files of up to `batch` due marks, one at a time, each mark's row held while its
/// file is deleted (at most the store's delete timeout). A deletion that times out ends the
/// batch (a store that does not answer would hold it for the timeout a file). How many marks
/// were due.
pub async fn delete_due(pool: &PgPool, objects: &ObjectStore, batch: i64) -> sqlx::Result<usize> {
    let due: Vec<(String, Uuid)> = sqlx::query_as(
        "SELECT kind, id FROM object_deletes WHERE due_at <= now() ORDER BY due_at LIMIT $1",
    )
    .bind(batch)
    .fetch_all(pool)
    .await?;
    for (kind, id) in &due {
        let Some(owner) = Owner::parse(kind) else {
            continue;
        };
        if let Err(e) = delete_one(pool, objects, owner, *id, true).await {
            tracing::warn!(%id, owner = kind.as_str(), error = %e, "a stored file was not removed; tried again later");
            if e.is::<DeleteTimedOut>() {
                break;
            }
        }
    }
    Ok(due.len())
}
