//! The dashboard end to end in a real headless browser: Debian's chromium driven by
//! playwright-core (scripts under tests/browser), against the in-process API and a worker.
//! `scripts/browser-deps` installs both; without them these tests fail rather than pass unseen.

use crate::harness::TestApp;
use std::{
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout},
};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

pub fn artifacts_dir() -> PathBuf {
    std::env::var("CONVEYOR_TEST_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target/test-artifacts"))
}

/// A node script under tests/browser driving chromium against `app`. It asks the test things
/// (check a table, compare a search) by printing a line, and waits for the answer on stdin.
pub struct BrowserScript {
    node: Child,
    requests: Lines<BufReader<ChildStdout>>,
    answers: ChildStdin,
}

impl BrowserScript {
    pub fn start(app: &TestApp, script: &str, args: &[&str]) -> Self {
        let root = workspace_root();
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
        let mut node = tokio::process::Command::new("node")
            .arg(root.join("tests/browser").join(script))
            .arg(&app.base)
            .arg(&app.key)
            .args(args)
            .current_dir(&root)
            .env("CONVEYOR_TEST_ARTIFACTS", artifacts_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs");
        let requests = BufReader::new(node.stdout.take().unwrap()).lines();
        let answers = node.stdin.take().unwrap();
        Self {
            node,
            requests,
            answers,
        }
    }

    /// The script's next request; `None` once it has finished.
    pub async fn request(&mut self) -> Option<String> {
        self.requests.next_line().await.unwrap()
    }

    pub async fn answer(&mut self, line: &str) {
        let line = format!("{line}\n");
        self.answers.write_all(line.as_bytes()).await.unwrap();
    }

    /// Waits for the script to end, within `limit`; asserts it passed.
    pub async fn finish(mut self, limit: Duration) {
        let status: ExitStatus = tokio::time::timeout(limit, self.node.wait())
            .await
            .expect("the browser script finishes in time")
            .unwrap();
        assert!(status.success(), "the browser script failed: {status}");
    }
}

#[tokio::test]
async fn the_dashboard_signs_in_submits_imports_cancels_and_survives_a_cut_stream() {
    let mut app = TestApp::spawn().await;
    app.start_worker_for(&[("canary", 4), ("import", 1), ("synthesis", 1)])
        .await;
    let mut script = BrowserScript::start(&app, "dashboard.mjs", &[]);
    let run = async {
        while let Some(line) = script.request().await {
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
            script.answer("restarted").await;
        }
        script
    };
    let script = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the browser test finishes within 4 minutes");
    script.finish(Duration::from_secs(60)).await;
    assert!(artifacts_dir().join("dashboard.png").is_file());

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
