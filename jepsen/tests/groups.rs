//! Hand-made histories with small groups and super groups: a correct one
//! passes under every option; each group anomaly (partial fan-out, members
//! ordering a group differently, lost acks of members and of a super group's
//! list, copies with another group seq, misdelivery, a non-member sender, a
//! hole in a small group's seqs, a stale super-group read, a causal
//! violation) is flagged with exactly its kind.

mod common;

use common::{H, assert_only, assert_valid};
use rim_jepsen::checker::{AnomalyKind as K, CheckOptions, Consistency, Validity};
use rim_jepsen::history::ConvKind;

const G: u64 = 7001;
const S: u64 = 7002;

fn all_options() -> [CheckOptions; 4] {
    [
        CheckOptions::default(),
        CheckOptions { consistency: Consistency::Linearizable, single_shard: true },
        CheckOptions { consistency: Consistency::Session, single_shard: false },
        CheckOptions { consistency: Consistency::Eventual, single_shard: true },
    ]
}

/// Small group G = {1, 2, 3} and super group S = {1, 2, 3, 4}.
fn groups() -> H {
    let mut h = H::new();
    h.create_group(G, ConvKind::Group, &[1, 2, 3]);
    h.create_group(S, ConvKind::Super, &[4, 1, 2, 3]);
    h
}

/// a (1→G) and b (2→G) acked, c (3→G) indeterminate and applied, d (1→G)
/// indeterminate and never applied; x (4→S) acked, y (2→S) indeterminate
/// and applied; e (1→2) 1:1. Members interleave the group with their other
/// entries (and the two groups' notifications) differently, but keep the
/// group's order.
fn valid_history() -> H {
    let mut h = groups();
    h.ok_group_send(1, G, "a", 2);
    let e = h.entries_from(2, &["#n7002", "a"]);
    h.sync(3, 1, e, Some(3));
    h.ok_group_send(2, G, "b", 3);
    h.info_group_send(3, G, "c", 4);
    h.info_group_send(1, G, "d", 5);
    h.ok_send(1, 2, "e", 5);
    h.ok_group_send(4, S, "x", 2);
    h.info_group_send(2, S, "y", 3);
    let e = h.entries_from(1, &["#n7002", "x"]);
    h.group_sync(3, S, 0, e, Some(2));
    let e = h.entries_from(3, &["y"]);
    h.group_sync(3, S, 2, e, Some(3));
    h.finals(1, &["#n7001", "#n7002", "a", "b", "e", "c"]);
    h.finals(2, &["#n7002", "#n7001", "a", "b", "e", "c"]);
    h.finals(3, &["#n7001", "#n7002", "a", "b", "c"]);
    h.finals(4, &["#n7002"]);
    h.group_finals(S, 4, &["#n7002", "x", "y"]);
    h
}

#[test]
fn a_valid_group_history_passes_under_every_option() {
    let h = valid_history();
    for options in all_options() {
        assert_valid(&h.check_with(options));
    }
    let r = h.check();
    assert_eq!((r.stats.sends.invoked, r.stats.group_sends.invoked), (7, 6));
    assert_eq!((r.stats.group_sends.ok, r.stats.group_sends.info), (3, 3));
    assert_eq!(r.stats.indeterminate_sends.appeared, 2);
    assert_eq!(r.stats.indeterminate_sends.never_appeared, 1);
    let text = rim_jepsen::checker::render_text(&r);
    assert!(text.contains("of which to groups"), "{text}");
}

#[test]
fn the_history_of_a_real_group_send_reads_back() {
    // The workload writes these fields; the checker reads them back from JSONL.
    let h = valid_history();
    let mut text = String::new();
    for op in &h.ops {
        text.push_str(&serde_json::to_string(op).unwrap());
        text.push('\n');
    }
    assert!(text.contains(r#""f":"create-group""#) && text.contains(r#""kind":"super""#), "{text}");
    assert!(text.contains(r#""group":7002"#) && text.contains(r#""notification":true"#), "{text}");
    let loaded = rim_jepsen::history::parse_history(text.as_bytes()).unwrap();
    assert_eq!(loaded.ops, h.ops);
    assert_valid(&rim_jepsen::checker::check_loaded(&loaded, &CheckOptions::default()));
}

#[test]
fn partial_fanout_of_an_indeterminate_small_group_send() {
    let mut h = groups();
    h.ok_group_send(1, G, "a", 2);
    h.info_group_send(3, G, "c", 3);
    h.finals(1, &["#n7001", "a", "c"]);
    h.finals(2, &["#n7001", "a", "c"]);
    h.finals(3, &["#n7001", "a"]);
    let r = h.check();
    assert_only(&r, K::PartialFanout);
    let ex = &r.anomalies["partial-fanout"].examples[0];
    assert_eq!((ex.list, ex.msg.as_deref()), (Some(3), Some("c")));
    assert!(ex.found.contains("u1, u2") && ex.found.contains("u3"), "{}", ex.found);
}

#[test]
fn members_ordering_a_group_differently() {
    let mut h = groups();
    h.ok_group_send(1, G, "a", 2);
    h.ok_group_send(2, G, "b", 3);
    h.finals(1, &["#n7001", "a", "b"]);
    h.finals(2, &["#n7001", "b", "a"]);
    h.finals(3, &["#n7001", "a", "b"]);
    let r = h.check();
    assert_only(&r, K::ConversationOrder);
    assert_eq!(r.count(K::ConversationOrder), 1);
    let ex = &r.anomalies["conversation-order"].examples[0];
    assert_eq!(ex.list, Some(2));
    assert_eq!(ex.kind.invariant(), "IM-10");
}

#[test]
fn members_ordering_a_group_differently_without_group_seqs() {
    // Copies without group seqs (and indeterminate sends, so no acked
    // group seq either): the members' lists are compared directly.
    let mut h = groups();
    h.info_group_send(1, G, "a", 0);
    h.info_group_send(2, G, "b", 0);
    h.finals(1, &["a", "b"]);
    h.finals(2, &["a", "b"]);
    h.finals(3, &["b", "a"]);
    let r = h.check();
    assert_only(&r, K::ConversationOrder);
    assert_eq!(r.anomalies["conversation-order"].examples[0].list, Some(3));
}

#[test]
fn an_acked_small_group_send_missing_from_a_member() {
    let mut h = groups();
    h.ok_group_send(1, G, "a", 2);
    h.finals(1, &["#n7001", "a"]);
    h.finals(2, &["#n7001", "a"]);
    h.finals(3, &["#n7001"]);
    let r = h.check();
    assert_only(&r, K::LostAck);
    assert_eq!(r.anomalies["lost-ack"].examples[0].list, Some(3));
}

#[test]
fn an_acked_super_group_send_missing_from_the_group_list() {
    let mut h = groups();
    h.ok_group_send(4, S, "x", 2);
    h.ok_group_send(4, S, "z", 3);
    h.group_finals(S, 4, &["#n7002", "x"]);
    for u in 1..=4 {
        h.finals(u, &["#n7002"]);
    }
    let r = h.check();
    assert_only(&r, K::LostAck);
    let ex = &r.anomalies["lost-ack"].examples[0];
    assert_eq!((ex.list, ex.group, ex.seq), (None, Some(S), Some(3)));
    assert!(ex.text().contains("list g7002"), "{}", ex.text());
}

#[test]
fn a_super_group_message_twice_in_the_group_list() {
    let mut h = groups();
    h.ok_group_send(4, S, "x", 2);
    h.group_finals(S, 4, &["#n7002", "x", "x"]);
    assert_only(&h.check(), K::Duplicate);
}

#[test]
fn a_copy_with_another_group_seq() {
    let mut h = groups();
    h.ok_group_send(1, G, "a", 2);
    h.finals(1, &["#n7001", "a"]);
    h.finals(3, &["#n7001", "a"]);
    let mut e = h.entries_from(1, &["#n7001", "a"]);
    e[1].group_seq = 3;
    for node in common::NODES {
        h.final_raw(2, node, e.clone());
    }
    let r = h.check();
    assert_only(&r, K::Duplicate);
    assert_eq!(r.anomalies["duplicate"].examples[0].group, Some(G));
}

#[test]
fn group_messages_in_the_wrong_lists() {
    // A small group's message in a non-member's list.
    let mut h = groups();
    h.ok_group_send(1, G, "a", 2);
    h.finals(1, &["#n7001", "a"]);
    h.finals(2, &["#n7001", "a"]);
    h.finals(3, &["#n7001", "a"]);
    h.finals(4, &["a"]);
    assert_only(&h.check(), K::Phantom);

    // A super group's message copied into a member's own list.
    let mut h = groups();
    h.ok_group_send(4, S, "x", 2);
    h.group_finals(S, 4, &["#n7002", "x"]);
    h.finals(1, &["x"]);
    assert_only(&h.check(), K::Phantom);

    // The entry claims a 1:1 message is a group's.
    let mut h = groups();
    h.ok_send(1, 2, "e", 1);
    let mut e = h.entries_from(1, &["e"]);
    e[0].kind = ConvKind::Group;
    e[0].to = G;
    e[0].group_seq = 2;
    h.sync(2, 0, e, Some(1));
    h.finals(1, &["e"]);
    h.finals(2, &["e"]);
    assert_only(&h.check(), K::Phantom);
}

#[test]
fn a_group_message_from_a_non_member() {
    let mut h = groups();
    h.ok_group_send(4, G, "a", 2);
    h.finals(1, &["#n7001", "a"]);
    h.finals(2, &["#n7001", "a"]);
    h.finals(3, &["#n7001", "a"]);
    let r = h.check();
    assert_only(&r, K::Phantom);
    assert!(r.anomalies["phantom"].examples[0].found.contains("not a member"), "{:?}", r.anomalies);
}

#[test]
fn a_hole_in_a_small_groups_seqs() {
    // Group seq 3 reached no member and no ack names it.
    let mut h = groups();
    h.ok_group_send(1, G, "a", 2);
    h.ok_group_send(2, G, "b", 4);
    for u in 1..=3 {
        h.finals(u, &["#n7001", "a", "b"]);
    }
    let r = h.check();
    assert_only(&r, K::Gap);
    let ex = &r.anomalies["gap"].examples[0];
    assert_eq!((ex.group, ex.seq), (Some(G), Some(3)));
}

#[test]
fn a_stale_super_group_read() {
    let mut h = groups();
    h.ok_group_send(4, S, "x", 2);
    let e = h.entries_from(1, &["#n7002"]);
    h.group_sync(2, S, 0, e, Some(1));
    h.group_finals(S, 4, &["#n7002", "x"]);
    let r = h.check();
    assert_only(&r, K::StaleRead);
    assert_eq!(r.anomalies["stale-read"].examples[0].group, Some(S));
    assert_valid(&h.check_with(CheckOptions { consistency: Consistency::Session, single_shard: false }));
}

#[test]
fn a_group_send_placed_before_what_its_device_had_seen() {
    let mut h = groups();
    h.info_group_send(2, S, "y", 3);
    let e = h.entries_from(3, &["y"]);
    h.group_sync(1, S, 2, e, Some(3));
    h.ok_group_send(1, S, "z", 2);
    h.group_finals(S, 4, &["#n7002", "z", "y"]);
    let r = h.check();
    assert_only(&r, K::Causal);
    assert_eq!(r.anomalies["causal"].examples[0].group, Some(S));
}

#[test]
fn sends_to_a_small_group_of_unknown_members_leave_the_verdict_unknown() {
    let mut h = H::new();
    h.ok_group_send(1, 9999, "a", 1);
    h.finals(1, &["a"]);
    let r = h.check();
    assert_eq!(r.valid, Validity::Unknown, "{}", rim_jepsen::checker::render_text(&r));
    assert!(r.unknown.iter().any(|u| u.contains("g9999")), "{:?}", r.unknown);
}
