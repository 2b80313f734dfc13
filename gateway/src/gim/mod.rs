//! gim's connection protocol on a listener (`protocol = "gim"`): apps built
//! for gim's `connect` service sign in, heartbeat, subscribe a room and
//! receive pushes unchanged, against rim.
//!
//! The [`Session`] stays the one state machine of every connection; gim is a
//! dialect translated at its edge, per connection, by a [`Translator`] that
//! both transports use (TCP: [`RawFrames`] then [`Translator::on_frame`];
//! WebSocket: each binary message to [`Translator::on_frame`]). Every bound
//! of a rim connection therefore holds unchanged on a gim one: the frame
//! limits (16 KiB before sign-in, then the maximum frame), the packet budget
//! and deadline before sign-in, requests in flight, the send queue, the
//! idle timeout, kicks. The definitions are gim's own (`proto`, from
//! `../shared/reference/gim.md` section 2.1).
//!
//! # Inbound (gim `Packet` → rim session)
//!
//! Each gim packet gets an internal numeric request id (from 1); the
//! translator remembers the gim `request_id` and `command` under it until
//! the session's reply comes out.
//!
//! | gim packet | what the session gets |
//! |---|---|
//! | `PC_SIGN_IN`, `SignInRequest{user_id, device_id, token}` | `SIGN_IN`, the content as it came (gim's `SignInRequest` and rim's `SignInInput` encode alike) |
//! | `PC_HEARTBEAT` | `HEARTBEAT` (the packet's bytes are kept for the echo) |
//! | `PC_SUBSCRIBE_ROOM`, `SubscribeRoomRequest{room_id}` | signed in and `room_id` ≠ 0: an `UNSUBSCRIBE_ROOM` of every other subscribed room (its reply is not sent: gim has one room per connection), then `SUBSCRIBE_ROOM{room_id, after_seq: 0}` (live only); `room_id` 0 leaves the room |
//! | any other command (gim has no upstream `PC_MESSAGE`) | `COMMAND_UNSPECIFIED`: `ERROR_NOT_SIGNED_IN` before sign-in, else `ERROR_UNKNOWN_COMMAND`; never a rim command |
//! | not a gim `Packet`, or a `request_id` over [`MAX_REQUEST_ID`] bytes | a decode error: `ERROR_MALFORMED_FRAME` reply, then close |
//!
//! # Outbound (rim packet → gim `Packet`)
//!
//! * **Replies** reuse the request: its `request_id` string and `command`,
//!   content `Reply{code, message}` (no `data`), with [`gim_code`] mapping
//!   rim's codes onto gim's where gim has one. A successful heartbeat is the
//!   request's bytes echoed unchanged. Replies to the translator's own
//!   requests are dropped. Replies to no gim request (frame-level errors;
//!   the WebSocket URL sign-in) have an empty `request_id`.
//! * **Pushes**: `Packet{request_id: "", command: PC_MESSAGE, content:
//!   Message}`, `Message` by [`gim_message`] (the table there).
//! * **`KICK`** has no gim form: nothing is sent, the connection closes.
//!
//! Every packet the session counted but that is not written (a dropped
//! reply or kick) is reported written at once; written gim frames are
//! credited to the session through [`Credit`] (TCP) or counted at the rim
//! size (WebSocket), so the send-queue limit holds.
//!
//! # Invariants
//!
//! * Nothing a gim client sends reaches the session as a rim command other
//!   than `SIGN_IN`, `HEARTBEAT`, `SUBSCRIBE_ROOM` and `UNSUBSCRIBE_ROOM`.
//! * The remembered requests are bounded: the session answers every packet
//!   at once or within its own bounds (requests in flight, packets held
//!   during sign-in), and beyond [`MAX_OUTSTANDING`] the connection closes
//!   with `ERROR_BUSY`.

mod codec;
pub mod proto;

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use prost::Message as _;
use rim_proto::v1::{
    Command, ContentType, ConversationKind, KickPush, MessagePush, Packet as RimPacket, Reply as RimReply,
    SubscribeRoomInput, UnsubscribeRoomInput,
};
use rim_proto::{CodecError, ErrorCode};

pub(crate) use self::codec::{Credit, RawFrames, encode_frame, frame_len};
use self::proto::{
    GroupMessagePush, Message, MessageCommand, Packet, PacketCommand, Reply, SubscribeRoomRequest, User,
    UserMessagePush,
};
use crate::Session;

/// Longest `request_id` a gim client may send, in bytes; a longer one is a
/// malformed packet (gim had no bound).
pub const MAX_REQUEST_ID: usize = 64;

/// Most gim requests waiting for their reply on one connection; beyond it
/// the connection closes with `ERROR_BUSY`. The session's own bounds keep
/// far below it.
pub const MAX_OUTSTANDING: usize = 1024;

/// A gim request waiting for the session's reply.
#[derive(Debug)]
struct Outstanding {
    request_id: String,
    command: i32,
    /// A heartbeat's bytes, echoed on success.
    echo: Option<Bytes>,
    /// The translator's own request: its reply is not sent.
    silent: bool,
}

/// The gim side of one connection. See the [module documentation](self).
#[derive(Debug)]
pub(crate) struct Translator {
    outstanding: HashMap<u64, Outstanding>,
    next_id: u64,
    max_frame: usize,
}

impl Translator {
    /// A translator for a connection whose largest packet is `max_frame`.
    pub(crate) fn new(max_frame: usize) -> Translator {
        Translator { outstanding: HashMap::new(), next_id: 0, max_frame }
    }

    /// One gim packet's bytes from the client (a TCP frame's body, a
    /// WebSocket message), already checked against the frame limit.
    pub(crate) fn on_frame(&mut self, session: &mut Session, now: Instant, body: Bytes) {
        if session.is_closed() {
            return;
        }
        let packet = match Packet::decode(body.clone()) {
            Ok(packet) => packet,
            Err(e) => return session.on_decode_error(now, &CodecError::BadPacket(e)),
        };
        if packet.request_id.len() > MAX_REQUEST_ID {
            let why = format!("request_id of {} bytes (at most {MAX_REQUEST_ID})", packet.request_id.len());
            return session.on_decode_error(now, &bad_packet(why));
        }
        if self.outstanding.len() >= MAX_OUTSTANDING {
            let kick = KickPush {
                code: ErrorCode::ErrorBusy as i32,
                reason: format!("more than {MAX_OUTSTANDING} requests waiting for a reply"),
            };
            return session.on_kick(now, kick);
        }
        let Packet { request_id, command, content, .. } = packet;
        let (rim_command, content, echo) = match PacketCommand::try_from(command) {
            Ok(PacketCommand::SignIn) => (Command::SignIn, content, None),
            Ok(PacketCommand::Heartbeat) => (Command::Heartbeat, Bytes::new(), Some(body)),
            Ok(PacketCommand::SubscribeRoom) => match SubscribeRoomRequest::decode(content.clone()) {
                Ok(SubscribeRoomRequest { room_id }) => {
                    self.leave_other_rooms(session, now, room_id);
                    let input = SubscribeRoomInput { room_id, after_seq: 0 };
                    (Command::SubscribeRoom, input.encode_to_vec().into(), None)
                }
                // The session refuses it as bad content.
                Err(_) => (Command::SubscribeRoom, content, None),
            },
            Ok(PacketCommand::Unknown | PacketCommand::Message) | Err(_) => {
                (Command::Unspecified, Bytes::new(), None)
            }
        };
        let id = self.track(Outstanding { request_id, command, echo, silent: false });
        session.on_packet(now, RimPacket { request_id: id, command: rim_command as i32, content, seq: 0 });
    }

    /// gim keeps one room per connection: before subscribing `room_id`,
    /// the signed-in session leaves the others (gim needed two packets for
    /// it, a bug rim does not copy).
    fn leave_other_rooms(&mut self, session: &mut Session, now: Instant, room_id: u64) {
        if room_id == 0 || !session.is_signed_in() {
            return;
        }
        for old in session.rooms().into_iter().filter(|r| r.0 != room_id) {
            let id = self.track(Outstanding {
                request_id: String::new(),
                command: PacketCommand::SubscribeRoom as i32,
                echo: None,
                silent: true,
            });
            let content = UnsubscribeRoomInput { room_id: old.0 }.encode_to_vec().into();
            let packet =
                RimPacket { request_id: id, command: Command::UnsubscribeRoom as i32, content, seq: 0 };
            session.on_packet(now, packet);
        }
    }

    fn track(&mut self, request: Outstanding) -> u64 {
        self.next_id += 1;
        self.outstanding.insert(self.next_id, request);
        self.next_id
    }

    /// The gim packet (encoded, unframed) to write for `packet`, a packet
    /// the session sent; `None` if the gim client gets nothing for it (the
    /// caller then reports its bytes written).
    pub(crate) fn outbound(&mut self, packet: &RimPacket) -> Option<Bytes> {
        let body = self.translate(packet)?;
        if body.len() > self.max_frame {
            tracing::warn!(len = body.len(), "gim packet above the maximum frame dropped");
            return None;
        }
        Some(body)
    }

    fn translate(&mut self, packet: &RimPacket) -> Option<Bytes> {
        if packet.request_id == 0 && packet.command == Command::Message as i32 {
            let push = MessagePush::decode(packet.content.clone()).ok()?;
            let content = gim_message(&push.message.unwrap_or_default()).encode_to_vec().into();
            let push =
                Packet { request_id: String::new(), command: PacketCommand::Message as i32, content, seq: 0 };
            return Some(push.encode_to_vec().into());
        }
        if packet.request_id == 0 && packet.command == Command::Kick as i32 {
            return None;
        }
        let reply = RimReply::decode(packet.content.clone()).unwrap_or_default();
        let (request_id, command) = match self.outstanding.remove(&packet.request_id) {
            Some(Outstanding { silent: true, .. }) => return None,
            Some(Outstanding { echo: Some(raw), .. }) if reply.code == ErrorCode::Ok as i32 => {
                return Some(raw);
            }
            Some(o) => (o.request_id, o.command),
            None => (String::new(), packet.command),
        };
        let message = match ErrorCode::try_from(reply.code) {
            Ok(ErrorCode::Ok) => String::new(),
            Ok(code) => format!("{}: {}", code.as_str_name(), reply.message),
            Err(_) => reply.message,
        };
        let reply = Reply { code: gim_code(reply.code), message, data: Bytes::new() };
        let packet = Packet { request_id, command, content: reply.encode_to_vec().into(), seq: 0 };
        Some(packet.encode_to_vec().into())
    }
}

/// A [`CodecError::BadPacket`] saying `why`.
fn bad_packet(why: String) -> CodecError {
    // prost offers no other way to build a DecodeError with a message.
    #[allow(deprecated)]
    CodecError::BadPacket(prost::DecodeError::new(why))
}

/// gim's code for rim error code `code`: gim's business codes where gim has
/// the same meaning (`docs/protocol.md` section 6), rim's number otherwise
/// (never 0 for an error, never one of gim's).
///
/// | rim | gim |
/// |---|---|
/// | `OK` | 0 |
/// | `ERROR_NOT_SIGNED_IN`, `ERROR_UNAUTHENTICATED`, `ERROR_TOKEN_EXPIRED`, `ERROR_TOKEN_REVOKED` | 10000 (sign in again) |
/// | `ERROR_BAD_REQUEST` | 10001 |
/// | `ERROR_DEVICE_NOT_FOUND` | 10200 |
/// | `ERROR_NOT_GROUP_MEMBER` | 10201 |
/// | `ERROR_ALREADY_EXISTS` | 10203 |
/// | `ERROR_GROUP_NOT_FOUND` | 10220 |
/// | `ERROR_USER_NOT_FOUND` | 10301 |
/// | any other | rim's code (1000–5999) |
pub fn gim_code(code: i32) -> i32 {
    match ErrorCode::try_from(code) {
        Ok(ErrorCode::Ok) => 0,
        Ok(
            ErrorCode::ErrorNotSignedIn
            | ErrorCode::ErrorUnauthenticated
            | ErrorCode::ErrorTokenExpired
            | ErrorCode::ErrorTokenRevoked,
        ) => 10000,
        Ok(ErrorCode::ErrorBadRequest) => 10001,
        Ok(ErrorCode::ErrorDeviceNotFound) => 10200,
        Ok(ErrorCode::ErrorNotGroupMember) => 10201,
        Ok(ErrorCode::ErrorAlreadyExists) => 10203,
        Ok(ErrorCode::ErrorGroupNotFound) => 10220,
        Ok(ErrorCode::ErrorUserNotFound) => 10301,
        _ => code,
    }
}

/// gim's `Message` for rim entry `m`.
///
/// | rim entry | `command` | `content` |
/// |---|---|---|
/// | chat content type (0–7), 1:1 or system (`USER`, `SYSTEM`) | `MC_USER_MESSAGE` (1) | `UserMessagePush{from_user: User{sender user, sender device}, to_user_id: conversation_id, content}` |
/// | chat content type, group, super group or room | `MC_GROUP_MESSAGE` (2) | `GroupMessagePush{from_user, group_id: conversation_id, content}` |
/// | business code (content type > 1000: `PushService`) | the code | `content` as pushed |
/// | rim-only entries: `NOTIFICATION` (8), `RECALL` (9), `READ_RECEIPT` (10) | 8, 9, 10 | the rim `Message`, encoded |
///
/// `seq` is the entry's seq in the user's own list (1:1, small groups,
/// system; 0 for online-only pushes); `room_id` is the conversation of a
/// room's or super group's list entry (`seq == group_seq`), whose `seq` is
/// 0 as in gim, so a gim client's cursor only ever holds its own list's
/// seqs. `created_at` is `send_time_ms` in whole seconds.
pub fn gim_message(m: &rim_proto::v1::Message) -> Message {
    let kind = ConversationKind::try_from(m.conversation_kind).unwrap_or(ConversationKind::Unspecified);
    let group_list =
        matches!(kind, ConversationKind::SuperGroup | ConversationKind::Room) && m.seq == m.group_seq;
    let from_user =
        Some(User { user_id: m.sender_user_id, device_id: m.sender_device_id, ..Default::default() });
    let (command, content): (i32, Bytes) = match ContentType::try_from(m.content_type) {
        Ok(ContentType::Notification | ContentType::Recall | ContentType::ReadReceipt) => {
            (m.content_type, m.encode_to_vec().into())
        }
        Ok(_) => match kind {
            ConversationKind::Group | ConversationKind::SuperGroup | ConversationKind::Room => {
                let push =
                    GroupMessagePush { from_user, group_id: m.conversation_id, content: m.content.clone() };
                (MessageCommand::GroupMessage as i32, push.encode_to_vec().into())
            }
            _ => {
                let push =
                    UserMessagePush { from_user, to_user_id: m.conversation_id, content: m.content.clone() };
                (MessageCommand::UserMessage as i32, push.encode_to_vec().into())
            }
        },
        Err(_) => (m.content_type, m.content.clone()),
    };
    Message {
        command,
        content,
        seq: if group_list { 0 } else { m.seq },
        created_at: m.send_time_ms.div_euclid(1000),
        room_id: if group_list { m.conversation_id } else { 0 },
    }
}

#[cfg(test)]
mod tests;
