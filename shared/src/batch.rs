//! Natural batching: callers send one item and await its answer; a single task takes whatever
//! has queued up while the previous batch ran and handles it in one round trip. Under light
//! load a batch is one item (no added latency); under heavy load round trips are shared, and
//! may linger a moment for more ([`Batcher::spawn_lingering`]).

use std::{collections::VecDeque, future::Future, time::Duration};
use tokio::sync::{mpsc, oneshot};

/// How many batches back a lingering batch looks for the size to wait for.
const RECENT: usize = 8;

type Reply<O> = oneshot::Sender<Result<O, BatchError>>;

/// Why a call got no output.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum BatchError {
    /// The batch was refused for one item's sake (a value its statement refuses): its items are
    /// sent again one by one, or their neighbours would fail with it for ever. `run` must then be
    /// safe to run again for the items of a batch that failed.
    #[error("refused: {0}")]
    Refused(String),
    /// The round trip failed (a lost connection, a stopped batcher): every item gets it.
    #[error("{0}")]
    Failed(String),
}

pub struct Batcher<I, O> {
    tx: mpsc::Sender<(I, Reply<O>)>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<I: Clone + Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// `run` gets up to `max` items and returns one output per item, in order.
    pub fn spawn<F, Fut>(max: usize, run: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<O>, BatchError>> + Send,
    {
        Self::spawn_lingering(max, Duration::ZERO, run)
    }

    /// [`Batcher::spawn`], where under load (one of the last [`RECENT`] batches carried several
    /// items) a batch waits up to `linger` for more, until it holds as many as the largest of them.
    pub fn spawn_lingering<F, Fut>(max: usize, linger: Duration, run: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<O>, BatchError>> + Send,
    {
        let (tx, mut rx) = mpsc::channel::<(I, Reply<O>)>(max * 4);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(max);
            // The sizes of the last batches: under load a batch waits for as many items as the
            // largest of them carried, no more (callers often come in waves: a worker's slots
            // all started at once). The largest, not the last: a batch cut short by the linger
            // would otherwise make the next ones smaller and smaller.
            let mut recent = VecDeque::from([0; RECENT]);
            while rx.recv_many(&mut batch, max).await > 0 {
                let expected = recent.iter().copied().max().unwrap_or_default();
                if expected > 1 && !linger.is_zero() {
                    let top_up = async {
                        while batch.len() < expected {
                            let room = expected - batch.len();
                            if rx.recv_many(&mut batch, room).await == 0 {
                                break;
                            }
                        }
                    };
                    let _ = tokio::time::timeout(linger, top_up).await;
                }
                recent.pop_front();
                recent.push_back(batch.len());
                let (items, replies): (Vec<I>, Vec<Reply<O>>) = batch.drain(..).unzip();
                let alone = (items.len() > 1).then(|| items.clone());
                match (run(items).await, alone) {
                    (Ok(outputs), _) => {
                        for (reply, output) in replies.into_iter().zip(outputs) {
                            let _ = reply.send(Ok(output));
                        }
                    }
                    (Err(BatchError::Refused(_)), Some(items)) => {
                        let each = items.into_iter().map(|item| run(vec![item]));
                        let answers = futures::future::join_all(each).await;
                        for (reply, answer) in replies.into_iter().zip(answers) {
                            let output = answer.and_then(|mut outputs| {
                                outputs
                                    .pop()
                                    .ok_or_else(|| BatchError::Failed("no output".into()))
                            });
                            let _ = reply.send(output);
                        }
                    }
                    (Err(e), _) => {
                        for reply in replies {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            }
        });
        Self { tx }
    }

    pub async fn call(&self, item: I) -> Result<O, BatchError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((item, reply))
            .await
            .map_err(|_| BatchError::Failed("batcher stopped".into()))?;
        answer
            .await
            .map_err(|_| BatchError::Failed("batcher dropped the request".into()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };

    /// A batch that fails for one item's sake answers the others: each goes again alone.
    #[tokio::test]
    async fn one_bad_item_fails_only_itself() {
        let run = |items: Vec<u32>| async move {
            if items.contains(&99) {
                // Holds the task while the next calls queue up into one batch.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            match items.contains(&0) {
                true => Err(BatchError::Refused("zero".into())),
                false => Ok(items.iter().map(|i| i * 2).collect()),
            }
        };
        let doubler = Batcher::spawn(64, run);
        let first = tokio::spawn({
            let doubler = doubler.clone();
            async move { doubler.call(99).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (bad, good) = tokio::join!(doubler.call(0), doubler.call(1));
        assert_eq!(first.await.unwrap(), Ok(198));
        assert_eq!(bad, Err(BatchError::Refused("zero".into())));
        assert_eq!(good, Ok(2));
    }

    #[tokio::test]
    async fn concurrent_calls_share_batches_and_keep_their_answers() {
        let batches = Arc::new(AtomicUsize::new(0));
        let counter = batches.clone();
        let doubler = Batcher::spawn(64, move |items: Vec<u32>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                Ok(items.into_iter().map(|i| i * 2).collect())
            }
        });
        let calls: Vec<_> = (0..200u32)
            .map(|i| {
                let d = doubler.clone();
                tokio::spawn(async move { (i, d.call(i).await.unwrap()) })
            })
            .collect();
        for call in calls {
            let (i, doubled) = call.await.unwrap();
            assert_eq!(doubled, i * 2);
        }
        let n = batches.load(Ordering::SeqCst);
        assert!(n < 200, "200 calls in {n} batches");
    }

    /// Batch sizes a batcher ran, and the batcher.
    fn recording(linger: Duration) -> (Arc<std::sync::Mutex<Vec<usize>>>, Batcher<u32, u32>) {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let batcher = Batcher::spawn_lingering(64, linger, move |items: Vec<u32>| {
            seen.lock().unwrap().push(items.len());
            async move { Ok(items) }
        });
        (sizes, batcher)
    }

    /// Two calls at once, then two 20 ms apart.
    async fn load_then_two_apart(batcher: &Batcher<u32, u32>) {
        let together: Vec<_> = (0..2)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { b.call(i).await.unwrap() })
            })
            .collect();
        for call in together {
            call.await.unwrap();
        }
        let first = {
            let b = batcher.clone();
            tokio::spawn(async move { b.call(2).await.unwrap() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(batcher.call(3).await.unwrap(), 3);
        assert_eq!(first.await.unwrap(), 2);
    }

    /// Once a batch carried several items, the next waits for more (up to its linger), so
    /// calls 20 ms apart share a round trip; a call under no load goes at once.
    #[tokio::test]
    async fn under_load_a_lingering_batch_waits_for_more() {
        let (sizes, lingering) = recording(Duration::from_millis(500));
        let alone = std::time::Instant::now();
        assert_eq!(lingering.call(7).await.unwrap(), 7);
        assert!(
            alone.elapsed() < Duration::from_millis(400),
            "a lone call lingered"
        );
        load_then_two_apart(&lingering).await;
        assert_eq!(*sizes.lock().unwrap(), [1, 2, 2]);

        let (sizes, eager) = recording(Duration::ZERO);
        load_then_two_apart(&eager).await;
        assert_eq!(*sizes.lock().unwrap(), [2, 1, 1]);
    }

    /// Under load a batch waits only until it holds as many items as the largest recent one:
    /// a wave as large as the last goes at once, not after the linger.
    #[tokio::test]
    async fn a_lingering_batch_as_large_as_the_last_goes_at_once() {
        let (sizes, lingering) = recording(Duration::from_secs(5));
        let wave = |first: u32| {
            let calls: Vec<_> = (first..first + 2)
                .map(|i| {
                    let b = lingering.clone();
                    tokio::spawn(async move { b.call(i).await.unwrap() })
                })
                .collect();
            async move {
                for call in calls {
                    call.await.unwrap();
                }
            }
        };
        wave(0).await;
        let second = std::time::Instant::now();
        wave(2).await;
        assert!(
            second.elapsed() < Duration::from_secs(4),
            "a full wave lingered: {:?}",
            sizes.lock().unwrap()
        );
        assert_eq!(*sizes.lock().unwrap(), [2, 2]);
    }
}
