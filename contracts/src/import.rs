//! `import`: a dataset into a PostgreSQL table, streamed through `COPY` into a staging table,
//! then applied to the target in one transaction (create, append, replace or upsert). A failed,
//! cancelled or killed import leaves the target exactly as it was.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use shared::{connections::TargetError, FieldError};
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{Context, Contract, Refusal};

/// Names of the importer's staging tables (`conveyor_import_<job>`), refused as targets.
pub const STAGING_PREFIX: &str = "conveyor_import_";

/// Most rows an import skips (`on_error=skip`); past them it fails.
pub const MAX_ERRORS: u64 = 100_000;
/// Most strings `csv.null` may hold.
pub const MAX_NULL_STRINGS: usize = 16;
/// Most columns a file or a column list may have: what a PostgreSQL table holds.
pub const MAX_COLUMNS: usize = 1600;

/// The types a client may name in `columns[].type`.
pub const NAMED_TYPES: &[&str] = &[
    "boolean",
    "smallint",
    "integer",
    "bigint",
    "real",
    "double precision",
    "numeric",
    "date",
    "timestamp",
    "timestamptz",
    "uuid",
    "jsonb",
    "text",
];

pub struct Import;

#[async_trait]
impl Contract for Import {
    const KIND: &'static str = "import";
    type Payload = ImportPayload;
    type Output = ImportOutput;

    fn check(&self, payload: &ImportPayload) -> Result<(), Vec<FieldError>> {
        crate::refused(payload.check())
    }

    async fn preflight(
        &self,
        context: &Context,
        tenant: Uuid,
        payload: &ImportPayload,
    ) -> Result<(), Refusal> {
        let dataset = crate::table_dataset(&context.pool, tenant, payload.dataset_id).await?;
        let file_columns: Vec<String> = dataset.schema.iter().map(|c| c.name.clone()).collect();
        // Without a header the names are column_1...; the head was read with one, so count.
        let file_columns = if payload.csv.header {
            file_columns
        } else {
            (1..=file_columns.len())
                .map(|i| format!("column_{i}"))
                .collect()
        };
        if let Some(specs) = &payload.columns {
            for (i, spec) in specs.iter().enumerate() {
                if !file_columns.contains(&spec.source) {
                    return Err(Refusal::field(
                        format!("payload.columns[{i}].source"),
                        format!(
                            "the file has no column {:?}; it has: {}",
                            spec.source,
                            listed_names(&file_columns)
                        ),
                    ));
                }
            }
        }
        let target_columns = payload.target_columns(&file_columns);
        for (i, key) in payload.key_columns.iter().enumerate() {
            if !target_columns.contains(key) {
                return Err(Refusal::field(
                    format!("payload.key_columns[{i}]"),
                    format!("{key:?} is not a column of the file (after `columns`)"),
                ));
            }
        }
        let target = context
            .targets
            .target(tenant, payload.target.connection_id)
            .await
            .map_err(|e| match e {
                TargetError::RefusedConnection(_, reason) => {
                    Refusal::field("payload.target.connection_id", reason)
                }
                other => other.into(),
            })?;
        let schema = payload.schema_on(&target);
        if let Some(reason) = target.refuse_schema(schema) {
            return Err(Refusal::field("payload.target.schema", reason));
        }
        // The table's existence decides whether the mode makes sense; an unreachable target
        // is the worker's problem (it retries), not a reason to refuse the job.
        if let Ok(exists) = table_exists(&target.pool, schema, &payload.target.table).await {
            let table = format!("{schema}.{}", payload.target.table);
            match payload.mode {
                Mode::Create if exists => {
                    return Err(Refusal::field(
                        "payload.target.table",
                        format!("{table} exists; use mode append, replace or upsert"),
                    ))
                }
                Mode::Append | Mode::Upsert if !exists => {
                    return Err(Refusal::field(
                        "payload.target.table",
                        format!("{table} does not exist; use mode create"),
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

pub async fn table_exists(pool: &PgPool, schema: &str, table: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT to_regclass(format('%I.%I', $1::text, $2::text)) IS NOT NULL")
        .bind(schema)
        .bind(table)
        .fetch_one(pool)
        .await
}

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportPayload {
    pub dataset_id: Uuid,
    pub target: Target,
    #[serde(default)]
    pub mode: Mode,
    /// With `upsert`: the columns of the target's unique key.
    #[serde(default)]
    pub key_columns: Vec<String>,
    /// Select, rename and type columns; absent: every column of the file, as named there.
    pub columns: Option<Vec<ColumnSpec>>,
    #[serde(default)]
    pub csv: CsvOptions,
    #[serde(default)]
    pub on_error: OnError,
    /// With `on_error=skip`: fail once more rows than this are rejected (default 1,000).
    pub max_errors: Option<u64>,
}

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// A registered connection; absent: the default target database.
    pub connection_id: Option<Uuid>,
    /// Default: the tenant's own schema on the default target (the only one allowed there),
    /// `public` on a registered connection. Never a platform or system schema.
    pub schema: Option<String>,
    pub table: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// A new table with types inferred from the file; fails if it exists.
    #[default]
    Create,
    /// Adds the rows to an existing table.
    Append,
    /// Swaps in a new table with the file's rows (keeping the existing table's types).
    Replace,
    /// Inserts new rows and updates existing ones by `key_columns` (the last row of a key wins).
    Upsert,
}

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ColumnSpec {
    /// The column's name in the file.
    pub source: String,
    /// Its name in the table (default: `source`).
    pub name: Option<String>,
    /// Its type when the table is created: boolean, smallint, integer, bigint, real,
    /// double precision, numeric, date, timestamp, timestamptz, uuid, jsonb, text.
    #[serde(rename = "type")]
    pub data_type: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CsvOptions {
    /// One ASCII character; default `,` (tab for TSV datasets).
    pub delimiter: String,
    pub header: bool,
    pub quote: String,
    /// Field values read as NULL; default `[""]`.
    pub null: Vec<String>,
    pub encoding_errors: EncodingErrors,
}

impl Default for CsvOptions {
    fn default() -> Self {
        Self {
            delimiter: ",".into(),
            header: true,
            quote: "\"".into(),
            null: vec![String::new()],
            encoding_errors: EncodingErrors::Strict,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EncodingErrors {
    /// A field that is not UTF-8 is an error of its row.
    #[default]
    Strict,
    /// Invalid bytes become U+FFFD.
    Replace,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// The first bad row fails the import; the target is untouched.
    #[default]
    Abort,
    /// Bad rows go to the `rejected.csv` artifact; the others are imported.
    Skip,
}

pub const DEFAULT_MAX_ERRORS: u64 = 1000;

/// The most bytes of a PostgreSQL identifier (longer ones are cut, silently).
pub const MAX_NAME_BYTES: usize = 63;

/// A file's column name as an error shows it: cut after [`MAX_NAME_BYTES`] (a header name of
/// a megabyte was written into every rejected row's line).
pub fn shown_name(name: &str) -> std::borrow::Cow<'_, str> {
    if name.len() <= MAX_NAME_BYTES {
        return name.into();
    }
    let mut end = MAX_NAME_BYTES;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &name[..end], name.len()).into()
}

/// A file's column names as a refusal lists them: the first 50, each [`shown_name`] (a file's
/// header may hold 1,600 names of a megabyte).
fn listed_names(names: &[String]) -> String {
    let mut listed: Vec<String> = names
        .iter()
        .take(50)
        .map(|n| shown_name(n).into())
        .collect();
    if names.len() > 50 {
        listed.push(format!("and {} more", names.len() - 50));
    }
    listed.join(", ")
}

/// A PostgreSQL identifier the importer accepts: letters, digits, `_`, `$`, at most 63 bytes.
pub fn valid_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_NAME_BYTES
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
}

/// `"name"`, quoted for SQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl ImportPayload {
    pub fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut error = |field: &str, message: String| {
            errors.push(FieldError::new(format!("payload.{field}"), message))
        };
        if !valid_identifier(&self.target.table) {
            error(
                "target.table",
                "must be an identifier: a letter or _, then letters, digits, _ or $; at most 63 bytes".into(),
            );
        }
        if self.target.table.starts_with(STAGING_PREFIX) {
            error(
                "target.table",
                format!(
                    "names starting {} are the importer's staging tables",
                    STAGING_PREFIX
                ),
            );
        }
        if let Some(schema) = &self.target.schema {
            if !valid_identifier(schema) {
                error("target.schema", "must be an identifier".into());
            } else if shared::tenancy::is_reserved_schema(schema) {
                error(
                    "target.schema",
                    format!("{schema} is reserved for the platform and the system"),
                );
            }
        }
        match self.mode {
            Mode::Upsert if self.key_columns.is_empty() => {
                error("key_columns", "upsert needs at least one key column".into())
            }
            Mode::Create | Mode::Append | Mode::Replace if !self.key_columns.is_empty() => {
                error("key_columns", "only upsert takes key columns".into())
            }
            _ => {}
        }
        if self.max_errors.is_some() && self.on_error != OnError::Skip {
            error("max_errors", "only applies with on_error=skip".into());
        } else if self.max_errors.is_some_and(|max| max > MAX_ERRORS) {
            // Each rejected row is written to rejected.csv, at several times its size.
            error("max_errors", format!("must be at most {MAX_ERRORS}"));
        }
        if self.csv.null.len() > MAX_NULL_STRINGS {
            error(
                "csv.null",
                format!(
                    "holds at most {MAX_NULL_STRINGS} strings (each is checked on every field)"
                ),
            );
        }
        if self.columns.as_ref().is_some_and(|c| c.len() > MAX_COLUMNS) {
            error(
                "columns",
                format!("names at most {MAX_COLUMNS} columns, the most a PostgreSQL table holds"),
            );
        }
        for (field, value) in [
            ("csv.delimiter", &self.csv.delimiter),
            ("csv.quote", &self.csv.quote),
        ] {
            if value.len() != 1 || !value.is_ascii() || value == "\n" || value == "\r" {
                error(
                    field,
                    "must be one ASCII character other than a line break".into(),
                );
            }
        }
        if self.csv.delimiter == self.csv.quote {
            error("csv.quote", "must differ from the delimiter".into());
        }
        if let Some(columns) = &self.columns {
            if columns.is_empty() {
                error(
                    "columns",
                    "must name at least one column (or be absent)".into(),
                );
            }
            let mut names = std::collections::HashSet::new();
            for (i, column) in columns.iter().enumerate() {
                let name = column.name.as_deref().unwrap_or(&column.source);
                if !valid_identifier(name) {
                    error(
                        &format!("columns[{i}].name"),
                        format!("{name:?} is not an identifier"),
                    );
                } else if !names.insert(name.to_owned()) {
                    error(
                        &format!("columns[{i}].name"),
                        format!("{name:?} appears twice"),
                    );
                }
                if let Some(t) = &column.data_type {
                    if !NAMED_TYPES.contains(&t.to_ascii_lowercase().as_str()) {
                        error(
                            &format!("columns[{i}].type"),
                            format!(
                                "unknown type {t:?}; expected one of: {}",
                                NAMED_TYPES.join(", ")
                            ),
                        );
                    }
                }
            }
        }
        for (i, key) in self.key_columns.iter().enumerate() {
            if !valid_identifier(key) {
                error(
                    &format!("key_columns[{i}]"),
                    format!("{key:?} is not an identifier"),
                );
            }
        }
        errors
    }

    /// The schema named, or the target's default: the tenant's own schema on the default
    /// target, `public` on a registered connection.
    pub fn schema_on<'a>(&'a self, target: &'a shared::connections::Target) -> &'a str {
        self.target
            .schema
            .as_deref()
            .unwrap_or(target.default_schema())
    }

    /// Target column names, in file order, after `columns` selects and renames.
    pub fn target_columns(&self, file_columns: &[String]) -> Vec<String> {
        match &self.columns {
            Some(specs) => specs
                .iter()
                .map(|c| c.name.clone().unwrap_or_else(|| c.source.clone()))
                .collect(),
            None => file_columns.to_vec(),
        }
    }
}

/// An import's result.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ImportOutput {
    /// `schema.table`.
    pub table: String,
    pub mode: Mode,
    pub rows_read: u64,
    /// Rows that passed the checks and reached the staging table.
    pub rows_imported: u64,
    pub rows_rejected: u64,
    /// Rows the table gained or changed (an upsert's repeated keys count once).
    pub rows_applied: u64,
    /// The dataset's size.
    pub bytes: i64,
    pub columns: Vec<ImportedColumn>,
    /// `rejected.csv` when rows were rejected.
    pub artifacts: Vec<crate::Artifact>,
    pub duration_ms: u64,
    pub rows_per_sec: u64,
    pub outputs: TableOutputs,
}

/// A column of the table as the import wrote it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ImportedColumn {
    pub name: String,
    #[serde(rename = "type")]
    pub sql_type: String,
}

/// What a later step (a pipeline's, a patch) reads: the table the job wrote.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TableOutputs {
    pub table: String,
}

#[cfg(test)]
mod tests {
    use crate::Registry;
    use serde_json::{json, Value};

    const DATASET: &str = "0b9ab4e2-6a3c-4c36-9a0c-5d3f2f1b6a11";

    /// The fields refused in an import payload: `extra` merged into a valid one.
    fn refused(extra: Value) -> Vec<String> {
        let mut payload = json!({"dataset_id": DATASET, "target": {"table": "orders"}});
        for (key, value) in extra.as_object().unwrap() {
            payload[key] = value.clone();
        }
        match Registry::standard().validate("import", &payload) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.into_iter().map(|e| e.field).collect(),
        }
    }

    #[test]
    fn a_minimal_payload_is_valid_and_defaults_apply() {
        assert!(refused(json!({})).is_empty());
        let payload: super::ImportPayload =
            serde_json::from_value(json!({"dataset_id": DATASET, "target": {"table": "t"}}))
                .unwrap();
        assert_eq!(payload.mode, super::Mode::Create);
        assert_eq!(payload.csv.delimiter, ",");
        assert!(payload.csv.header);
        assert_eq!(payload.on_error, super::OnError::Abort);
    }

    #[test]
    fn each_bad_field_is_named() {
        for (extra, field) in [
            (json!({"target": {"table": "1bad"}}), "payload.target.table"),
            (
                json!({"target": {"table": "conveyor_import_x"}}),
                "payload.target.table",
            ),
            (
                json!({"target": {"table": "t", "schema": "pg_catalog"}}),
                "payload.target.schema",
            ),
            (
                json!({"target": {"table": "t", "schema": "conveyor"}}),
                "payload.target.schema",
            ),
            (json!({"mode": "upsert"}), "payload.key_columns"),
            (
                json!({"mode": "append", "key_columns": ["id"]}),
                "payload.key_columns",
            ),
            (json!({"max_errors": 5}), "payload.max_errors"),
            (
                json!({"on_error": "skip", "max_errors": super::MAX_ERRORS + 1}),
                "payload.max_errors",
            ),
            (json!({"csv": {"null": vec![""; 17]}}), "payload.csv.null"),
            (json!({"csv": {"delimiter": ";;"}}), "payload.csv.delimiter"),
            (json!({"csv": {"delimiter": "\n"}}), "payload.csv.delimiter"),
            (
                json!({"csv": {"delimiter": "'", "quote": "'"}}),
                "payload.csv.quote",
            ),
            (json!({"columns": []}), "payload.columns"),
            (
                json!({"columns": [{"source": "a", "type": "money"}]}),
                "payload.columns[0].type",
            ),
            (
                json!({"columns": [{"source": "a"}, {"source": "a"}]}),
                "payload.columns[1].name",
            ),
            (
                json!({"key_columns": ["x y"], "mode": "upsert"}),
                "payload.key_columns[0]",
            ),
            (json!({"mode": "merge"}), "payload.mode"),
            (json!({"bogus": 1}), "payload.bogus"),
        ] {
            let fields = refused(extra.clone());
            assert!(fields.iter().any(|f| f == field), "{extra}: {fields:?}");
        }
    }

    #[test]
    fn identifiers_are_plain_and_quoting_doubles_quotes() {
        assert!(super::valid_identifier("orders_2024"));
        assert!(super::valid_identifier("_x$1"));
        assert!(!super::valid_identifier("Orders Table"));
        assert!(!super::valid_identifier(&"a".repeat(64)));
        assert_eq!(super::quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
