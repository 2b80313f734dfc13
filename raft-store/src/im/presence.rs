//! Sessions and push checks: the state behind `device.online`,
//! `device.offline` and `push.needed` (issue 15 §3), all decided at apply.
//!
//! # Sessions
//!
//! Every connection sign-in is a `DeviceOnline`: it bumps the device's
//! `session_epoch` and returns it; the gateway sends it back in the
//! `DeviceOffline` of that connection's close. A device is *online*,
//! *closing* (its current session closed less than `offline_grace_ms` ago:
//! `offline_due_ms` set, and a due check stored) or *offline*:
//!
//! | state   | `DeviceOnline`                 | `DeviceOffline(epoch = current)` | check due          |
//! |---------|--------------------------------|----------------------------------|--------------------|
//! | offline | online, **`device.online`**    | ignored                          | -                  |
//! | online  | online (a newer session)       | closing                          | -                  |
//! | closing | online, check dropped, no event| ignored                          | offline, **`device.offline`** |
//!
//! A `DeviceOffline` of an older epoch is ignored: a newer connection of the
//! device exists. So a quick reconnect (within the grace) produces no event
//! at all, and a device moving between gateways never looks offline.
//!
//! # Gateways that vanish
//!
//! A gateway that crashes sends no `DeviceOffline`. Each session names its
//! gateway *instance* (`DeviceOnline.gateway`, unique per gateway process),
//! and `Table::Session` indexes the online devices by instance. The shard's
//! leader watches the instances' push streams (node `sessions`); when an
//! instance with indexed sessions has had no stream for its grace, the
//! leader proposes `GatewayGone`, which takes each of its devices that is
//! still online offline at once (`device.offline`, `offline_since_ms` = when
//! it was last seen), up to [`MAX_GATEWAY_GONE`] per op. A device that
//! signed in again elsewhere in the meantime names another instance and is
//! left alone.
//!
//! # Push checks
//!
//! When a user's list receives a message from someone else (not a receipt,
//! notification or recall) and no check is pending, one is armed:
//! `push_due_ms = now + push_needed_after_ms` and `push_from_seq` (the first
//! seq it covers) go into the list head, and a due entry is stored. When it
//! fires, every device of the user that is not signed out and has not
//! acknowledged `push_from_seq` gets one `push.needed` covering the seqs
//! after what it acknowledged or was already told about, up to the head;
//! the device's `notified_seq` moves to the head. So every received message
//! a device did not acknowledge within the delay is covered by exactly one
//! `push.needed` for that device, whether or not a socket happens to exist.
//! Super groups and rooms (read diffusion, no per-user list) have none.
//!
//! # Due checks
//!
//! `Table::Due` holds `(due_ms, kind, user, device)` in time order. The
//! shard's leader proposes `FireDue` for entries whose time has come (the
//! node's `due` task); apply skips an entry that is gone or not due at the
//! proposal's time, and one whose record no longer names that time, so
//! `FireDue` is idempotent and a new leader simply continues.
//!
//! # Invariants
//!
//! * A due entry of kind `PUSH` exists iff the user's head has that
//!   `push_due_ms`; of kind `OFFLINE` iff the device has that
//!   `offline_due_ms`.
//! * A session entry `(gateway, user, device)` exists iff the device is
//!   online and its record names that `gateway` (non-empty).
//! * `session_epoch` only grows; `notified_seq` only grows.

use rim_proto::ids::{DeviceId, Seq, UserId};
use rim_proto::store::{self, DeviceRecord, DueKind, ListHead};
use rim_proto::v1::{ContentType, Message};
use serde::Serialize;

use super::{Applier, check_id};
use crate::error::{Result, reject};
use crate::keys;

/// Most entries one `FireDue` may carry.
pub const MAX_FIRE_DUE: usize = 1_024;
/// Most devices one `GatewayGone` takes offline.
pub const MAX_GATEWAY_GONE: usize = 1_024;
/// Most devices of one user a push check looks at.
const MAX_DEVICES_CHECKED: usize = 256;

/// `data` of `device.online` and `device.offline`.
#[derive(Serialize)]
struct DeviceData {
    user_id: String,
    device_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    external_device_id: String,
    device_type: String,
    session_epoch: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    offline_since_ms: Option<i64>,
}

/// `data` of `push.needed`.
#[derive(Serialize)]
struct PushData {
    user_id: String,
    device_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    external_device_id: String,
    device_type: String,
    online: bool,
    /// The device acknowledged up to here.
    ack_seq: u64,
    /// This event covers the seqs `from_seq ..= to_seq` of the user's list.
    from_seq: u64,
    to_seq: u64,
    /// The newest entry, for the notification's text.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_message_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_sender_user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_conversation_kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_conversation_id: Option<String>,
}

fn device_type_name(t: i32) -> String {
    let t = store::DeviceType::try_from(t).unwrap_or(store::DeviceType::Unspecified);
    t.as_str_name().strip_prefix("DEVICE_TYPE_").unwrap_or("UNSPECIFIED").to_ascii_lowercase()
}

/// Whether an entry appended to `owner`'s list is one a device should be
/// told about: a message someone else sent.
fn notifies(owner: UserId, msg: &Message) -> bool {
    msg.sender_user_id != owner.0
        && !matches!(
            ContentType::try_from(msg.content_type),
            Ok(ContentType::Recall | ContentType::ReadReceipt | ContentType::Notification)
        )
}

impl Applier<'_> {
    fn device_event(&mut self, kind: &str, d: &DeviceRecord, offline_since_ms: Option<i64>) -> Result<()> {
        if !self.limits.presence_events {
            return Ok(());
        }
        let data = DeviceData {
            user_id: d.user_id.to_string(),
            device_id: d.device_id.to_string(),
            external_device_id: d.external_id.clone(),
            device_type: device_type_name(d.device_type),
            session_epoch: d.session_epoch,
            offline_since_ms,
        };
        self.emit(kind, format!("d:{}", d.user_id), data)
    }

    fn load_device(&self, user: UserId, device: DeviceId) -> Result<(Vec<u8>, DeviceRecord)> {
        check_id("device_id", device.0)?;
        let key = keys::device(self.shard, user, device);
        let Some(d) = self.txn.get_msg::<DeviceRecord>(&key)? else {
            reject!(ErrorDeviceNotFound, "device {device} of user {user} not found");
        };
        Ok((key, d))
    }

    pub(super) fn device_online(&mut self, c: &store::DeviceOnline) -> Result<DeviceRecord> {
        if c.gateway.len() > keys::MAX_GATEWAY_LEN {
            reject!(ErrorBadRequest, "gateway id longer than {} bytes", keys::MAX_GATEWAY_LEN);
        }
        let user = UserId(c.user_id);
        let (key, mut d) = self.load_device(user, DeviceId(c.device_id))?;
        if d.online && d.gateway != c.gateway {
            self.unindex_session(&d);
        }
        if !c.gateway.is_empty() {
            self.txn.put(keys::session(self.shard, &c.gateway, user, DeviceId(d.device_id)), Vec::new());
        }
        d.gateway.clone_from(&c.gateway);
        d.session_epoch += 1;
        d.signed_out = false;
        if d.offline_due_ms != 0 {
            // A reconnect within the grace: the presence goes on.
            self.drop_offline_check(&mut d);
        } else if !d.online {
            self.device_event("device.online", &d, None)?;
        }
        d.online = true;
        self.txn.put_msg(key, &d);
        Ok(d)
    }

    pub(super) fn device_offline(&mut self, c: &store::DeviceOffline) -> Result<()> {
        let user = UserId(c.user_id);
        let (key, mut d) = self.load_device(user, DeviceId(c.device_id))?;
        if !d.online || d.offline_due_ms != 0 || d.session_epoch != c.epoch {
            return Ok(());
        }
        // Never 0 (0 means none) and never before the proposal's time.
        let due = self.now_ms.max(0).saturating_add(self.limits.offline_grace_ms.max(1));
        d.offline_due_ms = due;
        self.txn
            .put(keys::due(self.shard, due, DueKind::Offline as u8, user, DeviceId(d.device_id)), Vec::new());
        self.txn.put_msg(key, &d);
        Ok(())
    }

    /// Arms `user`'s push check if `msg`, just given `seq` in the user's
    /// list, is one to tell devices about and none is pending. Called by
    /// the append, before it stores `head`.
    pub(super) fn arm_push_check(&mut self, user: UserId, head: &mut ListHead, seq: Seq, msg: &Message) {
        let after = self.limits.push_needed_after_ms;
        if after == 0 || !self.limits.events || head.push_due_ms != 0 || !notifies(user, msg) {
            return;
        }
        let due = self.now_ms.max(0).saturating_add(after);
        head.push_due_ms = due;
        head.push_from_seq = seq.0;
        self.txn.put(keys::due(self.shard, due, DueKind::Push as u8, user, DeviceId(0)), Vec::new());
    }

    pub(super) fn fire_due(&mut self, c: &store::FireDue) -> Result<()> {
        if c.entries.len() > MAX_FIRE_DUE {
            reject!(ErrorBadRequest, "at most {MAX_FIRE_DUE} due entries per operation");
        }
        for e in &c.entries {
            let (user, device) = (UserId(e.user_id), DeviceId(e.device_id));
            let key = keys::due(self.shard, e.due_ms, e.kind as u8, user, device);
            if e.due_ms > self.now_ms || !self.txn.exists(&key)? {
                continue;
            }
            self.txn.delete(key);
            match e.kind() {
                DueKind::Push => self.push_check(user, e.due_ms)?,
                DueKind::Offline => self.offline_check(user, device, e.due_ms)?,
                DueKind::Unspecified => {}
            }
        }
        Ok(())
    }

    fn offline_check(&mut self, user: UserId, device: DeviceId, due_ms: i64) -> Result<()> {
        let key = keys::device(self.shard, user, device);
        let Some(mut d) = self.txn.get_msg::<DeviceRecord>(&key)? else { return Ok(()) };
        if !d.online || d.offline_due_ms != due_ms {
            return Ok(());
        }
        self.unindex_session(&d);
        d.online = false;
        d.offline_due_ms = 0;
        self.txn.put_msg(key, &d);
        let since = due_ms.saturating_sub(self.limits.offline_grace_ms.max(1));
        self.device_event("device.offline", &d, Some(since))
    }

    /// Drops a closing session's pending offline check, if any.
    fn drop_offline_check(&mut self, d: &mut DeviceRecord) {
        if d.offline_due_ms != 0 {
            let (user, device) = (UserId(d.user_id), DeviceId(d.device_id));
            self.txn.delete(keys::due(self.shard, d.offline_due_ms, DueKind::Offline as u8, user, device));
            d.offline_due_ms = 0;
        }
    }

    /// Drops the session entry of an online device.
    fn unindex_session(&mut self, d: &DeviceRecord) {
        if !d.gateway.is_empty() {
            self.txn.delete(keys::session(self.shard, &d.gateway, UserId(d.user_id), DeviceId(d.device_id)));
        }
    }

    pub(super) fn gateway_gone(&mut self, c: &store::GatewayGone) -> Result<()> {
        if c.gateway.is_empty() || c.gateway.len() > keys::MAX_GATEWAY_LEN {
            reject!(ErrorBadRequest, "gateway id must be 1..={} bytes", keys::MAX_GATEWAY_LEN);
        }
        let prefix = keys::sessions_of(self.shard, &c.gateway);
        for (k, _) in self.txn.scan_from(&prefix, &prefix, MAX_GATEWAY_GONE)? {
            self.txn.delete(k.clone());
            let Some((_, user, device)) = keys::session_parts(&k) else { continue };
            let key = keys::device(self.shard, user, device);
            let Some(mut d) = self.txn.get_msg::<DeviceRecord>(&key)? else { continue };
            if !d.online || d.gateway != c.gateway {
                continue;
            }
            self.drop_offline_check(&mut d);
            d.online = false;
            self.txn.put_msg(key, &d);
            self.device_event("device.offline", &d, Some(c.since_ms.min(self.now_ms)))?;
        }
        Ok(())
    }

    fn push_check(&mut self, user: UserId, due_ms: i64) -> Result<()> {
        let head_key = keys::user_head(self.shard, user);
        let Some(mut head) = self.txn.get_msg::<ListHead>(&head_key)? else { return Ok(()) };
        if head.push_due_ms != due_ms {
            return Ok(());
        }
        let from = head.push_from_seq;
        head.push_due_ms = 0;
        head.push_from_seq = 0;
        self.txn.put_msg(head_key, &head);
        let last = self.txn.get_msg::<Message>(&keys::user_msg(self.shard, user, Seq(head.last_seq)))?;
        let prefix = keys::devices_of(self.shard, user);
        for (k, v) in self.txn.scan_from(&prefix, &prefix, MAX_DEVICES_CHECKED)? {
            let mut d: DeviceRecord = crate::db::decode(&v)?;
            if d.signed_out || d.ack_seq >= from || d.notified_seq >= head.last_seq {
                continue;
            }
            let from_seq = d.ack_seq.max(d.notified_seq) + 1;
            d.notified_seq = head.last_seq;
            self.txn.put_msg(k, &d);
            let data = PushData {
                user_id: user.0.to_string(),
                device_id: d.device_id.to_string(),
                external_device_id: d.external_id.clone(),
                device_type: device_type_name(d.device_type),
                online: d.online,
                ack_seq: d.ack_seq,
                from_seq,
                to_seq: head.last_seq,
                last_message_id: last.as_ref().map(|m| m.message_id.to_string()),
                last_sender_user_id: last.as_ref().map(|m| m.sender_user_id.to_string()),
                last_conversation_kind: last.as_ref().map(|m| super::events::kind_name(m.conversation_kind)),
                last_conversation_id: last.as_ref().map(|m| {
                    // A 1:1 entry names the peer: the recipient's copy names
                    // the sender's conversation as the recipient.
                    if m.conversation_kind == rim_proto::v1::ConversationKind::User as i32
                        && m.conversation_id == user.0
                    {
                        m.sender_user_id.to_string()
                    } else {
                        m.conversation_id.to_string()
                    }
                }),
            };
            self.emit("push.needed", format!("d:{}", user.0), data)?;
        }
        Ok(())
    }
}

impl super::read::Reader {
    /// The gateway instances holding sessions of this shard's online
    /// devices, at most `limit`, in key order.
    pub fn session_gateways(&self, limit: usize) -> Result<Vec<String>> {
        let all = keys::sessions_all(self.shard);
        let mut out = Vec::new();
        let mut start = all.clone();
        while out.len() < limit {
            let (rows, _) = self.range(&all, start, 1)?;
            let Some((gateway, ..)) = rows.first().and_then(|(k, _)| keys::session_parts(k)) else { break };
            // Past every key of this gateway: its prefix, then more than
            // the 16 bytes of ids.
            start = keys::sessions_of(self.shard, &gateway);
            start.extend_from_slice(&[0xFF; 17]);
            out.push(gateway);
        }
        Ok(out)
    }

    /// Due checks whose time is at or before `now_ms`, oldest first, at
    /// most `limit`.
    pub fn due_checks(&self, now_ms: i64, limit: usize) -> Result<Vec<store::DueEntry>> {
        let prefix = keys::due_all(self.shard);
        let (rows, _) = self.range(&prefix, prefix.clone(), limit.max(1))?;
        Ok(rows
            .iter()
            .filter_map(|(k, _)| keys::due_parts(k))
            .take_while(|(due, ..)| *due <= now_ms)
            .map(|(due_ms, kind, u, d)| store::DueEntry {
                due_ms,
                kind: i32::from(kind),
                user_id: u.0,
                device_id: d.0,
            })
            .collect())
    }
}
