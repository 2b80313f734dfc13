//! The app's `before_send` hook: an HTTP endpoint of the app's backend that
//! sees every message a user sends before it is proposed, and answers
//! `allow`, `reject {code, reason}` or `modify {content}`
//! (docs/integration.md, "Before a message is sent").
//!
//! # Design
//!
//! The hook runs on the node that received the send, after the caller's
//! identity, ids and rate limits were checked and before anything is
//! proposed, so a refused message never reaches the Raft log and a modified
//! one is stored (and checked against the cluster's limits) as modified.
//! Only messages users send are shown to it: pushes of the app's own
//! backend, recalls, read receipts and notifications are not.
//!
//! # Invariants
//!
//! * **Bounded wait.** One call waits at most `timeout_ms` (connect, send
//!   and the whole answer); the answer is read up to [`MAX_ANSWER_BYTES`].
//! * **Bounded load.** At most `max_inflight` calls are outstanding per
//!   node; a send beyond that is treated as a failed call.
//! * **A failure has one meaning, chosen by the operator.** A call that
//!   times out, cannot connect, answers a non-2xx status or an answer that
//!   does not parse is a *failure*: with `on_failure = "reject"` (the
//!   default: fail closed) the send is refused with the retryable
//!   `ERROR_HOOK_UNAVAILABLE`; with `"allow"` it goes on unchanged.
//! * **Circuit breaker.** After `breaker_failures` failures in a row the
//!   breaker opens: for `breaker_open_ms` no call is made and every send
//!   gets the failure policy at once; then one probe call is let through,
//!   and its success closes the breaker (its failure opens it again). A
//!   black-holed endpoint therefore costs at most one timeout per
//!   `breaker_open_ms`, not one per message.
//! * **Retries.** A retried send (same `client_msg_id`) calls the hook
//!   again; the app should answer deterministically for one
//!   `client_msg_id`. Once the first attempt was committed, the retry gets
//!   the recorded result whatever the hook now says to the content.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, UserId};
use rim_proto::v1::{ConversationKind, SendInput};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The longest answer read from the hook (a modified content of the
/// largest allowed size, base64-encoded, fits).
pub const MAX_ANSWER_BYTES: usize = 256 * 1024;
/// The longest `reason` kept from a rejection (longer ones are cut).
pub const MAX_REASON_BYTES: usize = 256;

/// What the node does when the hook fails (times out, cannot be reached,
/// answers garbage) or the breaker is open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Refuse the send with the retryable `ERROR_HOOK_UNAVAILABLE`.
    #[default]
    Reject,
    /// Send the message unchanged.
    Allow,
}

/// `[before_send]` in the node's TOML (no `url`: no hook).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BeforeSendConfig {
    /// The endpoint (`http://` or `https://`) the node POSTs each send to.
    pub url: String,
    /// How long one call may take in all.
    pub timeout_ms: u64,
    /// What a failed call means.
    pub on_failure: OnFailure,
    /// Failures in a row that open the breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open before one probe call.
    pub breaker_open_ms: u64,
    /// Most calls outstanding on this node.
    pub max_inflight: usize,
    /// A PEM file of the CA that signed the endpoint's certificate (none:
    /// the system's roots).
    pub ca: Option<std::path::PathBuf>,
}

impl Default for BeforeSendConfig {
    fn default() -> BeforeSendConfig {
        BeforeSendConfig {
            url: String::new(),
            timeout_ms: 500,
            on_failure: OnFailure::Reject,
            breaker_failures: 5,
            breaker_open_ms: 10_000,
            max_inflight: 256,
            ca: None,
        }
    }
}

impl BeforeSendConfig {
    /// Refuses settings the hook cannot run with.
    pub fn validate(&self) -> Result<()> {
        if self.url.is_empty() {
            return Ok(());
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(Error::Config(format!("before_send.url must be http(s)://, not {:?}", self.url)));
        }
        if self.timeout_ms == 0 || self.timeout_ms > 60_000 {
            return Err(Error::Config("before_send.timeout_ms must be 1..=60000".into()));
        }
        if self.breaker_failures == 0 || self.max_inflight == 0 {
            return Err(Error::Config("before_send.breaker_failures and max_inflight must be ≥ 1".into()));
        }
        Ok(())
    }
}

/// What the hook is shown of one send (the request body, JSON).
#[derive(Debug, Serialize)]
struct Ask<'a> {
    /// Always `"before_send"`.
    r#type: &'static str,
    sender_user_id: u64,
    sender_device_id: u64,
    /// `"user"`, `"group"`, `"super_group"` or `"room"`.
    conversation_kind: &'static str,
    conversation_id: u64,
    client_msg_id: &'a str,
    content_type: i32,
    /// Base64 (standard, padded).
    content: String,
    mentions: &'a [u64],
    refers_to: u64,
}

/// The hook's answer (JSON, tagged by `action`).
#[derive(Debug, Deserialize)]
#[serde(tag = "action", rename_all = "lowercase")]
enum Answer {
    Allow,
    Reject {
        #[serde(default)]
        code: i64,
        #[serde(default)]
        reason: String,
    },
    Modify {
        /// Base64 (standard, padded).
        content: String,
    },
}

/// Why a call failed (for the log and the metric label).
#[derive(Debug)]
enum Failure {
    Open,
    Busy,
    Call(String),
}

impl Failure {
    fn label(&self) -> &'static str {
        match self {
            Failure::Open => "breaker_open",
            Failure::Busy => "busy",
            Failure::Call(_) => "failed",
        }
    }
}

/// The consecutive-failure circuit breaker.
#[derive(Debug, Default)]
struct Breaker {
    failures: AtomicU32,
    open_until: Mutex<Option<Instant>>,
    probing: AtomicBool,
}

/// Whether a call may be made, and whether it is the half-open probe.
enum Gate {
    Closed,
    Probe,
    Open,
}

impl Breaker {
    fn gate(&self) -> Gate {
        let open_until = *self.open_until.lock().unwrap_or_else(|e| e.into_inner());
        match open_until {
            None => Gate::Closed,
            Some(t) if Instant::now() < t => Gate::Open,
            Some(_) => {
                if self.probing.swap(true, Ordering::AcqRel) {
                    Gate::Open
                } else {
                    Gate::Probe
                }
            }
        }
    }

    fn succeeded(&self) {
        self.failures.store(0, Ordering::Release);
        *self.open_until.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.probing.store(false, Ordering::Release);
    }

    fn failed(&self, threshold: u32, open_for: Duration, probe: bool) {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if probe || n >= threshold {
            let mut open = self.open_until.lock().unwrap_or_else(|e| e.into_inner());
            if probe || open.is_none() {
                tracing::warn!(
                    failures = n,
                    open_ms = open_for.as_millis() as u64,
                    "before_send hook: breaker open"
                );
                metrics::counter!("rim_before_send_breaker_opened_total").increment(1);
            }
            *open = Some(Instant::now() + open_for);
        }
        if probe {
            self.probing.store(false, Ordering::Release);
        }
    }
}

/// The hook client of one node.
#[derive(Debug)]
pub struct BeforeSend {
    config: BeforeSendConfig,
    http: reqwest::Client,
    breaker: Breaker,
    slots: tokio::sync::Semaphore,
}

impl BeforeSend {
    /// The hook of `config`, or `None` when no URL is configured.
    pub fn from_config(config: &BeforeSendConfig) -> Result<Option<BeforeSend>> {
        if config.url.is_empty() {
            return Ok(None);
        }
        config.validate()?;
        let http = crate::http_client::client(
            "before_send",
            Duration::from_millis(config.timeout_ms),
            config.ca.as_deref(),
        )?;
        Ok(Some(BeforeSend {
            slots: tokio::sync::Semaphore::new(config.max_inflight),
            config: config.clone(),
            http,
            breaker: Breaker::default(),
        }))
    }

    /// Shows the send to the hook; returns the input to propose (its
    /// content replaced if the hook modified it), or the refusal.
    pub async fn check(&self, user: UserId, device: DeviceId, mut input: SendInput) -> Result<SendInput> {
        let started = Instant::now();
        let outcome = self.call(user, device, &input).await;
        metrics::histogram!("rim_before_send_seconds").record(started.elapsed().as_secs_f64());
        let answer = match outcome {
            Ok(a) => a,
            Err(f) => {
                metrics::counter!("rim_before_send_total", "result" => f.label()).increment(1);
                if let Failure::Call(why) = &f {
                    tracing::warn!(error = %why, "before_send hook failed");
                }
                return match self.config.on_failure {
                    OnFailure::Allow => Ok(input),
                    OnFailure::Reject => Err(Error::rejected(
                        ErrorCode::ErrorHookUnavailable,
                        format!("the app's before_send hook is unavailable ({}); retry later", f.label()),
                    )),
                };
            }
        };
        match answer {
            Answer::Allow => {
                metrics::counter!("rim_before_send_total", "result" => "allow").increment(1);
                Ok(input)
            }
            Answer::Reject { code, reason } => {
                metrics::counter!("rim_before_send_total", "result" => "reject").increment(1);
                Err(Error::rejected(
                    ErrorCode::ErrorRejectedByApp,
                    format!("rejected by the app (code {code}): {}", cut(&reason, MAX_REASON_BYTES)),
                ))
            }
            Answer::Modify { content } => {
                metrics::counter!("rim_before_send_total", "result" => "modify").increment(1);
                input.content = B64
                    .decode(content.as_bytes())
                    .map_err(|e| {
                        Error::rejected(
                            ErrorCode::ErrorHookUnavailable,
                            format!("the app's before_send hook answered content that is not base64: {e}"),
                        )
                    })?
                    .into();
                Ok(input)
            }
        }
    }

    /// One call through the breaker and the in-flight bound.
    async fn call(&self, user: UserId, device: DeviceId, input: &SendInput) -> Result<Answer, Failure> {
        let probe = match self.breaker.gate() {
            Gate::Open => return Err(Failure::Open),
            Gate::Probe => true,
            Gate::Closed => false,
        };
        let Ok(_slot) = self.slots.try_acquire() else {
            if probe {
                self.breaker.probing.store(false, Ordering::Release);
            }
            return Err(Failure::Busy);
        };
        match self.post(user, device, input).await {
            Ok(a) => {
                self.breaker.succeeded();
                Ok(a)
            }
            Err(why) => {
                self.breaker.failed(
                    self.config.breaker_failures,
                    Duration::from_millis(self.config.breaker_open_ms),
                    probe,
                );
                Err(Failure::Call(why))
            }
        }
    }

    async fn post(&self, user: UserId, device: DeviceId, input: &SendInput) -> Result<Answer, String> {
        let kind = match ConversationKind::try_from(input.conversation_kind) {
            Ok(ConversationKind::User) => "user",
            Ok(ConversationKind::Group) => "group",
            Ok(ConversationKind::SuperGroup) => "super_group",
            Ok(ConversationKind::Room) => "room",
            _ => "unspecified",
        };
        let ask = Ask {
            r#type: "before_send",
            sender_user_id: user.0,
            sender_device_id: device.0,
            conversation_kind: kind,
            conversation_id: input.conversation_id,
            client_msg_id: &input.client_msg_id,
            content_type: input.content_type,
            content: B64.encode(&input.content),
            mentions: &input.mentions,
            refers_to: input.refers_to,
        };
        let deadline = Duration::from_millis(self.config.timeout_ms);
        let exchange = async {
            let mut resp = self
                .http
                .post(&self.config.url)
                .json(&ask)
                .send()
                .await
                .map_err(|e| format!("request: {e}"))?;
            if !resp.status().is_success() {
                return Err(format!("status {}", resp.status()));
            }
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(|e| format!("answer: {e}"))? {
                if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                    return Err(format!("answer larger than {MAX_ANSWER_BYTES} bytes"));
                }
                body.extend_from_slice(&chunk);
            }
            serde_json::from_slice::<Answer>(&body).map_err(|e| format!("answer: {e}"))
        };
        tokio::time::timeout(deadline, exchange)
            .await
            .map_err(|_| format!("no answer within {deadline:?}"))?
    }
}

/// `s` cut to at most `max` bytes on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_by_action() {
        assert!(matches!(serde_json::from_str::<Answer>(r#"{"action":"allow"}"#), Ok(Answer::Allow)));
        let r = serde_json::from_str::<Answer>(r#"{"action":"reject","code":7,"reason":"spam"}"#).unwrap();
        assert!(matches!(r, Answer::Reject { code: 7, ref reason } if reason == "spam"));
        let m = serde_json::from_str::<Answer>(r#"{"action":"modify","content":"aGk="}"#).unwrap();
        assert!(matches!(m, Answer::Modify { ref content } if content == "aGk="));
        assert!(serde_json::from_str::<Answer>(r#"{"action":"maybe"}"#).is_err());
        assert!(serde_json::from_str::<Answer>(r#"{}"#).is_err());
    }

    #[test]
    fn the_breaker_opens_after_the_threshold_and_lets_one_probe_through() {
        let b = Breaker::default();
        let open_for = Duration::from_millis(30);
        for _ in 0..2 {
            assert!(matches!(b.gate(), Gate::Closed));
            b.failed(3, open_for, false);
        }
        assert!(matches!(b.gate(), Gate::Closed));
        b.failed(3, open_for, false);
        assert!(matches!(b.gate(), Gate::Open));
        std::thread::sleep(open_for * 2);
        assert!(matches!(b.gate(), Gate::Probe));
        // While the probe is out, everyone else sees it open.
        assert!(matches!(b.gate(), Gate::Open));
        // A failed probe opens it again at once.
        b.failed(3, open_for, true);
        assert!(matches!(b.gate(), Gate::Open));
        std::thread::sleep(open_for * 2);
        assert!(matches!(b.gate(), Gate::Probe));
        b.succeeded();
        assert!(matches!(b.gate(), Gate::Closed));
    }

    #[test]
    fn reasons_are_cut_on_a_character_boundary() {
        assert_eq!(cut("abc", 5), "abc");
        assert_eq!(cut("ééé", 3), "é");
    }

    #[test]
    fn config_is_checked() {
        assert!(BeforeSendConfig::default().validate().is_ok());
        let bad = BeforeSendConfig { url: "ftp://x".into(), ..Default::default() };
        assert!(bad.validate().is_err());
        let bad = BeforeSendConfig { url: "http://x".into(), timeout_ms: 0, ..Default::default() };
        assert!(bad.validate().is_err());
    }
}
