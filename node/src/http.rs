//! `/metrics` (Prometheus text), `/healthz`, the server API
//! ([`crate::http_api`]) and `GET /events` (`webhooks::pull`) over HTTP.

use std::sync::{Arc, OnceLock};

use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::core::Core;

/// The process-wide Prometheus recorder (installed on first use).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Another recorder may be installed already (tests); then ours only
        // renders what it sees, which is nothing, and that is fine.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Serves the HTTP endpoints on `listener` until the task is dropped.
pub async fn serve(core: Arc<Core>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let handle = prometheus();
    let metrics_core = core.clone();
    // The API keys of the server API and of `GET /events`, read once. The
    // node validated its configuration before it got here.
    let creds = match crate::credentials::Credentials::from_config(&core.config) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::error!(error = %e, "the server API and GET /events are not served over HTTP");
            None
        }
    };
    let mut app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let core = metrics_core.clone();
                async move {
                    record_raft_gauges(&core);
                    handle.render()
                }
            }),
        )
        .route(
            "/healthz",
            get({
                let core = core.clone();
                move || async move { health(&core) }
            }),
        );
    if let Some(creds) = creds {
        app = app
            .merge(crate::webhooks::pull::router(core.clone(), creds.clone()))
            .merge(crate::http_api::router(core, creds));
    }
    axum::serve(listener, app).await
}

fn record_raft_gauges(core: &Core) {
    for g in core.all_groups() {
        let m = g.raft.metrics().borrow().clone();
        let shard = g.shard.0.to_string();
        metrics::gauge!("rim_raft_term", "group" => shard.clone()).set(m.current_term as f64);
        metrics::gauge!("rim_raft_is_leader", "group" => shard.clone())
            .set(if m.current_leader == Some(core.id()) { 1.0 } else { 0.0 });
        metrics::gauge!("rim_raft_last_log_index", "group" => shard.clone())
            .set(m.last_log_index.unwrap_or(0) as f64);
        metrics::gauge!("rim_raft_applied_index", "group" => shard)
            .set(m.last_applied.map(|l| l.index).unwrap_or(0) as f64);
    }
}

/// Healthy when every hosted group has a leader and every group this node
/// leads heard from a quorum within the election timeout (an isolated
/// leader in openraft 0.9 does not step down by itself).
fn health(core: &Core) -> (StatusCode, String) {
    let stale_after = core.config.election_max_ms;
    let leaderless: Vec<u32> = core
        .all_groups()
        .iter()
        .filter(|g| {
            let m = g.raft.metrics().borrow().clone();
            let isolated_leader = m.current_leader == Some(core.id())
                && m.membership_config.membership().voter_ids().count() > 1
                && m.millis_since_quorum_ack.is_none_or(|ms| ms > stale_after);
            m.current_leader.is_none() || isolated_leader
        })
        .map(|g| g.shard.0)
        .collect();
    if core.placement().is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "cluster map not known yet\n".into());
    }
    if leaderless.is_empty() && !core.all_groups().is_empty() {
        (StatusCode::OK, "ok\n".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("groups without a leader: {leaderless:?}\n"))
    }
}
