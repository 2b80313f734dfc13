//! Limits and timers of a session.

use std::time::Duration;

use rim_proto::codec::DEFAULT_MAX_FRAME;

/// Limits and timers of a session. [`Default`] gives the documented
/// defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// Time from connecting to a completed sign-in (default 10 s).
    pub sign_in_timeout: Duration,
    /// Heartbeat interval the client is told to use (default 30 s).
    pub heartbeat_interval: Duration,
    /// Intervals without any client packet before the session closes
    /// (default 3).
    pub max_missed_heartbeats: u32,
    /// Largest packet body the session sends (default 1 MiB, the framing
    /// maximum).
    pub max_frame: usize,
    /// Most bytes queued for the client and not yet written (TCP frame
    /// lengths); beyond it the session closes (default 4 MiB).
    pub send_queue_limit: usize,
    /// Most client requests waiting for a node at once; more get
    /// `ERROR_BUSY` (default 64).
    pub max_inflight_requests: usize,
    /// Most packets held while the sign-in call is in flight; more get
    /// `ERROR_BUSY` (default 16).
    pub max_pending_before_sign_in: usize,
    /// Most packets a connection may send before its sign-in completed
    /// (the `SIGN_IN`, heartbeats, commands held or refused meanwhile); the
    /// next one closes it with `ERROR_NOT_SIGNED_IN` (default 64). With
    /// the transports' smaller frame limit before sign-in
    /// ([`MAX_FRAME_BEFORE_SIGN_IN`](crate::session::MAX_FRAME_BEFORE_SIGN_IN))
    /// it bounds what a connection that never signs in can make the
    /// gateway do.
    pub max_packets_before_sign_in: usize,
    /// Most pushes held back while syncing a gap; on overflow they are
    /// dropped and the session syncs again (default 1024).
    pub push_buffer_limit: usize,
    /// Most pushes held back per subscribed room or super group while its
    /// gap is repaired; on overflow they are dropped and it syncs again
    /// (default 64). A connection has up to
    /// [`MAX_ROOMS_PER_CONNECTION`](crate::session::MAX_ROOMS_PER_CONNECTION)
    /// such lists.
    pub group_push_buffer_limit: usize,
    /// `limit` of the session's own gap-repair syncs (default 200).
    pub resync_batch: u32,
    /// Delay before retrying a failed gap-repair sync (default 1 s).
    pub resync_retry_delay: Duration,
    /// Consecutive failed gap-repair syncs before the session gives up and
    /// closes with `ERROR_UNAVAILABLE`, so the client reconnects (and syncs)
    /// elsewhere (default 5).
    pub max_resync_failures: u32,
    /// Close the connection after answering a command sent before
    /// `SIGN_IN` with `ERROR_NOT_SIGNED_IN`. `docs/protocol.md` keeps it
    /// open (default `false`); the sign-in deadline still applies.
    pub close_before_sign_in: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            sign_in_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(30),
            max_missed_heartbeats: 3,
            max_frame: DEFAULT_MAX_FRAME,
            send_queue_limit: 4 * DEFAULT_MAX_FRAME,
            max_inflight_requests: 64,
            max_pending_before_sign_in: 16,
            max_packets_before_sign_in: 64,
            push_buffer_limit: 1024,
            group_push_buffer_limit: 64,
            resync_batch: 200,
            resync_retry_delay: Duration::from_secs(1),
            max_resync_failures: 5,
            close_before_sign_in: false,
        }
    }
}

impl SessionConfig {
    /// How long a connection may stay silent: `max_missed_heartbeats` ×
    /// `heartbeat_interval`.
    pub fn idle_timeout(&self) -> Duration {
        self.heartbeat_interval.saturating_mul(self.max_missed_heartbeats.max(1))
    }
}

/// The client protocol a listener speaks (`protocol = "rim" | "gim"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// rim's own (`docs/protocol.md`).
    #[default]
    Rim,
    /// gim's `connect` protocol, translated at the edge (the `gim` module;
    /// `docs/protocol.md`, "gim clients").
    Gim,
}

impl Protocol {
    /// The name used in flags and configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Rim => "rim",
            Protocol::Gim => "gim",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Protocol {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Protocol> {
        match s {
            "rim" => Ok(Protocol::Rim),
            "gim" => Ok(Protocol::Gim),
            other => Err(crate::Error::Config(format!("unknown protocol {other:?}: use \"rim\" or \"gim\""))),
        }
    }
}
