//! What the target database's catalog says about the patched table: its real name, the key a
//! patch walks, its columns. And the SQL text pieces built from them.

use sqlx::{PgPool, Row};

/// A column of the patched table.
#[derive(Clone, Debug)]
pub struct Column {
    pub name: String,
    /// `format_type`, e.g. `bigint`, `character varying(20)`.
    pub type_name: String,
    /// Computed by the database (`GENERATED ... STORED`): never written back.
    pub generated: bool,
    /// `GENERATED ALWAYS AS IDENTITY`: cannot be assigned by an UPDATE.
    pub identity_always: bool,
}

#[derive(Clone, Debug)]
pub struct Table {
    pub schema: String,
    pub name: String,
    /// `"schema"."name"`.
    pub qualified: String,
    /// The primary key, or else the narrowest unique index over NOT NULL columns.
    pub key: Vec<Column>,
    /// `primary key` or `unique index <name>`.
    pub key_source: String,
    pub columns: Vec<Column>,
    /// The planner's row count (`pg_class.reltuples`; -1 when never analysed).
    pub estimated_rows: f64,
    /// Foreign keys of other tables that act on this one's deletes or updates (`CASCADE`,
    /// `SET NULL`, `SET DEFAULT`): what they change is in no snapshot.
    pub referenced_by: Vec<Reference>,
}

/// A foreign key of another table onto this one, with the actions it takes.
#[derive(Clone, Debug)]
pub struct Reference {
    /// The referencing table, as PostgreSQL names it.
    pub child: String,
    /// This table's columns it references.
    pub columns: Vec<String>,
    /// What a delete or update here does there: `CASCADE`, `SET NULL`, `SET DEFAULT`, or
    /// None for no action (a restricting key refuses the change itself).
    pub on_delete: Option<&'static str>,
    pub on_update: Option<&'static str>,
}

/// A foreign key's action code (`pg_constraint.confdeltype`) that changes other rows.
fn acting(code: &str) -> Option<&'static str> {
    match code {
        "c" => Some("CASCADE"),
        "n" => Some("SET NULL"),
        "d" => Some("SET DEFAULT"),
        _ => None,
    }
}

/// Why a table cannot be patched.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("table {0} does not exist in the target database")]
    Missing(String),
    #[error("{0} is not an ordinary table (views, foreign and system tables cannot be patched)")]
    NotATable(String),
    /// A batch finds its rows by their `ctid`, which is unique within one table only.
    #[error(
        "{0} is partitioned or has child tables; patch each partition (or child) by its own name"
    )]
    HasChildren(String),
    #[error(
        "table {0} has no primary key and no unique index over NOT NULL columns; a patch \
         walks such a key in batches and snapshots rows by it"
    )]
    NoKey(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// `"name"` with inner quotes doubled.
pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Resolves `written` (as the statement names it) through the connection's search path.
pub async fn describe(pool: &PgPool, written: &str) -> Result<Table, Refusal> {
    let found = sqlx::query(
        "SELECT c.oid::int8 AS oid, n.nspname, c.relname, c.relkind::text AS relkind,
                c.reltuples::float8 AS reltuples,
                EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhparent = c.oid) AS has_children
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = to_regclass($1)",
    )
    .bind(written.to_owned())
    .fetch_optional(pool)
    .await;
    let row = match found {
        Ok(Some(row)) => row,
        Ok(None) => return Err(Refusal::Missing(written.to_owned())),
        // `to_regclass` raises on a malformed name (too many dots): still "no such table".
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42601") => {
            return Err(Refusal::Missing(written.to_owned()))
        }
        Err(e) => return Err(e.into()),
    };
    let oid: i64 = row.get("oid");
    let schema: String = row.get("nspname");
    let name: String = row.get("relname");
    let relkind: String = row.get("relkind");
    let qualified = format!("{}.{}", quote(&schema), quote(&name));
    let system = ["pg_catalog", "information_schema", super::record::SCHEMA];
    if !matches!(relkind.as_str(), "r" | "p")
        || system.contains(&schema.as_str())
        || schema.starts_with("pg_")
    {
        return Err(Refusal::NotATable(qualified));
    }
    if relkind == "p" || row.get::<bool, _>("has_children") {
        return Err(Refusal::HasChildren(qualified));
    }
    let columns: Vec<Column> = sqlx::query(
        "SELECT attname::text, format_type(atttypid, atttypmod) AS type_name,
                attgenerated <> '' AS generated, attidentity = 'a' AS identity_always
         FROM pg_attribute
         WHERE attrelid = $1::oid AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    .bind(oid)
    .fetch_all(pool)
    .await?
    .iter()
    .map(|r| Column {
        name: r.get(0),
        type_name: r.get(1),
        generated: r.get(2),
        identity_always: r.get(3),
    })
    .collect();
    // Valid, immediate, non-partial unique indexes on plain columns; the primary key first,
    // then the narrowest.
    let keys = sqlx::query(
        "SELECT i.indexrelid::regclass::text AS index_name, i.indisprimary,
                array_agg(a.attname::text ORDER BY k.ord) AS columns,
                bool_and(a.attnotnull) AS not_null
         FROM pg_index i
         CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = $1::oid AND i.indisunique AND i.indisvalid AND i.indimmediate
           AND i.indpred IS NULL AND i.indexprs IS NULL AND k.ord <= i.indnkeyatts
         GROUP BY i.indexrelid, i.indisprimary
         ORDER BY i.indisprimary DESC, count(*), i.indexrelid",
    )
    .bind(oid)
    .fetch_all(pool)
    .await?;
    let chosen = keys
        .iter()
        .find(|r| r.get::<bool, _>("indisprimary") || r.get::<bool, _>("not_null"))
        .ok_or_else(|| Refusal::NoKey(qualified.clone()))?;
    let key_names: Vec<String> = chosen.get("columns");
    let key = key_names
        .iter()
        .map(|k| {
            columns
                .iter()
                .find(|c| &c.name == k)
                .cloned()
                .expect("index columns are table columns")
        })
        .collect();
    let key_source = if chosen.get::<bool, _>("indisprimary") {
        "primary key".to_owned()
    } else {
        format!("unique index {}", chosen.get::<String, _>("index_name"))
    };
    let referenced_by = sqlx::query(
        "SELECT con.conrelid::regclass::text AS child, con.confdeltype::text AS on_delete,
                con.confupdtype::text AS on_update,
                array_agg(a.attname::text ORDER BY k.ord) AS columns
         FROM pg_constraint con
         CROSS JOIN LATERAL unnest(con.confkey) WITH ORDINALITY AS k(attnum, ord)
         JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum
         WHERE con.contype = 'f' AND con.confrelid = $1::oid
         GROUP BY con.oid, con.conrelid, con.confdeltype, con.confupdtype
         ORDER BY con.oid",
    )
    .bind(oid)
    .fetch_all(pool)
    .await?
    .iter()
    .map(|r| Reference {
        child: r.get("child"),
        columns: r.get("columns"),
        on_delete: acting(r.get("on_delete")),
        on_update: acting(r.get("on_update")),
    })
    .filter(|r| r.on_delete.is_some() || r.on_update.is_some())
    .collect();
    Ok(Table {
        schema,
        name,
        qualified,
        key,
        key_source,
        columns,
        estimated_rows: row.get("reltuples"),
        referenced_by,
    })
}

impl Table {
    pub fn key_names(&self) -> Vec<String> {
        self.key.iter().map(|c| c.name.clone()).collect()
    }

    /// `c.conveyor_k1, c.conveyor_k2`.
    pub fn key_slots_of(&self, qualifier: &str) -> String {
        (1..=self.key.len())
            .map(|i| format!("{qualifier}.conveyor_k{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `q."a", q."b"`: the key columns under a qualifier.
    pub fn key_list(&self, qualifier: &str) -> String {
        self.key
            .iter()
            .map(|c| format!("{qualifier}.{}", quote(&c.name)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `conveyor_k1, conveyor_k2`: the key under the positional names the batch statements give it.
    pub fn key_slots(&self) -> String {
        (1..=self.key.len())
            .map(|i| format!("conveyor_k{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `q."a" AS conveyor_k1, q."b" AS conveyor_k2`.
    pub fn key_select(&self, qualifier: &str) -> String {
        self.key
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{qualifier}.{} AS conveyor_k{}", quote(&c.name), i + 1))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `($n::text[])[1]::bigint, ...`: a key carried as text, typed again.
    pub fn key_param(&self, param: usize) -> String {
        self.key
            .iter()
            .enumerate()
            .map(|(i, c)| format!("(${param}::text[])[{}]::{}", i + 1, c.type_name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `ARRAY[conveyor_k1::text, conveyor_k2::text]`.
    pub fn key_text(&self) -> String {
        let parts: Vec<String> = (1..=self.key.len())
            .map(|i| format!("conveyor_k{i}::text"))
            .collect();
        format!("ARRAY[{}]", parts.join(", "))
    }

    /// `conveyor_k1 DESC, conveyor_k2 DESC`.
    pub fn key_desc(&self) -> String {
        (1..=self.key.len())
            .map(|i| format!("conveyor_k{i} DESC"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Columns a restore writes: all but the computed ones.
    pub fn writable(&self) -> Vec<&Column> {
        self.columns.iter().filter(|c| !c.generated).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        let column = |name: &str, type_name: &str| Column {
            name: name.into(),
            type_name: type_name.into(),
            generated: false,
            identity_always: false,
        };
        Table {
            schema: "public".into(),
            name: "t".into(),
            qualified: "\"public\".\"t\"".into(),
            key: vec![column("tenant", "uuid"), column("id", "bigint")],
            key_source: "primary key".into(),
            columns: vec![column("tenant", "uuid"), column("id", "bigint")],
            estimated_rows: 0.0,
            referenced_by: Vec::new(),
        }
    }

    #[test]
    fn key_fragments() {
        let t = table();
        assert_eq!(quote("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(t.key_list("x"), "x.\"tenant\", x.\"id\"");
        assert_eq!(
            t.key_select("x"),
            "x.\"tenant\" AS conveyor_k1, x.\"id\" AS conveyor_k2"
        );
        assert_eq!(
            t.key_param(2),
            "($2::text[])[1]::uuid, ($2::text[])[2]::bigint"
        );
        assert_eq!(t.key_text(), "ARRAY[conveyor_k1::text, conveyor_k2::text]");
        assert_eq!(t.key_slots(), "conveyor_k1, conveyor_k2");
        assert_eq!(t.key_desc(), "conveyor_k1 DESC, conveyor_k2 DESC");
    }
}
