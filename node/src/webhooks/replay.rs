//! Dead letters through the server API (`ListDeadLetters`,
//! `ReplayDeadLetters`, scope `events`; docs/server-api.md).
//!
//! Dead letters live per data shard, numbered in dead-letter order
//! (`rim-raft-store` `im::events`). A letter is named `dl_<shard>_<number>`.
//!
//! * **List** reads every data shard linearizably (`Core::view`: the local
//!   replica past a read barrier, or forwarded to one that hosts the shard),
//!   in shard order, each from the position in `after`, like `GET /events`.
//! * **Replay** POSTs each named letter (or the endpoint's first `limit`)
//!   to its endpoint as delivery does ([`super::deliver::post`]): the
//!   event's exact body bytes, `webhook-id` = its event id, a fresh
//!   timestamp and signature. A 2xx removes the letter through Raft
//!   (`RemoveDeadLetter` on its shard); any other outcome keeps it.
//!
//! Bounds: at most [`MAX_LETTERS`] letters per call, at most
//! [`CONCURRENT_POSTS`] requests in flight, each with the endpoint's
//! `timeout_ms`.

use std::sync::Arc;

use futures::StreamExt as _;
use rim_proto::ErrorCode;
use rim_proto::ids::ShardId;
use rim_proto::server_api::*;
use rim_proto::store::{self, op::Op as O};

use super::Endpoint;
use crate::core::Core;
use crate::error::{Error, Result};

/// Most letters one list or replay handles.
pub const MAX_LETTERS: usize = 100;
/// Most replay requests in flight per call.
const CONCURRENT_POSTS: usize = 8;

fn bad(message: impl Into<String>) -> Error {
    Error::rejected(ErrorCode::ErrorBadRequest, message)
}

/// `dl_<shard>_<number>`.
fn letter_id(shard: ShardId, number: u64) -> String {
    format!("dl_{}_{number}", shard.0)
}

fn parse_letter_id(id: &str) -> Option<(ShardId, u64)> {
    let (shard, number) = id.strip_prefix("dl_")?.split_once('_')?;
    Some((ShardId(shard.parse().ok()?), number.parse().ok()?))
}

/// The configured endpoint named `name` (built afresh: its client's
/// timeout is the endpoint's `timeout_ms`).
fn endpoint(core: &Core, name: &str) -> Result<Arc<Endpoint>> {
    let all = super::endpoints(&core.config.webhooks)?;
    all.into_iter()
        .find(|e| e.config.name == name)
        .ok_or_else(|| bad(format!("no webhook endpoint is named {name:?}")))
}

fn info(shard: ShardId, l: store::DeadLetter) -> DeadLetterInfo {
    let rec = l.record.unwrap_or_default();
    let event = rec.event.unwrap_or_default();
    DeadLetterInfo {
        letter_id: letter_id(shard, l.number),
        event_id: event.event_id,
        r#type: event.r#type,
        body: String::from_utf8_lossy(&event.body).into_owned(),
        reason: rec.reason,
        dead_ms: rec.dead_ms,
        created_ms: event.created_ms,
    }
}

/// The data shards, in order.
fn shards(core: &Core) -> Result<Vec<ShardId>> {
    Ok(core.placement()?.data_shards().map(|s| ShardId(s.shard_id)).collect())
}

/// Up to `limit` letters of `endpoint` after `after`, with their shards,
/// the next `after` and whether more may follow.
async fn letters(
    core: &Core,
    endpoint: &str,
    after: Option<(ShardId, u64)>,
    limit: usize,
) -> Result<(Vec<(ShardId, store::DeadLetter)>, String, bool)> {
    let mut out = Vec::new();
    let mut next = after.map(|(s, n)| letter_id(s, n)).unwrap_or_default();
    for shard in shards(core)? {
        let from = match after {
            Some((s, _)) if shard < s => continue,
            Some((s, n)) if shard == s => n,
            _ => 0,
        };
        if out.len() >= limit {
            return Ok((out, next, true));
        }
        let page = core.view(shard).await?.dead_letters(endpoint, from, limit - out.len()).await?;
        next = letter_id(shard, page.scanned_to);
        out.extend(page.letters.into_iter().map(|l| (shard, l)));
        if page.has_more {
            return Ok((out, next, true));
        }
    }
    Ok((out, next, false))
}

fn check_endpoint_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > rim_raft_store::im::MAX_ENDPOINT_NAME {
        return Err(bad("endpoint must be 1..=64 bytes"));
    }
    Ok(())
}

fn page_limit(limit: u32) -> Result<usize> {
    match limit as usize {
        0 => Ok(MAX_LETTERS),
        n @ 1..=MAX_LETTERS => Ok(n),
        _ => Err(bad(format!("limit must be 0..={MAX_LETTERS}"))),
    }
}

/// ListDeadLetters (the caller's scope already checked).
pub async fn list(core: &Core, r: ListDeadLettersRequest) -> Result<ListDeadLettersReply> {
    check_endpoint_name(&r.endpoint)?;
    let limit = page_limit(r.limit)?;
    let after = if r.after.is_empty() {
        None
    } else {
        Some(parse_letter_id(&r.after).ok_or_else(|| bad("after is not a `next` of ListDeadLetters"))?)
    };
    let (found, next, has_more) = letters(core, &r.endpoint, after, limit).await?;
    let letters = found.into_iter().map(|(s, l)| info(s, l)).collect();
    Ok(ListDeadLettersReply { letters, next, has_more })
}

/// One letter's replay: POST, and on a 2xx remove it through Raft.
async fn replay_one(core: &Core, endpoint: &Endpoint, shard: ShardId, l: store::DeadLetter) -> ReplayResult {
    let event = l.record.and_then(|r| r.event).unwrap_or_default();
    let mut out = ReplayResult {
        letter_id: letter_id(shard, l.number),
        event_id: event.event_id.clone(),
        outcome: "failed".into(),
        reason: String::new(),
    };
    match super::deliver::post(endpoint, &event).await {
        Ok(status) if status.is_success() => {
            let o = O::RemoveDeadLetter(store::RemoveDeadLetter {
                endpoint: endpoint.config.name.clone(),
                number: l.number,
            });
            match core.propose(shard, store::Op { op: Some(o) }).await {
                Ok(_) => out.outcome = "replayed".into(),
                // Delivered, but still listed: a later replay sends it again
                // (at least once, the same id and bytes).
                Err(e) => out.reason = format!("delivered, but not removed: {e}"),
            }
        }
        Ok(status) => out.reason = format!("HTTP {}", status.as_u16()),
        Err(e) => out.reason = e.without_url().to_string(),
    }
    let outcome = out.outcome.clone();
    metrics::counter!("rim_webhook_replays_total", "endpoint" => endpoint.config.name.clone(), "outcome" => outcome)
        .increment(1);
    out
}

/// ReplayDeadLetters (the caller's scope already checked).
pub async fn replay(core: &Core, r: ReplayDeadLettersRequest) -> Result<ReplayDeadLettersReply> {
    check_endpoint_name(&r.endpoint)?;
    let endpoint = endpoint(core, &r.endpoint)?;
    // Each entry: the letter's id, and the letter if it is there.
    let mut todo: Vec<(String, Option<(ShardId, store::DeadLetter)>)> = Vec::new();
    if r.letter_ids.is_empty() {
        if !r.all {
            return Err(bad("name letter_ids, or set all"));
        }
        let (found, _, _) = letters(core, &r.endpoint, None, page_limit(r.limit)?).await?;
        todo.extend(found.into_iter().map(|(s, l)| (letter_id(s, l.number), Some((s, l)))));
    } else {
        if r.all || r.letter_ids.len() > MAX_LETTERS {
            return Err(bad(format!("1..={MAX_LETTERS} letter_ids, without all")));
        }
        for id in &r.letter_ids {
            let (shard, number) = parse_letter_id(id)
                .filter(|(_, n)| *n > 0)
                .ok_or_else(|| bad(format!("{id:?} is not a letter id of ListDeadLetters")))?;
            let page = core.view(shard).await?.dead_letters(&r.endpoint, number - 1, 1).await?;
            let letter = page.letters.into_iter().find(|l| l.number == number);
            todo.push((id.clone(), letter.map(|l| (shard, l))));
        }
    }
    let endpoint = &endpoint;
    let results: Vec<ReplayResult> = futures::stream::iter(todo)
        .map(|(id, letter)| async move {
            match letter {
                Some((shard, l)) => replay_one(core, endpoint, shard, l).await,
                None => ReplayResult { letter_id: id, outcome: "not_found".into(), ..Default::default() },
            }
        })
        .buffered(CONCURRENT_POSTS)
        .collect()
        .await;
    let count =
        |o: &str| u32::try_from(results.iter().filter(|r| r.outcome == o).count()).unwrap_or(u32::MAX);
    Ok(ReplayDeadLettersReply { replayed: count("replayed"), failed: count("failed"), results })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letter_ids_round_trip_and_junk_is_refused() {
        assert_eq!(parse_letter_id(&letter_id(ShardId(3), 42)), Some((ShardId(3), 42)));
        for junk in ["", "dl_", "dl_1", "dl_x_1", "dl_1_-1", "evt_1_2", "dl_1_2_3"] {
            assert_eq!(parse_letter_id(junk), None, "{junk}");
        }
    }
}
