//! Online-only pushes (`PushedMessage.persisted` false, seq 0): business
//! pushes that are not stored, so they have no seq, no gap check and no
//! resync. They reach the connections online when they are sent, and no
//! others.
//!
//! * Addressing: a user's push (`LIST_KIND_USER`) goes to that user's
//!   connections, a group's or room's (`LIST_KIND_GROUP`) to the
//!   connections subscribed to it, a broadcast (owner 0) to every
//!   connection (the push router hands a broadcast only to the connections
//!   whose user lives in the shard of the stream that carried it: every
//!   shard leader sends it once, so each connection gets it once).
//! * They go out as `MESSAGE` packets with `Packet.seq` 0 and
//!   `MessagePush.persisted` false, and touch no seq cursor.
//! * Priority: a normal-priority one (`PUSH_PRIORITY_NORMAL`, or
//!   unspecified) is dropped when the connection's send queue is more than
//!   half full (or the push would not fit), and counted
//!   ([`Session::dropped_pushes`], and the process-wide
//!   `rim_gateway_online_pushes_dropped_total`), instead of closing the
//!   connection. A high-priority one is queued like a persisted push: a
//!   connection too slow for it is closed.

use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message as _;
use rim_proto::codec::encoded_frame_len;
use rim_proto::ids::{GroupId, UserId};
use rim_proto::v1::{Command, ListKind, MessagePush, Packet, PushPriority, PushedMessage};

use super::{Session, State};

/// Normal-priority online pushes dropped in this process, for `/metrics`.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Normal-priority online-only pushes dropped for slow connections in this
/// process (all gateways).
pub(crate) fn dropped_total() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

impl Session {
    /// An online-only push (see the [module documentation](self)).
    pub(super) fn on_online_push(&mut self, push: PushedMessage) {
        let State::SignedIn(s) = &self.state else {
            return;
        };
        if super::skips(&push, s.id.device_id) {
            return;
        }
        let addressed = match ListKind::try_from(push.list_kind) {
            Ok(ListKind::User) => UserId(push.owner_id) == s.id.user_id,
            Ok(ListKind::Group) => s.rooms.contains_key(&GroupId(push.owner_id)),
            Ok(ListKind::Unspecified) | Err(_) => true,
        };
        if !addressed {
            tracing::trace!(
                conn = self.conn_id,
                owner = push.owner_id,
                "online push for another list dropped"
            );
            return;
        }
        let content = MessagePush { message: Some(push.message.unwrap_or_default()), persisted: false };
        let packet = Packet {
            request_id: 0,
            command: Command::Message as i32,
            content: content.encode_to_vec().into(),
            seq: 0,
        };
        let high = push.priority == PushPriority::High as i32;
        let limit = self.config.send_queue_limit;
        let fits = self.queued_bytes + encoded_frame_len(&packet) <= limit;
        if !high && (self.queued_bytes > limit / 2 || !fits) {
            self.dropped_pushes += 1;
            DROPPED.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                conn = self.conn_id,
                queued = self.queued_bytes,
                "online push dropped for a slow connection"
            );
            return;
        }
        if packet.encoded_len() > self.config.max_frame {
            // Not stored anywhere: nothing to resync, so only this push is lost.
            tracing::warn!(conn = self.conn_id, "online push above the maximum frame dropped");
            return;
        }
        self.send(packet);
    }

    /// Normal-priority online-only pushes this session dropped because its
    /// send queue was more than half full.
    pub fn dropped_pushes(&self) -> u64 {
        self.dropped_pushes
    }
}
