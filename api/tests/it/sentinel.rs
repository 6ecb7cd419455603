//! Redis with failover: Debian's `redis-server` as a primary and a replica and
//! `redis-sentinel` watching them, on loopback ports of this test's own, reached through a
//! `redis+sentinel://` URL. The sentinel has a password of its own (`requirepass`), apart from
//! the data nodes'. The primary is killed (SIGKILL), or demoted and left running; the sentinel
//! promotes the replica, and connections find the new primary by themselves.

use crate::harness::{free_port, KillOnDrop, SseMessage, SseReader, TestApp};
use redis::AsyncCommands;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use shared::redis_conn::Redis;
use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};
use uuid::Uuid;

const MASTER: &str = "conveyor";
/// The data nodes' password (the sentinel has none), with characters the URL must encode.
const PASSWORD: &str = "pa@ss:word";
const PASSWORD_IN_URL: &str = "pa%40ss%3Aword";
/// The sentinel's own password, another one, with characters a query string must encode.
const SENTINEL_PASSWORD: &str = "s&nt=nel#pw";
const SENTINEL_PASSWORD_IN_URL: &str = "s%26nt%3Dnel%23pw";

/// A primary, its replica and a sentinel, killed and their files removed on drop.
struct Nodes {
    primary: KillOnDrop,
    _replica: KillOnDrop,
    primary_port: u16,
    _sentinel: KillOnDrop,
    replica_port: u16,
    sentinel_port: u16,
    dir: PathBuf,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn redis_server(dir: &std::path::Path, port: u16, extra: &[String]) -> KillOnDrop {
    let dir = dir.join(port.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    let child = Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--maxmemory-policy", "noeviction"])
        .args(["--requirepass", PASSWORD, "--masterauth", PASSWORD])
        .arg("--dir")
        .arg(&dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (scripts/services installs it)");
    KillOnDrop(child)
}

/// `INFO`-style answers, polled until `ready` holds of them.
async fn poll<T>(
    what: &str,
    within: Duration,
    mut ask: impl FnMut() -> redis::RedisResult<T>,
    ready: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        let last = ask();
        match &last {
            Ok(answer) if ready(answer) => return last.unwrap(),
            _ if Instant::now() > deadline => panic!("{what} within {within:?}: {:?}", last.err()),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// `cmd` on the data node at `port`, with the data nodes' password.
fn query<T: redis::FromRedisValue>(port: u16, cmd: &mut redis::Cmd) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://:{PASSWORD_IN_URL}@127.0.0.1:{port}"))?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(1))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    cmd.query(&mut conn)
}

fn ask_sentinel<T: redis::FromRedisValue>(
    port: u16,
    cmd: &mut redis::Cmd,
) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!(
        "redis://:{SENTINEL_PASSWORD_IN_URL}@127.0.0.1:{port}"
    ))?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(1))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    cmd.query(&mut conn)
}

impl Nodes {
    /// Started, the replica in sync and known to the sentinel.
    async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("conveyor-sentinel-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let (primary_port, replica_port, sentinel_port) = (free_port(), free_port(), free_port());
        let primary = redis_server(&dir, primary_port, &[]);
        let replica = redis_server(
            &dir,
            replica_port,
            &[
                "--replicaof".into(),
                "127.0.0.1".into(),
                primary_port.to_string(),
            ],
        );
        // The sentinel rewrites its configuration file: one of its own.
        let config = dir.join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "bind 127.0.0.1\nport {sentinel_port}\ndir {}\n\
                 sentinel monitor {MASTER} 127.0.0.1 {primary_port} 1\n\
                 sentinel down-after-milliseconds {MASTER} 1000\n\
                 sentinel failover-timeout {MASTER} 10000\n\
                 sentinel auth-pass {MASTER} {PASSWORD}\n\
                 requirepass \"{SENTINEL_PASSWORD}\"\n",
                dir.display()
            ),
        )
        .unwrap();
        let sentinel = Command::new("redis-sentinel")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-sentinel (scripts/services installs the Debian package)");
        let nodes = Self {
            primary,
            _replica: replica,
            primary_port,
            _sentinel: KillOnDrop(sentinel),
            replica_port,
            sentinel_port,
            dir,
        };
        poll(
            "the replica in sync",
            Duration::from_secs(20),
            || query::<String>(replica_port, redis::cmd("INFO").arg("replication")),
            |info| info.contains("master_link_status:up"),
        )
        .await;
        poll(
            "the sentinel knowing the replica",
            Duration::from_secs(30),
            || {
                ask_sentinel::<Vec<redis::Value>>(
                    sentinel_port,
                    redis::cmd("SENTINEL").arg("replicas").arg(MASTER),
                )
            },
            |replicas| !replicas.is_empty(),
        )
        .await;
        nodes
    }

    /// With a sentinel that is not there first: the next one in the list is asked.
    fn url(&self) -> String {
        format!(
            "{}?sentinel_password={SENTINEL_PASSWORD_IN_URL}",
            self.url_without_sentinel_password()
        )
    }

    fn url_without_sentinel_password(&self) -> String {
        format!(
            "redis+sentinel://:{PASSWORD_IN_URL}@127.0.0.1:{},127.0.0.1:{}/{MASTER}",
            free_port(),
            self.sentinel_port
        )
    }

    /// Kills the primary (SIGKILL) and waits until the sentinel has promoted the replica.
    async fn fail_over(&mut self) {
        self.primary.kill().unwrap();
        self.primary.wait().unwrap();
        let replica = self.replica_port.to_string();
        poll(
            "the replica promoted",
            Duration::from_secs(30),
            || {
                ask_sentinel::<Vec<String>>(
                    self.sentinel_port,
                    redis::cmd("SENTINEL")
                        .arg("get-master-addr-by-name")
                        .arg(MASTER),
                )
            },
            |addr| addr.get(1) == Some(&replica),
        )
        .await;
        poll(
            "the replica a primary",
            Duration::from_secs(10),
            || query::<Vec<redis::Value>>(self.replica_port, &mut redis::cmd("ROLE")),
            |role| matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master"),
        )
        .await;
    }
}

/// The port of the node a connection is on.
async fn port_of(conn: &mut shared::redis_conn::RedisConn) -> redis::RedisResult<u16> {
    let config: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("port")
        .query_async(conn)
        .await?;
    Ok(config[1].parse().unwrap())
}

/// One shared connection, as the binaries hold it, keeps working across a failover: after the
/// primary dies its commands fail for a while, then reach the promoted replica, with what was
/// written before the failover.
#[tokio::test]
async fn a_connection_follows_the_primary_through_a_failover() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let mut nodes = Nodes::start().await;
        let mut conn = Redis::open(&nodes.url()).unwrap().manager().await.unwrap();
        let _: () = conn.set("before", "kept").await.unwrap();
        let _: () = redis::cmd("WAIT")
            .arg(1)
            .arg(5000)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_ne!(port_of(&mut conn).await.unwrap(), nodes.replica_port);

        nodes.fail_over().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut failures = 0;
        loop {
            match conn.incr::<_, _, i64>("after", 1).await {
                Ok(_) => break,
                Err(e) => {
                    failures += 1;
                    assert!(Instant::now() < deadline, "never reconnected: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        assert!(failures >= 1, "the first command after the kill fails");
        assert_eq!(port_of(&mut conn).await.unwrap(), nodes.replica_port);
        let kept: String = conn.get("before").await.unwrap();
        assert_eq!(kept, "kept");
        // Clones share the connection: they are on the new primary too.
        let mut clone = conn.clone();
        assert_eq!(port_of(&mut clone).await.unwrap(), nodes.replica_port);
    })
    .await
    .expect("the test stops within its bound");
}

fn terminal(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "cancelled")
}

/// An API process and a worker process on the sentinel URL; jobs submitted before and during
/// the failover; the primary killed while jobs run and a job's event stream is open. Every job
/// the API accepted ends (succeeded), each ran once (one claim, attempt 1), and the open stream
/// ends with the job's outcome.
#[tokio::test]
async fn jobs_accepted_around_a_failover_all_finish_once_and_streams_end_with_their_outcome() {
    tokio::time::timeout(Duration::from_secs(180), async {
        let mut nodes = Nodes::start().await;
        let url = nodes.url();
        let app = TestApp::spawn_with(|s| s.redis_url = url.clone()).await;
        let (_api, base) = app.spawn_api_process().await;
        let _worker = app.spawn_worker_process("canary=4");
        let client = Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let submit = || async {
            let body = json!({"kind": "canary", "payload": {"steps": 30, "step_ms": 100}});
            let response = client
                .post(format!("{base}/v1/jobs"))
                .bearer_auth(&app.key)
                .json(&body)
                .send()
                .await;
            match response {
                Ok(r) if r.status() == StatusCode::ACCEPTED => {
                    let job: Value = r.json().await.unwrap();
                    Some(job["id"].as_str().unwrap().parse::<Uuid>().unwrap())
                }
                Ok(r) => {
                    eprintln!("submission refused: {}", r.status());
                    None
                }
                Err(e) => {
                    eprintln!("submission failed: {e}");
                    None
                }
            }
        };
        let mut accepted = Vec::new();
        for _ in 0..6 {
            accepted.push(submit().await.expect("accepted before the failover"));
        }
        // The first job runs and its stream is open and has shown progress.
        let watched = accepted[0];
        let response = client
            .get(format!("{base}/v1/jobs/{watched}/events"))
            .bearer_auth(&app.key)
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut stream = SseReader::from_response(response);
        let mut events: Vec<SseMessage> = Vec::new();
        while !events.iter().any(|e| e.event == "progress") {
            let event = stream.next(Duration::from_secs(20)).await;
            events.push(event.expect("progress before the failover"));
        }

        nodes.fail_over().await;
        // Submissions during and after the promotion: the ones accepted must all run.
        let mut refused = 0;
        for _ in 0..10 {
            match submit().await {
                Some(id) => accepted.push(id),
                None => refused += 1,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            accepted.len() > 6,
            "nothing accepted after the failover ({refused} refused)"
        );

        // The open stream goes on to the job's outcome: its terminal event, or, when the
        // worker finished while the event store was still out of reach (the event was never
        // appended), a closing snapshot of the row with the terminal status.
        let outcome = |e: &SseMessage| match e.event.as_str() {
            "snapshot" => e.data["status"]
                .as_str()
                .filter(|s| terminal(s))
                .map(str::to_owned),
            event => terminal(event).then(|| event.to_owned()),
        };
        while events.last().is_none_or(|e| outcome(e).is_none()) {
            let event = stream.next(Duration::from_secs(60)).await;
            events.push(event.expect("the stream goes on to the job's end"));
        }
        let job = app
            .wait_status(
                watched,
                &["succeeded", "failed", "cancelled"],
                Duration::from_secs(60),
            )
            .await;
        assert_eq!(
            outcome(events.last().unwrap()).as_deref(),
            job["status"].as_str()
        );

        for id in &accepted {
            let job = app
                .wait_status(
                    *id,
                    &["succeeded", "failed", "cancelled"],
                    Duration::from_secs(90),
                )
                .await;
            assert_eq!(job["status"], "succeeded", "{job}");
            // Claimed once: a second run, at once or after, would have claimed it again.
            assert_eq!(job["attempt"], 1, "{job}");
        }
        eprintln!(
            "{} jobs accepted ({refused} refused during the failover), all succeeded once",
            accepted.len()
        );
    })
    .await
    .expect("the failover test stops within its bound");
}

/// The sentinel requires its own password: a URL without it finds no primary (and says so
/// without either password), one with it connects; neither password is shown.
#[tokio::test]
async fn the_sentinels_own_password_is_used_and_never_shown() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let nodes = Nodes::start().await;
        let refused = Redis::open(&nodes.url_without_sentinel_password())
            .unwrap()
            .manager()
            .await
            .err()
            .expect("no primary without the sentinel's password");
        let error = refused.to_string();
        assert!(
            !error.contains(PASSWORD) && !error.contains(SENTINEL_PASSWORD),
            "{error}"
        );

        let redis = Redis::open(&nodes.url()).unwrap();
        let shown = format!("{redis:?}");
        for secret in [
            PASSWORD,
            PASSWORD_IN_URL,
            SENTINEL_PASSWORD,
            SENTINEL_PASSWORD_IN_URL,
        ] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("sentinel_password=***"), "{shown}");
        let mut conn = redis.manager().await.expect("connects with the password");
        let _: () = conn.set("k", "v").await.unwrap();
        assert_ne!(port_of(&mut conn).await.unwrap(), nodes.replica_port);
    })
    .await
    .expect("the test stops within its bound");
}

/// The primary is demoted and left running (`REPLICAOF`, as an operator or a sentinel does):
/// a connection still on it gets `READONLY` for its next write, drops it, and its following
/// commands reach the new primary the sentinel names.
#[tokio::test]
async fn a_connection_on_a_demoted_primary_that_stays_up_follows_the_new_one() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let nodes = Nodes::start().await;
        let mut conn = Redis::open(&nodes.url()).unwrap().manager().await.unwrap();
        let _: () = conn.set("before", "kept").await.unwrap();
        // On the replica (polled: WAIT may outlast the connection's 500 ms on a busy machine).
        poll(
            "the write on the replica",
            Duration::from_secs(10),
            || query::<Option<String>>(nodes.replica_port, redis::cmd("GET").arg("before")),
            |kept| kept.is_some(),
        )
        .await;
        assert_eq!(port_of(&mut conn).await.unwrap(), nodes.primary_port);

        // Swap the roles by hand, the old primary alive; the sentinel still names it.
        let _: () = query(
            nodes.replica_port,
            redis::cmd("REPLICAOF").arg("NO").arg("ONE"),
        )
        .unwrap();
        let _: () = query(
            nodes.primary_port,
            redis::cmd("REPLICAOF")
                .arg("127.0.0.1")
                .arg(nodes.replica_port),
        )
        .unwrap();
        let role: Vec<redis::Value> = query(nodes.primary_port, &mut redis::cmd("ROLE")).unwrap();
        assert!(matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"slave"));

        // The next write lands on the demoted node: READONLY, and the connection is dropped.
        let error = conn
            .incr::<_, _, i64>("after", 1)
            .await
            .expect_err("the old primary refuses writes");
        assert_eq!(error.code(), Some("READONLY"), "{error}");
        // Dropped: the next command looks for the primary again, and finds none yet (the node
        // the sentinel names answers ROLE as a replica) rather than READONLY again.
        let error = conn
            .incr::<_, _, i64>("after", 1)
            .await
            .expect_err("no primary named yet");
        assert_ne!(
            error.code(),
            Some("READONLY"),
            "still on the demoted node: {error}"
        );

        // The sentinel pointed at the new primary: commands reach it.
        for cmd in [
            redis::cmd("SENTINEL").arg("REMOVE").arg(MASTER).clone(),
            redis::cmd("SENTINEL")
                .arg("MONITOR")
                .arg(MASTER)
                .arg("127.0.0.1")
                .arg(nodes.replica_port)
                .arg(1)
                .clone(),
            redis::cmd("SENTINEL")
                .arg("SET")
                .arg(MASTER)
                .arg("auth-pass")
                .arg(PASSWORD)
                .clone(),
        ] {
            let _: () = ask_sentinel(nodes.sentinel_port, &mut cmd.clone()).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let after: i64 = loop {
            match conn.incr("after", 1).await {
                Ok(after) => break after,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "never reached the new primary: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        assert_eq!(after, 1);
        assert_eq!(port_of(&mut conn).await.unwrap(), nodes.replica_port);
        let kept: String = conn.get("before").await.unwrap();
        assert_eq!(kept, "kept");
        // The demoted node is up all along, a replica of the new primary.
        assert_eq!(
            query::<String>(nodes.primary_port, &mut redis::cmd("PING")).unwrap(),
            "PONG"
        );
    })
    .await
    .expect("the test stops within its bound");
}

/// A sentinel failover (`SENTINEL FAILOVER`) while an API process and a worker process run
/// jobs: the old primary is not killed but made a replica. Every job accepted before and after
/// ends once (succeeded, attempt 1); the old primary is up and a replica; no password is in
/// the processes' logs.
#[tokio::test]
async fn jobs_finish_once_when_the_sentinel_demotes_a_primary_that_stays_up() {
    tokio::time::timeout(Duration::from_secs(180), async {
        let nodes = Nodes::start().await;
        let url = nodes.url();
        let app = TestApp::spawn_with(|s| s.redis_url = url.clone()).await;
        let log_dir = app.settings.data_dir.join("logs");
        std::fs::create_dir_all(&log_dir).unwrap();
        let log = |name: &str| std::fs::File::create(log_dir.join(name)).unwrap();
        let (_api, base) = app
            .spawn_api_process_logging(&[("RUST_LOG", "info")], log("api.log"))
            .await;
        let _worker = app.spawn_worker_process_logging(
            "canary=4",
            &[("RUST_LOG", "info")],
            log("worker.log"),
        );
        let client = Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let submit = || async {
            let body = json!({"kind": "canary", "payload": {"steps": 20, "step_ms": 100}});
            let response = client
                .post(format!("{base}/v1/jobs"))
                .bearer_auth(&app.key)
                .json(&body)
                .send()
                .await;
            match response {
                Ok(r) if r.status() == StatusCode::ACCEPTED => {
                    let job: Value = r.json().await.unwrap();
                    Some(job["id"].as_str().unwrap().parse::<Uuid>().unwrap())
                }
                Ok(r) => {
                    eprintln!("submission refused: {}", r.status());
                    None
                }
                Err(e) => {
                    eprintln!("submission failed: {e}");
                    None
                }
            }
        };
        let mut accepted = Vec::new();
        for _ in 0..6 {
            accepted.push(submit().await.expect("accepted before the failover"));
        }
        app.wait_status(accepted[0], &["running"], Duration::from_secs(30))
            .await;

        let _: () = ask_sentinel(
            nodes.sentinel_port,
            redis::cmd("SENTINEL").arg("FAILOVER").arg(MASTER),
        )
        .unwrap();
        let replica = nodes.replica_port.to_string();
        poll(
            "the sentinel naming the new primary",
            Duration::from_secs(30),
            || {
                ask_sentinel::<Vec<String>>(
                    nodes.sentinel_port,
                    redis::cmd("SENTINEL")
                        .arg("get-master-addr-by-name")
                        .arg(MASTER),
                )
            },
            |addr| addr.get(1) == Some(&replica),
        )
        .await;
        let mut refused = 0;
        for _ in 0..10 {
            match submit().await {
                Some(id) => accepted.push(id),
                None => refused += 1,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(accepted.len() > 6, "nothing accepted after the failover");
        for id in &accepted {
            let job = app
                .wait_status(
                    *id,
                    &["succeeded", "failed", "cancelled"],
                    Duration::from_secs(90),
                )
                .await;
            assert_eq!(job["status"], "succeeded", "{job}");
            assert_eq!(job["attempt"], 1, "{job}");
        }
        // The old primary was never killed: it is up, and the sentinel made it a replica.
        poll(
            "the old primary a replica",
            Duration::from_secs(30),
            || query::<Vec<redis::Value>>(nodes.primary_port, &mut redis::cmd("ROLE")),
            |role| matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"slave"),
        )
        .await;
        for entry in std::fs::read_dir(&log_dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            for secret in [
                PASSWORD,
                PASSWORD_IN_URL,
                SENTINEL_PASSWORD,
                SENTINEL_PASSWORD_IN_URL,
            ] {
                assert!(!text.contains(secret), "a password in {path:?}");
            }
        }
        eprintln!(
            "{} jobs accepted ({refused} refused during the failover), all succeeded once",
            accepted.len()
        );
    })
    .await
    .expect("the demotion test stops within its bound");
}
