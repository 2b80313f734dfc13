//! Test doubles of an app's identity side (shared by `jwks.rs` and
//! `auth_callback.rs`): signing keys and their JWKS, a JWKS HTTP(S) server
//! that counts requests and can fail or hang, and sign-ins through a
//! gateway's TCP transport or its `ConnSignIn` call.
#![allow(dead_code, missing_docs)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use prost::Message as _;
use rim_proto::codec::{FrameDecoder, encode_frame};
use rim_proto::v1::gateway_service_client::GatewayServiceClient;
use rim_proto::v1::*;
use rim_testkit::grpc::{endpoint, with_secret};
use rim_testkit::wait::WAIT;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const RSA_PRIVATE: &str = include_str!("../fixtures/jwt-rs256-test-private.pem");

pub fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// One of the app's signing keys.
pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    key: EncodingKey,
    /// The public half as a JWK (without kid).
    public: serde_json::Value,
}

impl SigningKey {
    pub fn rsa(kid: &str) -> SigningKey {
        let key = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
        let public = serde_json::to_value(Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap()).unwrap();
        SigningKey { kid: kid.into(), alg: Algorithm::RS256, key, public }
    }

    pub fn ec(kid: &str) -> SigningKey {
        let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let key = EncodingKey::from_ec_pem(k.serialize_pem().as_bytes()).unwrap();
        let public = serde_json::to_value(Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap()).unwrap();
        SigningKey { kid: kid.into(), alg: Algorithm::ES256, key, public }
    }

    pub fn ed(kid: &str) -> SigningKey {
        let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let key = EncodingKey::from_ed_pem(k.serialize_pem().as_bytes()).unwrap();
        use base64::Engine as _;
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(k.public_key_raw());
        let public = json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "x": x});
        SigningKey { kid: kid.into(), alg: Algorithm::EdDSA, key, public }
    }

    /// The public half, as a JWK with this key's kid.
    pub fn jwk(&self) -> serde_json::Value {
        let mut v = self.public.clone();
        v["kid"] = json!(self.kid);
        v["use"] = json!("sig");
        v
    }

    /// A token for the app's user `sub` on its device `device`.
    pub fn token(&self, sub: &str, device: &str) -> String {
        self.token_with_kid(&self.kid, sub, device)
    }

    /// [`token`](Self::token), naming `kid` in the header.
    pub fn token_with_kid(&self, kid: &str, sub: &str, device: &str) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(kid.into());
        let claims = json!({"sub": sub, "device": device, "iat": now_secs(), "exp": now_secs() + 600});
        encode(&h, &claims, &self.key).unwrap()
    }
}

/// A JWK set of these keys.
pub fn jwks(keys: &[&SigningKey]) -> serde_json::Value {
    json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() })
}

/// How the JWKS server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    Serve = 0,
    /// HTTP 503.
    Fail = 1,
    /// Reads the request, never answers.
    Hang = 2,
}

struct State {
    body: Mutex<String>,
    requests: AtomicU64,
    mode: AtomicU8,
}

/// A JWKS endpoint (`/jwks`) over HTTP/1.1, plain or TLS; it counts the
/// requests it read.
pub struct JwksServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    /// A plain HTTP server.
    pub async fn start(set: serde_json::Value) -> JwksServer {
        JwksServer::start_with(set, None).await
    }

    /// Over TLS with this certificate and key when given.
    pub async fn start_with(
        set: serde_json::Value,
        tls: Option<(&std::path::Path, &std::path::Path)>,
    ) -> JwksServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            body: Mutex::new(set.to_string()),
            requests: AtomicU64::new(0),
            mode: AtomicU8::new(0),
        });
        let acceptor = tls.map(|(cert, key)| {
            tokio_rustls::TlsAcceptor::from(rim_cluster::tls::server_config(cert, key).unwrap())
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let (st, acceptor) = (st.clone(), acceptor.clone());
                tokio::spawn(async move {
                    match acceptor {
                        Some(a) => {
                            if let Ok(s) = a.accept(stream).await {
                                serve(s, &st).await;
                            }
                        }
                        None => serve(stream, &st).await,
                    }
                });
            }
        });
        JwksServer { addr, state, task }
    }

    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}/jwks", self.addr.port())
    }

    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    pub fn publish(&self, set: serde_json::Value) {
        *self.state.body.lock().unwrap() = set.to_string();
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.mode.store(mode as u8, Ordering::SeqCst);
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, state: &State) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 16 << 10 {
            return;
        }
    }
    state.requests.fetch_add(1, Ordering::SeqCst);
    let reply = match state.mode.load(Ordering::SeqCst) {
        0 => {
            let body = state.body.lock().unwrap().clone();
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        1 => "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string(),
        _ => {
            // Holds the connection until the client gives up.
            let _ = s.read(&mut buf).await;
            return;
        }
    };
    let _ = s.write_all(reply.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// A SIGN_IN with only a token, over a gateway's TCP transport; the reply.
pub async fn gateway_sign_in(gateway: SocketAddr, token: &str) -> Reply {
    gateway_sign_in_with(gateway, SignInInput { user_id: 0, device_id: 0, token: token.into() }).await
}

/// A SIGN_IN over a gateway's TCP transport; the reply.
pub async fn gateway_sign_in_with(gateway: SocketAddr, input: SignInInput) -> Reply {
    let mut stream = tokio::net::TcpStream::connect(gateway).await.unwrap();
    let packet = Packet {
        request_id: 1,
        command: Command::SignIn as i32,
        content: input.encode_to_vec().into(),
        seq: 0,
    };
    let mut wire = BytesMut::new();
    encode_frame(&packet, &mut wire);
    stream.write_all(&wire).await.unwrap();
    let mut decoder = FrameDecoder::default();
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 4096];
    loop {
        if let Some(p) = decoder.next_frame().expect("well-formed frames") {
            if p.request_id == 1 {
                return Reply::decode(p.content).unwrap();
            }
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => panic!("no sign-in reply from the gateway in time"),
            Ok(Ok(0)) | Ok(Err(_)) => panic!("the gateway closed the connection before replying"),
            Ok(Ok(n)) => decoder.push(&buf[..n]),
        }
    }
}

/// A gateway's `ConnSignIn` to the node listening (internally) at `listen`.
pub async fn conn_sign_in(listen: &str, input: SignInInput) -> Result<ConnSignInReply, tonic::Status> {
    let mut gw = GatewayServiceClient::new(endpoint(listen).connect_lazy());
    let r = ConnSignInRequest { conn: None, input: Some(input) };
    gw.conn_sign_in(with_secret(r)).await.map(|r| r.into_inner())
}

/// [`conn_sign_in`] with only a token.
pub async fn token_sign_in(listen: &str, token: &str) -> Result<ConnSignInReply, tonic::Status> {
    conn_sign_in(listen, SignInInput { user_id: 0, device_id: 0, token: token.into() }).await
}

/// `ListDevices` on the client listener `client_listen`, with this metadata
/// (an authenticated call that shows who the caller is).
pub async fn list_devices(
    client_listen: &str,
    metadata: &[(&'static str, &str)],
) -> Result<Vec<Device>, tonic::Status> {
    let mut auth =
        rim_proto::v1::auth_service_client::AuthServiceClient::new(endpoint(client_listen).connect_lazy());
    let mut r = tonic::Request::new(ListDevicesRequest {});
    for (k, v) in metadata {
        r.metadata_mut().insert(*k, v.parse().unwrap());
    }
    auth.list_devices(r).await.map(|r| r.into_inner().devices)
}
