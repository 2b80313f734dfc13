//! App-signed tokens (the "plug into an app" issue §1), through a real
//! gateway: users of an app sign in with JWTs the app signed (HS256 and
//! ES256 here; every algorithm is unit-tested in `node/src/jwt.rs`), are
//! created on first sight exactly once even when their first sign-ins race,
//! chat, and are refused when the token is expired, for another audience,
//! signed by an unknown key, or issued before their device was revoked; a
//! connection ends when its token expires.
#![allow(missing_docs)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use prost::Message as _;
use rim_node::jwt::{JwtConfig, JwtKeyConfig};
use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, UserId};
use rim_proto::v1::*;
use rim_testkit::cluster::Cluster;
use rim_testkit::wait::{WAIT, serial, wait_for};
use serde_json::json;

mod cluster;
mod wire;
use wire::Client as TcpClient;

const SECRET: &str = "the-apps-hs256-secret-0123456789abcdef";
const ISSUER: &str = "https://app.example";
const AUDIENCE: &str = "rim-tests";

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The app's signing keys, and the node configuration trusting them.
struct App {
    es256: EncodingKey,
    config: JwtConfig,
    _dir: tempfile::TempDir,
}

impl App {
    fn new() -> App {
        let dir = tempfile::tempdir().unwrap();
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let public = dir.path().join("es256.pem");
        std::fs::write(&public, ec.public_key_pem()).unwrap();
        let config = JwtConfig {
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            keys: vec![
                JwtKeyConfig {
                    kid: "hs".into(),
                    alg: "HS256".into(),
                    secret: SECRET.into(),
                    ..Default::default()
                },
                JwtKeyConfig {
                    kid: "es".into(),
                    alg: "ES256".into(),
                    public_key: Some(public),
                    ..Default::default()
                },
            ],
            ..JwtConfig::default()
        };
        App { es256: EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap(), config, _dir: dir }
    }

    fn claims(sub: &str, device: &str) -> serde_json::Value {
        json!({"sub": sub, "device": device, "name": format!("{sub} of the app"), "iss": ISSUER,
               "aud": AUDIENCE, "iat": now_secs(), "exp": now_secs() + 600})
    }

    fn hs256(&self, claims: &serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("hs".into());
        encode(&h, claims, &EncodingKey::from_secret(SECRET.as_bytes()).unwrap()).unwrap()
    }

    fn es256(&self, claims: &serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("es".into());
        encode(&h, claims, &self.es256).unwrap()
    }
}

/// A SIGN_IN with only a token (the ids come from it); the reply.
async fn sign_in(addr: std::net::SocketAddr, token: &str) -> (TcpClient, Reply) {
    let mut c = TcpClient::connect(addr).await;
    let input = SignInInput { user_id: 0, device_id: 0, token: token.into() };
    let reply = c.request(Command::SignIn, input.encode_to_vec()).await;
    (c, reply)
}

async fn signed_in(addr: std::net::SocketAddr, token: &str) -> (TcpClient, SignInOutput) {
    let (c, reply) = sign_in(addr, token).await;
    assert_eq!(reply.code, ErrorCode::Ok as i32, "sign-in refused: {}", reply.message);
    (c, SignInOutput::decode(reply.data).unwrap())
}

fn code(r: &Reply) -> ErrorCode {
    ErrorCode::try_from(r.code).unwrap()
}

/// Waits for a `KICK` with `want`, then the end of the connection.
async fn kicked(mut c: TcpClient, want: ErrorCode) {
    let mut got = None;
    while let Some(p) = c.read_packet(Instant::now() + WAIT).await {
        if p.command == Command::Kick as i32 {
            got = Some(KickPush::decode(p.content).unwrap().code);
        }
    }
    assert_eq!(got, Some(want as i32), "the connection ended without a KICK {want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_signed_tokens_sign_in_provision_once_chat_and_are_refused_when_they_should() {
    let _g = serial().await;
    let app = App::new();
    let config = app.config.clone();
    let c = Cluster::start_with(3, 2, move |cfg| cfg.jwt = config.clone()).await;
    let gw = c.gateway("jwt").await;
    let addr = gw.tcp_addr().unwrap();

    // First sign-ins of one app user and device, racing: one user, one
    // device, whoever wins.
    let token = app.hs256(&App::claims("alice-42", "phone"));
    let racing: Vec<_> = (0..4)
        .map(|_| {
            let token = token.clone();
            tokio::spawn(async move { signed_in(addr, &token).await })
        })
        .collect();
    let mut outs = Vec::new();
    for r in racing {
        outs.push(r.await.unwrap().1);
    }
    let (user, device) = (outs[0].user_id, outs[0].device_id);
    assert!(user != 0 && device != 0);
    assert!(outs.iter().all(|o| (o.user_id, o.device_id) == (user, device)), "{outs:?}");

    // Signing in again with the same token finds them (no new user or device).
    let (mut alice, out) = signed_in(addr, &token).await;
    assert_eq!((out.user_id, out.device_id), (user, device));
    // Another device of the same user; another user with an ES256 token.
    let (_, laptop) = signed_in(addr, &app.hs256(&App::claims("alice-42", "laptop"))).await;
    assert_eq!(laptop.user_id, user);
    assert_ne!(laptop.device_id, device);
    let (mut bob, bob_out) = signed_in(addr, &app.es256(&App::claims("bob-7", "tablet"))).await;
    assert_ne!(bob_out.user_id, user);

    // They chat, under the ids the cluster gave them.
    let sent = alice.send_text(bob_out.user_id, "hello-bob").await;
    let push = bob.push(sent.seq.max(1)).await;
    let m = push.message.unwrap();
    assert_eq!((m.sender_user_id, m.content.as_ref()), (user, b"hello-bob".as_ref()));

    // Refused: expired, another audience, an unknown key, a tampered token.
    let mut expired = App::claims("alice-42", "phone");
    expired["exp"] = json!(now_secs() - 3600);
    assert_eq!(code(&sign_in(addr, &app.hs256(&expired)).await.1), ErrorCode::ErrorTokenExpired);
    let mut other_aud = App::claims("alice-42", "phone");
    other_aud["aud"] = json!("another-app");
    assert_eq!(code(&sign_in(addr, &app.hs256(&other_aud)).await.1), ErrorCode::ErrorUnauthenticated);
    let stranger = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("es".into());
    let forged = encode(
        &h,
        &App::claims("alice-42", "phone"),
        &EncodingKey::from_ec_pem(stranger.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(code(&sign_in(addr, &forged).await.1), ErrorCode::ErrorUnauthenticated);

    // Revoking the device ends its live connection, and its old token no
    // longer signs it in; a token the app issues afterwards does, for the
    // same device.
    rim_node::service::ops::revoke(&c.node(1).core, UserId(user), DeviceId(device)).await.unwrap();
    let revoked_at = now_secs();
    kicked(alice, ErrorCode::ErrorTokenRevoked).await;
    assert_eq!(code(&sign_in(addr, &token).await.1), ErrorCode::ErrorTokenRevoked);
    wait_for(Duration::from_secs(3), "the next second", || (now_secs() > revoked_at).then_some(())).await;
    let (_, again) = signed_in(addr, &app.hs256(&App::claims("alice-42", "phone"))).await;
    assert_eq!((again.user_id, again.device_id), (user, device));

    // A connection ends when its token expires.
    let mut short = App::claims("carol-9", "watch");
    short["exp"] = json!(now_secs() + 2);
    let (carol, _) = signed_in(addr, &app.hs256(&short)).await;
    kicked(carol, ErrorCode::ErrorTokenExpired).await;

    gw.shutdown().await;
    c.shutdown().await;
}

/// Without `[jwt]` keys, a JWT is just a malformed rim token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_an_app_signed_token_is_refused() {
    let _g = serial().await;
    let app = App::new();
    let c = Cluster::start(1, 1).await;
    let gw = c.gateway("no-jwt").await;
    let (_, reply) = sign_in(gw.tcp_addr().unwrap(), &app.hs256(&App::claims("dave", "phone"))).await;
    assert_ne!(code(&reply), ErrorCode::Ok);
    gw.shutdown().await;
    c.shutdown().await;
}

/// The first message of a WebSocket connection, as a JSON packet.
async fn first_json<S>(ws: &mut S) -> Packet
where
    S: futures::Stream<
            Item = Result<tokio_tungstenite::tungstenite::Message, tokio_tungstenite::tungstenite::Error>,
        > + Unpin,
{
    use futures::StreamExt as _;
    let msg = tokio::time::timeout(WAIT, ws.next()).await.expect("a message in time").expect("a message");
    match msg.expect("a readable message") {
        tokio_tungstenite::tungstenite::Message::Text(t) => {
            rim_gateway::ws::packet_from_json(t.as_str()).unwrap()
        }
        other => panic!("expected a JSON text message, got {other:?}"),
    }
}

/// A web client puts its token in the upgrade URL (`?token=`, JSON form):
/// the sign-in's reply is its first message; a refused token's reply comes
/// first too, then the close; a malformed query refuses the upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_client_signs_in_with_the_token_in_the_url() {
    use futures::SinkExt as _;
    let _g = serial().await;
    let app = App::new();
    let config = app.config.clone();
    let c = Cluster::start_with(1, 1, move |cfg| cfg.jwt = config.clone()).await;
    let gw = c.gateway("jwt-url").await;
    let ws_addr = gw.ws_addr().unwrap();
    let url = |query: String| format!("ws://{ws_addr}/ws?{query}");

    let token = app.hs256(&App::claims("erin-3", "browser"));
    let (mut ws, _) =
        tokio_tungstenite::connect_async(url(format!("token={token}&format=json"))).await.unwrap();
    let first = first_json(&mut ws).await;
    assert_eq!((first.request_id, first.command), (0, Command::SignIn as i32));
    let reply = Reply::decode(first.content).unwrap();
    assert_eq!(code(&reply), ErrorCode::Ok, "{}", reply.message);
    let out = SignInOutput::decode(reply.data).unwrap();
    assert!(out.user_id != 0 && out.device_id != 0);
    // The session goes on as any other.
    let beat = r#"{"request_id": 1, "command": "HEARTBEAT"}"#;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(beat.into())).await.unwrap();
    let next = first_json(&mut ws).await;
    assert_eq!((next.request_id, next.command), (1, Command::Heartbeat as i32));

    let mut expired = App::claims("erin-3", "browser");
    expired["exp"] = json!(now_secs() - 3600);
    let query = format!("token={}&format=json", app.hs256(&expired));
    let (mut refused, _) = tokio_tungstenite::connect_async(url(query)).await.unwrap();
    let first = first_json(&mut refused).await;
    assert_eq!(code(&Reply::decode(first.content).unwrap()), ErrorCode::ErrorTokenExpired);

    let bad = tokio_tungstenite::connect_async(url(format!("user_id=x&token={token}"))).await;
    match bad {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 400),
        other => panic!("a malformed query was upgraded: {other:?}"),
    }
    gw.shutdown().await;
    c.shutdown().await;
}
