//! gim's long-connection messages, as prost structs: the gateway side of
//! gim's `pkg/protocol/proto/connect/connect.ext.proto` (package `connect`)
//! and the push payloads of `logic/message.ext.proto` that a gim listener
//! puts into `Message.content` (`../shared/reference/gim.md` sections 2.1
//! and 2.4). Field numbers and types are gim's; nothing here is rim's.
//!
//! The tests' gim client (`gateway/tests/gim.rs`) has its own transcription
//! of the same definitions and does not use these.

use bytes::Bytes;

/// `connect.PacketCommand`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum PacketCommand {
    /// `PC_UNKNOWN`: never sent by a client; the command of frame-level
    /// error replies.
    Unknown = 0,
    /// `PC_SIGN_IN`: content `SignInRequest`.
    SignIn = 1,
    /// `PC_HEARTBEAT`: echoed unchanged.
    Heartbeat = 2,
    /// `PC_SUBSCRIBE_ROOM`: content `SubscribeRoomRequest`.
    SubscribeRoom = 3,
    /// `PC_MESSAGE`: server push, content `Message`.
    Message = 4,
}

/// `connect.MessageCommand`; business codes are cast into the same field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum MessageCommand {
    /// `MC_UNKNOWN`.
    Unknown = 0,
    /// `MC_USER_MESSAGE`: content `UserMessagePush`.
    UserMessage = 1,
    /// `MC_GROUP_MESSAGE`: content `GroupMessagePush`.
    GroupMessage = 2,
}

/// `connect.Packet`: one unit of the connection, both ways.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Packet {
    /// Chosen by the client, echoed in the reply; empty in pushes.
    #[prost(string, tag = "1")]
    pub request_id: String,
    /// A `PacketCommand`.
    #[prost(enumeration = "PacketCommand", tag = "2")]
    pub command: i32,
    /// The request, a `Reply`, or a pushed `Message`.
    #[prost(bytes = "bytes", tag = "3")]
    pub content: Bytes,
    /// Never set by the server.
    #[prost(uint64, tag = "4")]
    pub seq: u64,
}

/// `connect.Message`: the content of a `PC_MESSAGE` push.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Message {
    /// A `MessageCommand` or a business code.
    #[prost(int32, tag = "2")]
    pub command: i32,
    /// The payload (`UserMessagePush`, `GroupMessagePush`, business bytes).
    #[prost(bytes = "bytes", tag = "3")]
    pub content: Bytes,
    /// The user's seq of a stored entry; 0 for rooms and online-only pushes.
    #[prost(uint64, tag = "4")]
    pub seq: u64,
    /// Unix time in seconds.
    #[prost(int64, tag = "5")]
    pub created_at: i64,
    /// The room of a room push, else 0.
    #[prost(uint64, tag = "6")]
    pub room_id: u64,
}

/// `connect.SignInRequest`: the content of `PC_SIGN_IN`. Its encoding is
/// the same as rim's `SignInInput` (fields 1 to 3, same types).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SignInRequest {
    /// The user.
    #[prost(uint64, tag = "1")]
    pub user_id: u64,
    /// The device.
    #[prost(uint64, tag = "2")]
    pub device_id: u64,
    /// The device's token.
    #[prost(string, tag = "3")]
    pub token: String,
}

/// `connect.SubscribeRoomRequest`: the content of `PC_SUBSCRIBE_ROOM`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SubscribeRoomRequest {
    /// The room; 0 leaves the room.
    #[prost(uint64, tag = "1")]
    pub room_id: u64,
}

/// `connect.Reply`: the content of every reply but a heartbeat's.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Reply {
    /// 0 on success.
    #[prost(int32, tag = "1")]
    pub code: i32,
    /// Detail.
    #[prost(string, tag = "2")]
    pub message: String,
    /// Unused by gim's connect service.
    #[prost(bytes = "bytes", tag = "3")]
    pub data: Bytes,
}

/// `logic.User`: a message's sender.
#[derive(Clone, PartialEq, prost::Message)]
pub struct User {
    /// The user.
    #[prost(uint64, tag = "1")]
    pub user_id: u64,
    /// The device it sent from.
    #[prost(uint64, tag = "2")]
    pub device_id: u64,
    /// Profile fields (not filled by rim's gateway).
    #[prost(string, tag = "3")]
    pub nickname: String,
    /// Profile fields (not filled by rim's gateway).
    #[prost(string, tag = "4")]
    pub avatar_url: String,
    /// Profile fields (not filled by rim's gateway).
    #[prost(string, tag = "5")]
    pub extra: String,
}

/// `logic.UserMessagePush`: `Message.content` of `MC_USER_MESSAGE`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UserMessagePush {
    /// The sender.
    #[prost(message, optional, tag = "1")]
    pub from_user: Option<User>,
    /// The recipient.
    #[prost(uint64, tag = "2")]
    pub to_user_id: u64,
    /// The message body.
    #[prost(bytes = "bytes", tag = "3")]
    pub content: Bytes,
}

/// `logic.GroupMessagePush`: `Message.content` of `MC_GROUP_MESSAGE`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GroupMessagePush {
    /// The sender.
    #[prost(message, optional, tag = "1")]
    pub from_user: Option<User>,
    /// The group (or room).
    #[prost(uint64, tag = "2")]
    pub group_id: u64,
    /// The message body.
    #[prost(bytes = "bytes", tag = "3")]
    pub content: Bytes,
}
