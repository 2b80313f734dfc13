//! Webhooks and `GET /events`: how events leave the cluster (issue 15 §3).
//!
//! Events are produced at apply (`rim-raft-store` `im::events`): each sits
//! in its shard's state at its log position with the exact JSON body every
//! delivery carries. This module moves them out:
//!
//! * **Push** ([`deliver`]): on each node, for every data shard it leads and
//!   every configured endpoint, one task POSTs the shard's events, signed
//!   per Standard Webhooks ([`sign`]), with up to the endpoint's
//!   `max_in_flight` requests at once but never two of one conversation,
//!   and a conversation's events in log order ([`window`]). Once every
//!   event up to a position got its 2xx, the endpoint's cursor advances in
//!   memory and is committed through Raft (`AdvanceEventCursor`) after a
//!   few events or ~100 ms, so a new leader resumes from the committed
//!   cursor: delivery is at-least-once (events finished past the committed
//!   cursor, at most a window, are sent again), and a repeat carries the
//!   same `webhook-id` and body bytes.
//!   Failures are retried with exponential backoff and jitter (capped at
//!   [`deliver::MAX_BACKOFF`]) while the event is younger than the
//!   retention (`event_retention_ms`, a replicated limit); then it becomes a
//!   dead letter (`DeadLetterEvent`) and the cursor passes it (once every
//!   event before it finished).
//! * **Trimming** ([`deliver::trim`]): each shard's leader removes events
//!   older than the retention that every configured endpoint has passed,
//!   and dead letters older than the retention (`TrimEvents`).
//! * **Dead letters** ([`replay`]): listed and replayed through the server
//!   API (`ListDeadLetters`, `ReplayDeadLetters`).
//! * **Pull** ([`pull`]): `GET /events?after=CURSOR&limit=N` on the HTTP
//!   listener, for API keys with the `events` scope.
//!
//! Endpoints are node configuration (`[[webhooks]]`): every node must list
//! the same ones, since whichever node leads a shard delivers its events
//! and trims by the endpoints it knows.
//!
//! Invariants: an event leaves its shard's state only after every endpoint
//! this node knows has passed it (delivered or dead-lettered) and it is
//! older than the retention; a cursor is committed only for events that
//! got a 2xx or were dead-lettered, and every event before them too; at most
//! `max_in_flight` requests per (shard, endpoint) are in flight, at most one
//! per conversation, each with a timeout.

pub mod deliver;
pub mod pull;
pub mod replay;
pub mod sign;
pub mod window;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::core::{Core, META};
use crate::error::{Error, Result};

/// Most endpoints a node may configure.
pub const MAX_ENDPOINTS: usize = 16;
/// Longest delivery timeout.
const MAX_TIMEOUT_MS: u64 = 60_000;

/// One webhook endpoint (`[[webhooks]]` in the node's TOML).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Unique name (1..=64 bytes): the key of its delivery cursor.
    pub name: String,
    /// Where events are POSTed (`http://` or `https://`).
    pub url: String,
    /// One or two `whsec_...` secrets: the first signs, and both appear in
    /// `webhook-signature` (rotation).
    pub secrets: Vec<String>,
    /// Event types delivered (empty: all).
    #[serde(default)]
    pub types: Vec<String>,
    /// Timeout of one request, in ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// A PEM bundle of the CA(s) the endpoint's certificate chains to
    /// (none: the system's roots).
    #[serde(default)]
    pub ca: Option<std::path::PathBuf>,
    /// Most requests in flight per shard (1..=64; 1: strictly sequential in
    /// log order). Never two of one conversation.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// Requests in flight per (shard, endpoint) unless configured.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 8;

fn default_max_in_flight() -> usize {
    DEFAULT_MAX_IN_FLIGHT
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("secrets", &self.secrets.len())
            .field("types", &self.types)
            .field("timeout_ms", &self.timeout_ms)
            .field("ca", &self.ca)
            .field("max_in_flight", &self.max_in_flight)
            .finish()
    }
}

/// A configured endpoint, ready to deliver to.
pub struct Endpoint {
    /// Its configuration.
    pub config: WebhookConfig,
    /// Secret bytes, signing first.
    secrets: Vec<Vec<u8>>,
    client: reqwest::Client,
}

impl Endpoint {
    /// Whether events of `kind` go to this endpoint.
    pub fn wants(&self, kind: &str) -> bool {
        self.config.types.is_empty() || self.config.types.iter().any(|t| t == kind)
    }
}

/// Checks `[[webhooks]]` and builds the endpoints.
pub fn endpoints(configs: &[WebhookConfig]) -> Result<Vec<Arc<Endpoint>>> {
    let bad = |m: String| Err(Error::Config(format!("webhooks: {m}")));
    if configs.len() > MAX_ENDPOINTS {
        return bad(format!("at most {MAX_ENDPOINTS} endpoints"));
    }
    let mut out: Vec<Arc<Endpoint>> = Vec::new();
    for c in configs {
        if c.name.is_empty() || c.name.len() > rim_raft_store::im::MAX_ENDPOINT_NAME {
            return bad(format!("name {:?} must be 1..=64 bytes", c.name));
        }
        if out.iter().any(|e| e.config.name == c.name) {
            return bad(format!("name {:?} is used twice", c.name));
        }
        let url = reqwest::Url::parse(&c.url)
            .map_err(|e| Error::Config(format!("webhooks {}: url: {e}", c.name)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return bad(format!("{}: url must be http:// or https://", c.name));
        }
        if !(1..=2).contains(&c.secrets.len()) {
            return bad(format!("{}: one or two secrets (two while rotating)", c.name));
        }
        let secrets = c
            .secrets
            .iter()
            .map(|s| sign::decode_secret(s))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| Error::Config(format!("webhooks {}: {e}", c.name)))?;
        if !(1..=MAX_TIMEOUT_MS).contains(&c.timeout_ms) {
            return bad(format!("{}: timeout_ms must be 1..={MAX_TIMEOUT_MS}", c.name));
        }
        if !(1..=window::MAX_IN_FLIGHT).contains(&c.max_in_flight) {
            let most = window::MAX_IN_FLIGHT;
            return bad(format!("{}: max_in_flight must be 1..={most}", c.name));
        }
        let client = crate::http_client::client(
            &format!("webhooks {}", c.name),
            Duration::from_millis(c.timeout_ms),
            c.ca.as_deref(),
        )?;
        out.push(Arc::new(Endpoint { config: c.clone(), secrets, client }));
    }
    Ok(out)
}

/// Starts the delivery tasks of group `g` (one per endpoint) and its
/// trimming task. Nothing for the meta group.
pub fn spawn(core: &Arc<Core>, g: &Arc<crate::group::Group>) -> Vec<tokio::task::JoinHandle<()>> {
    if g.shard == META {
        return Vec::new();
    }
    let endpoints = match endpoints(&core.config.webhooks) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "webhooks not started");
            return Vec::new();
        }
    };
    let mut tasks: Vec<_> =
        endpoints.iter().map(|e| tokio::spawn(deliver::run(core.clone(), g.clone(), e.clone()))).collect();
    tasks.push(tokio::spawn(deliver::trim(core.clone(), g.clone(), endpoints)));
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Result<Vec<Arc<Endpoint>>> {
        let text = format!(
            "[[webhooks]]\nname = \"crm\"\nurl = \"https://example.invalid/hook\"\n\
             secrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\n{extra}"
        );
        endpoints(&crate::config::NodeConfig::from_toml(&text)?.webhooks)
    }

    #[test]
    fn webhooks_parse_from_toml_and_bad_ones_are_refused() {
        let e = parse("types = [\"message.created\"]").unwrap();
        assert_eq!(e[0].config.timeout_ms, 10_000, "default timeout");
        assert_eq!(e[0].config.max_in_flight, DEFAULT_MAX_IN_FLIGHT);
        assert!(e[0].wants("message.created"));
        assert!(!e[0].wants("group.created"), "filtered by type");
        assert!(!format!("{:?}", e[0].config).contains("whsec"), "Debug never shows a secret");
        let dup = "[[webhooks]]\nname = \"crm\"\nurl = \"http://a.invalid/\"\n\
                   secrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]";
        for (bad, why) in [
            ("timeout_ms = 0", "timeout_ms"),
            ("timeout_ms = 60001", "timeout_ms"),
            ("max_in_flight = 0", "max_in_flight"),
            ("max_in_flight = 65", "max_in_flight"),
            (dup, "used twice"),
            ("unknown = 1", "unknown field"),
        ] {
            let err = parse(bad).err().unwrap_or_else(|| panic!("{bad} accepted")).to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let three = WebhookConfig { secrets: vec![SECRET.into(); 3], ..e[0].config.clone() };
        assert!(endpoints(&[three]).is_err(), "at most two secrets");
        let ftp = WebhookConfig { url: "ftp://example.invalid/".into(), ..e[0].config.clone() };
        assert!(endpoints(&[ftp]).is_err());
        let short = WebhookConfig { secrets: vec!["whsec_c2hvcnQ=".into()], ..e[0].config.clone() };
        assert!(endpoints(&[short]).is_err());
    }

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
}
