//! The internal `RaftService`: Raft RPCs between nodes, plus forwarded
//! proposals and read-index barriers.

// The early-return error is a ready tonic response, built once per call.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use futures::StreamExt;
use prost::Message as _;
use rim_proto::ErrorCode;
use rim_proto::ids::ShardId;
use rim_proto::store::{Proposal, ProposalResult, ReadQuery};
use rim_proto::v1::raft_service_server::RaftService;
use rim_proto::v1::{OnlinePush, RaftReply, RaftRequest, SnapshotChunk};
use tonic::{Request, Response, Status, Streaming};

use crate::core::Core;
use crate::error::Error;
use crate::group::Group;

/// Serves Raft traffic for every group hosted by this node.
#[derive(Debug, Clone)]
pub struct RaftSvc {
    /// Shared node state.
    pub core: Arc<Core>,
}

fn reply(payload: Vec<u8>) -> Response<RaftReply> {
    Response::new(RaftReply { payload: payload.into(), code: 0, message: String::new() })
}

fn refuse(code: ErrorCode, message: String) -> Response<RaftReply> {
    Response::new(RaftReply { payload: Default::default(), code: code as i32, message })
}

fn encode<T: serde::Serialize>(t: &T) -> Result<Vec<u8>, Status> {
    postcard::to_allocvec(t).map_err(|e| Status::internal(e.to_string()))
}

/// Serves a request's group here, or says why not.
type Routed = Result<Arc<Group>, Result<Response<RaftReply>, Status>>;

impl RaftSvc {
    /// The group a request is for, after checking the link it came over
    /// (tests cut links) and that it was meant for this node.
    fn route(&self, group_id: u32, target: u64, from: u64) -> Routed {
        if from != 0 && !self.core.peers.link_up(from) {
            return Err(Err(Status::unavailable("link cut")));
        }
        if target != 0 && target != self.core.id() {
            let msg = format!("this is node {}, not {target}", self.core.id());
            return Err(Ok(refuse(ErrorCode::ErrorBadRequest, msg)));
        }
        self.core.group(ShardId(group_id)).ok_or_else(|| {
            Ok(refuse(ErrorCode::ErrorUnavailable, format!("group {group_id} is not hosted here")))
        })
    }
}

/// `let g = route!(self, request)`: the group, or return the refusal.
macro_rules! route {
    ($svc:expr, $r:expr) => {
        match $svc.route($r.group_id, $r.target_node_id, $r.from_node_id) {
            Ok(g) => g,
            Err(refusal) => return refusal,
        }
    };
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, Status> {
    postcard::from_bytes(b).map_err(|e| Status::invalid_argument(format!("bad raft payload: {e}")))
}

#[tonic::async_trait]
impl RaftService for RaftSvc {
    async fn push(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let r = req.into_inner();
        let g = route!(self, r);
        let push =
            OnlinePush::decode(r.payload.as_ref()).map_err(|e| Status::invalid_argument(e.to_string()))?;
        match g.push_online(Arc::new(push)) {
            Ok(_) => Ok(reply(Vec::new())),
            Err(Error::NotLeader { leader, .. }) => {
                Ok(refuse(ErrorCode::ErrorNotLeader, leader.map(|l| l.to_string()).unwrap_or_default()))
            }
            Err(e) => Ok(refuse(e.code(), e.to_string())),
        }
    }

    async fn append(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let r = req.into_inner();
        let g = route!(self, r);
        let res = g.raft.append_entries(decode(&r.payload)?).await;
        Ok(reply(encode(&res)?))
    }

    async fn vote(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let r = req.into_inner();
        let g = route!(self, r);
        let res = g.raft.vote(decode(&r.payload)?).await;
        Ok(reply(encode(&res)?))
    }

    async fn snapshot(&self, req: Request<Streaming<SnapshotChunk>>) -> Result<Response<RaftReply>, Status> {
        let mut stream = req.into_inner();
        let mut last = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            let g = route!(self, chunk);
            last = Some(g.raft.install_snapshot(decode(&chunk.header)?).await);
        }
        let res = last.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        Ok(reply(encode(&res)?))
    }

    async fn propose(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let r = req.into_inner();
        let g = route!(self, r);
        let proposal =
            Proposal::decode(r.payload.as_ref()).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut results = Vec::with_capacity(proposal.ops.len());
        for op in proposal.ops {
            match g.propose(op, self.core.timeout).await {
                Ok(res) => results.push(res),
                Err(Error::NotLeader { leader, .. }) => {
                    let hint = leader.map(|l| l.to_string()).unwrap_or_default();
                    return Ok(refuse(ErrorCode::ErrorNotLeader, hint));
                }
                Err(e) => return Ok(refuse(e.code(), e.to_string())),
            }
        }
        Ok(reply(ProposalResult { results }.encode_to_vec()))
    }

    async fn read(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let r = req.into_inner();
        let g = route!(self, r);
        let q = ReadQuery::decode(r.payload.as_ref()).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let answer = match self.core.read_barrier(g.shard).await {
            Ok(g) => crate::read::execute(&g.reader, &q),
            Err(e) => Err(e),
        };
        match answer {
            Ok(a) => Ok(reply(a.encode_to_vec())),
            Err(e) => Ok(refuse(e.code(), e.to_string())),
        }
    }

    async fn read_index(&self, req: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let r = req.into_inner();
        let g = route!(self, r);
        match g.read_index(self.core.timeout).await {
            Ok(index) => Ok(reply(index.to_be_bytes().to_vec())),
            Err(Error::NotLeader { leader, .. }) => {
                Ok(refuse(ErrorCode::ErrorNotLeader, leader.map(|l| l.to_string()).unwrap_or_default()))
            }
            Err(e) => Ok(refuse(e.code(), e.to_string())),
        }
    }
}
