//! The outbox relay: exactly-once cross-shard delivery.
//!
//! Each shard's leader drains its outbox in id (= commit) order. For a run
//! of consecutive records it proposes, per destination shard, one `Deliver`
//! with the records' messages in order; the destination appends each
//! message to each recipient list unless that list already holds the
//! message id. Only the prefix of records whose every destination confirmed
//! is removed (`AckOutbox`); the first failure stops the round and the rest
//! is retried later, so:
//!
//! * a message reaches each recipient list exactly once (retries after
//!   timeouts, leader changes and crashes are deduplicated by message id);
//! * messages from one shard to one recipient keep their commit order, hence
//!   each sender's order (a record is never delivered before an earlier one
//!   to the same destination has been);
//! * only the leader relays, and a new leader simply starts from the outbox
//!   as committed.
//!
//! Recipients unknown at the destination are dropped with a warning (the
//! sender's copy stays, the recipient never existed).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rim_proto::store::{self, OutboxRecord, op::Op as O};
use tokio::sync::broadcast::error::RecvError;

use crate::core::Core;
use crate::error::Result;
use crate::group::Group;

/// Records relayed per round.
const ROUND: usize = 256;
/// Poll interval when nothing wakes the relay.
const IDLE: Duration = Duration::from_millis(500);

/// Runs the relay of one shard for the life of the node.
pub async fn run(core: Arc<Core>, group: Arc<Group>) {
    let mut events = group.events.subscribe();
    let mut backoff = Duration::from_millis(50);
    loop {
        if group.is_leader() {
            match relay_round(&core, &group).await {
                Ok(0) => backoff = Duration::from_millis(50),
                Ok(n) => {
                    metrics::counter!("rim_relay_delivered_total", "shard" => group.shard.0.to_string())
                        .increment(n as u64);
                    backoff = Duration::from_millis(50);
                    continue; // more may be waiting
                }
                Err(e) => {
                    tracing::debug!(shard = %group.shard, error = %e, "relay round failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            }
        }
        // Sleep until new outbox records are applied, or poll.
        let wait = async {
            loop {
                match events.recv().await {
                    Ok(ev) if ev.effects.outbox => return,
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => return,
                    Err(RecvError::Closed) => std::future::pending::<()>().await,
                }
            }
        };
        let _ = tokio::time::timeout(IDLE, wait).await;
    }
}

/// Delivers the oldest outbox records; returns how many were completed.
async fn relay_round(core: &Core, group: &Group) -> Result<usize> {
    let records = group.reader.outbox(0, ROUND)?;
    metrics::gauge!("rim_relay_backlog", "shard" => group.shard.0.to_string()).set(records.len() as f64);
    if records.is_empty() {
        return Ok(0);
    }
    let placement = core.placement()?;
    // Per destination shard: the records (in order) with their recipients there.
    let mut by_dest: BTreeMap<u32, Vec<(usize, OutboxRecord)>> = BTreeMap::new();
    for (i, rec) in records.iter().enumerate() {
        let mut split: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for &r in &rec.recipients {
            split.entry(placement.shard_of_user(r)).or_default().push(r);
        }
        for (dest, recipients) in split {
            let item = OutboxRecord { recipients, ..rec.clone() };
            by_dest.entry(dest).or_default().push((i, item));
        }
    }
    // `done_upto`: records [0, done_upto) are delivered everywhere.
    let mut done_upto = records.len();
    for (dest, items) in by_dest {
        let first_index = items.first().map(|(i, _)| *i).unwrap_or(0);
        if first_index >= done_upto {
            continue; // an earlier record already failed; keep order
        }
        let items: Vec<_> = items.into_iter().filter(|(i, _)| *i < done_upto).collect();
        let indexes: Vec<usize> = items.iter().map(|(i, _)| *i).collect();
        let deliver = O::Deliver(store::Deliver { items: items.into_iter().map(|(_, r)| r).collect() });
        match core.propose(dest, store::Op { op: Some(deliver) }).await {
            Ok(r) => {
                if let Some(store::op_result::Value::Delivered(d)) = r.value
                    && !d.missing_users.is_empty()
                {
                    tracing::warn!(shard = dest, users = ?d.missing_users, "relay dropped messages to unknown users");
                }
            }
            Err(e) => {
                tracing::debug!(from = %group.shard, to = dest, error = %e, "delivery failed");
                done_upto = done_upto.min(indexes.first().copied().unwrap_or(0));
            }
        }
    }
    let ids: Vec<u64> = records[..done_upto].iter().map(|r| r.outbox_id).collect();
    if !ids.is_empty() {
        let ack = O::AckOutbox(store::AckOutbox { outbox_ids: ids });
        core.propose(group.shard.0, store::Op { op: Some(ack) }).await?;
    }
    Ok(done_upto)
}
