//! The `synthesis` job through the API: upload a table of known structure, synthesize, and
//! check the report and the synthetic file against that structure.

use crate::harness::TestApp;
use jobs::synthesis::{
    stats::standard_normal,
    table::{self, Table, Values},
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::{json, Value};
use sha2::Digest;
use shared::datasets::{Compression, Format};
use std::{collections::HashSet, fmt::Write, time::Duration};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(120);

/// `id` (unique text), `serial` (unique integers), `x` ~ N(50, 10) with 10 % missing,
/// `y` = x-correlated (ρ = 0.8), `band` (x's tercile), `flag` (independent, 30 % yes),
/// `visits` (small counts).
fn mixed_csv(rows: usize, seed: u64) -> String {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut csv = String::from("id,serial,x,y,band,flag,visits\n");
    for i in 0..rows {
        let a = standard_normal(&mut rng);
        let b = 0.8 * a + 0.6 * standard_normal(&mut rng);
        let x = if rng.random::<f64>() < 0.1 {
            String::new()
        } else {
            format!("{:.3}", 50.0 + 10.0 * a)
        };
        let band = if a > 0.43 {
            "high"
        } else if a > -0.43 {
            "mid"
        } else {
            "low"
        };
        let flag = if rng.random::<f64>() < 0.3 {
            "yes"
        } else {
            "no"
        };
        let visits = (rng.random::<f64>() * 4.0) as u32 + u32::from(a > 1.0) * 3;
        writeln!(
            csv,
            "cust-{i:05},{},{x},{:.4},{band},{flag},{visits}",
            1000 + i * 7,
            100.0 + 20.0 * b
        )
        .unwrap();
    }
    csv
}

async fn submit(app: &TestApp, payload: Value) -> (reqwest::StatusCode, Value) {
    app.post(
        "/v1/jobs",
        &json!({"kind": "synthesis", "payload": payload}),
    )
    .await
}

/// Submits, waits for success, returns the job's result.
/// Submits a synthesis and waits for its end: its id and the finished job.
async fn finish(app: &TestApp, payload: Value) -> (Uuid, Value) {
    let (status, job) = submit(app, payload).await;
    assert_eq!(status, 202, "{job}");
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    let job = app
        .wait_status(id, &["succeeded", "failed", "cancelled"], WAIT)
        .await;
    (id, job)
}

async fn synthesize(app: &TestApp, payload: Value) -> (Uuid, Value) {
    let (id, job) = finish(app, payload).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    (id, job["result"].clone())
}

async fn app_with_worker() -> TestApp {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("synthesis", 2)]).await;
    app
}

fn artifact(app: &TestApp, job: Uuid, name: &str) -> std::path::PathBuf {
    app.settings
        .data_dir
        .join("artifacts")
        .join(job.to_string())
        .join(name)
}

fn read(app: &TestApp, job: Uuid, name: &str) -> Table {
    let format = if name.ends_with(".csv") {
        Format::Csv
    } else {
        Format::Parquet
    };
    let cap = jobs::limits::Limits::new(&app.settings).held();
    table::read(&artifact(app, job, name), format, Compression::None, cap).unwrap()
}

fn numbers(table: &Table, column: &str) -> Vec<Option<f64>> {
    match &table.column(column).unwrap().values {
        Values::Numbers(v) => v.clone(),
        Values::Labels(_) => panic!("{column} is not numeric"),
    }
}

fn labels(table: &Table, column: &str) -> Vec<Option<String>> {
    match &table.column(column).unwrap().values {
        Values::Labels(v) => v.clone(),
        Values::Numbers(v) => v.iter().map(|x| x.map(|x| x.to_string())).collect(),
    }
}

fn pair<'a>(report: &'a Value, a: &str, b: &str) -> &'a Value {
    report["quality"]["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["columns"] == json!([a, b]))
        .unwrap_or_else(|| panic!("no pair {a}/{b}"))
}

fn shape(report: &Value, column: &str) -> f64 {
    report["quality"]["shapes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["column"] == column)
        .unwrap_or_else(|| panic!("no shape for {column}"))["score"]
        .as_f64()
        .unwrap()
}

fn role(report: &Value, column: &str) -> String {
    report["columns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == column)
        .unwrap()["role"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn synthesis_copula_reproduces_marginals_and_correlations_and_never_copies_identifiers() {
    let app = app_with_worker().await;
    let csv = mixed_csv(3000, 1);
    let dataset = app.upload_dataset("customers.csv", csv.as_bytes()).await;
    let (job, result) = synthesize(
        &app,
        json!({"dataset_id": dataset, "rows": 2500, "seed": 3, "output_format": "csv"}),
    )
    .await;
    let report = &result["report"];

    assert_eq!(report["rows"]["input"], 3000);
    assert_eq!(report["rows"]["holdout"], 600);
    assert_eq!(report["rows"]["generated"], 2500);
    assert_eq!(role(report, "id"), "identifier");
    assert_eq!(role(report, "serial"), "identifier");
    assert_eq!(role(report, "x"), "numerical");
    assert_eq!(role(report, "band"), "categorical");
    let x_profile = &report["columns"].as_array().unwrap()[2];
    let missing = x_profile["missing_rate"].as_f64().unwrap();
    assert!((missing - 0.1).abs() < 0.02, "{missing}");

    let quality = &report["quality"];
    for column in ["x", "y", "band", "flag", "visits"] {
        assert!(shape(report, column) > 0.95, "{column}: {quality}");
    }
    let xy = pair(report, "x", "y");
    assert_eq!(xy["metric"], "CorrelationSimilarity");
    let (real, synthetic) = (
        xy["real_correlation"].as_f64().unwrap(),
        xy["synthetic_correlation"].as_f64().unwrap(),
    );
    assert!((real - 0.8).abs() < 0.05, "{xy}");
    assert!((real - synthetic).abs() < 0.05, "{xy}");
    // The band is a function of x: the copula keeps most of that.
    let xb = pair(report, "x", "band");
    assert!(
        xb["meets_threshold"] == true && xb["score"].as_f64().unwrap() > 0.7,
        "{xb}"
    );
    assert!(
        quality["column_shapes"].as_f64().unwrap() > 0.95,
        "{quality}"
    );
    assert!(quality["overall"].as_f64().unwrap() > 0.9, "{quality}");
    assert!(report["privacy"]["exact_match_rate"].as_f64().unwrap() < 0.01);
    assert!(
        report["privacy"]["dcr_synthetic_to_train"]["median"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(report["privacy"]["dcr_holdout_to_train"]["median"].is_number());
    let attack = &report["privacy"]["membership_inference"];
    assert!(attack["auc"].as_f64().unwrap() < 0.6, "{attack}");
    assert_eq!(report["privacy"]["epsilon_spent"], Value::Null);

    // The artifacts are listed and hold what the report says.
    let names: Vec<&str> = result["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["synthetic.csv", "report.json", "report.html"]);
    let (status, stored) = app
        .get(&format!("/v1/jobs/{job}/artifacts/report.json"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(&stored, report);
    // report.html downloads by default; viewed inline it is sandboxed (no script, an origin
    // of its own) and only the dashboard may frame it.
    let headers = |view: &'static str| {
        let request = app
            .client
            .get(app.url(&format!("/v1/jobs/{job}/artifacts/report.html{view}")))
            .bearer_auth(&app.key);
        async move {
            let response = request.send().await.unwrap();
            let header = |name| {
                response
                    .headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_owned())
            };
            (
                response.status(),
                header("content-disposition"),
                header("content-security-policy"),
                header("content-type"),
            )
        }
    };
    // Downloaded, a page is bytes (no frame or script of this origin can run it); shown in
    // place, it is a page in a sandbox.
    let (status, disposition, _, media_type) = headers("").await;
    assert_eq!(status, 200);
    assert!(disposition.unwrap().starts_with("attachment"));
    assert_eq!(media_type.as_deref(), Some("application/octet-stream"));
    let (status, disposition, csp, media_type) = headers("?view=inline").await;
    assert!(media_type.unwrap().starts_with("text/html"));
    assert_eq!(
        (status.as_u16(), disposition.as_deref()),
        (200, Some("inline"))
    );
    let csp = csp.unwrap();
    assert!(
        csp.starts_with("sandbox;") && csp.contains("frame-ancestors 'self'"),
        "{csp}"
    );
    let (status, _, _, _) = headers("?view=run").await;
    assert_eq!(status, 422);
    let synthetic = read(&app, job, "synthetic.csv");
    assert_eq!(synthetic.rows(), 2500);
    let names: Vec<&str> = synthetic.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["id", "serial", "x", "y", "band", "flag", "visits"]);

    // Identifiers are fresh: none equals an input value, and they stay unique.
    let input_column = |i: usize| -> HashSet<Option<String>> {
        csv.lines()
            .skip(1)
            .map(|line| Some(line.split(',').nth(i).unwrap().to_owned()))
            .collect()
    };
    for (i, column) in ["id", "serial"].into_iter().enumerate() {
        let seen = input_column(i);
        assert_eq!(seen.len(), 3000);
        let fresh = labels(&synthetic, column);
        assert!(
            fresh.iter().all(|v| v.is_some() && !seen.contains(v)),
            "{column}"
        );
        assert_eq!(fresh.iter().collect::<HashSet<_>>().len(), 2500);
    }
    // Types and precision survive: visits stay whole, x keeps three decimals.
    assert!(numbers(&synthetic, "visits")
        .iter()
        .flatten()
        .all(|v| v.fract() == 0.0));
    let x = numbers(&synthetic, "x");
    assert!(x
        .iter()
        .flatten()
        .all(|v| ((v * 1000.0).round() - v * 1000.0).abs() < 1e-6));
    let missing = x.iter().filter(|v| v.is_none()).count() as f64 / 2500.0;
    assert!((missing - 0.1).abs() < 0.03, "{missing}");
}

#[tokio::test]
async fn synthesis_of_categorical_only_and_numeric_only_tables() {
    let app = app_with_worker().await;
    let mut rng = StdRng::seed_from_u64(5);
    // A city decides its country, apart from 5 % noise.
    let mut categorical = String::from("city,country,tier\n");
    for _ in 0..1500 {
        let (city, country) = match rng.random_range(0..4) {
            0 => ("Oslo", "NO"),
            1 => ("Bergen", "NO"),
            2 => ("Rome", "IT"),
            _ => ("Milan", "IT"),
        };
        let country = if rng.random::<f64>() < 0.05 {
            "FR"
        } else {
            country
        };
        let tier = ["gold", "silver", "bronze"][rng.random_range(0..3)];
        writeln!(categorical, "{city},{country},{tier}").unwrap();
    }
    let dataset = app
        .upload_dataset("places.csv", categorical.as_bytes())
        .await;
    // Seeded (not the job id): a rerun synthesizes the same rows.
    let (job, result) = synthesize(
        &app,
        json!({"dataset_id": dataset, "rows": 1500, "seed": 11}),
    )
    .await;
    let report = &result["report"];
    for column in ["city", "country", "tier"] {
        assert_eq!(role(report, column), "categorical");
        assert!(shape(report, column) > 0.93, "{column}: {report}");
    }
    let cc = pair(report, "city", "country");
    assert_eq!(cc["metric"], "ContingencySimilarity");
    assert!(cc["score"].as_f64().unwrap() > 0.85, "{cc}");
    // Parquet by default.
    let synthetic = read(&app, job, "synthetic.parquet");
    assert_eq!(synthetic.rows(), 1500);

    // Numbers only, a fifth of them missing in each column.
    let mut numeric = String::from("a,b,c\n");
    for _ in 0..1500 {
        let z = standard_normal(&mut rng);
        let cell = |v: f64, rng: &mut StdRng| {
            if rng.random::<f64>() < 0.2 {
                String::new()
            } else {
                format!("{v:.2}")
            }
        };
        let a = cell(z, &mut rng);
        let b = cell(-2.0 * z + standard_normal(&mut rng) * 0.5, &mut rng);
        let c = cell(rng.random::<f64>() * 100.0, &mut rng);
        writeln!(numeric, "{a},{b},{c}").unwrap();
    }
    let dataset = app.upload_dataset("numbers.csv", numeric.as_bytes()).await;
    let (job, result) = synthesize(
        &app,
        json!({"dataset_id": dataset, "rows": 2000, "output_format": "csv", "seed": 12}),
    )
    .await;
    let report = &result["report"];
    for column in ["a", "b", "c"] {
        assert!(shape(report, column) > 0.93, "{column}: {report}");
    }
    let ab = pair(report, "a", "b");
    assert!(ab["real_correlation"].as_f64().unwrap() < -0.9, "{ab}");
    assert!(ab["score"].as_f64().unwrap() > 0.97, "{ab}");
    let synthetic = read(&app, job, "synthetic.csv");
    // Tolerances from the sample sizes, not picked by hand: 5 standard errors of a proportion,
    // 5 * sqrt(p (1 - p) / n), for 1,500 real rows (about 0.052) and 2,000 synthetic ones
    // (about 0.045). A fixed seed makes the run repeatable; the tolerance keeps it honest
    // when the synthesizer changes (0.03 failed once at random: 0.178 vs 0.208).
    let tolerance = |p: f64, n: f64| 5.0 * (p * (1.0 - p) / n).sqrt();
    for column in ["a", "b", "c"] {
        let values = numbers(&synthetic, column);
        let missing = values.iter().filter(|v| v.is_none()).count() as f64 / 2000.0;
        let profiled = report["columns"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == column)
            .unwrap()["missing_rate"]
            .as_f64()
            .unwrap();
        assert!(
            (profiled - 0.2).abs() < tolerance(0.2, 1500.0),
            "{column}: {profiled}"
        );
        assert!(
            (missing - profiled).abs() < tolerance(profiled, 2000.0),
            "{column}: {missing} vs {profiled}"
        );
    }
}

#[tokio::test]
async fn synthesis_keeps_dates_and_times_in_range_and_in_step() {
    let app = app_with_worker().await;
    let mut rng = StdRng::seed_from_u64(9);
    // Signup dates over 2020–2023; the last visit follows the signup by 0–60 days.
    let mut csv = String::from("signup,last_seen,spend\n");
    for _ in 0..1200 {
        let day = rng.random_range(0..1400i64);
        let signup =
            chrono::NaiveDate::from_ymd_opt(2020, 1, 1).unwrap() + chrono::Duration::days(day);
        let seen = signup.and_hms_opt(12, 0, 0).unwrap()
            + chrono::Duration::minutes(rng.random_range(0..60 * 24 * 60));
        writeln!(
            csv,
            "{signup},{},{:.2}",
            seen.format("%Y-%m-%d %H:%M:%S"),
            day as f64 * 0.5 + rng.random::<f64>() * 50.0
        )
        .unwrap();
    }
    let dataset = app.upload_dataset("visits.csv", csv.as_bytes()).await;
    let (job, result) = synthesize(&app, json!({"dataset_id": dataset, "rows": 1000})).await;
    let report = &result["report"];
    assert_eq!(role(report, "signup"), "datetime");
    assert_eq!(role(report, "last_seen"), "datetime");
    for column in ["signup", "last_seen", "spend"] {
        assert!(shape(report, column) > 0.93, "{column}: {report}");
    }
    let together = pair(report, "signup", "last_seen");
    assert!(
        together["synthetic_correlation"].as_f64().unwrap() > 0.95,
        "{together}"
    );

    let synthetic = read(&app, job, "synthetic.parquet");
    let dtype = |column: &str| synthetic.column(column).unwrap().dtype.to_string();
    assert_eq!(dtype("signup"), "date");
    assert!(
        dtype("last_seen").starts_with("datetime"),
        "{}",
        dtype("last_seen")
    );
    // Days since 1970: 2020-01-01 is day 18262.
    let days = numbers(&synthetic, "signup");
    assert!(days
        .iter()
        .flatten()
        .all(|d| (18262.0..18262.0 + 1400.0).contains(d)));
}

#[tokio::test]
async fn synthesis_is_deterministic_under_a_seed() {
    let app = app_with_worker().await;
    let dataset = app
        .upload_dataset("customers.csv", mixed_csv(800, 2).as_bytes())
        .await;
    let mut files = Vec::new();
    for seed in [7, 7, 8] {
        let (job, result) = synthesize(
            &app,
            json!({"dataset_id": dataset, "rows": 500, "seed": seed, "output_format": "csv"}),
        )
        .await;
        let bytes = std::fs::read(artifact(&app, job, "synthetic.csv")).unwrap();
        // Compared by digest: a failure should not print the files.
        let digest = hex::encode(sha2::Sha256::digest(&bytes));
        files.push((digest, result["report"]["quality"].clone()));
    }
    assert_eq!(files[0], files[1], "same seed, same output");
    assert_ne!(files[0].0, files[2].0, "another seed, another output");
}

#[tokio::test]
async fn synthesis_with_epsilon_spends_it_and_noise_follows_it() {
    let app = app_with_worker().await;
    let dataset = app
        .upload_dataset("customers.csv", mixed_csv(2000, 4).as_bytes())
        .await;
    let identifiers = json!({"id": {"type": "identifier"}, "serial": {"type": "identifier"}});
    let mut declared = identifiers.clone();
    declared["x"] = json!({"min": 0, "max": 100});
    declared["y"] = json!({"min": 0, "max": 200});
    declared["visits"] = json!({"min": 0, "max": 10});
    let mut runs = Vec::new();
    for epsilon in [0.05, 0.5, 50.0] {
        let (_, result) = synthesize(
            &app,
            json!({"dataset_id": dataset, "rows": 1500, "epsilon": epsilon, "seed": 1,
                   "columns": declared}),
        )
        .await;
        runs.push((epsilon, result["report"].clone()));
    }
    for (epsilon, report) in &runs {
        let privacy = &report["privacy"];
        let spent = privacy["epsilon_spent"].as_f64().unwrap();
        assert!(
            spent <= *epsilon && epsilon - spent < 1e-6,
            "{spent} of {epsilon}"
        );
        let budget = &privacy["budget"];
        let parts = budget["spent"].as_array().unwrap();
        let total: f64 = parts.iter().map(|p| p["epsilon"].as_f64().unwrap()).sum();
        assert!((total - spent).abs() < 1e-9, "{budget}");
        let whats: Vec<&str> = parts.iter().map(|p| p["what"].as_str().unwrap()).collect();
        assert_eq!(
            whats,
            [
                "x: histogram",
                "y: histogram",
                "band: levels",
                "flag: levels",
                "visits: histogram",
                "correlations: Kendall's tau of 10 column pairs"
            ],
            "{budget}"
        );
        // Five learned columns share half of ε; a declared column's histogram has it all.
        let x = parts[0]["epsilon"].as_f64().unwrap();
        assert!((x - spent / 10.0).abs() < 1e-9, "{budget}");
        assert_eq!(parts[0]["sensitivity"], 2);
        assert!(
            budget["delta"].as_f64().unwrap() > 0.0,
            "band's labels come from the data"
        );
        assert_eq!(report["seed"], 1, "the seed is printed: it undoes nothing");
    }
    let scale = |i: usize| {
        runs[i].1["privacy"]["budget"]["spent"][5]["noise_scale"]
            .as_f64()
            .unwrap()
    };
    assert!((scale(0) / scale(1) - 10.0).abs() < 1e-3);
    assert!((scale(1) / scale(2) - 100.0).abs() < 1e-3);
    // Little budget, much noise: the loose run keeps the data's shapes and the numbers'
    // correlation, the tight one less so. (Pairs with a label depend on the order a private
    // fit gives its levels, by noisy frequency: band's three near-equal levels come in any
    // order from one run to the next.)
    let shapes = |i: usize| runs[i].1["quality"]["column_shapes"].as_f64().unwrap();
    assert!(shapes(2) > 0.93, "{}", runs[2].1["quality"]);
    assert!(
        shapes(0) < shapes(2) - 0.03,
        "{} vs {}",
        shapes(0),
        shapes(2)
    );
    let xy = pair(&runs[2].1, "x", "y")["score"].as_f64().unwrap();
    assert!(xy > 0.9, "{}", runs[2].1["quality"]);

    // Undeclared bounds are bought; same seed, same ε, other noise: the seed cannot
    // regenerate it.
    let mut files = Vec::new();
    for _ in 0..2 {
        let (job, result) = synthesize(
            &app,
            json!({"dataset_id": dataset, "rows": 1500, "epsilon": 50.0, "seed": 1,
                   "columns": identifiers, "output_format": "csv"}),
        )
        .await;
        let parts = result["report"]["privacy"]["budget"]["spent"].to_string();
        for bought in ["x: bounds", "y: bounds", "visits: bounds"] {
            assert!(parts.contains(bought), "{parts}");
        }
        files.push(std::fs::read(artifact(&app, job, "synthetic.csv")).unwrap());
    }
    assert_ne!(
        files[0], files[1],
        "a private fit's noise must not follow the seed"
    );

    // Too small a budget to find bounds privately: the job says which to declare.
    let (_, job) = finish(
        &app,
        json!({"dataset_id": dataset, "rows": 100, "epsilon": 0.05, "columns": identifiers}),
    )
    .await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains("`min`") && error.contains("\"x\""),
        "{error}"
    );
}

#[tokio::test]
async fn private_synthesis_copies_no_rare_value_and_no_extreme() {
    // Every id is unique and one customer spent far more than anyone: under ε neither the
    // ids (not declared identifiers, so learned as labels) nor the extreme may appear.
    let mut csv = String::from("id,spend,plan\n");
    for i in 0..20_000 {
        let spend = if i == 17 {
            987654.0
        } else {
            20.0 + (i % 80) as f64
        };
        let plan = ["basic", "pro"][i % 2];
        writeln!(csv, "cust-{i:05},{spend},{plan}").unwrap();
    }
    let app = app_with_worker().await;
    let dataset = app.upload_dataset("spend.csv", csv.as_bytes()).await;
    let (job, result) = synthesize(
        &app,
        json!({"dataset_id": dataset, "rows": 5000, "epsilon": 1.0, "output_format": "csv"}),
    )
    .await;
    let table = read(&app, job, "synthetic.csv");
    let ids = labels(&table, "id");
    assert!(
        ids.iter().all(Option::is_none),
        "a unique id reached the output"
    );
    let top = numbers(&table, "spend")
        .into_iter()
        .flatten()
        .fold(f64::MIN, f64::max);
    assert!(top < 1000.0, "the outlier's spend leaked: {top}");
    let plans = result["report"]["privacy"]["budget"]["spent"].to_string();
    assert!(plans.contains("plan: levels"), "{plans}");
}

/// A private synthesis (`epsilon`) whose attempt published its dataset and model and then
/// failed (its artifacts could not be stored) releases once: the retry draws the first
/// attempt's noise and publishes the same table; it fitted with fresh noise, releasing the same
/// rows a second time (2ε under a report of ε).
#[tokio::test]
async fn a_private_synthesis_retried_after_publishing_releases_once() {
    // A retry waits (a day's backoff) until the test has looked and lets it go.
    let mut app = TestApp::spawn_with(|s| s.retry_base = Duration::from_secs(86_400)).await;
    app.start_worker_for(&[("synthesis", 1)]).await;
    let dataset = app
        .upload_dataset("customers.csv", mixed_csv(2000, 4).as_bytes())
        .await;
    // A file where the artifacts' directory goes: the attempt records its dataset, saves its
    // model, and fails storing `synthetic.csv` (retryable).
    let artifacts = app.settings.data_dir.join("artifacts");
    let _ = std::fs::remove_dir_all(&artifacts);
    std::fs::write(&artifacts, b"in the way").unwrap();
    let payload = json!({"dataset_id": dataset, "rows": 500, "epsilon": 1.0, "seed": 1,
        "output_format": "csv", "save_model": true,
        "columns": {"id": {"type": "identifier"}, "serial": {"type": "identifier"},
                    "x": {"min": 0, "max": 100}, "y": {"min": 0, "max": 200},
                    "visits": {"min": 0, "max": 10}}});
    let (status, job) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "synthesis", "payload": payload, "max_attempts": 3}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    let job = app
        .wait_status(id, &["retrying", "succeeded", "failed"], WAIT)
        .await;
    assert_eq!(job["status"], "retrying", "{job}");
    let output = Uuid::new_v5(&id, b"synthetic dataset");
    let (status, released) = app.get(&format!("/v1/datasets/{output}")).await;
    assert_eq!(
        status, 200,
        "the first attempt published its dataset: {released}"
    );

    std::fs::remove_file(&artifacts).unwrap();
    sqlx::query("UPDATE jobs SET run_at = now() WHERE id = $1")
        .bind(id)
        .execute(app.pool())
        .await
        .unwrap();
    let job = app.wait_status(id, &["succeeded", "failed"], WAIT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 2, "{job}");
    assert_eq!(job["result"]["outputs"]["dataset_id"], output.to_string());
    let (_, now) = app.get(&format!("/v1/datasets/{output}")).await;
    assert_eq!(
        now["sha256"], released["sha256"],
        "the retry released another fit of the same private data"
    );
    let bytes = std::fs::read(artifact(&app, id, "synthetic.csv")).unwrap();
    assert_eq!(
        hex::encode(sha2::Sha256::digest(&bytes)),
        released["sha256"].as_str().unwrap(),
        "the artifact is not the released table"
    );
}

#[tokio::test]
async fn synthesis_tvae_trains_in_epochs_and_stops_when_cancelled() {
    let app = app_with_worker().await;
    let dataset = app
        .upload_dataset("customers.csv", mixed_csv(400, 6).as_bytes())
        .await;
    let (job, result) = synthesize(
        &app,
        json!({"dataset_id": dataset, "rows": 300, "synthesizer": "tvae", "epochs": 4,
               "seed": 2}),
    )
    .await;
    assert_eq!(result["report"]["synthesizer"], "tvae");
    assert!(
        result["report"]["quality"]["column_shapes"]
            .as_f64()
            .unwrap()
            > 0.5
    );
    let epochs = epoch_events(&app, job).await;
    assert_eq!(epochs.len(), 4, "{epochs:?}");
    assert!(epochs
        .iter()
        .all(|e| e["loss"].as_f64().unwrap().is_finite()));
    assert_eq!(epochs[3]["epoch"], 4);
    let synthetic = read(&app, job, "synthetic.parquet");
    assert_eq!(synthetic.rows(), 300);

    // A long training run stops between epochs once cancelled.
    stops_between_epochs_when_cancelled(&app, dataset, "tvae").await;
}

/// The `data` of a finished job's epoch events, in order.
async fn epoch_events(app: &TestApp, job: Uuid) -> Vec<Value> {
    let events = app
        .sse(&format!("/v1/jobs/{job}/events"), None)
        .await
        .collect(Duration::from_secs(10))
        .await;
    events
        .into_iter()
        .filter(|e| e.data["data"].get("epoch").is_some())
        .map(|e| e.data["data"].clone())
        .collect()
}

/// Submits a long training run of `synthesizer`, cancels it once an epoch has been reported
/// (not before training starts), and checks that it ends cancelled with no synthetic file.
async fn stops_between_epochs_when_cancelled(app: &TestApp, dataset: Uuid, synthesizer: &str) {
    let (status, submitted) = submit(
        app,
        json!({"dataset_id": dataset, "rows": 10, "synthesizer": synthesizer,
               "epochs": 10000}),
    )
    .await;
    assert_eq!(status, 202, "{submitted}");
    let id: Uuid = submitted["id"].as_str().unwrap().parse().unwrap();
    app.wait_status(id, &["running"], WAIT).await;
    let mut events = app.sse(&format!("/v1/jobs/{id}/events"), None).await;
    loop {
        let event = events.next(WAIT).await.expect("an epoch before the cancel");
        if event.event == "progress" && event.data.to_string().contains("epoch ") {
            break;
        }
    }
    let (status, _) = app.post(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(status, 200);
    let job = app
        .wait_status(
            id,
            &["cancelled", "succeeded", "failed"],
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(job["status"], "cancelled", "{job}");
    assert!(artifact(app, id, "synthetic.parquet").metadata().is_err());
}

/// CTGAN through the API: each epoch reports the generator's and the critic's losses, the job
/// succeeds with its report and the rows asked for, and a long run stops when cancelled.
#[tokio::test]
async fn synthesis_ctgan_reports_both_losses_each_epoch_and_stops_when_cancelled() {
    let app = app_with_worker().await;
    let dataset = app
        .upload_dataset("customers.csv", mixed_csv(300, 8).as_bytes())
        .await;
    let (job, result) = synthesize(
        &app,
        json!({"dataset_id": dataset, "rows": 200, "synthesizer": "ctgan", "epochs": 10,
               "seed": 5}),
    )
    .await;
    let report = &result["report"];
    assert_eq!(report["synthesizer"], "ctgan");
    let shapes = report["quality"]["column_shapes"].as_f64().unwrap();
    assert!(shapes > 0.5, "{shapes}");
    assert_eq!(report["rows"]["generated"], 200);
    assert!(
        report["privacy"]["dcr_synthetic_to_train"]["median"].is_number(),
        "{report}"
    );
    let epochs = epoch_events(&app, job).await;
    assert_eq!(epochs.len(), 10, "{epochs:?}");
    for epoch in &epochs {
        let generator = epoch["generator_loss"].as_f64().unwrap();
        assert!(generator.is_finite(), "{epoch}");
        assert!(
            epoch["critic_loss"].as_f64().unwrap().is_finite(),
            "{epoch}"
        );
        assert_eq!(epoch["loss"].as_f64(), Some(generator));
    }
    let synthetic = read(&app, job, "synthetic.parquet");
    assert_eq!(synthetic.rows(), 200);
    let bands: HashSet<String> = labels(&synthetic, "band").into_iter().flatten().collect();
    assert!(
        bands
            .iter()
            .all(|b| ["low", "mid", "high"].contains(&b.as_str())),
        "{bands:?}"
    );

    stops_between_epochs_when_cancelled(&app, dataset, "ctgan").await;
}

/// Stays: check-out on or after check-in, a positive amount, a city only with its own country.
#[tokio::test]
async fn every_synthetic_row_keeps_the_constraints() {
    let mut csv = String::from("stay,check_in,check_out,amount,city,country\n");
    let mut rng = StdRng::seed_from_u64(9);
    let places = [
        ("Lyon", "FR"),
        ("Paris", "FR"),
        ("Porto", "PT"),
        ("Lisbon", "PT"),
    ];
    for i in 0..2000 {
        let nights = 1 + (rng.random::<f64>() * 6.0) as i64;
        let day = (rng.random::<f64>() * 300.0) as i64;
        let (city, country) = places[i % 4];
        let amount = 60.0 * nights as f64 + 40.0 * standard_normal(&mut rng);
        let check_in =
            chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap() + chrono::Duration::days(day);
        let check_out = check_in + chrono::Duration::days(nights);
        writeln!(
            csv,
            "s{i},{check_in},{check_out},{:.2},{city},{country}",
            amount.abs() + 1.0
        )
        .unwrap();
    }
    let app = app_with_worker().await;
    let dataset = app.upload_dataset("stays.csv", csv.as_bytes()).await;
    let (job, result) = synthesize(
        &app,
        json!({"dataset_id": dataset, "rows": 3000, "seed": 3, "output_format": "csv",
               "constraints": [
                   {"type": "inequality", "low": "check_in", "high": "check_out"},
                   {"type": "positive", "column": "amount"},
                   {"type": "fixed_combinations", "columns": ["city", "country"]}]}),
    )
    .await;
    let table = read(&app, job, "synthetic.csv");
    assert_eq!(table.rows(), 3000);
    // Dates read back as days (or as text if the reader kept them so).
    let days = |name: &str| -> Vec<Option<f64>> {
        match &table.column(name).unwrap().values {
            Values::Numbers(v) => v.clone(),
            Values::Labels(v) => v
                .iter()
                .map(|d| {
                    let d = chrono::NaiveDate::parse_from_str(d.as_deref()?, "%Y-%m-%d");
                    Some(chrono::Datelike::num_days_from_ce(&d.unwrap()) as f64)
                })
                .collect(),
        }
    };
    let (check_in, check_out) = (days("check_in"), days("check_out"));
    let amount = numbers(&table, "amount");
    let (city, country) = (labels(&table, "city"), labels(&table, "country"));
    for row in 0..3000 {
        if let (Some(a), Some(b)) = (check_in[row], check_out[row]) {
            assert!(a <= b, "row {row}: check-in {a} after check-out {b}");
        }
        assert!(
            amount[row].is_none_or(|a| a > 0.0),
            "row {row}: {:?}",
            amount[row]
        );
        let pair = (city[row].as_deref(), country[row].as_deref());
        assert!(
            places.iter().any(|(c, k)| pair == (Some(*c), Some(*k))),
            "row {row}: {pair:?} is not a combination of the data"
        );
    }
    let report = &result["report"];
    let with = report["quality"]["overall"].as_f64().unwrap();
    let without = report["quality_without_constraints"]["overall"]
        .as_f64()
        .unwrap();
    assert!(with > 0.8 && without > 0.5, "{with} {without}");
    assert_eq!(report["constraints"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn synthesis_refuses_bad_payloads() {
    let app = TestApp::spawn().await;
    let dataset = app
        .upload_dataset("customers.csv", mixed_csv(50, 1).as_bytes())
        .await;
    let (status, body) = submit(&app, json!({"dataset_id": Uuid::now_v7(), "rows": 10})).await;
    assert_eq!(status, 404, "{body}");
    let cases = [
        (json!({"rows": 0}), "payload.rows"),
        (json!({"rows": -3}), "payload.rows"),
        (json!({"rows": 10_000_000}), "payload.rows"),
        (json!({"rows": 10, "epsilon": 0}), "payload.epsilon"),
        (json!({"rows": 10, "epsilon": -1.5}), "payload.epsilon"),
        (
            json!({"rows": 10, "epsilon": 1, "synthesizer": "tvae"}),
            "payload.epsilon",
        ),
        (
            json!({"rows": 10, "holdout_fraction": 1}),
            "payload.holdout_fraction",
        ),
        (
            json!({"rows": 10, "synthesizer": "gan"}),
            "payload.synthesizer",
        ),
        (
            json!({"rows": 10, "epsilon": 1, "synthesizer": "ctgan"}),
            "payload.epsilon",
        ),
        (
            json!({"rows": 10, "columns": {"nope": {"type": "skip"}}}),
            "payload.columns.nope",
        ),
        (
            json!({"rows": 10, "columns": {"x": {"min": 9, "max": 1}}}),
            "payload.columns.x.min",
        ),
        (
            json!({"rows": 10, "constraints": [{"type": "positive", "column": "band"}]}),
            "payload.constraints[0]",
        ),
        (
            json!({"rows": 10, "constraints": [
                {"type": "inequality", "low": "x", "high": "nope"}]}),
            "payload.constraints[0]",
        ),
    ];
    for (payload, field) in cases {
        let mut payload = payload;
        payload["dataset_id"] = json!(dataset);
        let (status, body) = submit(&app, payload.clone()).await;
        assert_eq!(status, 422, "{payload}: {body}");
        assert_eq!(body["errors"][0]["field"], field, "{payload}: {body}");
    }
    let (status, body) = submit(&app, json!({"dataset_id": dataset, "rows": 10})).await;
    assert_eq!(status, 202, "{body}");
}

/// The synthetic table is a dataset of the tenant's (`outputs.dataset_id`): an import reads it
/// straight into a table, with no download; a retried attempt would keep one dataset (its id
/// derives from the job's).
#[tokio::test]
async fn the_synthetic_table_is_a_dataset_an_import_reads() {
    let mut app = app_with_worker().await;
    app.start_worker_for(&[("import", 1)]).await;
    let source = app
        .upload_dataset("customers.csv", mixed_csv(400, 3).as_bytes())
        .await;
    let (job, result) = synthesize(
        &app,
        json!({"dataset_id": source, "rows": 300, "seed": 1, "output_format": "csv"}),
    )
    .await;
    let dataset = result["outputs"]["dataset_id"].as_str().unwrap().to_owned();
    let (status, listed) = app.get(&format!("/v1/datasets/{dataset}")).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["format"], "csv");
    let columns: Vec<&str> = listed["schema"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        ["id", "serial", "x", "y", "band", "flag", "visits"]
    );
    let bytes = std::fs::read(artifact(&app, job, "synthetic.csv")).unwrap();
    assert_eq!(listed["size_bytes"], bytes.len(), "the artifact's bytes");

    // The visual report: a chart for every learned column, drawn from report.json's figures.
    let page = std::fs::read_to_string(artifact(&app, job, "report.html")).unwrap();
    let distributions = result["report"]["distributions"].as_array().unwrap();
    assert!(distributions.len() >= 5, "{distributions:?}");
    assert_eq!(
        page.matches("<figure data-column=").count(),
        distributions.len()
    );
    for d in distributions {
        assert!(page.contains(&format!(
            "data-column=\"{}\"",
            d["column"].as_str().unwrap()
        )));
    }
    let overall = result["report"]["quality"]["overall"].as_f64().unwrap();
    assert!(page.contains(&format!("Overall: {:.1} %", overall * 100.0)));

    let (status, import) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "import", "payload": {"dataset_id": dataset, "target": {"table": "synthetic"}}}),
        )
        .await;
    assert_eq!(status, 202, "{import}");
    let id: Uuid = import["id"].as_str().unwrap().parse().unwrap();
    let import = app.wait_status(id, &["succeeded", "failed"], WAIT).await;
    assert_eq!(import["status"], "succeeded", "{import}");
    let admin = sqlx::PgPool::connect(&app.target_admin_url())
        .await
        .unwrap();
    let schema = shared::tenancy::schema(app.tenant);
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {schema}.synthetic"))
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(rows, 300);
}
