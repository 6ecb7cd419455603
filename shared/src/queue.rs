//! The Redis queues, one per job kind, through apalis' Redis backend.
//!
//! A queue entry carries only a [`QueueMessage`]; the job row in PostgreSQL is the source of
//! truth. The apalis task id is derived from the job id and its generation, so pushing the same
//! message twice while it is still in Redis is a no-op and the rescuer can ask whether a job's
//! message is there.

use apalis_redis::{Config, RedisStorage};

use crate::redis_conn::RedisConn;
use std::time::Duration;
use uuid::Uuid;

use crate::model::QueueMessage;

/// apalis (its Redis backend, 1.0) keeps a worker's last heartbeat in whole seconds, and at each
/// heartbeat drops every worker of the queue last seen `orphaned_duration().as_secs()` seconds
/// before now, *itself included* (its "all but me" filter never reaches its script), putting
/// the tasks it holds back on the queue. Tests run 500 ms heartbeats: 1.5 s, a horizon of one
/// second once rounded down, so a worker whose heartbeat's two round trips straddled a second
/// boundary dropped itself ("worker not registered") and its queue restarted, more often the
/// busier the machine; and any other live worker of the queue last seen in an earlier second
/// went too. With 1 s × 3 a live worker goes only if its heartbeats are more than 2 s apart.
const MIN_APALIS_HEARTBEAT: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Queues {
    conn: RedisConn,
    prefix: String,
    heartbeat: Duration,
    missed_heartbeats: usize,
}

impl Queues {
    pub fn new(conn: RedisConn, prefix: &str, heartbeat: Duration) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
            heartbeat: heartbeat.max(MIN_APALIS_HEARTBEAT),
            missed_heartbeats: 3,
        }
    }

    /// apalis' settings for `kind`'s queue: its key namespace and the heartbeat that lets
    /// apalis hand a dead worker's prefetched tasks to others.
    ///
    /// No task locks: apalis' lock runs `LREM` on the waiting list for every task it starts
    /// (the fetch has already taken the task off that list), a scan of the whole backlog per
    /// task: with 20,000 jobs waiting, Redis spent a full core on it. A dead worker's tasks
    /// still come back through its in-flight set, and the job row's lease in PostgreSQL is
    /// what says who runs a job. No Pub/Sub task events either: nobody listens to apalis'.
    pub fn config(&self, kind: &str) -> Config {
        Config::default()
            .queue(self.queue_name(kind))
            .heartbeat_interval(self.heartbeat)
            .missed_heartbeats(self.missed_heartbeats)
            .lock_tasks(false)
            .emit_events(false)
    }

    /// `PREFIX:queue:{kind}`: apalis names each of the queue's keys after it, so they all
    /// share the hash tag `{kind}` and live in one slot of a Redis Cluster (apalis' scripts
    /// touch several of them at once), while different queues spread over the shards.
    pub fn queue_name(&self, kind: &str) -> String {
        format!("{}:queue:{{{kind}}}", self.prefix)
    }

    /// The apalis backend of `kind`'s queue for a worker that fetches `prefetch` entries at a
    /// time: no more than its concurrency, so long jobs do not wait behind a busy worker.
    pub fn storage(&self, kind: &str, prefetch: usize) -> RedisStorage<QueueMessage, RedisConn> {
        let config = self.config(kind).batch_size(prefetch.clamp(1, 128));
        RedisStorage::new(self.conn.clone()).with_config(config)
    }

    /// Pushes messages onto `kind`'s queue in one round trip.
    ///
    /// Written against apalis' key layout rather than through its `push`: apalis routes every
    /// push through its scheduled set and moves all due entries with one Lua `unpack`, which
    /// fails for good once about 8,000 wait (a backlog with no worker running). This pushes
    /// straight onto the active list, one `RPUSH` per entry.
    pub async fn push(&self, kind: &str, messages: &[QueueMessage]) -> anyhow::Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let config = self.config(kind);
        let mut invocation = PUSH_SCRIPT.prepare_invoke();
        invocation
            .key(config.job_data_hash())
            .key(config.active_jobs_list())
            .key(config.signal_list())
            .key(config.job_meta_hash());
        for m in messages {
            invocation
                .arg(task_id(m.job_id, m.generation))
                .arg(serde_json::to_vec(m)?);
        }
        let mut conn = self.conn.clone();
        invocation
            .invoke_async::<u64>(&mut conn)
            .await
            .map_err(|e| anyhow::anyhow!("push to queue {kind}: {e}"))?;
        Ok(())
    }

    /// The Pub/Sub channel on which cancel requests are announced, so that the worker running
    /// the job stops it at once rather than at its next heartbeat (which still looks, for
    /// announcements missed while it was disconnected).
    pub fn cancel_channel(&self) -> String {
        format!("{}:cancel", self.prefix)
    }

    /// The Pub/Sub channel on which a pass announces the kinds it pushed, so that every worker
    /// process's consumers of the kind look at once (not only the process that passed).
    pub fn pushed_channel(&self) -> String {
        format!("{}:pushed", self.prefix)
    }

    pub async fn announce_pushed(&self, kind: &str) -> anyhow::Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("PUBLISH")
            .arg(self.pushed_channel())
            .arg(kind)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    pub async fn announce_cancel(&self, job: Uuid) -> anyhow::Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("PUBLISH")
            .arg(self.cancel_channel())
            .arg(job.to_string())
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Which of these messages are still held by `kind`'s queue (waiting or in flight).
    pub async fn present(
        &self,
        kind: &str,
        messages: &[QueueMessage],
    ) -> anyhow::Result<Vec<bool>> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let hash = self.config(kind).job_data_hash();
        let mut pipe = redis::pipe();
        for m in messages {
            pipe.cmd("HEXISTS")
                .arg(&hash)
                .arg(task_id(m.job_id, m.generation));
        }
        let mut conn = self.conn.clone();
        Ok(pipe.query_async(&mut conn).await?)
    }

    /// Waiting entries of `kind`'s queue (for `/metrics` and the queues panel).
    pub async fn depth(&self, kind: &str) -> anyhow::Result<u64> {
        let config = self.config(kind);
        let mut conn = self.conn.clone();
        let (active, scheduled): (u64, u64) = redis::pipe()
            .cmd("LLEN")
            .arg(config.active_jobs_list())
            .cmd("ZCARD")
            .arg(config.scheduled_jobs_set())
            .query_async(&mut conn)
            .await?;
        Ok(active + scheduled)
    }

    /// Drops what apalis keeps of finished tasks: PostgreSQL holds the history, so Redis only
    /// needs live entries (BullMQ #225: completed jobs kept forever fill Redis).
    pub async fn forget_done(&self, kind: &str, max: usize) -> anyhow::Result<usize> {
        let config = self.config(kind);
        let mut conn = self.conn.clone();
        let mut forgotten = 0;
        for set in [config.done_jobs_set(), config.dead_jobs_set()] {
            let ids: Vec<String> = redis::cmd("SPOP")
                .arg(&set)
                .arg(max)
                .query_async(&mut conn)
                .await?;
            if ids.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            pipe.cmd("HDEL")
                .arg(config.job_data_hash())
                .arg(&ids)
                .ignore();
            for id in &ids {
                pipe.cmd("DEL")
                    .arg(format!("{}:{id}", config.job_meta_hash()))
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
            forgotten += ids.len();
        }
        Ok(forgotten)
    }
}

/// Adds each (task id, data) not already present: data, metadata, then the active list, and
/// wakes waiting workers. An id still held (waiting or in flight) is left alone.
static PUSH_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local pushed = 0
for i = 1, #ARGV, 2 do
  if redis.call('hsetnx', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('hset', KEYS[4] .. ':' .. ARGV[i], 'attempts', 0, 'max_attempts', 25,
               'status', 'Pending', 'idempotency_key', '')
    redis.call('rpush', KEYS[2], ARGV[i])
    pushed = pushed + 1
  end
end
if pushed > 0 then
  redis.call('del', KEYS[3])
  redis.call('lpush', KEYS[3], 1)
end
return pushed
",
    )
});

/// The apalis task id of a job's generation: a ULID (what apalis' Redis backend uses) made of
/// the job's UUIDv7 with its low 16 bits replaced by the generation.
pub fn task_id(job_id: Uuid, generation: i32) -> String {
    let bits = (job_id.as_u128() & !0xFFFF) | (generation as u128 & 0xFFFF);
    ulid::Ulid(bits).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the Redis the tests use, under a prefix of its own (deleted at the end).
    async fn queues() -> (Queues, RedisConn, String) {
        let url = std::env::var("CONVEYOR_REDIS_URL").unwrap_or("redis://127.0.0.1:6379".into());
        let conn = crate::redis_conn::Redis::open(&url)
            .unwrap()
            .manager()
            .await
            .expect("Redis on 127.0.0.1:6379");
        let prefix = format!("test:{}", Uuid::new_v4().simple());
        let queues = Queues::new(conn.clone(), &prefix, Duration::from_secs(1));
        (queues, conn, prefix)
    }

    /// However short the process' heartbeat, apalis' orphan horizon (counted in whole seconds,
    /// and applied by each worker to itself too) leaves a live worker seconds of slack.
    #[tokio::test]
    async fn apalis_never_takes_a_live_worker_for_an_orphan() {
        let (_, conn, prefix) = queues().await;
        for heartbeat in [100, 500, 2000].map(Duration::from_millis) {
            let config = Queues::new(conn.clone(), &prefix, heartbeat).config("import");
            assert!(
                config.orphaned_duration().as_secs() >= 3,
                "heartbeat {heartbeat:?}: horizon {:?}",
                config.orphaned_duration()
            );
            assert!(config.heartbeat_interval >= heartbeat);
        }
    }

    /// A message pushed twice while it is held is queued once; `present` tells held messages
    /// from others; a job's next generation is a message of its own.
    #[tokio::test]
    async fn a_push_is_idempotent_and_present_finds_what_it_pushed() {
        let (queues, mut conn, prefix) = queues().await;
        let job = Uuid::now_v7();
        let first = QueueMessage {
            job_id: job,
            generation: 1,
        };
        let next = QueueMessage {
            job_id: job,
            generation: 2,
        };
        let other = QueueMessage {
            job_id: Uuid::now_v7(),
            generation: 1,
        };
        queues
            .push("canary", std::slice::from_ref(&first))
            .await
            .unwrap();
        queues
            .push("canary", &[first.clone(), first.clone()])
            .await
            .unwrap();
        assert_eq!(queues.depth("canary").await.unwrap(), 1);
        assert_eq!(
            queues
                .present("canary", &[first.clone(), next.clone(), other])
                .await
                .unwrap(),
            [true, false, false]
        );
        queues
            .push("canary", std::slice::from_ref(&next))
            .await
            .unwrap();
        assert_eq!(queues.depth("canary").await.unwrap(), 2);
        assert_eq!(
            queues.depth("ingest").await.unwrap(),
            0,
            "queues are per kind"
        );

        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            redis::cmd("DEL")
                .arg(keys)
                .query_async::<()>(&mut conn)
                .await
                .unwrap();
        }
    }
}
