//! Linearizable reads of a shard's state, wherever its replicas are.
//!
//! A cluster larger than its replication factor has nodes without a replica
//! of a given shard, and every node must still serve (or forward) whatever
//! a client or a gateway asks of it. [`Core::view`] gives a [`ShardView`]:
//!
//! * **local**: this node hosts the shard; the read barrier has passed
//!   (`Core::read_barrier`), so reads of the local replica are linearizable;
//! * **remote**: it does not; every read is sent as a [`ReadQuery`] over
//!   `RaftService.Read` to a node that hosts the shard (the map's leader
//!   first, then each voter, following hints: `Core::on_leader`), which
//!   passes its own read barrier and answers from its replica.
//!
//! Both go through [`execute`], the one mapping from a query to the
//! replica's reader, so a local and a forwarded read cannot differ.
//!
//! Invariants: a view never answers from a replica that has not passed a
//! read barrier taken after the call started (unless `follower_reads`);
//! a forwarded read is answered only by a node that hosts the shard (others
//! reply `ERROR_UNAVAILABLE`, and the next voter is tried).

use std::sync::Arc;

use prost::Message as _;
use rim_proto::ids::{DeviceId, GroupId, Seq, ShardId, UserId};
use rim_proto::store::{
    self, DeviceRecord, GroupRecord, ListHead, MemberRecord, ReadAnswer, ReadKind, ReadQuery, UserRecord,
    read_answer::Value as V,
};
use rim_proto::v1::Message;
use rim_raft_store::{Page, Reader};

use crate::core::{Core, Target};
use crate::error::{Error, Result};
use crate::group::Group;

/// Largest page or tail a forwarded query may ask for (callers clamp far
/// below this; the bound keeps one answer well under the RPC limit).
const MAX_QUERY_LIMIT: u32 = 10_000;
/// Most event body bytes one events read returns (at least one event).
pub const EVENTS_PAGE_BYTES: usize = 1 << 20;
/// Most dead letters (of any endpoint) one dead-letters read looks at.
const DEAD_LETTERS_SCAN: usize = 4_096;

/// Read access to one shard, local or forwarded (see the module doc).
#[derive(Debug, Clone)]
pub enum ShardView<'a> {
    /// This node's replica, past the read barrier.
    Local(Arc<Group>),
    /// A shard this node does not host.
    Remote {
        /// The node that forwards.
        core: &'a Core,
        /// The shard.
        shard: ShardId,
    },
}

/// Runs `q` on a replica's reader.
pub fn execute(reader: &Reader, q: &ReadQuery) -> Result<ReadAnswer> {
    let (u, g) = (UserId(q.user_id), GroupId(q.group_id));
    let limit = q.limit.min(MAX_QUERY_LIMIT) as usize;
    let page =
        |p: Page| V::Page(store::ReadPage { messages: p.messages, has_more: p.has_more, head: Some(p.head) });
    let value = match ReadKind::try_from(q.kind).unwrap_or(ReadKind::Unspecified) {
        ReadKind::Unspecified => {
            return Err(Error::rejected(rim_proto::ErrorCode::ErrorBadRequest, "read kind"));
        }
        ReadKind::User => reader.user(u)?.map(V::User),
        ReadKind::Account => reader.account(&q.name)?.map(|id| V::AccountUserId(id.0)),
        ReadKind::Device => reader.device(u, DeviceId(q.device_id))?.map(V::Device),
        ReadKind::Devices => Some(V::Devices(store::DeviceList { devices: reader.devices(u)? })),
        ReadKind::UserHead => Some(V::Head(reader.user_head(u)?)),
        ReadKind::Sync => Some(page(reader.sync(u, Seq(q.after), limit)?)),
        ReadKind::GroupHead => Some(V::Head(reader.group_head(g)?)),
        ReadKind::SyncGroup => Some(page(reader.sync_group(g, Seq(q.after), limit)?)),
        ReadKind::Group => reader.group(g)?.map(V::Group),
        ReadKind::Member => reader.member(g, u)?.map(V::Member),
        ReadKind::Members => {
            let (members, has_more) = reader.members(g, UserId(q.after), limit)?;
            Some(V::Members(store::MemberPage { members, has_more }))
        }
        ReadKind::UserGroups => Some(V::UserGroups(store::UserGroupList { groups: reader.user_groups(u)? })),
        ReadKind::Friends => Some(V::Friends(store::FriendList { friends: reader.friends(u)? })),
        ReadKind::Tail => Some(V::Messages(store::MessageList { messages: reader.tail(u, limit)? })),
        ReadKind::GroupTail => {
            Some(V::Messages(store::MessageList { messages: reader.group_tail(g, limit)? }))
        }
        ReadKind::ReadPositions => {
            let positions = reader
                .read_positions(u)?
                .into_iter()
                .map(|(kind, conversation, record)| store::ReadPosition {
                    conversation_kind: kind,
                    conversation_id: conversation,
                    record: Some(record),
                })
                .collect();
            Some(V::ReadPositions(store::ReadPositionList { positions }))
        }
        ReadKind::Events => {
            let page = reader.events_after(Some((q.after, q.after_ordinal)), limit, EVENTS_PAGE_BYTES)?;
            Some(V::Events(store::EventList { events: page.events, has_more: page.has_more }))
        }
        ReadKind::DeadLetters => {
            Some(V::DeadLetters(reader.dead_letters_of(&q.name, q.after, limit, DEAD_LETTERS_SCAN)?))
        }
    };
    Ok(ReadAnswer { value })
}

fn query(kind: ReadKind) -> ReadQuery {
    ReadQuery { kind: kind as i32, ..Default::default() }
}

fn unexpected(kind: ReadKind, got: Option<V>) -> Error {
    Error::Internal(format!("read {kind:?} answered {got:?}"))
}

/// `answer!(self.run(q), Variant)`: the variant's payload, `None` for no
/// value, or an internal error for any other variant.
macro_rules! answer {
    ($view:expr, $q:expr, $variant:ident) => {{
        let q = $q;
        let kind = ReadKind::try_from(q.kind).unwrap_or(ReadKind::Unspecified);
        match $view.run(q).await? {
            Some(V::$variant(x)) => Ok(Some(x)),
            None => Ok(None),
            other => Err(unexpected(kind, other)),
        }
    }};
}

/// Like [`answer!`] for reads that always have a value.
macro_rules! always {
    ($view:expr, $q:expr, $variant:ident) => {{
        let q = $q;
        let kind = ReadKind::try_from(q.kind).unwrap_or(ReadKind::Unspecified);
        let got: Result<Option<_>> = answer!($view, q, $variant);
        got?.ok_or_else(|| unexpected(kind, None))
    }};
}

fn into_page(p: store::ReadPage) -> Page {
    Page { messages: p.messages, has_more: p.has_more, head: p.head.unwrap_or_default() }
}

impl ShardView<'_> {
    async fn run(&self, q: ReadQuery) -> Result<Option<V>> {
        match self {
            ShardView::Local(g) => Ok(execute(&g.reader, &q)?.value),
            ShardView::Remote { core, shard } => Ok(core.read_remote(*shard, q).await?.value),
        }
    }

    /// A user's record.
    pub async fn user(&self, u: UserId) -> Result<Option<UserRecord>> {
        answer!(self, ReadQuery { user_id: u.0, ..query(ReadKind::User) }, User)
    }

    /// The user owning a login name.
    pub async fn account(&self, name: &str) -> Result<Option<UserId>> {
        let got: Option<u64> =
            answer!(self, ReadQuery { name: name.to_string(), ..query(ReadKind::Account) }, AccountUserId)?;
        Ok(got.map(UserId))
    }

    /// A device's record.
    pub async fn device(&self, u: UserId, d: DeviceId) -> Result<Option<DeviceRecord>> {
        answer!(self, ReadQuery { user_id: u.0, device_id: d.0, ..query(ReadKind::Device) }, Device)
    }

    /// Every device of a user.
    pub async fn devices(&self, u: UserId) -> Result<Vec<DeviceRecord>> {
        let list = always!(self, ReadQuery { user_id: u.0, ..query(ReadKind::Devices) }, Devices)?;
        Ok(list.devices)
    }

    /// The head of a user's list.
    pub async fn user_head(&self, u: UserId) -> Result<ListHead> {
        always!(self, ReadQuery { user_id: u.0, ..query(ReadKind::UserHead) }, Head)
    }

    /// A page of a user's list after `after`.
    pub async fn sync(&self, u: UserId, after: Seq, limit: usize) -> Result<Page> {
        let q = ReadQuery { user_id: u.0, after: after.0, limit: clamp(limit), ..query(ReadKind::Sync) };
        Ok(into_page(always!(self, q, Page)?))
    }

    /// The head of a group's list.
    pub async fn group_head(&self, g: GroupId) -> Result<ListHead> {
        always!(self, ReadQuery { group_id: g.0, ..query(ReadKind::GroupHead) }, Head)
    }

    /// A page of a group's list after `after`.
    pub async fn sync_group(&self, g: GroupId, after: Seq, limit: usize) -> Result<Page> {
        let q =
            ReadQuery { group_id: g.0, after: after.0, limit: clamp(limit), ..query(ReadKind::SyncGroup) };
        Ok(into_page(always!(self, q, Page)?))
    }

    /// A group's record.
    pub async fn group(&self, g: GroupId) -> Result<Option<GroupRecord>> {
        answer!(self, ReadQuery { group_id: g.0, ..query(ReadKind::Group) }, Group)
    }

    /// A member's record.
    pub async fn member(&self, g: GroupId, u: UserId) -> Result<Option<MemberRecord>> {
        answer!(self, ReadQuery { group_id: g.0, user_id: u.0, ..query(ReadKind::Member) }, Member)
    }

    /// A page of a group's members after user `after`, and whether more follow.
    pub async fn members(
        &self,
        g: GroupId,
        after: UserId,
        limit: usize,
    ) -> Result<(Vec<MemberRecord>, bool)> {
        let q = ReadQuery { group_id: g.0, after: after.0, limit: clamp(limit), ..query(ReadKind::Members) };
        let page = always!(self, q, Members)?;
        Ok((page.members, page.has_more))
    }

    /// A user's own list of groups.
    pub async fn user_groups(&self, u: UserId) -> Result<Vec<store::UserGroupRecord>> {
        Ok(always!(self, ReadQuery { user_id: u.0, ..query(ReadKind::UserGroups) }, UserGroups)?.groups)
    }

    /// A user's friend records.
    pub async fn friends(&self, u: UserId) -> Result<Vec<store::FriendRecord>> {
        Ok(always!(self, ReadQuery { user_id: u.0, ..query(ReadKind::Friends) }, Friends)?.friends)
    }

    /// The last `n` messages of a user's list.
    pub async fn tail(&self, u: UserId, n: usize) -> Result<Vec<Message>> {
        let q = ReadQuery { user_id: u.0, limit: clamp(n), ..query(ReadKind::Tail) };
        Ok(always!(self, q, Messages)?.messages)
    }

    /// The last `n` messages of a group's list.
    pub async fn group_tail(&self, g: GroupId, n: usize) -> Result<Vec<Message>> {
        let q = ReadQuery { group_id: g.0, limit: clamp(n), ..query(ReadKind::GroupTail) };
        Ok(always!(self, q, Messages)?.messages)
    }

    /// Every read position of a user: `(conversation kind, conversation id, record)`.
    pub async fn read_positions(&self, u: UserId) -> Result<Vec<(i32, u64, store::ReadRecord)>> {
        let list =
            always!(self, ReadQuery { user_id: u.0, ..query(ReadKind::ReadPositions) }, ReadPositions)?;
        Ok(list
            .positions
            .into_iter()
            .map(|p| (p.conversation_kind, p.conversation_id, p.record.unwrap_or_default()))
            .collect())
    }
}

impl ShardView<'_> {
    /// Events after position `(index, ordinal)` (`(0, 0)`: from the first),
    /// at most `limit` and [`EVENTS_PAGE_BYTES`] of bodies.
    pub async fn events(&self, after: (u64, u32), limit: usize) -> Result<store::EventList> {
        let q = ReadQuery {
            after: after.0,
            after_ordinal: after.1,
            limit: clamp(limit),
            ..query(ReadKind::Events)
        };
        always!(self, q, Events)
    }

    /// Dead letters of `endpoint` numbered above `after`, at most `limit`.
    pub async fn dead_letters(
        &self,
        endpoint: &str,
        after: u64,
        limit: usize,
    ) -> Result<store::DeadLetterList> {
        let q = ReadQuery {
            name: endpoint.to_string(),
            after,
            limit: clamp(limit),
            ..query(ReadKind::DeadLetters)
        };
        always!(self, q, DeadLetters)
    }
}

fn clamp(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX).min(MAX_QUERY_LIMIT)
}

impl Core {
    /// Linearizable read access to `shard`: the local replica past its read
    /// barrier, or (not hosted here) a view that forwards every read.
    pub async fn view(&self, shard: ShardId) -> Result<ShardView<'_>> {
        if self.group(shard).is_some() {
            return Ok(ShardView::Local(self.read_barrier(shard).await?));
        }
        if self.placement()?.shard(shard).is_none() {
            return Err(Error::Internal(format!("group {shard} is not in the cluster map")));
        }
        Ok(ShardView::Remote { core: self, shard })
    }

    /// Runs `q` on a node that hosts `shard` (see the module doc).
    pub(crate) async fn read_remote(&self, shard: ShardId, q: ReadQuery) -> Result<ReadAnswer> {
        let payload = q.encode_to_vec();
        self.on_leader(shard, "forwarded read", |target, left| {
            let (payload, q) = (payload.clone(), q.clone());
            async move {
                match target {
                    // The shard arrived here meanwhile (a replica move).
                    Target::Local(_) => execute(&self.read_barrier(shard).await?.reader, &q),
                    Target::Remote(node) => {
                        let reply =
                            self.call_peer(shard, node, payload, left, |mut c, msg| async move {
                                c.read(msg).await
                            })
                            .await?;
                        ReadAnswer::decode(reply.as_ref())
                            .map_err(|e| Error::Internal(format!("bad forwarded read answer: {e}")))
                    }
                }
            }
        })
        .await
    }
}
