//! `rim bench fanout`: one group of `--members` users, `--online` of them
//! connected to the gateway over TCP; the owner sends `--messages` group
//! messages at `--rate` per second (open loop, at most `--max-inflight`
//! unanswered), and every online member's connection counts the pushes.
//!
//! * `--kind small`: write diffusion; every message is relayed into each
//!   member's own list and pushed from there.
//! * `--kind super`: read diffusion; the message is stored once in the
//!   group's list; online members subscribed to the group
//!   (`SUBSCRIBE_ROOM` with the group id, live only) are pushed to through
//!   the gateways' group subscriptions.
//!
//! Figures: group send → ack latency and send throughput; send →
//! delivered latency over every (message, online member other than the
//! sender) pair and the delivery rate (deliveries per second from the
//! first send to the last delivery); deliveries still missing after
//! `--drain`. Users are made by phone sign-in with the cluster's
//! development code (`--spawn` sets one; otherwise pass `--dev-code`), so
//! 10,000 members take seconds, not the minutes of argon2 registrations.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use rim_proto::ids::{GroupId, UserId};
use rim_proto::v1::group_service_client::GroupServiceClient;
use rim_proto::v1::{
    AddGroupMembersRequest, Command, ConversationKind, CreateGroupRequest, GroupKind, SendInput,
    SubscribeRoomInput,
};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::Outcome;
use super::accounts::{self, Api, Cred};
use super::connections::latency_json;
use super::hist::Histogram;
use super::json::Json;
use super::progress::{Progress, Tally, code_name};
use super::sys;
use super::target::{Target, TargetArgs};
use super::wire::{self, Connected, Reader, connect_all, heartbeat};

/// Most members one CreateGroup / AddGroupMembers call carries.
const MEMBERS_PER_CALL: usize = 1_000;

/// Storage model of the benchmarked group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// Write diffusion (copied into every member's list).
    Small,
    /// Read diffusion (one group list, pushed through subscriptions).
    Super,
}

/// Flags of `rim bench fanout`.
#[derive(Args, Debug)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Result file (default bench-fanout.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Group kind.
    #[arg(long, value_enum, default_value_t = Kind::Small)]
    kind: Kind,
    /// Group members, the sender included.
    #[arg(long, default_value_t = 100)]
    members: usize,
    /// Members connected to the gateway (default: all, at most 1,000).
    #[arg(long)]
    online: Option<usize>,
    /// Group messages to send.
    #[arg(long, default_value_t = 200)]
    messages: u64,
    /// Target send rate, group messages per second.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// Most unanswered sends.
    #[arg(long, default_value_t = 32)]
    max_inflight: u64,
    /// Longest wait for outstanding acks and deliveries after the last send.
    #[arg(long, default_value = "30s", value_parser = sys::parse_duration)]
    drain: Duration,
    /// Concurrent account and connection set-up calls.
    #[arg(long, default_value_t = 32)]
    setup_concurrency: usize,
}

/// State shared by the run's tasks.
struct Run {
    epoch: Instant,
    sent: AtomicU64,
    acked: AtomicU64,
    inflight: AtomicU64,
    delivered: AtomicU64,
    /// µs since `epoch` of the newest delivery.
    last_delivery: AtomicU64,
    unexpected: AtomicU64,
    errors: Tally,
    ack: Mutex<Histogram>,
    delivery: Mutex<Histogram>,
}

impl Run {
    fn now_us(&self) -> u64 {
        Instant::now().saturating_duration_since(self.epoch).as_micros() as u64
    }
}

fn lock(h: &Mutex<Histogram>) -> std::sync::MutexGuard<'_, Histogram> {
    h.lock().unwrap_or_else(PoisonError::into_inner)
}

fn authed<T>(c: &Cred, msg: T) -> anyhow::Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(Duration::from_secs(30));
    let md = r.metadata_mut();
    md.insert(rim_proto::metadata::USER_ID_METADATA_KEY, c.user.0.into());
    md.insert(rim_proto::metadata::DEVICE_ID_METADATA_KEY, c.device.0.into());
    md.insert(
        rim_proto::metadata::TOKEN_METADATA_KEY,
        c.token.parse().context("token is not valid metadata")?,
    );
    Ok(r)
}

/// Creates the group: the owner and up to 999 members, then the rest in
/// batches. Returns the group id.
async fn create_group(api: &Api, kind: Kind, users: &[Cred]) -> anyhow::Result<u64> {
    let owner = &users[0];
    let ids: Vec<u64> = users[1..].iter().map(|c| c.user.0).collect();
    let (first, rest) = ids.split_at(ids.len().min(MEMBERS_PER_CALL - 1));
    let req = CreateGroupRequest {
        kind: match kind {
            Kind::Small => GroupKind::Small,
            Kind::Super => GroupKind::Super,
        } as i32,
        name: "rim bench fanout".into(),
        member_ids: first.to_vec(),
        ..Default::default()
    };
    let group = GroupServiceClient::new(api.channel())
        .create_group(authed(owner, req)?)
        .await
        .context("CreateGroup")?
        .into_inner()
        .group
        .context("CreateGroup returned no group")?;
    for chunk in rest.chunks(MEMBERS_PER_CALL) {
        let req = AddGroupMembersRequest { group_id: group.group_id, user_ids: chunk.to_vec() };
        GroupServiceClient::new(api.channel())
            .add_group_members(authed(owner, req)?)
            .await
            .context("AddGroupMembers")?;
    }
    Ok(group.group_id)
}

/// `SEND_GROUP` content: a text message to a group.
fn send_group_input(kind: Kind, group: u64, client_msg_id: &str, text: &[u8]) -> SendInput {
    let kind = match kind {
        Kind::Small => ConversationKind::Group,
        Kind::Super => ConversationKind::SuperGroup,
    };
    wire::send_group_input(kind, GroupId(group), client_msg_id, text)
}

/// Runs the scenario.
pub async fn run(args: &FanoutArgs, target: &Target) -> anyhow::Result<Outcome> {
    anyhow::ensure!(args.members >= 2, "--members must be at least 2");
    let online = args.online.unwrap_or(args.members.min(1_000));
    anyhow::ensure!((2..=args.members).contains(&online), "--online must be in 2..=members");
    anyhow::ensure!(args.rate > 0.0 && args.rate.is_finite(), "--rate must be positive");
    anyhow::ensure!(args.messages >= 1, "--messages must be at least 1");
    let code = target.dev_code.as_deref().context("fanout needs the cluster's --dev-code (or --spawn)")?;
    sys::check_nofile(online as u64 + 256, &format!("{online} connections"))?;

    let api = Api::new(&target.apis)?;
    let t_setup = Instant::now();
    let users = accounts::phone_users(&api, code, args.members, args.setup_concurrency).await?;
    let group = create_group(&api, args.kind, &users).await?;
    eprintln!(
        "rim bench: group {group} ({:?}, {} members) ready in {:.1}s",
        args.kind,
        args.members,
        t_setup.elapsed().as_secs_f64()
    );
    let mut conns = connect_all(target.gateway, &users[..online]).await?;
    if args.kind == Kind::Super {
        conns = subscribe_all(conns, group).await?;
    }
    let setup_s = t_setup.elapsed().as_secs_f64();

    let run = Arc::new(Run {
        epoch: Instant::now(),
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        inflight: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        last_delivery: AtomicU64::new(0),
        unexpected: AtomicU64::new(0),
        errors: Tally::default(),
        ack: Mutex::new(Histogram::default()),
        delivery: Mutex::new(Histogram::default()),
    });
    let sender_user = users[0].user;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut readers = JoinSet::new();
    let mut beats = JoinSet::new();
    let mut sender_wr = None;
    for c in conns.into_iter() {
        let (rd, wr) = c.stream.into_split();
        readers.spawn(read_member(rd, c.reader, c.user == sender_user, sender_user, run.clone()));
        if c.user == sender_user {
            sender_wr = Some(wr);
        } else {
            beats.spawn(heartbeat(wr, c.heartbeat, stop_rx.clone()));
        }
    }
    let mut wr = sender_wr.context("the sender is not connected")?;
    let expected_per_message = (online - 1) as u64;
    let progress = {
        let run = run.clone();
        let total = args.messages;
        Progress::start("fanout", move |elapsed| {
            let d = lock(&run.delivery);
            format!(
                "sent {}/{total}, acked {}, delivered {} ({:.0}/s), delivery p50/p99 {:.1}/{:.1} ms, errors {}",
                run.sent.load(Ordering::Relaxed),
                run.acked.load(Ordering::Relaxed),
                run.delivered.load(Ordering::Relaxed),
                run.delivered.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64().max(1e-3),
                d.quantile(0.5) as f64 / 1000.0,
                d.quantile(0.99) as f64 / 1000.0,
                run.errors.total(),
            )
        })
    };

    // Sending, open loop.
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let mut tick = tokio::time::interval(period);
    let mut n = 0;
    let mut last = 0;
    while n < args.messages {
        tick.tick().await;
        if run.inflight.load(Ordering::Relaxed) >= args.max_inflight {
            continue;
        }
        let t = run.now_us().max(last + 1);
        last = t;
        n += 1;
        let input =
            send_group_input(args.kind, group, &format!("f{t}-{n}"), format!("{t} fanout").as_bytes());
        run.inflight.fetch_add(1, Ordering::Relaxed);
        let frame = wire::request_frame(t, Command::SendGroup, &input);
        if !matches!(tokio::time::timeout(Duration::from_secs(5), wr.write_all(&frame)).await, Ok(Ok(()))) {
            run.errors.add("send: write failed");
            break;
        }
        run.sent.fetch_add(1, Ordering::Relaxed);
    }
    let send_s = run.now_us() as f64 / 1e6;

    // Drain.
    let drain_start = Instant::now();
    while drain_start.elapsed() < args.drain
        && (run.inflight.load(Ordering::Relaxed) > 0
            || run.delivered.load(Ordering::Relaxed)
                < run.acked.load(Ordering::Relaxed) * expected_per_message)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    readers.abort_all();
    while tokio::time::timeout(Duration::from_secs(5), readers.join_next()).await.is_ok_and(|r| r.is_some()) {
    }
    while tokio::time::timeout(Duration::from_secs(5), beats.join_next()).await.is_ok_and(|r| r.is_some()) {}
    drop(wr);
    progress.finish().await;

    let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let (ack, delivery) = (lock(&run.ack).clone(), lock(&run.delivery).clone());
    let expected = v(&run.acked) * expected_per_message;
    let missing = expected.saturating_sub(v(&run.delivered));
    let delivery_window_s = (v(&run.last_delivery) as f64 / 1e6).max(1e-3);
    let delivery_rate = v(&run.delivered) as f64 / delivery_window_s;
    let results = Json::obj()
        .with("group_id", group)
        .with("setup_seconds", setup_s)
        .with("sent", v(&run.sent))
        .with("acked_ok", v(&run.acked))
        .with("send_seconds", send_s)
        .with("send_throughput_per_second", v(&run.acked) as f64 / send_s.max(1e-3))
        .with("deliveries_expected", expected)
        .with("delivered", v(&run.delivered))
        .with("missing_after_drain", missing)
        .with("deliveries_per_second", delivery_rate)
        .with("send_to_ack_ms", latency_json(&ack))
        .with("send_to_delivered_ms", latency_json(&delivery))
        .with("unexpected_pushes", v(&run.unexpected))
        .with("errors", run.errors.to_json())
        .with("errors_total", run.errors.total());
    let params = Json::obj()
        .with("kind", format!("{:?}", args.kind).to_lowercase())
        .with("members", args.members)
        .with("online", online)
        .with("messages", args.messages)
        .with("target_rate_per_second", args.rate)
        .with("max_inflight", args.max_inflight)
        .with("drain_timeout_seconds", args.drain.as_secs_f64());
    let ms = |h: &Histogram, q: f64| h.quantile(q) as f64 / 1000.0;
    let summary = format!(
        "fanout {:?}: {} members, {online} online; {} sends acked ({:.0}/s), ack p50 {:.1} p99 {:.1} ms; \
         {} deliveries ({:.0}/s), delivered p50 {:.1} p99 {:.1} max {:.1} ms; missing {missing}, errors {}",
        args.kind,
        args.members,
        v(&run.acked),
        v(&run.acked) as f64 / send_s.max(1e-3),
        ms(&ack, 0.5),
        ms(&ack, 0.99),
        v(&run.delivered),
        delivery_rate,
        ms(&delivery, 0.5),
        ms(&delivery, 0.99),
        delivery.max() as f64 / 1000.0,
        run.errors.total(),
    );
    Ok(Outcome { params, results, summary })
}

/// Subscribes every connection to the super group (live only), 64 at a
/// time, and waits for each reply.
async fn subscribe_all(conns: Vec<Connected>, group: u64) -> anyhow::Result<Vec<Connected>> {
    let total = conns.len();
    let done = Arc::new(AtomicU64::new(0));
    let d = done.clone();
    let progress = Progress::start("subscribe", move |_| {
        format!("subscribed {}/{total} connections to the group", d.load(Ordering::Relaxed))
    });
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = JoinSet::new();
    for (i, mut c) in conns.into_iter().enumerate() {
        let (sem, done) = (sem.clone(), done.clone());
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let input = SubscribeRoomInput { room_id: group, after_seq: 0 };
            let frame = wire::request_frame(2, Command::SubscribeRoom, &input);
            let io = async {
                c.stream.write_all(&frame).await?;
                loop {
                    let Some(p) = c.reader.next(&mut c.stream).await? else {
                        anyhow::bail!("closed by the gateway")
                    };
                    if p.request_id == 2 && p.command == Command::SubscribeRoom as i32 {
                        return wire::reply(&p.content);
                    }
                }
            };
            let r = tokio::time::timeout(Duration::from_secs(15), io)
                .await
                .context("no SUBSCRIBE_ROOM reply within 15 s")??;
            anyhow::ensure!(
                r.code == 0,
                "SUBSCRIBE_ROOM of user {}: {} {}",
                c.user,
                code_name(r.code),
                r.message
            );
            done.fetch_add(1, Ordering::Relaxed);
            anyhow::Ok((i, c))
        });
    }
    let mut out: Vec<Option<Connected>> = (0..total).map(|_| None).collect();
    while let Some(r) = tasks.join_next().await {
        let (i, c) = r.context("subscribe task panicked")??;
        out[i] = Some(c);
    }
    progress.finish().await;
    out.into_iter().map(|c| c.context("missing connection")).collect()
}

/// Reads one member's connection: `MESSAGE` pushes of the sender's group
/// messages (delivery latency), and on the sender's own connection the
/// `SEND_GROUP` replies (ack latency).
async fn read_member(
    mut rd: OwnedReadHalf,
    mut reader: Reader,
    is_sender: bool,
    sender: UserId,
    run: Arc<Run>,
) {
    loop {
        let p = match reader.next(&mut rd).await {
            Ok(Some(p)) => p,
            Ok(None) => return run.errors.add("connection closed by the gateway"),
            Err(e) => {
                return run
                    .errors
                    .add(format!("connection: {}", e.to_string().chars().take(60).collect::<String>()));
            }
        };
        let now = run.now_us();
        if p.command == Command::SendGroup as i32 && p.request_id != 0 {
            run.inflight.fetch_sub(1, Ordering::Relaxed);
            match wire::reply(&p.content) {
                Ok(r) if r.code == 0 => {
                    run.acked.fetch_add(1, Ordering::Relaxed);
                    lock(&run.ack).record(now.saturating_sub(p.request_id));
                }
                Ok(r) => run.errors.add(format!("send: {}", code_name(r.code))),
                Err(_) => run.errors.add("send: malformed reply"),
            }
        } else if p.command == Command::Kick as i32 {
            run.errors.add(format!("kicked: {}", code_name(wire::kick_code(&p.content))));
        } else if p.command == Command::Message as i32 && !is_sender {
            let sent_at = wire::stamp_from(&p.content, sender);
            match sent_at {
                Some(t) => {
                    run.delivered.fetch_add(1, Ordering::Relaxed);
                    run.last_delivery.fetch_max(now, Ordering::Relaxed);
                    lock(&run.delivery).record(now.saturating_sub(t));
                }
                None => {
                    run.unexpected.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}
