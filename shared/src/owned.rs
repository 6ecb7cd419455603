//! A tenant's own rows, by id: the reads and deletes every tenant-owned table shares. Each
//! statement is scoped by `tenant_id`, so another tenant's id reads exactly as a missing one.

use sqlx::{postgres::PgRow, FromRow, PgExecutor};
use uuid::Uuid;

/// A table of rows keyed by `(tenant_id, id)`, with time-ordered (v7) ids. Its name and
/// columns are constants of ours, never input.
#[derive(Clone, Copy, Debug)]
pub struct Owned {
    table: &'static str,
    columns: &'static str,
}

impl Owned {
    pub const fn new(table: &'static str, columns: &'static str) -> Self {
        Self { table, columns }
    }

    /// The tenant's row of this id.
    pub async fn get<T>(
        &self,
        db: impl PgExecutor<'_>,
        tenant: Uuid,
        id: Uuid,
    ) -> sqlx::Result<Option<T>>
    where
        T: for<'r> FromRow<'r, PgRow> + Send + Unpin,
    {
        let Self { table, columns } = self;
        sqlx::query_as(&format!(
            "SELECT {columns} FROM {table} WHERE tenant_id = $1 AND id = $2"
        ))
        .bind(tenant)
        .bind(id)
        .fetch_optional(db)
        .await
    }

    /// Newest first: at most `limit` rows older than `cursor` (from the start without one).
    pub async fn page<T>(
        &self,
        pool: &sqlx::PgPool,
        tenant: Uuid,
        cursor: Option<Uuid>,
        limit: i64,
        budget: usize,
    ) -> sqlx::Result<crate::pages::Page<T>>
    where
        T: for<'r> FromRow<'r, PgRow> + Send + Unpin,
    {
        let Self { table, columns } = self;
        let sql = format!(
            "SELECT {columns} FROM {table} WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id < $2)
             ORDER BY id DESC LIMIT $3"
        );
        let query = sqlx::query(&sql).bind(tenant).bind(cursor).bind(limit);
        crate::pages::read(pool, query, budget).await
    }

    /// Deletes the tenant's row of this id; false when the tenant has none.
    pub async fn delete(
        &self,
        db: impl PgExecutor<'_>,
        tenant: Uuid,
        id: Uuid,
    ) -> sqlx::Result<bool> {
        let deleted = sqlx::query(&format!(
            "DELETE FROM {} WHERE tenant_id = $1 AND id = $2",
            self.table
        ))
        .bind(tenant)
        .bind(id)
        .execute(db)
        .await?;
        Ok(deleted.rows_affected() == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestDatabase;

    #[derive(sqlx::FromRow, Debug, PartialEq)]
    struct Row {
        id: Uuid,
        name: String,
    }

    #[tokio::test]
    async fn a_tenant_reads_pages_and_deletes_only_its_own_rows() {
        let db = TestDatabase::new().await;
        let (tenant, other) = (db.tenant().await, db.tenant().await);
        sqlx::query(
            "CREATE TABLE things (id uuid PRIMARY KEY, tenant_id uuid NOT NULL, name text)",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        let mut ids = Vec::new();
        for (owner, name) in [(tenant, "a"), (other, "b"), (tenant, "c"), (tenant, "d")] {
            let id = Uuid::now_v7();
            sqlx::query("INSERT INTO things VALUES ($1, $2, $3)")
                .bind(id)
                .bind(owner)
                .bind(name)
                .execute(&db.pool)
                .await
                .unwrap();
            ids.push(id);
        }
        let things = Owned::new("things", "id, name");

        let got: Option<Row> = things.get(&db.pool, tenant, ids[0]).await.unwrap();
        assert_eq!(got.map(|r| r.name).as_deref(), Some("a"));
        let foreign: Option<Row> = things.get(&db.pool, tenant, ids[1]).await.unwrap();
        assert!(foreign.is_none(), "another tenant's id reads as missing");

        let first: Vec<Row> = things
            .page(&db.pool, tenant, None, 2, 1 << 20)
            .await
            .unwrap()
            .items;
        let names: Vec<&str> = first.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["d", "c"], "newest first, the tenant's only");
        let rest: Vec<Row> = things
            .page(&db.pool, tenant, Some(first[1].id), 2, 1 << 20)
            .await
            .unwrap()
            .items;
        assert_eq!(
            rest.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["a"]
        );

        assert!(!things.delete(&db.pool, tenant, ids[1]).await.unwrap());
        let kept: Option<Row> = things.get(&db.pool, other, ids[1]).await.unwrap();
        assert!(kept.is_some(), "a foreign delete changes nothing");
        assert!(things.delete(&db.pool, tenant, ids[0]).await.unwrap());
        assert!(!things.delete(&db.pool, tenant, ids[0]).await.unwrap());
    }
}
