//! Group commit for the PostgreSQL store: concurrent payments' writes of
//! one kind (begins, decisions) go to the database as one statement over
//! arrays, as the SQLite store's group commit puts them in one transaction.
//!
//! Batching is natural, with no timer, as for the calls to a bank
//! ([`crate::link`]): a batch leaves as soon as fewer than
//! [`STATEMENTS_IN_FLIGHT`] batches of its kind are under way, so a lone
//! payment is written at once, and under load what arrives while earlier
//! batches are out travels together. Each item gets its own answer; a
//! failed batch fails each of its items (with [`GatewayError::for_each`]).

use crate::error::GatewayError;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Batches of one kind under way at once, per store instance.
pub const STATEMENTS_IN_FLIGHT: usize = 2;
/// Most items in one statement.
pub const BATCH_MAX: usize = 512;
/// Most items waiting for a batch; callers wait for room beyond it.
const QUEUE_MAX: usize = 8192;

type Reply<R> = oneshot::Sender<Result<R, GatewayError>>;

/// Writes items in batches through a function, answering each item's caller.
pub struct Batcher<Q, R> {
    queue: mpsc::Sender<(Q, Reply<R>)>,
}

impl<Q, R> Clone for Batcher<Q, R> {
    fn clone(&self) -> Self {
        Batcher { queue: self.queue.clone() }
    }
}

impl<Q: Send + 'static, R: Send + 'static> Batcher<Q, R> {
    /// Starts the batching task; it ends when every handle is dropped.
    /// `write` gets a batch and answers each of its items, in order.
    pub fn start<F, Fut>(write: F) -> Batcher<Q, R>
    where
        F: Fn(Vec<Q>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<R>, GatewayError>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<(Q, Reply<R>)>(QUEUE_MAX);
        let write = Arc::new(write);
        tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(STATEMENTS_IN_FLIGHT));
            while let Some(first) = rx.recv().await {
                // While every permit is out, more items queue up behind
                // `first`: they leave together when a batch comes back.
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let mut items = Vec::with_capacity(BATCH_MAX);
                items.push(first);
                while items.len() < BATCH_MAX {
                    match rx.try_recv() {
                        Ok(item) => items.push(item),
                        Err(_) => break,
                    }
                }
                let write = write.clone();
                tokio::spawn(async move {
                    let (requests, replies): (Vec<Q>, Vec<Reply<R>>) = items.into_iter().unzip();
                    let asked = requests.len();
                    match write(requests).await {
                        Ok(answers) if answers.len() == asked => {
                            for (reply, answer) in replies.into_iter().zip(answers) {
                                let _ = reply.send(Ok(answer));
                            }
                        }
                        Ok(answers) => {
                            let e = format!("a batch of {asked} writes answered {}", answers.len());
                            for reply in replies {
                                let _ = reply.send(Err(GatewayError::Internal(e.clone())));
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, writes = asked, "a batch of writes failed");
                            for reply in replies {
                                let _ = reply.send(Err(e.for_each()));
                            }
                        }
                    }
                    drop(permit);
                });
            }
        });
        Batcher { queue: tx }
    }

    /// Queues `item` for the next batch and waits for its own answer.
    pub async fn call(&self, item: Q) -> Result<R, GatewayError> {
        let (tx, rx) = oneshot::channel();
        self.queue.send((item, tx)).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }
}

fn closed() -> GatewayError {
    GatewayError::Internal("the store's batching task is gone".into())
}
