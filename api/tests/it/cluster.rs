//! Several processes as a deployment runs them: HAProxy (`deploy/haproxy.cfg`, the file
//! `scripts/cluster` runs) in front of two `conveyor-api` processes, and three `conveyor-worker`
//! processes serving different queue groups, all on loopback. One API process is killed
//! mid-stream; the maintenance leader is killed.

use crate::harness::{free_port, pid_of, KillOnDrop, SseMessage, SseReader, TestApp};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};
use uuid::Uuid;

/// Each worker process serves canary jobs (two at a time) besides a group of its own.
const WORKER_GROUPS: [&str; 3] = [
    "canary=2",
    "canary=2,import=1",
    "canary=2,patch=1,patch_rollback=1",
];

/// HAProxy with the deployment's configuration, in front of `apis` (base URLs); killed on drop.
struct Balancer {
    _process: KillOnDrop,
    base: String,
}

impl Balancer {
    async fn start(client: &Client, apis: &[&str]) -> Self {
        let port = free_port();
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/haproxy.cfg");
        let address = |base: &str| base.trim_start_matches("http://").to_owned();
        let process = Command::new("haproxy")
            .arg("-db") // in the foreground
            .arg("-f")
            .arg(&config)
            .env("CONVEYOR_LB_LISTEN", format!("127.0.0.1:{port}"))
            .env("CONVEYOR_API_1", address(apis[0]))
            .env("CONVEYOR_API_2", address(apis[1]))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy (scripts/services installs it)");
        let balancer = Self {
            _process: KillOnDrop(process),
            base: format!("http://127.0.0.1:{port}"),
        };
        // Both processes answer through it before the test begins.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut served = BTreeSet::new();
        while served.len() < 2 {
            assert!(Instant::now() < deadline, "HAProxy served only {served:?}");
            if let Ok(r) = client.get(balancer.url("/readyz")).send().await {
                if r.status().is_success() {
                    served.insert(backend(&r));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        balancer
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// The API process that answered through HAProxy (`api1` or `api2`).
fn backend(response: &reqwest::Response) -> String {
    response.headers()["x-conveyor-backend"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// A client following one event stream through the balancer: on a broken connection it
/// reconnects with `Last-Event-ID`, as a browser's EventSource does.
struct Follower {
    client: Client,
    url: String,
    key: String,
    events: Vec<SseMessage>,
    /// The API process behind each connection, in order.
    backends: Vec<String>,
    reader: Option<SseReader>,
}

impl Follower {
    /// Connected: the response's headers have come, so the stream covers what happens next.
    async fn connect(client: &Client, url: String, key: &str) -> Self {
        let mut follower = Self {
            client: client.clone(),
            url,
            key: key.to_owned(),
            events: Vec::new(),
            backends: Vec::new(),
            reader: None,
        };
        follower
            .reconnect(Instant::now() + Duration::from_secs(30))
            .await;
        follower
    }

    async fn reconnect(&mut self, deadline: Instant) {
        loop {
            assert!(Instant::now() < deadline, "{}: no reconnection", self.url);
            let mut request = self.client.get(&self.url).bearer_auth(&self.key);
            if let Some(id) = self.events.last().and_then(|e| e.id.clone()) {
                request = request.header("Last-Event-ID", id);
            }
            match request.send().await {
                Ok(r) if r.status() == StatusCode::OK => {
                    self.backends.push(backend(&r));
                    self.reader = Some(SseReader::from_response(r));
                    return;
                }
                // The balancer has not yet seen the process die, or it was starting.
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Reads until `enough` holds of what it has, reconnecting whenever the stream breaks.
    async fn until(mut self, enough: impl Fn(&[SseMessage]) -> bool, within: Duration) -> Self {
        let deadline = Instant::now() + within;
        while !enough(&self.events) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{}: only {:?}", self.url, self.events);
            let reader = self.reader.as_mut().expect("connected");
            match reader.next(left.min(Duration::from_secs(10))).await {
                Some(event) => self.events.push(event),
                None => self.reconnect(deadline).await,
            }
        }
        self
    }

    fn ids(&self) -> Vec<String> {
        self.events.iter().map(|e| e.id.clone().unwrap()).collect()
    }
}

fn terminal(event: &SseMessage) -> bool {
    matches!(event.event.as_str(), "succeeded" | "failed" | "cancelled")
}

/// A POST through the balancer, tried again while it answers 502/503 (a process just died).
pub(crate) async fn post(
    client: &Client,
    url: &str,
    key: &str,
    body: &Value,
) -> (StatusCode, Value) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let response = client
            .post(url)
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        if status != StatusCode::BAD_GATEWAY && status != StatusCode::SERVICE_UNAVAILABLE
            || Instant::now() > deadline
        {
            return (status, response.json().await.unwrap_or(Value::Null));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clients submit through the balancer and follow their tenant's stream and each job's stream;
/// one API process is killed (SIGKILL) mid-stream. Every client reconnects through the
/// balancer with `Last-Event-ID` and ends up with every event exactly once, in order; cancels
/// sent through the surviving process stop jobs running on each of the three workers.
#[tokio::test]
async fn streams_survive_an_api_process_killed_behind_the_balancer_and_cancels_reach_every_worker()
{
    tokio::time::timeout(Duration::from_secs(150), async {
        let app = TestApp::spawn().await;
        let mut apis = [app.spawn_api_process().await, app.spawn_api_process().await];
        let _workers: Vec<KillOnDrop> = WORKER_GROUPS
            .iter()
            .map(|group| app.spawn_worker_process(group))
            .collect();
        let client = Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let lb = Balancer::start(&client, &[apis[0].1.as_str(), apis[1].1.as_str()]).await;
        let key = app.key.clone();

        // The tenant stream first, so that it sees every job from its submission on.
        let tenant = Follower::connect(&client, lb.url("/v1/events"), &key).await;
        let mut jobs = Vec::new();
        for _ in 0..6 {
            let body = json!({"kind": "canary", "payload": {"steps": 80, "step_ms": 100}});
            let (status, job) = post(&client, &lb.url("/v1/jobs"), &key, &body).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{job}");
            jobs.push(job["id"].as_str().unwrap().parse::<Uuid>().unwrap());
        }
        let mut followers = Vec::new();
        for id in &jobs {
            let url = lb.url(&format!("/v1/jobs/{id}/events"));
            followers.push(Follower::connect(&client, url, &key).await);
        }
        let backends: BTreeSet<_> = followers.iter().map(|f| f.backends[0].clone()).collect();
        assert_eq!(
            backends.len(),
            2,
            "the streams are spread over both processes"
        );

        // Every job runs (two on each worker) and its stream has shown progress.
        let mut running_on: HashMap<Uuid, String> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(40);
        while running_on.len() < jobs.len() {
            assert!(Instant::now() < deadline, "running: {running_on:?}");
            for id in &jobs {
                let job = app.job(*id).await;
                if job["status"] == "running" && job["progress"].as_f64().unwrap_or(0.0) > 0.0 {
                    running_on.insert(*id, job["worker"].as_str().unwrap().to_owned());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let workers: BTreeSet<_> = running_on.values().cloned().collect();
        assert_eq!(workers.len(), 3, "{running_on:?}");
        let mut streaming = Vec::new();
        for follower in followers {
            let progressed = |events: &[SseMessage]| events.iter().any(|e| e.event == "progress");
            streaming.push(follower.until(progressed, Duration::from_secs(30)).await);
        }

        // Kill the process serving the tenant stream, mid-stream.
        let victim = tenant.backends[0].clone();
        let index = if victim == "api1" { 0 } else { 1 };
        apis[index].0.kill().unwrap(); // SIGKILL
        apis[index].0.wait().unwrap();

        // One job of each worker cancelled, through the balancer (so the surviving process).
        let mut cancelled = BTreeSet::new();
        for worker in &workers {
            let id = jobs.iter().find(|id| &running_on[*id] == worker).unwrap();
            let url = lb.url(&format!("/v1/jobs/{id}/cancel"));
            let (status, body) = post(&client, &url, &key, &json!({})).await;
            assert_eq!(status, StatusCode::OK, "cancel of {id}: {body}");
            cancelled.insert(*id);
        }

        // Every stream to its end: the job streams to their terminal event, the tenant stream
        // to every job's.
        let ended = |events: &[SseMessage]| events.last().is_some_and(terminal);
        let mut done = Vec::new();
        for follower in streaming {
            done.push(follower.until(ended, Duration::from_secs(40)).await);
        }
        let all_ended =
            |events: &[SseMessage]| events.iter().filter(|e| terminal(e)).count() == jobs.len();
        let tenant = tenant.until(all_ended, Duration::from_secs(40)).await;

        for (id, follower) in jobs.iter().zip(&done) {
            let job = app.job(*id).await;
            let expected = if cancelled.contains(id) {
                "cancelled"
            } else {
                "succeeded"
            };
            assert_eq!(job["status"], expected, "{job}");
            assert_eq!(job["attempt"], 1, "{job}");
            assert_eq!(follower.events.last().unwrap().event, expected);
            // Exactly once, in order: what the client assembled over its connections is the
            // whole stream as read afresh, once, from the start.
            let whole = Follower::connect(&client, follower.url.clone(), &key)
                .await
                .until(ended, Duration::from_secs(20))
                .await;
            assert_eq!(follower.ids(), whole.ids(), "job {id}");
            assert_eq!(whole.backends, [other(&victim)]);
            if follower.backends[0] == victim {
                assert!(follower.backends.len() > 1, "{:?}", follower.backends);
            }
            assert!(follower.backends[1..].iter().all(|b| *b != victim));
        }
        // The tenant stream: reconnected, and every event once, against its replay from the start.
        assert!(tenant.backends.len() > 1, "{:?}", tenant.backends);
        let last = tenant.ids().last().unwrap().clone();
        let replay = Follower::connect(&client, lb.url("/v1/events?after=0"), &key)
            .await
            .until(
                |events| events.last().and_then(|e| e.id.as_ref()) == Some(&last),
                Duration::from_secs(20),
            )
            .await;
        assert_eq!(tenant.ids(), replay.ids());
        let per_job: BTreeSet<_> = tenant
            .events
            .iter()
            .filter(|e| terminal(e))
            .map(|e| e.data["job_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(per_job.len(), jobs.len());
    })
    .await
    .expect("the balancer test stops within its bound");
}

fn other(backend: &str) -> &'static str {
    if backend == "api1" {
        "api2"
    } else {
        "api1"
    }
}

/// The live workers as `GET /v1/workers` lists them: (name, leads maintenance), each under
/// its own name (the route shows tenants a digest of it).
async fn workers(app: &TestApp) -> Vec<(String, bool)> {
    let (status, body) = app.get("/v1/workers").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM workers")
        .fetch_all(app.pool())
        .await
        .unwrap();
    let own_name = |shown: &str| {
        names
            .iter()
            .find(|name| shared::leader::public_name(name) == shown)
            .expect("a listed worker has a row")
            .clone()
    };
    body["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                own_name(w["name"].as_str().unwrap()),
                w["leads_maintenance"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// Waits until `count` workers are live with exactly one leading; returns the leader's name.
async fn one_leader(app: &TestApp, count: usize, besides: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let live = workers(app).await;
        let leaders: Vec<_> = live.iter().filter(|(_, leads)| *leads).collect();
        assert!(leaders.len() <= 1, "two leaders at once: {live:?}");
        if let [(leader, _)] = leaders[..] {
            if leader != besides && live.len() >= count {
                return leader.clone();
            }
        }
        assert!(Instant::now() < deadline, "no single leader: {live:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three worker processes: exactly one leads maintenance, however long they run together; when
/// it is killed (SIGKILL), another takes over within the lease on a worker's jobs
/// (`CONVEYOR_RESCUE_AFTER_SECS`, 3 s here) and runs the duties: a job scheduled two seconds
/// ahead is promoted and runs.
#[tokio::test]
async fn one_worker_leads_maintenance_and_another_takes_over_when_it_is_killed() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let app = TestApp::spawn().await;
        let mut processes: Vec<KillOnDrop> = WORKER_GROUPS
            .iter()
            .map(|group| app.spawn_worker_process(group))
            .collect();
        let leader = one_leader(&app, 3, "", Duration::from_secs(30)).await;
        // Still one, the same, over many duty intervals (250 ms) with three candidates.
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let live = workers(&app).await;
            let leaders: Vec<_> = live.iter().filter(|(_, leads)| *leads).collect();
            assert_eq!(leaders.len(), 1, "{live:?}");
            assert_eq!(leaders[0].0, leader);
        }
        let metrics = app.metrics().await;
        assert!(
            metrics.contains("\nconveyor_maintenance_leader 1\n"),
            "{metrics}"
        );

        let victim = processes
            .iter_mut()
            .find(|p| p.id() == pid_of(&leader))
            .expect("the leader is one of ours");
        victim.kill().unwrap();
        victim.wait().unwrap();
        let killed = Instant::now();
        let lease = Duration::from_secs(3); // CONVEYOR_RESCUE_AFTER_SECS of the harness' workers
        let successor = one_leader(&app, 2, &leader, lease).await;
        let took = killed.elapsed();
        assert!(took < lease, "took over after {took:?}");
        assert_ne!(successor, leader);

        // The successor runs the duties: the scheduler promotes a job due in a second.
        let run_at = (chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339();
        let (status, job) = app
            .post(
                "/v1/jobs",
                &json!({"kind": "canary", "payload": {"steps": 1}, "run_at": run_at}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        assert_eq!(job["status"], "scheduled", "{job}");
        let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
        let job = app
            .wait_status(id, &["succeeded", "failed"], Duration::from_secs(20))
            .await;
        assert_eq!(job["status"], "succeeded", "{job}");
        let leader_shown = shared::leader::public_name(&leader);
        assert_ne!(job["worker"].as_str(), Some(leader_shown.as_str()));
    })
    .await
    .expect("the leader test stops within its bound");
}
