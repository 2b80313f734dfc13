//! A shard leader dies during traffic, end to end: a sender keeps sending
//! through the gateway while the leader of the receivers' shard is stopped;
//! the push router re-subscribes at the new leader, the sessions resync,
//! and every receiver ends up with exactly the messages acknowledged to the
//! sender — in order, none missing, none twice.
#![allow(missing_docs)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rim_gateway::SessionConfig;
use rim_proto::ErrorCode;
use rim_proto::ids::UserId;
use rim_proto::v1::*;
use tokio::sync::watch;
use tokio::task::JoinHandle;

mod cluster;
mod e2e;
use cluster::{Cluster, Device, register, serial, wait_for};
use e2e::{Client, Gateway, Kind, Read, another_device, consecutive};

/// A receiving device whose pushes a task collects.
struct Receiver {
    name: &'static str,
    user: u64,
    seen: Arc<Mutex<Vec<Message>>>,
    task: JoinHandle<Client>,
}

impl Receiver {
    async fn start(
        gw: &Gateway,
        name: &'static str,
        kind: Kind,
        d: &Device,
        stop: watch::Receiver<bool>,
    ) -> Receiver {
        let (client, _) = gw.signed_in(kind, d).await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(collect(client, seen.clone(), stop));
        Receiver { name, user: d.user, seen, task }
    }

    fn cmids(&self) -> Vec<String> {
        self.seen.lock().unwrap().iter().map(|m| m.client_msg_id.clone()).collect()
    }
}

/// Reads pushes into `seen` until `stop`; heartbeats meanwhile. The
/// connection must stay open throughout.
async fn collect(mut client: Client, seen: Arc<Mutex<Vec<Message>>>, stop: watch::Receiver<bool>) -> Client {
    let mut heartbeat_at = Instant::now() + Duration::from_secs(5);
    while !*stop.borrow() {
        match client.read_raw(Instant::now() + Duration::from_millis(200)).await {
            Read::Packet(p) if e2e::is_push(&p) => seen.lock().unwrap().push(e2e::message_of(&p)),
            Read::Packet(p) => assert!(e2e::is_reply(&p), "{:?}: unexpected {p:?}", client.kind),
            Read::Closed(code) => panic!("{:?}: the receiver was closed ({code:?})", client.kind),
            Read::Timeout => {}
        }
        if Instant::now() >= heartbeat_at {
            client.send(Command::Heartbeat as i32, Vec::new()).await;
            heartbeat_at = Instant::now() + Duration::from_secs(5);
        }
    }
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_get_exactly_the_acked_messages_across_a_leader_failure() {
    let _g = serial().await;
    let mut c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let bob = register(&c, "bob").await;
    let bob2 = another_device(&c, "bob").await;
    let shard = c.shard_of_user(UserId(bob.user));
    let mut carol = None;
    for i in 0..32 {
        let d = register(&c, &format!("carol{i}")).await;
        if d.user != bob.user && c.shard_of_user(UserId(d.user)) == shard {
            carol = Some(d);
            break;
        }
    }
    let carol = carol.expect("a second user in bob's shard");
    let gw = Gateway::start(c.seeds(), SessionConfig::default()).await;

    // Receivers on both transports: bob's two devices and carol.
    let (stop, stopped) = watch::channel(false);
    let receivers = [
        Receiver::start(&gw, "bob over TCP", Kind::Tcp, &bob, stopped.clone()).await,
        Receiver::start(&gw, "bob over WebSocket", Kind::Ws, &bob2, stopped.clone()).await,
        Receiver::start(&gw, "carol over WebSocket", Kind::Ws, &carol, stopped.clone()).await,
    ];
    for user in [bob.user, carol.user] {
        wait_for(Duration::from_secs(20), || gw.router.is_subscribed(shard, UserId(user)).then_some(()))
            .await;
    }
    let (mut sender, _) = gw.signed_in(Kind::Tcp, &alice).await;

    // Sends alternate between bob and carol; each is retried with the same
    // client_msg_id until acknowledged.
    let mut acked: HashMap<u64, Vec<String>> = HashMap::new();
    let mut n = 0;
    let mut send = async |sender: &mut Client| {
        n += 1;
        let to = if n % 2 == 0 { carol.user } else { bob.user };
        let cmid = format!("m{n}");
        sender.send_text(to, &cmid).await;
        acked.entry(to).or_default().push(cmid);
    };
    for _ in 0..10 {
        send(&mut sender).await;
    }

    // Stop the shard's leader while sending goes on.
    let old = c.leader(shard).await;
    let old_addr = c.configs[&old].listen.clone();
    wait_for(Duration::from_secs(10), || (gw.router.stream_node(shard)? == old_addr).then_some(())).await;
    let subscriptions = gw.router.stats().subscriptions;
    let node = c.nodes.remove(&old).unwrap();
    let stopping = tokio::spawn(node.shutdown());
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut during, mut after) = (0, 0);
    while after < 10 {
        assert!(Instant::now() < deadline, "the router never re-subscribed at a new leader");
        send(&mut sender).await;
        if gw.router.stream_node(shard).is_some_and(|a| a != old_addr) {
            after += 1; // sent through the new stream (or after its resync)
        } else {
            during += 1;
        }
    }
    eprintln!("{during} messages acknowledged before the router re-subscribed");
    tokio::time::timeout(Duration::from_secs(30), stopping).await.expect("the node stopped").unwrap();
    let new = c.leader(shard).await;
    assert_ne!(new, old);
    assert!(gw.router.stats().subscriptions > subscriptions, "re-subscribed");
    assert!(gw.router.stats().stream_breaks >= 1);

    // Every receiver gets every acknowledged message by push alone: after
    // the break the sessions resync from their last seq.
    let want = |r: &Receiver| acked.get(&r.user).cloned().unwrap_or_default();
    for r in &receivers {
        let target = want(r);
        wait_for(Duration::from_secs(60), || (r.cmids().len() >= target.len()).then_some(())).await;
    }
    stop.send(true).unwrap();
    for r in receivers {
        let target = want(&r);
        let mut client = r.task.await.unwrap();
        let pushed = r.seen.lock().unwrap().clone();
        assert_eq!(consecutive(&pushed, 1), target, "{}: pushes are exactly what was acked", r.name);
        // Nothing more to sync after the last push, and the stored list is
        // the same.
        let rest = client.sync_all(pushed.len() as u64, 100).await;
        assert!(rest.is_empty(), "{}: missed {rest:?}", r.name);
        let stored = client.sync_all(0, 7).await;
        assert_eq!(consecutive(&stored, 1), target, "{}: the stored list", r.name);
        assert_eq!(client.heartbeat().await.code, ErrorCode::Ok as i32);
    }
    assert!(acked[&bob.user].len() >= 10 && acked[&carol.user].len() >= 10);
    gw.shutdown().await;
    c.shutdown().await;
}
