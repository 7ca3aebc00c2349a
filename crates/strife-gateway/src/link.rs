//! Batched calls from the gateway to one bank.
//!
//! Payments do not call a bank one by one: each leg is queued on the bank's
//! link, and the link sends everything queued as one `PrepareBatch` (or
//! `DecideBatch`, or, for one-phase payments, `Transfer`) call. Batching is natural, with no timer: a batch leaves
//! as soon as fewer than [`BATCHES_IN_FLIGHT`] batches are under way, so a
//! lone payment is sent at once, and under load the legs that arrive while
//! earlier batches are out travel together. The bank answers every item
//! separately, in order, and each payment gets its own answer, exactly as
//! from a single call; a failed batch call fails each of its items.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use strife_core::limits::BANK_BATCH_MAX;
use strife_proto::bank::v1 as bank;
use strife_proto::bank::v1::bank_service_client::BankServiceClient;
use strife_rpc::trace::TraceContext;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Batches to one bank under way at once, per kind (prepare, decide or transfer).
pub const BATCHES_IN_FLIGHT: usize = 4;
/// Most items waiting for a batch; callers wait for room beyond it.
const QUEUE_MAX: usize = 8192;

type Reply<R> = oneshot::Sender<Result<R, Status>>;

/// Sends items in batches through `send`, answering each item's caller.
struct Batcher<Q, R> {
    queue: mpsc::Sender<(Q, Reply<R>)>,
}

impl<Q, R> Clone for Batcher<Q, R> {
    fn clone(&self) -> Self {
        Batcher { queue: self.queue.clone() }
    }
}

impl<Q: Send + 'static, R: Send + 'static> Batcher<Q, R> {
    /// Starts the batching task; it ends when every handle is dropped.
    fn start<F, Fut>(send: F) -> Batcher<Q, R>
    where
        F: Fn(Vec<Q>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<R>, Status>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<(Q, Reply<R>)>(QUEUE_MAX);
        let send = Arc::new(send);
        tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
            while let Some(first) = rx.recv().await {
                // While every permit is out, more items queue up behind
                // `first`: they leave together when a batch comes back.
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let mut items = Vec::with_capacity(BANK_BATCH_MAX);
                items.push(first);
                while items.len() < BANK_BATCH_MAX {
                    match rx.try_recv() {
                        Ok(item) => items.push(item),
                        Err(_) => break,
                    }
                }
                let send = send.clone();
                tokio::spawn(async move {
                    let (requests, replies): (Vec<Q>, Vec<Reply<R>>) = items.into_iter().unzip();
                    let asked = requests.len();
                    match send(requests).await {
                        Ok(answers) if answers.len() == asked => {
                            for (reply, answer) in replies.into_iter().zip(answers) {
                                let _ = reply.send(Ok(answer));
                            }
                        }
                        Ok(answers) => {
                            let status = Status::internal(format!(
                                "the bank answered {} items of a batch of {asked}",
                                answers.len()
                            ));
                            for reply in replies {
                                let _ = reply.send(Err(status.clone()));
                            }
                        }
                        Err(status) => {
                            for reply in replies {
                                let _ = reply.send(Err(status.clone()));
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
    async fn call(&self, item: Q) -> Result<R, Status> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send((item, tx))
            .await
            .map_err(|_| Status::unavailable("the link to the bank is closed"))?;
        rx.await.map_err(|_| Status::unavailable("the batch to the bank was dropped"))?
    }
}

/// Notes the size of a batch sent to a bank.
fn observe_batch(call: &'static str, size: usize) {
    let histogram = strife_rpc::metrics::GATEWAY.bank_batch_size.get_or_create(&[("call", call)]);
    histogram.observe(size as f64);
}

/// The batched link to one bank.
#[derive(Clone)]
pub struct BankLink {
    prepares: Batcher<bank::PrepareRequest, bank::PrepareResult>,
    decisions: Batcher<bank::Decision, bank::DecisionResult>,
    /// One-phase transfers (sent only to a replica that serves them).
    transfers: Batcher<bank::Transfer, bank::TransferResult>,
}

impl BankLink {
    /// Starts the link's batching tasks (needs a Tokio runtime). Each batch
    /// call gives up after the timeout of its phase.
    pub fn start(
        client: BankServiceClient<Channel>,
        prepare_timeout: Duration,
        decide_timeout: Duration,
    ) -> BankLink {
        let c = client.clone();
        let prepares = Batcher::start(move |legs: Vec<bank::PrepareRequest>| {
            let mut client = c.clone();
            observe_batch("prepare", legs.len());
            async move {
                let header = lone_trace(&legs, |leg: &bank::PrepareRequest| &leg.traceparent);
                let mut req = tonic::Request::new(bank::PrepareBatchRequest { legs });
                req.set_timeout(prepare_timeout);
                if let Some(trace) = header {
                    trace.inject(&mut req);
                }
                Ok(client.prepare_batch(req).await?.into_inner().results)
            }
        });
        let c = client.clone();
        let transfers = Batcher::start(move |transfers: Vec<bank::Transfer>| {
            let mut client = c.clone();
            observe_batch("transfer", transfers.len());
            async move {
                let header = lone_trace(&transfers, |t: &bank::Transfer| &t.traceparent);
                let mut req = tonic::Request::new(bank::TransferRequest { transfers });
                // One phase is phase one and the decision at once: the
                // prepare's timeout bounds it.
                req.set_timeout(prepare_timeout);
                if let Some(trace) = header {
                    trace.inject(&mut req);
                }
                Ok(client.transfer(req).await?.into_inner().results)
            }
        });
        let decisions = Batcher::start(move |decisions: Vec<bank::Decision>| {
            let mut client = client.clone();
            observe_batch("decide", decisions.len());
            async move {
                let header = lone_trace(&decisions, |d: &bank::Decision| &d.traceparent);
                let mut req = tonic::Request::new(bank::DecideBatchRequest { decisions });
                req.set_timeout(decide_timeout);
                if let Some(trace) = header {
                    trace.inject(&mut req);
                }
                Ok(client.decide_batch(req).await?.into_inner().results)
            }
        });
        BankLink { prepares, decisions, transfers }
    }

    /// One phase for one payment: the bank's decision (durable there), or
    /// the error a single call would have answered (then the outcome is
    /// unknown unless the error says the transfer was refused as a request).
    pub async fn transfer(&self, t: bank::Transfer) -> Result<bank::TransferResult, Status> {
        let result = self.transfers.call(t).await?;
        match (result.refusal.clone(), result.outcome()) {
            (Some(refusal), _) => Err(status_of(refusal)),
            (None, bank::TransferOutcome::Unspecified) => {
                Err(Status::internal("the bank answered a transfer with neither outcome nor error"))
            }
            (None, _) => Ok(result),
        }
    }

    /// Phase one for one leg: the bank's vote, or the error a single
    /// `Prepare` would have answered.
    pub async fn prepare(&self, leg: bank::PrepareRequest) -> Result<bank::PrepareResponse, Status> {
        let result = self.prepares.call(leg).await?;
        match (result.vote, result.refusal) {
            (_, Some(refusal)) => Err(status_of(refusal)),
            (Some(vote), None) => Ok(vote),
            (None, None) => Err(Status::internal("the bank answered a leg with neither vote nor error")),
        }
    }

    /// Phase two for one payment: Ok once the bank has applied it durably.
    /// `traceparent` is the payment's trace context (empty: none).
    pub async fn decide(&self, txn_id: String, commit: bool, traceparent: String) -> Result<(), Status> {
        let result = self.decisions.call(bank::Decision { txn_id, commit, traceparent }).await?;
        match result.refusal {
            None => Ok(()),
            Some(refusal) => Err(status_of(refusal)),
        }
    }
}

/// The trace context a batch call carries in its metadata: its item's,
/// when it holds one item (a lone payment, the usual case when not under
/// load), so that the bank's log line for the call carries the payment's
/// trace id. A batch of several payments' items carries none (the bank
/// starts a trace for the call); each item still carries its own.
fn lone_trace<Q>(items: &[Q], traceparent: impl Fn(&Q) -> &String) -> Option<TraceContext> {
    match items {
        [one] => TraceContext::parse(traceparent(one)),
        _ => None,
    }
}

/// The status a single call would have answered, with its `ErrorInfo`.
fn status_of(refusal: bank::Refusal) -> Status {
    let code = match Code::from_i32(refusal.code) {
        Code::Ok => Code::Unknown,
        code => code,
    };
    match strife_rpc::errors::reason_from_code(&refusal.reason) {
        Some(reason) => strife_rpc::errors::status(code, reason, refusal.message),
        None => Status::new(code, refusal.message),
    }
}
