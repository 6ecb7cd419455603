//! Stored files whose rows are gone: a deleted dataset's or saved model's, or one whose row
//! was never recorded (an upload or a job's output refused by a quota). Each is marked in
//! the database before its file is touched, so that a store that fails, or a process that
//! stops, leaves a mark for the worker's object-deletes duty rather than a file no route shows
//! and no quota counts.

use sqlx::{PgConnection, PgPool};
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
         ON CONFLICT (kind, id) DO NOTHING",
    )
    .bind(owner.name())
    .bind(id)
    .bind(tenant)
    .execute(conn)
    .await?;
    Ok(())
}

/// Takes back the mark of a file stored again under the same id (a retried job's output), in
/// the transaction that records it: the duty would delete the new file.
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
pub async fn delete_marked(
    pool: &PgPool,
    objects: &ObjectStore,
    tenant: Uuid,
    owner: Owner,
    id: Uuid,
) {
    let deleted = async {
        delete_file(objects, tenant, owner, id).await?;
        unmark(&mut *pool.acquire().await?, owner, id).await?;
        anyhow::Ok(())
    };
    if let Err(e) = deleted.await {
        tracing::warn!(%id, owner = owner.name(), error = %e, "a stored file was not removed: the object-deletes duty tries again");
    }
}

/// Marks and deletes at once the file of a row that was never recorded.
pub async fn discard(pool: &PgPool, objects: &ObjectStore, tenant: Uuid, owner: Owner, id: Uuid) {
    match pool.acquire().await {
        Ok(mut conn) => {
            if let Err(e) = mark(&mut conn, tenant, owner, id).await {
                tracing::warn!(%id, error = %e, "a discarded file was not marked");
            }
        }
        Err(e) => tracing::warn!(%id, error = %e, "a discarded file was not marked"),
    }
    delete_marked(pool, objects, tenant, owner, id).await;
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
    let timeout = objects.delete_timeout();
    tokio::time::timeout(timeout, deleting)
        .await
        .map_err(|_| DeleteTimedOut(timeout))?
}

/// Deletes the files of up to `batch` marks that are due, each mark put off (by a minute,
/// doubling to an hour an attempt) before its file is touched, so that no lock is held across
/// the store; a deleted file's mark goes. A deletion that times out ends the batch (a store
/// that does not answer would hold it for the timeout a file). How many marks were due.
pub async fn delete_due(pool: &PgPool, objects: &ObjectStore, batch: i64) -> sqlx::Result<usize> {
    let due: Vec<(String, Uuid, Uuid)> = sqlx::query_as(
        "UPDATE object_deletes o
         SET attempts = attempts + 1,
             due_at = now() + least(interval '1 hour', interval '1 minute' * 2 ^ least(attempts, 6))
         FROM (SELECT kind, id FROM object_deletes WHERE due_at <= now()
               ORDER BY due_at LIMIT $1 FOR UPDATE SKIP LOCKED) d
         WHERE o.kind = d.kind AND o.id = d.id
         RETURNING o.kind, o.id, o.tenant_id",
    )
    .bind(batch)
    .fetch_all(pool)
    .await?;
    for (kind, id, tenant) in &due {
        let Some(owner) = Owner::parse(kind) else {
            continue;
        };
        match delete_file(objects, *tenant, owner, *id).await {
            Ok(()) => unmark(&mut *pool.acquire().await?, owner, *id).await?,
            Err(e) => {
                tracing::warn!(%id, owner = kind.as_str(), error = %e, "a stored file was not removed; tried again later");
                if e.is::<DeleteTimedOut>() {
                    break;
                }
            }
        }
    }
    Ok(due.len())
}
