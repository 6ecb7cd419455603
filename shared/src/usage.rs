//! What a job's attempt used: its wall time, the CPU time of its own work, and the figures its
//! handler counts (rows, bytes, chunks, tokens, synthetic rows).
//!
//! CPU time is the calling thread's CPU clock (`CLOCK_THREAD_CPUTIME_ID`) read around each
//! poll of the handler's future ([`CpuTimed`]) and around each piece of blocking work it hands
//! to [`crate::JobContext::blocking`]: the job's own work, never its neighbours' on the same
//! runtime threads.

use serde::{Deserialize, Serialize};
use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};
use utoipa::ToSchema;

/// What one attempt used, as jobs' results and `GET /v1/usage` show it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Usage {
    pub wall_seconds: f64,
    pub cpu_seconds: f64,
    pub rows_read: i64,
    pub rows_written: i64,
    pub bytes_read: i64,
    pub chunks_embedded: i64,
    pub tokens_embedded: i64,
    pub synthetic_rows: i64,
}

/// The counters of a running attempt; handlers add to them through their `JobContext`.
#[derive(Default)]
pub struct Meter {
    cpu_ns: AtomicU64,
    pub rows_read: AtomicI64,
    pub rows_written: AtomicI64,
    pub bytes_read: AtomicI64,
    pub chunks_embedded: AtomicI64,
    pub tokens_embedded: AtomicI64,
    pub synthetic_rows: AtomicI64,
}

impl Meter {
    /// Most a figure counts in one attempt: far more than any job does, and small enough that
    /// no sum of attempts' figures overflows. Some figures come from where a tenant writes (an
    /// import's ledger on its own database, replayed by a retry): 2^63 there wrapped the
    /// day's rows imported below zero, and so past `max_rows_per_day`.
    pub const MOST: i64 = 1 << 40;

    /// Adds `n` (taken as 0 when negative), up to [`Meter::MOST`] in all.
    pub fn add(counter: &AtomicI64, n: i64) {
        let n = n.clamp(0, Self::MOST);
        let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
            Some(now.saturating_add(n).min(Self::MOST))
        });
    }

    fn add_cpu(&self, spent: Duration) {
        self.cpu_ns
            .fetch_add(spent.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Runs `work` on this thread, counting its CPU time.
    pub fn timed<R>(&self, work: impl FnOnce() -> R) -> R {
        let start = thread_cpu();
        let result = work();
        self.add_cpu(thread_cpu().saturating_sub(start));
        result
    }

    pub fn usage(&self, wall: Duration) -> Usage {
        let get = |c: &AtomicI64| c.load(Ordering::Relaxed);
        Usage {
            wall_seconds: wall.as_secs_f64(),
            cpu_seconds: Duration::from_nanos(self.cpu_ns.load(Ordering::Relaxed)).as_secs_f64(),
            rows_read: get(&self.rows_read),
            rows_written: get(&self.rows_written),
            bytes_read: get(&self.bytes_read),
            chunks_embedded: get(&self.chunks_embedded),
            tokens_embedded: get(&self.tokens_embedded),
            synthetic_rows: get(&self.synthetic_rows),
        }
    }
}

/// The CPU time this thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A future whose polls' CPU time goes to `meter`.
pub struct CpuTimed<F> {
    future: Pin<Box<F>>,
    meter: Arc<Meter>,
}

impl<F: Future> CpuTimed<F> {
    pub fn new(future: F, meter: Arc<Meter>) -> Self {
        Self {
            future: Box::pin(future),
            meter,
        }
    }
}

impl<F: Future> Future for CpuTimed<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let meter = this.meter.clone();
        meter.timed(|| this.future.as_mut().poll(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Busy until this thread has used `d` of CPU (however loaded the machine).
    fn spin(d: Duration) -> u64 {
        let start = thread_cpu();
        let mut x = 0u64;
        while thread_cpu() - start < d {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        x
    }

    /// A figure never goes below zero nor past `MOST`, whatever is added.
    #[test]
    fn figures_stay_between_zero_and_the_most() {
        let meter = Meter::default();
        Meter::add(&meter.rows_written, 5);
        Meter::add(&meter.rows_written, 9_223_372_036_854_775_808_u64 as i64);
        assert_eq!(meter.usage(Duration::ZERO).rows_written, 5);
        for _ in 0..3 {
            Meter::add(&meter.rows_written, i64::MAX);
        }
        assert_eq!(meter.usage(Duration::ZERO).rows_written, Meter::MOST);
    }

    /// Busy polls count; time spent asleep does not; blocking work counts through `timed`.
    #[tokio::test]
    async fn cpu_time_counts_the_jobs_own_work_only() {
        let meter = Arc::new(Meter::default());
        CpuTimed::new(
            async {
                spin(Duration::from_millis(60));
                tokio::time::sleep(Duration::from_millis(200)).await;
            },
            meter.clone(),
        )
        .await;
        let cpu = meter.usage(Duration::ZERO).cpu_seconds;
        assert!((0.06..0.1).contains(&cpu), "{cpu}");

        let m = meter.clone();
        tokio::task::spawn_blocking(move || m.timed(|| spin(Duration::from_millis(60))))
            .await
            .unwrap();
        let more = meter.usage(Duration::ZERO).cpu_seconds - cpu;
        assert!((0.06..0.1).contains(&more), "{more}");
    }
}
