//! Group commit: one thread owns a store and runs the operations queued to
//! it in batches, each batch one transaction and so one fsync. Every
//! operation runs in its own savepoint (a failing one rolls back alone), and
//! its caller is answered only after the batch's commit is durable. Under
//! load many payments share each fsync; alone, an operation commits at once.
//!
//! A batch that cannot begin or commit (a full disk, an I/O error) is rolled
//! back whole and every caller in it gets the failure with its cause
//! ([`StorageFailure`]); none is answered success. The thread then goes on
//! with the next batch: the store recovers by itself once space is back.

use crate::storage::{self, StorageFailure};
use std::sync::mpsc;
use tokio::sync::oneshot;

/// Most operations in one transaction.
pub const BATCH_MAX: usize = 512;
/// Most operations waiting for the store; callers wait for room beyond it.
pub const QUEUE_MAX: usize = 8192;

/// A store that can wrap several operations in one transaction.
pub trait Batched: Send + 'static {
    fn begin(&mut self) -> Result<(), StorageFailure>;
    fn commit(&mut self) -> Result<(), StorageFailure>;
    /// Undoes the batch, which failed with `failure`.
    fn rollback(&mut self, failure: &StorageFailure);
}

/// Called after the batch's commit with its result; sends the reply.
type Finish = Box<dyn FnOnce(Result<(), StorageFailure>) + Send>;
/// An operation: run on the store (`Some`), or not run because its batch
/// could not begin (`None`); either way it returns how to answer.
type Job<S> = Box<dyn FnOnce(Option<&mut S>) -> Finish + Send>;

/// The handle operations are queued through.
pub struct GroupCommit<S> {
    queue: mpsc::SyncSender<Job<S>>,
}

impl<S> Clone for GroupCommit<S> {
    fn clone(&self) -> Self {
        GroupCommit { queue: self.queue.clone() }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum GroupCommitError {
    /// The store's thread is gone (it panicked, or the process is stopping).
    #[error("the store is not running")]
    Closed,
    /// The operation's batch could not begin or commit: nothing of it was
    /// kept.
    #[error("commit failed: {0}")]
    Commit(StorageFailure),
}

impl<S: Batched> GroupCommit<S> {
    /// Starts the store's thread. It ends when every handle is dropped.
    pub fn start(name: &str, mut store: S) -> std::io::Result<GroupCommit<S>> {
        let (tx, rx) = mpsc::sync_channel::<Job<S>>(QUEUE_MAX);
        let name_owned = name.to_owned();
        std::thread::Builder::new().name(format!("{name}-store")).spawn(move || {
            let mut finishes: Vec<Finish> = Vec::with_capacity(BATCH_MAX);
            let name = name_owned;
            while let Ok(first) = rx.recv() {
                let started = std::time::Instant::now();
                let committed = match store.begin() {
                    Ok(()) => {
                        let mut next = Some(first);
                        while let Some(job) = next.take() {
                            finishes.push(job(Some(&mut store)));
                            if finishes.len() < BATCH_MAX {
                                next = rx.try_recv().ok();
                            }
                        }
                        store.commit()
                    }
                    // No transaction: run nothing (outside one, each write
                    // would commit alone), fail this job.
                    Err(failure) => {
                        finishes.push(first(None));
                        Err(failure)
                    }
                };
                if let Err(failure) = &committed {
                    storage::report(&name, failure);
                    store.rollback(failure);
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
    /// with its batch, before any later batch. If that batch then fails,
    /// the store hears of it ([`Batched::rollback`]) and must answer later
    /// operations on what was lost accordingly.
    pub async fn run_before_commit<T, F>(&self, op: F) -> Result<T, GroupCommitError>
    where
        T: Send + 'static,
        F: FnOnce(&mut S) -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job<S> = Box::new(move |store: Option<&mut S>| match store {
            Some(store) => {
                let _ = tx.send(Ok(op(store)));
                Box::new(|_| {})
            }
            None => Box::new(move |committed: Result<(), StorageFailure>| {
                let failure = committed.err().unwrap_or_else(not_begun);
                let _ = tx.send(Err(GroupCommitError::Commit(failure)));
            }),
        });
        self.enqueue(job).await?;
        rx.await.map_err(|_| GroupCommitError::Closed)?
    }

    /// Queues `op` without waiting for it at all; dropped if the queue is
    /// full. Only for writes that are redone if lost (marking a payment
    /// acknowledged: the finisher re-sends its decision, harmlessly).
    pub fn run_lazily<F>(&self, op: F)
    where
        F: FnOnce(&mut S) + Send + 'static,
    {
        let job: Job<S> = Box::new(move |store: Option<&mut S>| {
            if let Some(store) = store {
                op(store);
            }
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
        let job: Job<S> = Box::new(move |store: Option<&mut S>| {
            let result = store.map(op);
            Box::new(move |committed: Result<(), StorageFailure>| {
                let _ = tx.send(match (committed, result) {
                    (Ok(()), Some(value)) => Ok(value),
                    (Err(failure), _) => Err(failure),
                    (Ok(()), None) => Err(not_begun()),
                });
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

/// What a job that did not run is told when its batch reported no failure
/// (it cannot happen: a batch that did not begin failed).
fn not_begun() -> StorageFailure {
    StorageFailure::new(storage::StorageCause::Other, "the batch did not begin")
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::storage::StorageCause;

    #[derive(Default)]
    struct Log {
        open: bool,
        applied: Vec<u32>,
        commits: u32,
        /// The next commit fails, as on a full disk.
        disk_full: bool,
        /// The next begin fails.
        cannot_begin: bool,
        rollbacks: Vec<StorageFailure>,
    }

    impl Batched for Log {
        fn begin(&mut self) -> Result<(), StorageFailure> {
            assert!(!self.open);
            if std::mem::take(&mut self.cannot_begin) {
                return Err(StorageFailure::new(StorageCause::Io, "disk I/O error"));
            }
            self.open = true;
            Ok(())
        }
        fn commit(&mut self) -> Result<(), StorageFailure> {
            if std::mem::take(&mut self.disk_full) {
                return Err(StorageFailure::new(StorageCause::DiskFull, "database or disk is full"));
            }
            self.open = false;
            self.commits += 1;
            Ok(())
        }
        fn rollback(&mut self, failure: &StorageFailure) {
            self.open = false;
            self.rollbacks.push(failure.clone());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_batch_answers_its_cause_and_the_next_one_commits() {
        let gc = GroupCommit::start("test", Log::default()).expect("start");
        let failed = gc
            .run(|log: &mut Log| {
                log.applied.push(1);
                log.disk_full = true;
            })
            .await;
        match failed {
            Err(GroupCommitError::Commit(f)) => assert_eq!(f.cause, StorageCause::DiskFull),
            other => panic!("a failed commit must not answer success: {other:?}"),
        }
        // Space is back: the same thread commits the next batch.
        gc.run(|log: &mut Log| log.applied.push(2)).await.expect("the next batch commits");
        gc.run(|log: &mut Log| log.cannot_begin = true).await.expect("ran");
        let early = gc.run_before_commit(|log: &mut Log| log.applied.push(3)).await;
        assert!(
            matches!(&early, Err(GroupCommitError::Commit(f)) if f.cause == StorageCause::Io),
            "an operation whose batch cannot begin does not run: {early:?}"
        );
        let (applied, rollbacks) =
            gc.run(|log: &mut Log| (log.applied.clone(), log.rollbacks.len())).await.expect("ran");
        assert_eq!(applied, vec![1, 2], "3 never ran");
        assert_eq!(rollbacks, 2);
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
