//! Faults with real processes: kill -9 of a worker, a Redis restart, a PostgreSQL crash and
//! restart, SIGTERM.

use crate::harness::{admin_url, free_port, pid_of, KillOnDrop, TestApp};
use serde_json::json;
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

#[tokio::test]
async fn a_killed_workers_job_is_finished_by_another_within_30s() {
    let app = TestApp::spawn().await;
    let mut workers: Vec<KillOnDrop> = (0..2)
        .map(|_| app.spawn_worker_process("canary=1"))
        .collect();
    let id = app
        .submit_canary(json!({"steps": 30, "step_ms": 100}))
        .await;
    let mut running = app
        .wait_status(id, &["running"], Duration::from_secs(30))
        .await;
    // Killed mid-job: once it has made progress, not before its first step.
    let deadline = Instant::now() + Duration::from_secs(30);
    while running["progress"].as_f64().unwrap_or(0.0) == 0.0 {
        assert!(Instant::now() < deadline, "no progress: {running}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        running = app.job(id).await;
    }
    let victim_pid = pid_of(
        &app.own_worker_name(running["worker"].as_str().unwrap())
            .await,
    );
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
}

#[tokio::test]
async fn sigterm_lets_the_running_job_finish() {
    let app = TestApp::spawn().await;
    let worker = app.spawn_worker_process("canary=1");
    let id = app
        .submit_canary(json!({"steps": 20, "step_ms": 100}))
        .await;
    let running = app
        .wait_status(id, &["running"], Duration::from_secs(30))
        .await;
    let name = app
        .own_worker_name(running["worker"].as_str().unwrap())
        .await;
    let took = terminate_while_running(&app, id, worker).await;
    let job = app.job(id).await;
    assert_eq!(
        job["status"], "succeeded",
        "the draining worker finished its job: {job}"
    );
    assert_eq!(job["attempt"], 1);
    // Stopped once its job is done (it waited 5 s more for loops that never end), and stays
    // stopped in its row (its heartbeat went on after it said it stopped).
    assert!(
        took < Duration::from_secs(4),
        "the worker took {took:?} to stop"
    );
    assert!(
        app.worker_stopped(&name).await,
        "the worker's row says it is alive"
    );
}

/// A long canary job running on a worker process of `spec` whose log goes to a file: the
/// worker, the job, and the log's path.
async fn long_job_on_a_logging_worker(
    app: &TestApp,
    spec: &str,
) -> (KillOnDrop, uuid::Uuid, std::path::PathBuf) {
    let log = std::env::temp_dir().join(format!("worker-{}.log", uuid::Uuid::new_v4()));
    let worker = app.spawn_worker_process_logging(spec, &[], std::fs::File::create(&log).unwrap());
    let id = app
        .submit_canary(json!({"steps": 600, "step_ms": 100}))
        .await;
    app.wait_status(id, &["running"], Duration::from_secs(30))
        .await;
    (worker, id, log)
}

/// Waits up to 15 s for the worker's log to say `said` of job `id`, then removes the log.
async fn wait_for_the_log(log: &std::path::Path, id: uuid::Uuid, said: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(log).unwrap();
        if text.contains(said) && text.contains(&id.to_string()) {
            break;
        }
        assert!(Instant::now() < deadline, "no {said:?} in:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_file(log);
}

/// A worker whose job was taken from it (the rescuer's, while its heartbeats did not arrive)
/// stops running that job: another worker may be running it now.
#[tokio::test]
async fn a_worker_stops_a_job_whose_lease_it_lost() {
    let app = TestApp::spawn().await;
    let (_worker, id, log) = long_job_on_a_logging_worker(&app, "canary=1").await;
    // As a rescue and another worker's claim leave the row.
    sqlx::query("UPDATE jobs SET worker = 'elsewhere', attempt = attempt + 1 WHERE id = $1")
        .bind(id)
        .execute(app.pool())
        .await
        .unwrap();
    wait_for_the_log(&log, id, "its lease was lost").await;
}

/// A job rescued from a worker whose heartbeats did not arrive may be claimed by that same
/// worker again while its first attempt still runs there: the rows name this worker again, so
/// nothing stopped the first attempt, and two ran at once. The earlier attempt is stopped and
/// the new one waits for it.
#[tokio::test]
async fn a_job_claimed_again_by_its_own_worker_stops_the_earlier_attempt() {
    let app = TestApp::spawn().await;
    let (_worker, id, log) = long_job_on_a_logging_worker(&app, "canary=2").await;
    // As a rescue leaves the row; the worker's next full claim takes it again.
    sqlx::query("UPDATE jobs SET status = 'queued', worker = NULL WHERE id = $1")
        .bind(id)
        .execute(app.pool())
        .await
        .unwrap();
    wait_for_the_log(&log, id, "an earlier attempt still ran here").await;
    let job = app.job(id).await;
    assert_eq!(
        (job["status"].as_str(), job["attempt"].as_i64()),
        (Some("running"), Some(2)),
        "{job}"
    );
}

/// Past the grace period, SIGTERM hands the running job back to the queue: the worker exits
/// cleanly, the job is `queued` again (neither lost nor failed), and another worker runs it
/// to the end.
#[tokio::test]
async fn sigterm_past_the_grace_period_hands_the_job_back_for_another_worker() {
    let app = TestApp::spawn().await;
    let worker =
        app.spawn_worker_process_with("canary=1", &[("CONVEYOR_SHUTDOWN_GRACE_SECS", "1")]);
    let id = app
        .submit_canary(json!({"steps": 100, "step_ms": 100}))
        .await;
    let took = terminate_while_running(&app, id, worker).await;
    // Within what a process manager is told to wait (deploy/k8s, docker-compose.yml).
    let bound = Duration::from_secs(1) + worker::AFTER_GRACE;
    assert!(
        took < bound,
        "the worker took {took:?} to stop, over {bound:?}"
    );
    let job = app.job(id).await;
    assert_eq!(job["status"], "queued", "handed back, not finished: {job}");
    let _other = app.spawn_worker_process("canary=1");
    let job = app
        .wait_status(id, &["succeeded", "failed"], Duration::from_secs(60))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 2, "the second worker ran it again: {job}");
}

/// Sends SIGTERM to `worker` once job `id` runs, and waits for a clean exit; returns how long
/// the worker took to stop.
async fn terminate_while_running(
    app: &TestApp,
    id: uuid::Uuid,
    mut worker: KillOnDrop,
) -> Duration {
    app.wait_status(id, &["running"], Duration::from_secs(30))
        .await;
    let sent = Instant::now();
    Command::new("kill")
        .arg("-TERM")
        .arg(worker.id().to_string())
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || worker.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "worker exit: {status:?}");
    sent.elapsed()
}

/// A private Redis on its own port, so restarting it disturbs no other test.
pub(crate) struct PrivateRedis {
    port: u16,
    child: Option<KillOnDrop>,
}

impl PrivateRedis {
    pub(crate) fn start(port: u16) -> Self {
        let mut redis = Self { port, child: None };
        redis.launch();
        redis
    }

    pub(crate) fn launch(&mut self) {
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
        self.child = Some(KillOnDrop(child));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "private redis did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, and reaped: the port is free once this returns.
    pub(crate) fn kill(&mut self) {
        self.child.take();
    }
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
    let _worker = app.spawn_worker_process("canary=2");
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
}

/// Redis is no queue: while it is down, a running worker process still claims and runs what
/// is submitted (the jobs' events are lost; the rows are the truth). When jobs went through
/// Redis lists, nothing ran until Redis was back.
#[tokio::test]
async fn a_worker_runs_jobs_while_redis_is_down() {
    let port = free_port();
    let mut redis = PrivateRedis::start(port);
    let app = TestApp::spawn_with(|s| s.redis_url = format!("redis://127.0.0.1:{port}")).await;
    let _worker = app.spawn_worker_process("canary=2");
    let first = app.submit_canary(json!({"steps": 1})).await;
    let job = app
        .wait_status(first, &["succeeded", "failed"], Duration::from_secs(30))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");

    redis.kill();
    let mut ids = Vec::new();
    // Each submission waits out the API's Redis timeouts (its events, its announcement).
    for _ in 0..2 {
        ids.push(app.submit_canary(json!({"steps": 1})).await);
    }
    for id in ids {
        let job = app
            .wait_status(id, &["succeeded", "failed"], Duration::from_secs(30))
            .await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "Redis stayed down throughout"
    );
}

/// A job submitted while Redis is down: the row is written first, so the API still answers
/// 202 (the announcement fails and is counted); once Redis is back, a worker claims it and it
/// runs.
#[tokio::test]
async fn a_job_submitted_while_redis_is_down_runs_once_it_is_back() {
    let port = free_port();
    let mut redis = PrivateRedis::start(port);
    let app = TestApp::spawn_with(|s| s.redis_url = format!("redis://127.0.0.1:{port}")).await;
    redis.kill();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the test's Redis is down"
    );

    let (status, job) = tokio::time::timeout(
        Duration::from_secs(30),
        app.post(
            "/v1/jobs",
            &json!({"kind": "canary", "payload": {"steps": 1}}),
        ),
    )
    .await
    .expect("the API answers while Redis is down");
    assert_eq!(status, 202, "{job}");
    let id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(app.job(id).await["status"], "queued");
    // The announcement failed and was counted (`conveyor_queue_announce_failures_total`);
    // the job waits in PostgreSQL.
    let refill = &app.server.as_ref().unwrap().state.refill;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while refill.failures() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no failed announcement counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Redis comes back empty; nothing but the row knows of the job.
    redis.launch();
    let _worker = app.spawn_worker_process("canary=1");
    let job = app
        .wait_status(id, &["succeeded", "failed"], Duration::from_secs(30))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
}

/// Open streams ride out a Redis restart mid-job: the API's feed reconnects and reads the
/// fresh streams, so a job's stream still ends with the job's outcome and the tenant's stream
/// carries it too.
#[tokio::test]
async fn open_event_streams_ride_out_a_redis_restart() {
    let port = free_port();
    let mut redis = PrivateRedis::start(port);
    let app = TestApp::spawn_with(|s| s.redis_url = format!("redis://127.0.0.1:{port}")).await;
    let _worker = app.spawn_worker_process("canary=2");
    let id = app
        .submit_canary(json!({"steps": 40, "step_ms": 150}))
        .await;
    let mut tenant = app.sse("/v1/events", None).await;
    let mut job = app.sse(&format!("/v1/jobs/{id}/events"), None).await;
    let wait = Duration::from_secs(30);
    while job
        .next(wait)
        .await
        .expect("events before the restart")
        .event
        != "progress"
    {}
    redis.kill();
    redis.launch();
    let rest = job.collect(Duration::from_secs(40)).await;
    let last = rest.last().expect("events after the restart");
    assert!(
        last.event == "succeeded"
            || (last.event == "snapshot" && last.data["status"] == "succeeded"),
        "{rest:?}"
    );
    loop {
        let event = tenant.next(wait).await.expect("the tenant stream goes on");
        if event.data["job_id"] == id.to_string() && event.event == "succeeded" {
            break;
        }
    }
}

/// A private PostgreSQL cluster on its own port, run by the binaries of the server the tests
/// use (pgvector included), so that crashing it disturbs no other test.
struct PrivatePostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

impl PrivatePostgres {
    async fn start() -> Self {
        let pg = Self {
            bin: postgres_bin().await,
            dir: std::env::temp_dir()
                .join(format!("conveyor-pg-{}", uuid::Uuid::new_v4().simple())),
            port: free_port(),
        };
        std::fs::create_dir_all(&pg.dir).unwrap();
        if as_root() {
            // PostgreSQL refuses to run as root.
            let ok = Command::new("chown")
                .arg("postgres")
                .arg(&pg.dir)
                .status()
                .unwrap();
            assert!(ok.success(), "chown postgres {}", pg.dir.display());
        }
        let data = pg.dir.join("data");
        pg.run(
            "initdb",
            &[
                "-D",
                path(&data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        );
        pg.launch();
        pg
    }

    fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn launch(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            path(&self.dir)
        );
        let (data, log) = (self.dir.join("data"), self.dir.join("log"));
        self.run(
            "pg_ctl",
            &[
                "-D",
                path(&data),
                "-l",
                path(&log),
                "-o",
                &options,
                "-w",
                "start",
            ],
        );
    }

    /// Stops like a crash: connections cut, no shutdown checkpoint, recovery at the next start.
    fn crash(&self) {
        let data = self.dir.join("data");
        self.run(
            "pg_ctl",
            &["-D", path(&data), "-m", "immediate", "-w", "stop"],
        );
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self
            .command(program, args)
            .output()
            .expect("PostgreSQL binaries");
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `program` of the cluster's binaries, as the postgres user when the tests run as root.
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let program = self.bin.join(program);
        let mut command = if as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        command.args(args);
        command
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self
            .command("pg_ctl", &["-D", path(&data), "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn as_root() -> bool {
    let uid = Command::new("id").arg("-u").output().unwrap().stdout;
    String::from_utf8_lossy(&uid).trim() == "0"
}

/// The binaries of the server behind the tests' admin URL (whichever checkout started it): the
/// executable of one of its backends, read while the connection holds it alive.
async fn postgres_bin() -> PathBuf {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&admin_url()).await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("the server's executable");
    exe.parent().expect("a bin directory").to_owned()
}

#[tokio::test]
async fn a_postgres_crash_and_restart_loses_no_accepted_job() {
    let pg = PrivatePostgres::start().await;
    let app = TestApp::spawn_on(pg.admin_url(), |_| {}).await;
    let _worker = app.spawn_worker_process("canary=4");
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(
            app.submit_canary(json!({"steps": 20, "step_ms": 100}))
                .await,
        );
    }
    app.wait_status(ids[0], &["running"], Duration::from_secs(30))
        .await;
    pg.crash();
    // While it is down a submission is refused with 503, never half-accepted.
    let (status, problem) = app
        .post(
            "/v1/jobs",
            &json!({"kind": "canary", "payload": {"steps": 1}}),
        )
        .await;
    assert_eq!(status, 503, "{problem}");
    assert_eq!(problem["status"], 503, "{problem}");
    // Not a wait for a condition: PostgreSQL stays down a while, so that the pools' failed
    // reconnects (not just one dropped connection) are part of what the test rides out.
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.launch();
    ids.push(app.submit_canary(json!({"steps": 2})).await);
    for id in &ids {
        let job = app
            .wait_status(
                *id,
                &["succeeded", "failed", "cancelled"],
                Duration::from_secs(60),
            )
            .await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
}
