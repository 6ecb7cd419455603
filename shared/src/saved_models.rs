//! Saved models: synthesizers a `synthesis` job fitted with `save_model: true`, which `sample`
//! jobs draw rows from without refitting. The row describes the model; the serialized model
//! is an object of the tenant in the store (`ObjectStore::put_model`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{owned::Owned, store::storable_json as storable};

const MODELS: Owned = Owned::new("models", "*");

/// One column a model generates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelColumn {
    pub name: String,
    /// The column's type in the training data (polars' name: `i64`, `f64`, `str`, `date`...).
    #[serde(rename = "type")]
    pub data_type: String,
    /// `numerical`, `datetime`, `categorical` (learned) or `identifier` (fresh values).
    pub role: String,
    /// The values a categorical column can take (`null` for missing): what a `sample` job's
    /// conditions may ask for. Absent for other columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub levels: Option<Vec<serde_json::Value>>,
    /// The column can generate values `levels` does not list: it lists at most
    /// [`MAX_SHOWN_LEVELS`], each at most [`MAX_SHOWN_LEVEL_BYTES`] as JSON (the model's row is
    /// read whole by every list, read and sample submission). A condition on a value not
    /// listed is checked when the job runs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more_levels: bool,
}

/// The most levels a column of a model's schema lists.
pub const MAX_SHOWN_LEVELS: usize = 1000;
/// The longest level, as JSON, a column of a model's schema lists.
pub const MAX_SHOWN_LEVEL_BYTES: usize = 256;

impl ModelColumn {
    /// The column with `levels`: as many as the schema may list, and whether it left some out.
    pub fn with_levels(mut self, levels: impl IntoIterator<Item = serde_json::Value>) -> Self {
        let mut shown = Vec::new();
        for level in levels {
            let fits = level.to_string().len() <= MAX_SHOWN_LEVEL_BYTES;
            if fits && shown.len() < MAX_SHOWN_LEVELS {
                shown.push(level);
            } else {
                self.more_levels = true;
            }
        }
        self.levels = Some(shown);
        self
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct SavedModel {
    pub id: Uuid,
    #[serde(skip)]
    pub tenant_id: Uuid,
    pub name: String,
    /// 1 for the first model of this name, counting up.
    pub version: i32,
    pub synthesizer: String,
    #[schema(value_type = Vec<ModelColumn>)]
    pub schema: sqlx::types::Json<Vec<ModelColumn>>,
    /// Rows the model was fitted on (the holdout excluded).
    pub training_rows: i64,
    /// The fitting job's quality report.
    #[schema(value_type = Object)]
    pub quality: sqlx::types::Json<serde_json::Value>,
    /// The fitting job's privacy report (distances, membership inference, ε accounting).
    #[schema(value_type = Object)]
    pub privacy: sqlx::types::Json<serde_json::Value>,
    /// ε of a differentially private fit; absent otherwise.
    pub epsilon_spent: Option<f64>,
    /// Exactly which real values the stored model holds.
    pub description: String,
    /// The synthesis job that fitted it.
    pub job_id: Uuid,
    #[serde(skip)]
    pub object_key: String,
    /// Size of the serialized model.
    pub size_bytes: i64,
    pub created_at: DateTime<Utc>,
}

/// Records the model, numbering it after the tenant's models of the same name, if its file
/// fits the tenant's `max_dataset_bytes` (which counts models with datasets); the refusal if
/// not. A second call with the same id (a retried job, whose attempt replaced the file)
/// describes the new file, keeping the name and version.
pub async fn record(
    pool: &PgPool,
    model: &SavedModel,
) -> sqlx::Result<Result<SavedModel, crate::quotas::OverQuota>> {
    let tenant = model.tenant_id;
    let mut tx = pool.begin().await?;
    // Models of one name are numbered one at a time: two saved together both read the same
    // highest version, and the second failed on the unique (tenant, name, version). The lock
    // is in a class of its own (a tenant's name cannot hash onto another lock's key), and
    // waited on at most as long as a tenant's row is.
    sqlx::query("SELECT set_config('lock_timeout', '5s', true)")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2::text || '/' || $3))")
        .bind(NUMBERING_LOCK_CLASS)
        .bind(tenant)
        .bind(&model.name)
        .execute(&mut *tx)
        .await?;
    if let Err(over) = room_in(&mut tx, model).await? {
        return Ok(Err(over));
    }
    insert(&mut tx, model).await?;
    // A retried job's model, stored again under the id an earlier refusal marked.
    crate::object_deletes::unmark(&mut tx, crate::object_deletes::Owner::Model, model.id).await?;
    let recorded = MODELS.get(&mut *tx, tenant, model.id).await?;
    tx.commit().await?;
    recorded.map(Ok).ok_or(sqlx::Error::RowNotFound)
}

/// The advisory lock class (`'mdls'`) under which a name's models are numbered.
const NUMBERING_LOCK_CLASS: i32 = 0x6d64_6c73;

/// Whether `model` fits its tenant's `max_dataset_bytes`, without recording it: a fit checks
/// before it stores the file (a retried attempt's refusal then leaves the earlier attempt's
/// file and record as they were). [`record`] checks again.
pub async fn fits(
    pool: &PgPool,
    model: &SavedModel,
) -> sqlx::Result<Result<(), crate::quotas::OverQuota>> {
    let mut tx = pool.begin().await?;
    room_in(&mut tx, model).await
}

/// The room check of `model` in `tx` (its tenant's row held to the end of `tx`). A model that
/// replaces its own earlier record (a retried attempt's: the same fit, a few bytes either way,
/// and maybe already published) always fits.
async fn room_in(
    tx: &mut sqlx::PgConnection,
    model: &SavedModel,
) -> sqlx::Result<Result<(), crate::quotas::OverQuota>> {
    let limit = crate::quotas::Quotas::of(&mut *tx, model.tenant_id)
        .await?
        .max_dataset_bytes;
    let replaced: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(size_bytes), 0)::int8 FROM models WHERE id = $1")
            .bind(model.id)
            .fetch_one(&mut *tx)
            .await?;
    if replaced > 0 {
        return Ok(Ok(()));
    }
    crate::quotas::hold_dataset_room(tx, model.tenant_id, limit, model.size_bytes as u64).await
}

async fn insert(conn: &mut sqlx::PgConnection, model: &SavedModel) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO models (id, tenant_id, name, version, synthesizer, schema, training_rows,
                             quality, privacy, epsilon_spent, description, job_id, object_key,
                             size_bytes)
         SELECT $1, $2, $3, COALESCE(MAX(version), 0) + 1, $4, $5, $6, $7, $8, $9, $10, $11,
                $12, $13
         FROM models WHERE tenant_id = $2 AND name = $3
         ON CONFLICT (id) DO UPDATE SET
             synthesizer = excluded.synthesizer, schema = excluded.schema,
             training_rows = excluded.training_rows, quality = excluded.quality,
             privacy = excluded.privacy, epsilon_spent = excluded.epsilon_spent,
             description = excluded.description, object_key = excluded.object_key,
             size_bytes = excluded.size_bytes",
    )
    .bind(model.id)
    .bind(model.tenant_id)
    .bind(&model.name)
    .bind(&model.synthesizer)
    .bind(storable(&model.schema.0))
    .bind(model.training_rows)
    .bind(storable(&model.quality.0))
    .bind(storable(&model.privacy.0))
    .bind(model.epsilon_spent)
    .bind(crate::store::storable_text(&model.description))
    .bind(model.job_id)
    .bind(&model.object_key)
    .bind(model.size_bytes)
    .execute(conn)
    .await?;
    Ok(())
}

/// The tenant's model; another tenant's id reads as missing.
pub async fn get(pool: &PgPool, tenant: Uuid, id: Uuid) -> sqlx::Result<Option<SavedModel>> {
    MODELS.get(pool, tenant, id).await
}

/// Newest first, `limit` after `cursor`.
pub async fn list(
    pool: &PgPool,
    tenant: Uuid,
    cursor: Option<Uuid>,
    limit: i64,
    budget: usize,
) -> sqlx::Result<crate::pages::Page<SavedModel>> {
    MODELS.page(pool, tenant, cursor, limit, budget).await
}

/// Deletes the tenant's model row; false when it has none of that id.
pub async fn delete(pool: impl sqlx::PgExecutor<'_>, tenant: Uuid, id: Uuid) -> sqlx::Result<bool> {
    MODELS.delete(pool, tenant, id).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestDatabase;
    use serde_json::json;

    /// A schema lists at most 1,000 short levels a column: every level of a categorical of
    /// millions of values, or of megabyte labels, went into the row every list and sample
    /// submission reads whole.
    #[test]
    fn a_column_lists_a_bounded_share_of_its_levels() {
        let column = || ModelColumn {
            name: "c".into(),
            data_type: "str".into(),
            role: "categorical".into(),
            levels: None,
            more_levels: false,
        };
        let few = column().with_levels([json!("a"), json!("b")]);
        assert_eq!(few.levels.as_deref(), Some(&[json!("a"), json!("b")][..]));
        assert!(!few.more_levels);
        let many = column().with_levels((0..5000).map(|n| json!(n)));
        assert_eq!(many.levels.as_ref().map(Vec::len), Some(MAX_SHOWN_LEVELS));
        assert!(many.more_levels);
        let long = column().with_levels([json!("x".repeat(300)), json!("short")]);
        assert_eq!(long.levels.as_deref(), Some(&[json!("short")][..]));
        assert!(long.more_levels);
        // Listed as before when whole; the flag only when set.
        let shown = serde_json::to_value(&few).unwrap();
        assert!(shown.get("more_levels").is_none(), "{shown}");
    }

    /// A retried fit replaced the model's file, but its record kept describing the first
    /// attempt's (its privacy report, size, schema): it describes the file now, and keeps its
    /// name and version.
    #[tokio::test]
    async fn a_retried_fit_records_the_model_it_saved() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        let first = SavedModel {
            id: Uuid::new_v4(),
            tenant_id: tenant,
            name: "people".into(),
            version: 0,
            synthesizer: "copula".into(),
            schema: sqlx::types::Json(Vec::new()),
            training_rows: 100,
            quality: sqlx::types::Json(serde_json::json!({"score": 0.9})),
            privacy: sqlx::types::Json(serde_json::json!({"epsilon_spent": 1.0})),
            epsilon_spent: Some(1.0),
            description: "first".into(),
            job_id: Uuid::new_v4(),
            object_key: "models/first".into(),
            size_bytes: 10,
            created_at: Utc::now(),
        };
        let record = async |model: &SavedModel| record(&db.pool, model).await.unwrap().unwrap();
        assert_eq!(record(&first).await.version, 1);
        let retried = SavedModel {
            privacy: sqlx::types::Json(serde_json::json!({"epsilon_spent": 1.0, "dcr": 2})),
            description: "second".into(),
            size_bytes: 20,
            ..first.clone()
        };
        let recorded = record(&retried).await;
        assert_eq!(
            (
                recorded.version,
                recorded.size_bytes,
                recorded.description.as_str()
            ),
            (1, 20, "second")
        );
        assert_eq!(recorded.privacy.0["dcr"], 2);
    }

    fn model(tenant: Uuid, name: &str, size_bytes: i64) -> SavedModel {
        SavedModel {
            id: Uuid::new_v4(),
            tenant_id: tenant,
            name: name.into(),
            version: 0,
            synthesizer: "copula".into(),
            schema: sqlx::types::Json(Vec::new()),
            training_rows: 1,
            quality: sqlx::types::Json(serde_json::json!({})),
            privacy: sqlx::types::Json(serde_json::json!({})),
            epsilon_spent: None,
            description: String::new(),
            job_id: Uuid::new_v4(),
            object_key: "models/x".into(),
            size_bytes,
            created_at: Utc::now(),
        }
    }

    /// Models saved together under one name are numbered one after another: the second of
    /// two that read the same highest version failed on the unique version, and the tenant
    /// read PostgreSQL's text.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn models_saved_together_under_one_name_each_get_a_version() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        let saves: Vec<_> = (0..32)
            .map(|_| {
                let (pool, model) = (db.pool.clone(), model(tenant, "people", 1));
                tokio::spawn(async move { record(&pool, &model).await })
            })
            .collect();
        let mut versions: Vec<i32> = Vec::new();
        for save in saves {
            versions.push(save.await.unwrap().unwrap().unwrap().version);
        }
        versions.sort_unstable();
        assert_eq!(versions, (1..=32).collect::<Vec<_>>());
    }

    /// A model counts toward `max_dataset_bytes` as a dataset does: saving one past it is
    /// refused, recording nothing; a model's file had no bound at all.
    #[tokio::test]
    async fn a_model_past_the_dataset_bytes_quota_is_refused() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        sqlx::query("INSERT INTO tenant_limits (tenant_id, max_dataset_bytes) VALUES ($1, 100)")
            .bind(tenant)
            .execute(&db.pool)
            .await
            .unwrap();
        let first = model(tenant, "people", 60);
        record(&db.pool, &first).await.unwrap().unwrap();
        let used = crate::quotas::dataset_bytes(&db.pool, tenant)
            .await
            .unwrap();
        assert_eq!(used, 60);
        // Its own retry replaces it, and is not counted twice.
        let retried = SavedModel {
            size_bytes: 70,
            ..first.clone()
        };
        record(&db.pool, &retried).await.unwrap().unwrap();
        let over = record(&db.pool, &model(tenant, "people", 40))
            .await
            .unwrap();
        assert_eq!(over.unwrap_err().quota, "max_dataset_bytes");
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM models WHERE tenant_id = $1")
            .bind(tenant)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(count, 1);
        // A limit lowered below what the tenant holds refuses no retry of a recorded model
        // (maybe published already; a differentially private fit's size differs a little each
        // time), a new model it does.
        sqlx::query("UPDATE tenant_limits SET max_dataset_bytes = 10 WHERE tenant_id = $1")
            .bind(tenant)
            .execute(&db.pool)
            .await
            .unwrap();
        assert!(fits(&db.pool, &retried).await.unwrap().is_ok());
        record(&db.pool, &retried).await.unwrap().unwrap();
        let bigger = SavedModel {
            size_bytes: 80,
            ..retried.clone()
        };
        assert!(fits(&db.pool, &bigger).await.unwrap().is_ok());
        let another = model(tenant, "people", 1);
        assert!(fits(&db.pool, &another).await.unwrap().is_err());
    }

    /// Models saved before lists were bounded are trimmed by the migration the same way
    /// [`ModelColumn::with_levels`] bounds new ones.
    #[tokio::test]
    async fn the_migration_trims_the_levels_of_models_saved_before() {
        let db = TestDatabase::new().await;
        let tenant = db.tenant().await;
        let column = |name: &str, levels: Vec<serde_json::Value>| ModelColumn {
            name: name.into(),
            data_type: "str".into(),
            role: "categorical".into(),
            levels: Some(levels),
            more_levels: false,
        };
        let many: Vec<_> = (0..1500).map(|n| json!(format!("v{n}"))).collect();
        let long = vec![json!("x".repeat(300)), json!("short")];
        let few = vec![json!("a"), json!("b")];
        let old = SavedModel {
            schema: sqlx::types::Json(vec![
                column("many", many.clone()),
                column("long", long.clone()),
                column("few", few.clone()),
            ]),
            ..model(tenant, "people", 1)
        };
        // As it was stored: every level.
        insert(&mut db.pool.acquire().await.unwrap(), &old)
            .await
            .unwrap();
        sqlx::raw_sql(include_str!(
            "../../migrations/20261224000004_model_levels_bounded.sql"
        ))
        .execute(&db.pool)
        .await
        .unwrap();
        let trimmed = get(&db.pool, tenant, old.id)
            .await
            .unwrap()
            .unwrap()
            .schema
            .0;
        let expected: Vec<ModelColumn> = [("many", many), ("long", long), ("few", few)]
            .into_iter()
            .map(|(name, levels)| column(name, Vec::new()).with_levels(levels))
            .collect();
        assert_eq!(trimmed, expected);
        assert!(trimmed[0].more_levels && trimmed[1].more_levels && !trimmed[2].more_levels);
    }
}
