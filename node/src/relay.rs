//! The outbox relay: exactly-once cross-shard delivery.
//!
//! Each shard's leader drains its outbox in id (= commit) order. For a run
//! of consecutive records it proposes, per destination shard and
//! concurrently, one `Deliver` with the records' messages in order; the
//! destination appends each message to each recipient list unless that list
//! already holds the message id. Only the prefix of records whose every
//! destination confirmed counts as delivered; it is removed (`AckOutbox`)
//! together with the next round's deliveries, so a record costs one commit
//! on its way, not two. A failure stops the prefix and the rest is retried
//! later, so:
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

use rim_proto::ids::{ShardId, UserId};
use rim_proto::store::{self, OutboxRecord, op::Op as O};
use tokio::sync::broadcast::error::RecvError;

use crate::core::Core;
use crate::error::Result;
use crate::group::Group;

/// Records relayed per round.
const ROUND: usize = 1_024;
/// Poll interval when nothing wakes the relay.
const IDLE: Duration = Duration::from_millis(500);

/// What the relay of one shard remembers between rounds (in memory only:
/// a restarted or new leader starts again from the committed outbox, and
/// redelivery is deduplicated by message id).
#[derive(Default)]
struct Cursor {
    /// Every outbox record with an id up to this one has been delivered to
    /// all its destinations (its `Deliver`s committed).
    delivered_upto: u64,
    /// Ids delivered but not yet removed with `AckOutbox`.
    unacked: Vec<u64>,
}

/// Runs the relay of one shard for the life of the node.
pub async fn run(core: Arc<Core>, group: Arc<Group>) {
    let mut events = group.events.subscribe();
    let mut backoff = Duration::from_millis(50);
    let mut cursor = Cursor::default();
    // Whether the last pass ran as leader (to act once on losing it).
    let mut relaying = false;
    loop {
        if group.is_leader() {
            relaying = true;
            match relay_round(&core, &group, &mut cursor).await {
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
        } else if relaying {
            // Leadership lost. Another leader relays (and removes) the
            // records meanwhile; when leadership comes back, start from the
            // committed outbox. This replica relays nothing: its backlog
            // gauge must not keep the figure of its last round as leader.
            relaying = false;
            cursor = Cursor::default();
            metrics::gauge!("rim_relay_backlog", "shard" => group.shard.0.to_string()).set(0.0);
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

/// Delivers the oldest undelivered outbox records, while removing the
/// records of the previous round (`AckOutbox`) at the same time; returns
/// how many records were delivered.
///
/// All destination shards are proposed to concurrently: records bound for
/// one destination travel in one `Deliver`, in outbox order, and distinct
/// destinations hold distinct recipients, so no recipient can see a later
/// record of this shard before an earlier one. When a destination fails,
/// the cursor stops before that destination's first record of the round;
/// the next round delivers from there again to every destination, and the
/// ones that already hold the messages skip them (dedup by message id).
async fn relay_round(core: &Core, group: &Group, cursor: &mut Cursor) -> Result<usize> {
    let records = group.reader.outbox(cursor.delivered_upto, ROUND)?;
    metrics::gauge!("rim_relay_backlog", "shard" => group.shard.0.to_string()).set(records.len() as f64);
    let ack = std::mem::take(&mut cursor.unacked);
    let ack_fut = async {
        if ack.is_empty() {
            return Ok(());
        }
        let op = O::AckOutbox(store::AckOutbox { outbox_ids: ack.clone() });
        core.propose(group.shard, store::Op { op: Some(op) }).await.map(|_| ())
    };
    if records.is_empty() {
        if let Err(e) = ack_fut.await {
            cursor.unacked = ack;
            return Err(e);
        }
        return Ok(0);
    }
    let placement = core.placement()?;
    // Per destination shard: the records (in order) with their recipients there.
    let mut by_dest: BTreeMap<ShardId, Vec<(usize, OutboxRecord)>> = BTreeMap::new();
    for (i, rec) in records.iter().enumerate() {
        let mut split: BTreeMap<ShardId, Vec<u64>> = BTreeMap::new();
        for &r in &rec.recipients {
            split.entry(placement.shard_of_user(UserId(r))).or_default().push(r);
        }
        for (dest, recipients) in split {
            let item = OutboxRecord { recipients, ..rec.clone() };
            by_dest.entry(dest).or_default().push((i, item));
        }
    }
    let deliveries = by_dest.into_iter().map(|(dest, items)| async move {
        let first_index = items.first().map(|(i, _)| *i).unwrap_or(0);
        let deliver = O::Deliver(store::Deliver { items: items.into_iter().map(|(_, r)| r).collect() });
        match core.propose(dest, store::Op { op: Some(deliver) }).await {
            Ok(r) => {
                if let Some(store::op_result::Value::Delivered(d)) = r.value
                    && !d.missing_users.is_empty()
                {
                    tracing::warn!(shard = %dest, users = ?d.missing_users, "relay dropped messages to unknown users");
                }
                None
            }
            Err(e) => {
                tracing::debug!(to = %dest, error = %e, "delivery failed");
                Some(first_index)
            }
        }
    });
    let (failed, acked) = tokio::join!(futures::future::join_all(deliveries), ack_fut);
    if acked.is_err() {
        // Not removed yet: try again with the next round's removals.
        cursor.unacked.extend(ack);
    }
    // `done_upto`: records [0, done_upto) are delivered everywhere.
    let done_upto = failed.into_iter().flatten().min().unwrap_or(records.len());
    if done_upto > 0 {
        cursor.delivered_upto = records[done_upto - 1].outbox_id;
        cursor.unacked.extend(records[..done_upto].iter().map(|r| r.outbox_id));
    }
    if done_upto < records.len() && done_upto == 0 {
        return Err(crate::error::Error::Unavailable("no destination accepted the relay round".into()));
    }
    Ok(done_upto)
}
