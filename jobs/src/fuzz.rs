//! Property-based fuzzing of the code that reads what tenants send: the patch guard, the CSV
//! and NDJSON record readers, HTML extraction and the job payload parsers. `cargo test` runs a
//! short, deterministic round of each; `scripts/fuzz [SECONDS]` runs each for that long with
//! fresh seeds (`CONVEYOR_FUZZ_SECONDS`). Stable toolchain only, so proptest rather than
//! cargo-fuzz: the strategies build hostile inputs from grammars instead of mutating bytes.

use crate::{
    import::source::{self, CsvSettings, Row},
    ingest::extract::html_to_text,
    limits::Limits,
    patch::guard,
};
use proptest::{
    collection::{btree_map, vec},
    prelude::*,
    sample::select,
    test_runner::{Config, TestCaseError, TestRng, TestRunner},
};
use serde_json::{json, Value};
use shared::{
    datasets::{Compression, Format},
    FieldError,
};
use sqlparser::{
    ast::{Expr, FromTable, Statement, TableWithJoins},
    dialect::PostgreSqlDialect,
    parser::Parser,
};
use std::{
    io::Write,
    time::{Duration, Instant},
};

/// Runs `test` on values of `strategy`: one deterministic round of `PROPTEST_CASES` (default
/// 64) under `cargo test`, or fresh rounds until `CONVEYOR_FUZZ_SECONDS` have passed. A failure
/// is shrunk to a minimal input and fails the test with it.
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let seconds: u64 = std::env::var("CONVEYOR_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let config = Config {
        failure_persistence: None,
        ..Config::default()
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut cases = 0u64;
    loop {
        let mut runner = if seconds == 0 {
            TestRunner::new_with_rng(
                config.clone(),
                TestRng::deterministic_rng(config.rng_algorithm),
            )
        } else {
            TestRunner::new(config.clone())
        };
        if let Err(failure) = runner.run(&strategy, &test) {
            panic!("fuzz {name}: {failure}");
        }
        cases += u64::from(config.cases);
        if Instant::now() >= deadline {
            break;
        }
    }
    if seconds > 0 {
        eprintln!("fuzz {name}: {cases} cases in {seconds} s, no failure");
    }
}

// ---- the patch guard ----------------------------------------------------------------------

fn identifier() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z_][a-z0-9_]{0,6}",
        1 => "[A-Za-z ;'\\-.()]{1,6}".prop_map(|s| format!("\"{}\"", s.replace('"', "\"\""))),
        1 => select(vec!["select", "user", "current_user", "ctid", "oid", "xmin", "pg_catalog"])
            .prop_map(String::from),
    ]
}

fn literal() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f32>().prop_map(|n| format!("{n:?}")),
        "[^\\x00]{0,8}".prop_map(|s| format!("'{}'", s.replace('\'', "''"))),
        "[a-z'\\\\]{0,6}".prop_map(|s| format!("E'{s}'")),
        "[a-z;']{0,6}".prop_map(|s| format!("$${s}$$")),
        select(vec![
            "NULL",
            "TRUE",
            "false",
            "interval '1 day'",
            "B'0101'",
            "X'ff'",
            "'{1,2}'::int[]",
            "$1",
            "current_user",
            "ARRAY[1, 2]",
        ])
        .prop_map(String::from),
    ]
}

const FUNCTIONS: &[&str] = &[
    "lower",
    "coalesce",
    "now",
    "round",
    "jsonb_set",
    "pg_catalog.upper",
    "pg_sleep",
    "set_config",
    "pg_read_file",
    "lo_import",
    "dblink",
    "nextval",
    "random",
    "current_setting",
    "txid_current",
    "public.f",
    "pg_catalog.pg_terminate_backend",
];

const OPERATORS: &[&str] = &[
    "=",
    "<>",
    "<",
    ">=",
    "AND",
    "OR",
    "+",
    "-",
    "*",
    "/",
    "||",
    "LIKE",
    "ILIKE",
    "~",
    "@>",
    "->>",
    "IS DISTINCT FROM",
    "#",
    "^",
];

fn expression() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        4 => identifier(),
        2 => (identifier(), identifier()).prop_map(|(t, c)| format!("{t}.{c}")),
        4 => literal(),
        1 => Just("(SELECT max(id) FROM other)".to_owned()),
        1 => Just("EXISTS (SELECT 1 FROM pg_authid)".to_owned()),
        1 => Just("DEFAULT".to_owned()),
    ];
    leaf.prop_recursive(4, 24, 3, |inner| {
        prop_oneof![
            (inner.clone(), select(OPERATORS), inner.clone())
                .prop_map(|(a, op, b)| format!("{a} {op} {b}")),
            inner.clone().prop_map(|e| format!("({e})")),
            inner.clone().prop_map(|e| format!("NOT {e}")),
            inner.clone().prop_map(|e| format!("-{e}")),
            inner.clone().prop_map(|e| format!("{e} IS NULL")),
            (inner.clone(), vec(inner.clone(), 1..3))
                .prop_map(|(e, list)| format!("{e} IN ({})", list.join(", "))),
            (inner.clone(), inner.clone(), inner.clone())
                .prop_map(|(e, a, b)| format!("{e} BETWEEN {a} AND {b}")),
            inner.clone().prop_map(|e| format!("CAST({e} AS text)")),
            inner.clone().prop_map(|e| format!("{e}::int")),
            (inner.clone(), inner.clone(), inner.clone())
                .prop_map(|(c, a, b)| format!("CASE WHEN {c} THEN {a} ELSE {b} END")),
            (select(FUNCTIONS), vec(inner.clone(), 0..3))
                .prop_map(|(f, args)| format!("{f}({})", args.join(", "))),
            inner.prop_map(|e| format!("{e} COLLATE \"C\"")),
        ]
    })
}

/// UPDATE and DELETE statements with every clause the guard must refuse mixed in, and now and
/// then a stray token where an attacker would put one.
fn statement() -> impl Strategy<Value = String> {
    let table = || {
        (
            prop::option::of(identifier()),
            identifier(),
            prop::option::of(identifier()),
        )
            .prop_map(|(schema, table, alias)| {
                let name = schema.map_or(table.clone(), |s| format!("{s}.{table}"));
                alias.map_or(name.clone(), |a| format!("{name} AS {a}"))
            })
    };
    let assignment = (identifier(), expression()).prop_map(|(c, e)| format!("{c} = {e}"));
    let update = (
        any::<bool>(),
        table(),
        vec(assignment, 1..3),
        prop::option::weighted(0.1, Just(" FROM other")),
        prop::option::of(expression()),
        prop::option::weighted(0.1, Just(" RETURNING *")),
    )
        .prop_map(|(only, table, set, from, filter, returning)| {
            format!(
                "UPDATE {}{table} SET {}{}{}{}",
                if only { "ONLY " } else { "" },
                set.join(", "),
                from.unwrap_or_default(),
                filter.map(|f| format!(" WHERE {f}")).unwrap_or_default(),
                returning.unwrap_or_default()
            )
        });
    let delete = (
        table(),
        prop::option::weighted(0.1, Just(" USING other")),
        prop::option::of(expression()),
        prop::option::weighted(0.1, Just(" RETURNING *")),
    )
        .prop_map(|(table, using, filter, returning)| {
            format!(
                "DELETE FROM {table}{}{}{}",
                using.unwrap_or_default(),
                filter.map(|f| format!(" WHERE {f}")).unwrap_or_default(),
                returning.unwrap_or_default()
            )
        });
    let noise = select(vec![
        ";",
        "; DROP TABLE t",
        "--",
        "/*",
        "'",
        "$$",
        "\\",
        ")",
        "(",
        "\u{0}",
        "é",
        "::",
    ]);
    prop_oneof![
        4 => update,
        3 => delete,
        1 => (prop_oneof![expression().prop_map(|e| format!("UPDATE t SET a = {e}"))], noise, any::<prop::sample::Index>())
            .prop_map(|(sql, noise, at)| {
                let mut at = at.index(sql.len() + 1);
                while !sql.is_char_boundary(at) {
                    at -= 1;
                }
                format!("{}{noise}{}", &sql[..at], &sql[at..])
            }),
        1 => any::<String>(),
    ]
}

fn parse_one(sql: &str) -> Result<Statement, TestCaseError> {
    let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, sql)
        .map_err(|e| TestCaseError::fail(format!("{sql:?} does not parse: {e}")))?;
    prop_assert_eq!(statements.len(), 1, "{:?} is not one statement", sql);
    Ok(statements.remove(0))
}

/// The pieces of a checked UPDATE/DELETE: its table, assignments (as text) and condition.
fn pieces(statement: &Statement) -> (Vec<TableWithJoins>, Vec<String>, Option<Expr>, bool) {
    match statement {
        Statement::Update(u) => (
            vec![u.table.clone()],
            u.assignments.iter().map(|a| a.to_string()).collect(),
            u.selection.clone(),
            u.from.is_some() || u.returning.is_some() || u.limit.is_some(),
        ),
        Statement::Delete(d) => {
            let (FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t)) = &d.from;
            (
                t.clone(),
                Vec::new(),
                d.selection.clone(),
                d.using.is_some() || d.returning.is_some() || !d.tables.is_empty(),
            )
        }
        other => panic!("not an UPDATE or DELETE: {other}"),
    }
}

/// What the guard accepts renders back, as the jobs assemble it (`WHERE (filter)`), to a
/// statement with the same tree: one table, the same assignments, the same condition, no
/// second table; and the condition cannot escape the parentheses it is put in.
fn guard_property(sql: String) -> Result<(), TestCaseError> {
    let Ok(checked) = guard::check(&sql) else {
        return Ok(());
    };
    let target = match &checked.alias {
        Some(alias) => format!("{} AS {alias}", checked.table),
        None => checked.table.clone(),
    };
    let filter = checked
        .filter
        .as_ref()
        .map(|f| format!(" WHERE ({f})"))
        .unwrap_or_default();
    let rendered = match checked.operation {
        guard::Operation::Update => format!("UPDATE {target} SET {}{filter}", checked.set),
        guard::Operation::Delete => format!("DELETE FROM {target}{filter}"),
    };
    let (tables, assignments, condition, extra) = pieces(&parse_one(&sql)?);
    let (tables_again, assignments_again, condition_again, extra_again) =
        pieces(&parse_one(&rendered)?);
    prop_assert!(!extra, "accepted a second table or RETURNING: {sql}");
    prop_assert!(!extra_again);
    prop_assert_eq!(tables.len(), 1, "accepted {} tables: {}", tables.len(), sql);
    prop_assert!(tables[0].joins.is_empty(), "accepted a join: {}", sql);
    prop_assert_eq!(&tables, &tables_again, "{} renders as {}", sql, rendered);
    prop_assert_eq!(
        &assignments,
        &assignments_again,
        "{} renders as {}",
        sql,
        rendered
    );
    let condition_again = condition_again.map(|c| match c {
        Expr::Nested(inner) => *inner,
        other => panic!("the rendered condition lost its parentheses: {other}"),
    });
    prop_assert_eq!(
        &condition,
        &condition_again,
        "{} renders as {}",
        sql,
        rendered
    );
    // As the batches use it: `(filter) AND key > $1` keeps the filter whole.
    if let (Some(f), Some(original)) = (&checked.filter, &condition) {
        let batched = parse_one(&format!("SELECT 1 FROM t WHERE ({f}) AND (id) > ($1)"))?;
        let Statement::Query(query) = batched else {
            panic!("not a query")
        };
        let sqlparser::ast::SetExpr::Select(select) = *query.body else {
            panic!("not a select")
        };
        let Some(Expr::BinaryOp { left, .. }) = select.selection else {
            return Err(TestCaseError::fail(format!(
                "filter {f} escaped its parentheses"
            )));
        };
        prop_assert_eq!(&*left, &Expr::Nested(Box::new(original.clone())));
    }
    // Checking the rendered statement again changes nothing.
    let again = guard::check(&rendered).map_err(TestCaseError::fail)?;
    prop_assert_eq!(again.table, checked.table);
    prop_assert_eq!(again.set, checked.set);
    prop_assert_eq!(again.assigned, checked.assigned);
    Ok(())
}

#[test]
fn fuzz_patch_guard() {
    fuzz("patch guard", statement(), guard_property);
}

// ---- CSV and NDJSON readers ----------------------------------------------------------------

const RECORD_CAP: u64 = 512;

fn limits() -> Limits {
    Limits {
        decompressed: 1 << 20,
        in_memory: 1 << 20,
        record: RECORD_CAP,
        document: 1 << 20,
    }
}

fn compressed(bytes: &[u8], compression: Compression) -> Vec<u8> {
    match compression {
        Compression::None => bytes.to_vec(),
        Compression::Gzip => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(bytes).unwrap();
            encoder.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(bytes, 1).unwrap(),
    }
}

fn compression() -> impl Strategy<Value = Compression> {
    select(vec![
        Compression::None,
        Compression::Gzip,
        Compression::Zstd,
    ])
}

type Fields = Vec<Vec<u8>>;

/// Every row of a file, or the reader's error; `None` for a row that is its own error.
fn read_rows(
    bytes: &[u8],
    format: Format,
    compression: Compression,
    settings: &CsvSettings,
    columns: &[String],
) -> Result<(Vec<String>, Vec<Option<Fields>>), String> {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(&compressed(bytes, compression)).unwrap();
    let mut opened = source::open(
        file.path(),
        format,
        compression,
        settings,
        columns,
        &limits(),
    )?;
    let mut rows = Vec::new();
    let mut row = Row::default();
    loop {
        match opened.source.next(&mut row) {
            Ok(true) => rows.push(Some(row.fields.iter().map(<[u8]>::to_vec).collect())),
            Ok(false) => return Ok((opened.header, rows)),
            Err(Ok(_)) => rows.push(None),
            Err(Err(e)) => return Err(e),
        }
        // A reader that keeps returning rows past the file's end is a hang in waiting.
        if rows.len() > bytes.len() + 1 {
            return Err(format!("{} rows from {} bytes", rows.len(), bytes.len()));
        }
    }
}

fn csv_settings() -> impl Strategy<Value = CsvSettings> {
    (
        select(vec![b',', b';', b'\t', b'|']),
        select(vec![b'"', b'\'']),
        any::<bool>(),
    )
        .prop_map(|(delimiter, quote, header)| CsvSettings {
            delimiter,
            quote,
            header,
        })
}

/// Any bytes: the reader ends (rows or an error), never panics, and no record it returns is
/// larger than the record cap.
#[test]
fn fuzz_record_readers_on_any_bytes() {
    let bytes = prop_oneof![
        vec(any::<u8>(), 0..2048),
        vec(select(b"a,;\"'\n\r\t{}[]:\\ 0".to_vec()), 0..2048),
    ];
    let format = select(vec![Format::Csv, Format::Tsv, Format::Ndjson]);
    fuzz(
        "record readers, any bytes",
        (bytes, format, compression(), csv_settings()),
        |(bytes, format, compression, settings)| {
            let columns = vec!["a".to_owned(), "b".to_owned()];
            if let Ok((_, rows)) = read_rows(&bytes, format, compression, &settings, &columns) {
                for row in rows.into_iter().flatten() {
                    let size: usize = row.iter().map(Vec::len).sum();
                    prop_assert!(size as u64 <= RECORD_CAP, "a {size}-byte record passed");
                }
            }
            Ok(())
        },
    );
}

fn field() -> impl Strategy<Value = String> {
    prop_oneof![
        "[^\\x00]{0,12}",
        "[a-z,;\"'\n\r\t ]{0,12}",
        select(vec!["", " ", "\"", "\r\n", "null", "NA", "é\u{1F600}"]).prop_map(String::from),
    ]
}

/// Rows written by a CSV writer with the same settings read back field for field.
#[test]
fn fuzz_csv_reader_round_trip() {
    let table = (1usize..5).prop_flat_map(|width| vec(vec(field(), width), 1..20));
    fuzz(
        "csv round trip",
        (table, compression(), csv_settings()),
        |(table, compression, settings)| {
            let mut writer = csv::WriterBuilder::new()
                .delimiter(settings.delimiter)
                .quote(settings.quote)
                .quote_style(csv::QuoteStyle::Always)
                .from_writer(Vec::new());
            for record in &table {
                writer.write_record(record).unwrap();
            }
            let bytes = writer.into_inner().unwrap();
            let (header, rows) = read_rows(&bytes, Format::Csv, compression, &settings, &[])
                .map_err(TestCaseError::fail)?;
            let data = if settings.header {
                let expected: Vec<String> = table[0].iter().map(|f| f.trim().to_owned()).collect();
                prop_assert_eq!(header, expected);
                &table[1..]
            } else {
                &table[..]
            };
            prop_assert_eq!(rows.len(), data.len());
            for (row, expected) in rows.iter().zip(data) {
                let row = row.as_ref().expect("no row error in written CSV");
                let expected: Vec<Vec<u8>> =
                    expected.iter().map(|f| f.as_bytes().to_vec()).collect();
                prop_assert_eq!(row, &expected);
            }
            Ok(())
        },
    );
}

/// NDJSON objects read back as their columns' values: strings unescaped, other scalars as
/// written, null and missing as NULL (an empty field).
#[test]
fn fuzz_ndjson_reader_round_trip() {
    let value = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[^\\x00]{0,12}".prop_map(Value::from),
    ];
    let object = btree_map(select(vec!["a", "b", "c"]), value, 0..3);
    fuzz(
        "ndjson round trip",
        (vec(object, 1..20), compression()),
        |(objects, compression)| {
            let mut bytes = Vec::new();
            for object in &objects {
                serde_json::to_writer(&mut bytes, object).unwrap();
                bytes.extend_from_slice(b"\r\n");
            }
            let columns = vec!["a".to_owned(), "b".to_owned()];
            let settings = CsvSettings {
                delimiter: b',',
                quote: b'"',
                header: true,
            };
            let (_, rows) = read_rows(&bytes, Format::Ndjson, compression, &settings, &columns)
                .map_err(TestCaseError::fail)?;
            prop_assert_eq!(rows.len(), objects.len());
            for (row, object) in rows.iter().zip(&objects) {
                let row = row.as_ref().expect("no row error in written NDJSON");
                for (field, name) in row.iter().zip(&columns) {
                    let expected = match object.get(name.as_str()) {
                        None | Some(Value::Null) => String::new(),
                        Some(Value::String(s)) => s.clone(),
                        Some(other) => other.to_string(),
                    };
                    prop_assert_eq!(field, expected.as_bytes());
                }
            }
            Ok(())
        },
    );
}

// ---- HTML extraction -----------------------------------------------------------------------

/// A piece of a generated page: text the reader must see, or markup whose content it must not.
#[derive(Clone, Debug)]
enum Piece {
    Words(String),
    Tag(String),
    Hidden(String),
}

fn piece() -> impl Strategy<Value = Piece> {
    let attributes = prop_oneof![
        Just(String::new()),
        Just(" class=\"x\"".to_owned()),
        Just(" data-x='a b'".to_owned()),
        Just(" hidden".to_owned()),
    ];
    prop_oneof![
        3 => "[a-z]{1,8}( [a-z]{1,8}){0,3}".prop_map(Piece::Words),
        3 => (select(vec!["p", "div", "br", "span", "b", "td", "LI", "h1", "a", "img"]), attributes, any::<bool>())
            .prop_map(|(name, attributes, closing)| Piece::Tag(if closing {
                format!("</{name}>")
            } else {
                format!("<{name}{attributes}>")
            })),
        1 => (select(vec!["script", "style", "SCRIPT", "Style"]), "[a-z<>/ ]{0,12}").prop_map(
            |(name, body)| Piece::Hidden(format!("<{name}>{body} hidden </{name}>"))
        ),
        1 => "[a-z<> ]{0,12}".prop_map(|body| Piece::Hidden(format!("<!--{body} hidden -->"))),
    ]
}

/// Generated pages: every word of the text comes out, in order; nothing of scripts, styles
/// and comments does; and the text is never longer than the page.
#[test]
fn fuzz_html_extraction() {
    fuzz("html extraction", vec(piece(), 0..40), |pieces| {
        let mut page = String::new();
        let mut words = Vec::new();
        for piece in &pieces {
            match piece {
                Piece::Words(w) => {
                    page.push(' ');
                    page.push_str(w);
                    page.push(' ');
                    words.extend(w.split(' ').map(str::to_owned));
                }
                Piece::Tag(t) | Piece::Hidden(t) => page.push_str(t),
            }
        }
        let text = html_to_text(&page);
        prop_assert!(text.len() <= page.len());
        let seen: Vec<&str> = text.split_whitespace().collect();
        prop_assert_eq!(seen, words.iter().map(String::as_str).collect::<Vec<_>>());
        Ok(())
    });
}

/// Any text at all: no panic, and the text is never longer than the page.
#[test]
fn fuzz_html_extraction_on_any_text() {
    let page = prop_oneof![
        any::<String>(),
        vec(
            select(vec![
                "<",
                ">",
                "</",
                "<!--",
                "-->",
                "&",
                "&amp;",
                "&#",
                "&#x",
                ";",
                "script",
                "<script",
                "</script",
                "a",
                " ",
                "\n",
                "é",
                "&#1114111;",
                "&#xD800;",
                "&eacute;",
                "&nGt;",
                "&nLt;"
            ]),
            0..200
        )
        .prop_map(|parts| parts.concat()),
    ];
    fuzz("html extraction, any text", page, |page| {
        let text = html_to_text(&page);
        prop_assert!(
            text.len() <= page.len(),
            "{} bytes from {}",
            text.len(),
            page.len()
        );
        Ok(())
    });
}

// ---- job payload parsers -------------------------------------------------------------------

const UUID: &str = "0b9ab4e2-6a3c-4c36-9a0c-5d3f2f1b6a11";

/// A valid payload of each kind, which the fuzzer mutates.
fn examples() -> Vec<(&'static str, Value)> {
    vec![
        (
            "canary",
            json!({"steps": 3, "step_ms": 10, "fail_first": 1}),
        ),
        (
            "import",
            json!({"dataset_id": UUID, "target": {"table": "orders", "schema": "sales"},
                   "mode": "upsert", "key_columns": ["id"],
                   "columns": [{"source": "id", "type": "bigint"}, {"source": "Total", "name": "total"}],
                   "csv": {"delimiter": ";", "header": true, "quote": "'", "null": ["NA"]},
                   "on_error": "skip", "max_errors": 10}),
        ),
        (
            "ingest",
            json!({"collection_id": UUID, "documents": [
                {"id": "a", "text": "<p>hello</p>", "format": "html", "metadata": {"k": 1}},
                {"dataset_id": UUID, "format": "ndjson", "text_field": "body", "id_field": "id"}]}),
        ),
        (
            "patch",
            json!({"sql": "UPDATE orders SET total = total * 2 WHERE id = 5", "mode": "dry_run",
                   "batch_size": 100, "max_rows": 1000}),
        ),
        (
            "patch_rollback",
            json!({"patch_job_id": UUID, "force": false}),
        ),
        (
            "synthesis",
            json!({"dataset_id": UUID, "rows": 100, "synthesizer": "gaussian_copula", "epsilon": 1.0,
                   "seed": 7, "columns": {"age": {"min": 0, "max": 120}}}),
        ),
    ]
}

/// The API's validation: parsed into the kind's payload type and checked; the payload as stored.
fn validate(kind: &str, payload: &Value) -> Result<Value, Vec<FieldError>> {
    contracts::Registry::standard()
        .validate(kind, payload)
        .map(contracts::Valid::into_stored)
}

fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        select(vec![
            "steps",
            "rows",
            "sql",
            "mode",
            "table",
            "schema",
            "columns",
            "source",
            "type",
            "documents",
            "text",
            "id",
            "format",
            "min",
            "max",
            "epsilon",
            "csv",
            "null",
            "delimiter",
            "quote",
            "dataset_id",
            "connection_id",
            "metadata",
            "seed",
        ])
        .prop_map(String::from),
        "[a-z_]{1,10}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[^\\x00]{0,16}".prop_map(Value::from),
        select(vec![
            UUID,
            "",
            " ",
            "\u{0}",
            "create",
            "append",
            "upsert",
            "execute",
            "dry_run",
            "gaussian_copula",
            "tvae",
            "ctgan",
            "html",
            "ndjson",
            "pdf",
            "../../etc/passwd",
            "pg_catalog",
            "conveyor",
            "UPDATE t SET a = 1",
            "-1",
            "1e400",
            ";",
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 24, 4, move |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            btree_map(key.clone(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A change at a place in a payload, chosen by indexes taken modulo the children there.
#[derive(Clone, Debug)]
enum Mutation {
    Replace(Vec<usize>, Value),
    Remove(Vec<usize>),
}

fn mutate(value: &mut Value, mutation: &Mutation) {
    let (path, replacement) = match mutation {
        Mutation::Replace(path, v) => (path.as_slice(), Some(v)),
        Mutation::Remove(path) => (path.as_slice(), None),
    };
    mutate_at(value, path, replacement);
}

fn mutate_at(node: &mut Value, path: &[usize], replacement: Option<&Value>) {
    let Some((&step, rest)) = path.split_first() else {
        if let Some(v) = replacement {
            *node = v.clone();
        }
        return;
    };
    let remove = rest.is_empty() && replacement.is_none();
    match node {
        Value::Object(map) if !map.is_empty() => {
            let key = map.keys().nth(step % map.len()).cloned().unwrap();
            if remove {
                map.remove(&key);
            } else {
                mutate_at(map.get_mut(&key).unwrap(), rest, replacement);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let at = step % items.len();
            if remove {
                items.remove(at);
            } else {
                mutate_at(&mut items[at], rest, replacement);
            }
        }
        _ => mutate_at(node, &[], replacement),
    }
}

/// The examples are valid (so the mutations below start from accepted payloads).
#[test]
fn payload_examples_are_valid() {
    for (kind, payload) in examples() {
        if let Err(e) = validate(kind, &payload) {
            panic!("{kind}: {e:?}")
        }
    }
}

/// Mutated payloads: validation never panics; each refusal names a field under `payload` and
/// says why in a bounded message; what validation accepts, the worker's parse accepts too.
#[test]
fn fuzz_payload_parsers() {
    let mutation = prop_oneof![
        (vec(any::<usize>(), 0..4), json_value()).prop_map(|(p, v)| Mutation::Replace(p, v)),
        vec(any::<usize>(), 1..4).prop_map(Mutation::Remove),
    ];
    let examples = examples();
    fuzz(
        "payload parsers",
        (0..examples.len(), vec(mutation, 1..4)),
        |(which, mutations)| {
            let (kind, mut payload) = examples[which].clone();
            for mutation in &mutations {
                mutate(&mut payload, mutation);
            }
            match validate(kind, &payload) {
                Ok(stored) => {
                    // The job row stores the payload as parsed, as JSON text, and the worker
                    // reads it back: accepted, and the same stored again.
                    let read: Value =
                        serde_json::from_str(&stored.to_string()).expect("stored JSON reads");
                    prop_assert_eq!(validate(kind, &read), Ok(stored), "{}", payload);
                }
                Err(errors) => {
                    prop_assert!(!errors.is_empty());
                    for error in errors {
                        prop_assert!(
                            error.field == "payload" || error.field.starts_with("payload."),
                            "field {:?}",
                            error.field
                        );
                        prop_assert!(!error.message.is_empty());
                        prop_assert!(
                            error.message.len() <= 1024,
                            "a {}-byte message for {}",
                            error.message.len(),
                            error.field
                        );
                    }
                }
            }
            Ok(())
        },
    );
}
