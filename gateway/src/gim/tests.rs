//! The translator driven sans-IO around a real [`Session`].

use std::time::Instant;

use bytes::Bytes;
use prost::Message as _;
use rim_proto::ErrorCode;
use rim_proto::ids::GroupId;
use rim_proto::v1::{
    Command, ConnSignInReply, ContentType, ConversationKind, Message as RimMessage, SignInOutput,
    SubscribeRoomOutput,
};

use super::proto::{GroupMessagePush, Message, Packet, Reply, SubscribeRoomRequest, UserMessagePush};
use super::*;
use crate::call::{NodeCall, NodeReply};
use crate::{Action, SessionConfig};

const HEARTBEAT: i32 = PacketCommand::Heartbeat as i32;

fn gim(request_id: &str, command: PacketCommand, content: impl prost::Message) -> Bytes {
    let p = Packet {
        request_id: request_id.into(),
        command: command as i32,
        content: content.encode_to_vec().into(),
        seq: 0,
    };
    p.encode_to_vec().into()
}

/// Drains the session; returns the gim packets written and the calls made.
fn run(t: &mut Translator, s: &mut Session) -> (Vec<Packet>, Vec<crate::Call>, Option<ErrorCode>) {
    let (mut out, mut calls, mut closed) = (Vec::new(), Vec::new(), None);
    for action in s.drain_actions().collect::<Vec<_>>() {
        match action {
            Action::Send(p) => {
                if let Some(body) = t.outbound(&p) {
                    out.push(Packet::decode(body).unwrap());
                }
            }
            Action::Call(c) => calls.push(c),
            Action::Close { code, .. } => closed = Some(code),
            Action::Register { .. } | Action::Unregister { .. } => {}
        }
    }
    (out, calls, closed)
}

fn reply(p: &Packet) -> Reply {
    Reply::decode(p.content.clone()).unwrap()
}

fn signed_in(t: &mut Translator, now: Instant) -> Session {
    let mut s = Session::new(1, SessionConfig::default(), now);
    let sign_in = proto::SignInRequest { user_id: 11, device_id: 12, token: "tk".into() };
    t.on_frame(&mut s, now, gim("sign-in-1", PacketCommand::SignIn, sign_in));
    let (out, calls, _) = run(t, &mut s);
    assert!(out.is_empty());
    let NodeCall::SignIn(input) = &calls[0].request else { panic!("{calls:?}") };
    assert_eq!((input.user_id, input.device_id, input.token.as_str()), (11, 12, "tk"));
    let output = SignInOutput { user_id: 11, device_id: 12, ..Default::default() };
    let ok = ConnSignInReply { output: Some(output), token_version: 1, shard_id: 1, ..Default::default() };
    s.on_reply(now, calls[0].id, Ok(NodeReply::SignIn(Box::new(ok))));
    let (out, _, _) = run(t, &mut s);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].request_id.as_str(), out[0].command), ("sign-in-1", PacketCommand::SignIn as i32));
    assert_eq!(reply(&out[0]), Reply::default(), "gim's Reply{{code: 0}}, no data");
    s
}

#[test]
fn before_sign_in_gim_gets_10000_and_after_it_heartbeats_are_echoed_byte_for_byte() {
    let now = Instant::now();
    let mut t = Translator::new(1 << 20);
    let mut s = Session::new(1, SessionConfig::default(), now);
    t.on_frame(&mut s, now, gim("hb-0", PacketCommand::Heartbeat, ()));
    let (out, calls, closed) = run(&mut t, &mut s);
    assert!(calls.is_empty() && closed.is_none());
    assert_eq!((out[0].request_id.as_str(), out[0].command), ("hb-0", HEARTBEAT));
    assert_eq!(reply(&out[0]).code, 10000);
    assert!(reply(&out[0]).message.starts_with("ERROR_NOT_SIGNED_IN"));

    let mut s = signed_in(&mut t, now);
    // A heartbeat with content and seq comes back exactly as it was sent.
    let raw: Bytes =
        Packet { request_id: "hb-1".into(), command: HEARTBEAT, content: Bytes::from_static(b"x"), seq: 9 }
            .encode_to_vec()
            .into();
    t.on_frame(&mut s, now, raw.clone());
    let mut echoed = Vec::new();
    for action in s.drain_actions().collect::<Vec<_>>() {
        if let Action::Send(p) = action {
            echoed.push(t.outbound(&p).unwrap());
        }
    }
    assert_eq!(echoed, vec![raw]);
    assert!(t.outstanding.is_empty(), "answered requests are forgotten");
}

#[test]
fn other_commands_never_become_rim_commands_and_bad_packets_close() {
    let now = Instant::now();
    let mut t = Translator::new(1 << 20);
    let mut s = signed_in(&mut t, now);
    // 5 is rim's SYNC, 7 rim's SEND, 4 gim's server-only PC_MESSAGE.
    for command in [4, 5, 7, 99] {
        let p = Packet { request_id: format!("r{command}"), command, ..Default::default() };
        t.on_frame(&mut s, now, p.encode_to_vec().into());
        let (out, calls, closed) = run(&mut t, &mut s);
        assert!(calls.is_empty(), "command {command} made a call: {calls:?}");
        assert!(closed.is_none());
        assert_eq!((out[0].request_id.clone(), out[0].command), (format!("r{command}"), command));
        assert_eq!(reply(&out[0]).code, ErrorCode::ErrorUnknownCommand as i32);
    }
    // A request id of 64 bytes is fine; 65 is refused, then the connection closes.
    t.on_frame(&mut s, now, gim(&"a".repeat(MAX_REQUEST_ID), PacketCommand::Heartbeat, ()));
    assert_eq!(run(&mut t, &mut s).0[0].request_id.len(), MAX_REQUEST_ID);
    t.on_frame(&mut s, now, gim(&"a".repeat(MAX_REQUEST_ID + 1), PacketCommand::Heartbeat, ()));
    let (out, _, closed) = run(&mut t, &mut s);
    assert_eq!(closed, Some(ErrorCode::ErrorMalformedFrame));
    assert_eq!((out[0].request_id.as_str(), out[0].command), ("", PacketCommand::Unknown as i32));
    assert_eq!(reply(&out[0]).code, ErrorCode::ErrorMalformedFrame as i32);
    assert!(reply(&out[0]).message.contains("request_id of 65 bytes"), "{:?}", reply(&out[0]));

    // Garbage (a rim packet: numeric request id) is malformed too.
    let mut s = Session::new(2, SessionConfig::default(), now);
    let rim = rim_proto::v1::Packet { request_id: 1, command: 2, ..Default::default() };
    t.on_frame(&mut s, now, rim.encode_to_vec().into());
    assert_eq!(run(&mut t, &mut s).2, Some(ErrorCode::ErrorMalformedFrame));
}

#[test]
fn one_room_at_a_time_and_the_translators_own_replies_are_not_sent() {
    let now = Instant::now();
    let mut t = Translator::new(1 << 20);
    let mut s = signed_in(&mut t, now);
    let subscribe = |t: &mut Translator, s: &mut Session, room_id: u64| {
        t.on_frame(
            s,
            now,
            gim(&format!("sub-{room_id}"), PacketCommand::SubscribeRoom, SubscribeRoomRequest { room_id }),
        );
        let (out, calls, _) = run(t, s);
        assert!(out.is_empty(), "{out:?}");
        for c in &calls {
            let result = match &c.request {
                NodeCall::SubscribeRoom(_) => NodeReply::SubscribeRoom(SubscribeRoomOutput::default()),
                _ => NodeReply::Empty,
            };
            s.on_reply(now, c.id, Ok(result));
        }
        let requests: Vec<NodeCall> = calls.into_iter().map(|c| c.request).collect();
        (run(t, s).0, requests)
    };
    let (out, calls) = subscribe(&mut t, &mut s, 5);
    assert!(
        matches!(&calls[..], [NodeCall::SubscribeRoom(i)] if i.room_id == 5 && i.after_seq == 0),
        "{calls:?}"
    );
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].request_id.as_str(), reply(&out[0]).code), ("sub-5", 0));
    assert_eq!(s.rooms(), vec![GroupId(5)]);

    let (out, calls) = subscribe(&mut t, &mut s, 6);
    assert!(matches!(&calls[0], NodeCall::UnsubscribeRoom(i) if i.room_id == 5), "{calls:?}");
    assert!(matches!(&calls[1], NodeCall::SubscribeRoom(i) if i.room_id == 6), "{calls:?}");
    assert_eq!(out.len(), 1, "only the client's request is answered: {out:?}");
    assert_eq!(out[0].request_id, "sub-6");
    assert_eq!(s.rooms(), vec![GroupId(6)]);
}

#[test]
fn pushes_carry_gims_message_and_kicks_are_not_sent() {
    let mut t = Translator::new(1 << 20);
    let m = RimMessage {
        sender_user_id: 2,
        sender_device_id: 3,
        conversation_kind: ConversationKind::User as i32,
        conversation_id: 11,
        seq: 7,
        send_time_ms: 1_767_225_601_999,
        content_type: ContentType::Text as i32,
        content: Bytes::from_static(b"hi"),
        ..Default::default()
    };
    let push = rim_proto::v1::MessagePush { message: Some(m.clone()), persisted: true };
    let packet = rim_proto::v1::Packet {
        request_id: 0,
        command: Command::Message as i32,
        content: push.encode_to_vec().into(),
        seq: 7,
    };
    let p = Packet::decode(t.outbound(&packet).unwrap()).unwrap();
    assert_eq!((p.request_id.as_str(), p.command, p.seq), ("", PacketCommand::Message as i32, 0));
    let g = Message::decode(p.content).unwrap();
    assert_eq!((g.command, g.seq, g.created_at, g.room_id), (1, 7, 1_767_225_601, 0));
    let u = UserMessagePush::decode(g.content).unwrap();
    assert_eq!((u.from_user.unwrap().user_id, u.to_user_id, u.content.as_ref()), (2, 11, &b"hi"[..]));

    let kick = rim_proto::v1::Packet { command: Command::Kick as i32, ..Default::default() };
    assert_eq!(t.outbound(&kick), None);
}

#[test]
fn the_message_table() {
    let base = RimMessage {
        sender_user_id: 2,
        send_time_ms: 5_500,
        content: Bytes::from_static(b"c"),
        ..Default::default()
    };
    // A room entry: group message, room_id set, seq 0.
    let room = RimMessage {
        conversation_kind: ConversationKind::Room as i32,
        conversation_id: 40,
        seq: 3,
        group_seq: 3,
        content_type: ContentType::Text as i32,
        ..base.clone()
    };
    let g = gim_message(&room);
    assert_eq!((g.command, g.seq, g.room_id, g.created_at), (2, 0, 40, 5));
    assert_eq!(GroupMessagePush::decode(g.content).unwrap().group_id, 40);
    // A small group's entry in the user's list: group message, the user's seq.
    let group = RimMessage {
        conversation_kind: ConversationKind::Group as i32,
        conversation_id: 41,
        seq: 9,
        group_seq: 2,
        ..base.clone()
    };
    let g = gim_message(&group);
    assert_eq!((g.command, g.seq, g.room_id), (2, 9, 0));
    // A business push keeps its code and its bytes; an online-only one has seq 0.
    let business =
        RimMessage { conversation_kind: ConversationKind::System as i32, content_type: 1001, ..base.clone() };
    let g = gim_message(&business);
    assert_eq!((g.command, g.content.as_ref(), g.seq), (1001, &b"c"[..], 0));
    // A room push of a business code (gim's PushRoom).
    let room_push = RimMessage { content_type: 1000 + 7, ..room.clone() };
    let g = gim_message(&room_push);
    assert_eq!((g.command, g.room_id, g.content.as_ref()), (1007, 40, &b"c"[..]));
    // rim-only entries carry the whole rim message.
    let recall =
        RimMessage { content_type: ContentType::Recall as i32, refers_to: 77, seq: 4, ..base.clone() };
    let g = gim_message(&recall);
    assert_eq!((g.command, g.seq), (9, 4));
    assert_eq!(RimMessage::decode(g.content).unwrap(), recall);
    // Times before the epoch round down.
    assert_eq!(gim_message(&RimMessage { send_time_ms: -1, ..base }).created_at, -1);
}

#[test]
fn codes() {
    assert_eq!(gim_code(0), 0);
    for c in [ErrorCode::ErrorNotSignedIn, ErrorCode::ErrorUnauthenticated, ErrorCode::ErrorTokenRevoked] {
        assert_eq!(gim_code(c as i32), 10000);
    }
    assert_eq!(gim_code(ErrorCode::ErrorGroupNotFound as i32), 10220);
    assert_eq!(gim_code(ErrorCode::ErrorBusy as i32), ErrorCode::ErrorBusy as i32);
    assert_eq!(gim_code(424_242), 424_242);
}
