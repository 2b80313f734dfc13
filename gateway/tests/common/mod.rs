//! Helpers shared by the session tests: building packets, driving a session
//! through sign-in, and picking apart its actions.

#![allow(dead_code)]

use std::time::Instant;

use prost::Message as _;
use rim_gateway::{Action, Call, CallId, NodeCall, NodeReply, Session, SessionConfig};
use rim_proto::ErrorCode;
use rim_proto::v1::{
    Command, ConnSignInReply, ListKind, Message, MessagePush, Packet, PushPriority, PushedMessage, Reply,
    SignInInput, SignInOutput,
};

pub const CONN: u64 = 7;
pub const USER: u64 = 10001;
pub const DEVICE: u64 = 20001;
pub const SHARD: u32 = 3;

/// A request packet with `content` encoded.
pub fn packet(request_id: u64, command: Command, content: impl prost::Message) -> Packet {
    Packet { request_id, command: command as i32, content: content.encode_to_vec().into(), seq: 0 }
}

/// A SIGN_IN packet for USER/DEVICE.
pub fn sign_in_packet(request_id: u64) -> Packet {
    packet(request_id, Command::SignIn, SignInInput { user_id: USER, device_id: DEVICE, token: "tk".into() })
}

/// The node's successful ConnSignIn answer.
pub fn sign_in_reply(last_seq: u64) -> NodeReply {
    NodeReply::SignIn(Box::new(ConnSignInReply {
        user: None,
        output: Some(SignInOutput {
            user_id: USER,
            device_id: DEVICE,
            last_seq,
            ack_seq: 0,
            server_time_ms: 1,
            heartbeat_interval_ms: 0,
            super_groups: Vec::new(),
        }),
        token_version: 1,
        shard_id: SHARD,
        token_expires_ms: 0,
        session_epoch: SESSION_EPOCH,
    }))
}

/// The session epoch of [`sign_in_reply`]: every `Offline` names it.
pub const SESSION_EPOCH: u64 = 7;

/// Every queued action.
pub fn drain(s: &mut Session) -> Vec<Action> {
    s.drain_actions().collect()
}

/// The calls among `actions`.
pub fn calls(actions: &[Action]) -> Vec<Call> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Call(c) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

/// The packets among `actions`.
pub fn sent(actions: &[Action]) -> Vec<Packet> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

/// The single call among `actions`.
pub fn only_call(actions: &[Action]) -> Call {
    let calls = calls(actions);
    assert_eq!(calls.len(), 1, "expected one call in {actions:?}");
    calls.into_iter().next().unwrap()
}

/// The reply carried by a reply packet.
pub fn reply_of(p: &Packet) -> Reply {
    Reply::decode(p.content.clone()).expect("reply content")
}

/// Seqs of the MESSAGE pushes among `actions`, checking each push's content
/// agrees with its `Packet.seq`.
pub fn pushed_seqs(actions: &[Action]) -> Vec<u64> {
    sent(actions)
        .iter()
        .filter(|p| p.command == Command::Message as i32)
        .map(|p| {
            let push = MessagePush::decode(p.content.clone()).expect("MessagePush");
            let m = push.message.expect("message");
            assert_eq!(m.seq, p.seq, "content seq matches packet seq");
            assert_eq!(m.message_id, p.seq * 10, "content is the entry's");
            assert_eq!(p.request_id, 0);
            p.seq
        })
        .collect()
}

/// The entry with `seq` of USER's list.
pub fn entry(seq: u64) -> Message {
    Message { seq, message_id: seq * 10, sender_user_id: 1, ..Default::default() }
}

/// A push of USER's list entry `seq`.
pub fn user_push(seq: u64) -> PushedMessage {
    PushedMessage {
        list_kind: ListKind::User as i32,
        owner_id: USER,
        seq,
        message: Some(entry(seq)),
        priority: PushPriority::Normal as i32,
        persisted: true,
        skip_device_id: 0,
    }
}

/// A session that signed in at `now` with the user's list at `last_seq`;
/// its actions are drained and its send queue is empty.
pub fn signed_in(config: SessionConfig, now: Instant, last_seq: u64) -> Session {
    let mut s = Session::new(CONN, config, now);
    s.on_packet(now, sign_in_packet(1));
    let call = only_call(&drain(&mut s));
    assert!(matches!(call.request, NodeCall::SignIn(_)));
    s.on_reply(now, call.id, Ok(sign_in_reply(last_seq)));
    let actions = drain(&mut s);
    assert!(actions.iter().any(|a| matches!(a, Action::Register { .. })), "{actions:?}");
    s.on_written(usize::MAX); // the sign-in reply went out
    s
}

/// The gap-repair sync call among `actions`: its id and `after_seq`.
pub fn sync_call(actions: &[Action]) -> Option<(CallId, u64)> {
    calls(actions).into_iter().find_map(|c| match c.request {
        NodeCall::Sync(input) => Some((c.id, input.after_seq)),
        _ => None,
    })
}

/// Whether `actions` end with a Close of `code`.
pub fn closes_with(actions: &[Action], code: ErrorCode) -> bool {
    matches!(actions.last(), Some(Action::Close { code: c, .. }) if *c == code)
}
