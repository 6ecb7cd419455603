//! Fair dispatch's safety net: a pass for every kind with held jobs, so jobs still go out when
//! the pass after a submission or a finished attempt failed (Redis or PostgreSQL away), a worker
//! joined (more slots), or a tenant's cap was raised.

use shared::store;
use std::time::Duration;

use super::{Duty, Schedule};
use crate::Runtime;

pub(crate) struct Dispatcher {
    pub schedule: Schedule,
}

impl Default for Dispatcher {
    /// Twice a second: passes after events do the prompt work.
    fn default() -> Self {
        Self {
            schedule: Schedule {
                name: "dispatcher",
                interval: Duration::from_millis(500),
                batch: 0,
            },
        }
    }
}

#[async_trait::async_trait]
impl Duty for Dispatcher {
    fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// Returns how many jobs it pushed.
    async fn run(&self, runtime: &Runtime) -> anyhow::Result<usize> {
        let mut pushed = 0;
        for kind in store::held_kinds(runtime.pool()).await? {
            pushed += runtime.refill().dispatcher().dispatch(&kind).await?;
        }
        Ok(pushed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maintenance::test_support::TestDb;

    /// With no live worker a kind's queue takes the minimum window; a tenant behind another's
    /// backlog gets its share of it, and the backlog the rest.
    #[tokio::test]
    async fn held_jobs_go_out_by_fair_share_up_to_the_window() {
        let test = TestDb::new().await;
        let mut backlog = Vec::new();
        for _ in 0..20 {
            backlog.push(test.held("canary", test.tenant).await);
        }
        let late = test.other_tenant().await;
        let mut late_jobs = Vec::new();
        for _ in 0..3 {
            late_jobs.push(test.held("canary", late).await);
        }

        let pushed = Dispatcher::default().run(&test.runtime).await.unwrap();

        let window = test.runtime.settings().dispatch_min_window as usize;
        assert_eq!(pushed, window);
        for id in &late_jobs {
            assert!(
                test.in_queue(*id).await,
                "the late tenant's {id} not pushed"
            );
        }
        let backlog_pushed = backlog.len() - {
            let mut held = 0;
            for id in &backlog {
                held += usize::from(!test.in_queue(*id).await);
            }
            held
        };
        assert_eq!(backlog_pushed, window - late_jobs.len());
        assert!(
            test.in_queue(backlog[0]).await && !test.in_queue(backlog[19]).await,
            "a tenant's oldest go first"
        );
        assert_eq!(
            Dispatcher::default().run(&test.runtime).await.unwrap(),
            0,
            "the window is full"
        );
    }
}
