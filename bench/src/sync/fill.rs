//! Filling the recipients' lists (step 2 of [`super`]) and waiting for the
//! outbox relay to settle (step 3).
//!
//! Invariants:
//!
//! * Jobs `0..total` come from one shared counter ([`Fill::take`]), each
//!   taken once: job `g` is message `g / devices` for recipient
//!   `g % devices`, with `client_msg_id` `<run>-<d>-<k>`, so consecutive
//!   jobs go to different recipients (so to different shards).
//! * A retry resends the same job with the same `client_msg_id`
//!   (idempotent), so every job is acknowledged exactly once however often
//!   it is retried; a non-retryable error fails the fill.
//! * At most `inflight` sends per sender are unanswered: over gRPC that
//!   many workers with one call each; over the gateway a semaphore's
//!   permits, and a retry queue of the same bound.
//! * Every wait is bounded: gRPC calls and gateway writes have timeouts,
//!   and the fill and the settle fail after `stall` without progress; the
//!   fill's workers are stopped on every exit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use rim_proto::error::{code_from_number, code_of_status};
use rim_proto::ids::UserId;
use rim_proto::v1::message_service_client::MessageServiceClient;
use rim_proto::v1::{Command, ContentType, ConversationKind, SendInput, SyncInput};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tonic::transport::Channel;

use super::REQUEST_TIMEOUT;
use crate::accounts::{Api, Cred};
use crate::progress::{Progress, Tally, code_name};
use crate::wire::{self, Reader};

/// The fill's shared state: jobs `0..total`, job `g` being message
/// `g / devices` for recipient `g % devices`.
pub(super) struct Fill {
    pub(super) epoch: Instant,
    devices: u64,
    pub(super) total: u64,
    prefix: String,
    size: usize,
    recipients: Vec<u64>,
    /// Next job to take.
    next: AtomicU64,
    pub(super) acked: AtomicU64,
    pub(super) retries: AtomicU64,
    /// µs since `epoch` of the newest acknowledgement.
    last_ack_us: AtomicU64,
    pub(super) errors: Tally,
}

impl Fill {
    /// A fill of `total` jobs over `devices` recipients (`recipients`, by
    /// user id), none taken yet; `epoch` is now.
    pub(super) fn new(devices: u64, total: u64, prefix: String, size: usize, recipients: Vec<u64>) -> Fill {
        Fill {
            epoch: Instant::now(),
            devices,
            total,
            prefix,
            size,
            recipients,
            next: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            last_ack_us: AtomicU64::new(0),
            errors: Tally::default(),
        }
    }

    fn take(&self) -> Option<u64> {
        let g = self.next.fetch_add(1, Ordering::Relaxed);
        (g < self.total).then_some(g)
    }

    /// Recipient, client_msg_id and text of job `g`.
    fn job(&self, g: u64) -> (u64, String, Vec<u8>) {
        let (d, k) = (g % self.devices, g / self.devices);
        let mut text = format!("sync {k} ").into_bytes();
        text.resize(self.size.max(text.len()), b'x');
        (self.recipients[d as usize], client_msg_id(&self.prefix, d, k), text)
    }

    fn acked_one(&self) {
        self.acked.fetch_add(1, Ordering::Relaxed);
        let now = self.epoch.elapsed().as_micros() as u64;
        self.last_ack_us.fetch_max(now, Ordering::Relaxed);
    }
}

/// The idempotency key of message `k` to recipient `d`.
fn client_msg_id(prefix: &str, d: u64, k: u64) -> String {
    format!("{prefix}-{d}-{k}")
}

/// Waits until every send is acknowledged; fails on a worker's error or
/// after `stall` without an acknowledgement. Stops the workers either way.
pub(super) async fn wait_fill(
    fill: &Fill,
    mut workers: JoinSet<anyhow::Result<()>>,
    stall: Duration,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let r = loop {
        if fill.acked.load(Ordering::Relaxed) >= fill.total {
            break Ok(());
        }
        tokio::select! {
            r = workers.join_next(), if !workers.is_empty() => match r {
                Some(Ok(Err(e))) => break Err(e.context("filling the lists")),
                Some(Err(e)) => break Err(anyhow!("a fill task failed: {e}")),
                Some(Ok(Ok(()))) | None => {}
            },
            _ = tick.tick() => {
                let idle_us = (fill.epoch.elapsed().as_micros() as u64)
                    .saturating_sub(fill.last_ack_us.load(Ordering::Relaxed));
                if idle_us > stall.as_micros() as u64 {
                    break Err(anyhow!(
                        "fill stalled: no send acknowledged for {stall:?} ({}/{} acked, errors {})",
                        fill.acked.load(Ordering::Relaxed),
                        fill.total,
                        fill.errors.total()
                    ));
                }
            }
        }
    };
    workers.abort_all();
    while tokio::time::timeout(Duration::from_secs(5), workers.join_next()).await.is_ok_and(|r| r.is_some()) {
    }
    r
}

/// `inflight` gRPC workers per sender, each sending one job at a time.
pub(super) fn fill_grpc(
    fill: &Arc<Fill>,
    api: &Arc<Api>,
    senders: &[Cred],
    inflight: usize,
) -> JoinSet<anyhow::Result<()>> {
    let mut set = JoinSet::new();
    for s in senders {
        for _ in 0..inflight {
            set.spawn(grpc_worker(fill.clone(), MessageServiceClient::new(api.channel()), s.clone()));
        }
    }
    set
}

async fn grpc_worker(
    fill: Arc<Fill>,
    mut client: MessageServiceClient<Channel>,
    sender: Cred,
) -> anyhow::Result<()> {
    let token: tonic::metadata::MetadataValue<_> =
        sender.token.parse().context("token is not valid metadata")?;
    while let Some(g) = fill.take() {
        let (to, id, text) = fill.job(g);
        let input = SendInput {
            conversation_kind: ConversationKind::User as i32,
            conversation_id: to,
            client_msg_id: id,
            content_type: ContentType::Text as i32,
            content: text.into(),
            ..Default::default()
        };
        let mut backoff = Duration::from_millis(20);
        loop {
            let mut req = tonic::Request::new(input.clone());
            req.set_timeout(Duration::from_secs(10));
            let md = req.metadata_mut();
            md.insert(rim_proto::metadata::USER_ID_METADATA_KEY, sender.user.0.into());
            md.insert(rim_proto::metadata::DEVICE_ID_METADATA_KEY, sender.device.0.into());
            md.insert(rim_proto::metadata::TOKEN_METADATA_KEY, token.clone());
            match client.send_message(req).await {
                Ok(_) => {
                    fill.acked_one();
                    break;
                }
                Err(s) => {
                    let code = code_of_status(&s);
                    fill.errors.add(format!("send: {}", code.as_str_name()));
                    if !code.is_retryable() {
                        bail!("send to user {to}: {} ({})", code.as_str_name(), s.message());
                    }
                    fill.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
    Ok(())
}

/// One signed-in gateway connection per sender, with a writer task (at
/// most `inflight` unanswered sends, a semaphore's permits) and a reader
/// task (replies; retryable failures go back to the writer).
pub(super) async fn fill_gateway(
    fill: &Arc<Fill>,
    gateway: std::net::SocketAddr,
    senders: &[Cred],
    inflight: usize,
) -> anyhow::Result<JoinSet<anyhow::Result<()>>> {
    let conns = wire::connect_all(gateway, senders).await?;
    let mut set = JoinSet::new();
    for c in conns {
        let (rd, wr) = c.stream.into_split();
        let sem = Arc::new(Semaphore::new(inflight));
        // At most `inflight` sends are out, so at most that many retries wait.
        let (retry_tx, retry_rx) = mpsc::channel(inflight);
        set.spawn(gateway_writer(wr, fill.clone(), sem.clone(), retry_rx));
        set.spawn(gateway_reader(rd, c.reader, fill.clone(), sem, retry_tx));
    }
    Ok(set)
}

/// Writes `SEND`s (request id = job + 1): retries first, then new jobs
/// while a permit is free. Runs until aborted.
async fn gateway_writer(
    mut wr: OwnedWriteHalf,
    fill: Arc<Fill>,
    sem: Arc<Semaphore>,
    mut retries: mpsc::Receiver<(u64, Instant)>,
) -> anyhow::Result<()> {
    let mut exhausted = false;
    loop {
        let g = tokio::select! {
            biased;
            Some((g, at)) = retries.recv() => {
                tokio::time::sleep_until(at.into()).await;
                g
            }
            p = sem.clone().acquire_owned(), if !exhausted => {
                let permit = p.context("semaphore closed")?;
                match fill.take() {
                    Some(g) => {
                        permit.forget(); // given back by the reader
                        g
                    }
                    None => {
                        exhausted = true;
                        continue;
                    }
                }
            }
            else => return Ok(()),
        };
        let (to, id, text) = fill.job(g);
        let frame = wire::request_frame(g + 1, Command::Send, &wire::send_input(UserId(to), &id, &text));
        tokio::time::timeout(REQUEST_TIMEOUT, wr.write_all(&frame))
            .await
            .context("fill connection: write timed out")?
            .context("fill connection: write failed")?;
    }
}

/// Reads `SEND` replies; ignores the pushes of the sender's own messages.
async fn gateway_reader(
    mut rd: OwnedReadHalf,
    mut reader: Reader,
    fill: Arc<Fill>,
    sem: Arc<Semaphore>,
    retries: mpsc::Sender<(u64, Instant)>,
) -> anyhow::Result<()> {
    loop {
        let p = reader.next(&mut rd).await?.context("fill connection closed by the gateway")?;
        if p.command == Command::Kick as i32 {
            bail!("fill connection kicked: {}", code_name(wire::kick_code(&p.content)));
        }
        if p.command != Command::Send as i32 || p.request_id == 0 {
            continue;
        }
        let r = wire::reply(&p.content)?;
        if r.code == 0 {
            fill.acked_one();
            sem.add_permits(1);
            continue;
        }
        fill.errors.add(format!("send: {}", code_name(r.code)));
        if !code_from_number(r.code).is_retryable() {
            bail!("send: {} ({})", code_name(r.code), r.message);
        }
        fill.retries.fetch_add(1, Ordering::Relaxed);
        let at = Instant::now() + Duration::from_millis(100);
        retries.try_send((p.request_id - 1, at)).map_err(|_| anyhow!("fill retry queue full"))?;
    }
}

/// Waits until every recipient's list holds `x` entries (asking each with
/// a one-entry gRPC `Sync` as its own device, which moves no cursor);
/// fails after `stall` without any list growing.
pub(super) async fn settle(api: &Api, recipients: &[Cred], x: u64, stall: Duration) -> anyhow::Result<()> {
    let heads: Arc<Vec<AtomicU64>> = Arc::new(recipients.iter().map(|_| AtomicU64::new(0)).collect());
    let progress = {
        let heads = heads.clone();
        let n = recipients.len();
        Progress::start("settle", move |_| {
            let full = heads.iter().filter(|h| h.load(Ordering::Relaxed) >= x).count();
            format!("{full}/{n} lists hold all {x} messages")
        })
    };
    let mut grew = Instant::now();
    let r = loop {
        let mut pending = 0;
        let mut failure = None;
        for (c, head) in recipients.iter().zip(heads.iter()) {
            if head.load(Ordering::Relaxed) >= x {
                continue;
            }
            match list_head(api, c, x).await {
                Ok(h) => {
                    if h > head.load(Ordering::Relaxed) {
                        grew = Instant::now();
                    }
                    head.fetch_max(h, Ordering::Relaxed);
                    if h < x {
                        pending += 1;
                    }
                }
                Err(s) => {
                    let code = code_of_status(&s);
                    if !code.is_retryable() {
                        failure = Some(anyhow!(
                            "Sync of user {}: {} ({})",
                            c.user,
                            code.as_str_name(),
                            s.message()
                        ));
                        break;
                    }
                    pending += 1;
                }
            }
        }
        if let Some(e) = failure {
            break Err(e);
        }
        if pending == 0 {
            break Ok(());
        }
        if grew.elapsed() > stall {
            break Err(anyhow!("{pending} lists still short of {x} entries after {stall:?} without growth"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    progress.finish().await;
    r
}

/// The head (`last_seq`) of `c`'s list.
async fn list_head(api: &Api, c: &Cred, after: u64) -> Result<u64, tonic::Status> {
    let mut req = tonic::Request::new(SyncInput { after_seq: after, limit: 1 });
    req.set_timeout(Duration::from_secs(10));
    let md = req.metadata_mut();
    md.insert(rim_proto::metadata::USER_ID_METADATA_KEY, c.user.0.into());
    md.insert(rim_proto::metadata::DEVICE_ID_METADATA_KEY, c.device.0.into());
    md.insert(
        rim_proto::metadata::TOKEN_METADATA_KEY,
        c.token.parse().map_err(|_| tonic::Status::internal("bad token"))?,
    );
    let out = MessageServiceClient::new(api.channel()).sync(req).await?.into_inner();
    Ok(out.last_seq)
}
