//! SSE fan-out benchmark (run by `scripts/bench/sse`): many subscribers on a tenant's
//! `GET /v1/events` and on single jobs' streams while canary jobs run at a steady rate.
//! Measures the delay from each event's append (its Redis entry id is the append time in ms)
//! to its arrival at every subscriber, events lost or repeated, and the API's RSS and CPU.
//!
//! sse_bench URL API_KEY REDIS_URL REDIS_PREFIX API_PID [tenant_subs job_subs jobs_per_s secs steps step_ms]
//!
//! With `SSE_BENCH_TIMELINE=1` it also prints the tenant streams' delays per second of append,
//! to tell a steady delay from stalls (the machine's own housekeeping shows as lone slow seconds).

use serde_json::{json, Value};
use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// A job followed by a subscriber, and what it saw.
type Followed = (String, Arc<Mutex<Seen>>);

/// What one subscriber saw.
#[derive(Default)]
struct Seen {
    events: u64,
    /// Out of order or repeated ids.
    disorder: u64,
    /// Append → arrival, microseconds, for events appended after the subscriber connected.
    delays_us: Vec<u32>,
    /// The second each of those events was appended in (only with the timeline).
    appended_s: Vec<u32>,
    terminal: bool,
}

/// Reads SSE frames, recording each `id:` line's delay. Stops at a terminal event if asked.
///
/// Speaks HTTP/1.1 on a bare socket and only looks for `id:` and `event:` lines: thousands of
/// subscribers share this machine's two cores with the API, so the reader must cost far less
/// than the server it measures (a browser's `EventSource` does not share the server's cores).
async fn subscribe(
    addr: String,
    path: String,
    key: String,
    stop_at_terminal: bool,
    connected: Arc<AtomicU64>,
    seen: Arc<Mutex<Seen>>,
) {
    let mut socket = TcpStream::connect(&addr)
        .await
        .unwrap_or_else(|e| panic!("{addr}: {e}"));
    socket.set_nodelay(true).expect("nodelay");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n"
    );
    socket
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut raw = Vec::<u8>::with_capacity(64 << 10);
    let header_end = loop {
        if let Some(i) = find(&raw, b"\r\n\r\n") {
            break i + 4;
        }
        match socket.read_buf(&mut raw).await {
            Ok(0) | Err(_) => panic!("{path}: connection closed before the response"),
            Ok(_) => {}
        }
    };
    let head = String::from_utf8_lossy(&raw[..header_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{path}: {head}");
    assert!(
        head.contains("transfer-encoding: chunked"),
        "{path}: {head}"
    );
    raw.drain(..header_end);
    let connected_ms = now_us() / 1000;
    connected.fetch_add(1, Ordering::Relaxed);

    let mut body = Body::default();
    // An incomplete line carried from one read to the next; complete lines are scanned where
    // they lie in the read buffer (copying every byte out of it cost a tenth of the reader).
    let mut partial = Vec::<u8>::with_capacity(4 << 10);
    let mut last = (0u64, 0u64);
    loop {
        let arrived = now_us();
        // Scanned in a block of its own: no lock or borrow of it lives across the read below.
        let (terminal, ended) = {
            let mut local = seen.lock().unwrap();
            // Only `id:` lines (and, on a job's stream, the terminal `event:` line) matter: jump
            // from one to the next with a vectorised search instead of walking every line.
            let mut scan = |text: &[u8]| {
                for at in ID_LINE.find_iter(text) {
                    if at > 0 && text[at - 1] != b'\n' {
                        continue;
                    }
                    let value = &text[at + 4..];
                    let id = parse_id(&value[..memchr::memchr(b'\n', value).unwrap_or(0)]);
                    if id <= last {
                        local.disorder += 1;
                    }
                    last = id;
                    local.events += 1;
                    if id.0 >= connected_ms {
                        local
                            .delays_us
                            .push(arrived.saturating_sub(id.0 * 1000) as u32);
                        if *TIMELINE {
                            local.appended_s.push((id.0 / 1000) as u32);
                        }
                    }
                }
                if stop_at_terminal
                    && [
                        &b"event: succeeded"[..],
                        b"event: failed",
                        b"event: cancelled",
                    ]
                    .iter()
                    .any(|line| has_line(text, line))
                {
                    local.terminal = true;
                }
            };
            let ended = body.decode(&mut raw, |mut data| {
                if !partial.is_empty() {
                    let Some(end) = memchr::memchr(b'\n', data) else {
                        partial.extend_from_slice(data);
                        return;
                    };
                    partial.extend_from_slice(&data[..=end]);
                    scan(&partial);
                    partial.clear();
                    data = &data[end + 1..];
                }
                let cut = memchr::memrchr(b'\n', data).map_or(0, |i| i + 1);
                scan(&data[..cut]);
                partial.extend_from_slice(&data[cut..]);
            });
            (local.terminal, ended)
        };
        if terminal || ended {
            break;
        }
        if !matches!(socket.read_buf(&mut raw).await, Ok(n) if n > 0) {
            break;
        }
    }
}

/// `SSE_BENCH_TIMELINE` is set: keep each delivery's second of append for the timeline.
static TIMELINE: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| std::env::var_os("SSE_BENCH_TIMELINE").is_some());

static ID_LINE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"id: "));

/// Whether `line` is one of `text`'s lines.
fn has_line(text: &[u8], line: &[u8]) -> bool {
    memchr::memmem::find_iter(text, line)
        .any(|at| (at == 0 || text[at - 1] == b'\n') && text.get(at + line.len()) == Some(&b'\n'))
}

/// `ms-seq` as numbers; (0, 0) if malformed.
fn parse_id(text: &[u8]) -> (u64, u64) {
    let mut parts = text.splitn(2, |&b| b == b'-').map(|digits| {
        digits.iter().try_fold(0u64, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
        })
    });
    match (parts.next().flatten(), parts.next().unwrap_or(Some(0))) {
        (Some(ms), Some(seq)) => (ms, seq),
        _ => (0, 0),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// Undoes HTTP/1.1 chunked transfer coding: a chunk may end mid-line, so lines are only read
/// from the decoded bytes.
#[derive(Default)]
struct Body {
    /// Data bytes left in the current chunk.
    data: usize,
    /// The CRLF after a chunk's data is still to come.
    crlf: bool,
}

impl Body {
    /// Hands what `raw` holds of the body to `data`, piece by piece, and drops it from `raw`;
    /// true at the last chunk.
    fn decode(&mut self, raw: &mut Vec<u8>, mut data: impl FnMut(&[u8])) -> bool {
        let mut at = 0;
        let ended = loop {
            if self.data > 0 {
                let take = self.data.min(raw.len() - at);
                data(&raw[at..at + take]);
                (at, self.data) = (at + take, self.data - take);
                if self.data > 0 {
                    break false;
                }
                self.crlf = true;
            }
            if self.crlf {
                if raw.len() - at < 2 {
                    break false;
                }
                (at, self.crlf) = (at + 2, false);
            }
            let Some(end) = memchr::memchr(b'\n', &raw[at..]) else {
                break false;
            };
            let size = std::str::from_utf8(&raw[at..at + end - 1])
                .ok()
                .and_then(|line| usize::from_str_radix(line.split(';').next()?.trim(), 16).ok())
                .expect("chunk size line");
            at += end + 1;
            if size == 0 {
                break true;
            }
            self.data = size;
        };
        raw.drain(..at);
        ended
    }
}

/// (RSS in bytes, peak RSS in bytes, CPU seconds) of a process.
fn process_usage(pid: u32) -> (u64, u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after the ')'.
    (kb("VmRSS:"), kb("VmHWM:"), (ticks(11) + ticks(12)) / 100.0)
}

/// (batches, events) the API's SSE feeds have broadcast, from its `/metrics`.
async fn feed_totals(client: &reqwest::Client, base: &str) -> anyhow::Result<(f64, f64)> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    };
    Ok((
        value("conveyor_sse_batches_total"),
        value("conveyor_sse_batch_events_total"),
    ))
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

// One thread: the readers share two cores with the API; a second runtime thread only adds
// wake-ups and work stealing between the two.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(args.len() >= 5, "usage: sse_bench URL API_KEY REDIS_URL REDIS_PREFIX API_PID [tenant_subs job_subs jobs_per_s secs steps step_ms]");
    let (base, key, redis_url, prefix) = (&args[0], &args[1], &args[2], &args[3]);
    let api_pid: u32 = args[4].parse()?;
    let num = |i: usize, default: u64| args.get(i).and_then(|v| v.parse().ok()).unwrap_or(default);
    let (tenant_subs, job_subs, rate, secs, steps, step_ms) = (
        num(5, 2000),
        num(6, 200),
        num(7, 100),
        num(8, 30),
        num(9, 5),
        num(10, 100),
    );

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let session: Value = client
        .get(format!("{base}/v1/session"))
        .bearer_auth(key)
        .send()
        .await?
        .json()
        .await?;
    let tenant = session["tenant_id"].as_str().expect("tenant id").to_owned();
    // A loaded machine answers slower than the default 500 ms response timeout.
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
    let mut redis = redis::Client::open(redis_url.as_str())?
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let tenant_key = format!("{prefix}:{{{tenant}}}:events");
    let addr = base
        .strip_prefix("http://")
        .expect("an http:// URL")
        .trim_end_matches('/')
        .to_owned();

    eprintln!("sse bench: connecting {tenant_subs} tenant subscribers");
    let connected = Arc::new(AtomicU64::new(0));
    let mut tenant_seen = Vec::new();
    let mut tasks = Vec::new();
    for chunk in 0..tenant_subs.div_ceil(200) {
        for _ in 0..200.min(tenant_subs - chunk * 200) {
            let seen = Arc::new(Mutex::new(Seen::default()));
            tenant_seen.push(seen.clone());
            tasks.push(tokio::spawn(subscribe(
                addr.clone(),
                "/v1/events".into(),
                key.clone(),
                false,
                connected.clone(),
                seen,
            )));
        }
        while connected.load(Ordering::Relaxed) < ((chunk + 1) * 200).min(tenant_subs) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    while connected.load(Ordering::Relaxed) < tenant_subs {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, _, cpu_start) = process_usage(api_pid);
    let (_, _, client_cpu_start) = process_usage(std::process::id());
    let (rss_connected, _, _) = process_usage(api_pid);
    let feeds_start = feed_totals(&client, base).await?;

    eprintln!("sse bench: {rate} canary jobs/s for {secs} s ({steps} steps × {step_ms} ms), {job_subs} job subscribers at a time");
    let started = Instant::now();
    let job_slots = Arc::new(tokio::sync::Semaphore::new(job_subs as usize));
    let job_seen: Arc<Mutex<Vec<Followed>>> = Arc::default();
    let job_tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
    let submitted = Arc::new(AtomicU64::new(0));
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut submits = Vec::new();
    let peak_rss = Arc::new(AtomicU64::new(0));
    let sampler = {
        let peak_rss = peak_rss.clone();
        tokio::spawn(async move {
            loop {
                let (rss, _, _) = process_usage(api_pid);
                peak_rss.fetch_max(rss, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    while started.elapsed() < Duration::from_secs(secs) {
        ticker.tick().await;
        let (client, base, key, addr) = (client.clone(), base.clone(), key.clone(), addr.clone());
        let (slots, job_seen, job_tasks, connected, submitted) = (
            job_slots.clone(),
            job_seen.clone(),
            job_tasks.clone(),
            connected.clone(),
            submitted.clone(),
        );
        submits.push(tokio::spawn(async move {
            let body = json!({"kind": "canary", "payload": {"steps": steps, "step_ms": step_ms}});
            let job: Value = client
                .post(format!("{base}/v1/jobs"))
                .bearer_auth(&key)
                .json(&body)
                .send()
                .await
                .expect("submit")
                .json()
                .await
                .expect("job");
            submitted.fetch_add(1, Ordering::Relaxed);
            let id = job["id"].as_str().expect("id").to_owned();
            // Follow the job if a subscriber slot is free.
            if let Ok(permit) = slots.try_acquire_owned() {
                let seen = Arc::new(Mutex::new(Seen::default()));
                job_seen.lock().unwrap().push((id.clone(), seen.clone()));
                let task = tokio::spawn(async move {
                    subscribe(
                        addr,
                        format!("/v1/jobs/{id}/events"),
                        key,
                        true,
                        connected,
                        seen,
                    )
                    .await;
                    drop(permit);
                });
                job_tasks.lock().unwrap().push(task);
            }
        }));
    }
    for s in submits {
        s.await?;
    }
    let load_secs = started.elapsed().as_secs_f64();
    // Let the last jobs finish: the tenant stream stops growing.
    let mut last_len = 0u64;
    let mut stable = 0;
    while stable < 8 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let len: u64 = redis::cmd("XLEN")
            .arg(&tenant_key)
            .query_async(&mut redis)
            .await?;
        if len == last_len {
            stable += 1;
        } else {
            stable = 0;
            last_len = len;
        }
    }
    // Wait until every subscriber has it all, or none has made progress for 10 s (what is
    // missing then counts as lost).
    let received = || -> u64 { tenant_seen.iter().map(|s| s.lock().unwrap().events).sum() };
    let (mut progress, mut since) = (received(), Instant::now());
    while tenant_seen
        .iter()
        .any(|s| s.lock().unwrap().events < last_len)
        && since.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = received();
        if now > progress {
            (progress, since) = (now, Instant::now());
        }
    }
    let (_, _, cpu_end) = process_usage(api_pid);
    let (_, _, client_cpu_end) = process_usage(std::process::id());
    let wall = started.elapsed().as_secs_f64();
    let feeds_end = feed_totals(&client, base).await?;
    sampler.abort();
    // Tenant streams never end by themselves; a job's stream ends at its terminal event.
    for t in tasks {
        t.abort();
    }
    let job_tasks: Vec<_> = std::mem::take(&mut *job_tasks.lock().unwrap());
    for t in job_tasks {
        t.abort();
    }

    // Losses: each tenant subscriber must have every entry of the tenant stream; each job
    // subscriber every entry of its job's stream.
    let mut lost = 0u64;
    let mut disorder = 0u64;
    let mut delays = Vec::new();
    let mut tenant_events = 0u64;
    let mut timeline = std::collections::BTreeMap::<u32, Vec<u32>>::new();
    for seen in &tenant_seen {
        let seen = seen.lock().unwrap();
        lost += last_len.saturating_sub(seen.events);
        disorder += seen.disorder;
        tenant_events += seen.events;
        delays.extend_from_slice(&seen.delays_us);
        for (d, s) in seen.delays_us.iter().zip(&seen.appended_s) {
            timeline.entry(*s).or_default().push(*d);
        }
    }
    let mut job_delays = Vec::new();
    let followed: Vec<Followed> = std::mem::take(&mut *job_seen.lock().unwrap());
    let mut job_events = 0u64;
    for (id, seen) in followed.iter() {
        let len: u64 = redis::cmd("XLEN")
            .arg(format!("{prefix}:{{{tenant}}}:job:{id}"))
            .query_async(&mut redis)
            .await?;
        let seen = seen.lock().unwrap();
        lost += len.saturating_sub(seen.events);
        disorder += seen.disorder;
        job_events += seen.events;
        job_delays.extend_from_slice(&seen.delays_us);
    }
    if !timeline.is_empty() {
        eprintln!("| appended in second | deliveries | p50 | p99 | max |");
        eprintln!("|---:|---:|---:|---:|---:|");
    }
    for (second, mut d) in timeline {
        d.sort_unstable();
        eprintln!(
            "| {second} | {} | {:.1} ms | {:.1} ms | {:.1} ms |",
            d.len(),
            percentile(&d, 0.5),
            percentile(&d, 0.99),
            percentile(&d, 1.0)
        );
    }
    delays.sort_unstable();
    job_delays.sort_unstable();
    let mut all: Vec<u32> = delays.iter().chain(job_delays.iter()).copied().collect();
    all.sort_unstable();
    let (rss_end, _, _) = process_usage(api_pid);
    let peak = peak_rss.load(Ordering::Relaxed).max(rss_end);
    let mb = |b: u64| b as f64 / 1_048_576.0;
    let submitted = submitted.load(Ordering::Relaxed);

    println!();
    println!("| subscribers | jobs/s | events appended | deliveries | delay p50 | p99 | max | lost | repeated/out of order | api RSS (connected → peak) | api CPU |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {tenant_subs} tenant + {} jobs ({} at a time) | {:.0} | {last_len} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {lost} | {disorder} | {:.0} → {:.0} MB | {:.0} % of a core |",
        followed.len(),
        job_subs,
        submitted as f64 / load_secs,
        tenant_events + job_events,
        percentile(&all, 0.5),
        percentile(&all, 0.99),
        percentile(&all, 1.0),
        mb(rss_connected),
        mb(peak),
        (cpu_end - cpu_start) / wall * 100.0,
    );
    println!();
    println!(
        "this client (the subscribers' reader, on the same cores): {:.0} % of a core",
        (client_cpu_end - client_cpu_start) / wall * 100.0
    );
    println!(
        "tenant streams: p50 {:.1} ms, p99 {:.1} ms over {} deliveries; job streams: p50 {:.1} ms, p99 {:.1} ms over {} deliveries",
        percentile(&delays, 0.5),
        percentile(&delays, 0.99),
        delays.len(),
        percentile(&job_delays, 0.5),
        percentile(&job_delays, 0.99),
        job_delays.len()
    );
    let (batches, batch_events) = (feeds_end.0 - feeds_start.0, feeds_end.1 - feeds_start.1);
    println!(
        "the API's feeds: {:.0} batches/s, {:.1} events per batch (each batch is one write per subscriber)",
        batches / wall,
        batch_events / batches.max(1.0)
    );
    anyhow::ensure!(lost == 0 && disorder == 0, "events were lost or repeated");
    Ok(())
}
