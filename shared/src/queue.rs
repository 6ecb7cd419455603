//! What the processes tell each other about the queues, through Redis Pub/Sub.
//!
//! The queues themselves live in PostgreSQL: a job waits as a `queued` row and a worker claims
//! it there (see [`crate::dispatch`]). Redis only carries the news that makes the waits short:
//! a kind has jobs that became queued (so idle workers claim now rather than at their idle
//! poll), and a running job's cancel was requested (so its worker stops it now rather than at
//! its next heartbeat). A message lost to a reconnect costs that wait, never a job.

use crate::redis_conn::RedisConn;
use uuid::Uuid;

#[derive(Clone)]
pub struct Queues {
    conn: RedisConn,
    prefix: String,
}

impl Queues {
    pub fn new(conn: RedisConn, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
        }
    }

    /// The Pub/Sub channel on which cancel requests are announced, so that the worker running
    /// the job stops it at once rather than at its next heartbeat (which still looks, for
    /// announcements missed while it was disconnected).
    pub fn cancel_channel(&self) -> String {
        format!("{}:cancel", self.prefix)
    }

    /// The Pub/Sub channel on which the kinds whose jobs became queued are announced, so that
    /// every worker process serving the kind claims at once.
    pub fn queued_channel(&self) -> String {
        format!("{}:queued", self.prefix)
    }

    pub async fn announce_queued(&self, kind: &str) -> anyhow::Result<()> {
        self.publish(self.queued_channel(), kind).await
    }

    pub async fn announce_cancel(&self, job: Uuid) -> anyhow::Result<()> {
        self.publish(self.cancel_channel(), &job.to_string()).await
    }

    async fn publish(&self, channel: String, message: &str) -> anyhow::Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(message)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }
}
