//! The load (see [`super`]): one task per sender sends 1:1 messages open
//! loop on its tick, reads the replies and retries; one task per
//! recipient counts the `MESSAGE` pushes from its sender. [`Run`] is the
//! state they share with the rest of the scenario (counters, error
//! tallies, the timeline).
//!
//! Invariants:
//!
//! * A message keeps its `client_msg_id` (`<run>-<pair>-<n>`) across
//!   attempts, so the server's idempotency record makes an
//!   acked-after-retry message count once; each attempt has a new request
//!   id, and a reply to an attempt no longer awaited (timed out and resent)
//!   is only counted as late.
//! * A message is resolved once: acked (code 0), failed (a non-retryable
//!   code), or reported unresolved when its sender stops; [`Run::pending`]
//!   counts the unresolved ones over all senders, and a stopping sender
//!   takes its own back out.
//! * At most `max_inflight` unresolved messages per sender: a tick finding
//!   that many is skipped (counted), not queued.
//! * Every wait is bounded: writes 5 s, replies `reply_timeout` (then the
//!   message is resent), backoffs [`MAX_BACKOFF_MS`] (+25 %). A sender's
//!   `select!` only has cancel-safe arms (`wire::Reader::next` only awaits
//!   the socket read).
//! * What is kept is bounded: one [`Acked`] per acked message (the run's
//!   total is capped by the flags' validation), bounded error tallies, at
//!   most [`EXAMPLES`] error texts.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rim_proto::ids::UserId;
use rim_proto::v1::Command;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;

use super::EXAMPLES;
use super::timeline::{ACKS_OTHER, ACKS_TARGET, PUSHES_OTHER, PUSHES_TARGET, Timeline};
use crate::progress::{Tally, code_name};
use crate::wire::{self, Reader, write_frame};

/// Longest retry backoff of a sender.
const MAX_BACKOFF_MS: u64 = 1_000;

/// Where the load is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// New messages are sent.
    Load,
    /// No new messages; unresolved ones are retried until resolved.
    Drain,
    /// Everything stops.
    Halt,
}

/// State shared by every task of a run.
pub(super) struct Run {
    pub(super) epoch: Instant,
    /// µs since `epoch` of the kill (`u64::MAX` before it).
    pub(super) kill_us: AtomicU64,
    pub(super) sent: AtomicU64,
    pub(super) attempts: AtomicU64,
    pub(super) retries: AtomicU64,
    pub(super) acked: AtomicU64,
    pub(super) acked_target: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) skipped: AtomicU64,
    /// Unresolved messages over all senders.
    pub(super) pending: AtomicI64,
    pub(super) late_replies: AtomicU64,
    pub(super) pushes: AtomicU64,
    pub(super) push_duplicates: AtomicU64,
    pub(super) push_gaps: AtomicU64,
    pub(super) stopping: AtomicBool,
    pub(super) errors_before: Tally,
    pub(super) errors_after: Tally,
    /// The first distinct error replies with their detail text (bounded).
    pub(super) error_examples: Mutex<Vec<String>>,
    pub(super) timeline: Timeline,
}

impl Run {
    /// A run whose load starts at `epoch`, with a timeline covering `span`.
    pub(super) fn new(epoch: Instant, span: Duration) -> Run {
        Run {
            epoch,
            kill_us: AtomicU64::new(u64::MAX),
            sent: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            acked_target: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            pending: AtomicI64::new(0),
            late_replies: AtomicU64::new(0),
            pushes: AtomicU64::new(0),
            push_duplicates: AtomicU64::new(0),
            push_gaps: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            errors_before: Tally::default(),
            errors_after: Tally::default(),
            error_examples: Mutex::new(Vec::new()),
            timeline: Timeline::new(span),
        }
    }

    pub(super) fn now_us(&self) -> u64 {
        Instant::now().saturating_duration_since(self.epoch).as_micros() as u64
    }

    pub(super) fn killed(&self) -> bool {
        self.kill_us.load(Ordering::Relaxed) != u64::MAX
    }

    /// Counts an error, by phase (before / after the kill) and by shard.
    fn error(&self, on_target: bool, what: impl std::fmt::Display) {
        let tally = if self.killed() { &self.errors_after } else { &self.errors_before };
        tally.add(format!("{}: {what}", if on_target { "target shard" } else { "other shards" }));
    }

    /// Keeps an error reply's detail, if it is new and there is room.
    fn example(&self, on_target: bool, code: i32, message: &str) {
        let mut v = self.error_examples.lock().unwrap_or_else(PoisonError::into_inner);
        let detail: String = message.chars().take(200).collect();
        let e = format!(
            "{} {} the kill, {}: {detail}",
            code_name(code),
            if self.killed() { "after" } else { "before" },
            if on_target { "target shard" } else { "other shard" },
        );
        if v.len() < EXAMPLES
            && !v.iter().any(|x| x.split(':').next() == e.split(':').next() && x.ends_with(&detail))
        {
            v.push(e);
        }
    }
}

/// One acknowledged message (times in µs since the run's epoch).
pub(super) struct Acked {
    /// Its number in the sender's sequence (`client_msg_id` suffix).
    pub(super) n: u32,
    /// First attempt written.
    pub(super) first_us: u64,
    /// The acknowledged attempt written.
    pub(super) attempt_us: u64,
    /// Its reply read.
    pub(super) acked_us: u64,
}

/// What one sender did.
pub(super) struct SenderReport {
    pub(super) pair: usize,
    /// Messages started (numbered 1..=sent).
    pub(super) sent: u32,
    pub(super) acked: Vec<Acked>,
    /// Given up on a non-retryable error.
    pub(super) failed: Vec<u32>,
    /// Neither acked nor failed when the sender stopped (unknown outcome).
    pub(super) unresolved: Vec<u32>,
}

/// An unresolved message.
struct Pending {
    first_us: u64,
    attempt_us: u64,
    attempts: u32,
    /// Request id of the attempt awaiting its reply (`None`: waiting to retry).
    request: Option<u64>,
    /// When to act: the reply timeout, or the retry time.
    due_us: u64,
}

/// One sender's schedule and settings.
pub(super) struct Sender {
    pub(super) pair: usize,
    pub(super) to: UserId,
    pub(super) cmid_prefix: String,
    pub(super) on_target: bool,
    pub(super) offset: Duration,
    pub(super) period: Duration,
    pub(super) max_inflight: usize,
    pub(super) reply_timeout_us: u64,
    pub(super) size: usize,
    pub(super) heartbeat: Duration,
}

/// A sender's mutable state.
struct SenderState {
    pending: BTreeMap<u32, Pending>,
    /// Request id → message number, for the attempts awaiting a reply.
    by_request: HashMap<u64, u32>,
    next_request: u64,
    report: SenderReport,
}

impl Sender {
    /// Sends new messages while the phase is `Load`, retries unresolved ones
    /// until they resolve or the phase is `Halt`, reads the replies.
    pub(super) async fn run(
        self,
        mut rd: OwnedReadHalf,
        mut reader: Reader,
        mut wr: OwnedWriteHalf,
        run: Arc<Run>,
        mut phase_rx: watch::Receiver<Phase>,
    ) -> SenderReport {
        let start = tokio::time::Instant::from_std(run.epoch + self.offset);
        let mut tick = tokio::time::interval_at(start, self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + self.heartbeat, self.heartbeat);
        let mut st = SenderState {
            pending: BTreeMap::new(),
            by_request: HashMap::new(),
            next_request: 2, // 1 was the sign-in
            report: SenderReport {
                pair: self.pair,
                sent: 0,
                acked: Vec::new(),
                failed: Vec::new(),
                unresolved: Vec::new(),
            },
        };
        let mut phase = *phase_rx.borrow_and_update();
        let far = Duration::from_secs(3600);
        'run: loop {
            if phase == Phase::Halt || (phase == Phase::Drain && st.pending.is_empty()) {
                break;
            }
            let due = st.pending.values().map(|p| p.due_us).min();
            let due_at = run.epoch + due.map_or(far, Duration::from_micros);
            tokio::select! {
                changed = phase_rx.changed() => {
                    phase = if changed.is_ok() { *phase_rx.borrow_and_update() } else { Phase::Halt };
                }
                p = reader.next(&mut rd) => match p {
                    Ok(Some(p)) => self.on_packet(&p, &mut st, &run),
                    Ok(None) => {
                        run.error(self.on_target, "sender connection closed by the gateway");
                        break;
                    }
                    Err(e) => {
                        run.error(self.on_target, format_args!("sender connection: {}", short(&e)));
                        break;
                    }
                },
                _ = tick.tick(), if phase == Phase::Load => {
                    if st.pending.len() >= self.max_inflight {
                        run.skipped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    st.report.sent += 1;
                    let n = st.report.sent;
                    let now = run.now_us();
                    st.pending.insert(n, Pending { first_us: now, attempt_us: now, attempts: 0, request: None, due_us: now });
                    run.sent.fetch_add(1, Ordering::Relaxed);
                    run.pending.fetch_add(1, Ordering::Relaxed);
                    if !self.attempt(n, &mut st, &mut wr, &run).await {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(due_at.into()), if due.is_some() => {
                    let now = run.now_us();
                    let ready: Vec<u32> = st.pending.iter().filter(|(_, p)| p.due_us <= now).map(|(n, _)| *n).collect();
                    for n in ready {
                        if let Some(p) = st.pending.get_mut(&n)
                            && let Some(r) = p.request.take()
                        {
                            st.by_request.remove(&r);
                            run.error(self.on_target, "no reply within --reply-timeout (resent)");
                        }
                        if !self.attempt(n, &mut st, &mut wr, &run).await {
                            break 'run;
                        }
                    }
                }
                _ = beat.tick() => {
                    let f = wire::request_frame(st.next_request, Command::Heartbeat, &());
                    st.next_request += 1;
                    if !write_frame(&mut wr, &f).await {
                        run.error(self.on_target, "heartbeat write failed");
                        break;
                    }
                }
            }
        }
        st.report.unresolved = st.pending.keys().copied().collect();
        run.pending.fetch_sub(st.pending.len() as i64, Ordering::Relaxed);
        st.report
    }

    /// Writes an attempt of message `n` (a new request id, the same
    /// `client_msg_id`); false if the connection is unusable.
    async fn attempt(&self, n: u32, st: &mut SenderState, wr: &mut OwnedWriteHalf, run: &Run) -> bool {
        let Some(p) = st.pending.get_mut(&n) else { return true };
        let now = run.now_us();
        let request = st.next_request;
        st.next_request += 1;
        p.attempts += 1;
        p.attempt_us = now;
        p.request = Some(request);
        p.due_us = now + self.reply_timeout_us;
        if p.attempts > 1 {
            run.retries.fetch_add(1, Ordering::Relaxed);
        }
        st.by_request.insert(request, n);
        let mut text = format!("{n} ").into_bytes();
        text.resize(self.size.max(text.len()), b'x');
        let input = wire::send_input(self.to, &format!("{}{n}", self.cmid_prefix), &text);
        run.attempts.fetch_add(1, Ordering::Relaxed);
        if write_frame(wr, &wire::request_frame(request, Command::Send, &input)).await {
            true
        } else {
            run.error(self.on_target, "send write failed");
            false
        }
    }

    /// Handles a packet on the sender's connection.
    fn on_packet(&self, p: &rim_proto::v1::Packet, st: &mut SenderState, run: &Run) {
        if p.command == Command::Kick as i32 {
            run.error(
                self.on_target,
                format_args!("sender kicked: {}", code_name(wire::kick_code(&p.content))),
            );
            return;
        }
        if p.command != Command::Send as i32 || p.request_id == 0 {
            return; // heartbeat replies, pushes of its own messages
        }
        let Some(n) = st.by_request.remove(&p.request_id) else {
            run.late_replies.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let now = run.now_us();
        let (code, retry_after_ms) = match wire::reply(&p.content) {
            Ok(r) => {
                if r.code != 0 {
                    run.example(self.on_target, r.code, &r.message);
                }
                (r.code, u64::from(r.retry_after_ms))
            }
            Err(_) => {
                run.error(self.on_target, "malformed reply (resent)");
                (rim_proto::ErrorCode::ErrorUnavailable as i32, 0)
            }
        };
        if code == 0 {
            let Some(m) = st.pending.remove(&n) else { return };
            st.report.acked.push(Acked { n, first_us: m.first_us, attempt_us: m.attempt_us, acked_us: now });
            run.pending.fetch_sub(1, Ordering::Relaxed);
            run.acked.fetch_add(1, Ordering::Relaxed);
            if self.on_target {
                run.acked_target.fetch_add(1, Ordering::Relaxed);
            }
            run.timeline.add(if self.on_target { ACKS_TARGET } else { ACKS_OTHER }, now);
            return;
        }
        run.error(self.on_target, code_name(code));
        if rim_proto::error::code_from_number(code).is_retryable() {
            if let Some(m) = st.pending.get_mut(&n) {
                m.request = None;
                m.due_us = now + backoff_ms(m.attempts, retry_after_ms, n) * 1000;
            }
        } else if st.pending.remove(&n).is_some() {
            st.report.failed.push(n);
            run.pending.fetch_sub(1, Ordering::Relaxed);
            run.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The wait before attempt `attempts + 1`: the server's hint, else 50 ms
/// doubling per attempt, at most [`MAX_BACKOFF_MS`], with ±25 % spread (a
/// function of the message number, so retries of many senders do not align).
fn backoff_ms(attempts: u32, retry_after_ms: u64, n: u32) -> u64 {
    let base = if retry_after_ms > 0 { retry_after_ms } else { 50 << attempts.saturating_sub(1).min(5) };
    let spread = 75 + (u64::from(n).wrapping_mul(2_654_435_761) >> 7) % 51;
    (base.min(MAX_BACKOFF_MS) * spread / 100).max(1)
}

fn short(e: &anyhow::Error) -> String {
    e.to_string().chars().take(60).collect()
}

/// Reads a recipient's connection: counts the `MESSAGE` pushes from its
/// sender per time bucket, and seqs seen twice or skipped.
pub(super) async fn read_recipient(
    mut rd: OwnedReadHalf,
    mut reader: Reader,
    sender: UserId,
    on_target: bool,
    run: Arc<Run>,
) {
    let mut last_seq = 0;
    loop {
        let p = match reader.next(&mut rd).await {
            Ok(Some(p)) => p,
            Ok(None) if !run.stopping.load(Ordering::Relaxed) => {
                return run.error(on_target, "recipient connection closed by the gateway");
            }
            Err(e) if !run.stopping.load(Ordering::Relaxed) => {
                return run.error(on_target, format_args!("recipient connection: {}", short(&e)));
            }
            _ => return,
        };
        if p.command == Command::Kick as i32 {
            run.error(
                on_target,
                format_args!("recipient kicked: {}", code_name(wire::kick_code(&p.content))),
            );
            continue;
        }
        if p.command != Command::Message as i32
            || wire::pushed_message(&p.content).is_none_or(|m| m.sender_user_id != sender.0)
        {
            continue;
        }
        run.pushes.fetch_add(1, Ordering::Relaxed);
        run.timeline.add(if on_target { PUSHES_TARGET } else { PUSHES_OTHER }, run.now_us());
        if p.seq != 0 {
            if p.seq <= last_seq {
                run.push_duplicates.fetch_add(1, Ordering::Relaxed);
            } else if last_seq != 0 && p.seq > last_seq + 1 {
                run.push_gaps.fetch_add(1, Ordering::Relaxed);
            }
            last_seq = last_seq.max(p.seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert!((37..=63).contains(&backoff_ms(1, 0, 7)));
        assert!(backoff_ms(3, 0, 7) > backoff_ms(1, 0, 7));
        assert!(backoff_ms(30, 0, 7) <= MAX_BACKOFF_MS * 5 / 4);
        assert!((150..=250).contains(&backoff_ms(1, 200, 9)));
    }
}
