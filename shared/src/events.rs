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
    #[serde(serialize_with = "rfc3339")]
    pub at: DateTime<Utc>,
    /// The attempt the event belongs to (for `queued`, the attempt it waits for); unset for
    /// events that need no place in that order. Not sent: it orders the job's stream (see
    /// [`Event::order`]).
    #[serde(skip)]
    pub attempt: Option<i32>,
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
            attempt: None,
        }
    }

    /// A new job's `queued` event; a pipeline step's names its pipeline and step in `data`.
    pub fn queued(job: &crate::model::Job) -> Self {
        let event = Self::new(job.id, &job.kind, EventType::Queued, job.status(), 0.0)
            .attempt(job.attempt + 1);
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

    pub fn attempt(mut self, attempt: i32) -> Self {
        self.attempt = Some(attempt);
        self
    }

    /// Where the event falls in its job's life: a job is queued for attempt n (2n), then that
    /// attempt runs and ends (2n + 1). 0: unordered. A job may be claimed as soon as its row is
    /// queued, before whoever queued it has appended its `queued` event; that event, arriving
    /// after its attempt's own, is dropped (see `APPEND_SCRIPT`) rather than appended last.
    pub fn order(&self) -> i64 {
        match self.attempt {
            Some(attempt) => {
                2 * i64::from(attempt) + i64::from(self.event_type != EventType::Queued)
            }
            None => 0,
        }
    }
}

/// What chrono's own `Serialize` writes, as one string: chrono hands serde_json its text a
/// character at a time, each escaped on its own, which cost a draining worker 5 % of its
/// instructions (two events a job).
fn rfc3339<S: serde::Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
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
        let mut key = self.tenant_part(tenant, 41);
        key.push_str(":job:");
        key.push_str(job.hyphenated().encode_lower(&mut Uuid::encode_buffer()));
        key
    }

    /// `PREFIX:{tenant}:events`.
    pub fn tenant(&self, tenant: Uuid) -> String {
        let mut key = self.tenant_part(tenant, 7);
        key.push_str(":events");
        key
    }

    /// `PREFIX:{tenant}`, with room for `more` bytes. Without `format!`, which cost a draining
    /// worker 6 % of its instructions (four keys a job).
    fn tenant_part(&self, tenant: Uuid, more: usize) -> String {
        let mut key = String::with_capacity(self.prefix.len() + 39 + more);
        key.push_str(&self.prefix);
        key.push_str(":{");
        key.push_str(tenant.hyphenated().encode_lower(&mut Uuid::encode_buffer()));
        key.push('}');
        key
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
            let by_tenant = by_tenant(events);
            if by_tenant.len() > 1 {
                let appends = by_tenant.iter().map(|events| self.append_in_one(events));
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
        invocation
            .arg(self.tenant_maxlen)
            .arg(JOB_STREAM_MAXLEN)
            .arg(self.ttl.as_secs());
        for (tenant, event) in events {
            invocation
                .key(self.keys.tenant(*tenant))
                .key(self.keys.job(*tenant, event.job_id))
                .arg(serde_json::to_string(event).expect("events serialize"))
                .arg(u8::from(event.event_type.is_terminal()))
                .arg(event.order());
        }
        let mut conn = self.conn.clone();
        invocation.invoke_async::<()>(&mut conn).await
    }
}

impl EventLog {
    /// Deletes the streams of these jobs (tenant, job), whose rows are gone, and their events
    /// in their tenants' streams (which carry their results): a deleted job's events were
    /// replayed to `GET /v1/events` until the stream's length cap dropped them. The entries
    /// are found through the job's stream, so only while it lasts (`events_ttl` after the end). One script per
    /// tenant on a Redis Cluster, as for [`Self::append`].
    pub async fn forget_jobs(&self, jobs: &[(Uuid, Uuid)]) -> redis::RedisResult<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        let groups = match self.conn.is_cluster() {
            true => by_tenant(jobs),
            false => vec![jobs.to_vec()],
        };
        let forgets = groups.iter().map(|jobs| async move {
            let mut invocation = FORGET_SCRIPT.prepare_invoke();
            for (tenant, job) in jobs {
                invocation
                    .key(self.keys.tenant(*tenant))
                    .key(self.keys.job(*tenant, *job));
            }
            invocation.invoke_async::<()>(&mut self.conn.clone()).await
        });
        for result in futures::future::join_all(forgets).await {
            result?;
        }
        Ok(())
    }
}

/// `items` grouped by tenant, each group in its order.
fn by_tenant<T: Clone>(items: &[(Uuid, T)]) -> Vec<Vec<(Uuid, T)>> {
    let mut groups: Vec<Vec<(Uuid, T)>> = Vec::new();
    for item in items {
        match groups.iter_mut().find(|g| g[0].0 == item.0) {
            Some(group) => group.push(item.clone()),
            None => groups.push(vec![item.clone()]),
        }
    }
    groups
}

/// Deletes each job's stream and its entries in its tenant's stream (the same ids; see
/// `APPEND_SCRIPT`). KEYS: tenant stream, job stream, per job.
static FORGET_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
for i = 1, #KEYS, 2 do
  local entries = redis.call('XRANGE', KEYS[i + 1], '-', '+')
  local ids = {}
  for _, entry in ipairs(entries) do
    ids[#ids + 1] = entry[1]
    if #ids == 1000 then
      redis.call('XDEL', KEYS[i], unpack(ids))
      ids = {}
    end
  end
  if #ids > 0 then
    redis.call('XDEL', KEYS[i], unpack(ids))
  end
  redis.call('DEL', KEYS[i + 1])
end
",
    )
});

/// The entries a job's stream keeps, about: a job runs as long as it likes, writing progress
/// ten times a second, and its stream lasts until it ends. A reader resuming from before the
/// oldest kept entry reads on from it; the job's row holds where it stands.
pub const JOB_STREAM_MAXLEN: usize = 10_000;

/// Appends each event to its tenant's stream, then to its job's stream under the entry id the
/// tenant's stream gave it. A job's stream is thus the subsequence of its tenant's stream that
/// belongs to the job, with the same ids, so the API follows every job of a tenant from the
/// tenant stream's one read (see the API's hub). An id the job's stream cannot take (one written
/// by an older version, after this id) falls back to a fresh one.
///
/// A job's stream keeps each entry's order (`o`, see [`Event::order`]); a `queued` event whose
/// attempt has already started there is stale and goes to neither stream.
///
/// KEYS: tenant stream, job stream, per event. ARGV: tenant MAXLEN, job MAXLEN, job TTL (s),
/// then JSON, terminal flag (1/0) and order per event.
static APPEND_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local arg = 4
for i = 1, #KEYS, 2 do
  local json, terminal, order = ARGV[arg], ARGV[arg + 1], tonumber(ARGV[arg + 2])
  arg = arg + 3
  local stale = false
  if order > 0 and order % 2 == 0 then
    local last = redis.call('xrevrange', KEYS[i + 1], '+', '-', 'count', 1)[1]
    if last then
      local fields = last[2]
      for f = 1, #fields, 2 do
        if fields[f] == 'o' and tonumber(fields[f + 1]) > order then
          stale = true
        end
      end
    end
  end
  if not stale then
    local id = redis.call('xadd', KEYS[i], 'maxlen', '~', ARGV[1], '*', 'e', json)
    if not pcall(redis.call, 'xadd', KEYS[i + 1], 'maxlen', '~', ARGV[2], id, 'e', json, 'o', order) then
      redis.call('xadd', KEYS[i + 1], 'maxlen', '~', ARGV[2], '*', 'e', json, 'o', order)
    end
    if terminal == '1' then
      redis.call('expire', KEYS[i + 1], ARGV[3])
    end
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
    read_between(conn, key, cursor, "+", count).await
}

/// Entries of `key` strictly after `cursor` (`"0"` for all) up to `until` (an entry id, `+`
/// for the last), at most `count`.
pub async fn read_between<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
    cursor: &str,
    until: &str,
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
        .arg(until)
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

/// Whether a stream cursor is a Redis entry id (`ms-seq`) that a read can resume after: each
/// part a number below the largest (Redis refuses to read past that one, and a stream kept
/// asking it every second).
pub fn valid_cursor(cursor: &str) -> bool {
    let mut parts = cursor.splitn(2, '-');
    let ms = parts.next().unwrap_or("");
    let seq = parts.next().unwrap_or("0");
    let below_max = |part: &str| {
        part.bytes().all(|b| b.is_ascii_digit()) && part.parse::<u64>().is_ok_and(|n| n < u64::MAX)
    };
    below_max(ms) && below_max(seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_entry_ids_a_read_can_resume_after() {
        for good in ["0", "1764590000123-0", "5-9", "18446744073709551614-3"] {
            assert!(valid_cursor(good), "{good}");
        }
        for bad in [
            "",
            "-1",
            "+5",
            "x-1",
            "5-",
            "18446744073709551615-18446744073709551615",
            "5-18446744073709551615",
            "99999999999999999999999-0",
        ] {
            assert!(!valid_cursor(bad), "{bad}");
        }
    }

    /// The keys and the time written by hand read as `format!` and chrono would write them.
    #[test]
    fn keys_and_times_are_written_as_formatted() {
        let (tenant, job) = (Uuid::now_v7(), Uuid::now_v7());
        let keys = StreamKeys::new("conveyor:test");
        assert_eq!(
            keys.job(tenant, job),
            format!("conveyor:test:{{{tenant}}}:job:{job}")
        );
        assert_eq!(
            keys.tenant(tenant),
            format!("conveyor:test:{{{tenant}}}:events")
        );
        for nanos in [0, 120_000_000, 123_456_000, 123_456_789] {
            let mut event = Event::new(job, "canary", EventType::Started, JobStatus::Running, 0.0);
            event.at = DateTime::from_timestamp(1_764_950_400, nanos).unwrap();
            let written = serde_json::to_value(&event).unwrap();
            assert_eq!(written["at"], serde_json::to_value(event.at).unwrap());
        }
    }

    /// An event log on the local Redis under a fresh prefix: its URL, prefix, connection.
    async fn test_log() -> (String, String, RedisConn, EventLog) {
        let url = std::env::var("CONVEYOR_REDIS_URL").unwrap_or("redis://127.0.0.1:6379".into());
        let conn = crate::redis_conn::Redis::open(&url)
            .unwrap()
            .manager()
            .await
            .expect("Redis on 127.0.0.1:6379");
        let prefix = format!("test:{}", Uuid::new_v4().simple());
        let log = EventLog::new(conn.clone(), &prefix, 1000, Duration::from_secs(60));
        (url, prefix, conn, log)
    }

    /// A worker may claim a job before whoever queued it appended its `queued` event: that
    /// event, arriving after the attempt's `started` (or its outcome), is dropped from both
    /// streams, while the next attempt's `queued` (a retry) goes in after them.
    #[tokio::test]
    async fn a_queued_event_after_its_attempt_started_is_dropped() {
        let (url, prefix, conn, log) = test_log().await;
        let (tenant, job) = (Uuid::now_v7(), Uuid::now_v7());
        let event = |event_type, status| Event::new(job, "canary", event_type, status, 0.0);
        let queued = |attempt| event(EventType::Queued, JobStatus::Queued).attempt(attempt);
        let read = |key: String| {
            let mut conn = conn.clone();
            async move {
                read_after(&mut conn, &key, "0", 100)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|entry| entry.event.event_type.as_str())
                    .collect::<Vec<_>>()
            }
        };

        let started = event(EventType::Started, JobStatus::Running).attempt(1);
        let failed = event(EventType::Failed, JobStatus::Failed).attempt(1);
        log.append(&[(tenant, started), (tenant, failed)])
            .await
            .unwrap();
        log.append(&[(tenant, queued(1))]).await.unwrap();
        let (job_stream, tenant_stream) = (log.keys().job(tenant, job), log.keys().tenant(tenant));
        assert_eq!(read(job_stream.clone()).await, ["started", "failed"]);
        assert_eq!(read(tenant_stream.clone()).await, ["started", "failed"]);

        // Retried: queued for the second attempt.
        log.append(&[(tenant, queued(2))]).await.unwrap();
        assert_eq!(read(job_stream).await, ["started", "failed", "queued"]);
        assert_eq!(read(tenant_stream).await, ["started", "failed", "queued"]);
        crate::testing::clear_redis_prefix(&url, &prefix);
    }

    /// A job's stream is capped as its tenant's is: a job that runs for hours writing progress
    /// ten times a second grew it without bound in the Redis every tenant shares.
    #[tokio::test]
    async fn a_job_stream_keeps_about_its_cap() {
        let (url, prefix, conn, log) = test_log().await;
        let (tenant, job) = (Uuid::now_v7(), Uuid::now_v7());
        let progress: Vec<_> = (0..1000)
            .map(|_| {
                let event = Event::new(job, "canary", EventType::Progress, JobStatus::Running, 0.5);
                (tenant, event.attempt(1))
            })
            .collect();
        for _ in 0..(JOB_STREAM_MAXLEN * 3 / 1000) {
            log.append(&progress).await.unwrap();
        }
        let length: usize = redis::cmd("XLEN")
            .arg(log.keys().job(tenant, job))
            .query_async(&mut conn.clone())
            .await
            .unwrap();
        assert!(
            (JOB_STREAM_MAXLEN..JOB_STREAM_MAXLEN * 11 / 10).contains(&length),
            "the job's stream holds {length} entries"
        );
        crate::testing::clear_redis_prefix(&url, &prefix);
    }
}
