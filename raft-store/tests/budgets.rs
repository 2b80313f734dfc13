//! Byte budgets and forged content types (the hostile-clients issue, §1 and
//! §5): what one user sends can never break another user's sync.
//!
//! * A sync page stops at `MAX_PAGE_BYTES` of messages (at least one), for
//!   user lists and group lists alike: 20 messages of 60 KiB used to come
//!   back as one 1.2 MB page, larger than a frame.
//! * Mentions are bounded by count, every client operation by its encoded
//!   size ([`Limits::check_op`], run before proposing and again at apply).
//! * Clients cannot send RECALL, READ_RECEIPT or NOTIFICATION entries: only
//!   apply makes those (a forged recall used to hide any message of the
//!   conversation in the conversation view).

mod common;

use common::*;
use prost::Message as _;
use rim_proto::ErrorCode;
use rim_proto::store::{self, GroupKind, op::Op as O};
use rim_proto::v1::ContentType;
use rim_raft_store::{GroupId, Limits, MAX_PAGE_BYTES, MAX_TAIL_BYTES, Page, Seq, UserId};

const A: u64 = 101;
const B: u64 = 202;
/// Content of each large message: 20 of them are more than a 1 MiB frame.
const BIG: usize = 60 << 10;
const COUNT: u64 = 20;

fn page_bytes(p: &Page) -> usize {
    p.messages.iter().map(|m| m.encoded_len()).sum()
}

/// Pages through a list with `read(after)`, checking every page's budget;
/// returns the seqs read and the number of pages.
fn read_all(mut read: impl FnMut(Seq) -> Page) -> (Vec<u64>, usize) {
    let (mut seqs, mut pages, mut after) = (Vec::new(), 0, Seq::ZERO);
    loop {
        let page = read(after);
        pages += 1;
        assert!(!page.messages.is_empty() || !page.has_more, "an empty page never claims more");
        let largest = page.messages.iter().map(|m| m.encoded_len()).max().unwrap_or(0);
        assert!(
            page_bytes(&page) <= MAX_PAGE_BYTES + largest,
            "a page of {} bytes passes the {MAX_PAGE_BYTES}-byte budget by more than one message",
            page_bytes(&page)
        );
        seqs.extend(page.messages.iter().map(|m| m.seq));
        let Some(last) = page.messages.last() else { return (seqs, pages) };
        after = Seq(last.seq);
        if !page.has_more {
            return (seqs, pages);
        }
    }
}

#[tokio::test]
async fn a_tail_read_stops_at_its_byte_budget() {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    let body = "x".repeat(BIG);
    // More than MAX_TAIL_BYTES of large messages, then small ones.
    let large = (MAX_TAIL_BYTES / BIG + 8) as u64;
    for i in 0..large {
        sent(&n.apply1(1, send(A, B, &format!("tail-{i}"), &body)).await);
    }
    let r = n.reader(1);
    let tail = r.tail(UserId(B), 2_000).unwrap();
    let bytes: usize = tail.iter().map(|m| m.encoded_len()).sum();
    assert!(bytes <= MAX_TAIL_BYTES + BIG + 256, "{bytes} bytes");
    assert!((tail.len() as u64) < large, "the budget, not the count, ended the read");
    assert_eq!(tail[0].seq, large, "newest first");
    assert!(tail.windows(2).all(|w| w[0].seq == w[1].seq + 1), "contiguous");
    for i in 0..5 {
        sent(&n.apply1(1, send(A, B, &format!("small-{i}"), "hi")).await);
    }
    assert_eq!(n.reader(1).tail(UserId(B), 5).unwrap().len(), 5, "small entries: the count ends it");
}

#[tokio::test]
async fn user_sync_pages_stop_at_the_byte_budget() {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    let body = "x".repeat(BIG);
    for i in 0..COUNT {
        sent(&n.apply1(1, send(A, B, &format!("big-{i}"), &body)).await);
    }
    let r = n.reader(1);
    let first = r.sync(UserId(B), Seq::ZERO, 500).unwrap();
    assert!(first.has_more, "the first page cannot hold {COUNT} messages of {BIG} bytes");
    assert!(page_bytes(&first) <= MAX_PAGE_BYTES + BIG + 256);
    let (seqs, pages) = read_all(|after| r.sync(UserId(B), after, 500).unwrap());
    assert_eq!(seqs, (1..=COUNT).collect::<Vec<_>>(), "every message once, in order");
    assert!(pages >= 3, "{pages} pages");
    // Small messages still come many to a page.
    let (c, d) = (303, 404);
    n.apply(1, vec![create_user(c), create_user(d)]).await;
    for i in 0..COUNT {
        sent(&n.apply1(1, send(c, d, &format!("small-{i}"), "hi")).await);
    }
    let page = n.reader(1).sync(UserId(d), Seq::ZERO, 500).unwrap();
    assert_eq!((page.messages.len() as u64, page.has_more), (COUNT, false), "small messages, one page");
}

#[tokio::test]
async fn group_sync_pages_stop_at_the_byte_budget() {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    let g = 7;
    n.apply1(1, create_group(g, GroupKind::Super, A, &[B])).await;
    let body = "y".repeat(BIG);
    for i in 0..COUNT {
        sent(&n.apply1(1, send_group(g, A, &format!("g-{i}"), &body)).await);
    }
    let r = n.reader(1);
    let (seqs, pages) = read_all(|after| r.sync_group(GroupId(g), after, 500).unwrap());
    // The creation notice, then the sends.
    assert_eq!(seqs, (1..=COUNT + 1).collect::<Vec<_>>());
    assert!(pages >= 3, "{pages} pages");
}

#[tokio::test]
async fn one_message_larger_than_the_budget_still_comes_alone() {
    let limits =
        Limits { max_content_bytes: MAX_PAGE_BYTES + 1000, max_op_bytes: 2 << 20, ..Limits::default() };
    let mut n = Node::with_limits(&[1], limits);
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    let body = "z".repeat(MAX_PAGE_BYTES + 1000);
    sent(&n.apply1(1, send(A, B, "huge-1", &body)).await);
    sent(&n.apply1(1, send(A, B, "huge-2", &body)).await);
    let (seqs, pages) = read_all(|after| n.reader(1).sync(UserId(B), after, 500).unwrap());
    assert_eq!((seqs, pages), (vec![1, 2], 2), "one message per page, none skipped");
}

fn mentions(n: u64) -> store::Op {
    let mut op = send_group(7, A, "m-1", "hi all");
    if let Some(O::SendToGroup(s)) = &mut op.op {
        s.mentions = (1..=n).collect();
    }
    op
}

#[tokio::test]
async fn mentions_are_bounded_by_count() {
    let limits = Limits::default();
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    n.apply1(1, create_group(7, GroupKind::Small, A, &[B])).await;
    let too_many = mentions(limits.max_mentions as u64 + 1);
    assert_eq!(limits.check_op(&too_many).unwrap_err().code(), ErrorCode::ErrorBadRequest);
    assert_eq!(code(&n.apply1(1, too_many).await), ErrorCode::ErrorBadRequest, "refused at apply too");
    sent(&n.apply1(1, mentions(limits.max_mentions as u64)).await);
    let list = n.reader(1).sync(UserId(B), Seq::ZERO, 100).unwrap().messages;
    assert_eq!(list.last().unwrap().mentions.len(), limits.max_mentions);
}

#[tokio::test]
async fn every_client_operation_is_bounded_by_bytes() {
    let limits = Limits::default();
    // 50,000 member ids: far over the operation budget, refused before proposing.
    let add = op(O::AddMembers(store::AddMembers {
        group_id: 7,
        by_user_id: A,
        user_ids: (1..=50_000).map(|i| (1 << 40) + i).collect(),
    }));
    assert!(add.encoded_len() > limits.max_op_bytes);
    assert_eq!(limits.check_op(&add).unwrap_err().code(), ErrorCode::ErrorContentTooLarge);
    // A 1 MiB body (a frame's worth) never reaches the log.
    let body = "b".repeat(1 << 20);
    assert_eq!(
        limits.check_op(&send(A, B, "c-1", &body)).unwrap_err().code(),
        ErrorCode::ErrorContentTooLarge
    );
    // Deliveries are made by the relay, which bounds them itself.
    let deliver = op(O::Deliver(store::Deliver { items: vec![store::OutboxRecord::default(); 5_000] }));
    assert!(limits.check_op(&deliver).is_ok());
}

#[tokio::test]
async fn clients_cannot_send_the_content_types_the_server_makes() {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    n.apply1(1, create_group(7, GroupKind::Small, A, &[B])).await;
    let target = sent(&n.apply1(1, send(A, B, "real", "hello")).await);
    for t in [ContentType::Recall, ContentType::ReadReceipt, ContentType::Notification] {
        let mut forged = send(A, B, &format!("forged-{}", t as i32), "");
        let mut forged_group = send_group(7, A, &format!("forged-g-{}", t as i32), "");
        let mut forged_push = op(O::PushToUsers(store::PushToUsers {
            user_ids: vec![B],
            content_type: t as i32,
            content: b"x".to_vec().into(),
            ..Default::default()
        }));
        for o in [&mut forged, &mut forged_group] {
            match &mut o.op {
                Some(O::SendToUser(s)) => {
                    s.content_type = t as i32;
                    s.refers_to = target.message_id;
                }
                Some(O::SendToGroup(s)) => s.content_type = t as i32,
                _ => unreachable!(),
            }
        }
        for o in [forged, forged_group, std::mem::take(&mut forged_push)] {
            assert_eq!(code(&n.apply1(1, o).await), ErrorCode::ErrorBadRequest, "{t:?}");
        }
    }
    // Nothing was written: B's list holds the group notice and the real message only.
    let list = n.reader(1).sync(UserId(B), Seq::ZERO, 100).unwrap().messages;
    assert!(list.iter().all(|m| m.content_type != ContentType::Recall as i32), "{list:?}");
    assert_eq!(list.iter().filter(|m| m.content_type == ContentType::Text as i32).count(), 1);
}
