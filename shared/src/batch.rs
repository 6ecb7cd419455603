//! Natural batching: callers send one item and await its answer; a single task takes whatever
//! has queued up while the previous batch ran and handles it in one round trip. Under light
//! load a batch is one item (no added latency); under heavy load round trips are shared.

use std::future::Future;
use tokio::sync::{mpsc, oneshot};

type Reply<O> = oneshot::Sender<Result<O, String>>;

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

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// `run` gets up to `max` items and returns one output per item, in order.
    pub fn spawn<F, Fut>(max: usize, run: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<O>, String>> + Send,
    {
        let (tx, mut rx) = mpsc::channel::<(I, Reply<O>)>(max * 4);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(max);
            while rx.recv_many(&mut batch, max).await > 0 {
                let (items, replies): (Vec<I>, Vec<Reply<O>>) = batch.drain(..).unzip();
                match run(items).await {
                    Ok(outputs) => {
                        for (reply, output) in replies.into_iter().zip(outputs) {
                            let _ = reply.send(Ok(output));
                        }
                    }
                    Err(e) => {
                        for reply in replies {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            }
        });
        Self { tx }
    }

    pub async fn call(&self, item: I) -> Result<O, String> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((item, reply))
            .await
            .map_err(|_| "batcher stopped".to_owned())?;
        answer
            .await
            .map_err(|_| "batcher dropped the request".to_owned())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };

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
}
