//! Datasets and the `import` job against the real target database: round trips checked
//! against `psql \copy` of the same file, bad rows, modes, cancel and kill -9.

use reqwest::StatusCode;
use serde_json::{json, Value};
use std::{
    io::Write,
    process::Command,
    time::{Duration, Instant},
};
use uuid::Uuid;

use crate::harness::{peak_rss_mb, TestApp};

const WAIT: Duration = Duration::from_secs(120);

/// Tricky values: quotes, commas, embedded newlines, tabs, backslashes, unicode, zones,
/// decimals beyond f64, NULLs (empty fields).
const TRICKY_CSV: &str = "id,amount,ratio,name,happened,day,flag
1,12.50,0.25,plain,2024-01-02 03:04:05+00,2024-01-02,true
2,-0.001,1e-3,\"with \"\"quotes\"\", and, commas\",2024-06-30T23:59:59.123456+02:00,1999-12-31,false
3,,,,,,
4,123456789012345678.123456789,-2.5,\"multi
line ✓ ünïcødé 🚀\",2024-03-10 12:00:00-05,2000-02-29,t
5,0,0,\"tab\there back\\slash\",2024-03-10T12:00:00Z,2024-12-31,f
";

const TRICKY_COLUMNS: &str = "id bigint, amount numeric, ratio double precision, name text, \
                              happened timestamptz, day date, flag boolean";

fn psql(url: &str, command: &str) -> String {
    let output = Command::new("psql")
        .arg(url)
        .args(["-v", "ON_ERROR_STOP=1", "-qtAc", command])
        .output()
        .expect("psql runs");
    assert!(
        output.status.success(),
        "psql {command}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// md5 of every row's text, in id order: equal checksums mean equal tables.
fn checksum(url: &str, table: &str) -> String {
    psql(
        url,
        &format!(
            "SELECT md5(coalesce(string_agg(t::text, E'\\n' ORDER BY id), '')) FROM {table} t"
        ),
    )
}

/// The table `psql \copy` makes of the same file: the reference.
fn copy_with_psql(url: &str, table: &str, columns: &str, file: &std::path::Path, options: &str) {
    psql(url, &format!("CREATE TABLE {table} ({columns})"));
    psql(
        url,
        &format!("\\copy {table} FROM '{}' WITH ({options})", file.display()),
    );
}

fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("conveyor-import-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn typed_columns(spec: &str) -> Value {
    let columns: Vec<Value> = spec
        .split(',')
        .map(|c| {
            let (name, ty) = c.trim().split_once(' ').unwrap();
            json!({"source": name, "type": ty})
        })
        .collect();
    Value::Array(columns)
}

async fn submit_import(app: &TestApp, payload: Value) -> Uuid {
    let (status, job) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "import", "payload": payload, "max_attempts": 3}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    job["id"].as_str().unwrap().parse().unwrap()
}

async fn import_ok(app: &TestApp, payload: Value) -> Value {
    let id = submit_import(app, payload).await;
    let job = app
        .wait_status(id, &["succeeded", "failed", "cancelled"], WAIT)
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    job["result"].clone()
}

/// The progress a succeeded job's event stream shows, in order.
async fn progress_events(app: &TestApp, id: Uuid) -> Vec<f64> {
    let mut events = app.sse(&format!("/v1/jobs/{id}/events"), None).await;
    let mut progress = Vec::new();
    while let Some(event) = events.next(Duration::from_secs(5)).await {
        match event.event.as_str() {
            "progress" => progress.push(event.data["progress"].as_f64().unwrap()),
            "succeeded" => break,
            _ => {}
        }
    }
    progress
}

async fn import_failed(app: &TestApp, payload: Value) -> Value {
    let id = submit_import(app, payload).await;
    let job = app
        .wait_status(id, &["succeeded", "failed", "cancelled"], WAIT)
        .await;
    assert_eq!(job["status"], "failed", "{job}");
    job
}

// Multi-threaded: uploads of tens of MB and COPY share the runtime with the in-process worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_round_trip_equals_psql_copy_row_for_row() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("import", 1)]).await;
    let file = temp_file("tricky.csv", TRICKY_CSV.as_bytes());
    copy_with_psql(
        &app.target_url(),
        "expected",
        TRICKY_COLUMNS,
        &file,
        "FORMAT csv, HEADER true",
    );

    let dataset = app
        .upload_dataset("tricky.csv", TRICKY_CSV.as_bytes())
        .await;
    let result = import_ok(
        &app,
        json!({"dataset_id": dataset, "target": {"table": "imported"}, "columns": typed_columns(TRICKY_COLUMNS)}),
    )
    .await;
    assert_eq!(result["rows_imported"], 5, "{result}");
    assert_eq!(result["rows_rejected"], 0);
    assert_eq!(result["outputs"]["table"], result["table"], "{result}");
    assert!(result["table"].as_str().unwrap().ends_with(".imported"));
    assert_eq!(
        checksum(&app.target_url(), "imported"),
        checksum(&app.target_url(), "expected")
    );
    assert_eq!(
        psql(&app.target_url(), "SELECT name FROM imported WHERE id = 4"),
        "multi\nline ✓ ünïcødé 🚀"
    );
    assert_eq!(
        psql(
            &app.target_url(),
            "SELECT count(*) FROM imported WHERE amount IS NULL AND name IS NULL"
        ),
        "1"
    );
}

/// A pyarrow file with decimal columns (what pandas and database exports write for money):
/// polars panicked reading it, so such a file could not be uploaded or imported. Its values
/// arrive exact, in numeric columns, and its preview shows them as written.
#[tokio::test]
async fn parquet_decimals_arrive_exact() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("import", 1)]).await;
    let dataset = app
        .upload_dataset("money.parquet", include_bytes!("fixtures/decimals.parquet"))
        .await;
    let (status, read) = app.get(&format!("/v1/datasets/{dataset}")).await;
    assert_eq!(status, StatusCode::OK, "{read}");
    let schema = read["schema"]
        .as_array()
        .unwrap_or_else(|| panic!("{read}"));
    let types: Vec<&str> = (schema.iter())
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["bigint", "numeric", "numeric"], "{read}");
    assert_eq!(read["preview"][1]["price"], "-2.50", "{read}");
    let result = import_ok(
        &app,
        json!({"dataset_id": dataset, "target": {"table": "money"}}),
    )
    .await;
    assert_eq!(result["rows_imported"], 3, "{result}");
    assert_eq!(
        psql(
            &app.target_url(),
            "SELECT string_agg(format('%s|%s|%s', id, price, wide), ';' ORDER BY id) FROM money"
        ),
        "1|1.25|1234567890123456789012345678.0123456789;2|-2.50|-0.0000000001;3||0.0000000000"
    );
}

/// List and struct columns arrive whole, as JSON in jsonb columns, equal to the same values
/// read from NDJSON: polars' display text (`[1, null, … 7]`, a struct's values without their
/// names) went into text columns, and the import succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_lists_and_structs_arrive_as_json() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("import", 1)]).await;
    use polars::prelude::*;
    let numbers = (1..=7i64)
        .map(|i| (i != 2).then_some(i))
        .collect::<Vec<_>>();
    let tags = Series::new(
        "tags".into(),
        [
            Some(Series::new("".into(), numbers)),
            Some(Series::new_empty("".into(), &DataType::Int64)),
            None,
        ],
    );
    let zoned = DataType::Datetime(TimeUnit::Microseconds, Some(TimeZone::UTC));
    let at = [Some(1_700_000_000_000_000i64), None, Some(-86_400_000_000)];
    let fields = [
        Series::new(
            "name".into(),
            [Some("a \"quoted\"\nline"), Some("ünï"), None],
        ),
        Series::new("day".into(), [Some(19_723i32), None, Some(-1)])
            .cast(&DataType::Date)
            .unwrap(),
        Series::new("at".into(), at).cast(&zoned).unwrap(),
        Series::new("raw".into(), [Some(&[0u8, 255][..]), None, Some(&[][..])]),
        Series::new("score".into(), [0.5f64, f64::NAN, -1.25]),
    ];
    let meta = StructChunked::from_series("meta".into(), 3, fields.iter())
        .unwrap()
        .into_series();
    let id = Series::new("id".into(), [1i64, 2, 3]);
    let mut frame = DataFrame::new(3, vec![id.into(), tags.into(), meta.into()]).unwrap();
    let mut parquet = Vec::new();
    ParquetWriter::new(&mut parquet).finish(&mut frame).unwrap();
    let dataset = app.upload_dataset("nested.parquet", &parquet).await;
    let result = import_ok(
        &app,
        json!({"dataset_id": dataset, "target": {"table": "nested"}}),
    )
    .await;
    assert_eq!(result["rows_imported"], 3, "{result}");
    // Every item, not `[1, null, … 7]`.
    assert_eq!(
        psql(
            &app.target_url(),
            "SELECT tags::text FROM nested WHERE id = 1"
        ),
        "[1, null, 3, 4, 5, 6, 7]"
    );
    let types = |result: &Value| -> Vec<String> {
        (result["columns"].as_array().unwrap().iter())
            .map(|c| c["type"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(types(&result), ["bigint", "jsonb", "jsonb"], "{result}");
    // Names kept; NaN as null; dates and times as PostgreSQL's JSON writes them; bytes as
    // bytea reads them.
    assert_eq!(
        psql(&app.target_url(), "SELECT string_agg(format('%s|%s|%s|%s|%s|%s|%s', id, tags, meta ->> 'name', meta ->> 'day', meta ->> 'at', (meta ->> 'raw')::bytea, meta -> 'score'), ';' ORDER BY id) FROM nested"),
        "1|[1, null, 3, 4, 5, 6, 7]|a \"quoted\"\nline|2024-01-01|2023-11-14T22:13:20+00:00|\\x00ff|0.5;\
         2|[]|ünï||||null;\
         3|||1969-12-31|1969-12-31T00:00:00+00:00|\\x|-1.25"
    );

    // The same values written as NDJSON: the same column types, equal values.
    let ndjson = concat!(
        r#"{"id": 1, "tags": [1, null, 3, 4, 5, 6, 7], "meta": {"name": "a \"quoted\"\nline", "day": "2024-01-01", "at": "2023-11-14T22:13:20+00:00", "raw": "\\x00ff", "score": 0.5}}"#,
        "\n",
        r#"{"id": 2, "tags": [], "meta": {"name": "ünï", "day": null, "at": null, "raw": null, "score": null}}"#,
        "\n",
        r#"{"id": 3, "tags": null, "meta": {"name": null, "day": "1969-12-31", "at": "1969-12-31T00:00:00+00:00", "raw": "\\x", "score": -1.25}}"#,
        "\n",
    );
    let dataset = app.upload_dataset("nested.ndjson", ndjson.as_bytes()).await;
    let result = import_ok(
        &app,
        json!({"dataset_id": dataset, "target": {"table": "nested_ndjson"}}),
    )
    .await;
    assert_eq!(types(&result), ["bigint", "jsonb", "jsonb"], "{result}");
    assert_eq!(
        psql(&app.target_url(), "SELECT count(*) FROM nested p JOIN nested_ndjson n USING (id) WHERE p.tags IS NOT DISTINCT FROM n.tags AND p.meta = n.meta"),
        "3"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_tsv_ndjson_and_parquet_round_trip() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("import", 2)]).await;
    let file = temp_file("tricky.csv", TRICKY_CSV.as_bytes());
    copy_with_psql(
        &app.target_url(),
        "expected",
        TRICKY_COLUMNS,
        &file,
        "FORMAT csv, HEADER true",
    );
    let expected = checksum(&app.target_url(), "expected");

    // gzip and zstd CSV.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(TRICKY_CSV.as_bytes()).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(TRICKY_CSV.as_bytes(), 3).unwrap();
    for (name, bytes, table) in [
        ("t.csv.gz", gz, "from_gzip"),
        ("t.csv.zst", zst, "from_zstd"),
    ] {
        let dataset = app.upload_dataset(name, &bytes).await;
        import_ok(&app, json!({"dataset_id": dataset, "target": {"table": table}, "columns": typed_columns(TRICKY_COLUMNS)})).await;
        assert_eq!(checksum(&app.target_url(), table), expected, "{name}");
    }

    // TSV: the same rows in PostgreSQL's own text output, tab-separated.
    let tsv = psql(&app.target_url(), "COPY (SELECT * FROM expected ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER true, DELIMITER E'\\t')");
    let dataset = app
        .upload_dataset("t.tsv", format!("{tsv}\n").as_bytes())
        .await;
    import_ok(&app, json!({"dataset_id": dataset, "target": {"table": "from_tsv"}, "columns": typed_columns(TRICKY_COLUMNS)})).await;
    assert_eq!(checksum(&app.target_url(), "from_tsv"), expected);

    // NDJSON: JSON objects with nulls.
    let ndjson = psql(
        &app.target_url(),
        "SELECT string_agg(row_to_json(e)::text, E'\\n' ORDER BY id) FROM expected e",
    );
    let dataset = app
        .upload_dataset("t.ndjson", format!("{ndjson}\n").as_bytes())
        .await;
    import_ok(&app, json!({"dataset_id": dataset, "target": {"table": "from_ndjson"}, "columns": typed_columns(TRICKY_COLUMNS)})).await;
    assert_eq!(checksum(&app.target_url(), "from_ndjson"), expected);

    // Parquet written by polars; numeric travels as text (Parquet has no arbitrary decimals here).
    use polars::prelude::*;
    let mut frame = df!(
        "id" => [1i64, 2, 3],
        "ratio" => [Some(0.5f64), None, Some(-1.25)],
        "name" => [Some("a \"quoted\"\nline"), Some("ünï"), None],
        "flag" => [Some(true), Some(false), None],
        // Exactly, not as polars displays them (1.2346e6, 3.141593, \"IST\").
        "precise" => [1234567.891f64, std::f64::consts::PI, f64::INFINITY],
        "at" => [0i64, 1_700_000_000_000_000, -86_400_000_000],
    )
    .unwrap();
    let zone = TimeZone::opt_try_new(Some("Asia/Kolkata")).unwrap();
    let at = DataType::Datetime(TimeUnit::Microseconds, zone);
    frame.apply("at", |c| c.cast(&at).unwrap()).unwrap();
    let mut parquet = Vec::new();
    ParquetWriter::new(&mut parquet).finish(&mut frame).unwrap();
    let dataset = app.upload_dataset("t.parquet", &parquet).await;
    let result = import_ok(
        &app,
        json!({"dataset_id": dataset, "target": {"table": "from_parquet"}}),
    )
    .await;
    assert_eq!(result["rows_imported"], 3, "{result}");
    assert_eq!(
        psql(&app.target_url(), "SELECT string_agg(format('%s|%s|%s|%s', id, ratio, name, flag), ';' ORDER BY id) FROM from_parquet"),
        "1|0.5|a \"quoted\"\nline|t;2||ünï|f;3|-1.25||"
    );
    assert_eq!(
        psql(&app.target_url(), "SELECT string_agg(format('%s|%s', precise, extract(epoch FROM at)), ';' ORDER BY id) FROM from_parquet"),
        "1234567.891|0.000000;3.141592653589793|1700000000.000000;Infinity|-86400.000000"
    );
    // A Parquet file is read by row slices; its progress follows the rows read.
    let id = submit_import(
        &app,
        json!({"dataset_id": dataset, "target": {"table": "from_parquet_again"}}),
    )
    .await;
    app.wait_status(id, &["succeeded"], WAIT).await;
    let progress = progress_events(&app, id).await;
    assert!(
        progress.iter().any(|p| (0.5..1.0).contains(p)),
        "{progress:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_tables_take_types_from_the_whole_file() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("import", 1)]).await;
    // The head says bigint, date and bigint; rows far past the head need double precision and
    // text. The codes' leading zeros are text the table must keep.
    let mut csv = String::from("id,amount,day,code\n");
    for i in 0..5000 {
        csv.push_str(&format!("{i},{i},2024-01-01,{i:05}\n"));
    }
    csv.push_str("5000,2.5,sometime,A-1\n");
    let dataset = app.upload_dataset("late.csv", csv.as_bytes()).await;
    let (_, info) = app.get(&format!("/v1/datasets/{dataset}")).await;
    assert_eq!(info["schema"][1]["type"], "bigint", "{info}");
    assert_eq!(info["schema"][3]["type"], "bigint", "{info}");
    let result = import_ok(
        &app,
        json!({"dataset_id": dataset, "target": {"table": "late"}}),
    )
    .await;
    assert_eq!(result["rows_imported"], 5001);
    let types = "bigint\ndouble precision\ntext\ntext";
    assert_eq!(
        psql(&app.target_url(), "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'late'::regclass AND attnum > 0 ORDER BY attnum"),
        types
    );
    let reported: Vec<&str> = result["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(reported.join("\n"), types, "{result}");
    assert_eq!(
        psql(&app.target_url(), "SELECT sum(amount) FROM late"),
        "12497502.5"
    );
    assert_eq!(
        psql(
            &app.target_url(),
            "SELECT string_agg(code, ' ' ORDER BY id) FROM late WHERE id IN (7, 4999, 5000)"
        ),
        "00007 04999 A-1"
    );
}

/// The inspector that infers a file's types is a process of its own, as a hostile file may
/// take it over: a type it says that is not one of ours was written into `CREATE TABLE`
/// whole (`text, injected integer`). It is text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inferred_type_that_is_not_ours_is_text() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("import", 1)]).await;
    let dataset = app.upload_dataset("said.csv", b"a\n1\n").await;
    sqlx::query(
        "UPDATE datasets SET schema = jsonb_set(schema, '{0,type}', '\"text, injected integer\"')
         WHERE id = $1",
    )
    .bind(dataset)
    .execute(app.pool())
    .await
    .unwrap();
    import_ok(
        &app,
        json!({"dataset_id": dataset, "target": {"table": "said"}}),
    )
    .await;
    assert_eq!(
        psql(&app.target_url(), "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ') FROM pg_attribute WHERE attrelid = 'said'::regclass AND attnum > 0"),
        "a text"
    );
}

/// A value no type holds, in a created column, is its row's error under `on_error=skip`: the
/// column does not widen, and the file is read no more than twice (asking for a wider type
/// that was the same, each pass asked for another, for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_no_type_holds_is_rejected_once_in_a_created_column() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("import", 1)]).await;
    let mut csv = String::from("id,amount\n");
    for i in 0..3000 {
        csv.push_str(&format!("{i},{i}.5\n"));
    }
    csv.push_str("3000,a\u{0}b\n3001,1e400\n");
    let dataset = app.upload_dataset("huge.csv", csv.as_bytes()).await;
    let id = submit_import(
        &app,
        json!({"dataset_id": dataset, "target": {"table": "huge"}, "on_error": "skip"}),
    )
    .await;
    let job = app
        .wait_status(id, &["succeeded", "failed"], Duration::from_secs(60))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    // The NUL widened amount to text, which holds 1e400 as written but no NUL either.
    assert_eq!(job["result"]["rows_imported"], 3001, "{job}");
    assert_eq!(job["result"]["rows_rejected"], 1, "{job}");
    assert_eq!(
        psql(&app.target_url(), "SELECT amount FROM huge WHERE id = 3001"),
        "1e400"
    );
}

/// Rows are judged by the types the whole file needs, not those a pass has reached: `1e400`
/// in a column inferred as double precision (which `n/a` later widens to text), and dates after
/// a timestamp widened a date column, import under `abort` and under `skip` with
/// `max_errors: 0` alike (the first pass failed the one and rejected a row in the other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_the_final_types_hold_are_not_rejected_by_an_earlier_pass() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("import", 1)]).await;
    let mut csv = String::from("id,amount,day\n");
    for i in 0..3000 {
        let (amount, day) = match i {
            2000 => ("1e400".to_owned(), "2024-01-01"),
            2001 => (format!("{i}.5"), "2024-01-02 10:00:00"),
            _ => (format!("{i}.5"), "2024-01-01"),
        };
        csv.push_str(&format!("{i},{amount},{day}\n"));
    }
    csv.push_str("3000,n/a,2024-01-03\n");
    let dataset = app.upload_dataset("late_wide.csv", csv.as_bytes()).await;
    let (_, info) = app.get(&format!("/v1/datasets/{dataset}")).await;
    assert_eq!(info["schema"][1]["type"], "double precision", "{info}");
    assert_eq!(info["schema"][2]["type"], "date", "{info}");
    for payload in [
        json!({"dataset_id": dataset, "target": {"table": "wide_abort"}}),
        json!({"dataset_id": dataset, "target": {"table": "wide_skip"},
               "on_error": "skip", "max_errors": 0}),
    ] {
        let table = payload["target"]["table"].as_str().unwrap().to_owned();
        let result = import_ok(&app, payload).await;
        assert_eq!(result["rows_imported"], 3001, "{result}");
        assert_eq!(result["rows_rejected"], 0, "{result}");
        let url = app.target_url();
        let types = format!(
            "SELECT string_agg(format_type(atttypid, atttypmod), ',' ORDER BY attnum)
             FROM pg_attribute WHERE attrelid = '{table}'::regclass AND attnum > 0"
        );
        assert_eq!(
            psql(&url, &types),
            "bigint,text,timestamp without time zone"
        );
        let amount = format!("SELECT amount FROM {table} WHERE id = 2000");
        assert_eq!(psql(&url, &amount), "1e400");
        let day = format!("SELECT day FROM {table} WHERE id = 2002");
        assert_eq!(psql(&url, &day), "2024-01-01 00:00:00");
    }
}

/// A late value widens a column and the file is read again: the progress shown never moves
/// back (the second pass started again from nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_never_moves_back_across_a_widening_pass() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("import", 1)]).await;
    let mut csv = big_csv(400_000);
    csv.extend_from_slice(b"400000,n/a,last,2024-01-01 00:00:00+00\n");
    let dataset = app.upload_dataset("late_text.csv", &csv).await;
    let payload = json!({"dataset_id": dataset, "target": {"table": "late_text"}});
    let id = submit_import(&app, payload).await;
    let job = app.wait_status(id, &["succeeded", "failed"], WAIT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        psql(
            &app.target_url(),
            "SELECT amount FROM late_text WHERE id = 400000"
        ),
        "n/a"
    );
    let progress = progress_events(&app, id).await;
    assert!(progress.len() >= 3, "{progress:?}");
    assert!(
        progress.windows(2).all(|w| w[0] <= w[1]),
        "progress moved back: {progress:?}"
    );
}

const MALFORMED_CSV: &[u8] = b"id,amount,name\n1,10,ok\n2,12x,bad number\n3,30\n4,40,ok again\n5,50,bad \xff utf8\n6,60,\"last\"\n";

async fn target_with_rows(app: &TestApp) -> String {
    psql(
        &app.target_url(),
        "CREATE TABLE target (id bigint PRIMARY KEY, amount integer, name text)",
    );
    psql(
        &app.target_url(),
        "INSERT INTO target VALUES (100, 1, 'before')",
    );
    checksum(&app.target_url(), "target")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_csv_under_abort_leaves_the_target_untouched() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("import", 1)]).await;
    let before = target_with_rows(&app).await;
    let dataset = app.upload_dataset("bad.csv", MALFORMED_CSV).await;
    let job = import_failed(
        &app,
        json!({"dataset_id": dataset, "target": {"table": "target"}, "mode": "append"}),
    )
    .await;
    assert_eq!(job["attempt"], 1, "a bad file is not retried: {job}");
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains("line 3") && error.contains("\"amount\"") && error.contains("12x"),
        "{error}"
    );
    assert_eq!(checksum(&app.target_url(), "target"), before);
    assert_eq!(
        psql(
            &app.target_url(),
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'conveyor\\_import\\_%'"
        ),
        "0"
    );
}

/// Rows the target refuses when the import applies them were never written: they counted in
/// the attempt's `rows_written`, and so against `max_rows_per_day` (a retried apply, twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_the_target_refuses_do_not_count_as_imported() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("import", 1)]).await;
    psql(
        &app.target_url(),
        "CREATE TABLE positive (id bigint PRIMARY KEY, amount integer CHECK (amount > 0))",
    );
    let csv = b"id,amount\n1,10\n2,-5\n3,30\n";
    let dataset = app.upload_dataset("refused.csv", csv).await;
    let job = import_failed(
        &app,
        json!({"dataset_id": dataset, "target": {"table": "positive"}, "mode": "append"}),
    )
    .await;
    assert!(job["error"].as_str().unwrap().contains("amount"), "{job}");
    assert_eq!(
        psql(&app.target_url(), "SELECT count(*) FROM positive"),
        "0"
    );
    let (_, tenant) = app.get("/v1/tenant").await;
    assert_eq!(tenant["usage"]["rows_imported_today"], 0, "{tenant}");
}

/// An attempt that overlaps an earlier one which commits (a worker thought lost, whose job
/// was rescued) fails on what it writes (the ledger's key, the table it creates); the import
/// is then done, once, and the job succeeds with the committed result (it failed, its
/// webhook and pipeline told so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_overlapping_one_that_commits_succeeds_with_its_result() {
    let mut app = TestApp::spawn().await;
    let dataset = app.upload_dataset("raced.csv", b"id\n1\n2\n").await;
    let id = submit_import(
        &app,
        json!({"dataset_id": dataset, "target": {"table": "raced"}}),
    )
    .await;
    // The earlier attempt, committing: its ledger row written, not yet committed.
    let admin = sqlx::PgPool::connect(&app.target_admin_url())
        .await
        .unwrap();
    sqlx::raw_sql(
        "SET ROLE conveyor_platform;
         CREATE TABLE IF NOT EXISTS conveyor.imports (
             job_id uuid PRIMARY KEY, result jsonb NOT NULL,
             finished_at timestamptz NOT NULL DEFAULT now());
         RESET ROLE",
    )
    .execute(&admin)
    .await
    .unwrap();
    let mut earlier = admin.begin().await.unwrap();
    let result = json!({"table": "raced", "mode": "create", "rows_read": 2, "rows_imported": 2,
        "rows_rejected": 0, "rows_applied": 2, "bytes": 7, "columns": [], "artifacts": [],
        "duration_ms": 1, "rows_per_sec": 2, "outputs": {"table": "raced"}});
    sqlx::query("INSERT INTO conveyor.imports (job_id, result) VALUES ($1, $2)")
        .bind(id)
        .bind(&result)
        .execute(&mut *earlier)
        .await
        .unwrap();
    app.start_worker_for(&[("import", 1)]).await;
    // This attempt's ledger row waits on the earlier one's.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'
               AND query LIKE 'INSERT INTO conveyor.imports%'",
        )
        .fetch_one(&admin)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        if std::time::Instant::now() > deadline {
            let waits: Vec<(Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT wait_event_type, query FROM pg_stat_activity WHERE datname = current_database()",
            )
            .fetch_all(&admin)
            .await
            .unwrap();
            panic!(
                "the attempt never reached its ledger: {waits:?} {}",
                app.job(id).await
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    earlier.commit().await.unwrap();
    let job = app
        .wait_status(id, &["succeeded", "failed", "cancelled"], WAIT)
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"]["rows_imported"], 2, "{job}");
}

/// `rejected.csv` keeps the start of a long rejected record, with its length and checksum:
/// it kept each whole (a thousand 16 MiB records of quotes, doubled by CSV quoting: gigabytes
/// on the worker's disk from a small compressed upload).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_csv_keeps_the_start_of_a_long_record() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("import", 1)]).await;
    // Rows of one field too many, each with a long value.
    let mut csv = b"id,name\n1,a\n".to_vec();
    for _ in 0..40 {
        csv.extend_from_slice(b"2,b,");
        csv.extend(std::iter::repeat_n(b'x', 99_996));
        csv.push(b'\n');
    }
    let dataset = app.upload_dataset("long.csv", &csv).await;
    let id = submit_import(
        &app,
        json!({"dataset_id": dataset, "target": {"table": "quoted"}, "on_error": "skip"}),
    )
    .await;
    let job = app.wait_status(id, &["succeeded", "failed"], WAIT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"]["rows_rejected"], 40, "{job}");
    let url = job["result"]["artifacts"][0]["url"].as_str().unwrap();
    let (status, rejected) = app.get_bytes(url).await;
    assert_eq!(status, StatusCode::OK);
    assert!(rejected.len() < 512 << 10, "{} bytes", rejected.len());
    let text = String::from_utf8_lossy(&rejected);
    assert!(text.contains("… (100000 bytes, sha256 "), "{:.300}", text);
}

/// A header's name past PostgreSQL's 63 bytes fails the import naming its start (PostgreSQL
/// cut it silently, and each rejected row's line in `rejected.csv` quoted it whole: a
/// megabyte-long name made a small upload gigabytes on the worker's disk: here 2 MB); named in
/// `columns`, the file imports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_name_past_63_bytes_must_be_renamed() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("import", 1)]).await;
    let long = "n".repeat(10_000);
    let mut csv = format!("id,{long}\n").into_bytes();
    for i in 0..200 {
        csv.extend_from_slice(format!("{i},a\0b\n").as_bytes());
    }
    let dataset = app.upload_dataset("long-name.csv", &csv).await;
    let job = import_failed(
        &app,
        json!({"dataset_id": dataset, "target": {"table": "named"}, "on_error": "skip",
               "max_errors": 1000}),
    )
    .await;
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains("has a name past the 63 bytes") && error.len() < 1024,
        "{error:.300}"
    );
    assert_eq!(
        psql(
            &app.target_url(),
            "SELECT count(*) FROM pg_tables WHERE tablename = 'named'"
        ),
        "0"
    );
    let result = import_ok(
        &app,
        json!({"dataset_id": dataset, "target": {"table": "named"}, "on_error": "skip",
               "max_errors": 1000, "columns": [{"source": "id"}, {"source": long, "name": "note"}]}),
    )
    .await;
    assert_eq!(result["rows_rejected"], 200, "{result}");
    let url = result["artifacts"][0]["url"].as_str().unwrap();
    let (status, rejected) = app.get_bytes(url).await;
    assert_eq!(status, StatusCode::OK);
    assert!(rejected.len() < 200 * 1024, "{} bytes", rejected.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_csv_under_skip_imports_the_rest_and_reports_each_rejected_row() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("import", 1)]).await;
    target_with_rows(&app).await;
    let dataset = app.upload_dataset("bad.csv", MALFORMED_CSV).await;
    let id = submit_import(&app, json!({"dataset_id": dataset, "target": {"table": "target"}, "mode": "append", "on_error": "skip"})).await;
    let job = app.wait_status(id, &["succeeded", "failed"], WAIT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let result = &job["result"];
    assert_eq!(
        (
            result["rows_read"].as_u64(),
            result["rows_imported"].as_u64(),
            result["rows_rejected"].as_u64()
        ),
        (Some(6), Some(3), Some(3)),
        "{result}"
    );
    assert_eq!(
        psql(
            &app.target_url(),
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM target"
        ),
        "1,4,6,100"
    );

    let url = result["artifacts"][0]["url"].as_str().unwrap();
    let (status, rejected) = app.get_bytes(url).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8_lossy(&rejected);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "line,column,reason,record");
    assert_eq!(
        lines[1], r#"3,amount,"invalid integer ""12x""","2,12x,""bad number""""#,
        "{text}"
    );
    assert!(
        lines[2].starts_with("4,,\"expected 3 fields, found 2\",\"3,30\""),
        "{text}"
    );
    assert!(
        lines[3].starts_with("6,name,invalid UTF-8 at byte 4,"),
        "{text}"
    );
    assert_eq!(lines.len(), 4, "{text}");

    // Too many rejected rows for max_errors: nothing imported.
    let before = checksum(&app.target_url(), "target");
    let job = import_failed(&app, json!({"dataset_id": dataset, "target": {"table": "target"}, "mode": "append", "on_error": "skip", "max_errors": 2})).await;
    assert!(
        job["error"]
            .as_str()
            .unwrap()
            .contains("more than 2 rows rejected"),
        "{job}"
    );
    assert_eq!(checksum(&app.target_url(), "target"), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upsert_inserts_and_updates_by_key_and_replace_swaps_the_table() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("import", 1)]).await;
    psql(
        &app.target_url(),
        "CREATE TABLE people (id bigint PRIMARY KEY, name text, age integer)",
    );
    psql(
        &app.target_url(),
        "INSERT INTO people VALUES (1, 'ann', 30), (2, 'bob', 40)",
    );
    let csv = b"id,name,age\n2,bobby,41\n3,cid,50\n3,cid-last,51\n";
    let dataset = app.upload_dataset("people.csv", csv).await;
    let result = import_ok(&app, json!({"dataset_id": dataset, "target": {"table": "people"}, "mode": "upsert", "key_columns": ["id"]})).await;
    assert_eq!(result["rows_applied"], 2, "{result}");
    assert_eq!(
        psql(
            &app.target_url(),
            "SELECT string_agg(format('%s:%s:%s', id, name, age), ' ' ORDER BY id) FROM people"
        ),
        "1:ann:30 2:bobby:41 3:cid-last:51"
    );

    let csv = b"id,name,age\n9,zed,99\n";
    let dataset = app.upload_dataset("replacement.csv", csv).await;
    import_ok(
        &app,
        json!({"dataset_id": dataset, "target": {"table": "people"}, "mode": "replace"}),
    )
    .await;
    assert_eq!(
        psql(
            &app.target_url(),
            "SELECT string_agg(format('%s:%s:%s', id, name, age), ' ') FROM people"
        ),
        "9:zed:99"
    );
    // The swapped-in table keeps the original's key.
    assert_eq!(
        psql(
            &app.target_url(),
            "SELECT count(*) FROM pg_index WHERE indrelid = 'people'::regclass AND indisprimary"
        ),
        "1"
    );
}

/// A CSV big enough that an import takes a few seconds.
fn big_csv(rows: usize) -> Vec<u8> {
    let mut csv = String::with_capacity(rows * 60);
    csv.push_str("id,amount,name,at\n");
    for i in 0..rows {
        csv.push_str(&format!(
            "{i},{}.{:02},name number {i},2024-01-01 00:00:{:02}+00\n",
            i % 1000,
            i % 100,
            i % 60
        ));
    }
    csv.into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_import_leaves_the_target_untouched() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("import", 1)]).await;
    psql(
        &app.target_url(),
        "CREATE TABLE big (id bigint, amount numeric, name text, at timestamptz)",
    );
    let dataset = app.upload_dataset("big.csv", &big_csv(2_000_000)).await;
    let id = submit_import(
        &app,
        json!({"dataset_id": dataset, "target": {"table": "big"}, "mode": "append"}),
    )
    .await;
    wait_for_progress(&app, id).await;
    let (status, _) = app.post(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let job = app
        .wait_status(id, &["succeeded", "failed", "cancelled"], WAIT)
        .await;
    assert_eq!(job["status"], "cancelled", "{job}");
    assert_eq!(psql(&app.target_url(), "SELECT count(*) FROM big"), "0");
    assert_eq!(
        psql(
            &app.target_url(),
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'conveyor\\_import\\_%'"
        ),
        "0"
    );
}

/// A sweep reads a bounded number of staging tables from a target (a tenant's own database
/// may hold millions), and the next one reads on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_reads_at_most_a_thousand_staging_tables() {
    let app = TestApp::spawn().await;
    let jobs: Vec<Uuid> = (0..1005).map(|_| Uuid::now_v7()).collect();
    sqlx::query(
        "INSERT INTO jobs (id, tenant_id, kind, status, payload, attempt)
         SELECT id, $2, 'import', 'failed', '{}', 1 FROM unnest($1::uuid[]) id",
    )
    .bind(&jobs)
    .bind(app.tenant)
    .execute(app.pool())
    .await
    .unwrap();
    let create: String = jobs
        .iter()
        .map(|job| format!("CREATE TABLE conveyor_import_{} (a int);", job.simple()))
        .collect();
    psql(&app.target_url(), &create);
    let left = || {
        psql(
            &app.target_url(),
            "SELECT count(*) FROM pg_tables \
             WHERE schemaname = current_schema() AND tablename LIKE 'conveyor\\_import\\_%'",
        )
    };
    app.registry().sweep().await;
    assert_eq!(left(), "5");
    app.registry().sweep().await;
    assert_eq!(left(), "0");
}

/// A job whose last attempt died with its worker leaves its staging table behind: the
/// maintenance sweep drops it once the job has ended, and only then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_drops_staging_tables_of_ended_imports_only() {
    let app = TestApp::spawn().await;
    let dataset = app.upload_dataset("small.csv", b"a\n1\n").await;
    let payload = json!({"dataset_id": dataset, "target": {"table": "t"}, "mode": "create"});
    let (ended, waiting) = (
        submit_import(&app, payload.clone()).await,
        submit_import(&app, payload).await,
    );
    let (status, _) = app
        .post(&format!("/v1/jobs/{ended}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let unknown = Uuid::new_v4();
    // Staging tables live beside the target table, in the tenant's schema.
    let staging = |job: Uuid| format!("conveyor_import_{}", job.simple());
    for job in [ended, waiting, unknown] {
        psql(
            &app.target_url(),
            &format!("CREATE TABLE {} (a int)", staging(job)),
        );
    }
    app.registry().sweep().await;
    let left = psql(
        &app.target_url(),
        "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables \
         WHERE schemaname = current_schema() AND tablename LIKE 'conveyor\\_import\\_%'",
    );
    let mut expected = [staging(waiting), staging(unknown)];
    expected.sort();
    assert_eq!(left, expected.join(","));
}

async fn wait_for_progress(app: &TestApp, id: Uuid) {
    let deadline = Instant::now() + WAIT;
    loop {
        let job = app.job(id).await;
        if job["progress"].as_f64().unwrap_or(0.0) > 0.0 {
            return;
        }
        assert!(Instant::now() < deadline, "no progress: {job}");
        assert_eq!(
            job["status"].as_str().map(|s| s == "succeeded"),
            Some(false),
            "finished before it could be interrupted: {job}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_import_leaves_the_target_untouched_and_the_retry_imports_once() {
    let app = TestApp::spawn().await;
    psql(
        &app.target_url(),
        "CREATE TABLE big (id bigint, amount numeric, name text, at timestamptz)",
    );
    let rows = 2_000_000;
    let dataset = app.upload_dataset("big.csv", &big_csv(rows)).await;
    let mut victim = app.spawn_worker_process("import=1");
    let id = submit_import(
        &app,
        json!({"dataset_id": dataset, "target": {"table": "big"}, "mode": "append"}),
    )
    .await;
    wait_for_progress(&app, id).await;
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();
    assert_eq!(
        psql(&app.target_url(), "SELECT count(*) FROM big"),
        "0",
        "a killed import changed the target"
    );

    let _rescuer = app.spawn_worker_process("import=1");
    let job = app
        .wait_status(id, &["succeeded", "failed", "cancelled"], WAIT)
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 2, "{job}");
    assert_eq!(
        psql(
            &app.target_url(),
            "SELECT count(*), count(DISTINCT id) FROM big"
        ),
        format!("{rows}|{rows}")
    );
    assert_eq!(
        psql(
            &app.target_url(),
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'conveyor\\_import\\_%'"
        ),
        "0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_requests_are_checked_before_anything_is_queued() {
    let app = TestApp::spawn().await;
    let dataset = app.upload_dataset("people.csv", b"id,name\n1,ann\n").await;
    psql(
        &app.target_url(),
        "CREATE TABLE existing (id bigint, name text)",
    );
    let cases = [
        (
            json!({"dataset_id": Uuid::new_v4(), "target": {"table": "t"}}),
            404,
            "",
        ),
        (
            json!({"dataset_id": dataset, "target": {"table": "bad-name; drop"}}),
            422,
            "payload.target.table",
        ),
        (
            json!({"dataset_id": dataset, "target": {"table": "t"}, "mode": "upsert"}),
            422,
            "payload.key_columns",
        ),
        (
            json!({"dataset_id": dataset, "target": {"table": "existing"}, "mode": "upsert", "key_columns": ["nope"]}),
            422,
            "payload.key_columns[0]",
        ),
        (
            json!({"dataset_id": dataset, "target": {"table": "t"}, "key_columns": ["id"]}),
            422,
            "payload.key_columns",
        ),
        (
            json!({"dataset_id": dataset, "target": {"table": "t"}, "max_errors": 5}),
            422,
            "payload.max_errors",
        ),
        (
            json!({"dataset_id": dataset, "target": {"table": "t"}, "columns": [{"source": "missing"}]}),
            422,
            "payload.columns[0].source",
        ),
        (
            json!({"dataset_id": dataset, "target": {"table": "t"}, "columns": [{"source": "id", "type": "money!"}]}),
            422,
            "payload.columns[0].type",
        ),
        (
            json!({"dataset_id": dataset, "target": {"table": "existing"}}),
            422,
            "payload.target.table",
        ),
        (
            json!({"dataset_id": dataset, "target": {"table": "absent"}, "mode": "append"}),
            422,
            "payload.target.table",
        ),
        (
            json!({"dataset_id": dataset, "target": {"table": "t", "connection_id": Uuid::new_v4()}}),
            404,
            "",
        ),
        (
            json!({"dataset_id": dataset, "target": {"table": "t"}, "csv": {"delimiter": ";;"}}),
            422,
            "payload.csv.delimiter",
        ),
        (
            json!({"dataset_id": "not-a-uuid", "target": {"table": "t"}}),
            422,
            "payload.dataset_id",
        ),
    ];
    for (payload, status, field) in cases {
        let (got, problem) = app
            .post("/v1/jobs", &json!({"kind": "import", "payload": payload}))
            .await;
        assert_eq!(got.as_u16(), status, "{payload}: {problem}");
        if !field.is_empty() {
            assert_eq!(problem["errors"][0]["field"], field, "{payload}: {problem}");
        }
    }
    // Another tenant's dataset is unknown to this one.
    let other = app.key_for("umbrella").await;
    let response = app
        .client
        .post(app.url("/v1/jobs"))
        .bearer_auth(other)
        .json(&json!({"kind": "import", "payload": {"dataset_id": dataset, "target": {"table": "t"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let (_, jobs) = app.get("/v1/jobs").await;
    assert_eq!(
        jobs["jobs"].as_array().unwrap().len(),
        0,
        "nothing was queued: {jobs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datasets_stream_in_and_out_with_their_schema() {
    let app = TestApp::spawn_with(|s| s.dataset_limit = 1 << 20).await;
    let id = app
        .upload_dataset("tricky.csv", TRICKY_CSV.as_bytes())
        .await;
    let (status, dataset) = app.get(&format!("/v1/datasets/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(dataset["format"], "csv");
    assert_eq!(dataset["size_bytes"], TRICKY_CSV.len());
    use sha2::Digest;
    assert_eq!(
        dataset["sha256"],
        hex::encode(sha2::Sha256::digest(TRICKY_CSV.as_bytes()))
    );
    let names: Vec<&str> = dataset["schema"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["id", "amount", "ratio", "name", "happened", "day", "flag"]
    );
    assert_eq!(dataset["schema"][0]["type"], "bigint");
    assert_eq!(dataset["preview"][0]["name"], "plain", "{dataset}");

    let (status, download) = app.get_bytes(&format!("/v1/datasets/{id}/download")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(download, TRICKY_CSV.as_bytes());
    let (_, list) = app.get("/v1/datasets").await;
    assert_eq!(list["datasets"][0]["id"], id.to_string());

    // Too large, unknown format, empty: refused, nothing stored.
    let big = vec![b'a'; (1 << 20) + 1];
    for (name, body, status) in [
        ("big.csv", big, 413),
        ("notes.docx", b"x".to_vec(), 422),
        ("empty.csv", Vec::new(), 422),
    ] {
        let response = app
            .client
            .post(app.url("/v1/datasets"))
            .query(&[("name", name)])
            .bearer_auth(&app.key)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{name}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
    let (_, list) = app.get("/v1/datasets").await;
    assert_eq!(list["datasets"].as_array().unwrap().len(), 1);

    // In use by live jobs: 409 naming ten of them (all of thousands were named); then deleted.
    let import = json!({"kind": "import", "payload": {"dataset_id": id, "target": {"table": "t"}}});
    let (status, body) = app
        .post("/v1/jobs/batch", &json!({"jobs": vec![import; 12]}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, problem) = app.delete_answered(&format!("/v1/datasets/{id}")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let detail = problem["detail"].as_str().unwrap();
    let named = detail
        .split([' ', ','])
        .filter(|word| Uuid::parse_str(word).is_ok())
        .count();
    assert_eq!(named, 10, "{detail}");
    assert!(detail.ends_with("and more"), "{detail}");
    let (status, _) = app.post("/v1/jobs/cancel", &json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let status = app.delete(&format!("/v1/datasets/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        app.get(&format!("/v1/datasets/{id}")).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_keep_their_credentials_secret_and_imports_use_them() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("import", 1)]).await;
    let warehouse = app.warehouse().await;
    let url = warehouse.url.clone();
    let (status, connection) = app
        .post("/v1/connections", &json!({"name": "warehouse", "url": url}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{connection}");
    assert!(
        !connection.to_string().contains("postgres://"),
        "{connection}"
    );
    let (status, _) = app
        .post("/v1/connections", &json!({"name": "warehouse", "url": url}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, problem) = app
        .post(
            "/v1/connections",
            &json!({"name": "x", "url": "mysql://nope"}),
        )
        .await;
    assert_eq!(
        (status, problem["errors"][0]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("url"))
    );
    let (status, _) = app
        .post(
            "/v1/connections",
            &json!({"name": "x", "url": "postgres://postgres@127.0.0.1:1/none"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let stored = psql(
        &app.settings.database_url,
        "SELECT encode(url_encrypted, 'escape') FROM connections",
    );
    assert!(!stored.contains("127.0.0.1"), "stored in clear: {stored}");

    let dataset = app.upload_dataset("people.csv", b"id,name\n1,ann\n").await;
    let id = connection["id"].as_str().unwrap();
    import_ok(
        &app,
        json!({"dataset_id": dataset, "target": {"table": "via_connection", "connection_id": id}}),
    )
    .await;
    assert_eq!(psql(&url, "SELECT name FROM via_connection"), "ann");
    let (_, list) = app.get("/v1/connections").await;
    assert_eq!(list[0]["name"], "warehouse");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_file_imports_in_bounded_memory() {
    // 2 GB by default, as the issue asks; CONVEYOR_TEST_BIG_IMPORT_MB makes it smaller or larger.
    let megabytes: u64 = std::env::var("CONVEYOR_TEST_BIG_IMPORT_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let app = TestApp::spawn_with(|s| s.dataset_limit = 8 << 30).await;
    // A streamed body: the test never holds the file either.
    let row = |i: u64| {
        format!(
            // Fixed width, so the row count for a size is exact.
            "{i:010},{:03},\"name {i:010}, quoted\",2024-01-01 00:00:{:02}+00,{:03}.5\n",
            i % 977,
            i % 60,
            i % 1000
        )
    };
    let row_bytes = row(0).len() as u64;
    let rows = (megabytes * 1_000_000).div_ceil(row_bytes);
    let chunks = futures::stream::iter((0..rows).step_by(10_000).map(move |start| {
        let mut chunk = if start == 0 {
            String::from("id,amount,name,at,price\n")
        } else {
            String::new()
        };
        for i in start..(start + 10_000).min(rows) {
            chunk.push_str(&row(i));
        }
        Ok::<_, std::io::Error>(chunk)
    }));
    let response = app
        .client
        .post(app.url("/v1/datasets"))
        .query(&[("name", "big.csv")])
        .bearer_auth(&app.key)
        .timeout(Duration::from_secs(1800))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    let dataset: Value = response.json().await.unwrap();
    assert!(
        dataset["size_bytes"].as_u64().unwrap() >= megabytes * 1_000_000,
        "{dataset}"
    );

    let worker = app.spawn_worker_process("import=1");
    let columns = "id bigint, amount integer, name text, at timestamptz, price numeric";
    let id = submit_import(&app, json!({"dataset_id": dataset["id"], "target": {"table": "big"}, "columns": typed_columns(columns)})).await;
    let job = app
        .wait_status(
            id,
            &["succeeded", "failed", "cancelled"],
            Duration::from_secs(1800),
        )
        .await;
    let peak = peak_rss_mb(worker.id());
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"]["rows_imported"].as_u64(), Some(rows));
    assert!(
        peak < 500,
        "worker peak RSS {peak} MB for a {megabytes} MB file"
    );
    eprintln!(
        "{megabytes} MB, {rows} rows: worker peak RSS {peak} MB, {} rows/s (debug build)",
        job["result"]["rows_per_sec"]
    );
}
