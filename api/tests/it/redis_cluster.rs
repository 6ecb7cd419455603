//! Redis Cluster: three primaries of Debian's `redis-server` (`--cluster-enabled yes`) on
//! loopback ports of this test's own, joined by `redis-cli --cluster create`, reached through a
//! `redis+cluster://` URL by an API process, the in-process API and two worker processes.
//! Without hash tags the event scripts fail (`CROSSSLOT`, "non local key") and without the
//! cluster client every command whose key another node holds fails (`MOVED`).

use crate::harness::{free_port, KillOnDrop, SseReader, TestApp};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};
use uuid::Uuid;

/// The nodes' password, with characters the URL must encode.
const PASSWORD: &str = "cl@ster:pw";
const PASSWORD_IN_URL: &str = "cl%40ster%3Apw";

/// Three cluster primaries (no replicas), killed and their files removed on drop.
struct Cluster {
    _nodes: Vec<KillOnDrop>,
    ports: Vec<u16>,
    dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `cmd` on the node at `port`, without following redirections.
fn query<T: redis::FromRedisValue>(port: u16, cmd: &mut redis::Cmd) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://:{PASSWORD_IN_URL}@127.0.0.1:{port}"))?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(1))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    cmd.query(&mut conn)
}

async fn poll(what: &str, within: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Cluster {
    async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("conveyor-cluster-{}", Uuid::new_v4()));
        let mut nodes = Vec::new();
        let mut ports = Vec::new();
        for _ in 0..3 {
            // The cluster bus port of each node too: the default (port + 10000) may be taken.
            let (port, bus) = (free_port(), free_port());
            let node_dir = dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus.to_string(),
                ])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", "2000"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--maxmemory-policy", "noeviction"])
                .args(["--requirepass", PASSWORD, "--masterauth", PASSWORD])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server (scripts/services installs it)");
            nodes.push(KillOnDrop(child));
            ports.push(port);
        }
        let cluster = Self {
            _nodes: nodes,
            ports,
            dir,
        };
        for &port in &cluster.ports {
            poll("a node answering", Duration::from_secs(10), || {
                query::<String>(port, &mut redis::cmd("PING")).is_ok()
            })
            .await;
        }
        let addresses: Vec<String> = cluster
            .ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        // The password through the environment, not the command line.
        let mut create = tokio::process::Command::new("redis-cli")
            .env("REDISCLI_AUTH", PASSWORD)
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .arg("--cluster-yes")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-cli");
        let status = tokio::time::timeout(Duration::from_secs(30), create.wait())
            .await
            .expect("redis-cli --cluster create within 30 s")
            .unwrap();
        assert!(status.success(), "redis-cli --cluster create: {status}");
        for &port in &cluster.ports {
            poll(
                "the cluster up on every node",
                Duration::from_secs(30),
                || {
                    query::<String>(port, redis::cmd("CLUSTER").arg("INFO")).is_ok_and(|info| {
                        info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3")
                    })
                },
            )
            .await;
        }
        cluster
    }

    /// Two of the three nodes: the client learns the third from them.
    fn url(&self) -> String {
        format!(
            "redis+cluster://:{PASSWORD_IN_URL}@127.0.0.1:{},127.0.0.1:{}/",
            self.ports[0], self.ports[1]
        )
    }

    /// The keys under `prefix` on each node (a node answers only for its own slots).
    fn keys_by_node(&self, prefix: &str) -> BTreeMap<u16, Vec<String>> {
        self.ports
            .iter()
            .map(|&port| {
                let keys: Vec<String> =
                    query(port, redis::cmd("KEYS").arg(format!("{prefix}:*"))).unwrap();
                (port, keys)
            })
            .collect()
    }
}

fn terminal(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "cancelled")
}

/// An API process, the in-process API and two worker processes, all on a three-primary
/// cluster; two tenants submit canary jobs (one meant to fail) and imports. Every job reaches
/// its terminal state once (attempt 1; one terminal event in its tenant's stream, replayed from
/// the start, and none in the other tenant's), and each tenant's keys share one node.
#[tokio::test]
async fn jobs_of_several_kinds_drain_through_a_three_primary_cluster_each_once() {
    tokio::time::timeout(Duration::from_secs(240), async {
        let cluster = Cluster::start().await;
        let url = cluster.url();
        let app = TestApp::spawn_with(|s| s.redis_url = url.clone()).await;
        let log_dir = app.settings.data_dir.join("logs");
        std::fs::create_dir_all(&log_dir).unwrap();
        let log = |name: &str| std::fs::File::create(log_dir.join(name)).unwrap();
        let (_api, base) = app
            .spawn_api_process_logging(&[("RUST_LOG", "info")], log("api.log"))
            .await;
        let _workers = [
            app.spawn_worker_process_logging(
                "canary=4,import=2",
                &[("RUST_LOG", "info")],
                log("worker-a.log"),
            ),
            app.spawn_worker_process_logging(
                "canary=4",
                &[("RUST_LOG", "info")],
                log("worker-b.log"),
            ),
        ];
        let client = Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        let (beta, beta_key) = app.tenant_key("beta").await;
        let tenants = [(app.tenant, app.key.clone()), (beta, beta_key)];

        // kind and the status it must end in, by job; the tenant of each.
        let mut expected: HashMap<Uuid, (&str, &str, Uuid)> = HashMap::new();
        for (t, (tenant, key)) in tenants.iter().enumerate() {
            let submit = |body: Value| {
                let (client, base, key) = (client.clone(), base.clone(), key.clone());
                async move {
                    let response = client
                        .post(format!("{base}/v1/jobs"))
                        .bearer_auth(&key)
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    let status = response.status();
                    let job: Value = response.json().await.unwrap();
                    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
                    job["id"].as_str().unwrap().parse::<Uuid>().unwrap()
                }
            };
            for _ in 0..12 {
                let id =
                    submit(json!({"kind": "canary", "payload": {"steps": 3, "step_ms": 20}})).await;
                expected.insert(id, ("canary", "succeeded", *tenant));
            }
            let id = submit(json!({"kind": "canary", "payload": {"fail_first": 5},
                "max_attempts": 1}))
            .await;
            expected.insert(id, ("canary", "failed", *tenant));
            for n in 0..2 {
                let upload = client
                    .post(format!("{base}/v1/datasets"))
                    .query(&[("name", format!("rows{n}.csv"))])
                    .bearer_auth(key)
                    .body(format!("id,amount\n1,{t}\n2,{n}\n3,30\n"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(upload.status(), StatusCode::CREATED);
                let dataset: Value = upload.json().await.unwrap();
                let id = submit(json!({"kind": "import", "payload": {
                    "dataset_id": dataset["id"], "target": {"table": format!("rows_{n}")},
                    "mode": "create"}}))
                .await;
                expected.insert(id, ("import", "succeeded", *tenant));
            }
        }

        let keys: HashMap<Uuid, String> = tenants.iter().cloned().collect();
        let deadline = Instant::now() + Duration::from_secs(120);
        for (id, (kind, status, tenant)) in &expected {
            // Each tenant sees its own jobs only: asked with its key, through the API process.
            let job = loop {
                let job: Value = client
                    .get(format!("{base}/v1/jobs/{id}"))
                    .bearer_auth(&keys[tenant])
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if terminal(job["status"].as_str().unwrap_or_default()) {
                    break job;
                }
                assert!(Instant::now() < deadline, "{kind} job not ended: {job}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            assert_eq!(job["status"], *status, "{kind}: {job}");
            assert_eq!(job["attempt"], 1, "ran once: {job}");
            // The other tenant's key does not find it.
            let other = tenants.iter().find(|(t, _)| t != tenant).unwrap();
            let response = client
                .get(format!("{base}/v1/jobs/{id}"))
                .bearer_auth(&other.1)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::NOT_FOUND);
        }

        // Each tenant's stream, replayed from its start through the API process: one terminal
        // event per job of the tenant, none of the other's.
        for (tenant, key) in &tenants {
            let response = client
                .get(format!("{base}/v1/events?after=0"))
                .bearer_auth(key)
                .timeout(Duration::from_secs(60))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let mut stream = SseReader::from_response(response);
            let mut ends: HashMap<Uuid, Vec<String>> = HashMap::new();
            while let Some(event) = stream.next(Duration::from_secs(2)).await {
                let job: Uuid = event.data["job_id"].as_str().unwrap().parse().unwrap();
                let (_, _, owner) = expected.get(&job).expect("a job of this test");
                assert_eq!(
                    owner, tenant,
                    "another tenant's job in the stream: {event:?}"
                );
                if terminal(&event.event) {
                    ends.entry(job).or_default().push(event.event);
                }
            }
            for (id, (_, status, owner)) in &expected {
                if owner == tenant {
                    assert_eq!(ends.get(id), Some(&vec![status.to_string()]), "job {id}");
                }
            }
        }

        // Each tenant's keys (its streams, its jobs' streams) on one shard.
        let by_node = cluster.keys_by_node(&app.settings.redis_prefix);
        let node_of = |needle: &str| -> Vec<u16> {
            by_node
                .iter()
                .filter(|(_, keys)| keys.iter().any(|k| k.contains(needle)))
                .map(|(port, _)| *port)
                .collect()
        };
        let mut holders = Vec::new();
        for needle in tenants.iter().map(|(tenant, _)| format!("{{{tenant}}}")) {
            let nodes = node_of(&needle);
            assert_eq!(nodes.len(), 1, "{needle}'s keys on one node: {by_node:?}");
            holders.push(nodes[0]);
        }
        holders.sort_unstable();
        holders.dedup();
        let counts: Vec<usize> = by_node.values().map(Vec::len).collect();
        eprintln!(
            "{} jobs; keys per node {counts:?}; tenants on {} nodes",
            expected.len(),
            holders.len()
        );

        // The nodes' password is in no process' log.
        for entry in std::fs::read_dir(&log_dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                !text.contains(PASSWORD) && !text.contains(PASSWORD_IN_URL),
                "{path:?}"
            );
        }
    })
    .await
    .expect("the cluster test stops within its bound");
}
