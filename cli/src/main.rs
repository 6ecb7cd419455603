//! `conveyor`: the command-line client of a Conveyor API. Human output by default, `--json`
//! for scripts. Exit codes: 0 done (a waited-for job succeeded), 1 a waited-for job failed or
//! was cancelled, 2 an error (bad request, unreachable API, unknown job).

#[macro_use]
mod terminal;
mod patch;
mod report;
mod search;
mod sse;
mod table;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use std::{
    io::{IsTerminal, Write},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

#[derive(Parser)]
#[command(
    name = "conveyor",
    version,
    about = "Submit, watch and manage Conveyor jobs"
)]
struct Cli {
    /// The API's base URL.
    #[arg(
        long,
        env = "CONVEYOR_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// Send the key over plain `http://` to a host other than this machine (it is refused
    /// otherwise: anyone on the path would read the key).
    #[arg(long, env = "CONVEYOR_ALLOW_HTTP", global = true)]
    allow_http: bool,
    /// An API key (`conveyor-api keys create --tenant NAME`).
    #[arg(long, env = "CONVEYOR_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    /// Print JSON (one document, or one event per line for `watch`) instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Submit a job; with --wait, follow it to its end (exit 0 succeeded, 1 failed/cancelled).
    Submit {
        /// The job kind, e.g. `canary`.
        kind: String,
        /// The payload: inline JSON, a file holding it, or `-` for standard input.
        #[arg(long, default_value = "{}")]
        payload: String,
        /// Follow the job's progress until it ends.
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        max_attempts: Option<u32>,
        /// The same key returns the job it first created instead of a new one.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Show a job.
    Status { id: String },
    /// Follow a job's events until it ends (exit 0 succeeded, 1 failed/cancelled).
    Watch { id: String },
    /// Cancel a job (a running one stops at its next checkpoint).
    Cancel { id: String },
    /// Retry a failed or cancelled job.
    Retry { id: String },
    /// List jobs, newest first, up to `--limit` of them (a filtered page may come back short,
    /// or empty, while older jobs match: the pages are followed).
    Jobs {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        kind: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue after this job: the cursor a previous listing printed.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show the tenant and the key in use, with its role (admin, write or read).
    Whoami,
    /// Upload a dataset file (CSV, TSV, NDJSON, Parquet), streamed.
    Upload {
        file: PathBuf,
        /// The name to record (defaults to the file's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Cron schedules that enqueue a job at each firing.
    Schedules {
        #[command(subcommand)]
        action: ScheduleCommand,
    },
    /// Pipelines: steps, each a job, that start once the steps they need have succeeded.
    Pipelines {
        #[command(subcommand)]
        action: PipelineCommand,
    },
    /// A synthesis job's quality and privacy report as tables; writes its report.html (charts,
    /// opens offline).
    Report {
        job: String,
        /// Where to write the job's report.html.
        #[arg(long, default_value = "report.html")]
        out: PathBuf,
    },
    /// Search a collection (by id or name): its best chunks, ranked.
    Search(search::Search),
    /// Patch a table: preflight, dry run, execute (confirmed), roll back.
    Patch {
        #[command(subcommand)]
        action: patch::PatchCommand,
    },
}

#[derive(Subcommand)]
enum PipelineCommand {
    /// Submit a pipeline from a YAML (or JSON) file, the body of `POST /v1/pipelines`; with
    /// --wait, follow its steps to the end (exit 0 succeeded, 1 failed/cancelled).
    Submit {
        file: PathBuf,
        #[arg(long)]
        wait: bool,
    },
    /// Show a pipeline and its steps.
    Show { id: String },
    /// List the tenant's pipelines, newest first.
    List {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Cancel a pipeline's unfinished steps.
    Cancel { id: String },
    /// Retry a failed or cancelled step; the pipeline goes on from it.
    Retry { id: String, step: String },
}

#[derive(Subcommand)]
enum ScheduleCommand {
    /// List the tenant's schedules with their next firing.
    List,
    /// Create a schedule; prints it with its next firings.
    Create {
        #[arg(long)]
        name: String,
        /// 5 fields (`*/5 * * * *`), 6 with seconds first, or `@hourly`, `@daily`, ...
        #[arg(long)]
        cron: String,
        /// IANA time zone the expression is read in.
        #[arg(long, default_value = "UTC")]
        timezone: String,
        /// The job kind each firing enqueues, e.g. `canary`.
        #[arg(
            long,
            required_unless_present = "pipeline",
            conflicts_with = "pipeline"
        )]
        kind: Option<String>,
        /// Start this pipeline at each firing instead: a YAML (or JSON) file, the body of
        /// `POST /v1/pipelines`.
        #[arg(long)]
        pipeline: Option<PathBuf>,
        /// The job's payload: inline JSON, a file holding it, or `-` for standard input.
        #[arg(long, default_value = "{}")]
        payload: String,
        #[arg(long)]
        priority: Option<i16>,
        #[arg(long)]
        max_attempts: Option<u32>,
        /// While the previous job is live: skip, queue or allow.
        #[arg(long, default_value = "skip")]
        overlap: String,
        /// After downtime: run_once or skip.
        #[arg(long, default_value = "run_once")]
        misfire: String,
        /// Create it paused.
        #[arg(long)]
        paused: bool,
    },
    /// Show a schedule and its next firings.
    Show { id: String },
    /// Pause a schedule (no firings until resumed).
    Pause { id: String },
    /// Resume a schedule from its next firing after now.
    Resume { id: String },
    /// Delete a schedule (the jobs it made stay).
    Delete { id: String },
    /// A schedule's firings, newest first: the job or pipeline each made, or why it made
    /// nothing.
    History {
        id: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// The jobs a schedule made, newest first.
    Jobs {
        id: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

/// The API, reached with one key.
struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
    json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            err!("conveyor: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Refuses to send a key in the clear past this machine: `https://`, or `http://` to a
/// loopback address or `localhost`, unless `allow_http`.
fn check_transport(base: &str, allow_http: bool) -> anyhow::Result<()> {
    let url = reqwest::Url::parse(base).with_context(|| format!("--url {base:?}"))?;
    let loopback = url.host_str().is_some_and(|host| {
        host.eq_ignore_ascii_case("localhost")
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    });
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback || allow_http => Ok(()),
        "http" => anyhow::bail!(
            "--url {base:?} is plain http to another machine: the API key would cross the \
             network unencrypted; use https, or pass --allow-http if the path is trusted"
        ),
        other => anyhow::bail!("--url {base:?}: the scheme is http or https, not {other:?}"),
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let key = cli
        .api_key
        .context("no API key: set CONVEYOR_API_KEY or pass --api-key")?;
    let base = cli.url.trim_end_matches('/').to_owned();
    check_transport(&base, cli.allow_http)?;
    let client = Client {
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()?,
        base,
        key,
        json: cli.json,
    };
    match cli.command {
        Command::Submit {
            kind,
            payload,
            wait,
            max_attempts,
            idempotency_key,
        } => {
            let payload = read_payload(&payload)?;
            let mut body = json!({"kind": kind, "payload": payload});
            if let Some(n) = max_attempts {
                body["max_attempts"] = json!(n);
            }
            if let Some(k) = idempotency_key {
                body["idempotency_key"] = json!(k);
            }
            let job = client.send(client.post("/v1/jobs").json(&body)).await?;
            let id = job["id"].as_str().context("the API returned no job id")?;
            if !wait {
                client.print_job_summary(&job, "submitted");
                return Ok(ExitCode::SUCCESS);
            }
            if !client.json {
                err!("submitted {} job {id}", job["kind"].as_str().unwrap_or(""));
            }
            client.wait(id, false).await
        }
        Command::Status { id } => {
            let job = client.send(client.get(&format!("/v1/jobs/{id}"))).await?;
            if client.json {
                print_json(&job);
            } else {
                print_job_details(&job);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch { id } => client.wait(&id, true).await,
        Command::Cancel { id } => {
            let job = client
                .send(client.post(&format!("/v1/jobs/{id}/cancel")))
                .await?;
            let what = if job["status"] == "cancelled" {
                "cancelled"
            } else {
                "cancel requested"
            };
            client.print_job_summary(&job, what);
            Ok(ExitCode::SUCCESS)
        }
        Command::Retry { id } => {
            let job = client
                .send(client.post(&format!("/v1/jobs/{id}/retry")))
                .await?;
            client.print_job_summary(&job, "retried");
            Ok(ExitCode::SUCCESS)
        }
        Command::Jobs {
            status,
            kind,
            limit,
            mut cursor,
        } => {
            let mut jobs: Vec<Value> = Vec::new();
            loop {
                // 500 at most a request (the API's bound); 0 is refused by the API.
                let want = (limit as usize).saturating_sub(jobs.len()).min(500);
                let mut query = vec![("limit", want.to_string())];
                query.extend(status.clone().map(|s| ("status", s)));
                query.extend(kind.clone().map(|k| ("kind", k)));
                query.extend(cursor.clone().map(|c| ("cursor", c)));
                let mut page = client.send(client.get("/v1/jobs").query(&query)).await?;
                if let Some(items) = page["jobs"].as_array_mut() {
                    jobs.append(items);
                }
                cursor = page["next_cursor"].as_str().map(str::to_owned);
                if cursor.is_none() || jobs.len() >= limit as usize {
                    break;
                }
            }
            if client.json {
                print_json(&json!({ "jobs": jobs, "next_cursor": cursor }));
            } else {
                print_job_table(&jobs);
                if let Some(cursor) = &cursor {
                    out!("more: --cursor {cursor}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Whoami => {
            let session = client.send(client.get("/v1/session")).await?;
            if client.json {
                print_json(&session);
            } else {
                out!(
                    "tenant {} ({})\nkey    {}\nrole   {}",
                    session["tenant"].as_str().unwrap_or("?"),
                    session["tenant_id"].as_str().unwrap_or("?"),
                    session["key_id"].as_str().unwrap_or("?"),
                    session["role"].as_str().unwrap_or("?"),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Upload { file, name } => {
            let dataset = client.upload(&file, name).await?;
            if client.json {
                print_json(&dataset);
            } else {
                out!(
                    "uploaded {} as dataset {}",
                    file.display(),
                    dataset["id"].as_str().unwrap_or("?")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Schedules { action } => schedules(&client, action).await,
        Command::Pipelines { action } => pipelines(&client, action).await,
        Command::Report { job, out } => report::report(&client, &job, &out).await,
        Command::Search(args) => search::search(&client, args).await,
        Command::Patch { action } => patch::patch(&client, action).await,
    }
}

async fn pipelines(client: &Client, action: PipelineCommand) -> anyhow::Result<ExitCode> {
    let pipeline = match action {
        PipelineCommand::Submit { file, wait } => {
            let body = read_yaml(&file)?;
            let pipeline = client
                .send(client.post("/v1/pipelines").json(&body))
                .await?;
            if !wait {
                pipeline
            } else {
                let id = pipeline["id"].as_str().context("the API returned no id")?;
                if !client.json {
                    err!("submitted pipeline {id}");
                }
                return client.wait_pipeline(id).await;
            }
        }
        PipelineCommand::Show { id } => {
            client
                .send(client.get(&format!("/v1/pipelines/{id}")))
                .await?
        }
        PipelineCommand::List { limit } => {
            let list = client
                .send(client.get("/v1/pipelines").query(&[("limit", limit)]))
                .await?;
            if client.json {
                print_json(&list);
            } else {
                for p in list["pipelines"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or(&[])
                {
                    let steps = p["steps"].as_array().map_or(0, Vec::len);
                    out!(
                        "{}  {:<10} {:>3} steps  {}",
                        p["id"].as_str().unwrap_or(""),
                        p["status"].as_str().unwrap_or(""),
                        steps,
                        p["name"].as_str().unwrap_or("")
                    );
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        PipelineCommand::Cancel { id } => {
            client
                .send(client.post(&format!("/v1/pipelines/{id}/cancel")))
                .await?
        }
        PipelineCommand::Retry { id, step } => {
            client
                .send(client.post(&format!("/v1/pipelines/{id}/steps/{step}/retry")))
                .await?
        }
    };
    if client.json {
        print_json(&pipeline);
    } else {
        print_pipeline(&pipeline);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_pipeline(p: &Value) {
    let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
    out!("pipeline  {}  {}", text(&p["id"]), text(&p["name"]));
    out!("status    {}", text(&p["status"]));
    for step in p["steps"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let needs = listed("needs ", &strings(&step["needs"]), ", ");
        out!(
            "  {:<16} {:<10} {:<10} {}{needs}{}",
            text(&step["name"]),
            text(&step["kind"]),
            text(&step["state"]),
            text(&step["job_id"]),
            step["reason"]
                .as_str()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
    }
}

async fn schedules(client: &Client, action: ScheduleCommand) -> anyhow::Result<ExitCode> {
    let schedule = match action {
        ScheduleCommand::List => {
            // Every page: a tenant has at most 100 schedules, but a page ends early once
            // its bytes pass the server's bound.
            let mut schedules = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let mut request = client.get("/v1/schedules").query(&[("limit", "100")]);
                if let Some(cursor) = &cursor {
                    request = request.query(&[("cursor", cursor)]);
                }
                let mut page = client.send(request).await?;
                if let Some(items) = page["schedules"].as_array_mut() {
                    schedules.append(items);
                }
                cursor = page["next_cursor"].as_str().map(str::to_owned);
                if cursor.is_none() {
                    break;
                }
            }
            if client.json {
                print_json(&json!({ "schedules": schedules }));
            } else {
                print_schedule_table(&schedules);
            }
            return Ok(ExitCode::SUCCESS);
        }
        ScheduleCommand::Create {
            name,
            cron,
            timezone,
            kind,
            pipeline,
            payload,
            priority,
            max_attempts,
            overlap,
            misfire,
            paused,
        } => {
            let mut body = json!({
                "name": name, "cron": cron, "timezone": timezone,
                "overlap": overlap, "misfire": misfire, "paused": paused,
            });
            if let Some(file) = pipeline {
                body["pipeline"] = read_yaml(&file)?;
            } else {
                let mut job = json!({"kind": kind, "payload": read_payload(&payload)?});
                if let Some(p) = priority {
                    job["priority"] = json!(p);
                }
                if let Some(n) = max_attempts {
                    job["max_attempts"] = json!(n);
                }
                body["job"] = job;
            }
            client
                .send(client.post("/v1/schedules").json(&body))
                .await?
        }
        ScheduleCommand::Show { id } => {
            client
                .send(client.get(&format!("/v1/schedules/{id}")))
                .await?
        }
        ScheduleCommand::Pause { id } => {
            client
                .send(client.post(&format!("/v1/schedules/{id}/pause")))
                .await?
        }
        ScheduleCommand::Resume { id } => {
            client
                .send(client.post(&format!("/v1/schedules/{id}/resume")))
                .await?
        }
        ScheduleCommand::Delete { id } => {
            let request = client
                .http
                .delete(client.url(&format!("/v1/schedules/{id}")))
                .bearer_auth(&client.key);
            let response = request
                .send()
                .await
                .with_context(|| format!("cannot reach the API at {}", client.base))?;
            if !response.status().is_success() {
                anyhow::bail!("{}", problem_text(response).await);
            }
            if client.json {
                print_json(&json!({"id": id, "deleted": true}));
            } else {
                out!("deleted schedule {id}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        ScheduleCommand::History { id, limit } => {
            let page = client
                .send(
                    client
                        .get(&format!("/v1/schedules/{id}/history"))
                        .query(&[("limit", limit.to_string())]),
                )
                .await?;
            if client.json {
                print_json(&page);
            } else {
                print_firings(page["firings"].as_array().map(Vec::as_slice).unwrap_or(&[]));
            }
            return Ok(ExitCode::SUCCESS);
        }
        ScheduleCommand::Jobs { id, limit } => {
            let list = client
                .send(
                    client
                        .get(&format!("/v1/schedules/{id}/jobs"))
                        .query(&[("limit", limit.to_string())]),
                )
                .await?;
            if client.json {
                print_json(&list);
            } else {
                print_job_table(list["jobs"].as_array().map(Vec::as_slice).unwrap_or(&[]));
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    if client.json {
        print_json(&schedule);
    } else {
        print_schedule(&schedule);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_schedule(s: &Value) {
    let text = |key: &str| s[key].as_str().unwrap_or("-").to_owned();
    out!("schedule  {}", text("id"));
    out!("name      {}", text("name"));
    out!("cron      {} ({})", text("cron"), text("timezone"));
    if s["job"].is_object() {
        out!(
            "job       {} {}",
            s["job"]["kind"].as_str().unwrap_or("?"),
            s["job"]["payload"]
        );
    } else {
        out!("makes     {}", schedule_target(s));
    }
    out!(
        "overlap   {}   misfire {}",
        text("overlap"),
        text("misfire")
    );
    out!(
        "state     {}",
        if s["paused"] == true {
            "paused"
        } else {
            "active"
        }
    );
    out!("last      {}", text("last_fired_at"));
    out!("skipped   {}", s["skipped"]);
    for (i, at) in s["next_fires"].as_array().into_iter().flatten().enumerate() {
        let label = if i == 0 { "next" } else { "" };
        out!("{label:<9} {}", at.as_str().unwrap_or("?"));
    }
}

fn print_schedule_table(schedules: &[Value]) {
    if schedules.is_empty() {
        out!("no schedules");
        return;
    }
    out!(
        "{:<36}  {:<20}  {:<16}  {:<8}  {:<6}  NEXT",
        "ID",
        "NAME",
        "CRON",
        "KIND",
        "STATE"
    );
    for s in schedules {
        out!(
            "{:<36}  {:<20}  {:<16}  {:<8}  {:<6}  {}",
            s["id"].as_str().unwrap_or("?"),
            s["name"].as_str().unwrap_or("?"),
            s["cron"].as_str().unwrap_or("?"),
            schedule_target(s),
            if s["paused"] == true {
                "paused"
            } else {
                "active"
            },
            s["next_fires"][0].as_str().unwrap_or("-"),
        );
    }
}

fn print_firings(firings: &[Value]) {
    if firings.is_empty() {
        out!("no firings yet");
        return;
    }
    out!(
        "{:<30}  {:<8}  {:<36}  {:<9}  REASON",
        "FIRING",
        "MADE",
        "ID",
        "STATUS"
    );
    for f in firings {
        let made = f["job_id"].as_str().or(f["pipeline_id"].as_str());
        out!(
            "{:<30}  {:<8}  {:<36}  {:<9}  {}",
            f["fire_at"].as_str().unwrap_or("?"),
            f["made"].as_str().unwrap_or("?"),
            made.unwrap_or("-"),
            f["status"].as_str().unwrap_or("?"),
            f["reason"].as_str().unwrap_or(""),
        );
    }
}

/// A YAML (or JSON) file.
fn read_yaml(file: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    // YAML is a superset of JSON: one parser reads both.
    serde_norway::from_str(&text).with_context(|| format!("{} is not YAML", file.display()))
}

/// What a schedule makes: its job's kind, or the pipeline's steps.
fn schedule_target(s: &Value) -> String {
    match s["pipeline"]["steps"].as_array() {
        Some(steps) => format!("pipeline ({} steps)", steps.len()),
        None => s["job"]["kind"].as_str().unwrap_or("?").to_owned(),
    }
}

/// Inline JSON, `-` for standard input, or a file.
fn read_payload(arg: &str) -> anyhow::Result<Value> {
    let text = if arg == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the payload from stdin")?
    } else if let Ok(value) = serde_json::from_str::<Value>(arg) {
        return Ok(value);
    } else if Path::new(arg).is_file() {
        std::fs::read_to_string(arg).with_context(|| format!("reading {arg}"))?
    } else {
        anyhow::bail!("--payload is neither JSON nor a readable file: {arg}");
    };
    serde_json::from_str(&text).context("the payload is not valid JSON")
}

/// A problem document's detail and field errors, as one line.
async fn problem_text(response: reqwest::Response) -> String {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let mut text = format!(
        "{} {}",
        status.as_u16(),
        body["detail"]
            .as_str()
            .or(status.canonical_reason())
            .unwrap_or("")
    );
    if let Some(errors) = body["errors"].as_array() {
        for e in errors {
            let field = e["field"].as_str().unwrap_or("");
            let message = e["message"].as_str().unwrap_or("");
            if !text.contains(message) {
                text.push_str(&format!("\n  {field}: {message}"));
            }
        }
    }
    text
}

impl Client {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(self.url(path)).bearer_auth(&self.key)
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(self.url(path)).bearer_auth(&self.key)
    }

    /// The response of a request that succeeded; the API's problem as the error otherwise.
    async fn response(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the API at {}", self.base))?;
        if !response.status().is_success() {
            anyhow::bail!("{}", problem_text(response).await);
        }
        Ok(response)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        Ok(self.response(request).await?.json().await?)
    }

    /// A body as it is (an artifact).
    async fn bytes(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Vec<u8>> {
        Ok(self.response(request).await?.bytes().await?.to_vec())
    }

    /// Follows a job's stream to its end, `on_message` seeing each event; returns the final row.
    async fn follow(
        &self,
        id: &str,
        on_message: impl FnMut(&sse::Message),
    ) -> anyhow::Result<Value> {
        let url = self.url(&format!("/v1/jobs/{id}/events"));
        sse::follow(
            &self.http,
            &url,
            &self.key,
            sse::Message::ends_job_stream,
            on_message,
        )
        .await?;
        self.send(self.get(&format!("/v1/jobs/{id}"))).await
    }

    /// Follows the job's stream to its end, then prints the final row. With `events`, each
    /// event is printed too (`--json`: one JSON object per line).
    async fn wait(&self, id: &str, events: bool) -> anyhow::Result<ExitCode> {
        // Read the row first: an unknown id fails here with the API's 404.
        self.send(self.get(&format!("/v1/jobs/{id}"))).await?;
        let mut bar = Bar::new(!self.json || !events);
        let job = self
            .follow(id, |message| {
                let data = &message.data;
                if events && self.json {
                    let line = json!({"id": message.id, "event": message.event, "data": data});
                    out!("{line}");
                    let _ = std::io::stdout().flush();
                } else if events && message.event != "progress" {
                    bar.clear();
                    let detail = data["message"].as_str().unwrap_or("");
                    err!("{:<10} {detail}", message.event);
                }
                bar.show(
                    data["progress"].as_f64().unwrap_or(0.0),
                    data["status"].as_str().unwrap_or(""),
                    data["message"].as_str().unwrap_or(""),
                );
            })
            .await?;
        bar.finish();
        if self.json {
            if !events {
                print_json(&job);
            }
        } else {
            print_job_details(&job);
        }
        Ok(if job["status"] == "succeeded" {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    }

    /// Follows the pipeline's stream (every step's events) to its end, then prints the
    /// pipeline. `--json`: one JSON object per event, the last one the pipeline.
    async fn wait_pipeline(&self, id: &str) -> anyhow::Result<ExitCode> {
        let url = self.url(&format!("/v1/pipelines/{id}/events"));
        let last = sse::follow(
            &self.http,
            &url,
            &self.key,
            sse::Message::ends_pipeline_stream,
            |message| {
                let data = &message.data;
                if self.json {
                    let line = json!({"id": message.id, "event": message.event, "data": data});
                    out!("{line}");
                    let _ = std::io::stdout().flush();
                } else if message.event != "progress" && !message.ends_pipeline_stream() {
                    err!(
                        "{:<10} {} job {} {}",
                        message.event,
                        data["kind"].as_str().unwrap_or(""),
                        data["job_id"].as_str().unwrap_or(""),
                        data["message"].as_str().unwrap_or("")
                    );
                }
            },
        )
        .await?;
        if !self.json {
            print_pipeline(&last.data);
        }
        Ok(if last.data["status"] == "succeeded" {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    }

    /// Streams the file as the request body: it is never held in memory whole.
    async fn upload(&self, file: &Path, name: Option<String>) -> anyhow::Result<Value> {
        let name = name
            .or_else(|| file.file_name().map(|n| n.to_string_lossy().into_owned()))
            .context("the file has no name; pass --name")?;
        let handle = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("opening {}", file.display()))?;
        let size = handle.metadata().await?.len();
        let chunks = futures::stream::try_unfold(handle, |mut handle| async move {
            use tokio::io::AsyncReadExt;
            let mut chunk = vec![0u8; 256 * 1024];
            let n = handle.read(&mut chunk).await?;
            chunk.truncate(n);
            Ok::<_, std::io::Error>((n > 0).then_some((chunk, handle)))
        });
        let request = self
            .post("/v1/datasets")
            // Guessed from the extension; the API checks the content itself.
            .header(
                reqwest::header::CONTENT_TYPE,
                mime_guess::from_path(file).first_or_octet_stream().as_ref(),
            )
            .header(reqwest::header::CONTENT_LENGTH, size)
            .header("X-Filename", name)
            .body(reqwest::Body::wrap_stream(chunks));
        self.send(request).await
    }

    fn print_job_summary(&self, job: &Value, what: &str) {
        if self.json {
            print_json(job);
        } else {
            out!(
                "{what}: {} job {} ({})",
                job["kind"].as_str().unwrap_or(""),
                job["id"].as_str().unwrap_or(""),
                job["status"].as_str().unwrap_or("")
            );
        }
    }
}

/// The strings of a JSON array (none for anything else).
fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// `" (<label> a, b)"`, or nothing for no items.
fn listed(label: &str, items: &[&str], separator: &str) -> String {
    if items.is_empty() {
        String::new()
    } else {
        format!(" ({label}{})", items.join(separator))
    }
}

fn print_json(value: &Value) {
    out!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

fn print_job_details(job: &Value) {
    let text = |key: &str| job[key].as_str().unwrap_or("").to_owned();
    out!("job       {}", text("id"));
    out!("kind      {}", text("kind"));
    out!("status    {}", text("status"));
    out!(
        "progress  {:.0}%  {}",
        job["progress"].as_f64().unwrap_or(0.0) * 100.0,
        text("message")
    );
    out!(
        "attempt   {} of {}",
        job["attempt"].as_i64().unwrap_or(0),
        job["max_attempts"].as_i64().unwrap_or(0)
    );
    for key in ["created_at", "started_at", "finished_at"] {
        if job[key].is_string() {
            out!("{:<9} {}", key.trim_end_matches("_at"), text(key));
        }
    }
    if !job["result"].is_null() {
        out!("result    {}", job["result"]);
    }
    if job["error"].is_string() {
        out!("error     {}", text("error"));
    }
    for e in job["attempt_errors"].as_array().into_iter().flatten() {
        out!(
            "  attempt {}: {}",
            e["attempt"],
            e["error"].as_str().unwrap_or("")
        );
    }
}

fn print_job_table(jobs: &[Value]) {
    if jobs.is_empty() {
        out!("no jobs");
        return;
    }
    out!(
        "{:<36}  {:<10}  {:<9}  {:>5}  MESSAGE",
        "ID",
        "KIND",
        "STATUS",
        "DONE"
    );
    for job in jobs {
        out!(
            "{:<36}  {:<10}  {:<9}  {:>4.0}%  {}",
            job["id"].as_str().unwrap_or(""),
            job["kind"].as_str().unwrap_or(""),
            job["status"].as_str().unwrap_or(""),
            job["progress"].as_f64().unwrap_or(0.0) * 100.0,
            job["error"]
                .as_str()
                .or(job["message"].as_str())
                .unwrap_or("")
        );
    }
}

/// A progress bar on stderr: redrawn in place on a terminal; otherwise one line per 10 % step
/// or status change, so logs stay readable.
struct Bar {
    enabled: bool,
    terminal: bool,
    last: Option<(u32, String)>,
}

impl Bar {
    fn new(enabled: bool) -> Self {
        Self {
            enabled,
            terminal: std::io::stderr().is_terminal(),
            last: None,
        }
    }

    fn show(&mut self, progress: f64, status: &str, message: &str) {
        if !self.enabled || status.is_empty() {
            return;
        }
        let percent = (progress.clamp(0.0, 1.0) * 100.0).round() as u32;
        let (status, message) = (terminal::safe(status), terminal::safe(message));
        let mut err = std::io::stderr();
        if self.terminal {
            let filled = (percent / 4) as usize;
            let line: String = format!(
                "\r[{}{}] {percent:>3}% {status:<9} {message}",
                "#".repeat(filled),
                "-".repeat(25 - filled)
            );
            let _ = write!(err, "{line:<100.100}");
            let _ = err.flush();
        } else {
            let step = (percent / 10, status.to_string());
            if self.last.as_ref() != Some(&step) {
                let _ = writeln!(err, "{percent:>3}% {status} {message}");
            }
            self.last = Some(step);
        }
    }

    fn clear(&self) {
        if self.enabled && self.terminal {
            let _ = write!(std::io::stderr(), "\r{:100}\r", "");
        }
    }

    fn finish(&self) {
        if self.enabled && self.terminal {
            let _ = writeln!(std::io::stderr());
        }
    }
}
