//! The README's first command end to end: `rim dev` (3 nodes and a gateway
//! in one process) and two `rim chat` terminals talking through it; and
//! stateless gateways as separate processes: a client survives the loss of
//! its gateway by reconnecting to another one, and nothing is lost.

mod support;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rim_client::{Client, ClientConfig, Credentials, Endpoint, Event, NodeApi};
use rim_proto::v1::ContentType;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};

/// A child process whose stdout lines are collected as they come.
struct Terminal {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<String>>>,
    name: String,
}

impl Terminal {
    fn spawn(name: &str, args: &[String]) -> Terminal {
        let mut cmd = tokio::process::Command::from(rim_command());
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn rim");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let label = name.to_string();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                eprintln!("[{label}] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        Terminal { child, stdin, lines, name: name.to_string() }
    }

    /// Waits for an output line containing `needle`; returns it.
    async fn expect(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.lines.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{} printed no line with {needle:?} within {timeout:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The `rim chat` commands `rim dev` printed, as argument lists.
    fn chat_commands(&self) -> Vec<Vec<String>> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter(|l| l.contains(" chat --"))
            .map(|l| l.split_whitespace().skip(1).map(String::from).collect())
            .collect()
    }

    async fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(format!("{line}\n").as_bytes()).await.expect("write to stdin");
        stdin.flush().await.expect("flush stdin");
    }

    /// Sends SIGINT (Ctrl-C) and waits for a clean exit.
    async fn interrupt(mut self, timeout: Duration) {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY-free: `kill` from the shell, the test crate forbids unsafe.
        let status =
            std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status().expect("kill");
        assert!(status.success());
        let exit = tokio::time::timeout(timeout, self.child.wait()).await;
        let exit = exit.unwrap_or_else(|_| panic!("{} did not stop within {timeout:?} of Ctrl-C", self.name));
        assert!(exit.expect("wait").success(), "{} exited with an error after Ctrl-C", self.name);
    }
}

/// A base port whose `rim dev` ports (offsets 1 to 302) are all free now and
/// outside the kernel's ephemeral range, so no outgoing connection can take one
/// before `rim dev` binds it (see `rim_testkit`).
fn free_base_port() -> u16 {
    rim_testkit::free_ports(303)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rim_dev_and_two_chat_terminals() {
    let _g = serial().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let base = free_base_port();
    let dev_args: Vec<String> = ["dev", "--base-port", &base.to_string(), "--data"]
        .iter()
        .map(|s| s.to_string())
        .chain([dir.path().join("rim-data").display().to_string()])
        .collect();
    let dev = Terminal::spawn("dev", &dev_args);
    dev.expect("Ctrl-C stops the cluster", Duration::from_secs(120)).await;
    // The two printed commands, run as they are printed.
    let commands = dev.chat_commands();
    assert_eq!(commands.len(), 2, "rim dev prints two chat commands");
    let mut alice = Terminal::spawn("alice", &commands[0]);
    let mut bob = Terminal::spawn("bob", &commands[1]);
    alice.expect("talking to bob", Duration::from_secs(30)).await;
    bob.expect("talking to alice", Duration::from_secs(30)).await;
    alice.expect("* connected to", Duration::from_secs(30)).await;
    bob.expect("* connected to", Duration::from_secs(30)).await;

    alice.type_line("hello bob, this is alice").await;
    let seen = bob.expect("alice: hello bob, this is alice", Duration::from_secs(30)).await;
    assert!(seen.starts_with('['), "a time stamp first: {seen}");
    alice.expect("you → bob: hello bob, this is alice", Duration::from_secs(30)).await;
    bob.type_line("hi alice").await;
    alice.expect("bob: hi alice", Duration::from_secs(30)).await;
    bob.type_line("/history 5").await;
    // History lists both messages (bob's view of his own is "you → alice").
    bob.expect("you → alice: hi alice", Duration::from_secs(30)).await;
    bob.type_line("/devices").await;
    bob.expect("(this one)", Duration::from_secs(30)).await;
    // One of three replicas down: the chat goes on.
    let mut dev = dev;
    dev.type_line("stop 2").await;
    dev.expect("node 2 stopped", Duration::from_secs(30)).await;
    alice.type_line("still there with a node down?").await;
    bob.expect("alice: still there with a node down?", Duration::from_secs(30)).await;
    dev.type_line("start 2").await;
    dev.expect("node 2 started", Duration::from_secs(30)).await;
    bob.type_line("yes").await;
    alice.expect("bob: yes", Duration::from_secs(30)).await;
    alice.type_line("/frobnicate").await;
    alice.expect("unknown command", Duration::from_secs(10)).await;

    alice.interrupt(Duration::from_secs(20)).await;
    bob.interrupt(Duration::from_secs(20)).await;
    dev.interrupt(Duration::from_secs(60)).await;
}

/// `rim dev --nodes 5`: each shard lives on 3 of the 5 nodes, the printed
/// chat commands work, and the chat goes on with a node stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rim_dev_with_five_nodes() {
    let _g = serial().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let base = free_base_port();
    let data = dir.path().join("rim-data").display().to_string();
    let dev_args: Vec<String> =
        ["dev", "--nodes", "5", "--base-port", &base.to_string(), "--data", &data].map(String::from).to_vec();
    let mut dev = Terminal::spawn("dev5", &dev_args);
    dev.expect("rim dev: 5 logic nodes", Duration::from_secs(120)).await;
    dev.expect("Ctrl-C stops the cluster", Duration::from_secs(120)).await;
    for id in 1..=5 {
        assert!(std::path::Path::new(&data).join(format!("node-{id}")).is_dir(), "node {id} data dir");
    }
    let commands = dev.chat_commands();
    assert_eq!(commands.len(), 2, "rim dev prints two chat commands");
    let mut alice = Terminal::spawn("alice5", &commands[0]);
    let mut bob = Terminal::spawn("bob5", &commands[1]);
    alice.expect("* connected to", Duration::from_secs(30)).await;
    bob.expect("* connected to", Duration::from_secs(30)).await;
    alice.type_line("five nodes here").await;
    bob.expect("alice: five nodes here", Duration::from_secs(30)).await;
    for id in [4, 1] {
        dev.type_line(&format!("stop {id}")).await;
        dev.expect(&format!("node {id} stopped"), Duration::from_secs(30)).await;
        bob.type_line(&format!("without node {id}")).await;
        alice.expect(&format!("bob: without node {id}"), Duration::from_secs(30)).await;
        dev.type_line(&format!("start {id}")).await;
        dev.expect(&format!("node {id} started"), Duration::from_secs(30)).await;
    }
    alice.interrupt(Duration::from_secs(20)).await;
    bob.interrupt(Duration::from_secs(20)).await;
    dev.interrupt(Duration::from_secs(60)).await;
}

/// A `rim gateway` process.
fn spawn_gateway(name: &str, tcp: &str, seeds: &str) -> Terminal {
    let args: Vec<String> = [
        "gateway",
        "--tcp",
        tcp,
        "--seeds",
        seeds,
        "--cluster-secret",
        SECRET,
        "--threads",
        "1",
        "--id",
        name,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Terminal::spawn(name, &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_gateway_clients_reconnect_elsewhere_and_lose_nothing() {
    let _g = serial().await;
    let mut cluster = ProcCluster::start(3, 4).await;
    cluster.wait_all_healthy(Duration::from_secs(60)).await;
    let seeds =
        cluster.ids().into_iter().map(|id| cluster.node(id).internal.clone()).collect::<Vec<_>>().join(",");
    let (tcp_a, tcp_b) = (free_addr(), free_addr());
    let mut gw_a = spawn_gateway("gw-a", &tcp_a, &seeds);
    let gw_b = spawn_gateway("gw-b", &tcp_b, &seeds);
    gw_a.expect("TCP on", Duration::from_secs(30)).await;
    gw_b.expect("TCP on", Duration::from_secs(30)).await;

    let api = NodeApi::new(&cluster.node(1).client.clone()).expect("api");
    for name in ["gwalice", "gwbob"] {
        api.register(name, PASSWORD).await.expect("register");
    }
    let alice: Credentials = api.sign_in("gwalice", PASSWORD, None).await.expect("sign in");
    let bob: Credentials = api.sign_in("gwbob", PASSWORD, None).await.expect("sign in");
    let alice_api = api.authenticated(alice.clone());

    // Bob prefers gateway A and fails over to B.
    let config = ClientConfig::new(vec![Endpoint::tcp(&tcp_a), Endpoint::tcp(&tcp_b)]);
    let (bob_client, mut events) = Client::connect(config, bob.clone());
    let on = bob_client.wait_online(Duration::from_secs(30)).await.expect("bob online");
    assert_eq!(on, Endpoint::tcp(&tcp_a));

    let mut acked = Vec::new();
    let mut received = Vec::new();
    let mut reconnected_to_b = false;
    for i in 0..40u32 {
        if i == 20 {
            let pid = gw_a.child.id().expect("running");
            std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().expect("kill");
            let _ = gw_a.child.wait().await;
            eprintln!("SIGKILLed gateway A after 20 sends");
        }
        let input = rim_proto::v1::SendInput {
            conversation_kind: rim_proto::v1::ConversationKind::User as i32,
            conversation_id: bob.user_id.0,
            client_msg_id: format!("gw-{i}"),
            content_type: ContentType::Text as i32,
            content: format!("m{i}").into_bytes().into(),
            ..Default::default()
        };
        // Same client_msg_id on every attempt: a retry never duplicates.
        let deadline = Instant::now() + Duration::from_secs(20);
        let out = loop {
            match alice_api.send_message(input.clone()).await {
                Ok(out) => break out,
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("send {i}: {e}"),
            }
        };
        acked.push(format!("m{i}"));
        assert!(out.seq > 0);
    }
    // Every acked message reaches bob exactly once, in order, over A then B.
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.len() < acked.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Some(Event::Message(m))) => received.push(String::from_utf8_lossy(&m.content).into_owned()),
            Ok(Some(Event::Connected { gateway, .. })) => {
                reconnected_to_b |= gateway == Endpoint::tcp(&tcp_b)
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("bob's client stopped"),
            Err(_) => panic!("bob received {} of {} messages: {received:?}", received.len(), acked.len()),
        }
    }
    assert_eq!(received, acked, "bob's deliveries, exactly once and in order");
    assert!(reconnected_to_b, "bob reconnected through gateway B");
    bob_client.close().await;
    gw_b.interrupt(Duration::from_secs(30)).await;
}

/// `rim gateway --tls-cert --tls-key` serves TCP and WebSocket inside TLS;
/// `rim chat --ca` talks through it over `tls://` and `wss://`, and without
/// `--ca` refuses a TLS gateway at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rim_chat_over_tls_and_wss_through_a_tls_gateway() {
    let _g = serial().await;
    let mut cluster = ProcCluster::start(3, 2).await;
    let seeds = cluster.internal_addrs().join(",");
    let pki = rim_testkit::tls::TestPki::new();
    let (tcp, ws) = (free_addr(), free_addr());
    let [cert, key, ca] = [&pki.cert, &pki.key, &pki.ca].map(|p| p.display().to_string());
    let gw_args = [
        "gateway",
        "--tcp",
        &tcp,
        "--ws",
        &ws,
        "--seeds",
        &seeds,
        "--cluster-secret",
        SECRET,
        "--threads",
        "1",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    let gw = Terminal::spawn("gw-tls", &gw_args.map(String::from));
    gw.expect(&format!("TCP+TLS on {tcp}"), Duration::from_secs(30)).await;
    gw.expect(&format!("wss://{ws}/ws"), Duration::from_secs(30)).await;

    let api = cluster.node(1).client.clone();
    let chat = |user: &str, gateway: String, with_ca: bool| {
        let mut args =
            ["chat", "--register", "--user", user, "--password", PASSWORD, "--api", &api, "--gateway"]
                .map(String::from)
                .to_vec();
        args.push(gateway);
        if with_ca {
            args.extend(["--ca".to_string(), ca.clone()]);
        }
        args
    };

    // Without --ca a TLS gateway is refused before anything is sent.
    let mut no_ca = Terminal::spawn("no-ca", &chat("tlscarol", format!("tls://{tcp}"), false));
    let exit = tokio::time::timeout(Duration::from_secs(30), no_ca.child.wait()).await.expect("exits");
    assert!(!exit.expect("wait").success(), "rim chat without --ca ran against a TLS gateway");

    let mut bob = Terminal::spawn("bob-wss", &chat("tlsbob", format!("wss://{ws}/ws"), true));
    bob.expect("* connected to wss://", Duration::from_secs(60)).await;
    let mut alice = Terminal::spawn("alice-tls", &chat("tlsalice", format!("tls://{tcp}"), true));
    alice.expect("* connected to tls://", Duration::from_secs(60)).await;
    alice.type_line("/to tlsbob").await;
    alice.type_line("hello over tls").await;
    bob.expect("tlsalice: hello over tls", Duration::from_secs(30)).await;
    bob.type_line("/to tlsalice").await;
    bob.type_line("hello over wss").await;
    alice.expect("tlsbob: hello over wss", Duration::from_secs(30)).await;

    alice.interrupt(Duration::from_secs(20)).await;
    bob.interrupt(Duration::from_secs(20)).await;
    gw.interrupt(Duration::from_secs(30)).await;
}
