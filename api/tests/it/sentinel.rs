//! Redis with failover: Debian's `redis-server` as a primary and a replica and
//! `redis-sentinel` watching them, on loopback ports of this test's own, reached through a
//! `redis+sentinel://` URL. The primary is killed (SIGKILL); the sentinel promotes the replica,
//! and connections find the new primary by themselves.

use crate::{
    faults::free_port,
    harness::{KillOnDrop, SseMessage, SseReader, TestApp},
};
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

/// A primary, its replica and a sentinel, killed and their files removed on drop.
struct Nodes {
    primary: KillOnDrop,
    _replica: KillOnDrop,
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

/// `cmd` on the node at `port`: a data node with the password, the sentinel without.
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
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
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
                 sentinel auth-pass {MASTER} {PASSWORD}\n",
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

        // The open stream goes on to the job's outcome.
        while !events.last().is_some_and(|e| terminal(&e.event)) {
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
            events.last().unwrap().event,
            job["status"].as_str().unwrap()
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
