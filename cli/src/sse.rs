//! A small Server-Sent Events reader for a job's stream, reconnecting with `Last-Event-ID`.

use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::{Stream, StreamExt, TryStreamExt};
use serde_json::Value;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Message {
    pub id: Option<String>,
    /// The event type: `queued`, `progress`, `succeeded`, … or `snapshot`.
    pub event: String,
    pub data: Value,
}

impl Message {
    /// Whether nothing follows this event on a job's stream.
    pub fn ends_job_stream(&self) -> bool {
        matches!(
            self.event.as_str(),
            "succeeded" | "failed" | "cancelled" | "snapshot"
        )
    }

    /// Whether nothing follows this event on a pipeline's stream.
    pub fn ends_pipeline_stream(&self) -> bool {
        self.event == "pipeline.finished"
    }
}

impl From<Event> for Message {
    fn from(event: Event) -> Self {
        let data = serde_json::from_str(&event.data).unwrap_or(Value::String(event.data));
        Self {
            id: (!event.id.is_empty()).then_some(event.id),
            event: event.event,
            data,
        }
    }
}

/// The SSE messages of a byte stream, however its chunks cut lines or characters; keep-alive
/// comments are skipped.
fn messages<B: AsRef<[u8]>, E>(
    bytes: impl Stream<Item = Result<B, E>>,
) -> impl Stream<Item = Result<Message, EventStreamError<E>>> {
    bytes.eventsource().map_ok(Message::from)
}

/// Follows `url` (a job's or a pipeline's event stream) until the event that `ends` it,
/// calling `on_message` for each event once. A dropped connection is resumed with
/// `Last-Event-ID`, so nothing is missed or repeated. Returns the last event.
pub async fn follow(
    client: &reqwest::Client,
    url: &str,
    api_key: &str,
    ends: fn(&Message) -> bool,
    mut on_message: impl FnMut(&Message),
) -> anyhow::Result<Message> {
    let mut last_id: Option<String> = None;
    let mut failures = 0;
    loop {
        let mut request = client.get(url).bearer_auth(api_key);
        if let Some(id) = &last_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = match request.send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => anyhow::bail!("{}", crate::problem_text(r).await),
            Err(e) => {
                failures += 1;
                anyhow::ensure!(failures < 30, "event stream unreachable: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        failures = 0;
        let mut events = std::pin::pin!(messages(response.bytes_stream()));
        while let Some(Ok(message)) = events.next().await {
            if message.id.is_some() {
                last_id = message.id.clone();
            }
            on_message(&message);
            if ends(&message) {
                return Ok(message);
            }
        }
        // The connection ended before the terminal event: resume after the last one seen.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(chunks: Vec<&[u8]>) -> Vec<Message> {
        let chunks = futures::stream::iter(chunks.into_iter().map(Ok::<_, ()>));
        messages(chunks).try_collect().await.unwrap()
    }

    #[tokio::test]
    async fn parses_split_chunks_and_skips_comments() {
        let messages = parse(vec![
            b": keep-alive\n\nid: 1-0\nevent: progr",
            b"ess\ndata: {\"progress\":0.5}\n\nid: 2-0\r\nevent: succeeded\r\ndata: {}\r\n\r\n",
        ])
        .await;
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].id.as_deref(), Some("1-0"));
        assert_eq!(messages[0].event, "progress");
        assert_eq!(messages[0].data["progress"], 0.5);
        assert!(messages[1].ends_job_stream());
    }

    /// Chunks end wherever the network cuts them, inside a character too: each one decoded on
    /// its own turned the halves into U+FFFD.
    #[tokio::test]
    async fn a_character_split_across_chunks_survives() {
        let event = "id: 7-0\nevent: progress\ndata: {\"message\":\"Café, 東京 ✓ 😀\"}\n\n";
        for size in [1, 2, 3, 5] {
            let chunks: Vec<&[u8]> = event.as_bytes().chunks(size).collect();
            let messages = parse(chunks).await;
            assert_eq!(messages.len(), 1, "chunks of {size} bytes");
            assert_eq!(
                messages[0].data["message"], "Café, 東京 ✓ 😀",
                "chunks of {size} bytes"
            );
        }
    }
}
