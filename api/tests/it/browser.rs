//! The dashboard end to end in a real headless browser: Debian's chromium driven by
//! playwright-core (tests/browser/dashboard.mjs), against the in-process API and a worker.
//! `scripts/browser-deps` installs both; without them this test fails rather than pass unseen.

use crate::harness::TestApp;
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn the_dashboard_signs_in_submits_imports_cancels_and_survives_a_cut_stream() {
    let root = workspace_root();
    let script = root.join("tests/browser/dashboard.mjs");
    assert!(
        root.join("tests/browser/node_modules/playwright-core")
            .is_dir(),
        "playwright-core missing: run scripts/browser-deps"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} missing: run scripts/browser-deps"
    );
    let artifacts = std::env::var("CONVEYOR_TEST_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target/test-artifacts"));

    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("canary", 4), ("import", 1), ("synthesis", 1)])
        .await;
    let mut node = tokio::process::Command::new("node")
        .arg(&script)
        .arg(&app.base)
        .arg(&app.key)
        .current_dir(&root)
        .env("CONVEYOR_TEST_ARTIFACTS", &artifacts)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut requests = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut answers = node.stdin.take().unwrap();

    let run = async {
        while let Some(line) = requests.next_line().await.unwrap() {
            assert_eq!(
                line, "restart-api",
                "unexpected request from the browser script"
            );
            // Stop the API mid-job: its SSE streams end and their connections close. The job
            // goes on in the worker; the API comes back on the same port a little later.
            let server = app.server.take().expect("api running");
            let addr = server.addr;
            server.shutdown().await;
            // Not a wait for a condition: the API stays down a while, so the page's
            // EventSource sees its retries fail before the API is back.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            app.settings.listen = addr;
            app.start_api().await;
            answers.write_all(b"restarted\n").await.unwrap();
        }
        node.wait().await.unwrap()
    };
    let status = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the browser test finishes within 4 minutes");
    assert!(status.success(), "the browser test failed: {status}");
    assert!(artifacts.join("dashboard.png").is_file());

    // The CSV the browser uploaded and imported from the dashboard is a table now.
    let target = sqlx::PgPool::connect(&app.target_url()).await.unwrap();
    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT id, city FROM orders ORDER BY id")
        .fetch_all(&target)
        .await
        .unwrap();
    let expected: Vec<(i64, String)> = (1..=40)
        .map(|i| (i, ["Lyon", "Oslo", "Porto"][(i as usize - 1) % 3].into()))
        .collect();
    assert_eq!(rows, expected);
    target.close().await;
}
