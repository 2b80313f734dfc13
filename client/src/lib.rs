//! rim's Rust client SDK (tokio).
//!
//! ```no_run
//! # async fn demo() -> Result<(), rim_client::ClientError> {
//! use rim_client::{Client, ClientConfig, Endpoint, Event, NodeApi};
//! use rim_proto::ids::UserId;
//! use rim_proto::v1::ContentType;
//!
//! // Accounts and tokens come from a node's gRPC listener.
//! let api = NodeApi::new("127.0.0.1:7100")?;
//! api.register("alice", "correct horse").await?;
//! let me = api.sign_in("alice", "correct horse", None).await?; // new device
//!
//! // The long connection goes to any gateway, TCP or WebSocket.
//! let gateways = vec![Endpoint::tcp("127.0.0.1:7200"), "ws://127.0.0.1:7201/ws".parse()?];
//! let (client, mut events) = Client::connect(ClientConfig::new(gateways), me);
//! client.send(UserId(10002), ContentType::Text, "hello").await?;
//! while let Some(event) = events.recv().await {
//!     match event {
//!         Event::Message(m) => println!("#{} from {}", m.seq, m.sender_user_id),
//!         Event::Kicked { .. } => break,
//!         _ => {}
//!     }
//! }
//! client.close().await;
//! # Ok(()) }
//! ```
//!
//! # Design
//!
//! * **Transports** ([`transport`]): a TCP link carries varint-length
//!   prefixed `Packet` frames ([`rim_proto::codec`]); a WebSocket link
//!   (`ws://host:port/ws`) one `Packet` per binary message. Either may run
//!   inside TLS (`tls://host:port`, `wss://host:port/ws`), verified against
//!   the CAs of [`ClientConfig::tls`] for the endpoint's host. All are one
//!   reader/writer pair; nothing above them knows which one is in use.
//! * **The connection task** (one per [`Client`]) owns the link, the
//!   timeline and the event queue. [`Client`] handles (cheap clones) talk
//!   to it through a bounded channel; replies are matched by `request_id`
//!   and every request has a deadline. It signs in (`SIGN_IN` first),
//!   heartbeats at the interval the server announces, treats three silent
//!   intervals as a dead link, and acknowledges delivered seqs (`ACK`,
//!   batched every [`ClientConfig::ack_interval`], and once more on
//!   [`Client::close`]).
//! * **The timeline** ([`timeline::Timeline`], sans-IO): merges pushes and
//!   syncs of the user's list. After every sign-in it syncs from the last
//!   delivered seq, paging while `has_more`; pushes that arrive meanwhile
//!   are held (bounded). A push at or below the last delivered seq is a
//!   duplicate; one beyond `last + 1` is a gap and triggers a sync (gim
//!   issue #46).
//! * **Super groups and rooms** ([`groups`]): after every sign-in the
//!   client subscribes each super group of its user (`SUBSCRIBE_ROOM` after
//!   its cursor), follows membership notifications (joining, leaving,
//!   conversions), and repairs gaps of each group's list with
//!   `SYNC_GROUP`, so [`Event::GroupMessage`]s are gap-free per group.
//!   Rooms are read on demand ([`Client::subscribe_room`]) and subscribed
//!   again after every reconnect. Online-only pushes come as
//!   [`Event::Ephemeral`].
//! * **Sends** ([`Client::send`]) get a random `client_msg_id` and are
//!   retried with that same id on timeouts, lost connections and retryable
//!   codes (1xxx) until [`ClientConfig::send_deadline`]; the server stores
//!   an id once, so a retry never duplicates. Other errors return at once.
//! * **Reconnects** rotate through [`ClientConfig::gateways`] with
//!   exponential, jittered, capped backoff ([`Backoff`]), then sign in and
//!   sync again. A `KICK` of the auth class (another sign-in of the same
//!   device, a logout) stops the client instead ([`Event::Kicked`]):
//!   reconnecting would kick the other session in turn. A `KICK` saying the
//!   gateway shuts down (`ERROR_UNAVAILABLE`) or the client was too slow
//!   (`ERROR_BUSY`) reconnects. A sign-in refused with a bad-request, auth
//!   or conflict code stops ([`Event::SignInRejected`]).
//! * **gRPC** ([`NodeApi`]): register, sign in (password or phone code),
//!   devices, profiles, history pages, over a node's public listener.
//! * **Ids**: the SDK speaks [`rim_proto::ids`]: users, devices, groups,
//!   messages and seqs are [`UserId`](rim_proto::ids::UserId),
//!   [`DeviceId`](rim_proto::ids::DeviceId), [`GroupId`](rim_proto::ids::GroupId),
//!   [`MessageId`](rim_proto::ids::MessageId) and [`Seq`](rim_proto::ids::Seq)
//!   in every signature, [`Credentials`] and [`Event`]. The protobuf structs
//!   (`rim_proto::v1`, e.g. the [`Message`](rim_proto::v1::Message) of an
//!   event, or the `*_input` escape hatches) keep the wire's integers; the
//!   SDK converts where it builds a request or reads a reply. A 1:1 or group
//!   conversation id ([`Client::recall`], [`Client::mark_read`]) stays a
//!   `u64` whose meaning the `ConversationKind` next to it gives.
//!
//! # Invariants
//!
//! * [`Event::Message`]s carry the user's list in seq order, each seq
//!   exactly once and without gaps, from the start cursor
//!   ([`Resume`]: the device's server-side ack cursor by default) on, across
//!   any number of reconnects of one [`Client`].
//! * Only seqs handed to the event channel are acknowledged, so a new
//!   client of the same device resuming from the ack cursor misses nothing.
//! * Every wait has a timeout and every queue a bound. The connection is
//!   always read, so replies get through even if the application does not
//!   read its events; when it falls behind, list entries are left to a later
//!   sync (nothing is lost), and group and online-only pushes are dropped.
//! * [`Event::GroupMessage`]s carry each super group's list in group-seq
//!   order, each group seq exactly once, without gaps, from the group's
//!   cursor on (see [`groups`]).
//! * One error type, [`ClientError`], whose [`code`](ClientError::code) is
//!   the stable numeric [`ErrorCode`](rim_proto::ErrorCode) of
//!   `docs/protocol.md`.

pub mod api;
mod client;
pub mod config;
mod driver;
pub mod error;
pub mod event;
pub mod groups;
mod link;
pub mod timeline;
pub mod transport;

pub use api::NodeApi;
pub use client::{Client, new_client_msg_id};
pub use config::{Backoff, ClientConfig, Credentials, Resume};
pub use error::{ClientError, Result};
pub use event::{Event, LinkState};
pub use transport::Endpoint;
