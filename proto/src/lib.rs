//! rim's wire protocol.
//!
//! This crate owns every protobuf definition of the system and the Rust code
//! generated from them:
//!
//! * [`v1`]: the message envelope, error codes, the client long-connection
//!   packets and the client-, gateway- and node-facing gRPC services;
//! * [`store`]: records and Raft commands of the IM state machine, as written
//!   to disk by `rim-raft-store`;
//! * [`codec`]: the TCP framing of [`v1::Packet`]s (varint length prefix, a
//!   maximum frame size, incremental decoding);
//! * [`error`]: error classes and the mapping of [`ErrorCode`] to gRPC
//!   statuses and replies;
//! * [`ids`]: the domain identifiers every crate speaks ([`UserId`],
//!   [`Seq`], [`ShardId`], ...) and their invariants;
//! * [`metadata`]: the gRPC metadata keys (caller identity, cluster secret,
//!   error code, leader hint) and the constant-time secret check.
//!
//! `docs/protocol.md` describes the client protocol in prose: framing, command
//! table, session rules and the error-code table.
//!
//! Compatibility rule for every `.proto` file here: fields, messages, enum
//! values and methods are only ever added; a removed field's number is
//! reserved. Old peers and old data therefore always decode.

pub mod codec;
pub mod error;
pub mod ids;
pub mod metadata;

/// Generated code, nested the way prost expects (`rim::store::v1` refers to
/// `rim::v1` as `super::super::v1`); re-exported below under short names.
mod generated {
    #![allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]

    pub mod rim {
        pub mod v1 {
            tonic::include_proto!("rim.v1");
        }
        pub mod store {
            pub mod v1 {
                tonic::include_proto!("rim.store.v1");
            }
        }
        pub mod server {
            pub mod v1 {
                tonic::include_proto!("rim.server.v1");
            }
        }
    }

    pub mod business {
        tonic::include_proto!("business");
    }
}

/// Client-visible protocol (package `rim.v1`): messages, errors, packets and
/// the gRPC services (client-facing, gateway-facing, push, Raft and admin).
pub use generated::rim::v1;

/// Stored records and Raft commands of the IM state machine (package
/// `rim.store.v1`).
pub use generated::rim::store::v1 as store;

/// gim's integration contract (package `business`): the
/// `UserIntService.Auth` an app implements, which a node with
/// `[auth_callback]` calls to check the app's tokens.
pub use generated::business as gim_business;

/// The server API of an app's backend (package `rim.server.v1`): gRPC, and
/// the same messages as JSON over HTTP (docs/server-api.md).
pub use generated::rim::server::v1 as server_api;

/// `bytes` fields of the server API in JSON: standard base64 strings.
mod json_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(b: &bytes::Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(b))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bytes::Bytes, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text.as_bytes()).map(Into::into).map_err(serde::de::Error::custom)
    }
}

pub use codec::{CodecError, FrameDecoder, PacketCodec};
pub use ids::{DeviceId, GroupId, MessageId, NodeId, Seq, ShardId, UserId};
pub use v1::ErrorCode;
