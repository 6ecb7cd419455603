//! The event model and its Redis Streams: one stream per job, one per tenant.

use crate::redis_conn::RedisConn;
use chrono::{DateTime, Utc};
use redis::streams::StreamRangeReply;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::model::JobStatus;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    Queued,
    Started,
    Progress,
    Log,
    Retrying,
    Succeeded,
    Failed,
    Cancelled,
    /// Sent alone, from the job row, when the job's stream has expired.
    Snapshot,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Started => "started",
            Self::Progress => "progress",
            Self::Log => "log",
            Self::Retrying => "retrying",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Snapshot => "snapshot",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// The event that announces a job entering `status`.
    pub fn entering(status: JobStatus) -> Self {
        match status {
            JobStatus::Scheduled | JobStatus::Queued => Self::Queued,
            JobStatus::Running => Self::Started,
            JobStatus::Retrying => Self::Retrying,
            JobStatus::Succeeded => Self::Succeeded,
            JobStatus::Failed => Self::Failed,
            JobStatus::Cancelled => Self::Cancelled,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub job_id: Uuid,
    pub kind: String,
    #[serde(rename = "type")]
    pub event_type: EventType,
    pub status: JobStatus,
    pub progress: f32,
    pub message: Option<String>,
    pub data: Option<Value>,
    pub at: DateTime<Utc>,
}

impl Event {
    pub fn new(
        job_id: Uuid,
        kind: &str,
        event_type: EventType,
        status: JobStatus,
        progress: f32,
    ) -> Self {
        Self {
            job_id,
            kind: kind.to_owned(),
            event_type,
            status,
            progress,
            message: None,
            data: None,
            at: Utc::now(),
        }
    }

    /// A new job's `queued` event; a pipeline step's names its pipeline and step in `data`.
    pub fn queued(job: &crate::model::Job) -> Self {
        let event = Self::new(job.id, &job.kind, EventType::Queued, job.status(), 0.0);
        match job.pipeline_id {
            Some(pipeline) => event.data(Some(serde_json::json!({
                "pipeline_id": pipeline, "step": job.pipeline_step,
            }))),
            None => event,
        }
    }

    pub fn message(mut self, message: Option<String>) -> Self {
        self.message = message;
        self
    }

    pub fn data(mut self, data: Option<Value>) -> Self {
        self.data = data;
        self
    }
}

/// One event as read back from a stream: its entry id (the SSE `id:`) and the event.
#[derive(Clone, Debug)]
pub struct StreamEntry {
    pub id: String,
    pub event: Event,
}

/// Appends events to the streams; cheap to clone.
#[derive(Clone)]
pub struct EventLog {
    conn: RedisConn,
    keys: StreamKeys,
    tenant_maxlen: usize,
    ttl: Duration,
}

/// Names of the streams under one Redis prefix.
#[derive(Clone, Debug)]
pub struct StreamKeys {
    prefix: String,
}

impl StreamKeys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// `PREFIX:{tenant}:job:JOB`: a tenant's streams share the hash tag `{tenant}`, so that
    /// one script appends to a tenant's stream and its job's in one slot of a Redis Cluster.
    pub fn job(&self, tenant: Uuid, job: Uuid) -> String {
        format!("{}:{{{tenant}}}:job:{job}", self.prefix)
    }

    /// `PREFIX:{tenant}:events`.
    pub fn tenant(&self, tenant: Uuid) -> String {
        format!("{}:{{{tenant}}}:events", self.prefix)
    }
}

impl EventLog {
    pub fn new(conn: RedisConn, prefix: &str, tenant_maxlen: usize, ttl: Duration) -> Self {
        Self {
            conn,
            keys: StreamKeys::new(prefix),
            tenant_maxlen,
            ttl,
        }
    }

    pub fn keys(&self) -> &StreamKeys {
        &self.keys
    }

    /// Appends every event to its tenant's stream and its job's stream in one round trip,
    /// under the same entry id in both (see `APPEND_SCRIPT`). A terminal event starts the job
    /// stream's expiry.
    ///
    /// On a Redis Cluster a script's keys must share a slot: one script per tenant there, all
    /// sent at once, each tenant's events in their order.
    pub async fn append(&self, events: &[(Uuid, Event)]) -> redis::RedisResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        if self.conn.is_cluster() {
            let mut by_tenant: Vec<(Uuid, Vec<(Uuid, Event)>)> = Vec::new();
            for (tenant, event) in events {
                match by_tenant.iter_mut().find(|(t, _)| t == tenant) {
                    Some((_, events)) => events.push((*tenant, event.clone())),
                    None => by_tenant.push((*tenant, vec![(*tenant, event.clone())])),
                }
            }
            if by_tenant.len() > 1 {
                let appends = by_tenant
                    .iter()
                    .map(|(_, events)| self.append_in_one(events));
                for result in futures::future::join_all(appends).await {
                    result?;
                }
                return Ok(());
            }
        }
        self.append_in_one(events).await
    }

    /// One script for all of `events`.
    async fn append_in_one(&self, events: &[(Uuid, Event)]) -> redis::RedisResult<()> {
        let mut invocation = APPEND_SCRIPT.prepare_invoke();
        invocation.arg(self.tenant_maxlen).arg(self.ttl.as_secs());
        for (tenant, event) in events {
            invocation
                .key(self.keys.tenant(*tenant))
                .key(self.keys.job(*tenant, event.job_id))
                .arg(serde_json::to_string(event).expect("events serialize"))
                .arg(u8::from(event.event_type.is_terminal()));
        }
        let mut conn = self.conn.clone();
        invocation.invoke_async::<()>(&mut conn).await
    }
}

impl EventLog {
    /// Deletes the streams of these jobs (tenant, job), whose rows are gone.
    pub async fn forget_jobs(&self, jobs: &[(Uuid, Uuid)]) -> redis::RedisResult<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = jobs
            .iter()
            .map(|(tenant, job)| self.keys.job(*tenant, *job))
            .collect();
        let mut conn = self.conn.clone();
        redis::cmd("DEL")
            .arg(keys)
            .query_async::<()>(&mut conn)
            .await
    }
}

/// Appends each event to its tenant's stream, then to its job's stream under the entry id the
/// tenant's stream gave it. A job's stream is thus the subsequence of its tenant's stream that
/// belongs to the job, with the same ids, so the API follows every job of a tenant from the
/// tenant stream's one read (see the API's hub). An id the job's stream cannot take (one written
/// by an older version, after this id) falls back to a fresh one.
///
/// KEYS: tenant stream, job stream, per event. ARGV: tenant MAXLEN, job TTL (s), then JSON and
/// terminal flag (1/0) per event.
static APPEND_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
for i = 1, #KEYS, 2 do
  local json = ARGV[i + 2]
  local id = redis.call('xadd', KEYS[i], 'maxlen', '~', ARGV[1], '*', 'e', json)
  if not pcall(redis.call, 'xadd', KEYS[i + 1], id, 'e', json) then
    redis.call('xadd', KEYS[i + 1], '*', 'e', json)
  end
  if ARGV[i + 3] == '1' then
    redis.call('expire', KEYS[i + 1], ARGV[2])
  end
end
",
    )
});

/// Entries of `key` strictly after `cursor` (`"0"` for all), at most `count`.
pub async fn read_after<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
    cursor: &str,
    count: usize,
) -> redis::RedisResult<Vec<StreamEntry>> {
    let start = if cursor == "0" || cursor.is_empty() {
        "-".to_owned()
    } else {
        format!("({cursor}")
    };
    let reply: StreamRangeReply = redis::cmd("XRANGE")
        .arg(key)
        .arg(start)
        .arg("+")
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await?;
    Ok(reply.ids.into_iter().filter_map(decode).collect())
}

/// Blocks up to `block` for entries of `key` after `cursor`.
pub async fn wait_after<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
    cursor: &str,
    block: Duration,
    count: usize,
) -> redis::RedisResult<Vec<StreamEntry>> {
    let cursor = if cursor.is_empty() { "0" } else { cursor };
    let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(block.as_millis() as u64)
        .arg("STREAMS")
        .arg(key)
        .arg(cursor)
        .query_async(conn)
        .await?;
    Ok(reply
        .into_iter()
        .flat_map(|r| r.keys)
        .flat_map(|k| k.ids)
        .filter_map(decode)
        .collect())
}

fn decode(entry: redis::streams::StreamId) -> Option<StreamEntry> {
    let raw: String = entry.get("e")?;
    let event = serde_json::from_str(&raw).ok()?;
    Some(StreamEntry {
        id: entry.id,
        event,
    })
}

/// Whether a stream cursor looks like a Redis entry id (`ms-seq`).
pub fn valid_cursor(cursor: &str) -> bool {
    let mut parts = cursor.splitn(2, '-');
    let ms = parts.next().unwrap_or("");
    let seq = parts.next().unwrap_or("0");
    !ms.is_empty()
        && ms.bytes().all(|b| b.is_ascii_digit())
        && !seq.is_empty()
        && seq.bytes().all(|b| b.is_ascii_digit())
}
