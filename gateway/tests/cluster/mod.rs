//! The gateway tests' view of the shared harness (`rim_testkit`): its
//! in-process cluster, lock and deadline loop, plus [`Device`], a
//! registered device as the raw ids these tests put into packets.
#![allow(dead_code, missing_docs, unused_imports)]

use std::time::Duration;

use rim_proto::v1::auth_service_client::AuthServiceClient;
use rim_proto::v1::*;

pub use rim_testkit::cluster::Cluster;
pub use rim_testkit::free_addr_string as free_addr;
pub use rim_testkit::grpc::SECRET;
pub use rim_testkit::wait::serial;

/// Polls `f` until it returns `Some`, or panics after `timeout`.
pub async fn wait_for<T>(timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    rim_testkit::wait::wait_for(timeout, "condition", f).await
}

/// A registered, signed-in device.
#[derive(Debug, Clone)]
pub struct Device {
    pub user: u64,
    pub device: u64,
    pub token: String,
}

pub async fn register(c: &Cluster, name: &str) -> Device {
    let addr = &c.configs.values().next().unwrap().client_listen;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    let mut auth = AuthServiceClient::new(ch);
    let req = RegisterRequest { username: name.into(), password: "secret-pw".into(), ..Default::default() };
    auth.register(req).await.unwrap();
    let req = SignInRequest { username: name.into(), password: "secret-pw".into(), ..Default::default() };
    let r = auth.sign_in(req).await.unwrap().into_inner();
    Device { user: r.user_id, device: r.device_id, token: r.token }
}

/// Signs `name` in again through the auth service: a new device of the
/// same user.
pub async fn new_device(c: &Cluster, name: &str) -> Device {
    let addr = &c.configs.values().next().unwrap().client_listen;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    let mut auth = AuthServiceClient::new(ch);
    let req = SignInRequest { username: name.into(), password: "secret-pw".into(), ..Default::default() };
    let r = auth.sign_in(req).await.unwrap().into_inner();
    Device { user: r.user_id, device: r.device_id, token: r.token }
}
