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
/// A reply sent before the batch commits ([`GroupCommit::run_before_commit`]).
type Early = Box<dyn FnOnce() + Send>;
/// An operation: run on the store (`Some`), or not run because its batch
/// could not begin (`None`); either way it returns how to answer, and may
/// leave a reply to send before the commit.
type Job<S> = Box<dyn FnOnce(Option<&mut S>, &mut Vec<Early>) -> Finish + Send>;

/// Early replies sent on as one delivery once this many have gathered,
/// rather than holding them all until the batch's last operation has run.
const EARLY_MAX: usize = 64;

/// The handle operations are queued through.
pub struct GroupCommit<S> {
    queue: mpsc::SyncSender<Job<S>>,
}

/// Replies, handed from the store's thread to the async runtime in one
/// piece.
enum Delivery {
    Early(Vec<Early>),
    Done(Vec<Finish>, Result<(), StorageFailure>),
}

impl Delivery {
    fn send(self) {
        match self {
            Delivery::Early(replies) => replies.into_iter().for_each(|reply| reply()),
            Delivery::Done(finishes, committed) => {
                for finish in finishes {
                    finish(committed.clone());
                }
            }
        }
    }
}

/// Carries a batch's replies to the runtime the store was started in, as
/// one message, where a task sends them on. Each reply sent from the
/// store's thread itself would wake its waiting task from outside the
/// runtime, and every such wake is a system call (an `eventfd` write):
/// about one and a half per payment at the gateway, measured. The
/// courier's task wakes at most once per delivery (not at all while it is
/// still busy with the previous one), and the replies it sends wake their
/// tasks from inside the runtime, without a system call. Without a runtime
/// (or once it is gone) the store's thread sends the replies itself.
struct Courier(Option<tokio::sync::mpsc::UnboundedSender<Delivery>>);

impl Courier {
    fn start() -> Courier {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Courier(None);
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Delivery>();
        runtime.spawn(async move {
            while let Some(delivery) = rx.recv().await {
                delivery.send();
            }
        });
        Courier(Some(tx))
    }

    fn deliver(&self, delivery: Delivery) {
        match &self.0 {
            Some(tx) => {
                if let Err(tokio::sync::mpsc::error::SendError(delivery)) = tx.send(delivery) {
                    delivery.send();
                }
            }
            None => delivery.send(),
        }
    }
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
        let courier = Courier::start();
        std::thread::Builder::new().name(format!("{name}-store")).spawn(move || {
            let name = name_owned;
            while let Ok(first) = rx.recv() {
                let started = std::time::Instant::now();
                let mut finishes: Vec<Finish> = Vec::new();
                let mut early: Vec<Early> = Vec::new();
                let committed = match store.begin() {
                    Ok(()) => {
                        let mut next = Some(first);
                        while let Some(job) = next.take() {
                            finishes.push(job(Some(&mut store), &mut early));
                            if early.len() >= EARLY_MAX {
                                courier.deliver(Delivery::Early(std::mem::take(&mut early)));
                            }
                            if finishes.len() < BATCH_MAX {
                                next = rx.try_recv().ok();
                            }
                        }
                        if !early.is_empty() {
                            courier.deliver(Delivery::Early(std::mem::take(&mut early)));
                        }
                        store.commit()
                    }
                    // No transaction: run nothing (outside one, each write
                    // would commit alone), fail this job.
                    Err(failure) => {
                        finishes.push(first(None, &mut early));
                        Err(failure)
                    }
                };
                if let Err(failure) = &committed {
                    storage::report(&name, failure);
                    store.rollback(failure);
                }
                crate::metrics::STORE.commit_seconds.observe(started.elapsed().as_secs_f64());
                crate::metrics::STORE.batch_size.observe(finishes.len() as f64);
                courier.deliver(Delivery::Done(finishes, committed));
            }
        })?;
        Ok(GroupCommit { queue: tx })
    }

    /// Runs `op` in the next batch and answers before the batch is durable:
    /// once the batch's operations have run (or [`EARLY_MAX`] such answers
    /// have gathered), together, just before its commit. Only for writes
    /// whose loss in a crash is safe (the gateway's `preparing` record:
    /// under presumed abort, no record means abort). Later operations still see it, and it becomes durable
    /// with its batch, before any later batch. If that batch then fails,
    /// the store hears of it ([`Batched::rollback`]) and must answer later
    /// operations on what was lost accordingly.
    pub async fn run_before_commit<T, F>(&self, op: F) -> Result<T, GroupCommitError>
    where
        T: Send + 'static,
        F: FnOnce(&mut S) -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job<S> = Box::new(move |store: Option<&mut S>, early: &mut Vec<Early>| match store {
            Some(store) => {
                let value = op(store);
                early.push(Box::new(move || {
                    let _ = tx.send(Ok(value));
                }));
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
        let job: Job<S> = Box::new(move |store: Option<&mut S>, _: &mut Vec<Early>| {
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
        let job: Job<S> = Box::new(move |store: Option<&mut S>, _: &mut Vec<Early>| {
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
    use std::time::Duration;

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

    /// A store whose commit waits until the test lets it go.
    struct Gated {
        release: std::sync::mpsc::Receiver<()>,
        commits: u32,
    }

    impl Batched for Gated {
        fn begin(&mut self) -> Result<(), StorageFailure> {
            Ok(())
        }
        fn commit(&mut self) -> Result<(), StorageFailure> {
            self.release.recv().map_err(|_| StorageFailure::new(StorageCause::Other, "test over"))?;
            self.commits += 1;
            Ok(())
        }
        fn rollback(&mut self, _: &StorageFailure) {}
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_early_answer_comes_before_its_batch_commits_and_the_rest_after() {
        let (release, gate) = std::sync::mpsc::channel();
        let gc = GroupCommit::start("test", Gated { release: gate, commits: 0 }).expect("start");
        let early =
            tokio::time::timeout(Duration::from_secs(10), gc.run_before_commit(|s: &mut Gated| s.commits))
                .await
                .expect("answered while its batch's commit is still held")
                .expect("ran");
        assert_eq!(early, 0, "ran inside the first batch");
        let durable = tokio::spawn({
            let gc = gc.clone();
            async move { gc.run(|s: &mut Gated| s.commits).await }
        });
        release.send(()).expect("first commit");
        release.send(()).expect("second commit");
        let value =
            tokio::time::timeout(Duration::from_secs(10), durable).await.expect("answered").expect("task");
        assert_eq!(value.expect("ran"), 1, "ran in the second batch, answered after its commit");
    }

    #[test]
    fn answers_arrive_without_a_runtime_or_once_the_starting_one_is_gone() {
        let answer = |gc: &GroupCommit<Log>| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let run = tokio::time::timeout(Duration::from_secs(10), gc.run(|log: &mut Log| log.commits));
                let early =
                    tokio::time::timeout(Duration::from_secs(10), gc.run_before_commit(|_: &mut Log| 7));
                (run.await.expect("answered").expect("ran"), early.await.expect("answered").expect("ran"))
            })
        };
        // Started outside any runtime: the store's thread answers itself.
        let outside = GroupCommit::start("test", Log::default()).expect("start");
        assert_eq!(answer(&outside), (0, 7));
        // Started in a runtime that has since shut down (its courier with it).
        let first = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let gc = first.block_on(async { GroupCommit::start("test", Log::default()).expect("start") });
        assert_eq!(first.block_on(gc.run(|log: &mut Log| log.commits)).expect("ran"), 0);
        drop(first);
        assert_eq!(answer(&gc).1, 7);
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
