//! Delivery of one shard's events to one endpoint, and trimming (see the
//! module docs of `webhooks`).
//!
//! Like the outbox relay, a task runs for the life of the node and works
//! only while this replica leads its shard. On becoming leader it passes a
//! read barrier (so its replica holds every committed cursor) and starts
//! after the endpoint's committed cursor. Losing leadership stops it before
//! the next request (and aborts the requests in flight): a request in
//! flight may still arrive, which at-least-once allows.
//!
//! Pipelining: up to the endpoint's `max_in_flight` requests run at once,
//! each a task that retries its event until a 2xx or the retention; which
//! events may start, and how far the cursor may be committed, is the
//! [`Window`]'s business (FIFO per conversation, contiguous commits,
//! bounded read-ahead). With `max_in_flight = 1` delivery is strictly
//! sequential in log order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng as _;
use rim_proto::ErrorCode;
use rim_proto::store::{self, EventRecord, Op, op::Op as O};
use rim_raft_store::Limits;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinSet;

use super::Endpoint;
use super::window::{Finished, Position, Window};
use crate::core::Core;
use crate::group::{Group, now_ms};

/// Commit the cursor after this many events passed...
const FLUSH_EVERY: usize = 16;
/// ... or this long after the first uncommitted one.
const FLUSH_AFTER: Duration = Duration::from_millis(100);
/// Poll interval when nothing wakes the task.
const IDLE: Duration = Duration::from_millis(500);
/// First retry delay.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often the leader looks for events to trim.
const TRIM_TICK: Duration = Duration::from_millis(1_000);

type Applied = tokio::sync::broadcast::Receiver<Arc<rim_raft_store::AppliedEvent>>;

/// Runs the delivery of `group`'s events to `endpoint` for the life of the node.
pub async fn run(core: Arc<Core>, group: Arc<Group>, endpoint: Arc<Endpoint>) {
    let mut applied = group.events.subscribe();
    loop {
        if group.is_leader() {
            lead(&core, &group, &endpoint, &mut applied).await;
            gauge_lag(&group, &endpoint, 0.0);
        }
        let _ = tokio::time::timeout(IDLE, woken(&mut applied)).await;
    }
}

/// Returns when an applied entry produced events (or notifications were
/// lost); never if the group closed.
async fn woken(applied: &mut Applied) {
    loop {
        match applied.recv().await {
            Ok(ev) if ev.effects.events > 0 => return,
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => return,
            Err(RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

/// The cursor as committed, and as far as events finished.
struct Cursor {
    committed: Option<Position>,
    done: Option<Position>,
    /// Events passed since the last commit, and since when.
    unflushed: usize,
    since: Option<Instant>,
}

impl Cursor {
    fn pass(&mut self, at: Position) {
        self.done = Some(at);
        self.unflushed += 1;
        self.since.get_or_insert_with(Instant::now);
    }

    fn due(&self, idle: bool) -> bool {
        self.committed != self.done
            && (idle
                || self.unflushed >= FLUSH_EVERY
                || self.since.is_some_and(|t| t.elapsed() >= FLUSH_AFTER))
    }

    fn committed_to(&mut self, at: Option<Position>) {
        self.committed = at;
        if self.done == at {
            (self.unflushed, self.since) = (0, None);
        }
    }
}

/// Delivers while this replica leads; returns when it stops leading, a
/// commit fails or the events cannot be read.
async fn lead(core: &Arc<Core>, group: &Arc<Group>, endpoint: &Arc<Endpoint>, applied: &mut Applied) {
    if let Err(e) = core.read_barrier(group.shard).await {
        tracing::debug!(group = %group.shard, error = %e, "webhook delivery waits for a read barrier");
        return;
    }
    let name = &endpoint.config.name;
    let committed = match group.reader.event_cursor(name) {
        Ok(c) => c,
        Err(e) => return tracing::warn!(group = %group.shard, error = %e, "reading an event cursor"),
    };
    let mut cursor = Cursor { committed, done: committed, unflushed: 0, since: None };
    let mut window = Window::new(committed, endpoint.config.max_in_flight);
    // Aborted when dropped: losing leadership stops the requests in flight.
    let mut flights: JoinSet<(Position, Option<Finished>)> = JoinSet::new();
    let sabotage = core.config.sabotage.drop_events;
    while group.is_leader() {
        if let Some((limit, bytes)) = window.room() {
            let page = match group.reader.events_after(window.read_to(), limit, bytes) {
                Ok(p) => p,
                Err(e) => return tracing::warn!(group = %group.shard, error = %e, "reading events"),
            };
            for e in page.events {
                let wanted = endpoint.wants(&e.r#type);
                window.push(e, wanted);
            }
        }
        for e in window.start() {
            flights.spawn(attempt(group.clone(), endpoint.clone(), e, sabotage));
        }
        // Pass the finished prefix; dead-letter an expired head (which also
        // moves the cursor to it, past the prefix before it).
        loop {
            if let Some(at) = window.pop_done() {
                cursor.pass(at);
            }
            let Some((e, reason)) = window.expired_head() else { break };
            if !dead_letter(core, group, endpoint, e, reason.to_string()).await {
                return;
            }
            let at = window.pop_head();
            cursor.pass(at.unwrap_or_default());
            cursor.committed_to(at);
        }
        let lag = window.oldest_ms().map_or(0, |ms| (now_ms() - ms).max(0));
        gauge_lag(group, endpoint, lag as f64 / 1000.0);
        if cursor.due(window.is_empty()) {
            if !flush(core, group, name, cursor.done, &mut cursor.committed).await {
                return;
            }
            let at = cursor.committed;
            cursor.committed_to(at);
        }
        let flush_at = cursor.since.map(|t| tokio::time::Instant::from_std(t + FLUSH_AFTER));
        tokio::select! {
            Some(joined) = flights.join_next(), if !flights.is_empty() => match joined {
                Ok((at, Some(how))) => {
                    if how == Finished::Delivered {
                        metrics::counter!("rim_webhook_delivered_total", "endpoint" => name.clone()).increment(1);
                    }
                    window.finish(at, how);
                }
                // No longer the leader.
                Ok((_, None)) => return,
                Err(e) => return tracing::error!(group = %group.shard, error = %e, "a webhook request task failed"),
            },
            _ = woken(applied), if window.room().is_some() => {}
            _ = tokio::time::sleep_until(flush_at.unwrap_or_else(tokio::time::Instant::now)), if flush_at.is_some() => {}
            _ = tokio::time::sleep(IDLE) => {}
        }
    }
}

/// Commits `done` as the endpoint's cursor; false if that failed.
async fn flush(
    core: &Core,
    group: &Group,
    name: &str,
    done: Option<Position>,
    committed: &mut Option<Position>,
) -> bool {
    let Some((index, ordinal)) = done else { return true };
    let op = O::AdvanceEventCursor(store::AdvanceEventCursor { endpoint: name.to_string(), index, ordinal });
    match group.propose(Op { op: Some(op) }, core.timeout).await {
        Ok(r) if r.code == ErrorCode::Ok as i32 => {
            *committed = done;
            true
        }
        Ok(r) => {
            tracing::warn!(group = %group.shard, message = %r.message, "event cursor refused");
            false
        }
        Err(e) => {
            tracing::debug!(group = %group.shard, error = %e, "committing an event cursor");
            false
        }
    }
}

/// Dead-letters `e` through Raft (which moves the cursor to it); false if
/// that failed.
async fn dead_letter(
    core: &Core,
    group: &Group,
    endpoint: &Endpoint,
    e: &EventRecord,
    reason: String,
) -> bool {
    let name = &endpoint.config.name;
    let op = O::DeadLetterEvent(store::DeadLetterEvent {
        endpoint: name.clone(),
        index: e.index,
        ordinal: e.ordinal,
        reason,
    });
    match group.propose(Op { op: Some(op) }, core.timeout).await {
        Ok(r) if r.code == ErrorCode::Ok as i32 => {
            tracing::warn!(endpoint = %name, event = %e.event_id, "event dead-lettered");
            metrics::counter!("rim_webhook_dead_letters_total", "endpoint" => name.clone()).increment(1);
            true
        }
        _ => false,
    }
}

/// The retention the shard applies with.
fn retention_ms(group: &Group) -> i64 {
    match group.reader.limits() {
        Ok(stored) => Limits::of_stored(stored.as_ref()).event_retention_ms,
        Err(_) => Limits::default().event_retention_ms,
    }
}

/// One request task: POSTs `e` until a 2xx, or until it is older than the
/// retention (then it is to be dead-lettered); `None` when this replica no
/// longer leads.
async fn attempt(
    group: Arc<Group>,
    endpoint: Arc<Endpoint>,
    e: EventRecord,
    sabotage: bool,
) -> (Position, Option<Finished>) {
    let at = (e.index, e.ordinal);
    let name = &endpoint.config.name;
    let mut backoff = FIRST_BACKOFF;
    loop {
        if !group.is_leader() {
            return (at, None);
        }
        if sabotage && e.index.wrapping_add(u64::from(e.ordinal)) % 5 == 0 {
            // The deliberately broken build (tests only): "delivered", never sent.
            return (at, Some(Finished::Delivered));
        }
        let reason = match post(&endpoint, &e).await {
            Ok(status) if status.is_success() => return (at, Some(Finished::Delivered)),
            Ok(status) => format!("HTTP {}", status.as_u16()),
            Err(err) => format!("{}", without_url(err)),
        };
        tracing::debug!(endpoint = %name, event = %e.event_id, %reason, "webhook delivery failed");
        let expires_in = e.created_ms.saturating_add(retention_ms(&group)).saturating_sub(now_ms());
        if expires_in <= 0 {
            return (at, Some(Finished::Expired(reason)));
        }
        metrics::counter!("rim_webhook_retries_total", "endpoint" => name.clone()).increment(1);
        // Full jitter over [backoff/2, backoff], never sleeping far past the expiry.
        let jittered = rand::thread_rng().gen_range(backoff / 2..=backoff);
        let until_expiry = Duration::from_millis(expires_in as u64) + Duration::from_millis(10);
        tokio::time::sleep(jittered.min(until_expiry)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A request error without the URL (it may carry credentials in its query).
fn without_url(e: reqwest::Error) -> reqwest::Error {
    e.without_url()
}

/// One signed POST of `e`'s body.
pub(super) async fn post(endpoint: &Endpoint, e: &EventRecord) -> reqwest::Result<reqwest::StatusCode> {
    let timestamp = now_ms() / 1000;
    let signature = super::sign::signature_header(&endpoint.secrets, &e.event_id, timestamp, &e.body);
    let response = endpoint
        .client
        .post(&endpoint.config.url)
        .header("content-type", "application/json")
        .header("webhook-id", &e.event_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(Bytes::clone(&e.body))
        .send()
        .await?;
    Ok(response.status())
}

fn gauge_lag(group: &Group, endpoint: &Endpoint, seconds: f64) {
    metrics::gauge!("rim_webhook_lag_seconds", "endpoint" => endpoint.config.name.clone(), "group" => group.shard.0.to_string())
        .set(seconds);
}

/// On the shard's leader: removes events older than the retention that
/// every endpoint in `endpoints` has passed, and old dead letters. Runs for
/// the life of the node.
pub async fn trim(core: Arc<Core>, group: Arc<Group>, endpoints: Vec<Arc<Endpoint>>) {
    let mut tick = tokio::time::interval(TRIM_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !group.is_leader() {
            continue;
        }
        let upto = match trim_bound(&group, &endpoints) {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!(group = %group.shard, error = %e, "reading events to trim");
                continue;
            }
        };
        let (index, ordinal) = upto;
        let op = O::TrimEvents(store::TrimEvents { index, ordinal });
        if let Err(e) = group.propose(Op { op: Some(op) }, core.timeout).await {
            tracing::debug!(group = %group.shard, error = %e, "trimming events");
        }
    }
}

/// The position trimming may go up to, if anything is due: the lowest
/// cursor of the endpoints (everything without endpoints).
fn trim_bound(group: &Group, endpoints: &[Arc<Endpoint>]) -> crate::error::Result<Option<Position>> {
    let oldest = now_ms().saturating_sub(retention_ms(group));
    let mut upto = (u64::MAX, u32::MAX);
    for e in endpoints {
        upto = upto.min(group.reader.event_cursor(&e.config.name)?.unwrap_or((0, 0)));
    }
    let first = group.reader.events_after(None, 1, usize::MAX)?.events;
    let event_due = first.first().is_some_and(|e| e.created_ms <= oldest && (e.index, e.ordinal) <= upto);
    let letter_due = group.reader.oldest_dead_letter_ms()?.is_some_and(|ms| ms <= oldest);
    Ok((event_due || letter_due).then_some(upto))
}
