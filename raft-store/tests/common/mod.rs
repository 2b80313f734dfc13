//! Test support: state machines of one or more shards on temp databases,
//! fed with hand-made log entries.
#![allow(dead_code, missing_docs)]

use std::collections::BTreeMap;

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, LogId};
use rim_proto::store::{self, Op, OpResult, Proposal, op::Op as O};
use rim_raft_store::keys::{self, MetaTag};
use rim_raft_store::raft::Entry;
use rim_raft_store::{ApplySabotage, Db, DbOptions, Limits, Reader, Request, ShardId, StateMachine, db};

/// One node's database with state machines for some shards.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub db: Db,
    /// Limits every shard starts with (stored as version 1 when it is
    /// opened without any), or none: the defaults.
    pub limits: Option<Limits>,
    pub sms: BTreeMap<u32, StateMachine>,
    next_index: BTreeMap<u32, u64>,
}

impl Node {
    pub fn new(shards: &[u32]) -> Node {
        Node::open(shards, None)
    }

    /// Shards whose state starts with `limits` (as a snapshot would bring
    /// them: written into the state, not applied from the log, so the log
    /// indexes stay those of [`Node::new`], and limits `Limits::validate`
    /// refuses can be tried).
    pub fn with_limits(shards: &[u32], limits: Limits) -> Node {
        Node::open(shards, Some(limits))
    }

    fn open(shards: &[u32], limits: Option<Limits>) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&DbOptions::new(dir.path())).unwrap();
        let mut node = Node { dir, db, limits, sms: BTreeMap::new(), next_index: BTreeMap::new() };
        for &s in shards {
            node.open_shard(s);
        }
        node
    }

    pub fn open_shard(&mut self, s: u32) {
        if let Some(limits) = &self.limits
            && self.reader(s).limits().unwrap().is_none()
        {
            let key = keys::meta(ShardId(s), MetaTag::Limits);
            let raw = self.db.raw();
            raw.put_cf(self.db.cf(db::CF_SM), key, db::encode(&limits.to_proto(1))).unwrap();
        }
        let sm = StateMachine::open(self.db.clone(), ShardId(s), ApplySabotage::default()).unwrap();
        self.sms.insert(s, sm);
        self.next_index.entry(s).or_insert(1);
    }

    /// Starts the log index of a shard whose state machine was inserted by hand.
    pub fn open_shard_index(&mut self, s: u32) {
        self.next_index.entry(s).or_insert(1);
    }

    /// Closes the database and opens it again from disk.
    pub fn reopen(self) -> Node {
        let Node { dir, db, limits, sms, next_index } = self;
        let shards: Vec<u32> = sms.keys().copied().collect();
        drop(sms);
        drop(db);
        let db = Db::open(&DbOptions::new(dir.path())).unwrap();
        let mut node = Node { dir, db, limits, sms: BTreeMap::new(), next_index };
        for s in shards {
            node.open_shard(s);
        }
        node
    }

    pub fn sm(&mut self, s: u32) -> &mut StateMachine {
        self.sms.get_mut(&s).expect("shard open")
    }

    pub fn reader(&self, s: u32) -> Reader {
        Reader::new(self.db.clone(), ShardId(s))
    }

    /// Builds the next log entry of shard `s` carrying `ops`.
    pub fn entry(&mut self, s: u32, now_ms: i64, ops: Vec<Op>) -> Entry {
        let idx = self.next_index.get_mut(&s).expect("shard open");
        let e = make_entry(*idx, now_ms, ops);
        *idx += 1;
        e
    }

    /// Applies one entry with `ops` to shard `s`; returns the op results.
    pub async fn apply(&mut self, s: u32, ops: Vec<Op>) -> Vec<OpResult> {
        let e = self.entry(s, 1_700_000_000_000, ops);
        let mut r = self.sm(s).apply(vec![e]).await.unwrap();
        r.pop().unwrap().0.results
    }

    /// Applies one op; returns its result.
    pub async fn apply1(&mut self, s: u32, op: Op) -> OpResult {
        self.apply(s, vec![op]).await.pop().unwrap()
    }
}

pub fn make_entry(index: u64, now_ms: i64, ops: Vec<Op>) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Request(Proposal { now_ms, ops })),
    }
}

pub fn op(o: O) -> Op {
    Op { op: Some(o) }
}

pub fn create_user(id: u64) -> Op {
    op(O::CreateUser(store::CreateUser { user_id: id, nickname: format!("user{id}"), ..Default::default() }))
}

pub fn register_device(user: u64, device: u64) -> Op {
    op(O::RegisterDevice(store::RegisterDevice { user_id: user, device_id: device, ..Default::default() }))
}

pub fn send(from: u64, to: u64, cmid: &str, text: &str) -> Op {
    op(O::SendToUser(store::SendToUser {
        sender_user_id: from,
        sender_device_id: 1,
        recipient_user_id: to,
        client_msg_id: cmid.into(),
        content_type: rim_proto::v1::ContentType::Text as i32,
        content: text.as_bytes().to_vec().into(),
        refers_to: 0,
    }))
}

pub fn send_group(group: u64, from: u64, cmid: &str, text: &str) -> Op {
    op(O::SendToGroup(store::SendToGroup {
        group_id: group,
        sender_user_id: from,
        sender_device_id: 1,
        client_msg_id: cmid.into(),
        content_type: rim_proto::v1::ContentType::Text as i32,
        content: text.as_bytes().to_vec().into(),
        ..Default::default()
    }))
}

pub fn create_group(group: u64, kind: store::GroupKind, owner: u64, members: &[u64]) -> Op {
    op(O::CreateGroup(store::CreateGroup {
        group_id: group,
        kind: kind as i32,
        owner_id: owner,
        name: format!("group{group}"),
        member_ids: members.to_vec(),
        ..Default::default()
    }))
}

pub fn code(r: &OpResult) -> rim_proto::ErrorCode {
    rim_proto::ErrorCode::try_from(r.code).unwrap()
}

pub fn sent(r: &OpResult) -> store::SendResult {
    match &r.value {
        Some(store::op_result::Value::Sent(s)) => s.clone(),
        other => panic!("expected a send result, got {other:?} (code {}, {})", r.code, r.message),
    }
}

/// Every message of a user's list, paging through it.
pub fn list(r: &Reader, user: u64) -> Vec<rim_proto::v1::Message> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = r.sync(rim_raft_store::UserId(user), rim_raft_store::Seq(after), 100).unwrap();
        after = page.messages.last().map(|m| m.seq).unwrap_or(after);
        out.extend(page.messages);
        if !page.has_more {
            return out;
        }
    }
}
