//! Single-submit latency at a steady request rate (run by `scripts/bench/queue`).
//!
//! Open loop: request i is sent at start + i / rate whatever happened to the earlier ones, so a
//! stalled server cannot hide its stall by slowing the client down (coordinated omission);
//! latency counts from the send. Clients keep their connections alive, as HTTP client
//! libraries do. Two seconds at the same rate warm both sides' connection pools first.
//!
//! submit_bench URL API_KEY [rate=500 seconds=10]
//! Prints one JSON line: {"rate": achieved req/s, "p50_ms", "p99_ms", "max_ms",
//! "send_late_p99_ms" (how far behind schedule sends left: the client's own delay), "errors"}.

use std::time::{Duration, Instant};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        args.len() >= 2,
        "usage: submit_bench URL API_KEY [rate seconds]"
    );
    let (base, key) = (args[0].clone(), args[1].clone());
    let rate: u64 = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(500);
    let seconds: u64 = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(10);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = format!("{base}/v1/jobs");

    // Two seconds at the same rate first, not measured: the client's and the API's connection
    // pools grow to what the rate needs, and the key cache fills (steady state is measured).
    for request in at_rate(rate * 2, rate, &client, &url, &key).await {
        let (_, _, ok) = request.await?;
        anyhow::ensure!(ok, "a warm-up submit failed");
    }
    let total = rate * seconds;
    let start = Instant::now();
    let requests = at_rate(total, rate, &client, &url, &key).await;
    let mut latencies = Vec::with_capacity(requests.len());
    let mut late = Vec::with_capacity(requests.len());
    let mut errors = 0;
    for request in requests {
        let (latency, lateness, ok) = request.await?;
        if ok {
            latencies.push(latency);
            late.push(lateness);
        } else {
            errors += 1;
        }
    }
    let achieved = total as f64 / start.elapsed().as_secs_f64();
    latencies.sort();
    late.sort();
    let ms = |sorted: &[Duration], p: f64| {
        sorted
            .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        r#"{{"rate": {achieved:.1}, "p50_ms": {:.3}, "p99_ms": {:.3}, "max_ms": {:.3}, "send_late_p99_ms": {:.3}, "errors": {errors}}}"#,
        ms(&latencies, 0.5),
        ms(&latencies, 0.99),
        ms(&latencies, 1.0),
        ms(&late, 0.99)
    );
    Ok(())
}

type Sent = tokio::task::JoinHandle<(Duration, Duration, bool)>;

/// Sends `n` submits, the i-th at i / rate after the first whatever the earlier ones did; each
/// yields (latency from its send, how late the send left, success).
async fn at_rate(n: u64, rate: u64, client: &reqwest::Client, url: &str, key: &str) -> Vec<Sent> {
    let start = Instant::now();
    let mut sent = Vec::with_capacity(n as usize);
    for i in 0..n {
        let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
        tokio::time::sleep_until(due.into()).await;
        let (client, url, key) = (client.clone(), url.to_owned(), key.to_owned());
        sent.push(tokio::spawn(async move {
            let at = Instant::now();
            let ok = submit(&client, &url, &key).await.is_ok();
            (at.elapsed(), at - due, ok)
        }));
    }
    sent
}

async fn submit(client: &reqwest::Client, url: &str, key: &str) -> anyhow::Result<()> {
    let response = client
        .post(url)
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(r#"{"kind":"canary","payload":{}}"#)
        .send()
        .await?;
    anyhow::ensure!(response.status().is_success(), "{}", response.status());
    response.bytes().await?;
    Ok(())
}
