//! Notices to the nodes that need no answer (`Offline`).
//!
//! A connection that ends tells the nodes with an `Offline` call, naming
//! its session: the node then reports the device offline after the grace
//! (`device.offline`, docs/integration.md). No message depends on it, so
//! these calls run beside the connections with bounded cost: at most
//! [`MAX_IN_FLIGHT`] run at once per gateway, up to [`MAX_QUEUED`] more wait
//! their turn (a mass disconnect, a load test ending), and a notice beyond
//! that is dropped and counted. A dropped notice leaves its device online
//! until its next sign-in, or until this gateway process ends (the nodes
//! then take every session of the process offline: rim-node `sessions`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::call::Call;
use crate::upstream::Upstream;

/// Notices in flight at once, per gateway.
pub const MAX_IN_FLIGHT: usize = 32;
/// Notices waiting for one of the [`MAX_IN_FLIGHT`] slots, per gateway.
pub const MAX_QUEUED: usize = 16_384;

/// Sends notices with bounded concurrency and a bounded queue. Cheap to
/// clone.
#[derive(Debug, Clone, Default)]
pub struct Notices {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    running: usize,
    queued: VecDeque<Call>,
}

/// Notices dropped in this process (all gateways), for `/metrics`.
static DROPPED: AtomicU64 = AtomicU64::new(0);

impl Notices {
    /// Runs `call` on `runtime` now if fewer than [`MAX_IN_FLIGHT`] notices
    /// are running, else queues it if fewer than [`MAX_QUEUED`] wait, else
    /// drops it. Returns whether it was kept.
    pub fn send(&self, runtime: &tokio::runtime::Handle, upstream: &Upstream, call: Call) -> bool {
        {
            let mut st = self.state.lock().expect("notices lock");
            if st.running >= MAX_IN_FLIGHT {
                if st.queued.len() >= MAX_QUEUED {
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                st.queued.push_back(call);
                return true;
            }
            st.running += 1;
        }
        let (upstream, state) = (upstream.clone(), self.state.clone());
        // One worker: this call, then queued ones until none wait.
        runtime.spawn(async move {
            let mut call = call;
            loop {
                if let Err(e) = upstream.call(&call).await {
                    tracing::debug!(error = %e, "notice failed");
                }
                let mut st = state.lock().expect("notices lock");
                match st.queued.pop_front() {
                    Some(next) => call = next,
                    None => {
                        st.running -= 1;
                        return;
                    }
                }
            }
        });
        true
    }

    /// Notices (running, waiting) now.
    #[cfg(test)]
    fn load(&self) -> (usize, usize) {
        let st = self.state.lock().expect("notices lock");
        (st.running, st.queued.len())
    }
}

/// Notices dropped in this process because too many were waiting.
pub fn dropped_total() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::call::{CallId, NodeCall};
    use crate::upstream::UpstreamOptions;

    /// The `Offline` notice of connection `i`.
    fn offline(i: u64) -> Call {
        Call {
            id: CallId(i),
            conn_id: i,
            user_id: rim_proto::ids::UserId(1),
            device_id: rim_proto::ids::DeviceId(i),
            token_version: None,
            request: NodeCall::Offline { reason: rim_proto::ErrorCode::Ok, session_epoch: 1 },
        }
    }

    /// A node that accepts connections and never answers: every notice
    /// hangs until its deadline, so the bound is what decides.
    #[tokio::test]
    async fn notices_beyond_the_bounds_are_dropped() {
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
        let before = dropped_total();
        let bound = (MAX_IN_FLIGHT + MAX_QUEUED) as u64;
        let kept = (0..bound + 10).filter(|i| notices.send(&runtime, &upstream, offline(*i))).count();
        assert_eq!(kept as u64, bound, "the running and the waiting are kept");
        assert_eq!(notices.load(), (MAX_IN_FLIGHT, MAX_QUEUED));
        assert!(dropped_total() >= before + 10, "the rest is dropped and counted");
    }

    /// A node nobody answers at: each notice fails at its deadline, and
    /// the workers go on with the waiting ones until none is left.
    #[tokio::test]
    async fn waiting_notices_are_all_sent() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        let mut options = UpstreamOptions::new(vec![addr], "0123456789abcdef", "gw-test");
        options.request_timeout = Duration::from_millis(100);
        let upstream = Upstream::new(options).unwrap();
        let notices = Notices::default();
        let runtime = tokio::runtime::Handle::current();
        for i in 0..MAX_IN_FLIGHT as u64 * 3 {
            assert!(notices.send(&runtime, &upstream, offline(i)));
        }
        assert_eq!(notices.load(), (MAX_IN_FLIGHT, MAX_IN_FLIGHT * 2));
        let deadline = std::time::Instant::now() + rim_testkit::wait::WAIT;
        while notices.load() != (0, 0) {
            assert!(std::time::Instant::now() < deadline, "still {:?}", notices.load());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
