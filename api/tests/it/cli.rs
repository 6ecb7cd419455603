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
    let output = tokio::time::timeout(WAIT, conveyor(app, args).output())
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
