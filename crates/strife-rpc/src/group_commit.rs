//! Group commit: one thread owns a store and runs the operations queued to
//! it in batches, each batch one transaction and so one fsync. Every
//! operation runs in its own savepoint (a failing one rolls back alone), and
//! its caller is answered only after the batch's commit is durable. Under
//! load many payments share each fsync; alone, an operation commits at once.

use std::sync::mpsc;
use tokio::sync::oneshot;

/// Most operations in one transaction.
pub const BATCH_MAX: usize = 512;
/// Most operations waiting for the store; callers wait for room beyond it.
pub const QUEUE_MAX: usize = 8192;

/// A store that can wrap several operations in one transaction.
pub trait Batched: Send + 'static {
    fn begin(&mut self) -> Result<(), String>;
    fn commit(&mut self) -> Result<(), String>;
    fn rollback(&mut self);
}

/// Called after the batch's commit with its result; sends the reply.
type Finish = Box<dyn FnOnce(Result<(), String>) + Send>;
type Job<S> = Box<dyn FnOnce(&mut S) -> Finish + Send>;

/// The handle operations are queued through.
pub struct GroupCommit<S> {
    queue: mpsc::SyncSender<Job<S>>,
}

impl<S> Clone for GroupCommit<S> {
    fn clone(&self) -> Self {
        GroupCommit { queue: self.queue.clone() }
    }
}

/// The store's thread is gone (it panicked, or the process is stopping).
#[derive(Debug, Clone, thiserror::Error)]
pub enum GroupCommitError {
    #[error("the store is not running")]
    Closed,
    #[error("commit failed: {0}")]
    Commit(String),
}

impl<S: Batched> GroupCommit<S> {
    /// Starts the store's thread. It ends when every handle is dropped.
    pub fn start(name: &str, mut store: S) -> std::io::Result<GroupCommit<S>> {
        let (tx, rx) = mpsc::sync_channel::<Job<S>>(QUEUE_MAX);
        std::thread::Builder::new().name(format!("{name}-store")).spawn(move || {
            let mut finishes: Vec<Finish> = Vec::with_capacity(BATCH_MAX);
            while let Ok(first) = rx.recv() {
                let started = std::time::Instant::now();
                let begun = store.begin();
                let mut next = Some(first);
                while let Some(job) = next.take() {
                    finishes.push(job(&mut store));
                    if finishes.len() < BATCH_MAX {
                        next = rx.try_recv().ok();
                    }
                }
                let committed = begun.and_then(|()| store.commit());
                if committed.is_err() {
                    store.rollback();
                    crate::metrics::STORE.failures.get_or_create(&[("cause", "commit")]).inc();
                }
                crate::metrics::STORE.commit_seconds.observe(started.elapsed().as_secs_f64());
                crate::metrics::STORE.batch_size.observe(finishes.len() as f64);
                for finish in finishes.drain(..) {
                    finish(committed.clone());
                }
            }
        })?;
        Ok(GroupCommit { queue: tx })
    }

    /// Runs `op` in the next batch and answers as soon as it has run, before
    /// the batch is durable. Only for writes whose loss in a crash is safe
    /// (the gateway's `preparing` record: under presumed abort, no record
    /// means abort). Later operations still see it, and it becomes durable
    /// with its batch, before any later batch.
    pub async fn run_before_commit<T, F>(&self, op: F) -> Result<T, GroupCommitError>
    where
        T: Send + 'static,
        F: FnOnce(&mut S) -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job<S> = Box::new(move |store: &mut S| {
            let _ = tx.send(op(store));
            Box::new(|_| {})
        });
        self.enqueue(job).await?;
        rx.await.map_err(|_| GroupCommitError::Closed)
    }

    /// Queues `op` without waiting for it at all; dropped if the queue is
    /// full. Only for writes that are redone if lost (marking a payment
    /// acknowledged: the finisher re-sends its decision, harmlessly).
    pub fn run_lazily<F>(&self, op: F)
    where
        F: FnOnce(&mut S) + Send + 'static,
    {
        let job: Job<S> = Box::new(move |store: &mut S| {
            op(store);
            Box::new(|_| {})
        });
        let _ = self.queue.try_send(job);
    }

    async fn enqueue(&self, job: Job<S>) -> Result<(), GroupCommitError> {
        let queue = self.queue.clone();
        // The queue is bounded: when it is full, wait off the async threads.
        match queue.try_send(job) {
            Ok(()) => Ok(()),
            Err(mpsc::TrySendError::Full(job)) => tokio::task::spawn_blocking(move || queue.send(job))
                .await
                .map_err(|_| GroupCommitError::Closed)?
                .map_err(|_| GroupCommitError::Closed),
            Err(mpsc::TrySendError::Disconnected(_)) => Err(GroupCommitError::Closed),
        }
    }

    /// Runs `op` on the store inside the next batch; returns its result once
    /// the batch is durable.
    pub async fn run<T, F>(&self, op: F) -> Result<T, GroupCommitError>
    where
        T: Send + 'static,
        F: FnOnce(&mut S) -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job<S> = Box::new(move |store: &mut S| {
            let result = op(store);
            Box::new(move |committed: Result<(), String>| {
                let _ = tx.send(committed.map(|()| result));
            })
        });
        self.enqueue(job).await?;
        match rx.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(GroupCommitError::Commit(e)),
            Err(_) => Err(GroupCommitError::Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Log {
        open: bool,
        applied: Vec<u32>,
        commits: u32,
    }

    impl Batched for Log {
        fn begin(&mut self) -> Result<(), String> {
            assert!(!self.open);
            self.open = true;
            Ok(())
        }
        fn commit(&mut self) -> Result<(), String> {
            self.open = false;
            self.commits += 1;
            Ok(())
        }
        fn rollback(&mut self) {
            self.open = false;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_operation_runs_once_inside_a_transaction() {
        let gc = GroupCommit::start("test", Log::default()).expect("start");
        let mut tasks = Vec::new();
        for i in 0..1000u32 {
            let gc = gc.clone();
            tasks.push(tokio::spawn(async move {
                gc.run(move |log: &mut Log| {
                    assert!(log.open, "inside a transaction");
                    log.applied.push(i);
                    i
                })
                .await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.expect("task").expect("ran"), i as u32);
        }
        let (applied, commits) = gc.run(|log: &mut Log| (log.applied.len(), log.commits)).await.expect("ran");
        assert_eq!(applied, 1000);
        assert!((1..=1001).contains(&commits), "{commits}");
    }
}
