//! Accounts for the bench, made over a node's client gRPC listener:
//! users (`Register` + `SignIn`, each an argon2 hash or check, so slow) and
//! extra devices of those users (`RegisterDevice`, one Raft write each, so
//! cheap). Calls go round-robin over the given nodes; retryable errors
//! (no leader yet, not the leader, busy) are retried until a deadline.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, UserId};
use rim_proto::v1::auth_service_client::AuthServiceClient;
use rim_proto::v1::{
    DeviceInfo, RegisterDeviceRequest, RegisterRequest, SignInByPhoneRequest, SignInRequest,
};
use tonic::transport::Channel;

use super::progress::Progress;

/// Password of every bench user.
const PASSWORD: &str = "rim-bench-password";
/// How long one account operation may keep retrying.
const DEADLINE: Duration = Duration::from_secs(60);

/// A device's long-connection credentials.
#[derive(Debug, Clone)]
pub struct Cred {
    /// User id.
    pub user: UserId,
    /// Device id.
    pub device: DeviceId,
    /// Token for `SIGN_IN` and gRPC metadata.
    pub token: String,
}

/// gRPC channels to the nodes' client listeners.
pub struct Api {
    channels: Vec<Channel>,
    next: AtomicUsize,
}

impl Api {
    /// Lazy channels to `addrs` (host:port); every call has a 10 s timeout.
    pub fn new(addrs: &[String]) -> anyhow::Result<Arc<Api>> {
        let channels = addrs
            .iter()
            .map(|a| {
                Ok(tonic::transport::Endpoint::from_shared(format!("http://{a}"))?
                    .connect_timeout(Duration::from_secs(3))
                    .timeout(Duration::from_secs(10))
                    .connect_lazy())
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(!channels.is_empty(), "no node address");
        Ok(Arc::new(Api { channels, next: AtomicUsize::new(0) }))
    }

    fn auth(&self) -> AuthServiceClient<Channel> {
        AuthServiceClient::new(self.channel())
    }

    /// The next channel, round-robin.
    pub fn channel(&self) -> Channel {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        self.channels[i].clone()
    }
}

/// A run-unique username prefix (usernames must be new on a reused cluster).
pub fn run_prefix() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("b{:x}{:x}", t.as_secs() & 0xffffff, std::process::id() & 0xffff)
}

/// Runs `f` until it succeeds, retrying retryable errors until [`DEADLINE`].
async fn retry<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + DEADLINE;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match f(attempt).await {
            Ok(v) => return Ok(v),
            Err(s) => {
                let code = rim_proto::error::code_of_status(&s);
                if !code.is_retryable() || Instant::now() >= deadline {
                    bail!("{what}: {} ({})", code.as_str_name(), s.message());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Runs `job(i)` for `i in 0..n` on `concurrency` workers; the first error
/// stops everything. Results in index order.
async fn parallel<T, F, Fut>(n: usize, concurrency: usize, job: F) -> anyhow::Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<T>> + Send,
{
    let job = Arc::new(job);
    let next = Arc::new(AtomicUsize::new(0));
    let out: Arc<Mutex<Vec<Option<T>>>> = Arc::new(Mutex::new((0..n).map(|_| None).collect()));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.clamp(1, n.max(1)) {
        let (job, next, out) = (job.clone(), next.clone(), out.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                let v = job(i).await?;
                out.lock().unwrap_or_else(PoisonError::into_inner)[i] = Some(v);
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r.context("worker panicked")??;
    }
    let mut out = out.lock().unwrap_or_else(PoisonError::into_inner);
    out.iter_mut().map(|v| v.take().context("a job did not finish")).collect()
}

/// Registers `n` users `<prefix>_<i>` and signs each in with a new device.
pub async fn users(api: &Arc<Api>, prefix: &str, n: usize, concurrency: usize) -> anyhow::Result<Vec<Cred>> {
    let done = Arc::new(AtomicUsize::new(0));
    let d = done.clone();
    let progress =
        Progress::start("users", move |_| format!("registered {}/{n} users", d.load(Ordering::Relaxed)));
    let (api, prefix) = (api.clone(), prefix.to_string());
    let r = parallel(n, concurrency, move |i| {
        let (api, done, username) = (api.clone(), done.clone(), format!("{prefix}_{i}"));
        async move {
            retry(&format!("register {username}"), |attempt| {
                let mut auth = api.auth();
                let req = RegisterRequest {
                    username: username.clone(),
                    password: PASSWORD.into(),
                    ..Default::default()
                };
                async move {
                    match auth.register(req).await {
                        Ok(_) => Ok(()),
                        // A retry finding the name taken: the first attempt went through.
                        Err(s)
                            if attempt > 1
                                && rim_proto::error::code_of_status(&s) == ErrorCode::ErrorAlreadyExists =>
                        {
                            Ok(())
                        }
                        Err(s) => Err(s),
                    }
                }
            })
            .await?;
            let r = retry(&format!("sign in {username}"), |_| {
                let mut auth = api.auth();
                let req = SignInRequest {
                    username: username.clone(),
                    password: PASSWORD.into(),
                    ..Default::default()
                };
                async move { auth.sign_in(req).await.map(tonic::Response::into_inner) }
            })
            .await?;
            done.fetch_add(1, Ordering::Relaxed);
            Ok(Cred { user: UserId(r.user_id), device: DeviceId(r.device_id), token: r.token })
        }
    })
    .await;
    progress.finish().await;
    r
}

/// Signs in `n` users `+<prefix digits><i>` by phone with the cluster's
/// development code (no password hashing, so ~100× cheaper than
/// [`users`]: what the large fan-out scenarios use).
pub async fn phone_users(
    api: &Arc<Api>,
    code: &str,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Cred>> {
    let done = Arc::new(AtomicUsize::new(0));
    let d = done.clone();
    let progress = Progress::start("users", move |elapsed| {
        let k = d.load(Ordering::Relaxed);
        format!("signed in {k}/{n} users by phone ({:.0}/s)", k as f64 / elapsed.as_secs_f64().max(1e-3))
    });
    // A run-unique number block: phones must be new on a reused cluster.
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let block = (t.as_secs() % 100_000) * 1_000_000 + u64::from(std::process::id() % 10) * 100_000;
    let (api, code) = (api.clone(), code.to_string());
    let r = parallel(n, concurrency, move |i| {
        let (api, done, code) = (api.clone(), done.clone(), code.clone());
        let phone = format!("+9{:011}", block + i as u64);
        async move {
            let r = retry(&format!("sign in {phone}"), |_| {
                let mut auth = api.auth();
                let req =
                    SignInByPhoneRequest { phone: phone.clone(), code: code.clone(), ..Default::default() };
                async move { auth.sign_in_by_phone(req).await.map(tonic::Response::into_inner) }
            })
            .await?;
            done.fetch_add(1, Ordering::Relaxed);
            Ok(Cred { user: UserId(r.user_id), device: DeviceId(r.device_id), token: r.token })
        }
    })
    .await;
    progress.finish().await;
    r
}

/// Registers `extra[u]` more devices of `owners[u]`; returns every owner's
/// devices, its first one (the owner's) included.
pub async fn devices(
    api: &Arc<Api>,
    owners: &[Cred],
    extra: &[usize],
    concurrency: usize,
) -> anyhow::Result<Vec<Vec<Cred>>> {
    // Job k registers a device of owner jobs[k]; owners interleave so the load spreads over shards.
    let mut jobs = Vec::new();
    let most = extra.iter().copied().max().unwrap_or(0);
    for round in 0..most {
        jobs.extend((0..owners.len()).filter(|u| extra[*u] > round));
    }
    let total = jobs.len();
    let done = Arc::new(AtomicUsize::new(0));
    let d = done.clone();
    let progress = Progress::start("devices", move |elapsed| {
        let n = d.load(Ordering::Relaxed);
        format!("registered {n}/{total} devices ({:.0}/s)", n as f64 / elapsed.as_secs_f64().max(1e-3))
    });
    let (api, shared_owners, jobs) = (api.clone(), Arc::new(owners.to_vec()), Arc::new(jobs));
    let r = parallel(total, concurrency, move |k| {
        let (api, owner, done) = (api.clone(), shared_owners[jobs[k]].clone(), done.clone());
        async move {
            let r = retry("register device", |_| {
                let mut auth = api.auth();
                let mut req = tonic::Request::new(RegisterDeviceRequest {
                    device: Some(DeviceInfo { model: "rim-bench".into(), ..Default::default() }),
                });
                let md = req.metadata_mut();
                md.insert(rim_proto::metadata::USER_ID_METADATA_KEY, owner.user.0.into());
                md.insert(rim_proto::metadata::DEVICE_ID_METADATA_KEY, owner.device.0.into());
                let token = owner.token.parse();
                async move {
                    req.metadata_mut().insert(
                        rim_proto::metadata::TOKEN_METADATA_KEY,
                        token.map_err(|_| tonic::Status::internal("bad token"))?,
                    );
                    auth.register_device(req).await.map(tonic::Response::into_inner)
                }
            })
            .await?;
            done.fetch_add(1, Ordering::Relaxed);
            Ok(Cred { user: owner.user, device: DeviceId(r.device_id), token: r.token })
        }
    })
    .await;
    progress.finish().await;
    let mut out: Vec<Vec<Cred>> = owners.iter().map(|o| vec![o.clone()]).collect();
    let by_user: std::collections::HashMap<UserId, usize> =
        owners.iter().enumerate().map(|(i, o)| (o.user, i)).collect();
    for c in r? {
        out[by_user[&c.user]].push(c);
    }
    Ok(out)
}
