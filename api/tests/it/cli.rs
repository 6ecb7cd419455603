//! The `conveyor` command-line client, run as the real binary against an in-process API and
//! worker: exit codes by outcome, `--json` shapes, human output, errors.

use crate::harness::{binary, TestApp};
use serde_json::Value;
use std::{process::Stdio, time::Duration};

const WAIT: Duration = Duration::from_secs(60);

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

/// `conveyor` with the app's URL and key. Async: the API runs on this test's runtime.
fn conveyor(app: &TestApp, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(binary("conveyor"));
    command
        .args(args)
        .env("CONVEYOR_URL", &app.base)
        .env("CONVEYOR_API_KEY", &app.key)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

async fn run(app: &TestApp, args: &[&str]) -> Run {
    output(conveyor(app, args).output()).await
}

/// `conveyor` with `input` on its standard input (a typed confirmation).
async fn run_with_input(app: &TestApp, args: &[&str], input: &str) -> Run {
    use tokio::io::AsyncWriteExt;
    let mut command = conveyor(app, args);
    command.stdin(Stdio::piped());
    let mut child = command
        .spawn()
        .expect("conveyor runs (built by `cargo build --workspace --bins`)");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    output(child.wait_with_output()).await
}

/// `conveyor` with another key (another tenant's).
async fn run_as(app: &TestApp, key: &str, args: &[&str]) -> Run {
    let mut command = conveyor(app, args);
    command.env("CONVEYOR_API_KEY", key);
    output(command.output()).await
}

async fn output(
    running: impl std::future::Future<Output = std::io::Result<std::process::Output>>,
) -> Run {
    let output = tokio::time::timeout(WAIT, running)
        .await
        .expect("conveyor finishes")
        .expect("conveyor runs (built by `cargo build --workspace --bins`)");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[tokio::test]
async fn submit_wait_exits_by_outcome_and_prints_the_final_job() {
    let mut app = TestApp::spawn().await;
    app.start_worker(2).await;

    let ok = run(
        &app,
        &[
            "submit",
            "canary",
            "--payload",
            r#"{"steps": 8, "step_ms": 40}"#,
            "--wait",
            "--json",
        ],
    )
    .await;
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    let job = ok.json();
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["kind"], "canary");
    assert_eq!(job["progress"], 1.0);
    assert_eq!(job["result"]["steps"], 8);
    assert!(job["id"].as_str().unwrap().parse::<uuid::Uuid>().is_ok());
    // The bar, driven by the job's event stream, went to 100 % on stderr.
    assert!(ok.stderr.contains("100% succeeded"), "{}", ok.stderr);
    assert_eq!(
        app.job(job["id"].as_str().unwrap().parse().unwrap()).await["status"],
        "succeeded"
    );

    let failed = run(
        &app,
        &[
            "submit",
            "canary",
            "--payload",
            r#"{"fail_first": 1}"#,
            "--max-attempts",
            "1",
            "--wait",
            "--json",
        ],
    )
    .await;
    assert_eq!(failed.code, 1, "{}", failed.stderr);
    let job = failed.json();
    assert_eq!(job["status"], "failed");
    assert!(
        job["error"].as_str().unwrap().contains("canary fails"),
        "{job}"
    );
    assert_eq!(job["attempt_errors"].as_array().unwrap().len(), 1);

    // Human output, with the payload read from a file.
    let file = std::env::temp_dir().join(format!("payload-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&file, r#"{"steps": 2}"#).unwrap();
    let human = run(
        &app,
        &[
            "submit",
            "canary",
            "--payload",
            file.to_str().unwrap(),
            "--wait",
        ],
    )
    .await;
    std::fs::remove_file(&file).ok();
    assert_eq!(human.code, 0, "{}", human.stderr);
    assert!(
        human.stdout.contains("status    succeeded"),
        "{}",
        human.stdout
    );
    assert!(human.stdout.contains(r#"result    {"#), "{}", human.stdout);
}

#[tokio::test]
async fn status_jobs_watch_and_cancel() {
    let mut app = TestApp::spawn().await;
    app.start_worker(1).await;

    let submitted = run(
        &app,
        &[
            "submit",
            "canary",
            "--payload",
            r#"{"steps": 200, "step_ms": 100}"#,
            "--json",
        ],
    )
    .await;
    assert_eq!(submitted.code, 0, "{}", submitted.stderr);
    let id = submitted.json()["id"].as_str().unwrap().to_owned();
    app.wait_status(id.parse().unwrap(), &["running"], WAIT)
        .await;

    let status = run(&app, &["status", &id, "--json"]).await;
    assert_eq!(status.code, 0);
    assert_eq!(status.json()["id"], id.as_str());
    assert_eq!(status.json()["status"], "running");

    let listed = run(
        &app,
        &["jobs", "--kind", "canary", "--status", "running", "--json"],
    )
    .await;
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    let jobs = listed.json()["jobs"].as_array().unwrap().clone();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["id"], id.as_str());
    let none = run(&app, &["jobs", "--status", "failed", "--json"]).await;
    assert_eq!(none.json()["jobs"], serde_json::json!([]));
    let table = run(&app, &["jobs"]).await;
    assert!(table.stdout.starts_with("ID "), "{}", table.stdout);
    assert!(table.stdout.contains(&id) && table.stdout.contains("running"));

    // `watch --json` prints one event per line until the job ends; cancel ends it.
    use tokio::io::AsyncBufReadExt;
    let mut watcher = conveyor(&app, &["watch", &id, "--json"]).spawn().unwrap();
    let mut printed = tokio::io::BufReader::new(watcher.stdout.take().unwrap()).lines();
    // The watcher follows the stream once it has printed its first event: cancel then.
    let mut lines = vec![tokio::time::timeout(WAIT, printed.next_line())
        .await
        .expect("watch prints the first event")
        .unwrap()
        .expect("an event line")];
    let cancel = run(&app, &["cancel", &id]).await;
    assert_eq!(cancel.code, 0, "{}", cancel.stderr);
    assert!(cancel.stdout.contains("cancel requested") || cancel.stdout.contains("cancelled"));
    while let Some(line) = tokio::time::timeout(WAIT, printed.next_line())
        .await
        .expect("watch ends with the job")
        .unwrap()
    {
        lines.push(line);
    }
    let status = tokio::time::timeout(WAIT, watcher.wait())
        .await
        .expect("watch exits")
        .unwrap();
    assert_eq!(status.code(), Some(1), "a cancelled job exits 1");
    let lines: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert!(lines.len() >= 3, "{lines:?}");
    assert_eq!(lines[0]["event"], "queued");
    assert_eq!(lines.last().unwrap()["event"], "cancelled");
    for line in &lines {
        assert!(
            line["id"].is_string() && line["data"]["job_id"] == id.as_str(),
            "{line}"
        );
    }

    // Errors exit 2 with the API's explanation.
    let unknown = run(&app, &["status", &uuid::Uuid::now_v7().to_string()]).await;
    assert_eq!(unknown.code, 2);
    assert!(unknown.stderr.contains("404"), "{}", unknown.stderr);
    let invalid = run(
        &app,
        &["submit", "canary", "--payload", r#"{"steps": "ten"}"#],
    )
    .await;
    assert_eq!(invalid.code, 2);
    assert!(
        invalid.stderr.contains("payload.steps"),
        "{}",
        invalid.stderr
    );
    let no_key = conveyor(&app, &["jobs"])
        .env_remove("CONVEYOR_API_KEY")
        .output()
        .await
        .unwrap();
    assert_eq!(no_key.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_key.stderr).contains("CONVEYOR_API_KEY"));
}

/// `conveyor upload` streams a file into a dataset: exit 0, the dataset in `--json`, and the
/// stored bytes are the file's (size, sha256, download). A missing or refusing route fails it.
#[tokio::test]
async fn upload_streams_a_file_into_a_dataset() {
    use sha2::Digest;
    let app = TestApp::spawn().await;
    let name = format!("upload-{}.csv", uuid::Uuid::new_v4());
    let file = std::env::temp_dir().join(&name);
    let mut csv = String::from("id,name\n");
    for i in 0..60_000 {
        csv.push_str(&format!("{i},row {i}\n"));
    }
    // Several of the client's 256 KiB chunks (streamed, not sent at once), and far past the
    // JSON body limit, which uploads are not held to.
    assert!(csv.len() > 3 * 256 * 1024, "{}", csv.len());
    assert!(csv.len() > 10 * app.settings.body_limit);
    std::fs::write(&file, &csv).unwrap();
    let uploaded = run(&app, &["upload", file.to_str().unwrap(), "--json"]).await;
    std::fs::remove_file(&file).ok();

    assert_eq!(
        uploaded.code, 0,
        "conveyor upload failed: {}{}",
        uploaded.stderr, uploaded.stdout
    );
    let dataset = uploaded.json();
    assert_eq!(dataset["name"], name.as_str(), "{dataset}");
    assert_eq!(dataset["format"], "csv", "{dataset}");
    assert_eq!(dataset["size_bytes"], csv.len() as u64, "{dataset}");
    assert_eq!(
        dataset["sha256"],
        hex::encode(sha2::Sha256::digest(csv.as_bytes())).as_str(),
        "{dataset}"
    );
    let columns: Vec<&str> = dataset["schema"]
        .as_array()
        .unwrap_or_else(|| panic!("no schema: {dataset}"))
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["id", "name"], "{dataset}");

    let id = dataset["id"].as_str().expect("a dataset id");
    let (status, stored) = app.get(&format!("/v1/datasets/{id}")).await;
    assert_eq!(status, 200, "{stored}");
    assert_eq!(stored["id"], id);
    let (status, bytes) = app.get_bytes(&format!("/v1/datasets/{id}/download")).await;
    assert_eq!(status, 200);
    assert!(
        bytes == csv.as_bytes(),
        "the download is not the uploaded file"
    );
}

#[tokio::test]
async fn whoami_shows_the_tenant_and_the_keys_role() {
    let app = TestApp::spawn().await;
    let shown = run(&app, &["whoami"]).await;
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    assert!(shown.stdout.contains("tenant acme"), "{}", shown.stdout);
    assert!(shown.stdout.contains("role   admin"), "{}", shown.stdout);
    let json = run(&app, &["whoami", "--json"]).await.json();
    assert_eq!(json["role"], "admin");
    assert_eq!(json["tenant_id"], app.tenant.to_string());
}

/// The key crosses the network only encrypted: plain `http://` to another machine is refused
/// before any connection, unless `--allow-http`. The host is a 64-letter label, which the
/// resolver refuses on this machine: no packet leaves it, with the fix or without.
#[tokio::test]
async fn the_key_is_not_sent_over_plain_http_past_this_machine() {
    let app = TestApp::spawn().await;
    let remote = format!("http://{}.example:8080", "a".repeat(64));
    let mut command = conveyor(&app, &["whoami"]);
    command.env("CONVEYOR_URL", &remote);
    let refused = output(command.output()).await;
    assert!(
        refused.code == 2 && refused.stderr.contains("plain http to another machine"),
        "{}",
        refused.stderr
    );
    let mut command = conveyor(&app, &["whoami", "--allow-http"]);
    command.env("CONVEYOR_URL", &remote);
    let allowed = output(command.output()).await;
    assert!(
        allowed.code == 2 && !allowed.stderr.contains("plain http"),
        "{}",
        allowed.stderr
    );
    let mut command = conveyor(&app, &["whoami"]);
    command.env("CONVEYOR_URL", app.base.replace("127.0.0.1", "localhost"));
    let local = output(command.output()).await;
    assert_eq!(local.code, 0, "{}", local.stderr);
}

#[tokio::test]
async fn schedules_are_created_listed_paused_resumed_and_deleted() {
    let app = TestApp::spawn().await;
    let created = run(
        &app,
        &[
            "--json",
            "schedules",
            "create",
            "--name",
            "every-5",
            "--cron",
            "*/5 * * * *",
            "--kind",
            "canary",
            "--payload",
            r#"{"steps": 2}"#,
        ],
    )
    .await;
    assert_eq!(created.code, 0, "{}", created.stderr);
    let schedule = created.json();
    let id = schedule["id"].as_str().unwrap().to_owned();
    assert_eq!(schedule["job"]["payload"]["steps"], 2);
    assert_eq!(schedule["next_fires"].as_array().unwrap().len(), 5);

    let list = run(&app, &["schedules", "list"]).await;
    assert_eq!(list.code, 0, "{}", list.stderr);
    assert!(
        list.stdout.contains(&id) && list.stdout.contains("every-5"),
        "{}",
        list.stdout
    );
    assert!(list.stdout.contains("active"), "{}", list.stdout);

    let paused = run(&app, &["schedules", "pause", &id]).await;
    assert_eq!(paused.code, 0, "{}", paused.stderr);
    assert!(paused.stdout.contains("paused"), "{}", paused.stdout);
    let resumed = run(&app, &["--json", "schedules", "resume", &id]).await;
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    assert_eq!(resumed.json()["paused"], false);

    // Refusals print the API's field errors and exit 2.
    let refused = run(
        &app,
        &[
            "schedules",
            "create",
            "--name",
            "bad",
            "--cron",
            "* * *",
            "--kind",
            "canary",
        ],
    )
    .await;
    assert_eq!(refused.code, 2);
    assert!(refused.stderr.contains("cron"), "{}", refused.stderr);

    // A schedule that starts a pipeline from a YAML file.
    let file = std::env::temp_dir().join(format!("flow-{}.yaml", uuid::Uuid::now_v7()));
    std::fs::write(
        &file,
        "steps:\n  - name: a\n    kind: canary\n  - name: b\n    kind: canary\n    needs: [a]\n",
    )
    .unwrap();
    let flow = run(
        &app,
        &[
            "schedules",
            "create",
            "--name",
            "flow",
            "--cron",
            "@daily",
            "--pipeline",
            file.to_str().unwrap(),
        ],
    )
    .await;
    std::fs::remove_file(&file).unwrap();
    assert_eq!(flow.code, 0, "{}", flow.stderr);
    assert!(
        flow.stdout.contains("pipeline (2 steps)"),
        "{}",
        flow.stdout
    );
    let history = run(&app, &["schedules", "history", &id]).await;
    assert_eq!(history.code, 0, "{}", history.stderr);
    assert!(
        history.stdout.contains("no firings yet"),
        "{}",
        history.stdout
    );

    let deleted = run(&app, &["schedules", "delete", &id]).await;
    assert_eq!(deleted.code, 0, "{}", deleted.stderr);
    let (status, _) = app.get(&format!("/v1/schedules/{id}")).await;
    assert_eq!(status, reqwest::StatusCode::NOT_FOUND);
    let gone = run(&app, &["schedules", "pause", &id]).await;
    assert_eq!(gone.code, 2);
}

/// `conveyor report JOB`: the synthesis report as tables, with report.json's numbers, and the
/// job's report.html written byte for byte. Not a synthesis, or another tenant's: refused.
#[tokio::test]
async fn report_prints_a_synthesis_report_and_writes_its_page() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("synthesis", 1), ("canary", 1)])
        .await;
    let mut csv = String::from("id,city,amount,visits\n");
    for i in 0..400 {
        let city = ["Lyon", "Oslo", "Porto", "Kyiv"][i % 4];
        csv.push_str(&format!("{i},{city},{}.5,{}\n", 10 + (i * 7) % 90, i % 13));
    }
    let dataset = app.upload_dataset("visits.csv", csv.as_bytes()).await;
    let (status, job) = app
        .post(
            "/v1/jobs",
            &serde_json::json!({"kind": "synthesis", "payload": {"dataset_id": dataset, "rows": 300, "seed": 7}}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let done = app
        .wait_status(id.parse().unwrap(), &["succeeded", "failed"], WAIT)
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let (_, report) = app
        .get(&format!("/v1/jobs/{id}/artifacts/report.json"))
        .await;

    let dir = std::env::temp_dir().join(format!("report-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("report.html");
    let shown = run(&app, &["report", &id, "--out", out.to_str().unwrap()]).await;
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    let percent = |v: &Value| format!("{:.1}%", v.as_f64().unwrap() * 100.0);
    let line = |label: &str| {
        shown
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("{label} ")))
            .unwrap_or_else(|| panic!("no line for {label} in\n{}", shown.stdout))
            .to_owned()
    };
    let overall = line("overall");
    assert!(
        overall.contains(&percent(&report["quality"]["overall"])),
        "{overall}"
    );
    let shapes = report["quality"]["shapes"].as_array().unwrap();
    assert!(shapes.len() >= 3, "{report}");
    for shape in shapes {
        let line = line(shape["column"].as_str().unwrap());
        assert!(
            line.contains(&percent(&shape["score"])),
            "{line} for {shape}"
        );
    }
    assert!(shown.stdout.contains("ε spent"), "{}", shown.stdout);
    let (_, page) = app
        .get_bytes(&format!("/v1/jobs/{id}/artifacts/report.html"))
        .await;
    assert!(
        std::fs::read(&out).unwrap() == page,
        "report.html is the job's"
    );
    assert!(shown.stderr.contains("wrote"), "{}", shown.stderr);

    let json = run(
        &app,
        &["report", &id, "--json", "--out", out.to_str().unwrap()],
    )
    .await;
    assert_eq!(json.json(), report);

    // A canary has no report; another tenant's synthesis is unknown.
    let canary = app.submit_canary(serde_json::json!({"steps": 1})).await;
    app.wait_status(canary, &["succeeded"], WAIT).await;
    let refused = run(&app, &["report", &canary.to_string()]).await;
    assert_eq!(refused.code, 2);
    assert!(
        refused.stderr.contains("only a synthesis has a report"),
        "{}",
        refused.stderr
    );
    let (_, other_key) = app.tenant_key("other").await;
    let foreign = run_as(
        &app,
        &other_key,
        &["report", &id, "--out", dir.join("x.html").to_str().unwrap()],
    )
    .await;
    assert_eq!(foreign.code, 2);
    assert!(foreign.stderr.contains("404"), "{}", foreign.stderr);
    assert!(!dir.join("x.html").exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// `conveyor search`: by name or id, in each mode, the API's chunks in the API's order; a
/// filter; bad input named.
#[tokio::test]
async fn search_ranks_a_collections_chunks_as_the_api_does() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("ingest", 1)]).await;
    let collection =
        crate::ingest::create_collection(&app, serde_json::json!({"name": "help"})).await;
    let collection = collection.to_string();
    let documents = serde_json::json!([
        {"id": "reset", "metadata": {"lang": "en"}, "text": "To reset your password, open Settings and choose Reset password."},
        {"id": "forgot", "metadata": {"lang": "en"}, "text": "Forgot your password? The sign-in page sends a reset link by email."},
        {"id": "export", "metadata": {"lang": "en"}, "text": "Reports can be exported as CSV from the Reports page."},
        {"id": "passwort", "metadata": {"lang": "de"}, "text": "Passwort vergessen? Auf der Anmeldeseite das Passwort zurücksetzen."},
    ]);
    crate::ingest::ingest(
        &app,
        serde_json::json!({"collection_id": collection, "documents": documents}),
    )
    .await;

    let chunk_ids = |found: &Value| -> Vec<Value> {
        found["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|hit| hit["chunk_id"].clone())
            .collect()
    };
    for (mode, target) in [
        ("keyword", "help"),
        ("hybrid", collection.as_str()),
        ("vector", "help"),
    ] {
        let shown = run(
            &app,
            &[
                "search",
                target,
                "reset password",
                "--mode",
                mode,
                "-k",
                "3",
                "--json",
            ],
        )
        .await;
        assert_eq!(shown.code, 0, "{mode}: {}", shown.stderr);
        let (_, api) = app
            .post(
                &format!("/v1/collections/{collection}/search"),
                &serde_json::json!({"query": "reset password", "mode": mode, "k": 3}),
            )
            .await;
        assert!(!chunk_ids(&api).is_empty(), "{api}");
        assert_eq!(chunk_ids(&shown.json()), chunk_ids(&api), "{mode}");
    }

    let table = run(
        &app,
        &["search", "help", "reset password", "--mode", "keyword"],
    )
    .await;
    assert_eq!(table.code, 0, "{}", table.stderr);
    let first = table.stdout.lines().nth(1).unwrap_or_default();
    assert!(
        first.starts_with("1 ") && first.contains("reset"),
        "{}",
        table.stdout
    );

    let german = run(
        &app,
        &[
            "search",
            "help",
            "password",
            "--mode",
            "vector",
            "--filter",
            r#"{"lang": "de"}"#,
            "--json",
        ],
    )
    .await;
    assert_eq!(german.code, 0, "{}", german.stderr);
    let documents: Vec<String> = german.json()["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["document_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(documents, ["passwort"]);

    let too_many = run(&app, &["search", "help", "password", "-k", "1000"]).await;
    assert_eq!(too_many.code, 2);
    assert!(
        too_many.stderr.contains("422") && too_many.stderr.contains('k'),
        "{}",
        too_many.stderr
    );
    let unknown = run(&app, &["search", "nope", "password"]).await;
    assert_eq!(unknown.code, 2);
    assert!(
        unknown.stderr.contains(r#"no collection named "nope""#),
        "{}",
        unknown.stderr
    );
    let (_, other_key) = app.tenant_key("other").await;
    let foreign = run_as(&app, &other_key, &["search", &collection, "password"]).await;
    assert_eq!(foreign.code, 2);
    assert!(foreign.stderr.contains("404"), "{}", foreign.stderr);
}

/// `conveyor patch`: preflight and dry run change nothing; execute repeats the dry run's row
/// count and risk and runs only once confirmed; a high risk wants the table's name (`--yes`
/// alone is refused); rollback restores every row. The table is checked after each.
#[tokio::test]
async fn patch_commands_confirm_as_the_dashboard_does() {
    let mut app = TestApp::spawn().await;
    let target = crate::dashboard_screens::patch_fixture(&mut app).await;
    let accounts = || crate::dashboard_screens::accounts(&target);
    let before = accounts().await;
    let sql = "UPDATE accounts SET plan = 'gold' WHERE id <= 2000";

    let preflight = run(&app, &["patch", "preflight", sql]).await;
    assert_eq!(preflight.code, 0, "{}", preflight.stderr);
    assert!(
        preflight.stdout.contains("risk       ✖ high risk"),
        "{}",
        preflight.stdout
    );
    assert!(
        preflight.stdout.contains("accounts"),
        "{}",
        preflight.stdout
    );
    let dry = run(&app, &["patch", "dry-run", sql]).await;
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert!(
        dry.stdout.contains("2000 rows would change"),
        "{}",
        dry.stdout
    );
    assert!(dry.stdout.contains(r#""free" → "gold""#), "{}", dry.stdout);
    assert_eq!(
        accounts().await,
        before,
        "preflight and dry run change nothing"
    );

    // --yes alone, a wrong name, or no answer: refused, nothing changed.
    let yes = run(&app, &["patch", "execute", sql, "--yes"]).await;
    assert_eq!(yes.code, 2, "{}", yes.stderr);
    assert!(
        yes.stderr.contains("--confirm-table accounts"),
        "{}",
        yes.stderr
    );
    let wrong = run_with_input(&app, &["patch", "execute", sql], "account\n").await;
    assert_eq!(wrong.code, 2, "{}", wrong.stderr);
    assert!(
        wrong.stderr.contains("This will update 2000 rows of"),
        "{}",
        wrong.stderr
    );
    assert!(wrong.stderr.contains("Risk: ✖ high"), "{}", wrong.stderr);
    assert!(
        wrong.stderr.contains("Type the table name (accounts)"),
        "{}",
        wrong.stderr
    );
    let silent = run(&app, &["patch", "execute", sql]).await;
    assert_eq!(silent.code, 2, "{}", silent.stderr);
    assert_eq!(accounts().await, before, "nothing runs unconfirmed");

    let executed = run_with_input(
        &app,
        &["patch", "execute", sql, "--batch-size", "500"],
        "accounts\n",
    )
    .await;
    assert_eq!(executed.code, 0, "{}{}", executed.stderr, executed.stdout);
    assert!(
        executed.stdout.contains(": 2000 rows in 4 batches"),
        "{}",
        executed.stdout
    );
    let patched: Vec<_> = before
        .iter()
        .map(|(id, plan, credits)| {
            let plan = if *id <= 2000 { "gold" } else { plan.as_str() };
            (*id, plan.to_owned(), *credits)
        })
        .collect();
    assert_eq!(accounts().await, patched);
    let job = executed
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("roll back with: conveyor patch rollback "))
        .unwrap_or_else(|| panic!("{}", executed.stdout))
        .to_owned();

    // Another tenant cannot roll it back; its owner can.
    let (_, other_key) = app.tenant_key("other").await;
    let foreign = run_as(&app, &other_key, &["patch", "rollback", &job]).await;
    assert_eq!(foreign.code, 2, "{}", foreign.stderr);
    assert_eq!(accounts().await, patched);
    let rolled = run(&app, &["patch", "rollback", &job]).await;
    assert_eq!(rolled.code, 0, "{}", rolled.stderr);
    assert!(
        rolled.stdout.contains("2000 rows restored"),
        "{}",
        rolled.stdout
    );
    assert_eq!(accounts().await, before);

    // A low risk: `y` runs it, and --yes does for scripts; anything else does not.
    let one = "UPDATE accounts SET credits = 0 WHERE id = 1";
    let no = run_with_input(&app, &["patch", "execute", one], "n\n").await;
    assert_eq!(no.code, 2, "{}", no.stderr);
    assert!(no.stderr.contains("Run it? [y/N]"), "{}", no.stderr);
    assert_eq!(accounts().await, before);
    let scripted = run(&app, &["patch", "execute", one, "--yes"]).await;
    assert_eq!(scripted.code, 0, "{}", scripted.stderr);
    assert_eq!(accounts().await[0], (1, "free".to_owned(), 0));
    target.close().await;
}
