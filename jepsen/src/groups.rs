//! Groups in the workload (IM-7 atomic fan-out, IM-10 conversation order):
//! set-up, the group calls of both client paths, and the final reads of
//! super groups' lists.
//!
//! * **Set-up** ([`setup`], before any fault): one user creates each group
//!   with client gRPC `GroupService.CreateGroup`, naming every member:
//!   small group 1 = the first three users, small group 2 (from four users
//!   on) = the second half plus one user of the first, so both span several
//!   shards (users are hashed onto shards); one super group of all users.
//!   Each creation is a `create-group` op in the history (members and the
//!   new id), so a saved history is checkable on its own; the groups are
//!   also in `test.json`. A node that answers `UNIMPLEMENTED` (a build
//!   without `GroupService`) makes the run go on without groups, with a
//!   printed reason.
//! * **Sends**: a worker sends a fraction (`--group-sends`) of its messages
//!   to a random group of its user, with the same unique payload ids and
//!   the same ok/fail/info rules as 1:1 sends: gateway devices with
//!   `SEND_GROUP` (one attempt, [`gateway_send_group`]), gRPC devices with
//!   `MessageService.SendGroupMessage` ([`GroupRpc::send_group`]).
//! * **Reads**: devices now and then read a super group's list from their
//!   own cursor with `SYNC_GROUP` / `SyncGroup` (small groups' messages
//!   arrive in the members' own lists and are read by the usual syncs).
//! * **Final reads** ([`final_reads`]): every super group's complete list
//!   through every node, read by a member from group seq 0.

use std::net::SocketAddr;
use std::time::Duration;

use prost::Message as _;
use rim_client::{Client, ClientError, Credentials};
use rim_proto::ids::{GroupId, Seq, UserId};
use rim_proto::metadata::{DEVICE_ID_METADATA_KEY, TOKEN_METADATA_KEY, USER_ID_METADATA_KEY};
use rim_proto::v1::group_service_client::GroupServiceClient;
use rim_proto::v1::message_service_client::MessageServiceClient;
use rim_proto::v1::{
    Command, ConversationKind, CreateGroupRequest, GroupKind, SendInput, SendOutput, SyncGroupInput,
    SyncGroupOutput,
};
use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::error::{Error, Result};
use crate::history::{ConvKind, FinalReadValue, GroupValue, OpBody, OpType, Process};
use crate::recorder::Recorder;
use crate::workload::{Account, Endpoints, FINAL_READ_PROCESS_BASE, FinalReads, bounded, entry};

/// Process numbers of `create-group` ops start here (one per attempt).
pub const SETUP_PROCESS_BASE: u64 = 900_000;
/// Page size of final reads of group lists.
const FINAL_PAGE: u32 = 500;

/// A group of the run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Group {
    /// The group id.
    pub id: u64,
    /// `Group` (small) or `Super`.
    pub kind: ConvKind,
    /// The creator.
    pub owner: u64,
    /// Every member, the owner included, ascending.
    pub members: Vec<u64>,
}

impl Group {
    /// The conversation kind a send to it names.
    pub fn conversation_kind(&self) -> ConversationKind {
        conversation_kind(self.kind)
    }
}

/// The wire conversation kind of a history kind.
pub fn conversation_kind(kind: ConvKind) -> ConversationKind {
    match kind {
        ConvKind::User => ConversationKind::User,
        ConvKind::Group => ConversationKind::Group,
        ConvKind::Super => ConversationKind::SuperGroup,
        ConvKind::Room => ConversationKind::Room,
        ConvKind::System => ConversationKind::System,
    }
}

/// The history kind of a wire conversation kind (`UNSPECIFIED` = 1:1).
pub fn conv_kind(kind: i32) -> ConvKind {
    match ConversationKind::try_from(kind).unwrap_or(ConversationKind::Unspecified) {
        ConversationKind::Group => ConvKind::Group,
        ConversationKind::SuperGroup => ConvKind::Super,
        ConversationKind::Room => ConvKind::Room,
        ConversationKind::System => ConvKind::System,
        ConversationKind::User | ConversationKind::Unspecified => ConvKind::User,
    }
}

/// Group calls of one node's client gRPC listener (`rim-client`'s
/// `NodeApi` has no group methods), signed as a given device. Cheap to
/// clone; connects lazily.
#[derive(Debug, Clone)]
pub struct GroupRpc {
    channel: Channel,
    timeout: Duration,
}

impl GroupRpc {
    /// A client of the node at `addr`, `timeout` per call.
    pub fn new(addr: SocketAddr, timeout: Duration) -> Result<GroupRpc, ClientError> {
        let uri = format!("http://{addr}");
        let endpoint = tonic::transport::Endpoint::from_shared(uri)
            .map_err(|e| ClientError::InvalidAddress(addr.to_string(), e.to_string()))?
            .connect_timeout(Duration::from_secs(2));
        Ok(GroupRpc { channel: endpoint.connect_lazy(), timeout })
    }

    fn signed<T>(&self, creds: &Credentials, message: T) -> Result<tonic::Request<T>, tonic::Status> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        let token = MetadataValue::try_from(creds.token.as_str())
            .map_err(|_| tonic::Status::unauthenticated("token is not valid metadata"))?;
        let metadata = request.metadata_mut();
        metadata.insert(USER_ID_METADATA_KEY, creds.user_id.0.into());
        metadata.insert(DEVICE_ID_METADATA_KEY, creds.device_id.0.into());
        metadata.insert(TOKEN_METADATA_KEY, token);
        Ok(request)
    }

    /// `GroupService.CreateGroup` as `creds` (the owner) with the other
    /// `members`; the new group's id.
    pub async fn create_group(
        &self,
        creds: &Credentials,
        kind: GroupKind,
        name: &str,
        members: &[UserId],
    ) -> Result<GroupId, tonic::Status> {
        let request = CreateGroupRequest {
            kind: kind as i32,
            name: name.into(),
            member_ids: members.iter().map(|m| m.0).collect(),
            ..Default::default()
        };
        let reply =
            GroupServiceClient::new(self.channel.clone()).create_group(self.signed(creds, request)?).await?;
        reply
            .into_inner()
            .group
            .map(|g| GroupId(g.group_id))
            .ok_or_else(|| tonic::Status::internal("no group in reply"))
    }

    /// `MessageService.SendGroupMessage` as `creds`.
    pub async fn send_group(&self, creds: &Credentials, input: SendInput) -> Result<SendOutput, ClientError> {
        let request = self.signed(creds, input)?;
        Ok(MessageServiceClient::new(self.channel.clone()).send_group_message(request).await?.into_inner())
    }

    /// `MessageService.SyncGroup` as `creds`: group seqs after `after`.
    pub async fn sync_group(
        &self,
        creds: &Credentials,
        group: GroupId,
        after: Seq,
        limit: u32,
    ) -> Result<SyncGroupOutput, ClientError> {
        let input = SyncGroupInput { group_id: group.0, after_group_seq: after.0, limit };
        let request = self.signed(creds, input)?;
        Ok(MessageServiceClient::new(self.channel.clone()).sync_group(request).await?.into_inner())
    }
}

/// One `SEND_GROUP` attempt over the gateway connection (no retry).
pub async fn gateway_send_group(
    client: &Client,
    input: SendInput,
    timeout: Duration,
) -> Result<SendOutput, ClientError> {
    let data = client.request(Command::SendGroup, input.encode_to_vec().into(), timeout).await?;
    Ok(SendOutput::decode(data)?)
}

/// One `SYNC_GROUP` over the gateway connection.
pub async fn gateway_sync_group(
    client: &Client,
    group: GroupId,
    after: Seq,
    limit: u32,
    timeout: Duration,
) -> Result<SyncGroupOutput, ClientError> {
    let input = SyncGroupInput { group_id: group.0, after_group_seq: after.0, limit };
    let data = client.request(Command::SyncGroup, input.encode_to_vec().into(), timeout).await?;
    Ok(SyncGroupOutput::decode(data)?)
}

/// The groups to create for `users` (in registration order): `(kind,
/// owner, members)`.
pub fn plan(users: &[u64]) -> Vec<(ConvKind, u64, Vec<u64>)> {
    let n = users.len();
    if n < 2 {
        return Vec::new();
    }
    let sorted = |v: &[u64]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v.dedup();
        v
    };
    let mut out = vec![(ConvKind::Group, users[0], sorted(&users[..n.min(3)]))];
    if n >= 4 {
        let mut second = users[n / 2..].to_vec();
        second.push(users[n / 2 - 1]);
        out.push((ConvKind::Group, users[n - 1], sorted(&second)));
    }
    out.push((ConvKind::Super, users[n - 1], sorted(users)));
    out
}

/// Creates the groups of [`plan`], recording `create-group` ops, trying the
/// nodes in turn until `deadline`. A node answering `UNIMPLEMENTED` is
/// [`Error::GroupsUnimplemented`] (the run goes on without groups); no
/// success before the deadline is [`Error::GroupSetupFailed`].
pub async fn setup(
    recorder: &Recorder,
    endpoints: &Endpoints,
    accounts: &[Account],
    op_timeout: Duration,
    deadline: Instant,
) -> Result<Vec<Group>> {
    let rpcs: Vec<(u64, GroupRpc)> = endpoints
        .nodes
        .iter()
        .filter_map(|(id, a)| GroupRpc::new(*a, op_timeout).ok().map(|r| (*id, r)))
        .collect();
    let users: Vec<u64> = accounts.iter().map(|a| a.user.0).collect();
    let mut groups = Vec::new();
    let mut attempt = 0u64;
    for (i, (kind, owner, members)) in plan(&users).into_iter().enumerate() {
        let Some(creds) = accounts.iter().find(|a| a.user == UserId(owner)).and_then(|a| a.devices.first())
        else {
            return Err(Error::GroupSetupFailed(format!("no signed-in device of u{owner}")));
        };
        let name = format!("jepsen-{}-{i}", if kind == ConvKind::Super { "super" } else { "small" });
        let others: Vec<UserId> = members.iter().copied().filter(|u| *u != owner).map(UserId).collect();
        let mut value = GroupValue { kind, owner, members: members.clone(), name: name.clone(), group: None };
        loop {
            if Instant::now() >= deadline || rpcs.is_empty() {
                return Err(Error::GroupSetupFailed(format!(
                    "creating {name}: no node succeeded before the deadline"
                )));
            }
            let (node, rpc) = &rpcs[attempt as usize % rpcs.len()];
            let process = Process::Worker(SETUP_PROCESS_BASE + attempt);
            attempt += 1;
            let label = format!("n{node}");
            recorder.record(
                OpType::Invoke,
                process.clone(),
                OpBody::CreateGroup(value.clone()),
                Some(&label),
                None,
            );
            let group_kind = if kind == ConvKind::Super { GroupKind::Super } else { GroupKind::Small };
            let result =
                tokio::time::timeout(op_timeout, rpc.create_group(creds, group_kind, &name, &others))
                    .await
                    .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("create-group timed out")));
            match result {
                Ok(GroupId(id)) => {
                    value.group = Some(id);
                    recorder.record(OpType::Ok, process, OpBody::CreateGroup(value), Some(&label), None);
                    groups.push(Group { id, kind, owner, members });
                    break;
                }
                Err(status) => {
                    let text = format!("{}: {}", status.code(), status.message());
                    let unimplemented = status.code() == tonic::Code::Unimplemented;
                    let e = ClientError::from(status);
                    let outcome = if unimplemented || (2..=4).contains(&(e.code() as i32 / 1000)) {
                        OpType::Fail
                    } else {
                        OpType::Info
                    };
                    recorder.record(
                        outcome,
                        process,
                        OpBody::CreateGroup(value.clone()),
                        Some(&label),
                        Some(text.clone()),
                    );
                    if unimplemented {
                        return Err(Error::GroupsUnimplemented(text));
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
    }
    Ok(groups)
}

/// Reads every super group's complete list through every node (all pages,
/// from group seq 0, as the group's owner), as `final-read` ops with
/// `group` set, retrying a failed read until `deadline`.
pub async fn final_reads(
    recorder: &Recorder,
    groups: &[Group],
    accounts: &[Account],
    endpoints: &Endpoints,
    op_timeout: Duration,
    deadline: Instant,
    out: &mut FinalReads,
) {
    for (&node, addr) in &endpoints.nodes {
        let Ok(rpc) = GroupRpc::new(*addr, op_timeout) else { continue };
        let process = Process::Worker(FINAL_READ_PROCESS_BASE + node);
        let label = format!("n{node}");
        for g in groups.iter().filter(|g| g.kind == ConvKind::Super) {
            let Some(creds) =
                accounts.iter().find(|a| a.user == UserId(g.owner)).and_then(|a| a.devices.first())
            else {
                continue;
            };
            let mut done = false;
            while !done && Instant::now() < deadline {
                let value = FinalReadValue { user: g.owner, group: Some(g.id), ..FinalReadValue::default() };
                let invoke = OpBody::FinalRead(value.clone());
                recorder.record(OpType::Invoke, process.clone(), invoke, Some(&label), None);
                match read_all(&rpc, creds, GroupId(g.id), deadline).await {
                    Ok((entries, last_seq)) => {
                        let value =
                            FinalReadValue { entries: Some(entries), last_seq: Some(last_seq), ..value };
                        recorder.record(
                            OpType::Ok,
                            process.clone(),
                            OpBody::FinalRead(value),
                            Some(&label),
                            None,
                        );
                        done = true;
                    }
                    Err(e) => {
                        let body = OpBody::FinalRead(value);
                        recorder.record(
                            OpType::Fail,
                            process.clone(),
                            body,
                            Some(&label),
                            Some(e.to_string()),
                        );
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                }
            }
            if done {
                out.complete += 1;
            } else {
                out.missing_groups.push((g.id, node));
            }
        }
    }
}

/// Every page of a group's list: the entries and the last page's head.
async fn read_all(
    rpc: &GroupRpc,
    creds: &Credentials,
    group: GroupId,
    deadline: Instant,
) -> Result<(Vec<crate::history::Entry>, u64), ClientError> {
    let mut entries = Vec::new();
    let mut after = Seq::ZERO;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let page = bounded(left, rpc.sync_group(creds, group, after, FINAL_PAGE)).await?;
        let before = entries.len();
        for m in &page.messages {
            if Seq(m.seq) > after {
                after = Seq(m.seq);
                entries.push(entry(m));
            }
        }
        if !page.has_more || entries.len() == before {
            return Ok((entries, page.last_group_seq));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_spans_the_users_with_two_small_groups_and_one_super_group() {
        let p = plan(&[10, 20, 30, 40, 50, 60]);
        assert_eq!(p.len(), 3);
        assert_eq!(p[0], (ConvKind::Group, 10, vec![10, 20, 30]));
        assert_eq!(p[1], (ConvKind::Group, 60, vec![30, 40, 50, 60]));
        assert_eq!(p[2], (ConvKind::Super, 60, vec![10, 20, 30, 40, 50, 60]));
        assert_eq!(plan(&[1, 2]), vec![(ConvKind::Group, 1, vec![1, 2]), (ConvKind::Super, 2, vec![1, 2])]);
        assert!(plan(&[1]).is_empty());
    }
}
