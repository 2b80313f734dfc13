//! Seq arithmetic at the edges. Every read by position is tried after 0,
//! the head, the head + 1 and 2^64-1 ([`Seq::MAX`]); every append is tried
//! on a list whose head is `Seq::MAX - 1` and `Seq::MAX`.
//!
//! Nothing follows `Seq::MAX`: a read after it is empty (`Seq::next` once
//! wrapped it to 0 in release builds, so the read returned the whole list
//! from seq 1, and panicked in debug builds), and an append to a list whose
//! head is `Seq::MAX` is refused and writes nothing.

mod common;

use common::*;
use rim_proto::ErrorCode;
use rim_proto::store::{self, GroupKind, ListHead, op::Op as O};
use rim_proto::v1::ConversationKind;
use rim_raft_store::db::{self, CF_SM};
use rim_raft_store::keys::{self, MetaTag};
use rim_raft_store::{DeviceId, GroupId, Limits, Seq, ShardId, UserId};

const A: u64 = 101;
const B: u64 = 202;
const LAST: u64 = u64::MAX;

/// The `after` values every read is tried with, for a list whose head is `head`.
fn edges(head: u64) -> [u64; 4] {
    [0, head, head + 1, LAST]
}

/// The seqs a read after `after` must return from a list holding `held`.
fn expected(held: &[u64], after: u64) -> Vec<u64> {
    held.iter().copied().filter(|s| *s > after).collect()
}

/// Overwrites a list head in shard 1, as if the list had grown that long.
fn set_head(n: &Node, key: Vec<u8>, first_seq: u64, last_seq: u64) {
    let head = ListHead { first_seq, last_seq, ..ListHead::default() };
    n.db.raw().put_cf(n.db.cf(CF_SM), key, db::encode(&head)).unwrap();
}

fn seqs(page: &rim_raft_store::Page) -> Vec<u64> {
    page.messages.iter().map(|m| m.seq).collect()
}

#[tokio::test]
async fn user_list_reads_stop_at_the_head_and_nothing_follows_the_last_seq() {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    for i in 0..3 {
        sent(&n.apply1(1, send(A, B, &format!("m{i}"), "x")).await);
    }
    let r = n.reader(1);
    for after in edges(3) {
        let page = r.sync(UserId(B), Seq(after), 100).unwrap();
        assert_eq!(seqs(&page), expected(&[1, 2, 3], after), "sync after {after}");
        assert_eq!((page.head.last_seq, page.has_more), (3, false), "sync after {after}");
    }
    // An empty list (an unknown user) reads nothing at every edge.
    for after in edges(0) {
        let page = r.sync(UserId(999), Seq(after), 100).unwrap();
        assert_eq!((seqs(&page), page.head.last_seq), (vec![], 0), "empty list after {after}");
    }
}

#[tokio::test]
async fn group_list_reads_stop_at_the_head_and_nothing_follows_the_last_seq() {
    let limits =
        Limits { room_retention: store::Retention { max_count: 3, max_age_ms: 0 }, ..Limits::default() };
    let mut n = Node::with_limits(&[1], limits);
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    // Small and super group: a creation notice and two sends.
    for (g, kind) in [(9, GroupKind::Small), (10, GroupKind::Super)] {
        n.apply1(1, create_group(g, kind, A, &[B])).await;
        for i in 0..2 {
            sent(&n.apply1(1, send_group(g, A, &format!("g{g}-{i}"), "x")).await);
        }
        for after in edges(3) {
            let page = n.reader(1).sync_group(GroupId(g), Seq(after), 100).unwrap();
            assert_eq!(seqs(&page), expected(&[1, 2, 3], after), "group {g} after {after}");
            assert_eq!((page.head.last_seq, page.has_more), (3, false), "group {g} after {after}");
        }
    }
    // A room trimmed to its newest 3 entries: reads start at the oldest kept.
    n.apply1(1, create_group(11, GroupKind::Room, 0, &[])).await;
    for i in 0..6 {
        sent(&n.apply1(1, send_group(11, A, &format!("r{i}"), "x")).await);
    }
    let r = n.reader(1);
    for after in [0, 2, 4, 6, 7, LAST] {
        let page = r.sync_group(GroupId(11), Seq(after), 100).unwrap();
        assert_eq!(seqs(&page), expected(&[4, 5, 6], after), "room after {after}");
        assert_eq!((page.head.first_seq, page.head.last_seq), (4, 6), "room after {after}");
    }
    // An unknown group reads nothing at every edge.
    for after in edges(0) {
        assert_eq!(seqs(&r.sync_group(GroupId(404), Seq(after), 100).unwrap()), vec![] as Vec<u64>);
    }
}

#[tokio::test]
async fn acks_and_read_positions_are_clamped_to_the_head() {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B), register_device(B, 5)]).await;
    for i in 0..3 {
        sent(&n.apply1(1, send(A, B, &format!("m{i}"), "x")).await);
    }
    let ack = |seq| op(O::AckSeq(store::AckSeq { user_id: B, device_id: 5, seq }));
    let read = |seq| {
        op(O::MarkRead(store::MarkRead {
            user_id: B,
            device_id: 5,
            conversation_kind: ConversationKind::User as i32,
            conversation_id: A,
            read_seq: seq,
            receipt_message_id: 0,
        }))
    };
    for (after, want) in edges(3).into_iter().zip([0, 3, 3, 3]) {
        let r = n.apply1(1, ack(after)).await;
        assert_eq!(r.value, Some(store::op_result::Value::AckSeq(want)), "ack {after}: {}", r.message);
        let r = n.apply1(1, read(after)).await;
        assert_eq!(r.value, Some(store::op_result::Value::ReadSeq(want)), "read {after}: {}", r.message);
    }
    assert_eq!(n.reader(1).device(UserId(B), DeviceId(5)).unwrap().unwrap().ack_seq, 3);
    assert_eq!(n.reader(1).read_position(UserId(B), ConversationKind::User as i32, A).unwrap(), 3);
}

#[tokio::test]
async fn member_and_outbox_pages_after_the_last_id_are_empty() {
    let mut n = Node::new(&[1]);
    // B is local; LAST and 7 live in other shards (so the outbox owes them).
    n.apply(1, vec![create_user(A), create_user(B), create_group(9, GroupKind::Small, A, &[B, 7, LAST])])
        .await;
    let r = n.reader(1);
    let members = |after: u64| -> Vec<u64> {
        r.members(GroupId(9), UserId(after), 100).unwrap().0.iter().map(|m| m.user_id).collect()
    };
    assert_eq!(members(0), vec![7, A, B, LAST]);
    assert_eq!(members(B), vec![LAST]);
    assert_eq!(members(LAST - 1), vec![LAST]);
    assert_eq!(members(LAST), vec![] as Vec<u64>, "no member after the last user id");

    let outbox =
        |after: u64| -> Vec<u64> { r.outbox(after, 100).unwrap().iter().map(|o| o.outbox_id).collect() };
    assert_eq!(outbox(0), vec![1]);
    assert_eq!(outbox(1), vec![] as Vec<u64>);
    assert_eq!(outbox(LAST), vec![] as Vec<u64>);
}

#[tokio::test]
async fn a_user_list_at_the_last_seq_takes_no_more_entries() {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    set_head(&n, keys::user_head(ShardId(1), UserId(B)), 0, LAST - 1);

    let s = sent(&n.apply1(1, send(B, A, "last", "x")).await);
    assert_eq!(s.seq, LAST, "the last position is usable");
    let r = n.reader(1);
    assert_eq!(seqs(&r.sync(UserId(B), Seq(LAST - 2), 100).unwrap()), vec![LAST]);
    assert_eq!(seqs(&r.sync(UserId(B), Seq(LAST - 1), 100).unwrap()), vec![LAST]);
    let page = r.sync(UserId(B), Seq(LAST), 100).unwrap();
    assert_eq!((seqs(&page), page.head.last_seq, page.has_more), (vec![], LAST, false));

    // Full: a send from B or to B is refused, and writes nothing anywhere.
    let before = r.data_digest().unwrap();
    for o in [send(B, A, "over", "x"), send(A, B, "over", "x")] {
        let res = n.apply1(1, o).await;
        assert_eq!(code(&res), ErrorCode::ErrorInternal, "{}", res.message);
        assert!(res.message.contains("is full"), "{}", res.message);
    }
    assert_eq!(r.data_digest().unwrap(), before);
    assert_eq!(r.user_head(UserId(B)).unwrap().last_seq, LAST);
}

#[tokio::test]
async fn a_group_list_at_the_last_seq_takes_no_more_entries() {
    let limits =
        Limits { room_retention: store::Retention { max_count: 5, max_age_ms: 0 }, ..Limits::default() };
    let mut n = Node::with_limits(&[1], limits);
    n.apply(1, vec![create_user(A), create_group(11, GroupKind::Room, 0, &[])]).await;
    set_head(&n, keys::group_head(ShardId(1), GroupId(11)), LAST - 1, LAST - 1);

    // The append reaches the last seq and retention counts the list right.
    let s = sent(&n.apply1(1, send_group(11, A, "last", "x")).await);
    assert_eq!(s.group_seq, LAST);
    let r = n.reader(1);
    assert_eq!(seqs(&r.sync_group(GroupId(11), Seq(LAST - 1), 100).unwrap()), vec![LAST]);
    let page = r.sync_group(GroupId(11), Seq(LAST), 100).unwrap();
    assert_eq!((seqs(&page), page.head.first_seq, page.head.last_seq), (vec![], LAST - 1, LAST));

    let before = r.data_digest().unwrap();
    let res = n.apply1(1, send_group(11, A, "over", "x")).await;
    assert_eq!(code(&res), ErrorCode::ErrorInternal, "{}", res.message);
    assert_eq!(r.data_digest().unwrap(), before, "a refused group send writes nothing");
}

#[tokio::test]
async fn the_push_log_at_the_last_position_refuses_idempotent_pushes() {
    let mut n = Node::new(&[1]);
    n.apply1(1, create_user(A)).await;
    set_head(&n, keys::meta(ShardId(1), MetaTag::PushHead), 0, LAST);
    let push = |cmid: &str| {
        op(O::PushToUsers(store::PushToUsers {
            user_ids: vec![A],
            sender_user_id: 0,
            content_type: rim_proto::v1::ContentType::Text as i32,
            content: b"promo".to_vec().into(),
            client_msg_id: cmid.into(),
            ..Default::default()
        }))
    };
    let before = n.reader(1).data_digest().unwrap();
    let res = n.apply1(1, push("p1")).await;
    assert_eq!(code(&res), ErrorCode::ErrorInternal, "{}", res.message);
    assert_eq!(n.reader(1).data_digest().unwrap(), before, "nothing of the push was written");
    // A push without an id is not logged and still goes through.
    assert_eq!(code(&n.apply1(1, push("")).await), ErrorCode::Ok);
}

#[tokio::test]
async fn a_read_receipt_names_a_message_the_peer_sent_to_the_reader() {
    const C: u64 = 303;
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B), create_user(C), register_device(B, 5)]).await;
    let from_a = sent(&n.apply1(1, send(A, B, "m-a", "x")).await);
    let from_c = sent(&n.apply1(1, send(C, B, "m-c", "x")).await);
    let own = sent(&n.apply1(1, send(B, A, "m-b", "x")).await);
    let receipt = |message_id| {
        op(O::MarkRead(store::MarkRead {
            user_id: B,
            device_id: 5,
            conversation_kind: ConversationKind::User as i32,
            conversation_id: A,
            read_seq: 1,
            receipt_message_id: message_id,
        }))
    };
    // Made up, sent by someone else, or sent by the reader: refused, and
    // the position does not move either.
    for bad in [999_999, from_c.message_id, own.message_id] {
        let r = n.apply1(1, receipt(bad)).await;
        assert_eq!(r.code, ErrorCode::ErrorMessageNotFound as i32, "receipt for {bad}: {}", r.message);
    }
    assert_eq!(n.reader(1).read_position(UserId(B), ConversationKind::User as i32, A).unwrap(), 0);
    let r = n.apply1(1, receipt(from_a.message_id)).await;
    assert_eq!(r.code, 0, "{}", r.message);
    let receipts: Vec<_> = list(&n.reader(1), A)
        .into_iter()
        .filter(|m| m.content_type == rim_proto::v1::ContentType::ReadReceipt as i32)
        .collect();
    assert_eq!(receipts.len(), 1);
    assert_eq!(receipts[0].refers_to, from_a.message_id);
}
