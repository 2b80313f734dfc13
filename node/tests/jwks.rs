//! App-signed tokens verified with keys from the app's JWKS URL (issue 15
//! §1): keys come only from the set, rotate without a restart, disappear
//! after a refresh, survive a failed refresh; unknown kids cost a bounded
//! number of fetches; a reconnect storm of known kids costs none; the set
//! is fetched over TLS trusting only `jwks_ca`.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use rim_node::jwt::JwtConfig;
use rim_proto::ErrorCode;
use rim_proto::v1::*;
use rim_testkit::cluster::Cluster;
use rim_testkit::grpc::code;
use rim_testkit::wait::{WAIT, eventually, serial, wait_for};

mod app_auth;
use app_auth::{JwksServer, Mode, SigningKey, gateway_sign_in, jwks, list_devices, token_sign_in};

fn jwt_config(url: &str, refresh_secs: u64, unknown_kid_secs: u64) -> JwtConfig {
    JwtConfig {
        jwks_url: url.into(),
        jwks_refresh_secs: refresh_secs,
        jwks_unknown_kid_secs: unknown_kid_secs,
        jwks_timeout_ms: 1_000,
        ..JwtConfig::default()
    }
}

fn reply_code(r: &Reply) -> ErrorCode {
    ErrorCode::try_from(r.code).unwrap()
}

fn signed_in(r: &Reply) -> SignInOutput {
    assert_eq!(reply_code(r), ErrorCode::Ok, "sign-in refused: {}", r.message);
    prost::Message::decode(r.data.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_the_jwks_sign_in_rotate_and_survive_a_failed_refresh() {
    let _g = serial().await;
    let (old, new) = (SigningKey::rsa("2026-old"), SigningKey::ec("2026-new"));
    let server = JwksServer::start(jwks(&[&old])).await;
    let config = jwt_config(&server.url("http"), 1, 1);
    let c = Cluster::start_with(1, 1, move |cfg| cfg.jwt = config.clone()).await;
    let gw = c.gateway("jwks").await;
    let addr = gw.tcp_addr().unwrap();

    // The node holds no configured key: the token verifies with the
    // JWKS's RS256 key, through a gateway.
    let first = signed_in(&gateway_sign_in(addr, &old.token("ann", "phone")).await);
    assert!(first.user_id != 0 && first.device_id != 0);

    // Rotation: the new key is published next to the old one; both verify
    // (the new one once a refresh or an unknown-kid refetch saw it).
    server.publish(jwks(&[&old, &new]));
    let again = eventually(WAIT, "the new key verifies", || async {
        let r = gateway_sign_in(addr, &new.token("ann", "phone")).await;
        (reply_code(&r) == ErrorCode::Ok).then(|| signed_in(&r))
    })
    .await;
    assert_eq!(
        (again.user_id, again.device_id),
        (first.user_id, first.device_id),
        "same app user, same device"
    );
    signed_in(&gateway_sign_in(addr, &old.token("ann", "phone")).await);

    // Algorithm confusion: an HS256 token under the new key's kid, "signed"
    // with the published key as the secret, is refused.
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some(new.kid.clone());
    let claims = serde_json::json!({"sub": "ann", "device": "phone", "exp": app_auth::now_secs() + 600});
    let secret = new.jwk().to_string();
    let confused = jsonwebtoken::encode(
        &h,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(reply_code(&gateway_sign_in(addr, &confused).await), ErrorCode::ErrorUnauthenticated);

    // The same token authenticates client API calls, as `authorization:
    // Bearer` or as `token`, without user_id/device_id: the caller is the
    // app user's rim user and device.
    let client = c.configs[&1].client_listen.clone();
    let bearer = format!("Bearer {}", new.token("ann", "phone"));
    for meta in [vec![("authorization", bearer.as_str())], vec![("token", &new.token("ann", "phone"))]] {
        let devices = list_devices(&client, &meta).await.unwrap();
        assert!(devices.iter().all(|d| d.user_id == first.user_id), "{devices:?}");
        assert!(devices.iter().any(|d| d.device_id == first.device_id), "{devices:?}");
    }
    let forged = format!("Bearer {}", SigningKey::ec(&new.kid).token("ann", "phone"));
    let r = list_devices(&client, &[("authorization", forged.as_str())]).await;
    assert_eq!(code(&r.unwrap_err()), ErrorCode::ErrorUnauthenticated);

    // The old key is withdrawn: after a refresh it no longer verifies.
    server.publish(jwks(&[&new]));
    eventually(WAIT, "the withdrawn key is refused", || async {
        let r = gateway_sign_in(addr, &old.token("ann", "phone")).await;
        (reply_code(&r) == ErrorCode::ErrorUnauthenticated).then_some(())
    })
    .await;
    signed_in(&gateway_sign_in(addr, &new.token("ann", "phone")).await);

    // The app's JWKS endpoint fails: refreshes keep failing, the keys of
    // the last good fetch keep verifying.
    server.set_mode(Mode::Fail);
    let before = server.requests();
    wait_for(WAIT, "two failed refreshes", || (server.requests() >= before + 2).then_some(())).await;
    signed_in(&gateway_sign_in(addr, &new.token("ann", "laptop")).await);
    assert_eq!(
        reply_code(&gateway_sign_in(addr, &old.token("ann", "phone")).await),
        ErrorCode::ErrorUnauthenticated
    );

    // It hangs: a sign-in naming an unknown kid waits at most the fetch
    // timeout (1 s here), and is refused.
    server.set_mode(Mode::Hang);
    let stranger = SigningKey::ed("not-published");
    let started = Instant::now();
    let r = token_sign_in(&c.configs[&1].listen, &stranger.token("eve", "x")).await;
    assert_eq!(code(&r.unwrap_err()), ErrorCode::ErrorUnauthenticated);
    assert!(started.elapsed() < Duration::from_millis(1_000 + 1_500), "waited {:?}", started.elapsed());
    signed_in(&gateway_sign_in(addr, &new.token("ann", "phone")).await);

    gw.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_makes_no_fetch_and_a_flood_of_unknown_kids_one() {
    let _g = serial().await;
    let key = SigningKey::ed("k1");
    let server = JwksServer::start(jwks(&[&key])).await;
    // No periodic refresh during the test; unknown kids may refetch once.
    let config = jwt_config(&server.url("http"), 3_600, 3_600);
    let c = Cluster::start_with(1, 1, move |cfg| cfg.jwt = config.clone()).await;
    let gw = c.gateway("jwks-storm").await;
    let addr = gw.tcp_addr().unwrap();
    let listen = c.configs[&1].listen.clone();

    // The set was fetched at start (the storm below must not be the first).
    wait_for(WAIT, "the fetch at start", || (server.requests() >= 1).then_some(())).await;
    let clients: Vec<(String, String)> =
        (0..10).map(|i| (format!("user-{i}"), format!("device-{i}"))).collect();
    for (u, d) in &clients {
        signed_in(&gateway_sign_in(addr, &key.token(u, d)).await);
    }
    let fetched = server.requests();

    // A reconnect storm: 100 sign-ins of those clients (10 at a time),
    // each with a fresh token of the known kid. Zero calls to the app.
    for round in 0..10 {
        let tasks: Vec<_> = clients
            .iter()
            .map(|(u, d)| {
                let token = key.token(u, d);
                tokio::spawn(async move { gateway_sign_in(addr, &token).await })
            })
            .collect();
        for t in tasks {
            let r = t.await.unwrap();
            assert_eq!(reply_code(&r), ErrorCode::Ok, "round {round}: {}", r.message);
        }
    }
    assert_eq!(server.requests(), fetched, "a reconnect storm of known kids fetched the JWKS");

    // A flood of 200 forged kids, 50 at a time: all refused, one fetch in
    // all (the first unknown kid's; the rest are within the interval).
    let forger = SigningKey::ed("forged");
    for batch in 0..4 {
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let token = forger.token_with_kid(&format!("forged-{batch}-{i}"), "admin", "x");
                let listen = listen.clone();
                tokio::spawn(async move { token_sign_in(&listen, &token).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(code(&t.await.unwrap().unwrap_err()), ErrorCode::ErrorUnauthenticated);
        }
    }
    assert_eq!(server.requests(), fetched + 1, "unknown kids refetch at most once per interval");

    // So a key published now waits for the next refresh (an hour here):
    // refused, still without a fetch.
    let next = SigningKey::ed("k2");
    server.publish(jwks(&[&key, &next]));
    let r = token_sign_in(&listen, &next.token("user-0", "device-0")).await;
    assert_eq!(code(&r.unwrap_err()), ErrorCode::ErrorUnauthenticated);
    assert_eq!(server.requests(), fetched + 1);

    gw.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jwks_is_fetched_over_tls_trusting_only_jwks_ca() {
    let _g = serial().await;
    let pki = rim_testkit::tls::TestPki::new();
    let key = SigningKey::rsa("tls-key");
    let server = JwksServer::start_with(jwks(&[&key]), Some((&pki.cert, &pki.key))).await;
    let (ca, other_ca) = (pki.ca.clone(), pki.other_ca.clone());
    let url = server.url("https");
    // Node 1 trusts the server's CA; node 2 another CA.
    let c = Cluster::start_with(2, 1, move |cfg| {
        cfg.jwt = jwt_config(&url, 3_600, 1);
        cfg.jwt.jwks_ca = Some(if cfg.id == 1 { ca.clone() } else { other_ca.clone() });
    })
    .await;
    let token = key.token("tls-user", "phone");
    let ok = token_sign_in(&c.configs[&1].listen, &token).await.unwrap();
    assert!(ok.output.unwrap().user_id != 0);
    // Node 2 cannot complete a handshake with the server: no HTTP request
    // reaches it from there, and node 2 has no key to verify with.
    let served = server.requests();
    let r = token_sign_in(&c.configs[&2].listen, &token).await;
    assert_eq!(code(&r.unwrap_err()), ErrorCode::ErrorUnauthenticated);
    assert_eq!(server.requests(), served, "a request got through an untrusted handshake");
    c.shutdown().await;
}
