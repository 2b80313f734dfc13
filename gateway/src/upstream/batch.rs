//! Batching of the `Send` calls towards one node into `SendBatch` RPCs.
//!
//! Every client `SEND` used to cost one unary gRPC call to a node, and the
//! per-RPC work (HTTP/2 framing, tonic and tower layers, a task on each
//! side) was a large share of the CPU a message costs on the gateway and on
//! the shard leader. The node already group-commits proposals; this module
//! does the same one hop earlier: the sends waiting for one node leave in
//! one `GatewayService.SendBatch` RPC.
//!
//! # Design
//!
//! * One batcher per node address, created on the first send to that
//!   address and kept next to the upstream's channels (it uses the same
//!   cached [`Channel`]). [`Upstream::attempt`](super::Upstream) hands it a
//!   `ConnSendRequest` and awaits the item's own outcome, converted back
//!   into exactly the `tonic::Status` the unary `Send` would have returned
//!   (`rim-code`, message, `rim-leader`), so the retry and leader-following
//!   logic around it is the same for both.
//! * A batcher is a bounded queue ([`QUEUE`] items) and one task. The task
//!   takes the first waiting item, waits for one of [`IN_FLIGHT`] RPC slots,
//!   then takes whatever else is waiting, up to [`MAX_ITEMS`] items and
//!   [`MAX_BYTES`] of encoded requests, and sends that batch. There is no
//!   linger timer: a lone send leaves at once; under load, the items that
//!   arrive while the slots are busy form the next batch (group commit).
//! * The batch RPC has the gateway's request timeout. A whole-RPC failure
//!   (transport error, timeout, a refusal of the whole batch) gives every
//!   item of the batch that status; each item's caller then does what it
//!   would have done with a failed unary call.
//! * The price: a batch is answered when its slowest item is. An item that
//!   waits on a shard without a leader (a failover) holds back the answers
//!   of the items that shared its RPC; their attempts may time out and be
//!   retried elsewhere with the same `client_msg_id` (sends are idempotent),
//!   which costs latency during failovers, never a duplicate or a loss.
//!
//! # Invariants
//!
//! * Never blocks a caller indefinitely and never drops an item: a full
//!   queue, or a batcher whose task is gone, sends that item with the unary
//!   `Send` instead ([`Submit::Unary`]); every queued item gets exactly one
//!   outcome, unless its caller stopped waiting first (its attempt timed
//!   out: such items are left out of the batch, the caller has moved on).
//! * A node that answers `UNIMPLEMENTED` without a `rim-code` (it predates
//!   `SendBatch`: a rolling upgrade) is remembered: its batch's items and
//!   every send to that address for [`RECHECK_UNSUPPORTED`] go unary
//!   ([`Outcome::Unary`]), after which batching is tried again (the node
//!   may have been upgraded in place).
//! * The batcher's task holds no reference to the [`Upstream`](super::Upstream):
//!   when the upstream is dropped the queue's sender goes with it, the task
//!   finishes what is queued and ends.
//! * Every wait is bounded: the queue by [`QUEUE`], a slot by the RPCs in
//!   flight, each RPC by the request timeout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use rim_proto::ErrorCode;
use rim_proto::metadata::CLUSTER_SECRET_METADATA_KEY;
use rim_proto::v1::gateway_service_client::GatewayServiceClient;
use rim_proto::v1::{ConnSendBatchRequest, ConnSendRequest, ConnSendResult, SendOutput};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

/// Sends queued per node address; beyond that a send goes unary.
pub const QUEUE: usize = 8_192;
/// Most items in one batch (the node takes up to 1,024).
pub const MAX_ITEMS: usize = 256;
/// Most encoded request bytes in one batch (the node's gRPC limit is
/// 4 MiB); a larger single item still goes, alone.
pub const MAX_BYTES: usize = 1 << 20;
/// Batch RPCs in flight per node address.
pub const IN_FLIGHT: usize = 4;
/// How long a node that does not know `SendBatch` is sent unary `Send`s
/// before batching is tried again.
pub const RECHECK_UNSUPPORTED: Duration = Duration::from_secs(60);

/// Batching counters of one upstream (for `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendBatchStats {
    /// `SendBatch` RPCs sent.
    pub batches: u64,
    /// Sends carried by them.
    pub items: u64,
    /// Sends that went as a unary `Send` instead: the queue was full, or
    /// the node does not know `SendBatch`.
    pub unbatched: u64,
}

#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    items: AtomicU64,
    unbatched: AtomicU64,
}

/// What becomes of one queued send.
#[derive(Debug)]
pub enum Outcome {
    /// The node's answer for this item, as the unary `Send` would have
    /// returned it.
    Done(Result<SendOutput, tonic::Status>),
    /// The node does not know `SendBatch`: send this item unary.
    Unary,
}

/// The answer to [`Batchers::submit`].
#[derive(Debug)]
pub enum Submit {
    /// Queued: the outcome comes on this receiver (its sender is dropped
    /// without an outcome only if the runtime is shutting down).
    Queued(oneshot::Receiver<Outcome>),
    /// Not queued: send it with the unary `Send`.
    Unary,
}

/// One queued send.
struct Item {
    request: ConnSendRequest,
    /// Encoded size of `request`.
    bytes: usize,
    reply: oneshot::Sender<Outcome>,
}

/// The batcher of one node address.
#[derive(Debug)]
struct Batcher {
    tx: mpsc::Sender<Item>,
    /// Until when the node is sent unary `Send`s: set when it answered
    /// `UNIMPLEMENTED` (milliseconds since `epoch`; 0: batch).
    unsupported_until: Arc<AtomicU64>,
}

/// What a batcher's task needs to send batches.
#[derive(Clone)]
struct Link {
    addr: String,
    channel: Channel,
    secret: MetadataValue<Ascii>,
    timeout: Duration,
    counters: Arc<Counters>,
    unsupported_until: Arc<AtomicU64>,
    epoch: Instant,
}

/// The batchers of one upstream, by node address.
#[derive(Debug)]
pub struct Batchers {
    by_addr: Mutex<HashMap<String, Arc<Batcher>>>,
    counters: Arc<Counters>,
    secret: MetadataValue<Ascii>,
    timeout: Duration,
    /// Time origin of `unsupported_until`.
    epoch: Instant,
}

impl Batchers {
    /// No batchers yet; batch RPCs will carry `secret` and time out after
    /// `timeout`.
    pub fn new(secret: MetadataValue<Ascii>, timeout: Duration) -> Batchers {
        Batchers {
            by_addr: Mutex::new(HashMap::new()),
            counters: Arc::default(),
            secret,
            timeout,
            epoch: Instant::now(),
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> SendBatchStats {
        SendBatchStats {
            batches: self.counters.batches.load(Ordering::Relaxed),
            items: self.counters.items.load(Ordering::Relaxed),
            unbatched: self.counters.unbatched.load(Ordering::Relaxed),
        }
    }

    /// Counts a send that went unary because the caller was told so.
    pub fn note_unbatched(&self) {
        self.counters.unbatched.fetch_add(1, Ordering::Relaxed);
    }

    /// Queues `request` for the node at `addr` (reached over `channel`),
    /// starting that address's batcher if needed. Must run on a tokio
    /// runtime. Never waits.
    pub fn submit(&self, addr: &str, channel: &Channel, request: ConnSendRequest) -> Submit {
        let batcher = self.batcher(addr, channel, false);
        if self.unsupported(&batcher) {
            self.note_unbatched();
            return Submit::Unary;
        }
        let bytes = request.encoded_len();
        let (reply, rx) = oneshot::channel();
        let item = Item { request, bytes, reply };
        match batcher.tx.try_send(item) {
            Ok(()) => Submit::Queued(rx),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.note_unbatched();
                Submit::Unary
            }
            Err(mpsc::error::TrySendError::Closed(item)) => {
                // The task is gone (its runtime shut down): start a new one.
                let batcher = self.batcher(addr, channel, true);
                match batcher.tx.try_send(item) {
                    Ok(()) => Submit::Queued(rx),
                    Err(_) => {
                        self.note_unbatched();
                        Submit::Unary
                    }
                }
            }
        }
    }

    fn unsupported(&self, batcher: &Batcher) -> bool {
        unsupported(&batcher.unsupported_until, self.epoch)
    }

    /// The batcher of `addr`; a new one if there is none or `replace`.
    fn batcher(&self, addr: &str, channel: &Channel, replace: bool) -> Arc<Batcher> {
        let mut by_addr = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        if !replace && let Some(b) = by_addr.get(addr) {
            return b.clone();
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let unsupported_until = by_addr
            .get(addr)
            .map(|b| b.unsupported_until.clone())
            .unwrap_or_else(|| Arc::new(AtomicU64::new(0)));
        let link = Link {
            addr: addr.to_string(),
            channel: channel.clone(),
            secret: self.secret.clone(),
            timeout: self.timeout,
            counters: self.counters.clone(),
            unsupported_until: unsupported_until.clone(),
            epoch: self.epoch,
        };
        tokio::spawn(run(rx, link));
        let b = Arc::new(Batcher { tx, unsupported_until });
        by_addr.insert(addr.to_string(), b.clone());
        b
    }
}

impl Link {
    /// Whether the node is being sent unary `Send`s (it refused a batch
    /// less than [`RECHECK_UNSUPPORTED`] ago).
    fn unsupported(&self) -> bool {
        unsupported(&self.unsupported_until, self.epoch)
    }
}

/// Whether `until` (see [`Batcher::unsupported_until`]) is still ahead.
fn unsupported(until: &AtomicU64, epoch: Instant) -> bool {
    let until = until.load(Ordering::Relaxed);
    until != 0 && millis_since(epoch) < until
}

/// Milliseconds from `epoch` to now, at least 1.
fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX).max(1)
}

/// A batcher's task: forms batches and sends them, at most [`IN_FLIGHT`]
/// at once, until the queue's sender is gone and the queue is empty.
async fn run(mut rx: mpsc::Receiver<Item>, link: Link) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut carried: Option<Item> = None;
    loop {
        let first = match carried.take() {
            Some(item) => item,
            None => match rx.recv().await {
                Some(item) => item,
                None => return,
            },
        };
        // While every slot is busy, later items wait in the queue and go
        // together in the next batch. The semaphore is never closed.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < MAX_ITEMS {
            let Ok(item) = rx.try_recv() else { break };
            if bytes + item.bytes > MAX_BYTES {
                carried = Some(item);
                break;
            }
            bytes += item.bytes;
            batch.push(item);
        }
        // A caller whose attempt timed out has moved on (and may retry
        // elsewhere with the same client_msg_id): do not send its item.
        batch.retain(|item| !item.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        if link.unsupported() {
            // Queued before the node refused a batch: unary, like the rest.
            link.counters.unbatched.fetch_add(batch.len() as u64, Ordering::Relaxed);
            for item in batch {
                let _ = item.reply.send(Outcome::Unary);
            }
            continue;
        }
        let link = link.clone();
        tokio::spawn(async move {
            send(batch, &link).await;
            drop(slot);
        });
    }
}

/// Sends one batch and hands every item its outcome.
async fn send(batch: Vec<Item>, link: &Link) {
    let (requests, replies): (Vec<ConnSendRequest>, Vec<oneshot::Sender<Outcome>>) =
        batch.into_iter().map(|item| (item.request, item.reply)).unzip();
    let n = requests.len();
    link.counters.batches.fetch_add(1, Ordering::Relaxed);
    link.counters.items.fetch_add(n as u64, Ordering::Relaxed);
    let mut request = tonic::Request::new(ConnSendBatchRequest { items: requests });
    request.metadata_mut().insert(CLUSTER_SECRET_METADATA_KEY, link.secret.clone());
    request.set_timeout(link.timeout);
    let mut client = GatewayServiceClient::new(link.channel.clone());
    let answer = tokio::time::timeout(link.timeout, client.send_batch(request)).await;
    let status = match answer {
        Ok(Ok(reply)) => {
            let results = reply.into_inner().results;
            if results.len() == n {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(Outcome::Done(outcome(result)));
                }
                return;
            }
            let message =
                format!("{}: SendBatch answered {} results for {n} items", link.addr, results.len());
            rim_proto::error::status(ErrorCode::ErrorInternal, message)
        }
        Ok(Err(status)) if is_unimplemented(&status) => {
            tracing::info!(node = %link.addr, "node does not know SendBatch; sending unary Sends to it");
            let until = millis_since(link.epoch).saturating_add(RECHECK_UNSUPPORTED.as_millis() as u64);
            link.unsupported_until.store(until, Ordering::Relaxed);
            link.counters.unbatched.fetch_add(n as u64, Ordering::Relaxed);
            for reply in replies {
                let _ = reply.send(Outcome::Unary);
            }
            return;
        }
        Ok(Err(status)) => status,
        // No rim-code: read as our own deadline, like a unary call's.
        Err(_) => tonic::Status::deadline_exceeded(format!("{}: SendBatch got no answer in time", link.addr)),
    };
    tracing::debug!(node = %link.addr, items = n, error = %status, "SendBatch failed as a whole");
    for reply in replies {
        let _ = reply.send(Outcome::Done(Err(status.clone())));
    }
}

/// tonic's answer for a method the server does not have (no `rim-code`: a
/// node's own `ERROR_UNKNOWN_COMMAND` is a different thing).
fn is_unimplemented(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unimplemented
        && status.metadata().get(rim_proto::error::CODE_METADATA_KEY).is_none()
}

/// One item's result as the unary `Send` would have returned it.
pub fn outcome(r: ConnSendResult) -> Result<SendOutput, tonic::Status> {
    if r.code == ErrorCode::Ok as i32 {
        return r.output.ok_or_else(|| {
            rim_proto::error::status(ErrorCode::ErrorInternal, "SendBatch result without an output")
        });
    }
    let code = rim_proto::error::code_from_number(r.code);
    if r.leader_addr.is_empty() {
        Err(rim_proto::error::status_with_retry_after(code, r.message, r.retry_after_ms))
    } else {
        Err(rim_proto::error::status_with_leader(code, r.message, &r.leader_addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_become_the_statuses_of_unary_sends() {
        let ok = ConnSendResult {
            output: Some(SendOutput { seq: 7, message_id: 9, send_time_ms: 1, group_seq: 0 }),
            ..Default::default()
        };
        assert_eq!(outcome(ok).unwrap().seq, 7);

        let moved = ConnSendResult {
            code: ErrorCode::ErrorNotLeader as i32,
            message: "moved".into(),
            leader_addr: "10.0.0.2:7001".into(),
            ..Default::default()
        };
        let s = outcome(moved).unwrap_err();
        let unary = rim_proto::error::status_with_leader(ErrorCode::ErrorNotLeader, "moved", "10.0.0.2:7001");
        assert_eq!((s.code(), s.message()), (unary.code(), unary.message()));
        assert_eq!(rim_proto::error::code_of_status(&s), ErrorCode::ErrorNotLeader);
        assert_eq!(rim_proto::error::leader_of_status(&s), Some("10.0.0.2:7001"));

        let missing = ConnSendResult { code: ErrorCode::ErrorUserNotFound as i32, ..Default::default() };
        let s = outcome(missing).unwrap_err();
        assert_eq!(rim_proto::error::code_of_status(&s), ErrorCode::ErrorUserNotFound);
        assert_eq!(rim_proto::error::leader_of_status(&s), None);

        let limited = ConnSendResult {
            code: ErrorCode::ErrorRateLimited as i32,
            retry_after_ms: 750,
            ..Default::default()
        };
        let s = outcome(limited).unwrap_err();
        assert_eq!(rim_proto::error::code_of_status(&s), ErrorCode::ErrorRateLimited);
        assert_eq!(rim_proto::error::retry_after_of_status(&s), 750);
        assert_eq!(crate::upstream::status_error(&s).retry_after_ms, 750, "reaches Reply.retry_after_ms");

        // A code from a newer node maps by class, like Reply.code.
        let newer = ConnSendResult { code: 1999, ..Default::default() };
        assert_eq!(
            rim_proto::error::code_of_status(&outcome(newer).unwrap_err()),
            ErrorCode::ErrorUnavailable
        );

        // OK without an output is a node bug, not a success.
        let empty = ConnSendResult::default();
        assert_eq!(rim_proto::error::code_of_status(&outcome(empty).unwrap_err()), ErrorCode::ErrorInternal);
    }

    #[test]
    fn only_an_unknown_method_is_unimplemented() {
        assert!(is_unimplemented(&tonic::Status::unimplemented("no such method")));
        let ours = rim_proto::error::status(ErrorCode::ErrorUnknownCommand, "no");
        assert_eq!(ours.code(), tonic::Code::Unimplemented);
        assert!(!is_unimplemented(&ours));
    }

    /// A node address nothing listens on: the batch RPC fails as a whole
    /// and every item gets that failure, none is lost or answered twice.
    #[tokio::test]
    async fn a_failed_batch_fails_each_item_once() {
        let addr = rim_testkit::free_addr_string();
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_millis(200))
            .connect_lazy();
        let batchers = Batchers::new("secret".parse().unwrap(), Duration::from_secs(2));
        let mut waiting = Vec::new();
        for i in 0..40 {
            let req = ConnSendRequest { group: i % 2 == 0, ..Default::default() };
            match batchers.submit(&addr, &channel, req) {
                Submit::Queued(rx) => waiting.push(rx),
                Submit::Unary => panic!("an empty queue refused item {i}"),
            }
        }
        for rx in waiting {
            let outcome = tokio::time::timeout(Duration::from_secs(10), rx).await.unwrap().unwrap();
            match outcome {
                Outcome::Done(Err(s)) => {
                    assert!(rim_proto::error::code_of_status(&s).is_retryable(), "{s:?}")
                }
                other => panic!("expected a transport failure, got {other:?}"),
            }
        }
        let stats = batchers.stats();
        assert_eq!(stats.items, 40);
        assert!(stats.batches >= 1 && stats.batches <= 40, "{stats:?}");
    }
}
