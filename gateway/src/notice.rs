//! Best-effort notices to the nodes that need no answer (`Offline`).
//!
//! A connection that ends tells the nodes with an `Offline` call, naming
//! its session: the node then reports the device offline after the grace
//! (`device.offline`, docs/integration.md). No message depends on it, and a
//! lost call only leaves a device *online* until its next sign-in, so these
//! calls are bounded instead of queued: at most
//! [`MAX_IN_FLIGHT`] run at once per gateway, and a notice beyond that is
//! dropped and counted. A mass disconnect (a network blip, a load test
//! ending) therefore costs a few dozen concurrent calls, not one call,
//! task and set of buffers per closed connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Semaphore;

use crate::call::Call;
use crate::upstream::Upstream;

/// Notices in flight at once, per gateway.
pub const MAX_IN_FLIGHT: usize = 32;

/// Sends best-effort notices with bounded concurrency. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Notices {
    permits: Arc<Semaphore>,
}

/// Notices dropped in this process (all gateways), for `/metrics`.
static DROPPED: AtomicU64 = AtomicU64::new(0);

impl Default for Notices {
    fn default() -> Self {
        Notices { permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)) }
    }
}

impl Notices {
    /// Runs `call` on `runtime` if fewer than [`MAX_IN_FLIGHT`] notices are
    /// running, else drops it. Returns whether it was sent.
    pub fn send(&self, runtime: &tokio::runtime::Handle, upstream: &Upstream, call: Call) -> bool {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        let upstream = upstream.clone();
        runtime.spawn(async move {
            if let Err(e) = upstream.call(&call).await {
                tracing::debug!(error = %e, "notice failed");
            }
            drop(permit);
        });
        true
    }

    /// Notices in flight now.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        MAX_IN_FLIGHT - self.permits.available_permits()
    }
}

/// Notices dropped in this process because too many were in flight.
pub fn dropped_total() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::call::{CallId, NodeCall};
    use crate::upstream::UpstreamOptions;

    /// A node that accepts connections and never answers: every notice
    /// hangs until its deadline, so the bound is what decides.
    #[tokio::test]
    async fn notices_beyond_the_bound_are_dropped_not_queued() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                held.push(socket);
            }
        });
        let mut options = UpstreamOptions::new(vec![addr], "0123456789abcdef", "gw-test");
        options.request_timeout = Duration::from_secs(30);
        let upstream = Upstream::new(options).unwrap();
        let notices = Notices::default();
        let runtime = tokio::runtime::Handle::current();
        let offline = |i: u64| Call {
            id: CallId(i),
            conn_id: i,
            user_id: rim_proto::ids::UserId(1),
            device_id: rim_proto::ids::DeviceId(i),
            token_version: None,
            request: NodeCall::Offline { reason: rim_proto::ErrorCode::Ok, session_epoch: 1 },
        };
        let before = dropped_total();
        let sent =
            (0..MAX_IN_FLIGHT as u64 + 10).filter(|i| notices.send(&runtime, &upstream, offline(*i))).count();
        assert_eq!(sent, MAX_IN_FLIGHT, "only the bound is in flight");
        assert_eq!(notices.in_flight(), MAX_IN_FLIGHT);
        assert!(dropped_total() >= before + 10, "the rest is dropped and counted");
    }
}
