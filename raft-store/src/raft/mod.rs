//! The openraft adapter: everything that names an openraft type lives in
//! this folder, so a move to openraft 0.10 touches nothing else.
//!
//! * [`TypeConfig`]: the Raft type configuration shared by every group.
//! * [`LogStore`]: `RaftLogStorage` on the shared RocksDB (`log` + `raft` CFs).
//! * [`StateMachine`]: `RaftStateMachine` running the IM apply logic on the
//!   `sm` CF, with snapshots streamed through files.
//!
//! Log entries are openraft serde types encoded with postcard; the
//! application payload inside an entry ([`Request`]) is our prost
//! [`Proposal`], carried as bytes, so the command format evolves the protobuf
//! way (fields added, never renumbered).

// openraft's StorageError is large (224 bytes) and its trait signatures
// impose it; boxing it in our helpers would only add conversions.
#![allow(clippy::result_large_err)]

mod log_store;
mod snapshot;
mod state_machine;

use prost::Message as _;
use rim_proto::store::{Proposal, ProposalResult};
use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};

pub use log_store::LogStore;
pub use state_machine::{AppliedEvent, SnapshotBuilder, StateMachine};

openraft::declare_raft_types!(
    /// Raft types of every rim group (the meta group and data shards).
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A log entry of [`TypeConfig`].
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id.
pub type LogId = openraft::LogId<u64>;
/// The storage error openraft expects.
pub type StorageError = openraft::StorageError<u64>;

/// The application payload of a log entry: a batch of IM operations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Request(pub Proposal);

/// The result of applying a [`Request`]: one result per operation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Response(pub ProposalResult);

macro_rules! prost_serde {
    ($ty:ident, $inner:ty) => {
        impl serde::Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(&self.0.encode_to_vec())
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("protobuf bytes")
                    }
                    fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<$ty, E> {
                        <$inner>::decode(b).map($ty).map_err(E::custom)
                    }
                    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<$ty, A::Error> {
                        let mut b = Vec::new();
                        while let Some(x) = seq.next_element::<u8>()? {
                            b.push(x);
                        }
                        self.visit_bytes(&b)
                    }
                }
                d.deserialize_bytes(V)
            }
        }
    };
}
prost_serde!(Request, Proposal);
prost_serde!(Response, ProposalResult);

/// Turns a crate error into the storage error openraft expects.
fn sm_err(e: crate::Error) -> StorageError {
    openraft::StorageIOError::write_state_machine(&e).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rim_proto::store::{Op, SendToUser, op};

    #[test]
    fn request_round_trips_through_postcard() {
        let send = SendToUser {
            sender_user_id: 1,
            recipient_user_id: 2,
            client_msg_id: "c1".into(),
            ..Default::default()
        };
        let req = Request(Proposal { now_ms: 42, ops: vec![Op { op: Some(op::Op::SendToUser(send)) }] });
        let bytes = postcard::to_allocvec(&req).unwrap();
        let back: Request = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, req);
    }
}
