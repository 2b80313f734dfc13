//! The session rules of `docs/protocol.md` section 4, one test per rule,
//! driven through the sans-IO `Session` API.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use prost::Message as _;
use rim_gateway::{Action, CallError, CallId, NodeCall, NodeReply, Phase, Session, SessionConfig};
use rim_proto::ids::{DeviceId, Seq, ShardId, UserId};
use rim_proto::v1::{
    AckInput, AckOutput, Command, KickPush, ListKind, MessagePush, Packet, PushPriority, PushedMessage,
    ReadInput, ReadOutput, RecallInput, SendInput, SendOutput, SignInOutput, SubscribeRoomInput,
    SubscribeRoomOutput, SyncGroupInput, SyncGroupOutput, SyncInput, SyncOutput, UnsubscribeRoomInput,
};
use rim_proto::{CodecError, ErrorCode};

fn cfg() -> SessionConfig {
    SessionConfig::default()
}

// ------------------------------------------------------------------ sign-in

#[test]
fn command_before_sign_in_gets_not_signed_in_and_stays_open() {
    let t0 = Instant::now();
    let mut s = Session::new(CONN, cfg(), t0);
    s.on_packet(t0, packet(5, Command::Sync, SyncInput::default()));
    let actions = drain(&mut s);
    assert_eq!(actions.len(), 1, "{actions:?}");
    let p = &sent(&actions)[0];
    assert_eq!((p.request_id, p.command), (5, Command::Sync as i32));
    assert_eq!(reply_of(p).code, ErrorCode::ErrorNotSignedIn as i32);
    assert_eq!(s.phase(), Phase::AwaitingSignIn);

    // A heartbeat is "anything else" too.
    s.on_packet(t0, packet(6, Command::Heartbeat, ()));
    assert_eq!(reply_of(&sent(&drain(&mut s))[0]).code, ErrorCode::ErrorNotSignedIn as i32);

    // And SIGN_IN still works afterwards.
    s.on_packet(t0, sign_in_packet(7));
    assert!(matches!(only_call(&drain(&mut s)).request, NodeCall::SignIn(_)));
}

#[test]
fn packets_before_sign_in_are_budgeted_then_close_and_signed_in_sessions_are_not() {
    let t0 = Instant::now();
    let config = SessionConfig { max_packets_before_sign_in: 5, ..cfg() };
    let mut s = Session::new(CONN, config.clone(), t0);
    for i in 1..=5 {
        s.on_packet(t0, packet(i, Command::Heartbeat, ()));
        assert!(!s.is_closed(), "packet {i} is within the budget");
    }
    s.on_packet(t0, packet(6, Command::Heartbeat, ()));
    let actions = drain(&mut s);
    assert!(closes_with(&actions, ErrorCode::ErrorNotSignedIn), "{actions:?}");
    assert!(s.is_closed());

    // The budget counts until the sign-in completes, then no longer.
    let mut s = Session::new(CONN, config, t0);
    s.on_packet(t0, sign_in_packet(1));
    let call = only_call(&drain(&mut s));
    s.on_reply(t0, call.id, Ok(sign_in_reply(0)));
    assert!(s.is_signed_in());
    for i in 2..100 {
        s.on_packet(t0, packet(i, Command::Heartbeat, ()));
    }
    assert!(!s.is_closed());
    let replies = sent(&drain(&mut s)).iter().filter(|p| p.command == Command::Heartbeat as i32).count();
    assert_eq!(replies, 98);
}

/// A session signed in with `reply` (a `ConnSignIn` answer).
fn signed_in_with(t0: Instant, reply: NodeReply) -> Session {
    let mut s = Session::new(CONN, cfg(), t0);
    s.on_packet(t0, sign_in_packet(1));
    let call = only_call(&drain(&mut s));
    s.on_reply(t0, call.id, Ok(reply));
    drain(&mut s);
    assert!(s.is_signed_in());
    s
}

fn kick_code(actions: &[Action]) -> Option<i32> {
    sent(actions)
        .iter()
        .find(|p| p.command == Command::Kick as i32)
        .map(|p| KickPush::decode(p.content.clone()).unwrap().code)
}

#[test]
fn an_expiring_token_ends_the_session_with_a_kick_when_it_expires() {
    let t0 = Instant::now();
    let wall_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let NodeReply::SignIn(mut reply) = sign_in_reply(0) else { unreachable!() };
    reply.token_expires_ms = wall_ms + 5_000;
    let mut s = signed_in_with(t0, NodeReply::SignIn(reply));
    let deadline = s.next_deadline().unwrap();
    assert!(deadline <= t0 + Duration::from_secs(5), "the expiry is a deadline: {:?}", deadline - t0);
    s.on_tick(t0 + Duration::from_secs(2));
    assert!(!s.is_closed(), "not yet");
    s.on_tick(t0 + Duration::from_secs(6));
    let actions = drain(&mut s);
    assert_eq!(kick_code(&actions), Some(ErrorCode::ErrorTokenExpired as i32), "{actions:?}");
    assert!(closes_with(&actions, ErrorCode::ErrorTokenExpired));
}

#[test]
fn calls_carry_the_token_version_and_a_signed_out_answer_kicks() {
    let t0 = Instant::now();
    let mut s = signed_in_with(t0, sign_in_reply(0));
    s.on_packet(t0, packet(7, Command::Sync, SyncInput::default()));
    let call = only_call(&drain(&mut s));
    assert_eq!(call.token_version, Some(1), "the version the node checked at sign-in");
    let revoked = CallError::new(ErrorCode::ErrorTokenRevoked, "device signed out");
    s.on_reply(t0, call.id, Err(revoked));
    let actions = drain(&mut s);
    let replies = sent(&actions);
    let answer = replies.iter().find(|p| p.request_id == 7).expect("the SYNC is answered");
    assert_eq!(reply_of(answer).code, ErrorCode::ErrorTokenRevoked as i32);
    assert_eq!(kick_code(&actions), Some(ErrorCode::ErrorTokenRevoked as i32));
    assert!(closes_with(&actions, ErrorCode::ErrorTokenRevoked));
    // Any other refusal leaves the session up.
    let mut s = signed_in_with(t0, sign_in_reply(0));
    s.on_packet(t0, packet(8, Command::Sync, SyncInput::default()));
    let call = only_call(&drain(&mut s));
    s.on_reply(t0, call.id, Err(CallError::new(ErrorCode::ErrorUnavailable, "no leader")));
    assert!(!s.is_closed());
}

#[test]
fn command_before_sign_in_closes_when_configured() {
    let t0 = Instant::now();
    let mut s = Session::new(CONN, SessionConfig { close_before_sign_in: true, ..cfg() }, t0);
    s.on_packet(t0, packet(5, Command::Send, SendInput::default()));
    let actions = drain(&mut s);
    assert_eq!(reply_of(&sent(&actions)[0]).code, ErrorCode::ErrorNotSignedIn as i32);
    assert!(closes_with(&actions, ErrorCode::ErrorNotSignedIn));
    // No Unregister/Offline: it never signed in.
    assert_eq!(actions.len(), 2);
    assert!(s.is_closed());
}

#[test]
fn successful_sign_in_replies_registers_and_calls_with_identity() {
    let t0 = Instant::now();
    let mut s = Session::new(CONN, cfg(), t0);
    s.on_packet(t0, sign_in_packet(9));
    let call = only_call(&drain(&mut s));
    assert_eq!((call.conn_id, call.user_id, call.device_id), (CONN, UserId(USER), DeviceId(DEVICE)));
    assert_eq!(s.phase(), Phase::SigningIn);

    s.on_reply(t0, call.id, Ok(sign_in_reply(42)));
    let actions = drain(&mut s);
    let p = &sent(&actions)[0];
    assert_eq!((p.request_id, p.command, p.seq), (9, Command::SignIn as i32, 0));
    let reply = reply_of(p);
    assert_eq!(reply.code, 0);
    let out = SignInOutput::decode(reply.data).unwrap();
    assert_eq!((out.user_id, out.device_id, out.last_seq), (USER, DEVICE, 42));
    assert_eq!(out.heartbeat_interval_ms, 30_000, "the gateway announces its own interval");
    // The route first: once the client has the reply, it is routed.
    assert_eq!(
        actions[0],
        Action::Register {
            conn_id: CONN,
            user_id: UserId(USER),
            device_id: DeviceId(DEVICE),
            shard_id: ShardId(SHARD)
        }
    );
    assert_eq!(actions.len(), 2);
    assert_eq!(s.phase(), Phase::SignedIn);
    assert_eq!(s.last_delivered_seq(), Seq(42));
    assert_eq!(s.identity().map(|i| (i.user_id, i.device_id)), Some((UserId(USER), DeviceId(DEVICE))));

    // Later calls carry the signed-in identity.
    s.on_packet(t0, packet(10, Command::Ack, AckInput { seq: 3 }));
    let call = only_call(&drain(&mut s));
    assert_eq!((call.conn_id, call.user_id, call.device_id), (CONN, UserId(USER), DeviceId(DEVICE)));
}

#[test]
fn failed_sign_in_replies_then_closes() {
    for code in [ErrorCode::ErrorUnauthenticated, ErrorCode::ErrorTokenExpired, ErrorCode::ErrorTokenRevoked]
    {
        let t0 = Instant::now();
        let mut s = Session::new(CONN, cfg(), t0);
        s.on_packet(t0, sign_in_packet(3));
        let call = only_call(&drain(&mut s));
        s.on_reply(t0, call.id, Err(CallError::new(code, "bad token")));
        let actions = drain(&mut s);
        assert_eq!(actions.len(), 2, "{actions:?}");
        let p = &sent(&actions)[0];
        assert_eq!((p.request_id, p.command), (3, Command::SignIn as i32));
        let reply = reply_of(p);
        assert_eq!((reply.code, reply.message.as_str()), (code as i32, "bad token"));
        assert!(closes_with(&actions, code));
        assert!(s.is_closed());
    }
}

#[test]
fn malformed_sign_in_content_is_a_failed_sign_in() {
    let t0 = Instant::now();
    let mut s = Session::new(CONN, cfg(), t0);
    let bad = Packet {
        request_id: 1,
        command: Command::SignIn as i32,
        content: Bytes::from_static(&[0xff, 0xff]),
        seq: 0,
    };
    s.on_packet(t0, bad);
    let actions = drain(&mut s);
    assert_eq!(reply_of(&sent(&actions)[0]).code, ErrorCode::ErrorBadRequest as i32);
    assert!(closes_with(&actions, ErrorCode::ErrorBadRequest));
}

#[test]
fn sign_in_reply_of_the_wrong_shape_closes_with_internal() {
    let t0 = Instant::now();
    let mut s = Session::new(CONN, cfg(), t0);
    s.on_packet(t0, sign_in_packet(1));
    let call = only_call(&drain(&mut s));
    s.on_reply(t0, call.id, Ok(NodeReply::Empty));
    let actions = drain(&mut s);
    assert_eq!(reply_of(&sent(&actions)[0]).code, ErrorCode::ErrorInternal as i32);
    assert!(closes_with(&actions, ErrorCode::ErrorInternal));
}

#[test]
fn no_sign_in_within_the_deadline_closes() {
    let t0 = Instant::now();
    let mut s = Session::new(CONN, cfg(), t0);
    assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(10)));
    s.on_tick(t0 + Duration::from_millis(9_999));
    assert!(drain(&mut s).is_empty());
    s.on_tick(t0 + Duration::from_secs(10));
    let actions = drain(&mut s);
    assert_eq!(actions.len(), 1);
    assert!(closes_with(&actions, ErrorCode::ErrorNotSignedIn));
    assert_eq!(s.next_deadline(), None);
}

#[test]
fn the_deadline_also_covers_a_slow_sign_in_call() {
    let t0 = Instant::now();
    let mut s = Session::new(CONN, cfg(), t0);
    s.on_packet(t0 + Duration::from_secs(9), sign_in_packet(1));
    let call = only_call(&drain(&mut s));
    s.on_tick(t0 + Duration::from_secs(10));
    // The SIGN_IN still gets its (retryable) answer before the close.
    let actions = drain(&mut s);
    let replies = sent(&actions);
    assert_eq!(replies.len(), 1, "{actions:?}");
    assert_eq!((replies[0].request_id, replies[0].command), (1, Command::SignIn as i32));
    assert_eq!(reply_of(&replies[0]).code, ErrorCode::ErrorTimeout as i32);
    assert!(closes_with(&actions, ErrorCode::ErrorTimeout));
    // The late answer is ignored.
    s.on_reply(t0 + Duration::from_secs(11), call.id, Ok(sign_in_reply(0)));
    assert!(drain(&mut s).is_empty());
}

#[test]
fn the_idle_timer_waits_for_a_slow_sign_in_call_and_restarts_after_it() {
    let t0 = Instant::now();
    // Idle timeout 3 s, sign-in deadline 10 s.
    let config = SessionConfig { heartbeat_interval: Duration::from_secs(1), ..cfg() };
    let mut s = Session::new(CONN, config, t0);
    s.on_packet(t0, sign_in_packet(1));
    let call = only_call(&drain(&mut s));
    assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(10)));
    // The node takes 5 s: the silent client is not timed out meanwhile.
    s.on_tick(t0 + Duration::from_secs(4));
    assert!(drain(&mut s).is_empty());
    let signed = t0 + Duration::from_secs(5);
    s.on_reply(signed, call.id, Ok(sign_in_reply(0)));
    assert_eq!(reply_of(&sent(&drain(&mut s))[0]).code, ErrorCode::Ok as i32);
    // It gets the whole idle timeout from the reply on.
    assert_eq!(s.next_deadline(), Some(signed + Duration::from_secs(3)));
    s.on_tick(signed + Duration::from_millis(2_999));
    assert!(drain(&mut s).is_empty());
    s.on_tick(signed + Duration::from_secs(3));
    assert!(closes_with(&drain(&mut s), ErrorCode::ErrorTimeout));
}

#[test]
fn packets_during_sign_in_are_held_then_handled() {
    let t0 = Instant::now();
    let mut s = Session::new(CONN, SessionConfig { max_pending_before_sign_in: 2, ..cfg() }, t0);
    s.on_packet(t0, sign_in_packet(1));
    let sign_in = only_call(&drain(&mut s));

    s.on_packet(t0, packet(2, Command::Heartbeat, ()));
    let hb = sent(&drain(&mut s));
    assert_eq!((hb[0].request_id, reply_of(&hb[0]).code), (2, 0), "heartbeats are answered at once");

    s.on_packet(t0, sign_in_packet(3));
    assert_eq!(reply_of(&sent(&drain(&mut s))[0]).code, ErrorCode::ErrorBadRequest as i32);

    s.on_packet(t0, packet(4, Command::Sync, SyncInput { after_seq: 0, limit: 10 }));
    s.on_packet(t0, packet(5, Command::Ack, AckInput { seq: 1 }));
    assert!(drain(&mut s).is_empty(), "held");
    s.on_packet(t0, packet(6, Command::Ack, AckInput { seq: 2 }));
    let busy = sent(&drain(&mut s));
    assert_eq!((busy[0].request_id, reply_of(&busy[0]).code), (6, ErrorCode::ErrorBusy as i32));

    s.on_reply(t0, sign_in.id, Ok(sign_in_reply(0)));
    let actions = drain(&mut s);
    let requests: Vec<NodeCall> = calls(&actions).into_iter().map(|c| c.request).collect();
    assert_eq!(
        requests,
        [NodeCall::Sync(SyncInput { after_seq: 0, limit: 10 }), NodeCall::Ack(AckInput { seq: 1 })]
    );
}

#[test]
fn failed_sign_in_drops_held_packets() {
    let t0 = Instant::now();
    let mut s = Session::new(CONN, cfg(), t0);
    s.on_packet(t0, sign_in_packet(1));
    let call = only_call(&drain(&mut s));
    s.on_packet(t0, packet(2, Command::Sync, SyncInput::default()));
    s.on_reply(t0, call.id, Err(CallError::new(ErrorCode::ErrorUnauthenticated, "no")));
    let actions = drain(&mut s);
    assert!(calls(&actions).is_empty());
    assert_eq!(sent(&actions).len(), 1);
}

// ---------------------------------------------------------------- heartbeat

#[test]
fn heartbeat_is_echoed_with_an_empty_ok_reply() {
    let t0 = Instant::now();
    let mut s = signed_in(cfg(), t0, 0);
    s.on_packet(t0, packet(77, Command::Heartbeat, ()));
    let actions = drain(&mut s);
    assert_eq!(actions.len(), 1);
    let p = &sent(&actions)[0];
    assert_eq!((p.request_id, p.command, p.seq), (77, Command::Heartbeat as i32, 0));
    assert!(p.content.is_empty(), "Reply{{OK}} encodes to nothing: gim's echo");
}

#[test]
fn silent_connection_is_closed_after_three_intervals() {
    let t0 = Instant::now();
    let mut s = signed_in(cfg(), t0, 0);
    assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(90)));
    // Activity at 60 s moves the deadline.
    s.on_tick(t0 + Duration::from_secs(60));
    s.on_packet(t0 + Duration::from_secs(60), packet(1, Command::Heartbeat, ()));
    drain(&mut s);
    s.on_tick(t0 + Duration::from_secs(149));
    assert!(drain(&mut s).is_empty());
    assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(150)));
    s.on_tick(t0 + Duration::from_secs(150));
    let actions = drain(&mut s);
    assert_eq!(
        actions[0],
        Action::Unregister { conn_id: CONN, user_id: UserId(USER), device_id: DeviceId(DEVICE) }
    );
    assert!(matches!(&calls(&actions)[0].request, NodeCall::Offline { reason: ErrorCode::ErrorTimeout, .. }));
    assert!(closes_with(&actions, ErrorCode::ErrorTimeout));
}

#[test]
fn transport_activity_resets_the_idle_timer_only() {
    let t0 = Instant::now();
    let mut s = signed_in(cfg(), t0, 0);
    // A WebSocket ping at 60 s moves the idle deadline, and sends nothing.
    s.on_activity(t0 + Duration::from_secs(60));
    assert!(drain(&mut s).is_empty());
    assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(150)));
    s.on_tick(t0 + Duration::from_secs(149));
    assert!(drain(&mut s).is_empty());
    s.on_tick(t0 + Duration::from_secs(150));
    assert!(closes_with(&drain(&mut s), ErrorCode::ErrorTimeout));
    s.on_activity(t0 + Duration::from_secs(151));
    assert!(drain(&mut s).is_empty(), "ignored once closed");

    // Before sign-in it does not extend the sign-in deadline.
    let mut s = Session::new(CONN, cfg(), t0);
    s.on_activity(t0 + Duration::from_secs(9));
    assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(10)));
    s.on_tick(t0 + Duration::from_secs(10));
    assert!(closes_with(&drain(&mut s), ErrorCode::ErrorNotSignedIn));
}

#[test]
fn pushes_to_the_client_do_not_count_as_activity() {
    let t0 = Instant::now();
    let mut s = signed_in(cfg(), t0, 0);
    s.on_push(t0 + Duration::from_secs(80), user_push(1));
    drain(&mut s);
    s.on_tick(t0 + Duration::from_secs(90));
    assert!(closes_with(&drain(&mut s), ErrorCode::ErrorTimeout));
}

// ----------------------------------------------------------------- requests

#[test]
fn requests_map_to_node_calls_and_replies_echo_request_and_command() {
    let t0 = Instant::now();
    let send = SendInput { conversation_id: 5, client_msg_id: "c1".into(), ..Default::default() };
    let cases: Vec<(Packet, NodeCall, NodeReply)> = vec![
        (
            packet(11, Command::Sync, SyncInput { after_seq: 4, limit: 9 }),
            NodeCall::Sync(SyncInput { after_seq: 4, limit: 9 }),
            NodeReply::Sync(SyncOutput { messages: vec![entry(5)], has_more: false, last_seq: 5 }),
        ),
        (
            packet(12, Command::Ack, AckInput { seq: 5 }),
            NodeCall::Ack(AckInput { seq: 5 }),
            NodeReply::Ack(AckOutput { ack_seq: 5 }),
        ),
        (
            packet(13, Command::Send, send.clone()),
            NodeCall::Send { input: send.clone(), group: false },
            NodeReply::Send(SendOutput { seq: 6, message_id: 99, send_time_ms: 1, group_seq: 0 }),
        ),
        (
            packet(14, Command::SendGroup, send.clone()),
            NodeCall::Send { input: send.clone(), group: true },
            NodeReply::Send(SendOutput { seq: 0, message_id: 100, send_time_ms: 1, group_seq: 3 }),
        ),
        (
            packet(15, Command::SyncGroup, SyncGroupInput { group_id: 8, after_group_seq: 1, limit: 2 }),
            NodeCall::SyncGroup(SyncGroupInput { group_id: 8, after_group_seq: 1, limit: 2 }),
            NodeReply::SyncGroup(SyncGroupOutput { last_group_seq: 3, ..Default::default() }),
        ),
        (
            packet(16, Command::SubscribeRoom, SubscribeRoomInput { room_id: 4, after_seq: 2 }),
            NodeCall::SubscribeRoom(SubscribeRoomInput { room_id: 4, after_seq: 2 }),
            NodeReply::SubscribeRoom(SubscribeRoomOutput { last_seq: 9, first_seq: 1 }),
        ),
        (
            packet(17, Command::UnsubscribeRoom, UnsubscribeRoomInput { room_id: 4 }),
            NodeCall::UnsubscribeRoom(UnsubscribeRoomInput { room_id: 4 }),
            NodeReply::Empty,
        ),
        (
            packet(18, Command::Recall, RecallInput { message_id: 99, ..Default::default() }),
            NodeCall::Recall(RecallInput { message_id: 99, ..Default::default() }),
            NodeReply::Send(SendOutput { seq: 7, ..Default::default() }),
        ),
        (
            packet(19, Command::Read, ReadInput { read_seq: 3, ..Default::default() }),
            NodeCall::MarkRead(ReadInput { read_seq: 3, ..Default::default() }),
            NodeReply::Read(ReadOutput { read_seq: 3 }),
        ),
    ];
    for (request, expected_call, node_reply) in cases {
        let mut s = signed_in(cfg(), t0, 0);
        let (request_id, command) = (request.request_id, request.command);
        s.on_packet(t0, request);
        let call = only_call(&drain(&mut s));
        assert_eq!(call.request, expected_call);
        s.on_reply(t0, call.id, Ok(node_reply.clone()));
        let mut actions = drain(&mut s);
        if command == Command::SubscribeRoom as i32 {
            // After the reply the session syncs the room's backlog (tests/rooms.rs).
            let backlog = SyncGroupInput { group_id: 4, after_group_seq: 2, limit: cfg().resync_batch };
            assert_eq!(only_call(&actions[1..]).request, NodeCall::SyncGroup(backlog));
            actions.truncate(1);
        }
        assert_eq!(actions.len(), 1, "{actions:?}");
        let p = &sent(&actions)[0];
        assert_eq!((p.request_id, p.command, p.seq), (request_id, command, 0));
        let reply = reply_of(p);
        assert_eq!(reply.code, 0);
        assert_eq!(reply.data, node_reply.encode_data());
        assert!(!s.is_closed());
    }
}

#[test]
fn node_errors_are_relayed_with_code_message_and_retry_hint() {
    let t0 = Instant::now();
    let mut s = signed_in(cfg(), t0, 0);
    s.on_packet(t0, packet(21, Command::Send, SendInput::default()));
    let call = only_call(&drain(&mut s));
    let error =
        CallError { code: ErrorCode::ErrorNotFriend, message: "not friends".into(), retry_after_ms: 250 };
    s.on_reply(t0, call.id, Err(error));
    let p = &sent(&drain(&mut s))[0];
    assert_eq!((p.request_id, p.command), (21, Command::Send as i32));
    let reply = reply_of(p);
    assert_eq!(reply.code, ErrorCode::ErrorNotFriend as i32);
    assert_eq!(reply.message, "not friends");
    assert_eq!(reply.retry_after_ms, 250);
    assert!(!s.is_closed());
}

#[test]
fn replies_may_come_back_out_of_order() {
    let t0 = Instant::now();
    let mut s = signed_in(cfg(), t0, 0);
    s.on_packet(t0, packet(1, Command::Ack, AckInput { seq: 1 }));
    s.on_packet(t0, packet(2, Command::Ack, AckInput { seq: 2 }));
    let ids: Vec<CallId> = calls(&drain(&mut s)).iter().map(|c| c.id).collect();
    s.on_reply(t0, ids[1], Ok(NodeReply::Ack(AckOutput { ack_seq: 2 })));
    s.on_reply(t0, ids[0], Ok(NodeReply::Ack(AckOutput { ack_seq: 2 })));
    let order: Vec<u64> = sent(&drain(&mut s)).iter().map(|p| p.request_id).collect();
    assert_eq!(order, [2, 1]);
    // A second answer to the same call, or one to a call never made, is ignored.
    s.on_reply(t0, ids[0], Ok(NodeReply::Empty));
    s.on_reply(t0, CallId(999), Ok(NodeReply::Empty));
    assert!(drain(&mut s).is_empty());
}

#[test]
fn unknown_commands_get_unknown_command_and_the_connection_stays_open() {
    let t0 = Instant::now();
    let mut s = signed_in(cfg(), t0, 0);
    for (id, command) in
        [(1, 999), (2, Command::Unspecified as i32), (3, Command::Message as i32), (4, Command::Kick as i32)]
    {
        s.on_packet(t0, Packet { request_id: id, command, content: Bytes::new(), seq: 0 });
        let actions = drain(&mut s);
        assert_eq!(actions.len(), 1, "{actions:?}");
        let p = &sent(&actions)[0];
        assert_eq!((p.request_id, p.command), (id, command));
        assert_eq!(reply_of(p).code, ErrorCode::ErrorUnknownCommand as i32);
    }
    assert_eq!(s.phase(), Phase::SignedIn);
}

#[test]
fn malformed_content_gets_bad_request_and_the_connection_stays_open() {
    let t0 = Instant::now();
    let mut s = signed_in(cfg(), t0, 0);
    let bad = Packet {
        request_id: 8,
        command: Command::Send as i32,
        content: Bytes::from_static(&[0x0a, 0x05]),
        seq: 0,
    };
    s.on_packet(t0, bad);
    let actions = drain(&mut s);
    assert_eq!(actions.len(), 1);
    let p = &sent(&actions)[0];
    assert_eq!((p.request_id, p.command), (8, Command::Send as i32));
    assert_eq!(reply_of(p).code, ErrorCode::ErrorBadRequest as i32);
    assert!(!s.is_closed());
}

#[test]
fn second_sign_in_on_a_signed_in_connection_is_refused() {
    let t0 = Instant::now();
    let mut s = signed_in(cfg(), t0, 0);
    s.on_packet(t0, sign_in_packet(4));
    let actions = drain(&mut s);
    assert!(calls(&actions).is_empty());
    assert_eq!(reply_of(&sent(&actions)[0]).code, ErrorCode::ErrorBadRequest as i32);
    assert!(!s.is_closed());
}

#[test]
fn too_many_requests_in_flight_get_busy() {
    let t0 = Instant::now();
    let mut s = signed_in(SessionConfig { max_inflight_requests: 2, ..cfg() }, t0, 0);
    for id in 1..=3 {
        s.on_packet(t0, packet(id, Command::Ack, AckInput { seq: id }));
    }
    let actions = drain(&mut s);
    assert_eq!(calls(&actions).len(), 2);
    let busy = &sent(&actions)[0];
    assert_eq!((busy.request_id, reply_of(busy).code), (3, ErrorCode::ErrorBusy as i32));
    // An answer frees a slot.
    s.on_reply(t0, calls(&actions)[0].id, Ok(NodeReply::Ack(AckOutput { ack_seq: 1 })));
    s.on_packet(t0, packet(4, Command::Ack, AckInput { seq: 4 }));
    assert_eq!(calls(&drain(&mut s)).len(), 1);
}

#[test]
fn logout_replies_then_closes() {
    let t0 = Instant::now();
    let mut s = signed_in(cfg(), t0, 0);
    s.on_packet(t0, packet(30, Command::Logout, ()));
    let call = only_call(&drain(&mut s));
    assert_eq!(call.request, NodeCall::Logout);
    s.on_reply(t0, call.id, Ok(NodeReply::Empty));
    let actions = drain(&mut s);
    let p = &sent(&actions)[0];
    assert_eq!((p.request_id, p.command, reply_of(p).code), (30, Command::Logout as i32, 0));
    assert!(matches!(actions[1], Action::Unregister { .. }));
    assert!(matches!(
        calls(&actions)[0].request,
        NodeCall::Offline { reason: ErrorCode::Ok, session_epoch: SESSION_EPOCH }
    ));
    assert!(closes_with(&actions, ErrorCode::Ok));
}

#[test]
fn failed_logout_is_replied_to_and_the_connection_stays_open() {
    let t0 = Instant::now();
    let mut s = signed_in(cfg(), t0, 0);
    s.on_packet(t0, packet(30, Command::Logout, ()));
    let call = only_call(&drain(&mut s));
    s.on_reply(t0, call.id, Err(CallError::new(ErrorCode::ErrorUnavailable, "no leader")));
    let actions = drain(&mut s);
    assert_eq!(actions.len(), 1);
    assert_eq!(reply_of(&sent(&actions)[0]).code, ErrorCode::ErrorUnavailable as i32);
    assert!(!s.is_closed());
}

// ------------------------------------------------------------- frame errors

#[test]
fn decode_errors_get_a_frame_level_reply_then_close() {
    let t0 = Instant::now();
    let cases = [
        (CodecError::FrameTooLarge { len: 2 << 20, max: 1 << 20 }, ErrorCode::ErrorFrameTooLarge),
        (CodecError::BadVarint, ErrorCode::ErrorMalformedFrame),
        (
            CodecError::BadPacket(rim_proto::v1::Packet::decode(&[0xff_u8][..]).unwrap_err()),
            ErrorCode::ErrorMalformedFrame,
        ),
    ];
    for (error, code) in cases {
        let mut s = signed_in(cfg(), t0, 0);
        s.on_decode_error(t0, &error);
        let actions = drain(&mut s);
        let p = &sent(&actions)[0];
        assert_eq!((p.request_id, p.command), (0, Command::Unspecified as i32));
        assert_eq!(reply_of(p).code, code as i32);
        assert!(matches!(actions[1], Action::Unregister { .. }));
        assert!(closes_with(&actions, code));
    }
    // Before sign-in too, without Unregister/Offline.
    let mut s = Session::new(CONN, cfg(), t0);
    s.on_decode_error(t0, &CodecError::BadVarint);
    let actions = drain(&mut s);
    assert_eq!(actions.len(), 2);
    assert!(closes_with(&actions, ErrorCode::ErrorMalformedFrame));
}

#[test]
fn transport_errors_close_without_a_reply() {
    let t0 = Instant::now();
    let mut s = Session::new(CONN, cfg(), t0);
    s.on_decode_error(t0, &CodecError::Io(std::io::Error::other("reset")));
    let actions = drain(&mut s);
    assert!(sent(&actions).is_empty());
    assert!(closes_with(&actions, ErrorCode::ErrorUnavailable));
}

// ------------------------------------------------------- kick, close, after

#[test]
fn kick_sends_kick_then_closes_and_nothing_follows() {
    let t0 = Instant::now();
    let mut s = signed_in(cfg(), t0, 0);
    s.on_packet(t0, packet(1, Command::Ack, AckInput { seq: 1 }));
    let ack = only_call(&drain(&mut s));
    s.on_kick(t0, KickPush { code: ErrorCode::ErrorKicked as i32, reason: "signed in elsewhere".into() });
    let actions = drain(&mut s);
    let p = &sent(&actions)[0];
    assert_eq!((p.request_id, p.command), (0, Command::Kick as i32));
    let kick = KickPush::decode(p.content.clone()).unwrap();
    assert_eq!((kick.code, kick.reason.as_str()), (ErrorCode::ErrorKicked as i32, "signed in elsewhere"));
    assert_eq!(
        actions[1],
        Action::Unregister { conn_id: CONN, user_id: UserId(USER), device_id: DeviceId(DEVICE) }
    );
    assert!(matches!(calls(&actions)[0].request, NodeCall::Offline { reason: ErrorCode::ErrorKicked, .. }));
    assert!(closes_with(&actions, ErrorCode::ErrorKicked));
    assert_eq!(actions.len(), 4);

    // Every input is now ignored.
    s.on_packet(t0, packet(2, Command::Heartbeat, ()));
    s.on_reply(t0, ack.id, Ok(NodeReply::Ack(AckOutput { ack_seq: 1 })));
    s.on_push(t0, user_push(1));
    s.on_resync_needed(t0);
    s.on_kick(t0, KickPush::default());
    s.on_tick(t0 + Duration::from_secs(3600));
    s.on_decode_error(t0, &CodecError::BadVarint);
    s.on_close(t0);
    assert!(drain(&mut s).is_empty());
    assert_eq!(s.next_deadline(), None);
}

#[test]
fn shutdown_kicks_with_unavailable() {
    let t0 = Instant::now();
    let mut s = Session::new(CONN, cfg(), t0);
    s.on_shutdown(t0);
    let actions = drain(&mut s);
    let kick = KickPush::decode(sent(&actions)[0].content.clone()).unwrap();
    assert_eq!(kick.code, ErrorCode::ErrorUnavailable as i32);
    assert!(closes_with(&actions, ErrorCode::ErrorUnavailable));
}

#[test]
fn peer_close_unregisters_and_reports_offline_without_close_action() {
    let t0 = Instant::now();
    let mut s = signed_in(cfg(), t0, 0);
    s.on_close(t0);
    let actions = drain(&mut s);
    assert_eq!(actions.len(), 2, "{actions:?}");
    assert_eq!(
        actions[0],
        Action::Unregister { conn_id: CONN, user_id: UserId(USER), device_id: DeviceId(DEVICE) }
    );
    assert!(matches!(calls(&actions)[0].request, NodeCall::Offline { reason: ErrorCode::Ok, .. }));
    assert!(s.is_closed());
    s.on_packet(t0, packet(1, Command::Heartbeat, ()));
    assert!(drain(&mut s).is_empty());
}

// ------------------------------------------------------------ send queue

#[test]
fn a_slow_client_is_closed_when_its_queue_exceeds_the_limit() {
    let t0 = Instant::now();
    let one = rim_proto::codec::encoded_frame_len(&Packet {
        command: Command::Message as i32,
        content: MessagePush { message: Some(entry(1)), persisted: true }.encode_to_vec().into(),
        seq: 1,
        request_id: 0,
    });
    let mut s = signed_in(SessionConfig { send_queue_limit: 3 * one, ..cfg() }, t0, 0);
    for seq in 1..=3 {
        s.on_push(t0, user_push(seq));
    }
    assert_eq!(pushed_seqs(&drain(&mut s)), [1, 2, 3]);
    assert_eq!(s.queued_bytes(), 3 * one);
    // The transport wrote one packet's bytes: room for one more.
    s.on_written(one);
    s.on_push(t0, user_push(4));
    assert_eq!(pushed_seqs(&drain(&mut s)), [4]);
    // Nothing written: the next packet does not fit and the session closes
    // instead of waiting.
    s.on_push(t0, user_push(5));
    let actions = drain(&mut s);
    assert!(pushed_seqs(&actions).is_empty());
    assert!(closes_with(&actions, ErrorCode::ErrorBusy));
    s.on_written(usize::MAX);
    assert_eq!(s.queued_bytes(), 0);
}

#[test]
fn replies_count_against_the_queue_too() {
    let t0 = Instant::now();
    let mut s = signed_in(SessionConfig { send_queue_limit: 200, ..cfg() }, t0, 0);
    s.on_packet(t0, packet(1, Command::Sync, SyncInput::default()));
    let call = only_call(&drain(&mut s));
    let big = SyncOutput { messages: (1..=50).map(entry).collect(), has_more: false, last_seq: 50 };
    s.on_reply(t0, call.id, Ok(NodeReply::Sync(big)));
    assert!(closes_with(&drain(&mut s), ErrorCode::ErrorBusy));
}

#[test]
fn a_reply_above_the_frame_maximum_becomes_an_internal_error() {
    let t0 = Instant::now();
    let mut s = signed_in(SessionConfig { max_frame: 100, ..cfg() }, t0, 0);
    s.on_packet(t0, packet(1, Command::Sync, SyncInput::default()));
    let call = only_call(&drain(&mut s));
    let big = SyncOutput { messages: (1..=20).map(entry).collect(), has_more: false, last_seq: 20 };
    s.on_reply(t0, call.id, Ok(NodeReply::Sync(big)));
    let p = &sent(&drain(&mut s))[0];
    assert_eq!((p.request_id, reply_of(p).code), (1, ErrorCode::ErrorInternal as i32));
    assert!(!s.is_closed());
}

// ------------------------------------------------------ other push kinds

fn group_push(group: u64, seq: u64, priority: PushPriority) -> PushedMessage {
    PushedMessage {
        list_kind: ListKind::Group as i32,
        owner_id: group,
        seq,
        message: Some(entry(seq)),
        priority: priority as i32,
        persisted: true,
        skip_device_id: 0,
    }
}

#[test]
fn pushes_of_lists_not_subscribed_are_ignored() {
    let t0 = Instant::now();
    let mut s = signed_in(cfg(), t0, 0);
    for (group, seq) in [(1, 5), (1, 5), (2, 5), (1, 4), (1, 6)] {
        s.on_push(t0, group_push(group, seq, PushPriority::Normal));
    }
    assert!(drain(&mut s).is_empty());
}

/// Subscribes room `room` (empty, live only) and reads its empty backlog.
fn subscribe_empty_room(s: &mut Session, t0: Instant, room: u64) {
    s.on_packet(t0, packet(50, Command::SubscribeRoom, SubscribeRoomInput { room_id: room, after_seq: 0 }));
    let call = only_call(&drain(s));
    let out = SubscribeRoomOutput { last_seq: 0, first_seq: 1 };
    s.on_reply(t0, call.id, Ok(NodeReply::SubscribeRoom(out)));
    let sync = only_call(&drain(s));
    let empty = SyncGroupOutput { last_group_seq: 0, first_group_seq: 1, ..Default::default() };
    s.on_reply(t0, sync.id, Ok(NodeReply::SyncGroup(empty)));
    assert!(drain(s).is_empty());
    s.on_written(usize::MAX);
}

#[test]
fn normal_priority_room_pushes_are_dropped_not_fatal_for_a_slow_client() {
    let t0 = Instant::now();
    let mut s = signed_in(SessionConfig { send_queue_limit: 100, ..cfg() }, t0, 0);
    subscribe_empty_room(&mut s, t0, 1);
    for seq in 1..=20 {
        s.on_push(t0, group_push(1, seq, PushPriority::Normal));
    }
    let actions = drain(&mut s);
    let delivered = pushed_seqs(&actions);
    assert!(!delivered.is_empty() && delivered.len() < 20, "{delivered:?}");
    assert!(!s.is_closed(), "dropped, not closed: {actions:?}");
    s.on_push(t0, group_push(1, 21, PushPriority::High));
    assert!(closes_with(&drain(&mut s), ErrorCode::ErrorBusy));
}

#[test]
fn online_only_pushes_pass_through_without_gap_checks() {
    let t0 = Instant::now();
    let mut s = signed_in(cfg(), t0, 10);
    let mut push = user_push(0);
    push.persisted = false;
    push.message = Some(rim_proto::v1::Message { message_id: 0, ..Default::default() });
    s.on_push(t0, push.clone());
    s.on_push(t0, push);
    let actions = drain(&mut s);
    assert_eq!(pushed_seqs(&actions), [0, 0]);
    assert!(calls(&actions).is_empty());
    let content = MessagePush::decode(sent(&actions)[0].content.clone()).unwrap();
    assert!(!content.persisted);
    assert_eq!(s.last_delivered_seq(), Seq(10));
}

#[test]
fn pushes_before_sign_in_are_ignored() {
    let t0 = Instant::now();
    let mut s = Session::new(CONN, cfg(), t0);
    s.on_push(t0, user_push(1));
    s.on_resync_needed(t0);
    assert!(drain(&mut s).is_empty());
}
