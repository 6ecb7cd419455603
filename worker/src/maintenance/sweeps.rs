//! The job kinds' sweeps ([`jobs::Handler::sweep`]): expired patch snapshots, staging tables of
//! imports that ended while their worker was gone, on every target database. They can take
//! long; as every duty runs in a task of its own, they hold up no other.

use std::time::Duration;

use super::{Duty, Schedule};
use crate::Runtime;

pub(crate) struct Sweeps {
    pub schedule: Schedule,
}

impl Default for Sweeps {
    /// Every 5 minutes.
    fn default() -> Self {
        Self {
            schedule: Schedule {
                name: "sweeps",
                interval: Duration::from_secs(300),
                batch: 0,
            },
        }
    }
}

#[async_trait::async_trait]
impl Duty for Sweeps {
    fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// Each kind logs what it dropped and its own failures; no rows to count here.
    async fn run(&self, runtime: &Runtime) -> anyhow::Result<usize> {
        runtime.registry().sweep().await;
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maintenance::{
        run_duties,
        scheduler::Scheduler,
        test_support::{until, TestDb},
    };
    use serde_json::Value;
    use shared::JobContext;
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };
    use tokio::sync::Semaphore;
    use tokio_util::sync::CancellationToken;

    /// A kind whose sweep counts its calls and waits for the gate.
    struct Sweepy {
        sweeps: Arc<AtomicUsize>,
        gate: Arc<Semaphore>,
    }

    #[async_trait::async_trait]
    impl jobs::Runner for Sweepy {
        fn kind(&self) -> &'static str {
            "sweepy"
        }

        async fn prepare(&self) -> anyhow::Result<()> {
            Ok(())
        }

        async fn run(&self, _: &JobContext, _: Value) -> Result<Value, jobs::JobError> {
            Ok(Value::Null)
        }

        async fn sweep(&self) -> anyhow::Result<()> {
            self.sweeps.fetch_add(1, Ordering::SeqCst);
            self.gate.acquire().await?.forget();
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_long_sweep_blocks_no_other_duty_and_never_overlaps_itself() {
        let sweeps = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(0));
        let registry = jobs::Registry::new(vec![Arc::new(Sweepy {
            sweeps: sweeps.clone(),
            gate: gate.clone(),
        })]);
        let test = TestDb::with(registry, |_| {}).await;
        let stop = CancellationToken::new();
        let mut sweeps_duty = Sweeps::default();
        sweeps_duty.schedule.interval = Duration::from_millis(20);
        let duties: Vec<Arc<dyn Duty>> =
            vec![Arc::new(sweeps_duty), Arc::new(Scheduler::default())];
        let running = tokio::spawn(run_duties(test.runtime.clone(), duties, stop.clone()));
        until("the first sweep did not start", || {
            sweeps.load(Ordering::SeqCst) == 1
        })
        .await;

        // While the sweep hangs, the scheduler still promotes due jobs: one, then another, so
        // that a whole scheduler interval (a dozen sweep intervals) passes.
        for _ in 0..2 {
            let due = test.job("sweepy", "scheduled").await;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while test.status(due).await.as_deref() != Some("queued") {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the scheduler waited"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // Still the one sweep: none started beside it.
        assert_eq!(sweeps.load(Ordering::SeqCst), 1);

        gate.add_permits(1);
        until("no sweep after the first ended", || {
            sweeps.load(Ordering::SeqCst) == 2
        })
        .await;
        gate.add_permits(1000);
        stop.cancel();
        running.await.unwrap();
    }
}
