//! Saved models and `sample` jobs through the API: a synthesis saves its copula, `sample` draws
//! from it under conditions, and the model stays its tenant's.

use crate::harness::TestApp;
use jobs::synthesis::{
    stats::standard_normal,
    table::{self, Table, Values},
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{json, Value};
use shared::datasets::{Compression, Format};
use std::{fmt::Write, time::Duration};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(120);
/// Planted on one training row each, in identifier columns: neither may reach the model.
const PLANTED_TEXT: &str = "PLANTED-SECRET-7f3a9c";
const PLANTED_NUMBER: &str = "987654321";

/// `id` (unique text), `serial` (unique integers), `city` (X 50 %, Y 30 %, Z 20 %), `amount`
/// (shifted by city), `visits` (small counts, more in Z).
fn customers_csv(rows: usize) -> String {
    let mut rng = StdRng::seed_from_u64(11);
    let mut csv = String::from("id,serial,city,amount,visits\n");
    for i in 0..rows {
        let u: f64 = rng.random();
        let (city, shift) = match u {
            u if u < 0.5 => ("X", 0.0),
            u if u < 0.8 => ("Y", 1.0),
            _ => ("Z", 2.0),
        };
        let amount = 100.0 + 20.0 * shift + 10.0 * standard_normal(&mut rng);
        let visits = (rng.random::<f64>() * 3.0) as u32 + 2 * shift as u32;
        let id = match i {
            17 => PLANTED_TEXT.to_owned(),
            _ => format!("cust-{i:05}"),
        };
        let serial = match i {
            23 => PLANTED_NUMBER.to_owned(),
            _ => (1000 + i * 7).to_string(),
        };
        writeln!(csv, "{id},{serial},{city},{amount:.3},{visits}").unwrap();
    }
    csv
}

async fn submit(app: &TestApp, key: &str, kind: &str, payload: Value) -> (StatusCode, Value) {
    app.post_as(key, "/v1/jobs", &json!({"kind": kind, "payload": payload}))
        .await
}

/// Submits and waits for the job's end.
async fn finish(app: &TestApp, kind: &str, payload: Value) -> Value {
    let (status, job) = submit(app, &app.key, kind, payload).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    app.wait_status(id, &["succeeded", "failed", "cancelled"], WAIT)
        .await
}

async fn succeed(app: &TestApp, kind: &str, payload: Value) -> Value {
    let job = finish(app, kind, payload).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    job
}

fn output(app: &TestApp, job: &Value) -> (Table, Vec<u8>) {
    let artifact = &job["result"]["artifacts"][0];
    let name = artifact["name"].as_str().unwrap();
    let path = app
        .settings
        .data_dir
        .join("artifacts")
        .join(job["id"].as_str().unwrap())
        .join(name);
    let format = match name.ends_with(".csv") {
        true => Format::Csv,
        false => Format::Parquet,
    };
    let cap = jobs::limits::Limits::new(&app.settings).held();
    let table = table::read(&path, format, Compression::None, cap).unwrap();
    (table, std::fs::read(&path).unwrap())
}

/// A level the model never generates: refused at submit, naming the field.
async fn refuses_a_level_it_never_generates(app: &TestApp, model_id: &str) {
    let payload = json!({"model_id": model_id, "rows": 10, "conditions": {"city": "Nowhere"}});
    let (status, problem) = submit(app, &app.key, "sample", payload).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "payload.conditions.city");
}

fn model_path(app: &TestApp, model_id: &str) -> std::path::PathBuf {
    let tenant = app.tenant;
    let path = format!("tenants/{tenant}/models/{model_id}");
    app.settings.data_dir.join(path)
}

/// The stored model file's text.
fn stored_model(app: &TestApp, model_id: &str) -> String {
    String::from_utf8(std::fs::read(model_path(app, model_id)).unwrap()).unwrap()
}

fn labels(table: &Table, column: &str) -> Vec<Option<String>> {
    match &table.column(column).unwrap().values {
        Values::Labels(v) => v.clone(),
        Values::Numbers(_) => panic!("{column} holds numbers"),
    }
}

/// Mean and variance of a numeric column over the rows `keep` selects.
fn moments(table: &Table, column: &str, keep: impl Fn(usize) -> bool) -> (f64, f64, usize) {
    let Values::Numbers(values) = &table.column(column).unwrap().values else {
        panic!("{column} holds labels")
    };
    let kept: Vec<f64> = (0..values.len())
        .filter(|&row| keep(row))
        .filter_map(|row| values[row])
        .collect();
    let n = kept.len() as f64;
    let mean = kept.iter().sum::<f64>() / n;
    let variance = kept.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, variance, kept.len())
}

#[tokio::test]
async fn a_saved_model_samples_under_conditions_without_refitting_and_holds_no_training_row() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("synthesis", 1), ("sample", 2)])
        .await;
    let dataset = app
        .upload_dataset("customers.csv", customers_csv(3000).as_bytes())
        .await;
    let fitted = succeed(
        &app,
        "synthesis",
        json!({"dataset_id": dataset, "rows": 100, "seed": 1, "save_model": true,
               "model_name": "customers"}),
    )
    .await;
    let model_id = fitted["result"]["outputs"]["model_id"].as_str().unwrap();

    // Listed and described.
    let (status, list) = app.get("/v1/models?limit=10").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["models"].as_array().unwrap().len(), 1, "{list}");
    let (status, model) = app.get(&format!("/v1/models/{model_id}")).await;
    assert_eq!(status, StatusCode::OK, "{model}");
    assert_eq!(
        (&model["name"], &model["version"], &model["synthesizer"]),
        (&json!("customers"), &json!(1), &json!("gaussian_copula"))
    );
    assert_eq!(model["training_rows"], 2400);
    assert_eq!(model["epsilon_spent"], Value::Null);
    assert_eq!(model["job_id"], fitted["id"]);
    assert!(
        model["quality"]["overall"].as_f64().unwrap() > 0.8,
        "{model}"
    );
    assert!(model["privacy"]["exact_match_rate"].is_number(), "{model}");
    let schema = model["schema"].as_array().unwrap();
    let names: Vec<&str> = schema.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["id", "serial", "city", "amount", "visits"]);
    assert_eq!(schema[0]["role"], "identifier");
    let mut cities: Vec<&str> = schema[2]["levels"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    cities.sort();
    assert_eq!(cities, ["X", "Y", "Z"]);
    let description = model["description"].as_str().unwrap();
    assert!(
        description.contains("holds no training row")
            && description.contains("1001 quantile knots")
            && description.contains("\"amount\""),
        "{description}"
    );

    // The stored model holds neither planted value.
    let bytes = stored_model(&app, model_id);
    assert!(bytes.contains("conveyor.gaussian_copula.v1"));
    assert!(bytes.contains("\"X\"") && bytes.contains("amount"));
    assert!(!bytes.contains(PLANTED_TEXT), "the planted text leaked");
    assert!(!bytes.contains(PLANTED_NUMBER), "the planted number leaked");
    assert!(!bytes.contains("cust-0"), "an identifier leaked");

    // 10,000 rows in city X: every one, and the other columns as the model has them in X
    // (from a large unconditioned sample of the same model, filtered to X).
    let conditioned = succeed(
        &app,
        "sample",
        json!({"model_id": model_id, "rows": 10000, "seed": 5, "conditions": {"city": "X"}}),
    )
    .await;
    let result = &conditioned["result"];
    assert_eq!(result["rows"], 10000);
    assert!(
        result["timings"]["sample_seconds"].as_f64().unwrap() > 0.0,
        "{result}"
    );
    assert!(result["timings"]["write_seconds"].is_number(), "{result}");
    let dataset_id = result["outputs"]["dataset_id"].as_str().unwrap();
    let (status, registered) = app.get(&format!("/v1/datasets/{dataset_id}")).await;
    assert_eq!(status, StatusCode::OK, "{registered}");
    let (sample, _) = output(&app, &conditioned);
    assert_eq!(sample.rows(), 10000);
    assert!(labels(&sample, "city")
        .iter()
        .all(|c| c.as_deref() == Some("X")));
    let free = succeed(
        &app,
        "sample",
        json!({"model_id": model_id, "rows": 100000, "seed": 6}),
    )
    .await;
    let (all, _) = output(&app, &free);
    let city = labels(&all, "city");
    let in_x = |row: usize| city[row].as_deref() == Some("X");
    for column in ["amount", "visits"] {
        let (mean, variance, n) = moments(&sample, column, |_| true);
        let (expected, variance_x, n_x) = moments(&all, column, in_x);
        let tolerance = 4.0 * (variance / n as f64 + variance_x / n_x as f64).sqrt();
        assert!(
            (mean - expected).abs() < tolerance,
            "{column}: mean {mean} under the condition, {expected} in the model's X rows \
             (tolerance {tolerance})"
        );
    }
    // Fresh identifiers, never the data's.
    assert_eq!(labels(&sample, "id")[0].as_deref(), Some("syn-1"));

    // Condition groups: exact counts per group, in order.
    let grouped = succeed(
        &app,
        "sample",
        json!({"model_id": model_id, "format": "csv", "conditions": [
            {"conditions": {"city": "Y"}, "rows": 300},
            {"conditions": {"city": "Z", "visits": 4}, "rows": 200},
            {"conditions": {}, "rows": 100}]}),
    )
    .await;
    let (groups, _) = output(&app, &grouped);
    assert_eq!(groups.rows(), 600);
    let city = labels(&groups, "city");
    assert!(city[..300].iter().all(|c| c.as_deref() == Some("Y")));
    assert!(city[300..500].iter().all(|c| c.as_deref() == Some("Z")));
    let Values::Numbers(visits) = &groups.column("visits").unwrap().values else {
        panic!()
    };
    assert!(visits[300..500].iter().all(|v| *v == Some(4.0)));

    // The same seed, the same file.
    let again = |seed: u64| {
        let payload = json!({"model_id": model_id, "rows": 2000, "seed": seed, "format": "csv",
                             "conditions": {"city": "Z"}});
        async { output(&app, &succeed(&app, "sample", payload).await).1 }
    };
    let (first, second, other) = (again(9).await, again(9).await, again(10).await);
    assert_eq!(first, second);
    assert_ne!(first, other);

    refuses_a_level_it_never_generates(&app, model_id).await;
    // A number is met exactly too, with the city as the model has it there (amount is
    // higher in Z), and one finer than the column's 3 decimals fails naming the column.
    let rich = succeed(
        &app,
        "sample",
        json!({"model_id": model_id, "rows": 2000, "seed": 4, "conditions": {"amount": 141.5}}),
    )
    .await;
    let (rich, _) = output(&app, &rich);
    let Values::Numbers(amount) = &rich.column("amount").unwrap().values else {
        panic!()
    };
    assert!(amount.iter().all(|a| *a == Some(141.5)));
    let in_z = labels(&rich, "city")
        .iter()
        .filter(|c| c.as_deref() == Some("Z"))
        .count();
    assert!(
        in_z > 2000 / 5,
        "Z is 20 % of all rows, more of the rich: {in_z}"
    );
    let failed = finish(
        &app,
        "sample",
        json!({"model_id": model_id, "rows": 10, "conditions": {"amount": 123.4567}}),
    )
    .await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("\"amount\"") && error.contains("3 decimal(s)"),
        "{failed}"
    );
}

#[tokio::test]
async fn a_model_is_its_tenants_alone_and_only_writers_delete_it() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("synthesis", 1), ("sample", 1)])
        .await;
    let dataset = app
        .upload_dataset("customers.csv", customers_csv(500).as_bytes())
        .await;
    let fitted = succeed(
        &app,
        "synthesis",
        json!({"dataset_id": dataset, "rows": 10, "save_model": true}),
    )
    .await;
    let model_id = fitted["result"]["outputs"]["model_id"].as_str().unwrap();
    let path = format!("/v1/models/{model_id}");
    let (_, before) = app.get(&path).await;
    assert_eq!(before["name"], "customers.csv", "named after the dataset");
    let call = |method: reqwest::Method, key: &str| {
        let request = app.client.request(method, app.url(&path)).bearer_auth(key);
        async move { request.send().await.unwrap().status() }
    };

    // Another tenant: not found, whatever it tries.
    let other = app.key_for("globex").await;
    assert_eq!(
        call(reqwest::Method::GET, &other).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(reqwest::Method::DELETE, &other).await,
        StatusCode::NOT_FOUND
    );
    let (status, problem) = submit(
        &app,
        &other,
        "sample",
        json!({"model_id": model_id, "rows": 10}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");
    let response = app
        .client
        .get(app.url("/v1/models"))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    let listed: Value = response.json().await.unwrap();
    assert_eq!(listed["models"], json!([]), "{listed}");

    // A read key reads, but neither deletes nor samples.
    let (status, created) = app.post("/v1/keys", &json!({"role": "read"})).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let read = created["key"].as_str().unwrap();
    assert_eq!(call(reqwest::Method::GET, read).await, StatusCode::OK);
    assert_eq!(
        call(reqwest::Method::DELETE, read).await,
        StatusCode::FORBIDDEN
    );
    let (status, _) = submit(
        &app,
        read,
        "sample",
        json!({"model_id": model_id, "rows": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, after) = app.get(&path).await;
    assert_eq!(
        (status, &after),
        (StatusCode::OK, &before),
        "nothing changed"
    );

    // Its own writer deletes it, with an audit row; then it is gone for sampling too.
    assert_eq!(app.delete(&path).await, StatusCode::NO_CONTENT);
    assert_eq!(app.get(&path).await.0, StatusCode::NOT_FOUND);
    assert!(
        !model_path(&app, model_id).exists(),
        "the model's file is deleted"
    );
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action = 'model.delete' AND target_id = $1",
    )
    .bind(model_id)
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(audited, 1);
    let (status, _) = submit(
        &app,
        &app.key,
        "sample",
        json!({"model_id": model_id, "rows": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_saved_ctgan_or_tvae_samples_under_conditions_and_says_what_it_holds() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("synthesis", 1), ("sample", 1)])
        .await;
    let dataset = app
        .upload_dataset("customers.csv", customers_csv(1000).as_bytes())
        .await;
    for synthesizer in ["ctgan", "tvae"] {
        let fitted = succeed(
            &app,
            "synthesis",
            json!({"dataset_id": dataset, "rows": 10, "seed": 1, "save_model": true,
                   "synthesizer": synthesizer, "epochs": 2, "model_name": synthesizer}),
        )
        .await;
        let model_id = fitted["result"]["outputs"]["model_id"].as_str().unwrap();
        let (status, model) = app.get(&format!("/v1/models/{model_id}")).await;
        assert_eq!(status, StatusCode::OK, "{model}");
        assert_eq!(model["synthesizer"], synthesizer, "{model}");
        assert_eq!(model["schema"][2]["levels"].as_array().unwrap().len(), 3);
        let description = model["description"].as_str().unwrap();
        assert!(
            description.contains("not differentially private")
                && description.contains("\"amount\""),
            "{description}"
        );
        let bytes = stored_model(&app, model_id);
        assert!(bytes.contains(&format!("conveyor.{synthesizer}.v1")));
        assert!(!bytes.contains(PLANTED_TEXT) && !bytes.contains(PLANTED_NUMBER));
        assert!(!bytes.contains("cust-0"), "an identifier leaked");

        let sampled = succeed(
            &app,
            "sample",
            json!({"model_id": model_id, "rows": 500, "seed": 3, "conditions": {"city": "Z"}}),
        )
        .await;
        let (sample, _) = output(&app, &sampled);
        assert_eq!(sample.rows(), 500);
        assert!(labels(&sample, "city")
            .iter()
            .all(|c| c.as_deref() == Some("Z")));
        refuses_a_level_it_never_generates(&app, model_id).await;
    }
}
