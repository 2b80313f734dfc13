//! gim's way of plugging an app in (issue 15 §1): a node with
//! `[auth_callback]` asks the app's `business.UserIntService.Auth` about a
//! sign-in token it cannot verify itself. Tested against a test app that
//! counts calls and can refuse, hold, or be down: accepted (through a
//! gateway), cached (no second call), refused (never cached), called again
//! after the cache's TTL, a slow app refused within the timeout, a full
//! set of outstanding calls refused busy without a call, an app that is
//! down refused.
#![allow(missing_docs)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rim_node::auth_callback::AuthCallbackConfig;
use rim_proto::ErrorCode;
use rim_proto::gim_business::AuthRequest;
use rim_proto::gim_business::user_int_service_server::{UserIntService, UserIntServiceServer};
use rim_proto::v1::*;
use rim_testkit::cluster::Cluster;
use rim_testkit::grpc::code;
use rim_testkit::wait::{WAIT, eventually, serial, wait_for};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

mod app_auth;
use app_auth::{conn_sign_in, gateway_sign_in_with, list_devices};

/// The app's side: its valid tokens, the calls it got, and a gate that
/// holds calls while closed.
#[derive(Default)]
struct AppState {
    tokens: Mutex<HashMap<(u64, u64), String>>,
    calls: AtomicU64,
    in_progress: AtomicU64,
    open: Option<watch::Sender<bool>>,
}

#[derive(Clone)]
struct AppSvc(Arc<AppState>);

struct InProgress<'a>(&'a AtomicU64);

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tonic::async_trait]
impl UserIntService for AppSvc {
    async fn auth(&self, req: Request<AuthRequest>) -> Result<Response<()>, Status> {
        let s = &self.0;
        s.calls.fetch_add(1, Ordering::SeqCst);
        s.in_progress.fetch_add(1, Ordering::SeqCst);
        let _guard = InProgress(&s.in_progress);
        let mut open = s.open.as_ref().unwrap().subscribe();
        let _ = open.wait_for(|o| *o).await;
        let r = req.into_inner();
        let valid = s.tokens.lock().unwrap().get(&(r.user_id, r.device_id)) == Some(&r.token);
        // gim's business answers a bad token with its code 10000.
        if valid { Ok(Response::new(())) } else { Err(Status::new(tonic::Code::from(10000), "unauthorized")) }
    }
}

struct App {
    state: Arc<AppState>,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    async fn start() -> App {
        App::start_with(None).await
    }

    async fn start_with(tls: Option<tonic::transport::ServerTlsConfig>) -> App {
        let state = Arc::new(AppState { open: Some(watch::Sender::new(true)), ..AppState::default() });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = watch::Sender::new(false);
        let mut stopped = stop.subscribe();
        let svc = UserIntServiceServer::new(AppSvc(state.clone()));
        let task = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let mut builder = tonic::transport::Server::builder();
            if let Some(tls) = tls {
                builder = builder.tls_config(tls).unwrap();
            }
            let _ = builder
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await;
        });
        App { state, addr, stop, task }
    }

    fn issue(&self, user: u64, device: u64, token: &str) {
        self.state.tokens.lock().unwrap().insert((user, device), token.into());
    }

    fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::SeqCst)
    }

    fn hold(&self, held: bool) {
        self.state.open.as_ref().unwrap().send_replace(!held);
    }

    async fn stop(self) {
        self.hold(false);
        self.stop.send_replace(true);
        tokio::time::timeout(WAIT, self.task).await.expect("the app stops").unwrap();
    }
}

const TIMEOUT_MS: u64 = 2_000;
const CACHE_SECS: u64 = 2;

fn input(user: u64, device: u64, token: &str) -> SignInInput {
    SignInInput { user_id: user, device_id: device, token: token.into() }
}

fn reply_code(r: &Reply) -> ErrorCode {
    ErrorCode::try_from(r.code).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_callback_signs_in_caches_oks_and_fails_closed() {
    let _g = serial().await;
    let app = App::start().await;
    let callback = AuthCallbackConfig {
        url: format!("http://{}", app.addr),
        timeout_ms: TIMEOUT_MS,
        cache_secs: CACHE_SECS,
        max_in_flight: 2,
        ..AuthCallbackConfig::default()
    };
    let c = Cluster::start_with(1, 1, move |cfg| cfg.auth_callback = callback.clone()).await;
    let gw = c.gateway("callback").await;
    let addr = gw.tcp_addr().unwrap();
    let listen = c.configs[&1].listen.clone();

    // The app's user 42 on its device 7 signs in through a gateway with the
    // app's token: one call; rim's user and device are created.
    app.issue(42, 7, "gim-token-42-7");
    let signed = |r: Reply| -> SignInOutput {
        assert_eq!(reply_code(&r), ErrorCode::Ok, "sign-in refused: {}", r.message);
        prost::Message::decode(r.data).unwrap()
    };
    let sign_in_42 = || async { gateway_sign_in_with(addr, input(42, 7, "gim-token-42-7")).await };
    // (No OK can be cached before this instant.)
    let before_first = Instant::now();
    let first = signed(sign_in_42().await);
    assert_eq!(app.calls(), 1);
    assert!(first.user_id != 0 && first.device_id != 0);

    // Again within the cache's TTL: no call, the same user and device.
    let again = signed(sign_in_42().await);
    assert_eq!((again.user_id, again.device_id), (first.user_id, first.device_id));
    assert_eq!(app.calls(), 1, "a cached OK called the app");
    // Another device of the same app user: the same rim user.
    app.issue(42, 8, "gim-token-42-8");
    let laptop = signed(gateway_sign_in_with(addr, input(42, 8, "gim-token-42-8")).await);
    assert_eq!(laptop.user_id, first.user_id);
    assert_ne!(laptop.device_id, first.device_id);
    assert_eq!(app.calls(), 2);

    // gim's client metadata (the app's user_id, device_id and token)
    // authenticates client API calls too: the caller is the mapped user.
    let client = c.configs[&1].client_listen.clone();
    let gim = [("user_id", "42"), ("device_id", "7"), ("token", "gim-token-42-7")];
    let devices = list_devices(&client, &gim).await.unwrap();
    assert!(devices.iter().all(|d| d.user_id == first.user_id), "{devices:?}");
    assert_eq!(devices.len(), 2, "{devices:?}");
    let calls = app.calls();
    let wrong = [("user_id", "42"), ("device_id", "7"), ("token", "stolen")];
    assert_eq!(code(&list_devices(&client, &wrong).await.unwrap_err()), ErrorCode::ErrorUnauthenticated);
    assert_eq!(app.calls(), calls + 1);

    // A wrong token is refused, every time with a call (never cached).
    for _ in 0..2 {
        let calls = app.calls();
        let r = conn_sign_in(&listen, input(42, 7, "stolen")).await;
        assert_eq!(code(&r.unwrap_err()), ErrorCode::ErrorUnauthenticated);
        assert_eq!(app.calls(), calls + 1);
    }
    // Missing app ids are refused without a call.
    let calls = app.calls();
    let r = conn_sign_in(&listen, input(0, 7, "gim-token-42-7")).await;
    assert_eq!(code(&r.unwrap_err()), ErrorCode::ErrorInvalidId);
    assert_eq!(app.calls(), calls);

    // After the TTL the app is asked again.
    let before = app.calls();
    eventually(WAIT, "a sign-in after the TTL calls the app", || async {
        signed(sign_in_42().await);
        (app.calls() > before).then_some(())
    })
    .await;
    assert!(before_first.elapsed() >= Duration::from_secs(CACHE_SECS), "the OK was forgotten early");

    // The app holds its answers: a sign-in is refused (unavailable:
    // retryable) within the timeout and a margin.
    app.hold(true);
    let started = Instant::now();
    let r = conn_sign_in(&listen, input(42, 9, "uncached-1")).await;
    assert_eq!(code(&r.unwrap_err()), ErrorCode::ErrorUnavailable);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(TIMEOUT_MS) - Duration::from_millis(100), "{took:?}");
    assert!(took < Duration::from_millis(TIMEOUT_MS + 1_500), "{took:?}");

    // Two calls outstanding (max_in_flight): a third sign-in is refused
    // busy at once, without a call.
    let held: Vec<_> = (0..2)
        .map(|i| {
            let listen = listen.clone();
            tokio::spawn(async move { conn_sign_in(&listen, input(42, 10 + i, "uncached-2")).await })
        })
        .collect();
    wait_for(WAIT, "two calls held by the app", || {
        (app.state.in_progress.load(Ordering::SeqCst) == 2).then_some(())
    })
    .await;
    let calls = app.calls();
    let r = conn_sign_in(&listen, input(42, 12, "uncached-3")).await;
    assert_eq!(code(&r.unwrap_err()), ErrorCode::ErrorBusy);
    assert_eq!(app.calls(), calls, "a busy refusal called the app");
    for h in held {
        assert_eq!(code(&h.await.unwrap().unwrap_err()), ErrorCode::ErrorUnavailable);
    }
    app.hold(false);

    // The app is down: refused (fail closed), promptly.
    app.stop().await;
    let started = Instant::now();
    let r = conn_sign_in(&listen, input(42, 13, "uncached-4")).await;
    assert_eq!(code(&r.unwrap_err()), ErrorCode::ErrorUnavailable);
    assert!(started.elapsed() < Duration::from_millis(TIMEOUT_MS + 1_500), "{:?}", started.elapsed());

    gw.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callback_over_tls_trusts_its_ca() {
    let _g = serial().await;
    let pki = rim_testkit::tls::TestPki::new();
    let app = App::start_with(Some(pki.link(false).server(false).unwrap())).await;
    app.issue(5, 6, "gim-token-5-6");
    let (ca, other_ca, port) = (pki.ca.clone(), pki.other_ca.clone(), app.addr.port());
    // Node 1 trusts the app's CA; node 2 another one.
    let c = Cluster::start_with(2, 1, move |cfg| {
        cfg.auth_callback = AuthCallbackConfig {
            url: format!("https://127.0.0.1:{port}"),
            ca: Some(if cfg.id == 1 { ca.clone() } else { other_ca.clone() }),
            ..AuthCallbackConfig::default()
        };
    })
    .await;
    let ok = conn_sign_in(&c.configs[&1].listen, input(5, 6, "gim-token-5-6")).await.unwrap();
    assert!(ok.output.unwrap().user_id != 0);
    assert_eq!(app.calls(), 1);
    let r = conn_sign_in(&c.configs[&2].listen, input(5, 6, "gim-token-5-6")).await;
    assert_eq!(code(&r.unwrap_err()), ErrorCode::ErrorUnavailable, "an untrusted app must not be asked");
    assert_eq!(app.calls(), 1);
    c.shutdown().await;
    app.stop().await;
}
