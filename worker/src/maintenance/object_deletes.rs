//! Stored files whose rows are gone and whose removal failed where it was made (the store
//! down, the process stopped): removed here, each tried again later while the store fails
//! (see [`shared::object_deletes`]).

use std::time::Duration;

use super::{Duty, Schedule};
use crate::Runtime;

pub(crate) struct ObjectDeletes {
    pub schedule: Schedule,
}

impl Default for ObjectDeletes {
    /// Every minute, 100 files at a time.
    fn default() -> Self {
        Self {
            schedule: Schedule {
                name: "object deletes",
                interval: Duration::from_secs(60),
                batch: 100,
            },
        }
    }
}

#[async_trait::async_trait]
impl Duty for ObjectDeletes {
    fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// One batch a run: marks are few (most files go where they are deleted), and a store
    /// that fails should not be asked for every mark at once.
    async fn run(&self, runtime: &Runtime) -> anyhow::Result<usize> {
        let (pool, objects) = (runtime.pool(), runtime.objects());
        Ok(shared::object_deletes::delete_due(pool, objects, self.schedule.batch).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maintenance::test_support::TestDb;
    use shared::object_deletes::{mark, Owner};
    use uuid::Uuid;

    /// A marked file is removed with its mark; a mark put off (its last try failed a moment
    /// ago) waits for its time, its file kept until then.
    #[tokio::test]
    async fn marked_files_are_removed_when_due() {
        let test = TestDb::new().await;
        let objects = test.runtime.objects();
        let (due, later) = (Uuid::now_v7(), Uuid::now_v7());
        for model in [due, later] {
            objects
                .put_model(test.tenant, model, b"weights")
                .await
                .unwrap();
            mark(
                &mut test.pool().acquire().await.unwrap(),
                test.tenant,
                Owner::Model,
                model,
            )
            .await
            .unwrap();
        }
        sqlx::query("UPDATE object_deletes SET due_at = now() + interval '1 minute' WHERE id = $1")
            .bind(later)
            .execute(test.pool())
            .await
            .unwrap();

        assert_eq!(
            ObjectDeletes::default().run(&test.runtime).await.unwrap(),
            1
        );
        assert!(objects
            .read_model(test.tenant, due)
            .await
            .unwrap()
            .is_none());
        assert!(objects
            .read_model(test.tenant, later)
            .await
            .unwrap()
            .is_some());
        let marks: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM object_deletes")
            .fetch_all(test.pool())
            .await
            .unwrap();
        assert_eq!(marks, [later]);
    }

    /// A retried job storing its output again under an id marked for deletion holds the mark
    /// first: the duty passes it over, and the new file stays. Without the hold, the duty
    /// deleted the file the retry had just stored (its record then named no file).
    #[tokio::test]
    async fn a_file_stored_again_under_a_marked_id_is_kept() {
        let test = TestDb::new().await;
        let objects = test.runtime.objects();
        let model = Uuid::now_v7();
        let mut conn = test.pool().acquire().await.unwrap();
        mark(&mut conn, test.tenant, Owner::Model, model)
            .await
            .unwrap();
        shared::object_deletes::hold(test.pool(), test.tenant, Owner::Model, model)
            .await
            .unwrap();
        objects
            .put_model(test.tenant, model, b"again")
            .await
            .unwrap();

        assert_eq!(
            ObjectDeletes::default().run(&test.runtime).await.unwrap(),
            0
        );
        let kept = objects.read_model(test.tenant, model).await.unwrap();
        assert_eq!(kept.as_deref(), Some(&b"again"[..]));
        // Recorded, the mark goes; a writer that stopped before that leaves it due in an hour.
        let due_in: f64 = sqlx::query_scalar(
            "SELECT extract(epoch FROM due_at - now())::float8 FROM object_deletes WHERE id = $1",
        )
        .bind(model)
        .fetch_one(test.pool())
        .await
        .unwrap();
        assert!(due_in > 3000.0, "{due_in}");
    }
}
