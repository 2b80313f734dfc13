//! Delivery of one shard's events to one endpoint, and trimming (see the
//! module docs of `webhooks`).
//!
//! Like the outbox relay, a task runs for the life of the node and works
//! only while this replica leads its shard. On becoming leader it passes a
//! read barrier (so its replica holds every committed cursor) and starts
//! after the endpoint's committed cursor. Losing leadership stops it before
//! the next request: a request in flight may still arrive, which
//! at-least-once allows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng as _;
use rim_proto::ErrorCode;
use rim_proto::store::{self, EventRecord, Op, op::Op as O};
use rim_raft_store::Limits;
use tokio::sync::broadcast::error::RecvError;

use super::Endpoint;
use crate::core::Core;
use crate::group::{Group, now_ms};

/// Events read per round.
const BATCH: usize = 64;
/// Most body bytes read per round (at least one event).
const BATCH_BYTES: usize = 4 << 20;
/// Commit the cursor after this many deliveries...
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

type Position = (u64, u32);

/// How one event's delivery ended.
enum Outcome {
    /// A 2xx.
    Delivered,
    /// Dead-lettered through Raft (the cursor passed it).
    DeadLettered,
    /// This replica no longer leads, or could not commit: start over.
    Stop,
}

/// Runs the delivery of `group`'s events to `endpoint` for the life of the node.
pub async fn run(core: Arc<Core>, group: Arc<Group>, endpoint: Arc<Endpoint>) {
    let mut applied = group.events.subscribe();
    loop {
        if group.is_leader() {
            lead(&core, &group, &endpoint, &mut applied).await;
            gauge_lag(&group, &endpoint, 0.0);
        }
        wait(&mut applied).await;
    }
}

/// Sleeps until something is applied, or [`IDLE`].
async fn wait(applied: &mut tokio::sync::broadcast::Receiver<Arc<rim_raft_store::AppliedEvent>>) {
    let woken = async {
        loop {
            match applied.recv().await {
                Ok(ev) if ev.effects.events > 0 => return,
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => return,
                Err(RecvError::Closed) => std::future::pending::<()>().await,
            }
        }
    };
    let _ = tokio::time::timeout(IDLE, woken).await;
}

/// Delivers while this replica leads; returns when it stops leading or a
/// commit fails.
async fn lead(
    core: &Core,
    group: &Group,
    endpoint: &Endpoint,
    applied: &mut tokio::sync::broadcast::Receiver<Arc<rim_raft_store::AppliedEvent>>,
) {
    if let Err(e) = core.read_barrier(group.shard).await {
        tracing::debug!(group = %group.shard, error = %e, "webhook delivery waits for a read barrier");
        return;
    }
    let name = &endpoint.config.name;
    let mut committed = match group.reader.event_cursor(name) {
        Ok(c) => c,
        Err(e) => return tracing::warn!(group = %group.shard, error = %e, "reading an event cursor"),
    };
    let mut done = committed;
    let mut since: Option<Instant> = None;
    let mut unflushed = 0usize;
    while group.is_leader() {
        let page = match group.reader.events_after(done, BATCH, BATCH_BYTES) {
            Ok(p) => p,
            Err(e) => return tracing::warn!(group = %group.shard, error = %e, "reading events"),
        };
        if page.events.is_empty() {
            if committed != done && !flush(core, group, name, done, &mut committed).await {
                return;
            }
            gauge_lag(group, endpoint, 0.0);
            wait(applied).await;
            continue;
        }
        for e in &page.events {
            let at = (e.index, e.ordinal);
            if endpoint.wants(&e.r#type) {
                gauge_lag(group, endpoint, (now_ms() - e.created_ms).max(0) as f64 / 1000.0);
                match deliver_one(core, group, endpoint, e, done, &mut committed).await {
                    Outcome::Delivered => {
                        metrics::counter!("rim_webhook_delivered_total", "endpoint" => name.clone())
                            .increment(1);
                        unflushed += 1;
                        since.get_or_insert_with(Instant::now);
                    }
                    Outcome::DeadLettered => committed = Some(at),
                    Outcome::Stop => return,
                }
            }
            done = Some(at);
            if unflushed >= FLUSH_EVERY || since.is_some_and(|t| t.elapsed() >= FLUSH_AFTER) {
                if !flush(core, group, name, done, &mut committed).await {
                    return;
                }
                (unflushed, since) = (0, None);
            }
        }
        // Filtered-out events only move the cursor: commit at the round's end.
        if committed != done && since.is_none() && !flush(core, group, name, done, &mut committed).await {
            return;
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

/// The retention the shard applies with.
fn retention_ms(group: &Group) -> i64 {
    match group.reader.limits() {
        Ok(stored) => Limits::of_stored(stored.as_ref()).event_retention_ms,
        Err(_) => Limits::default().event_retention_ms,
    }
}

/// POSTs `e` until a 2xx, or dead-letters it once it is older than the
/// retention, or stops when this replica no longer leads.
/// Before the first retry, commits `done` (every event before `e` is
/// handled), so a failing endpoint does not hold back the cursor.
async fn deliver_one(
    core: &Core,
    group: &Group,
    endpoint: &Endpoint,
    e: &EventRecord,
    done: Option<Position>,
    committed: &mut Option<Position>,
) -> Outcome {
    let name = &endpoint.config.name;
    let mut backoff = FIRST_BACKOFF;
    loop {
        if !group.is_leader() {
            return Outcome::Stop;
        }
        if core.config.sabotage.drop_events && e.index.wrapping_add(u64::from(e.ordinal)) % 5 == 0 {
            // The deliberately broken build (tests only): "delivered", never sent.
            return Outcome::Delivered;
        }
        let reason = match post(endpoint, e).await {
            Ok(status) if status.is_success() => return Outcome::Delivered,
            Ok(status) => format!("HTTP {}", status.as_u16()),
            Err(err) => format!("{}", without_url(err)),
        };
        tracing::debug!(endpoint = %name, event = %e.event_id, %reason, "webhook delivery failed");
        if *committed != done && !flush(core, group, name, done, committed).await {
            return Outcome::Stop;
        }
        let expires_in = e.created_ms.saturating_add(retention_ms(group)).saturating_sub(now_ms());
        if expires_in <= 0 {
            let op = O::DeadLetterEvent(store::DeadLetterEvent {
                endpoint: name.clone(),
                index: e.index,
                ordinal: e.ordinal,
                reason,
            });
            return match group.propose(Op { op: Some(op) }, core.timeout).await {
                Ok(r) if r.code == ErrorCode::Ok as i32 => {
                    tracing::warn!(endpoint = %name, event = %e.event_id, "event dead-lettered");
                    metrics::counter!("rim_webhook_dead_letters_total", "endpoint" => name.clone())
                        .increment(1);
                    Outcome::DeadLettered
                }
                _ => Outcome::Stop,
            };
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
async fn post(endpoint: &Endpoint, e: &EventRecord) -> reqwest::Result<reqwest::StatusCode> {
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
