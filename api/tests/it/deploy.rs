//! The deploy files against the binaries and the platform: every container's command, variables
//! and volumes in `docker-compose.yml` and `deploy/k8s/base` are what `conveyor-api` and
//! `conveyor-worker` accept; every queue has workers whose stop timeout covers their drain; and
//! the KEDA queries of `deploy/k8s/base/scaling.yaml`, run as they are written there against a
//! platform with a known backlog, count each worker group's jobs. (Their schemas are checked
//! by `scripts/check-deploy`.)

use crate::harness::{binary, TestApp};
use serde_json::{json, Value};
use shared::settings::{Settings, Vars};
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};
use uuid::Uuid;
use worker::QueueSpec;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every YAML document of a file, anchors and merge keys (`<<`) resolved, as JSON.
fn yaml_documents(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|document| {
            let mut value = <serde_norway::Value as serde::Deserialize>::deserialize(document)
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            // One pass per level: a merged mapping may merge another (x-worker, x-conveyor).
            for _ in 0..4 {
                value.apply_merge().unwrap();
            }
            serde_json::to_value(value).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

/// Every kind of job this build runs.
fn kinds() -> Vec<&'static str> {
    contracts::Registry::standard().kinds().collect()
}

/// One container as a deployment file runs it.
struct Container {
    what: String,
    argv: Vec<String>,
    env: BTreeMap<String, String>,
}

impl Container {
    /// Checks the command and the variables against the binaries; returns the worker's queues.
    fn check(&self) -> Option<QueueSpec> {
        let what = &self.what;
        let program = self.argv[0].as_str();
        assert!(
            ["conveyor-api", "conveyor-worker"].contains(&program),
            "{what}: runs {program}"
        );
        // The binary parses the command line as given (`--help` after it stops it there).
        let help = Command::new(binary(program))
            .args(&self.argv[1..])
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            help.status.success(),
            "{what}: {:?} is refused: {}",
            self.argv,
            String::from_utf8_lossy(&help.stderr)
        );
        // Every CONVEYOR_ variable is one the binary reads: a setting, a flag's variable, the
        // log format.
        let help = String::from_utf8_lossy(&help.stdout);
        let mut known = Settings::variables();
        known.insert(shared::telemetry::LOG_FORMAT.to_owned());
        known.extend(
            help.split("[env: ")
                .skip(1)
                .map(|s| s.split(['=', ']']).next().unwrap().to_owned()),
        );
        for name in self.env.keys().filter(|n| n.starts_with("CONVEYOR_")) {
            assert!(known.contains(name), "{what}: {name} is read by nothing");
        }
        if let Err(e) = Settings::from_vars(&Vars::new(self.env.clone())) {
            panic!("{what}: the settings do not parse: {e}");
        }
        if program != "conveyor-worker" {
            return None;
        }
        let flag = self.argv.iter().position(|a| a == "--queues");
        let spec = flag
            .map(|i| self.argv[i + 1].clone())
            .or_else(|| self.env.get("CONVEYOR_QUEUES").cloned())
            .unwrap_or_else(|| panic!("{what}: a worker names its queues"));
        let spec = QueueSpec::parse_among(&spec, &kinds())
            .unwrap_or_else(|e| panic!("{what}: --queues {spec}: {e}"));
        if spec.0.iter().any(|(kind, _)| kind == "ingest") {
            assert!(
                self.env.contains_key("CONVEYOR_MODEL_DIR"),
                "{what}: ingest needs the model"
            );
        }
        Some(spec)
    }

    fn grace(&self) -> Duration {
        let secs = self.env["CONVEYOR_SHUTDOWN_GRACE_SECS"].parse().unwrap();
        Duration::from_secs(secs)
    }
}

/// A Compose duration (`50s`, `1m30s`).
fn compose_duration(text: &str) -> Duration {
    let (mut total, mut number) = (0, String::new());
    for c in text.chars() {
        match c {
            '0'..='9' => number.push(c),
            'h' | 'm' | 's' => {
                let unit = match c {
                    'h' => 3600,
                    'm' => 60,
                    _ => 1,
                };
                total += number.parse::<u64>().unwrap() * unit;
                number.clear();
            }
            _ => panic!("duration {text:?}"),
        }
    }
    Duration::from_secs(total)
}

/// `${NAME}` and `${NAME:?message}` replaced as Compose would, from the example `.env`.
fn interpolate(text: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("a closing brace") + start;
        let name = rest[start + 2..end].split([':', '-', '?']).next().unwrap();
        let value = env
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not in deploy/compose.env.example"));
        out.push_str(value);
        rest = &rest[end + 1..];
    }
    out + rest
}

#[test]
fn compose_services_run_what_the_binaries_accept_and_cover_every_queue() {
    let example = std::fs::read_to_string(root().join("deploy/compose.env.example")).unwrap();
    let dotenv: BTreeMap<String, String> = example
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    // The example's key is one every process refuses: a copied example fails closed.
    assert_eq!(
        dotenv["CONVEYOR_SECRET_KEY"],
        shared::connections::EXAMPLE_SECRET_KEY
    );
    let compose = &yaml_documents("docker-compose.yml")[0];
    let services = compose["services"].as_object().unwrap();
    let mut served = BTreeSet::new();
    let mut checked = 0;
    for (name, service) in services {
        let image = service["image"].as_str().unwrap();
        if !image.starts_with("conveyor") {
            continue;
        }
        let env: BTreeMap<String, String> = service["environment"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), interpolate(v.as_str().unwrap(), &dotenv)))
            .collect();
        let mut argv = strings(&service["entrypoint"]);
        argv.extend(strings(&service["command"]));
        let container = Container {
            what: format!("docker-compose.yml: {name}"),
            argv,
            env,
        };
        let mounts: Vec<String> = strings(&service["volumes"])
            .iter()
            .map(|v| v.split(':').nth(1).unwrap().to_owned())
            .collect();
        if name != "migrate" {
            assert!(
                mounts.contains(&container.env["CONVEYOR_DATA_DIR"]),
                "{name}: the data directory is a volume shared with the others: {mounts:?}"
            );
        }
        if container.env.contains_key("CONVEYOR_MODEL_DIR") {
            assert_eq!(
                image, "conveyor-ml:latest",
                "{name}: the model is in that image"
            );
        }
        if let Some(spec) = container.check() {
            let stop = compose_duration(service["stop_grace_period"].as_str().unwrap());
            assert!(
                stop > container.grace() + worker::AFTER_GRACE,
                "{name}: stop_grace_period {stop:?} cuts the drain short"
            );
            served.extend(spec.0.into_iter().map(|(kind, _)| kind));
        }
        checked += 1;
    }
    assert_eq!(checked, 7, "migrate, api and five worker services");
    let argv = |name: &str| {
        let s = &services[name];
        [strings(&s["entrypoint"]), strings(&s["command"])].concat()
    };
    assert_eq!(argv("migrate"), ["conveyor-api", "migrate"]);
    assert_eq!(argv("api"), ["conveyor-api", "serve"]);
    let all: BTreeSet<String> = kinds().into_iter().map(str::to_owned).collect();
    assert_eq!(served, all, "every queue has a worker service");
    // Queue entries must survive a restart and never be evicted.
    let redis = strings(&services["redis"]["command"]).join(" ");
    assert!(redis.contains("--appendonly yes"), "{redis}");
    assert!(redis.contains("--maxmemory-policy noeviction"), "{redis}");
}

/// Every object of the Kubernetes base, by kind.
fn k8s_objects() -> Vec<Value> {
    let kustomization = &yaml_documents("deploy/k8s/base/kustomization.yaml")[0];
    strings(&kustomization["resources"])
        .iter()
        .flat_map(|file| yaml_documents(&format!("deploy/k8s/base/{file}")))
        .collect()
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The ScaledObjects' (name, target Deployment, KEDA query, target value).
fn keda_triggers(objects: &[Value]) -> Vec<(String, String, String, f64)> {
    objects
        .iter()
        .filter(|o| o["kind"] == "ScaledObject")
        .map(|o| {
            let triggers = o["spec"]["triggers"].as_array().unwrap();
            assert_eq!(triggers.len(), 1, "{o}");
            assert_eq!(triggers[0]["type"], "postgresql");
            let metadata = &triggers[0]["metadata"];
            (
                o["metadata"]["name"].as_str().unwrap().to_owned(),
                o["spec"]["scaleTargetRef"]["name"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                metadata["query"].as_str().unwrap().to_owned(),
                metadata["targetQueryValue"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap(),
            )
        })
        .collect()
}

#[test]
fn kubernetes_workloads_run_what_the_binaries_accept_and_scale_every_queue() {
    let objects = k8s_objects();
    // What envFrom brings: (ConfigMap or Secret, variable) -> value.
    let mut config = BTreeMap::new();
    for (kind, field) in [("ConfigMap", "data"), ("Secret", "stringData")] {
        for source in objects.iter().filter(|o| o["kind"] == kind) {
            let name = source["metadata"]["name"].as_str().unwrap();
            for (k, v) in source[field].as_object().unwrap() {
                let value = v.as_str().unwrap().to_owned();
                config.insert((name.to_owned(), k.clone()), value);
            }
        }
    }
    let scaled = keda_triggers(&objects);
    let mut served = BTreeSet::new();
    let mut workers = 0;
    for workload in objects
        .iter()
        .filter(|o| o["kind"] == "Deployment" || o["kind"] == "Job")
    {
        let name = workload["metadata"]["name"].as_str().unwrap();
        let pod = &workload["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        for container in pod["containers"].as_array().unwrap() {
            let mut env = BTreeMap::new();
            for from in container["envFrom"].as_array().unwrap() {
                let (source, _) = from.as_object().unwrap().iter().next().unwrap();
                let source_name = from[source]["name"].as_str().unwrap();
                env.extend(
                    config
                        .iter()
                        .filter(|((s, _), _)| s == source_name)
                        .map(|((_, k), v)| (k.clone(), v.clone())),
                );
            }
            for var in container["env"].as_array().into_iter().flatten() {
                env.insert(
                    var["name"].as_str().unwrap().to_owned(),
                    var["value"].as_str().unwrap().to_owned(),
                );
            }
            let resources = &container["resources"]["requests"];
            assert!(resources["cpu"].is_string() && resources["memory"].is_string());
            let c = Container {
                what: format!("deploy/k8s: {name}"),
                argv: strings(&container["command"]),
                env,
            };
            if c.env.contains_key("CONVEYOR_MODEL_DIR") {
                assert_eq!(container["image"], "conveyor-ml", "{name}");
            }
            let Some(spec) = c.check() else { continue };
            workers += 1;
            let stop = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap());
            assert!(
                stop > c.grace() + worker::AFTER_GRACE,
                "{name}: terminationGracePeriodSeconds {stop:?} cuts the drain short"
            );
            // Its ScaledObject: one pod's worth of jobs per replica.
            let (_, _, query, target) = scaled
                .iter()
                .find(|(_, target, _, _)| target == name)
                .unwrap_or_else(|| panic!("{name} has no ScaledObject"));
            let per_pod: usize = spec.0.iter().map(|(_, n)| n).sum();
            assert_eq!(*target, per_pod as f64, "{name}: {query}");
            served.extend(spec.0.into_iter().map(|(kind, _)| kind));
        }
    }
    assert_eq!(workers, 5, "one worker Deployment per queue group");
    assert_eq!(scaled.len(), 5);
    let all: BTreeSet<String> = kinds().into_iter().map(str::to_owned).collect();
    assert_eq!(served, all, "every queue has a worker Deployment");
    let api = named(&objects, "Deployment", "conveyor-api");
    let probe = &api["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(probe["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(probe["livenessProbe"]["httpGet"]["path"], "/healthz");
    named(&objects, "PodDisruptionBudget", "conveyor-api");
    named(&objects, "Service", "conveyor-api");
    named(&objects, "Job", "conveyor-migrate");
}

/// The KEDA queries as written in `deploy/k8s/base/scaling.yaml`, run against a platform with a
/// known backlog: canary jobs submitted with no worker (most of them held in PostgreSQL by fair
/// dispatch, a window of them in Redis), then two running; and queued jobs of every other kind.
/// Each group's query counts its own kinds' waiting and running jobs, nothing else; `/metrics`
/// and `GET /v1/queues` show the same backlog.
#[tokio::test]
async fn keda_queries_count_each_worker_groups_backlog_where_it_lives() {
    let mut app = TestApp::spawn().await;
    let triggers = keda_triggers(&k8s_objects());
    let pool = app.pool().clone();
    let count = |query: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&query)
                .fetch_one(&pool)
                .await
                .unwrap_or_else(|e| panic!("{query}: {e}"))
        }
    };
    for (name, _, query, _) in &triggers {
        assert_eq!(count(query.clone()).await, 0, "{name} on an empty platform");
    }

    for _ in 0..20 {
        app.submit_canary(json!({"steps": 100, "step_ms": 200}))
            .await;
    }
    let canary = app.queue("canary").await;
    assert_eq!(canary["waiting"], 20, "{canary}");
    assert!(canary["oldest_waiting_seconds"].as_f64().unwrap() > 0.0);

    // Queued jobs of each other kind, a different number each: a query counting a kind that is
    // not its group's, or missing one, gets another sum.
    let others = [
        ("import", 3),
        ("patch", 4),
        ("patch_rollback", 5),
        ("ingest", 6),
        ("synthesis", 7),
        ("sample", 8),
    ];
    for (kind, n) in others {
        for _ in 0..n {
            sqlx::query(
                "INSERT INTO jobs (id, tenant_id, kind, status, payload) VALUES ($1, $2, $3, 'queued', '{}')",
            )
            .bind(Uuid::now_v7())
            .bind(app.tenant)
            .bind(kind)
            .execute(app.pool())
            .await
            .unwrap();
        }
    }
    // Neither a finished nor a scheduled job is demand for a worker now.
    for status in ["succeeded", "scheduled"] {
        sqlx::query(
            "INSERT INTO jobs (id, tenant_id, kind, status, payload, run_at) VALUES ($1, $2, 'import', $3, '{}', now() + interval '1 hour')",
        )
        .bind(Uuid::now_v7())
        .bind(app.tenant)
        .bind(status)
        .execute(app.pool())
        .await
        .unwrap();
    }
    let expected = |name: &str| -> i64 {
        let group: &[&str] = match name {
            "conveyor-worker-canary" => return 20,
            "conveyor-worker-import" => &["import"],
            "conveyor-worker-patch" => &["patch", "patch_rollback"],
            "conveyor-worker-ingest" => &["ingest"],
            "conveyor-worker-synthesis" => &["synthesis", "sample"],
            other => panic!("unknown ScaledObject {other}"),
        };
        others
            .iter()
            .filter(|(kind, _)| group.contains(kind))
            .map(|(_, n)| n)
            .sum()
    };
    for (name, _, query, _) in &triggers {
        assert_eq!(
            count(query.clone()).await,
            expected(name),
            "{name}: {query}"
        );
    }

    // Two of the canary jobs run: still the group's demand (its pods stay), no longer waiting.
    app.start_worker(2).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE kind = 'canary' AND status = 'running'",
        )
        .fetch_one(app.pool())
        .await
        .unwrap();
        if running == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{running} running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (name, _, query, target) = triggers
        .iter()
        .find(|(name, ..)| name == "conveyor-worker-canary")
        .unwrap();
    assert_eq!(count(query.clone()).await, 20, "{name}");
    // KEDA's replicas: ceil(20 / 8 jobs a pod) = 3.
    assert_eq!((20.0 / target).ceil(), 3.0);
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("\nconveyor_queue_waiting{queue=\"canary\"} 18\n"),
        "{metrics}"
    );
    assert!(metrics.contains("\nconveyor_queue_waiting{queue=\"import\"} 3\n"));
    let oldest = metrics
        .lines()
        .find_map(|l| l.strip_prefix("conveyor_queue_oldest_waiting_seconds{queue=\"canary\"} "))
        .expect("the canary queue's oldest waiting job");
    assert!(oldest.parse::<f64>().unwrap() > 0.0, "{oldest}");
}

/// What the Dockerfile says of a stage and those it is built `FROM`: its user, environment,
/// command and health check.
#[derive(Clone, Default, Debug)]
struct Image {
    user: Option<String>,
    env: BTreeMap<String, String>,
    cmd: Vec<String>,
    healthcheck: Vec<String>,
}

fn dockerfile_image(target: &str) -> Image {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    // Instructions, continuation lines joined, comments dropped.
    let joined = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    let mut stages: BTreeMap<String, Image> = BTreeMap::new();
    let mut current = String::new();
    for line in joined.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (instruction, rest) = line.split_once(' ').unwrap_or((line, ""));
        if instruction == "FROM" {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let base = stages.get(words[0]).cloned().unwrap_or_default();
            current = words.last().unwrap().to_string();
            stages.insert(current.clone(), base);
            continue;
        }
        let image = stages.entry(current.clone()).or_default();
        match instruction {
            "USER" => image.user = Some(rest.to_owned()),
            "ENV" => {
                for pair in rest.split_whitespace() {
                    let (k, v) = pair.split_once('=').unwrap();
                    image.env.insert(k.to_owned(), v.to_owned());
                }
            }
            "CMD" => image.cmd = serde_json::from_str(rest).unwrap(),
            "HEALTHCHECK" => {
                let json = &rest[rest.find("CMD [").unwrap() + 4..];
                image.healthcheck = serde_json::from_str(json).unwrap();
            }
            _ => {}
        }
    }
    stages
        .remove(target)
        .unwrap_or_else(|| panic!("no stage {target}"))
}

fn as_root() -> bool {
    let uid = Command::new("id").arg("-u").output().unwrap().stdout;
    String::from_utf8_lossy(&uid).trim() == "0"
}

/// `argv` as the image's user: `setpriv` to its uid and gid when the tests run as root (as CI
/// does), else as the (already unprivileged) user running them.
fn as_image_user(image: &Image, argv: &[String]) -> Command {
    let user = image.user.as_deref().expect("the image names a user");
    let (uid, gid) = user.split_once(':').unwrap();
    assert_ne!(uid, "0", "the image runs as root");
    let mut command = if as_root() {
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "--",
        ]);
        c.arg(binary(&argv[0]));
        c
    } else {
        Command::new(binary(&argv[0]))
    };
    command.args(&argv[1..]).env_clear();
    command
}

fn uid_of(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().to_owned()
}

/// The binaries run the way the images run them (the image itself cannot be built here: no
/// Docker daemon): the API with the `conveyor-ml` stage's user, environment and command, until
/// the image's HEALTHCHECK command passes; a worker with the `conveyor` stage's, running a job.
/// Only the listening port and what the test deployment provides (its databases, Redis prefix)
/// differ.
#[tokio::test]
async fn the_binaries_run_as_the_images_run_them() {
    let app = TestApp::spawn().await;
    let api_image = dockerfile_image("conveyor-ml");
    let worker_image = dockerfile_image("conveyor");
    assert_eq!(api_image.cmd, ["conveyor-api", "serve"]);
    assert_eq!(
        api_image.env["CONVEYOR_MODEL_DIR"], "/opt/conveyor/model",
        "the API image carries the model"
    );

    // The image's data directory, for its user alone.
    let data = std::env::temp_dir().join(format!("conveyor-image-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&data).unwrap();
    let uid = api_image
        .user
        .as_deref()
        .unwrap()
        .split(':')
        .next()
        .unwrap();
    if as_root() {
        assert!(Command::new("chown")
            .arg(uid)
            .arg(&data)
            .status()
            .unwrap()
            .success());
    }
    let port = crate::harness::free_port();
    let listen = api_image.env["CONVEYOR_LISTEN"].replace(":8080", &format!(":{port}"));
    // The image's settings, then the test deployment's, in the image's data directory.
    let deployment = |image: &Image, command: &mut Command| {
        command
            .envs(&image.env)
            .env("PATH", "/usr/bin:/bin")
            .envs(app.deployment_env())
            .env("CONVEYOR_DATA_DIR", data.join("objects"))
            .env("CONVEYOR_LISTEN", &listen)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null());
    };
    let mut api = as_image_user(&api_image, &api_image.cmd);
    deployment(&api_image, &mut api);
    let api = crate::harness::KillOnDrop(api.spawn().unwrap());

    // Its health check, as Docker runs it, passes within the start period (30 s).
    let check: Vec<String> = api_image
        .healthcheck
        .iter()
        .map(|a| a.replace(":8080", &format!(":{port}")))
        .collect();
    assert_eq!(check[0], "curl");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !Command::new(&check[0])
        .args(&check[1..])
        .status()
        .unwrap()
        .success()
    {
        assert!(
            Instant::now() < deadline,
            "the image's health check never passed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(uid_of(api.id()), uid, "the API runs as the image's user");

    // A canary worker as its image runs it, through the API of the image.
    let queues = ["conveyor-worker", "--queues", "canary=1"].map(String::from);
    let mut worker = as_image_user(&worker_image, &queues);
    deployment(&worker_image, &mut worker);
    let worker = crate::harness::KillOnDrop(worker.spawn().unwrap());
    let url = format!("http://127.0.0.1:{port}/v1/jobs");
    let body = json!({"kind": "canary", "payload": {"steps": 2}});
    let (_, job) = crate::cluster::post(&app.client, &url, &app.key, &body).await;
    let id: Uuid = job["id"].as_str().expect("submitted").parse().unwrap();
    let job = app
        .wait_status(id, &["succeeded", "failed"], Duration::from_secs(30))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        uid_of(worker.id()),
        uid,
        "the worker runs as the image's user"
    );
    drop((api, worker));
    let _ = std::fs::remove_dir_all(&data);
}
