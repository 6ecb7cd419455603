//! Faults with real processes: kill -9 of a worker, a Redis restart, SIGTERM.

use crate::harness::{binary, TestApp};
use serde_json::json;
use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

fn pid_of(worker_name: &str) -> u32 {
    // Worker names are host-pid-random.
    let parts: Vec<&str> = worker_name.rsplitn(3, '-').collect();
    parts[1].parse().expect("pid in worker name")
}

#[tokio::test]
async fn a_killed_workers_job_is_finished_by_another_within_30s() {
    let app = TestApp::spawn().await;
    let mut workers: Vec<Child> = (0..2)
        .map(|_| app.spawn_worker_process("canary=1"))
        .collect();
    let id = app
        .submit_canary(json!({"steps": 30, "step_ms": 100}))
        .await;
    let running = app
        .wait_status(id, &["running"], Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let victim_pid = pid_of(running["worker"].as_str().unwrap());
    let victim = workers
        .iter_mut()
        .find(|w| w.id() == victim_pid)
        .expect("the job runs in one of ours");
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();
    let killed_at = Instant::now();

    let job = app
        .wait_status(id, &["succeeded", "failed"], Duration::from_secs(30))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 2, "the rescued job ran once more: {job}");
    assert!(killed_at.elapsed() < Duration::from_secs(30));
    for mut w in workers {
        let _ = w.kill();
        let _ = w.wait();
    }
}

#[tokio::test]
async fn sigterm_lets_the_running_job_finish() {
    let app = TestApp::spawn().await;
    let mut worker = app.spawn_worker_process("canary=1");
    let id = app
        .submit_canary(json!({"steps": 20, "step_ms": 100}))
        .await;
    app.wait_status(id, &["running"], Duration::from_secs(30))
        .await;
    Command::new("kill")
        .arg("-TERM")
        .arg(worker.id().to_string())
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || worker.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "worker exit: {status:?}");
    let job = app.job(id).await;
    assert_eq!(
        job["status"], "succeeded",
        "the draining worker finished its job: {job}"
    );
    assert_eq!(job["attempt"], 1);
}

/// A private Redis on its own port, so restarting it disturbs no other test.
struct PrivateRedis {
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    fn start(port: u16) -> Self {
        let mut redis = Self { port, child: None };
        redis.launch();
        redis
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "private redis did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn a_redis_restart_loses_no_accepted_job() {
    let port = free_port();
    let mut redis = PrivateRedis::start(port);
    let app = TestApp::spawn_with(|s| s.redis_url = format!("redis://127.0.0.1:{port}")).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(app.submit_canary(json!({"steps": 1})).await);
    }
    // Redis keeps nothing on disk: a restart empties every queue.
    redis.kill();
    redis.launch();
    // Accepted while Redis was down is accepted too (the row is written first).
    let mut worker = app.spawn_worker_process("canary=2");
    ids.push(app.submit_canary(json!({"steps": 1})).await);
    for id in &ids {
        let job = app
            .wait_status(*id, &["succeeded", "failed"], Duration::from_secs(30))
            .await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    // A restart under a running worker: it reconnects and keeps working.
    redis.kill();
    redis.launch();
    let late = app.submit_canary(json!({"steps": 2})).await;
    let job = app
        .wait_status(late, &["succeeded", "failed"], Duration::from_secs(30))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let _ = worker.kill();
    let _ = worker.wait();
    let _ = binary("conveyor-worker");
}
