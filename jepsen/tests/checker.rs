//! Hand-made histories: one per anomaly kind is flagged with exactly that
//! kind; valid ones (with indeterminate, failed and retried sends) pass.

mod common;

use common::{H, assert_only, assert_valid};
use rim_jepsen::checker::{AnomalyKind as K, CheckOptions, Consistency, Validity};
use rim_jepsen::history::OpType;

fn strict() -> CheckOptions {
    CheckOptions { consistency: Consistency::Linearizable, single_shard: true }
}

/// u1 sends a to u2, u2 sends b to u1; c (1→3) is indeterminate and appears,
/// d (3→1) is indeterminate and never appears, e (2→3) failed.
fn valid_history() -> H {
    let mut h = H::new();
    h.nemesis("partition-start");
    h.ok_send(1, 2, "a", 1);
    h.ok_send(2, 1, "b", 2);
    h.info_send(1, 3, "c");
    h.info_send(3, 1, "d");
    h.fail_send(2, 3, "e");
    h.nemesis("partition-stop");
    let e = h.entries_from(1, &["a", "b"]);
    h.sync(2, 0, e, Some(2));
    let e = h.entries_from(3, &["c"]);
    h.sync(1, 2, e, Some(3));
    h.sync(3, 0, Vec::new(), Some(0));
    let e = h.entries_from(1, &["c"]);
    h.sync(3, 0, e, Some(1));
    h.finals(1, &["a", "b", "c"]);
    h.finals(2, &["a", "b"]);
    h.finals(3, &["c"]);
    h
}

#[test]
fn a_valid_history_passes_under_every_option() {
    let h = valid_history();
    for options in [
        CheckOptions::default(),
        strict(),
        CheckOptions { consistency: Consistency::Session, single_shard: false },
        CheckOptions { consistency: Consistency::Eventual, single_shard: true },
    ] {
        let r = h.check_with(options);
        assert_valid(&r);
    }
    let r = h.check();
    assert_eq!(r.stats.sends.invoked, 5);
    assert_eq!((r.stats.sends.ok, r.stats.sends.fail, r.stats.sends.info), (2, 1, 2));
    assert_eq!(r.stats.indeterminate_sends.appeared, 1);
    assert_eq!(r.stats.indeterminate_sends.never_appeared, 1);
    assert_eq!(r.stats.windows.len(), 3);
    // a reached u2's sync; no sync of u1 returned b.
    assert_eq!(r.stats.delivery_lag_ms.as_ref().map(|p| p.count), Some(1));
    assert_eq!(r.stats.acked_unseen_by_recipient, 1);
}

#[test]
fn an_indeterminate_send_retried_with_the_same_id_appears_once() {
    let mut h = H::new();
    h.info_send(1, 2, "a");
    let p = h.invoke_send(1, 2, "a");
    h.complete_send(p, OpType::Ok, Some(1));
    h.finals(1, &["a"]);
    h.finals(2, &["a"]);
    assert_valid(&h.check_with(strict()));
}

#[test]
fn an_indeterminate_send_that_appears_only_later_passes() {
    let mut h = H::new();
    h.info_send(1, 2, "a");
    h.sync(2, 0, Vec::new(), Some(0));
    h.ok_send(1, 2, "b", 1);
    let e = h.entries_from(1, &["b", "a"]);
    h.sync(2, 0, e, Some(2));
    h.finals(1, &["b", "a"]);
    h.finals(2, &["b", "a"]);
    assert_valid(&h.check_with(strict()));
}

#[test]
fn without_final_reads_the_verdict_is_unknown() {
    let mut h = H::new();
    h.ok_send(1, 2, "a", 1);
    let r = h.check();
    assert_eq!(r.valid, Validity::Unknown);
    assert!(r.unknown.iter().any(|u| u.contains("no final read")), "{:?}", r.unknown);
    assert_eq!(r.valid.exit_code(), 2);
}

#[test]
fn a_final_read_that_timed_out_makes_it_unknown() {
    let mut h = valid_history();
    let mut invoke = h.ops.iter().rev().find(|o| o.f() == "final-read").unwrap().clone();
    invoke.op_type = OpType::Invoke;
    invoke.process = rim_jepsen::history::Process::Worker(777);
    if let rim_jepsen::history::OpBody::FinalRead(v) = &mut invoke.body {
        v.entries = None;
    }
    invoke.index = h.ops.len() as u64;
    h.ops.push(invoke);
    let r = h.check();
    assert_eq!(r.valid, Validity::Unknown, "{:?}", r.unknown);
}

#[test]
fn divergence() {
    let mut h = H::new();
    h.ok_send(1, 2, "a", 1);
    h.ok_send(3, 2, "b", 1);
    h.finals(1, &["a"]);
    h.finals(3, &["b"]);
    for (node, ids) in [("n1", ["a", "b"]), ("n2", ["b", "a"]), ("n3", ["a", "b"])] {
        let e = h.entries_from(1, &ids);
        h.final_raw(2, node, e);
    }
    assert_only(&h.check(), K::Divergence);
}

#[test]
fn pushes_that_agree_pass_and_a_push_at_a_taken_seq_is_a_divergence() {
    let mut h = H::new();
    h.ok_send(1, 2, "a", 1);
    h.ok_send(3, 2, "b", 1);
    let e = h.entries_from(1, &["a"]);
    h.push_to(2, e);
    h.finals(1, &["a"]);
    h.finals(3, &["b"]);
    h.finals(2, &["a", "b"]);
    assert_valid(&h.check());
    // A push claiming seq 1 of u2 for b, which every read has at seq 2.
    let e = h.entries_from(1, &["b"]);
    h.push_to(2, e);
    assert_only(&h.check(), K::Divergence);
}

#[test]
fn final_read_mismatch() {
    let mut h = H::new();
    h.ok_send(1, 2, "a", 1);
    h.info_send(1, 2, "c");
    h.finals(1, &["a", "c"]);
    for (node, ids) in [("n1", &["a", "c"][..]), ("n2", &["a", "c"][..]), ("n3", &["a"][..])] {
        let e = h.entries_from(1, ids);
        h.final_raw(2, node, e);
    }
    assert_only(&h.check(), K::FinalReadMismatch);
}

#[test]
fn duplicate() {
    let mut h = H::new();
    h.ok_send(1, 2, "a", 1);
    h.finals(1, &["a"]);
    h.finals(2, &["a", "a"]);
    let r = h.check();
    assert_only(&r, K::Duplicate);
    assert_eq!(r.anomalies["duplicate"].examples[0].list, Some(2));
}

#[test]
fn duplicate_by_two_message_ids() {
    let mut h = H::new();
    h.ok_send(1, 2, "a", 1);
    h.finals(1, &["a"]);
    let mut e = h.entries_from(1, &["a"]);
    e[0].message_id = 4242;
    h.sync(2, 0, e, Some(1));
    h.finals(2, &["a"]);
    assert_only(&h.check(), K::Duplicate);
}

#[test]
fn gap() {
    let mut h = H::new();
    h.ok_send(1, 2, "a", 1);
    h.ok_send(1, 2, "b", 2);
    let e = vec![h.entry(2, "b")];
    h.sync(2, 0, e, Some(2));
    h.finals(1, &["a", "b"]);
    h.finals(2, &["a", "b"]);
    let r = h.check();
    assert_only(&r, K::Gap);
    assert_eq!(r.anomalies["gap"].examples[0].seq, Some(1));
}

#[test]
fn gap_in_a_final_read_that_stops_short_of_its_last_seq() {
    let mut h = H::new();
    h.ok_send(1, 2, "a", 1);
    h.finals(1, &["a"]);
    h.finals(2, &["a"]);
    let last = h.ops.len() - 1;
    if let rim_jepsen::history::OpBody::FinalRead(v) = &mut h.ops[last].body {
        v.last_seq = Some(2);
    }
    assert_only(&h.check(), K::Gap);
}

#[test]
fn non_monotonic_read() {
    let mut h = H::new();
    h.ok_send(1, 2, "a", 1);
    h.ok_send(1, 2, "b", 2);
    let e = h.entries_from(1, &["a", "b"]);
    h.sync(2, 0, e, Some(2));
    h.sync(2, 2, Vec::new(), Some(1));
    h.finals(1, &["a", "b"]);
    h.finals(2, &["a", "b"]);
    assert_only(&h.check(), K::NonMonotonicRead);
}

#[test]
fn phantom_unknown_payload() {
    let mut h = H::new();
    h.ok_send(1, 2, "a", 1);
    h.finals(1, &["a"]);
    h.finals(2, &["a", "z"]);
    assert_only(&h.check(), K::Phantom);
}

#[test]
fn phantom_misdelivered_wrong_sender_and_too_early() {
    // Misdelivered: a (1→2) in u3's list.
    let mut h = H::new();
    h.ok_send(1, 2, "a", 1);
    h.finals(1, &["a"]);
    h.finals(2, &["a"]);
    h.finals(3, &["a"]);
    assert_only(&h.check(), K::Phantom);

    // Wrong sender recorded in the entry.
    let mut h = H::new();
    h.ok_send(1, 2, "a", 1);
    h.finals(1, &["a"]);
    let mut e = h.entries_from(1, &["a"]);
    e[0].from = 3;
    h.sync(2, 0, e, Some(1));
    h.finals(2, &["a"]);
    assert_only(&h.check(), K::Phantom);

    // Seen by a sync that completed before the send was invoked.
    let mut h = H::new();
    h.ok_send(1, 2, "x", 1);
    let sync_at = h.ops.len();
    h.ok_send(1, 2, "a", 2);
    let e = h.entries_from(1, &["x", "a"]);
    let mut later = H::new();
    std::mem::swap(&mut later.ops, &mut h.ops);
    h.ops = later.ops[..sync_at].to_vec();
    h.sync(2, 0, e, Some(2));
    let shift = h.ops.len() - sync_at;
    for mut op in later.ops[sync_at..].iter().cloned() {
        op.index += shift as u64;
        op.time += 10_000_000;
        h.ops.push(op);
    }
    let r = h.check_with(CheckOptions { consistency: Consistency::Eventual, single_shard: false });
    assert_eq!(r.anomaly_types, vec!["phantom".to_string()], "{}", rim_jepsen::checker::render_text(&r));
}

#[test]
fn aborted_read() {
    let mut h = H::new();
    h.fail_send(1, 2, "e");
    h.finals(1, &["e"]);
    h.finals(2, &["e"]);
    assert_only(&h.check(), K::AbortedRead);
}

#[test]
fn lost_ack() {
    let mut h = H::new();
    h.ok_send(1, 2, "a", 1);
    h.ok_send(1, 2, "b", 2);
    h.finals(1, &["a", "b"]);
    h.finals(2, &["a"]);
    let r = h.check();
    assert_only(&r, K::LostAck);
    let ex = &r.anomalies["lost-ack"].examples[0];
    assert_eq!((ex.list, ex.msg.as_deref()), (Some(2), Some("b")));
}

#[test]
fn lost_entry() {
    let mut h = H::new();
    h.info_send(1, 2, "c");
    let e = h.entries_from(1, &["c"]);
    h.sync(2, 0, e, Some(1));
    h.finals(1, &[]);
    h.finals(2, &[]);
    assert_only(&h.check(), K::LostEntry);
}

#[test]
fn partial_fanout() {
    let mut h = H::new();
    h.info_send(1, 2, "c");
    h.finals(1, &["c"]);
    h.finals(2, &[]);
    assert_only(&h.check(), K::PartialFanout);
}

#[test]
fn stale_read_by_consistency_level() {
    let mut h = H::new();
    h.ok_send(1, 2, "a", 1);
    // Another device of u1 (12) and then the sending device (11) read u1's list too early.
    h.sync_dev(1, 12, 0, Vec::new(), Some(0));
    h.sync_dev(1, 11, 0, Vec::new(), Some(0));
    h.finals(1, &["a"]);
    h.finals(2, &["a"]);
    let r = h.check();
    assert_only(&r, K::StaleRead);
    assert_eq!(r.count(K::StaleRead), 2);
    let r = h.check_with(CheckOptions { consistency: Consistency::Session, single_shard: false });
    assert_only(&r, K::StaleRead);
    assert_eq!(r.count(K::StaleRead), 1);
    assert_valid(&h.check_with(CheckOptions { consistency: Consistency::Eventual, single_shard: false }));
}

#[test]
fn stale_read_of_a_recipient_only_in_single_shard_mode() {
    let mut h = H::new();
    h.ok_send(1, 2, "a", 1);
    h.sync(2, 0, Vec::new(), Some(0));
    h.finals(1, &["a"]);
    h.finals(2, &["a"]);
    assert_valid(&h.check());
    assert_only(&h.check_with(strict()), K::StaleRead);
}

#[test]
fn order_real_time() {
    let mut h = H::new();
    h.ok_send(1, 2, "a", 2);
    h.ok_send(1, 3, "b", 1);
    h.finals(1, &["b", "a"]);
    h.finals(2, &["a"]);
    h.finals(3, &["b"]);
    assert_only(&h.check(), K::Order);
}

#[test]
fn order_per_sender() {
    let mut h = H::new();
    h.ok_send(1, 2, "a", 1);
    h.ok_send(1, 2, "b", 2);
    h.finals(1, &["a", "b"]);
    h.finals(2, &["b", "a"]);
    let r = h.check();
    assert_only(&r, K::Order);
    assert_eq!(r.anomalies["order"].examples[0].list, Some(2));
}

#[test]
fn conversation_order_only_in_single_shard_mode() {
    let mut h = H::new();
    let a = h.invoke_send(1, 2, "a");
    let b = h.invoke_send(2, 1, "b");
    h.complete_send(a, OpType::Ok, Some(1));
    h.complete_send(b, OpType::Ok, Some(1));
    h.finals(1, &["a", "b"]);
    h.finals(2, &["b", "a"]);
    assert_valid(&h.check());
    assert_only(&h.check_with(strict()), K::ConversationOrder);
}

#[test]
fn causal() {
    let mut h = H::new();
    h.info_send(2, 1, "c");
    let e = h.entries_from(1, &["c"]);
    h.sync(1, 0, e, Some(1));
    h.ok_send(1, 2, "m", 2);
    h.finals(1, &["c", "m"]);
    h.finals(2, &["m", "c"]);
    let r = h.check();
    assert_only(&r, K::Causal);
    assert_eq!(r.anomalies["causal"].examples[0].list, Some(2));
}

#[test]
fn results_serialise_like_jepsen() {
    let mut h = H::new();
    h.ok_send(1, 2, "a", 1);
    h.finals(1, &["a"]);
    h.finals(2, &[]);
    let r = h.check();
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["valid"], serde_json::json!(false));
    assert_eq!(json["anomaly_types"], serde_json::json!(["lost-ack"]));
    assert_eq!(json["anomalies"]["lost-ack"]["invariant"], "IM-6");
    let back: rim_jepsen::checker::Results = serde_json::from_value(json).unwrap();
    assert_eq!(back.valid, Validity::Invalid);
    let text = rim_jepsen::checker::render_text(&r);
    assert!(text.starts_with("INVALID"), "{text}");
    assert!(text.contains("lost-ack (IM-6): 1 found"), "{text}");
}

#[test]
fn examples_are_capped_at_eight() {
    let mut h = H::new();
    let ids: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        h.ok_send(1, 2, id, i as u64 + 1);
    }
    let all: Vec<&str> = ids.iter().map(String::as_str).collect();
    h.finals(1, &all);
    h.finals(2, &[]);
    let r = h.check();
    let g = &r.anomalies["lost-ack"];
    assert_eq!((g.count, g.examples.len()), (20, 8));
}
