//! Single-submit latency at a steady request rate (run by `scripts/bench/queue`).
//!
//! Open loop: request i is due at start + i / rate whatever happened to the earlier ones, and
//! its latency counts from when it was due, not from when it was sent, so a stalled server
//! cannot hide its stall by slowing the client down (coordinated omission). Clients keep their
//! connections alive, as HTTP client libraries do.
//!
//! submit_bench URL API_KEY [rate=500 seconds=10]
//! Prints one JSON line: {"rate": achieved req/s, "p50_ms", "p99_ms", "max_ms", "errors"}.

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
    let body = r#"{"kind":"canary","payload":{}}"#;

    // Warm the connection pool and the API's key cache; not measured.
    for _ in 0..20 {
        submit(&client, &url, &key, body).await?;
    }

    let total = rate * seconds;
    let start = Instant::now();
    let mut requests = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
        tokio::time::sleep_until(due.into()).await;
        let (client, url, key) = (client.clone(), url.clone(), key.clone());
        requests.push(tokio::spawn(async move {
            let sent = Instant::now();
            let ok = submit(&client, &url, &key, body).await.is_ok();
            (sent.elapsed(), sent - due, ok)
        }));
    }
    let mut latencies = Vec::with_capacity(requests.len());
    let mut late = Vec::with_capacity(requests.len());
    let mut errors = 0;
    let trace = std::env::var("SUBMIT_TRACE").ok();
    let mut lines = String::new();
    for (i, request) in requests.into_iter().enumerate() {
        let (latency, lateness, ok) = request.await?;
        if trace.is_some() {
            lines += &format!(
                "{} {:.3} {:.3}\n",
                i,
                latency.as_secs_f64() * 1e3,
                lateness.as_secs_f64() * 1e3
            );
        }
        if ok {
            latencies.push(latency);
            late.push(lateness);
        } else {
            errors += 1;
        }
    }
    if let Some(path) = trace {
        std::fs::write(path, lines)?;
    }
    let achieved = total as f64 / start.elapsed().as_secs_f64();
    latencies.sort();
    let at = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        r#"{{"rate": {achieved:.1}, "p50_ms": {:.3}, "p99_ms": {:.3}, "max_ms": {:.3}, "errors": {errors}}}"#,
        at(0.5),
        at(0.99),
        at(1.0)
    );
    Ok(())
}

async fn submit(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: &'static str,
) -> anyhow::Result<()> {
    let response = client
        .post(url)
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    anyhow::ensure!(response.status().is_success(), "{}", response.status());
    response.bytes().await?;
    Ok(())
}
