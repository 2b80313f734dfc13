//! The catch-up (step 4 of [`super`]): one task per device connects to
//! the gateway, signs in, reads its list with `SYNC` one page at a time
//! from its ack cursor, checks every entry, and acks the last seq.
//!
//! Invariants:
//!
//! * The cursor only moves forward: a kept entry has seq > cursor (one
//!   beyond cursor + 1 counts the skipped seqs as gaps); one at or below
//!   it is a repeat and dropped. Each kept entry is counted once, from its
//!   page; a `MESSAGE` push is never counted as received, its seq only
//!   extends how far the device syncs.
//! * Each kept entry's `client_msg_id` sets one bit of the device's
//!   bitmap (one bit per expected message): a bit already set counts as
//!   duplicated, an id that is not one of the run's messages to that user
//!   as foreign.
//! * Every wait (connect, each request, each backoff) is capped by the
//!   phase's deadline ([`Plan::deadline`]); reads are capped at the
//!   protocol's 1 MiB frame.
//! * A device task never fails: its error is recorded in the [`Device`],
//!   which then does not count as complete.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use rim_proto::codec::encoded_frame_len;
use rim_proto::error::code_from_number;
use rim_proto::ids::{DeviceId, UserId};
use rim_proto::v1::{AckInput, AckOutput, Command, Reply, SignInOutput, SyncInput, SyncOutput};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::REQUEST_TIMEOUT;
use crate::accounts::Cred;
use crate::progress::code_name;
use crate::wire::{self, Reader};

/// Longest wait for a TCP connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The protocol's maximum frame: a page of many messages is large.
const SYNC_MAX_FRAME: usize = 1 << 20;

/// What every device's catch-up shares.
pub(super) struct Plan {
    pub(super) gateway: std::net::SocketAddr,
    pub(super) page: u32,
    pub(super) messages: u64,
    pub(super) prefix: String,
    /// Start of the catch-up phase.
    pub(super) epoch: Instant,
    /// End of the catch-up phase: every wait is capped by it.
    pub(super) deadline: Instant,
}

/// Live counters for the progress line.
#[derive(Default)]
pub(super) struct Live {
    pub(super) signed_in: AtomicU64,
    pub(super) done: AtomicU64,
    pub(super) synced: AtomicU64,
}

/// One device's catch-up, as measured.
pub(super) struct Device {
    pub(super) index: usize,
    pub(super) user: UserId,
    pub(super) device: DeviceId,
    /// Since the phase's epoch.
    pub(super) started_us: u64,
    pub(super) done_us: Option<u64>,
    pub(super) connect_us: Option<u64>,
    pub(super) sign_in_us: Option<u64>,
    pub(super) catch_up_us: Option<u64>,
    pub(super) ack_us: Option<u64>,
    pub(super) sign_in_last_seq: u64,
    pub(super) sign_in_ack_seq: u64,
    pub(super) acked_seq: u64,
    pub(super) bytes: u64,
    pub(super) pages: u64,
    pub(super) largest_page: u64,
    pub(super) retries: u64,
    pub(super) pushes: u64,
    /// Entries kept (continuing the cursor or beyond it).
    pub(super) received: u64,
    pub(super) first_seq: u64,
    pub(super) last_seq: u64,
    pub(super) seq_gaps: u64,
    pub(super) seq_repeats: u64,
    pub(super) foreign: u64,
    pub(super) duplicated: u64,
    /// One bit per expected message.
    seen: Vec<u64>,
    pub(super) error: Option<String>,
}

impl Device {
    pub(super) fn new(index: usize, c: &Cred, messages: u64) -> Device {
        Device {
            index,
            user: c.user,
            device: c.device,
            started_us: 0,
            done_us: None,
            connect_us: None,
            sign_in_us: None,
            catch_up_us: None,
            ack_us: None,
            sign_in_last_seq: 0,
            sign_in_ack_seq: 0,
            acked_seq: 0,
            bytes: 0,
            pages: 0,
            largest_page: 0,
            retries: 0,
            pushes: 0,
            received: 0,
            first_seq: 0,
            last_seq: 0,
            seq_gaps: 0,
            seq_repeats: 0,
            foreign: 0,
            duplicated: 0,
            seen: vec![0; messages.div_ceil(64) as usize],
            error: None,
        }
    }

    pub(super) fn distinct(&self) -> u64 {
        self.seen.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub(super) fn complete(&self, messages: u64) -> bool {
        self.error.is_none()
            && self.distinct() == messages
            && self.received == messages
            && self.duplicated == 0
            && self.foreign == 0
            && self.seq_gaps == 0
            && self.seq_repeats == 0
            && self.first_seq == 1
            && self.last_seq == messages
    }

    /// Tallies one entry of a page.
    fn entry(&mut self, cursor: &mut u64, seq: u64, client_msg_id: &str, ours: &str, messages: u64) {
        if seq <= *cursor {
            self.seq_repeats += 1;
            return;
        }
        self.seq_gaps += seq - *cursor - 1;
        *cursor = seq;
        if self.received == 0 {
            self.first_seq = seq;
        }
        self.last_seq = seq;
        self.received += 1;
        let k =
            client_msg_id.strip_prefix(ours).and_then(|k| k.parse::<u64>().ok()).filter(|k| *k < messages);
        match k {
            Some(k) => {
                let (w, b) = ((k / 64) as usize, 1u64 << (k % 64));
                if self.seen[w] & b != 0 {
                    self.duplicated += 1;
                }
                self.seen[w] |= b;
            }
            None => self.foreign += 1,
        }
    }
}

/// A device's connection: the request/reply plumbing, counting every byte
/// read and every push.
struct Conn {
    stream: TcpStream,
    reader: Reader,
    next_id: u64,
    bytes: u64,
    pushes: u64,
    /// Highest `Packet.seq` of a stored entry's push.
    max_push_seq: u64,
    deadline: Instant,
}

impl Conn {
    /// Sends a request and reads until its reply, within [`REQUEST_TIMEOUT`]
    /// and the phase's deadline.
    async fn request(&mut self, command: Command, content: &impl prost::Message) -> anyhow::Result<Reply> {
        self.next_id += 1;
        let id = self.next_id;
        let deadline = (Instant::now() + REQUEST_TIMEOUT).min(self.deadline);
        let frame = wire::request_frame(id, command, content);
        let what = command.as_str_name();
        tokio::time::timeout_at(deadline.into(), self.stream.write_all(&frame))
            .await
            .with_context(|| format!("{what}: write timed out"))??;
        loop {
            let p = tokio::time::timeout_at(deadline.into(), self.reader.next(&mut self.stream))
                .await
                .map_err(|_| anyhow!("{what}: no reply in time"))??
                .with_context(|| format!("{what}: connection closed by the gateway"))?;
            self.bytes += encoded_frame_len(&p) as u64;
            if p.request_id == id && p.command == command as i32 {
                return wire::reply(&p.content);
            }
            if p.command == Command::Message as i32 {
                self.pushes += 1;
                self.max_push_seq = self.max_push_seq.max(p.seq);
            } else if p.command == Command::Kick as i32 {
                bail!("kicked: {}", code_name(wire::kick_code(&p.content)));
            }
        }
    }
}

/// Connects, signs in, syncs every page, acks; never fails (the error is
/// recorded in the result).
pub(super) async fn catch_up(index: usize, cred: Cred, plan: Arc<Plan>, live: Arc<Live>) -> Device {
    let mut dev = Device::new(index, &cred, plan.messages);
    if let Err(e) = catch_up_inner(&mut dev, &cred, &plan, &live).await {
        dev.error = Some(format!("{e:#}"));
    }
    live.done.fetch_add(1, Ordering::Relaxed);
    dev
}

async fn catch_up_inner(dev: &mut Device, cred: &Cred, plan: &Plan, live: &Live) -> anyhow::Result<()> {
    let since = |t: Instant| t.saturating_duration_since(plan.epoch).as_micros() as u64;
    let us = |d: Duration| d.as_micros() as u64;
    let t0 = Instant::now();
    dev.started_us = since(t0);
    let connect_deadline = (t0 + CONNECT_TIMEOUT).min(plan.deadline);
    let stream = tokio::time::timeout_at(connect_deadline.into(), wire::connect(plan.gateway, None, false))
        .await
        .map_err(|_| anyhow!("connect timed out"))?
        .context("connect")?;
    dev.connect_us = Some(us(t0.elapsed()));
    let mut c = Conn {
        stream,
        reader: Reader::with_max_frame(64 * 1024, SYNC_MAX_FRAME),
        next_id: 0,
        bytes: 0,
        pushes: 0,
        max_push_seq: 0,
        deadline: plan.deadline,
    };
    let r = c.request(Command::SignIn, &wire::sign_in_input(cred.user, cred.device, &cred.token)).await?;
    anyhow::ensure!(r.code == 0, "sign-in refused: {} ({})", code_name(r.code), r.message);
    let out: SignInOutput = wire::decode(&r.data)?;
    (dev.sign_in_last_seq, dev.sign_in_ack_seq) = (out.last_seq, out.ack_seq);
    let signed = Instant::now();
    dev.sign_in_us = Some(us(signed - t0));
    live.signed_in.fetch_add(1, Ordering::Relaxed);

    let ours = format!("{}-{}-", plan.prefix, dev.index);
    let mut cursor = dev.sign_in_ack_seq;
    let mut backoff = Duration::from_millis(20);
    let result = async {
        loop {
            if Instant::now() >= plan.deadline {
                bail!(
                    "not caught up by the deadline: cursor {cursor}, sign-in last_seq {}, highest push {}",
                    dev.sign_in_last_seq,
                    c.max_push_seq
                );
            }
            let r = c.request(Command::Sync, &SyncInput { after_seq: cursor, limit: plan.page }).await?;
            if r.code != 0 {
                if !code_from_number(r.code).is_retryable() {
                    bail!("SYNC after {cursor}: {} ({})", code_name(r.code), r.message);
                }
                dev.retries += 1;
                let wake = (Instant::now() + backoff).min(plan.deadline);
                tokio::time::sleep_until(wake.into()).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
            let out: SyncOutput = wire::decode(&r.data)?;
            dev.pages += 1;
            let n = out.messages.len() as u64;
            for m in &out.messages {
                dev.entry(&mut cursor, m.seq, &m.client_msg_id, &ours, plan.messages);
            }
            dev.largest_page = dev.largest_page.max(n);
            live.synced.fetch_add(n, Ordering::Relaxed);
            // Done when the list has no more and the cursor has reached every
            // seq known to exist (the sign-in's head, and any pushed entry:
            // those are synced too, so each entry is counted exactly once).
            let has_more = out.has_more;
            let known = dev.sign_in_last_seq.max(c.max_push_seq);
            if !has_more && cursor >= known {
                return Ok(());
            }
            if n == 0 && has_more {
                bail!("SYNC after {cursor} returned no entry but has_more");
            }
            if n == 0 {
                // A pushed entry beyond the page just read: its sync follows.
                let wake = (Instant::now() + backoff).min(plan.deadline);
                tokio::time::sleep_until(wake.into()).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    .await;
    let done = Instant::now();
    (dev.bytes, dev.pushes) = (c.bytes, c.pushes);
    result?;
    dev.catch_up_us = Some(us(done - signed));
    dev.done_us = Some(since(done));

    // The cursor, as a client would store it (not part of the catch-up).
    let r = c.request(Command::Ack, &AckInput { seq: cursor }).await?;
    anyhow::ensure!(r.code == 0, "ACK {cursor}: {} ({})", code_name(r.code), r.message);
    dev.ack_us = Some(us(done.elapsed()));
    dev.acked_seq = wire::decode::<AckOutput>(&r.data).map_or(0, |o| o.ack_seq);
    Ok(())
}
