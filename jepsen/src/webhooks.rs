//! The harness's webhook receiver: the app backend of a run, as its own OS
//! process (`rim-jepsen webhook-receiver`), so the nemesis can kill it,
//! pause it (a slow receiver) or cut it off from the nodes (its proxy).
//!
//! Every POST it accepts is appended to `webhooks.jsonl` in the run
//! directory as one [`Receipt`] **before** it answers 204, so an event the
//! nodes saw acknowledged is on disk (a killed process loses nothing it
//! acknowledged; the page cache survives it). Signatures are checked here
//! against the Standard Webhooks convention (`webhook-id`,
//! `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "id.timestamp.body">`, secrets `whsec_<base64>`), written from the
//! convention, not from rim's signer; a receipt records whether it
//! verified. The checker (`checker::webhooks`) reads the receipts.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::{Result, io_err};

/// The receipts file in a run directory.
pub const RECEIPTS_FILE: &str = "webhooks.jsonl";
/// The endpoint name the nodes are configured with.
pub const ENDPOINT: &str = "jepsen";
/// Largest request body the receiver takes.
const MAX_BODY: usize = 1 << 20;

/// One request the receiver accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// Wall-clock milliseconds when it arrived (the receiver's clock).
    pub at_ms: u64,
    /// `webhook-id`.
    pub id: String,
    /// `webhook-timestamp`.
    pub timestamp: String,
    /// Whether `webhook-signature` verified with one of the secrets.
    pub signature_ok: bool,
    /// The body, exactly as received (UTF-8; a body that is not is kept lossily
    /// and cannot verify).
    pub body: String,
}

/// The run's webhook secret: `whsec_` and the base64 of 32 bytes drawn from
/// the seed (a harness secret, not a real one).
pub fn secret_for(seed: u64) -> String {
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (seed.rotate_left(i as u32 * 7) as u8) ^ (i as u8).wrapping_mul(151);
    }
    format!("whsec_{}", B64.encode(bytes))
}

/// Whether `header` (`v1,<sig> v1,<sig> ...`) holds a signature of
/// `id.timestamp.body` under one of `secrets`.
pub fn verify(secrets: &[String], id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    let claimed: Vec<&str> = header.split(' ').filter_map(|s| s.strip_prefix("v1,")).collect();
    secrets.iter().any(|secret| {
        let Some(key) = secret.strip_prefix("whsec_").and_then(|k| B64.decode(k).ok()) else {
            return false;
        };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&key) else { return false };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        let expected = B64.encode(mac.finalize().into_bytes());
        claimed.iter().any(|c| *c == expected)
    })
}

struct Receiver {
    secrets: Vec<String>,
    out: Mutex<std::fs::File>,
}

async fn accept(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let (id, timestamp) = (header("webhook-id"), header("webhook-timestamp"));
    let signature_ok = verify(&r.secrets, &id, &timestamp, &body, &header("webhook-signature"));
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let receipt =
        Receipt { at_ms, id, timestamp, signature_ok, body: String::from_utf8_lossy(&body).into_owned() };
    let mut line = serde_json::to_vec(&receipt).unwrap_or_default();
    line.push(b'\n');
    let mut out = r.out.lock().unwrap_or_else(|p| p.into_inner());
    match out.write_all(&line).and_then(|()| out.flush()) {
        Ok(()) => StatusCode::NO_CONTENT,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Serves the receiver on `listen` until the process ends, appending to `out`.
pub async fn serve(listen: SocketAddr, out: &Path, secrets: Vec<String>) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .map_err(io_err(format!("opening {}", out.display())))?;
    let state = Arc::new(Receiver { secrets, out: Mutex::new(file) });
    let app = axum::Router::new()
        .fallback(axum::routing::post(accept))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state);
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(io_err(format!("binding {listen}")))?;
    axum::serve(listener, app).await.map_err(io_err("serving webhooks"))
}

/// Reads a receipts file; a torn last line (the receiver was killed while
/// writing it, so it never answered 2xx for it) is skipped. A missing file
/// is no receipts.
pub fn read_receipts(path: &Path) -> Result<Vec<Receipt>> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
    };
    let mut out = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line.map_err(io_err(format!("reading {}", path.display())))?;
        if let Ok(r) = serde_json::from_str::<Receipt>(&line) {
            out.push(r);
        }
    }
    Ok(out)
}

/// The node configuration (TOML) that sends every event to `url`.
pub fn node_config(url: &str, secret: &str) -> String {
    format!(
        "[[webhooks]]\nname = \"{ENDPOINT}\"\nurl = \"{url}\"\nsecrets = [\"{secret}\"]\ntimeout_ms = 2000\n"
    )
}

/// Where the receipts of run `dir` are.
pub fn receipts_path(dir: &Path) -> PathBuf {
    dir.join(RECEIPTS_FILE)
}

/// The receiver process of a run, behind its own proxy: the nodes post to
/// the proxy, so the nemesis can cut them off from it. Dropping it kills it.
#[derive(Debug)]
pub struct ReceiverProcess {
    proc: crate::process::Proc,
    listen: SocketAddr,
    proxy: crate::proxy::LinkProxy,
    receipts: PathBuf,
}

impl ReceiverProcess {
    /// Spawns `bin webhook-receiver` (the `rim-jepsen` binary) on a free
    /// port, appending to `dir/webhooks.jsonl`, logging to
    /// `dir/webhook-receiver.log`, and a proxy in front of it.
    pub async fn start(bin: &Path, dir: &Path, secret: &str) -> Result<ReceiverProcess> {
        let listen = crate::control::free_addr();
        let receipts = receipts_path(dir);
        let args = vec![
            "webhook-receiver".into(),
            "--listen".into(),
            listen.to_string(),
            "--out".into(),
            receipts.display().to_string(),
            "--secret".into(),
            secret.into(),
        ];
        let mut proc = crate::process::Proc::new(
            "webhook-receiver",
            bin,
            args,
            Vec::new(),
            dir.join("webhook-receiver.log"),
        );
        proc.spawn()?;
        let proxy = crate::proxy::LinkProxy::start(listen)
            .await
            .map_err(io_err("starting the webhook receiver's proxy"))?;
        Ok(ReceiverProcess { proc, listen, proxy, receipts })
    }

    /// The URL the nodes post to (through the proxy).
    pub fn url(&self) -> String {
        format!("http://{}/events", self.proxy.addr())
    }

    /// Where the receipts go.
    pub fn receipts(&self) -> &Path {
        &self.receipts
    }

    /// The process (kill, pause, resume, restart).
    pub fn proc(&mut self) -> &mut crate::process::Proc {
        &mut self.proc
    }

    /// Sets what the proxy does to the nodes' requests and the answers.
    pub fn set_link(&self, mode: crate::proxy::Mode) {
        self.proxy.set_mode(mode);
    }

    /// Resumes, restarts (if it was killed) and reconnects the receiver.
    pub fn heal(&mut self) -> Result<()> {
        self.proxy.set_mode(crate::proxy::Mode::Pass);
        let _ = self.proc.resume();
        if !self.proc.is_running() {
            self.proc.spawn()?;
        }
        Ok(())
    }

    /// Its own listen address (not through the proxy).
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector of the Standard Webhooks specification.
    #[test]
    fn the_specifications_example_verifies() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_string();
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let ts = "1614265330";
        let body = br#"{"test": 2432232314}"#;
        let sig = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert!(verify(std::slice::from_ref(&secret), id, ts, body, sig));
        assert!(verify(&["whsec_AAAA".into(), secret.clone()], id, ts, body, &format!("v1,xx {sig}")));
        assert!(!verify(std::slice::from_ref(&secret), id, "1614265331", body, sig));
        assert!(!verify(std::slice::from_ref(&secret), id, ts, br#"{"test": 2432232315}"#, sig));
        assert!(!verify(&["whsec_AAAA".into()], id, ts, body, sig));
    }

    #[test]
    fn seeds_give_distinct_secrets() {
        assert_ne!(secret_for(1), secret_for(2));
        assert!(secret_for(7).starts_with("whsec_"));
    }
}
