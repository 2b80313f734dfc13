//! Super groups and online-only pushes over one session, without IO: the
//! subscription of a super group (backlog from the join point, live pushes,
//! gap repair), the end of a membership, and the priority rules of
//! online-only pushes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use prost::Message as _;
use rim_gateway::{Action, CallError, CallId, NodeCall, NodeReply, Session, SessionConfig};
use rim_proto::ErrorCode;
use rim_proto::ids::{GroupId, Seq};
use rim_proto::store::{self, GroupChanged, GroupKind, GroupMembersChanged, Notification};
use rim_proto::v1::{
    Command, ContentType, ConversationKind, ListKind, Message, MessagePush, Packet, PushPriority,
    PushedMessage, SubscribeRoomInput, SubscribeRoomOutput, SyncGroupInput, SyncGroupOutput,
    UnsubscribeRoomInput,
};

const GROUP: u64 = 70;

/// Entry `seq` of GROUP's list (as `common::entry`, kind SUPER_GROUP).
fn group_entry(seq: u64) -> Message {
    Message {
        conversation_kind: ConversationKind::SuperGroup as i32,
        conversation_id: GROUP,
        group_seq: seq,
        ..entry(seq)
    }
}

fn group_push(message: Message, priority: PushPriority) -> PushedMessage {
    PushedMessage {
        list_kind: ListKind::Group as i32,
        owner_id: GROUP,
        seq: message.seq,
        message: Some(message),
        priority: priority as i32,
        persisted: true,
        skip_device_id: 0,
    }
}

fn push(seq: u64) -> PushedMessage {
    group_push(group_entry(seq), PushPriority::Unspecified)
}

/// A notification entry `seq` of GROUP's list.
fn notice(seq: u64, event: store::notification::Event) -> Message {
    Message {
        content_type: ContentType::Notification as i32,
        content: Notification { event: Some(event) }.encode_to_vec().into(),
        ..group_entry(seq)
    }
}

fn removed(seq: u64, users: Vec<u64>) -> Message {
    let e = GroupMembersChanged {
        group_id: GROUP,
        kind: GroupKind::Super as i32,
        user_ids: users,
        ..Default::default()
    };
    notice(seq, store::notification::Event::GroupMembersRemoved(e))
}

fn page(range: std::ops::RangeInclusive<u64>, first: u64, has_more: bool) -> NodeReply {
    let last = *range.end();
    NodeReply::SyncGroup(SyncGroupOutput {
        messages: range.map(group_entry).collect(),
        has_more,
        last_group_seq: last,
        first_group_seq: first,
    })
}

/// A sync answer with nothing after the cursor, the list ending at `last`.
fn empty(last: u64) -> NodeReply {
    NodeReply::SyncGroup(SyncGroupOutput { last_group_seq: last, first_group_seq: 1, ..Default::default() })
}

fn group_sync(actions: &[Action]) -> Option<(CallId, SyncGroupInput)> {
    calls(actions).into_iter().find_map(|c| match c.request {
        NodeCall::SyncGroup(input) => Some((c.id, input)),
        _ => None,
    })
}

fn unsubscribes(actions: &[Action]) -> bool {
    calls(actions)
        .iter()
        .any(|c| c.request == NodeCall::UnsubscribeRoom(UnsubscribeRoomInput { room_id: GROUP }))
}

/// SUBSCRIBE_ROOM of GROUP after `after_seq`, answered as a super group
/// whose list ends at `last` and whose first readable entry is `first`;
/// returns the backlog sync's call and its `after_group_seq`.
fn subscribe(s: &mut Session, t0: Instant, after_seq: u64, last: u64, first: u64) -> (CallId, u64) {
    s.on_packet(t0, packet(9, Command::SubscribeRoom, SubscribeRoomInput { room_id: GROUP, after_seq }));
    let call = only_call(&drain(s));
    assert_eq!(call.request, NodeCall::SubscribeRoom(SubscribeRoomInput { room_id: GROUP, after_seq }));
    let out = SubscribeRoomOutput { last_seq: last, first_seq: first };
    s.on_reply(t0, call.id, Ok(NodeReply::SubscribeGroup(out)));
    let actions = drain(s);
    let reply = &sent(&actions)[0];
    assert_eq!((reply.request_id, reply_of(reply).code), (9, 0));
    assert_eq!(reply_of(reply).data, out.encode_to_vec());
    let (id, input) = group_sync(&actions).expect("the backlog is synced");
    (id, input.after_group_seq)
}

/// A session subscribed to GROUP with everything up to `last` delivered.
fn subscribed(t0: Instant, last: u64) -> Session {
    let mut s = signed_in(SessionConfig::default(), t0, 0);
    let (id, after) = subscribe(&mut s, t0, last, last, 1);
    assert_eq!(after, last);
    s.on_reply(t0, id, Ok(empty(last)));
    assert!(drain(&mut s).is_empty());
    s.on_written(usize::MAX);
    s
}

#[test]
fn a_super_group_backlog_then_live_pushes_each_once_and_gaps_repaired() {
    let t0 = Instant::now();
    let mut s = signed_in(SessionConfig::default(), t0, 0);
    let (id, after) = subscribe(&mut s, t0, 3, 6, 2);
    assert_eq!(after, 3, "the backlog starts at the client's cursor");
    s.on_push(t0, push(7));
    s.on_push(t0, push(6));
    assert!(pushed_seqs(&drain(&mut s)).is_empty(), "held while the backlog is read");
    s.on_reply(t0, id, Ok(page(4..=6, 2, false)));
    assert_eq!(pushed_seqs(&drain(&mut s)), [4, 5, 6, 7]);
    s.on_push(t0, push(7));
    s.on_push(t0, push(8));
    assert_eq!(pushed_seqs(&drain(&mut s)), [8]);

    // A lost push: the next one is held and the gap synced from 8.
    s.on_push(t0, push(10));
    let actions = drain(&mut s);
    assert!(pushed_seqs(&actions).is_empty());
    let (id, input) = group_sync(&actions).expect("a gap sync");
    assert_eq!((input.group_id, input.after_group_seq), (GROUP, 8));
    s.on_reply(t0, id, Ok(page(9..=10, 1, false)));
    assert_eq!(pushed_seqs(&drain(&mut s)), [9, 10]);
    assert_eq!(s.last_room_seq(GroupId(GROUP)), Some(Seq(10)));

    // A stream re-established: everything is synced from the cursor again.
    s.on_resync_needed(t0);
    let (id, input) = group_sync(&drain(&mut s)).expect("a resync");
    assert_eq!(input.after_group_seq, 10);
    s.on_reply(t0, id, Ok(page(11..=11, 1, false)));
    assert_eq!(pushed_seqs(&drain(&mut s)), [11]);
    assert!(!s.is_closed());
}

#[test]
fn after_seq_zero_reads_a_super_group_from_the_join_point() {
    let t0 = Instant::now();
    let mut s = signed_in(SessionConfig::default(), t0, 0);
    // The member joined after seq 4: its first readable entry is 5.
    let (id, after) = subscribe(&mut s, t0, 0, 9, 5);
    assert_eq!(after, 4);
    s.on_reply(t0, id, Ok(page(5..=9, 1, false)));
    assert_eq!(pushed_seqs(&drain(&mut s)), [5, 6, 7, 8, 9]);
    // A cursor from before the join point is moved to it as well.
    let (id, after) = subscribe(&mut s, t0, 2, 9, 5);
    assert_eq!(after, 4);
    s.on_reply(t0, id, Ok(page(5..=9, 1, false)));
    assert_eq!(pushed_seqs(&drain(&mut s)), [5, 6, 7, 8, 9]);
}

#[test]
fn a_refused_subscription_is_relayed_and_leaves_nothing_subscribed() {
    let t0 = Instant::now();
    let mut s = signed_in(SessionConfig::default(), t0, 0);
    s.on_packet(t0, packet(4, Command::SubscribeRoom, SubscribeRoomInput { room_id: GROUP, after_seq: 0 }));
    let call = only_call(&drain(&mut s));
    let e = CallError::new(ErrorCode::ErrorNotGroupMember, "not a member");
    s.on_reply(t0, call.id, Err(e));
    let actions = drain(&mut s);
    assert_eq!(reply_of(&sent(&actions)[0]).code, ErrorCode::ErrorNotGroupMember as i32);
    assert!(unsubscribes(&actions), "the router's subscription is undone too");
    assert!(s.rooms().is_empty());
    s.on_push(t0, push(1));
    assert!(drain(&mut s).is_empty(), "no pushes of a list not subscribed");
}

#[test]
fn a_removal_of_the_user_is_delivered_then_ends_the_subscription() {
    let t0 = Instant::now();
    let mut s = subscribed(t0, 3);
    // Another member's removal changes nothing.
    s.on_push(t0, group_push(removed(4, vec![USER + 1]), PushPriority::Normal));
    let actions = drain(&mut s);
    assert_eq!(sent(&actions).len(), 1);
    assert!(calls(&actions).is_empty());

    s.on_push(t0, group_push(removed(5, vec![USER + 1, USER]), PushPriority::Normal));
    let actions = drain(&mut s);
    let p = &sent(&actions)[0];
    assert_eq!((p.command, p.seq), (Command::Message as i32, 5), "the removal is delivered first");
    assert!(unsubscribes(&actions));
    assert!(s.rooms().is_empty());
    s.on_push(t0, push(6));
    assert!(drain(&mut s).is_empty(), "nothing after the removal");
}

#[test]
fn a_dissolution_ends_the_subscription_even_behind_a_gap() {
    let t0 = Instant::now();
    let mut s = subscribed(t0, 3);
    s.on_push(t0, push(5));
    let actions = drain(&mut s);
    assert!(group_sync(&actions).is_some(), "4 is missing");
    // The group is dissolved while 4 is being repaired: nobody can read it
    // any more, so the notice goes out at once and the subscription ends.
    let dissolved = GroupChanged { group_id: GROUP, kind: GroupKind::Super as i32, ..Default::default() };
    let last = notice(6, store::notification::Event::GroupDissolved(dissolved));
    s.on_push(t0, group_push(last, PushPriority::Normal));
    let actions = drain(&mut s);
    let pushed: Vec<u64> = sent(&actions).iter().map(|p| p.seq).collect();
    assert_eq!(pushed, [6]);
    assert!(unsubscribes(&actions));
    assert!(s.rooms().is_empty());
    assert!(!s.is_closed());
}

#[test]
fn small_group_entries_of_a_converted_group_are_not_sent_from_its_list() {
    let t0 = Instant::now();
    let mut s = signed_in(SessionConfig::default(), t0, 0);
    let (id, _) = subscribe(&mut s, t0, 0, 4, 1);
    let mut messages: Vec<Message> = (1..=4).map(group_entry).collect();
    for m in &mut messages[..2] {
        m.conversation_kind = ConversationKind::Group as i32; // before the conversion
    }
    let out = SyncGroupOutput { messages, has_more: false, last_group_seq: 4, first_group_seq: 1 };
    s.on_reply(t0, id, Ok(NodeReply::SyncGroup(out)));
    assert_eq!(pushed_seqs(&drain(&mut s)), [3, 4]);
    assert_eq!(s.last_room_seq(GroupId(GROUP)), Some(Seq(4)));
}

#[test]
fn super_group_pushes_are_never_skipped_for_a_slow_client() {
    let t0 = Instant::now();
    let config = SessionConfig { send_queue_limit: 300, ..SessionConfig::default() };
    let mut s = signed_in(config, t0, 0);
    let (id, _) = subscribe(&mut s, t0, 0, 0, 1);
    s.on_reply(t0, id, Ok(empty(0)));
    drain(&mut s);
    s.on_written(usize::MAX);
    let mut seqs = Vec::new();
    for seq in 1..=20 {
        s.on_push(t0, push(seq));
        let actions = drain(&mut s);
        seqs.extend(pushed_seqs(&actions));
        if closes_with(&actions, ErrorCode::ErrorBusy) {
            break;
        }
    }
    assert!(s.is_closed(), "closed rather than skipping");
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "no entry skipped before the close");
}

#[test]
fn a_large_backlog_is_read_at_the_pace_of_the_client() {
    let t0 = Instant::now();
    let delay = Duration::from_millis(100);
    let one = rim_proto::codec::encoded_frame_len(&Packet {
        command: Command::Message as i32,
        content: MessagePush { message: Some(group_entry(10)), persisted: true }.encode_to_vec().into(),
        seq: 10,
        request_id: 0,
    });
    let limit = 30 * one;
    let config =
        SessionConfig { send_queue_limit: limit, resync_retry_delay: delay, ..SessionConfig::default() };
    let mut s = signed_in(config, t0, 0);
    let (id, _) = subscribe(&mut s, t0, 0, 1_000, 1);
    s.on_written(usize::MAX);
    s.on_reply(t0, id, Ok(page(1..=20, 1, true)));
    let actions = drain(&mut s);
    assert_eq!(pushed_seqs(&actions).len(), 20);
    assert!(s.queued_bytes() > limit / 2, "the page fills more than half the queue");
    assert!(group_sync(&actions).is_none(), "the next page waits for the client");
    assert_eq!(s.next_deadline(), Some(t0 + delay));
    s.on_written(usize::MAX);
    s.on_tick(t0 + delay);
    let (_, input) = group_sync(&drain(&mut s)).expect("the next page");
    assert_eq!(input.after_group_seq, 20);
    assert!(!s.is_closed());
}

// ------------------------------------------------------------ online-only

fn online(list_kind: ListKind, owner_id: u64, priority: PushPriority, id: u64) -> PushedMessage {
    PushedMessage {
        list_kind: list_kind as i32,
        owner_id,
        seq: 0,
        message: Some(Message { message_id: id, content: vec![b'x'; 40].into(), ..Default::default() }),
        priority: priority as i32,
        persisted: false,
        skip_device_id: 0,
    }
}

/// The message ids of online-only MESSAGE pushes among `actions`.
fn online_ids(actions: &[Action]) -> Vec<u64> {
    sent(actions)
        .iter()
        .filter(|p| p.command == Command::Message as i32)
        .map(|p| {
            assert_eq!((p.request_id, p.seq), (0, 0));
            let push = MessagePush::decode(p.content.clone()).unwrap();
            assert!(!push.persisted);
            push.message.unwrap().message_id
        })
        .collect()
}

#[test]
fn online_pushes_reach_their_addressees_without_touching_cursors() {
    let t0 = Instant::now();
    let mut s = subscribed(t0, 3);
    let before = s.last_delivered_seq();
    s.on_push(t0, online(ListKind::User, USER, PushPriority::Normal, 1));
    s.on_push(t0, online(ListKind::User, USER + 1, PushPriority::Normal, 2));
    s.on_push(t0, online(ListKind::Group, GROUP, PushPriority::Normal, 3));
    s.on_push(t0, online(ListKind::Group, GROUP + 1, PushPriority::High, 4));
    s.on_push(t0, online(ListKind::Unspecified, 0, PushPriority::High, 5));
    let mut own = online(ListKind::User, USER, PushPriority::High, 6);
    own.skip_device_id = DEVICE;
    s.on_push(t0, own);
    let actions = drain(&mut s);
    assert_eq!(online_ids(&actions), [1, 3, 5]);
    assert!(calls(&actions).is_empty(), "no gap checks");
    assert_eq!(s.last_delivered_seq(), before);
    assert_eq!(s.last_room_seq(GroupId(GROUP)), Some(Seq(3)));
}

#[test]
fn normal_online_pushes_are_dropped_for_a_half_full_queue_high_ones_kept() {
    let t0 = Instant::now();
    let one = rim_proto::codec::encoded_frame_len(&Packet {
        command: Command::Message as i32,
        content: MessagePush {
            message: online(ListKind::User, USER, PushPriority::Normal, 1).message,
            persisted: false,
        }
        .encode_to_vec()
        .into(),
        ..Default::default()
    });
    let config = SessionConfig { send_queue_limit: 10 * one, ..SessionConfig::default() };
    let mut s = signed_in(config, t0, 0);
    let mut got = Vec::new();
    for id in 1..=8 {
        s.on_push(t0, online(ListKind::User, USER, PushPriority::Normal, id));
        got.extend(online_ids(&drain(&mut s)));
    }
    assert_eq!(got, [1, 2, 3, 4, 5, 6], "up to half the queue, then dropped");
    assert_eq!(s.dropped_pushes(), 2);
    assert!(!s.is_closed());
    // High priority is queued like a persisted push, until the queue is full.
    s.on_push(t0, online(ListKind::User, USER, PushPriority::High, 9));
    assert_eq!(online_ids(&drain(&mut s)), [9]);
    // Once the client reads, normal ones go out again.
    s.on_written(usize::MAX);
    s.on_push(t0, online(ListKind::User, USER, PushPriority::Normal, 10));
    assert_eq!(online_ids(&drain(&mut s)), [10]);
    assert_eq!(s.dropped_pushes(), 2);
    // A high one that does not fit closes the connection, as a persisted one.
    for id in 11..=30 {
        s.on_push(t0, online(ListKind::User, USER, PushPriority::High, id));
    }
    assert!(closes_with(&drain(&mut s), ErrorCode::ErrorBusy));
}
