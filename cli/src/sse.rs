//! A small Server-Sent Events reader for a job's stream, reconnecting with `Last-Event-ID`.

use futures::StreamExt;
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
}

/// Splits a byte stream into SSE messages; keep-alive comments are skipped.
#[derive(Default)]
struct Parser {
    buffer: String,
}

impl Parser {
    fn push(&mut self, chunk: &[u8]) -> Vec<Message> {
        self.buffer
            .push_str(&String::from_utf8_lossy(chunk).replace("\r\n", "\n"));
        let mut out = Vec::new();
        while let Some(end) = self.buffer.find("\n\n") {
            let block: String = self.buffer.drain(..end + 2).collect();
            let (mut id, mut event, mut data) = (None, "message".to_owned(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            if data.is_empty() {
                continue;
            }
            let data = serde_json::from_str(&data).unwrap_or(Value::String(data));
            out.push(Message { id, event, data });
        }
        out
    }
}

/// Follows `url` (a job's event stream) until its terminal event, calling `on_message` for each
/// event once. A dropped connection is resumed with `Last-Event-ID`, so nothing is missed or
/// repeated. Returns the last event.
pub async fn follow(
    client: &reqwest::Client,
    url: &str,
    api_key: &str,
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
        let mut parser = Parser::default();
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            for message in parser.push(&chunk) {
                if message.id.is_some() {
                    last_id = message.id.clone();
                }
                on_message(&message);
                if message.ends_job_stream() {
                    return Ok(message);
                }
            }
        }
        // The connection ended before the terminal event: resume after the last one seen.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_split_chunks_and_skips_comments() {
        let mut parser = Parser::default();
        assert!(parser
            .push(b": keep-alive\n\nid: 1-0\nevent: progr")
            .is_empty());
        let messages = parser.push(
            b"ess\ndata: {\"progress\":0.5}\n\nid: 2-0\r\nevent: succeeded\r\ndata: {}\r\n\r\n",
        );
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].id.as_deref(), Some("1-0"));
        assert_eq!(messages[0].event, "progress");
        assert_eq!(messages[0].data["progress"], 0.5);
        assert!(messages[1].ends_job_stream());
    }
}
