//! Client settings, credentials and the reconnect backoff.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rim_proto::codec::DEFAULT_MAX_FRAME;
use rim_proto::ids::{DeviceId, GroupId, Seq, UserId};

use crate::transport::Endpoint;

/// Who signs in: the `(user_id, device_id, token)` triple returned by the
/// `SignIn` gRPC call ([`NodeApi::sign_in`](crate::NodeApi::sign_in)). `Debug` hides the
/// token.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user.
    pub user_id: UserId,
    /// The device of the user.
    pub device_id: DeviceId,
    /// The device's token (for the long connection and gRPC metadata).
    pub token: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("token", &"<hidden>")
            .finish()
    }
}

/// Where a new client starts reading the user's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resume {
    /// From the device's ack cursor stored on the server
    /// (`SignInOutput.ack_seq`; [`Seq::ZERO`] for a new device).
    #[default]
    FromAck,
    /// After this seq: the application already has every entry up to it.
    After(Seq),
}

/// How a [`Client`](crate::Client) behaves. [`ClientConfig::new`] gives the
/// defaults; fields are public for tuning.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Gateways to connect to, tried in rotation (at least one).
    pub gateways: Vec<Endpoint>,
    /// TLS of `tls://` and `wss://` gateways: the CAs to trust (e.g. from
    /// `rim_cluster::tls::client_config`, or any rustls configuration); the
    /// name checked is each endpoint's host. Required by TLS endpoints
    /// (without it the client stops with
    /// [`Event::SignInRejected`](crate::Event::SignInRejected)); default
    /// `None`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Where the user's list is read from on the first sign-in.
    pub resume: Resume,
    /// Time to open a connection (TCP, TLS and WebSocket handshakes);
    /// default 5 s.
    pub connect_timeout: Duration,
    /// Time for one request's reply (sign-in, sync, ack, one send attempt);
    /// default 10 s.
    pub request_timeout: Duration,
    /// Overall deadline of [`Client::send`](crate::Client::send), retries
    /// included; default 30 s.
    pub send_deadline: Duration,
    /// Heartbeat interval used if the server announces none; default 30 s.
    /// The server's `heartbeat_interval_ms` takes precedence.
    pub heartbeat_interval: Duration,
    /// Intervals without any server packet after which the connection is
    /// considered dead; default 3.
    pub max_missed_heartbeats: u32,
    /// Acknowledge delivered seqs automatically; default `true`.
    pub auto_ack: bool,
    /// How often delivered seqs are acknowledged (at most one ACK in
    /// flight); default 1 s.
    pub ack_interval: Duration,
    /// `limit` of each SYNC page; default 200.
    pub sync_page: u32,
    /// Pushes held back while syncing; default 1024.
    pub push_buffer: usize,
    /// Delay before retrying a failed sync; default 500 ms.
    pub sync_retry_delay: Duration,
    /// Failed syncs in a row before the connection is dropped and another
    /// gateway tried; default 5.
    pub max_sync_failures: u32,
    /// Capacity of the event channel to the application, and of the queue
    /// in front of it; default 1024. When both are full, list entries are
    /// left for a later sync and other pushes are dropped.
    pub event_queue: usize,
    /// Packets queued for the writer task; default 256.
    pub write_queue: usize,
    /// Requests queued from [`Client`](crate::Client) handles to the
    /// connection task; default 256.
    pub command_queue: usize,
    /// Largest packet accepted or sent; default 1 MiB.
    pub max_frame: usize,
    /// Reconnect backoff.
    pub backoff: Backoff,
    /// The last group seq the application has of each super group (from an
    /// earlier run, see [`Client::group_cursors`](crate::Client::group_cursors));
    /// a super group without an entry is read from the member's join
    /// point. Default empty.
    pub group_cursors: HashMap<GroupId, Seq>,
}

impl ClientConfig {
    /// Defaults, connecting to `gateways`.
    pub fn new(gateways: Vec<Endpoint>) -> ClientConfig {
        ClientConfig {
            gateways,
            tls: None,
            resume: Resume::FromAck,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            send_deadline: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(30),
            max_missed_heartbeats: 3,
            auto_ack: true,
            ack_interval: Duration::from_secs(1),
            sync_page: 200,
            push_buffer: 1024,
            sync_retry_delay: Duration::from_millis(500),
            max_sync_failures: 5,
            event_queue: 1024,
            write_queue: 256,
            command_queue: 256,
            max_frame: DEFAULT_MAX_FRAME,
            backoff: Backoff::default(),
            group_cursors: HashMap::new(),
        }
    }
}

/// Exponential backoff with jitter, capped: attempt `n` (from 0) waits a
/// random duration in `[d/2, d]` where `d = min(max, initial × 2ⁿ)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay (before jitter); default 100 ms.
    pub initial: Duration,
    /// The cap; default 5 s.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(5) }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0 = first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX);
        let full = self.initial.saturating_mul(factor).min(self.max);
        let half = full / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(rand::random::<u64>() % jitter_ms.saturating_add(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(2) };
        for attempt in 0..40 {
            let full = (Duration::from_millis(100) * 2u32.saturating_pow(attempt.min(10))).min(b.max);
            let d = b.delay(attempt);
            assert!(
                d >= full / 2 && d <= full,
                "attempt {attempt}: {d:?} not within [{:?}, {full:?}]",
                full / 2
            );
        }
        let samples: std::collections::HashSet<_> = (0..50).map(|_| b.delay(5)).collect();
        assert!(samples.len() > 1, "no jitter");
    }

    #[test]
    fn credentials_debug_hides_the_token() {
        let c = Credentials { user_id: UserId(1), device_id: DeviceId(2), token: "secret".into() };
        assert!(!format!("{c:?}").contains("secret"));
    }
}
