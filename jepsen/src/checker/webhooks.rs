//! IM-13: the app's event stream (issue 15 §5). The receipts of the run's
//! webhook receiver (`crate::webhooks`) against the history's committed
//! messages:
//!
//! * `bad-signature`: every request verifies under the run's secret;
//! * `event-mismatch`: one event id always carries byte-identical bodies
//!   naming that id, and one message has one `message.created` event id;
//! * `lost-event`: every committed message (in a final read, or acked) has
//!   its `message.created` at least once;
//! * `phantom-event`: nothing else arrives: every `message.created` names a
//!   committed message, with its sender and payload id;
//! * `event-order`: per conversation, the first arrivals of
//!   `message.created` follow the conversation's order (a 1:1
//!   conversation: the lower user id's list; a group: group seqs).
//!
//! Events of other types (group and friend changes) are checked for
//! signatures and identical retries only.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::history::{ConvKind, Entry, Op, OpBody, OpType};
use crate::webhooks::Receipt;

use super::anomaly::{Anomaly, AnomalyKind, Sink};

/// What a committed message is, as the history knows it.
#[derive(Debug, Clone)]
struct Committed {
    from: u64,
    client_msg_id: String,
    /// The conversation, and the message's place in its order (when a final
    /// read showed it).
    place: Option<(String, u64)>,
}

/// The conversation of an entry and its position in the conversation's
/// order, from a final read of `owner`'s (or a group's) list.
fn place(owner: u64, group: Option<u64>, e: &Entry) -> Option<(String, u64)> {
    if let Some(g) = group {
        return Some((format!("g{g}"), e.seq));
    }
    if e.kind.is_group() {
        return Some((format!("g{}", e.to), e.group_seq));
    }
    let (a, b) = (e.from.min(e.to), e.from.max(e.to));
    // The lower user's list orders a 1:1 conversation.
    (owner == a).then(|| (format!("u{a}-u{b}"), e.seq))
}

/// Every committed message by message id.
fn committed(ops: &[Op]) -> HashMap<u64, Committed> {
    let mut out: HashMap<u64, Committed> = HashMap::new();
    for op in ops.iter().filter(|o| o.op_type == OpType::Ok) {
        match &op.body {
            OpBody::FinalRead(v) => {
                for e in v.entries.iter().flatten() {
                    if e.notification || e.message_id == 0 || e.kind == ConvKind::System {
                        continue;
                    }
                    let c = out.entry(e.message_id).or_insert_with(|| Committed {
                        from: e.from,
                        client_msg_id: e.client_msg_id.clone(),
                        place: None,
                    });
                    if c.place.is_none() {
                        c.place = place(v.user, v.group, e);
                    }
                }
            }
            OpBody::Send(v) => {
                if let Some(id) = v.message_id {
                    out.entry(id).or_insert_with(|| Committed {
                        from: v.from,
                        client_msg_id: v.client_msg_id.clone(),
                        place: None,
                    });
                }
            }
            _ => {}
        }
    }
    out
}

/// The fields of a `message.created` body the checker reads.
struct Created {
    message_id: u64,
    sender: u64,
    client_msg_id: String,
}

fn created(body: &serde_json::Value) -> Option<Created> {
    let d = &body["data"];
    let num = |v: &serde_json::Value| v.as_str().and_then(|s| s.parse().ok()).or_else(|| v.as_u64());
    Some(Created {
        message_id: num(&d["message_id"])?,
        sender: num(&d["sender_user_id"])?,
        client_msg_id: d["client_msg_id"].as_str().unwrap_or_default().to_string(),
    })
}

/// Checks the receipts against the history; returns how many
/// `message.created` events arrived (distinct ids).
pub(crate) fn check(ops: &[Op], receipts: &[Receipt], sink: &mut Sink) -> usize {
    let committed = committed(ops);
    let mut bodies: HashMap<&str, &str> = HashMap::new();
    let mut event_of: HashMap<u64, String> = HashMap::new();
    let mut last_in_conv: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut seen: HashSet<u64> = HashSet::new();
    for (i, r) in receipts.iter().enumerate() {
        let at = format!("receipt {i} ({})", r.id);
        if !r.signature_ok {
            sink.push(Anomaly::new(AnomalyKind::BadSignature).expected("a valid v1 signature").found(&at));
        }
        match bodies.get(r.id.as_str()) {
            Some(b) if *b != r.body => {
                sink.push(
                    Anomaly::new(AnomalyKind::EventMismatch)
                        .expected(format!("every delivery of {} byte-identical", r.id))
                        .found(format!("{at}: {} vs {}", b, r.body)),
                );
                continue;
            }
            Some(_) => continue,
            None => {
                bodies.insert(&r.id, &r.body);
            }
        }
        let Ok(body) = serde_json::from_str::<serde_json::Value>(&r.body) else {
            sink.push(Anomaly::new(AnomalyKind::EventMismatch).expected("a JSON body").found(&at));
            continue;
        };
        if body["event_id"].as_str() != Some(r.id.as_str()) {
            sink.push(
                Anomaly::new(AnomalyKind::EventMismatch)
                    .expected("the body's event_id equal to webhook-id")
                    .found(format!("{at}: event_id {}", body["event_id"])),
            );
        }
        if body["type"] != "message.created" {
            continue;
        }
        let Some(ev) = created(&body) else {
            sink.push(Anomaly::new(AnomalyKind::EventMismatch).expected("message.created data").found(&at));
            continue;
        };
        match event_of.get(&ev.message_id) {
            Some(other) if *other != r.id => sink.push(
                Anomaly::new(AnomalyKind::EventMismatch)
                    .expected(format!("one event id for message {}", ev.message_id))
                    .found(format!("{other} and {}", r.id)),
            ),
            _ => {
                event_of.insert(ev.message_id, r.id.clone());
            }
        }
        let Some(c) = committed.get(&ev.message_id) else {
            sink.push(
                Anomaly::new(AnomalyKind::PhantomEvent)
                    .msg(ev.client_msg_id.clone())
                    .expected("an event of a committed message")
                    .found(format!("{at}: message {} is in no final read and no ack", ev.message_id)),
            );
            continue;
        };
        if c.from != ev.sender || c.client_msg_id != ev.client_msg_id {
            sink.push(
                Anomaly::new(AnomalyKind::PhantomEvent)
                    .msg(c.client_msg_id.clone())
                    .expected(format!("sender {} payload {}", c.from, c.client_msg_id))
                    .found(format!("{at}: sender {} payload {}", ev.sender, ev.client_msg_id)),
            );
        }
        if !seen.insert(ev.message_id) {
            continue;
        }
        if let Some((conv, pos)) = &c.place {
            if let Some((last_pos, last_msg)) = last_in_conv.get(conv)
                && pos < last_pos
            {
                sink.push(
                    Anomaly::new(AnomalyKind::EventOrder)
                        .msg(c.client_msg_id.clone())
                        .expected(format!("{conv}: events in conversation order"))
                        .found(format!(
                            "{at}: message {} (position {pos}) first arrived after message {last_msg} (position {last_pos})",
                            ev.message_id
                        )),
                );
            }
            last_in_conv.insert(conv.clone(), (*pos, ev.message_id));
        }
    }
    let mut lost: Vec<(&u64, &Committed)> = committed.iter().filter(|(id, _)| !seen.contains(id)).collect();
    lost.sort_by_key(|(id, _)| **id);
    for (id, c) in lost {
        sink.push(
            Anomaly::new(AnomalyKind::LostEvent)
                .msg(c.client_msg_id.clone())
                .expected(format!("message.created of committed message {id}"))
                .found("no delivery"),
        );
    }
    seen.len()
}

/// How many committed messages have no `message.created` among `receipts`.
pub(crate) fn missing(ops: &[Op], receipts: &[Receipt]) -> usize {
    let arrived: HashSet<u64> = receipts
        .iter()
        .filter_map(|r| serde_json::from_str::<serde_json::Value>(&r.body).ok())
        .filter(|b| b["type"] == "message.created")
        .filter_map(|b| created(&b).map(|c| c.message_id))
        .collect();
    committed(ops).keys().filter(|id| !arrived.contains(id)).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{FinalReadValue, Process};

    fn entry(seq: u64, id: u64, from: u64, to: u64, cmid: &str) -> Entry {
        Entry { seq, message_id: id, client_msg_id: cmid.into(), from, to, ..Entry::default() }
    }

    fn final_read(user: u64, entries: Vec<Entry>) -> Op {
        let body = OpBody::FinalRead(FinalReadValue { user, entries: Some(entries), ..Default::default() });
        Op::new(OpType::Ok, Process::Worker(0), 0, body)
    }

    fn receipt(id: &str, message: u64, from: u64, cmid: &str) -> Receipt {
        let body = serde_json::json!({"type": "message.created", "event_id": id, "timestamp": "t",
            "data": {"message_id": message.to_string(), "sender_user_id": from.to_string(), "client_msg_id": cmid}});
        Receipt { at_ms: 0, id: id.into(), timestamp: "1".into(), signature_ok: true, body: body.to_string() }
    }

    fn kinds(ops: &[Op], receipts: &[Receipt]) -> Vec<AnomalyKind> {
        let mut sink = Sink::default();
        check(ops, receipts, &mut sink);
        sink.groups.keys().copied().collect()
    }

    /// Users 1 and 2 exchange m1 (1→2) and m2 (2→1); user 1's list orders them.
    fn history() -> Vec<Op> {
        vec![
            final_read(1, vec![entry(1, 11, 1, 2, "m1"), entry(2, 12, 2, 1, "m2")]),
            final_read(2, vec![entry(1, 12, 2, 1, "m2"), entry(2, 11, 1, 2, "m1")]),
        ]
    }

    #[test]
    fn every_event_once_in_order_with_retries_is_clean() {
        let r = [receipt("e1", 11, 1, "m1"), receipt("e1", 11, 1, "m1"), receipt("e2", 12, 2, "m2")];
        assert_eq!(kinds(&history(), &r), vec![]);
    }

    #[test]
    fn a_missing_event_is_lost() {
        assert_eq!(kinds(&history(), &[receipt("e1", 11, 1, "m1")]), vec![AnomalyKind::LostEvent]);
    }

    #[test]
    fn order_follows_the_lower_users_list_not_the_higher() {
        let r = [receipt("e2", 12, 2, "m2"), receipt("e1", 11, 1, "m1")];
        assert_eq!(kinds(&history(), &r), vec![AnomalyKind::EventOrder]);
    }

    #[test]
    fn changed_bytes_two_ids_phantoms_and_bad_signatures_are_caught() {
        let mut changed = receipt("e1", 11, 1, "m1");
        changed.body = changed.body.replace("\"t\"", "\"u\"");
        let r = [receipt("e1", 11, 1, "m1"), changed, receipt("e2", 12, 2, "m2")];
        assert_eq!(kinds(&history(), &r), vec![AnomalyKind::EventMismatch]);

        let r = [receipt("e1", 11, 1, "m1"), receipt("e9", 11, 1, "m1"), receipt("e2", 12, 2, "m2")];
        assert_eq!(kinds(&history(), &r), vec![AnomalyKind::EventMismatch]);

        let r = [receipt("e1", 11, 1, "m1"), receipt("e2", 12, 2, "m2"), receipt("e3", 99, 1, "m9")];
        assert_eq!(kinds(&history(), &r), vec![AnomalyKind::PhantomEvent]);

        let mut forged = receipt("e2", 12, 2, "m2");
        forged.signature_ok = false;
        assert_eq!(kinds(&history(), &[receipt("e1", 11, 1, "m1"), forged]), vec![AnomalyKind::BadSignature]);
    }
}
