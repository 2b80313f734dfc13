//! `GET /events?after=CURSOR&limit=N`: events by pull.
//!
//! Authorised by an API key with the `events` scope in
//! `Authorization: Bearer KEY` (no fallback to any cluster secret). The
//! node reads every data shard linearizably (`Core::view`: its replica past
//! a read barrier, or forwarded to one that hosts the shard), in shard
//! order, each from its position in the cursor. The answer:
//!
//! ```json
//! {"events":[<event body>, ...],"next":"CURSOR","has_more":false}
//! ```
//!
//! Each event body is byte for byte what a webhook delivery carries. The
//! cursor is opaque to clients: `shard:index:ordinal` per shard read so far,
//! comma-separated (empty: from the start). Events come in log order per
//! shard, so in order per conversation; an event trimmed after the
//! retention is gone from the pull as well.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rim_proto::ids::ShardId;
use serde::Deserialize;

use crate::core::Core;
use crate::credentials::Credentials;
use crate::error::Error;
use crate::http_api::{error_response, role};
use rim_proto::ErrorCode;

/// Events per answer by default.
const DEFAULT_LIMIT: usize = 100;
/// Most events per answer.
const MAX_LIMIT: usize = 1_000;
/// Most body bytes per answer (at least one event).
const MAX_BYTES: usize = 4 << 20;
/// Longest cursor accepted.
const MAX_CURSOR: usize = 64 << 10;

/// The query string.
#[derive(Debug, Deserialize)]
pub struct Params {
    /// Where the previous answer ended (`next`); absent: from the start.
    #[serde(default)]
    after: String,
    /// Most events to return (1..=1000, default 100).
    limit: Option<usize>,
}

/// What the handler needs.
#[derive(Clone)]
pub struct PullState {
    core: Arc<Core>,
    creds: Credentials,
}

/// The `/events` route, authorising callers with `creds`.
pub fn router(core: Arc<Core>, creds: Credentials) -> axum::Router {
    axum::Router::new().route("/events", axum::routing::get(events)).with_state(PullState { core, creds })
}

/// A refusal, as every HTTP API of the node answers one (`{code, message}`).
fn refuse(code: ErrorCode, message: &str) -> Response {
    error_response(&Error::rejected(code, message))
}

/// Parses `shard:index:ordinal,...`.
fn parse_cursor(s: &str) -> Option<BTreeMap<u32, (u64, u32)>> {
    let mut out = BTreeMap::new();
    if s.is_empty() {
        return Some(out);
    }
    for part in s.split(',') {
        let mut it = part.split(':');
        let shard = it.next()?.parse().ok()?;
        let index = it.next()?.parse().ok()?;
        let ordinal = it.next()?.parse().ok()?;
        if it.next().is_some() || out.insert(shard, (index, ordinal)).is_some() {
            return None;
        }
    }
    Some(out)
}

fn format_cursor(c: &BTreeMap<u32, (u64, u32)>) -> String {
    c.iter().map(|(s, (i, o))| format!("{s}:{i}:{o}")).collect::<Vec<_>>().join(",")
}

async fn events(
    State(st): State<PullState>,
    headers: HeaderMap,
    params: Result<Query<Params>, QueryRejection>,
) -> Response {
    let role = match role(&st.creds, &headers) {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    if !role.may("events", true) {
        return refuse(ErrorCode::ErrorPermissionDenied, "this API key lacks the events scope");
    }
    let Ok(Query(params)) = params else {
        return refuse(ErrorCode::ErrorBadRequest, "bad query string");
    };
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return refuse(ErrorCode::ErrorBadRequest, "limit must be 1..=1000");
    }
    let cursor = (params.after.len() <= MAX_CURSOR).then(|| parse_cursor(&params.after)).flatten();
    let Some(mut cursor) = cursor else {
        return refuse(ErrorCode::ErrorBadRequest, "after is not a cursor of GET /events");
    };
    let shards: Vec<ShardId> = match st.core.placement() {
        Ok(p) => p.data_shards().map(|s| ShardId(s.shard_id)).collect(),
        Err(e) => return error_response(&e),
    };
    let mut bodies: Vec<bytes::Bytes> = Vec::new();
    let (mut bytes, mut has_more) = (0usize, false);
    for shard in shards {
        if bodies.len() >= limit || bytes >= MAX_BYTES {
            has_more = true;
            break;
        }
        let at = cursor.get(&shard.0).copied().unwrap_or((0, 0));
        let page = match st.core.view(shard).await {
            Ok(view) => view.events(at, limit - bodies.len()).await,
            Err(e) => Err(e),
        };
        let page = match page {
            Ok(p) => p,
            Err(e) => return error_response(&e),
        };
        has_more |= page.has_more;
        for e in page.events {
            if !bodies.is_empty() && bytes + e.body.len() > MAX_BYTES {
                has_more = true;
                break;
            }
            bytes += e.body.len();
            cursor.insert(shard.0, (e.index, e.ordinal));
            bodies.push(e.body);
        }
    }
    let mut out = Vec::with_capacity(bytes + 64);
    out.extend_from_slice(b"{\"events\":[");
    for (i, b) in bodies.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b);
    }
    // The cursor holds digits, ':' and ',' only: no escaping needed.
    out.extend_from_slice(
        format!("],\"next\":\"{}\",\"has_more\":{has_more}}}", format_cursor(&cursor)).as_bytes(),
    );
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], out).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_junk_is_refused() {
        let c = parse_cursor("1:42:0,2:7:3").unwrap();
        assert_eq!(c[&2], (7, 3));
        assert_eq!(format_cursor(&c), "1:42:0,2:7:3");
        assert_eq!(parse_cursor("").unwrap().len(), 0);
        for bad in ["1:2", "1:2:3:4", "x:1:1", "1:1:1,1:2:2", "1:-1:0"] {
            assert!(parse_cursor(bad).is_none(), "{bad}");
        }
    }
}
