//! `rim dev`: a local cluster (3 nodes by default, `--nodes N` up to 9) and a
//! gateway in one process.
//!
//! Data lives in `./rim-data/node-{1,2,...}`; a second run resumes it (with
//! the same `--nodes`: the layout is fixed when the cluster is created). The
//! cluster secret, the phone sign-in code and the two demo accounts (alice
//! and bob) are fixed, public development values: never expose these ports.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use rim_gateway::{Gateway, GatewayConfig};
use rim_node::{Node, NodeConfig, NodeOptions};
use rim_proto::ErrorCode;
use rim_proto::v1::RegisterRequest;
use rim_proto::v1::auth_service_client::AuthServiceClient;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Development cluster secret (public; development only).
pub const DEV_SECRET: &str = "rim-dev-secret-do-not-use-in-production";

/// Demo accounts created by `rim dev` (login, password).
pub const DEMO_USERS: [(&str, &str); 2] = [("alice", "alice-dev-pw"), ("bob", "bob-dev-pw")];

/// Flags of `rim dev`.
#[derive(Args, Debug)]
pub struct DevArgs {
    /// Data directory of the local cluster.
    #[arg(long, default_value = "rim-data", env = "RIM_DATA")]
    data: PathBuf,
    /// Logic nodes (1..=9); with more than 3, each shard lives on 3 of them.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    nodes: u64,
    /// Data shards.
    #[arg(long, default_value_t = 4)]
    shards: u32,
    /// First port; node N uses base+N (internal), base+100+N (client gRPC),
    /// base+200+N (http); the gateway base+300 (TCP), base+301 (WebSocket), base+302 (http).
    #[arg(long, default_value_t = 7100)]
    base_port: u16,
}

fn config(args: &DevArgs, id: u64, peers: &BTreeMap<u64, String>) -> NodeConfig {
    let port = |off: u16| format!("127.0.0.1:{}", args.base_port + off + id as u16);
    NodeConfig {
        id,
        data: args.data.join(format!("node-{id}")),
        listen: port(0),
        client_listen: port(100),
        http_listen: port(200),
        bootstrap: true,
        peers: peers.clone(),
        shards: args.shards,
        cluster_secret: DEV_SECRET.into(),
        dev_code: Some("123456".into()),
        ..NodeConfig::default()
    }
}

/// Runs the local cluster until Ctrl-C.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let n = args.nodes;
    let peers: BTreeMap<u64, String> =
        (1..=n).map(|id| (id, format!("127.0.0.1:{}", args.base_port + id as u16))).collect();
    let configs: Vec<NodeConfig> = (1..=n).map(|id| config(&args, id, &peers)).collect();
    for c in &configs {
        c.validate()?;
    }
    // Start them together, so no node spends long calling peers that do not exist yet.
    let started =
        futures::future::try_join_all(configs.iter().map(|c| Node::start(c.clone(), NodeOptions::default())))
            .await?;
    let mut nodes: BTreeMap<u64, Option<Node>> = (1..=n).zip(started.into_iter().map(Some)).collect();
    for n in nodes.values().flatten() {
        n.wait_ready(Duration::from_secs(60)).await?;
    }
    let local = |port: u16| format!("127.0.0.1:{port}");
    let gateway = Gateway::start(GatewayConfig {
        tcp_listen: Some(local(args.base_port + 300)),
        ws_listen: Some(local(args.base_port + 301)),
        http_listen: Some(local(args.base_port + 302)),
        seeds: peers.values().cloned().collect(),
        cluster_secret: DEV_SECRET.into(),
        gateway_id: "dev-gateway".into(),
        ..GatewayConfig::default()
    })
    .await?;
    gateway.wait_ready(Duration::from_secs(30)).await?;
    create_demo_users(&configs[0].client_listen).await?;
    let p = |off: u16| {
        (1..=n as u16)
            .map(|id| format!("127.0.0.1:{}", args.base_port + off + id))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!();
    println!("rim dev: {n} logic nodes, {} shards, data in {}", args.shards, args.data.display());
    println!("  client gRPC : {}", p(100));
    println!("  internal    : {}   (cluster secret: {DEV_SECRET})", p(0));
    println!("  metrics     : http://127.0.0.1:{}/metrics  (/healthz)", args.base_port + 201);
    println!(
        "  gateway     : tcp {}   ws ws://{}/ws   metrics http://{}/metrics",
        local(args.base_port + 300),
        local(args.base_port + 301),
        local(args.base_port + 302)
    );
    println!("  phone sign-in code (dev only): 123456");
    println!();
    let chat_flags = if args.base_port == 7100 {
        String::new()
    } else {
        format!(" --gateway {} --api {}", local(args.base_port + 300), configs[0].client_listen)
    };
    let [(a, a_pw), (b, b_pw)] = DEMO_USERS;
    let rim = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "rim".into());
    println!("chat (two terminals):");
    println!("  {rim} chat{chat_flags} --user {a} --password {a_pw} --to {b}");
    println!("  {rim} chat{chat_flags} --user {b} --password {b_pw} --to {a}");
    println!(
        "status:  rim admin --addr 127.0.0.1:{} --cluster-secret {DEV_SECRET} status",
        args.base_port + 1
    );
    println!(
        "Type `stop 2` to stop node 2 (chat on: nothing acknowledged is lost), `start 2` to bring it back."
    );
    println!("Ctrl-C stops the cluster; running `rim dev` again resumes it.");
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let stop = crate::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            line = lines.next_line(), if stdin_open => match line {
                Ok(Some(line)) => control(&line, &mut nodes, &configs).await,
                // No terminal (e.g. run in the background): Ctrl-C / SIGTERM only.
                Ok(None) | Err(_) => stdin_open = false,
            },
        }
    }
    println!("stopping...");
    gateway.shutdown().await;
    for n in nodes.into_values().flatten() {
        n.shutdown().await;
    }
    Ok(())
}

/// Handles one `stop N` / `start N` line typed into `rim dev`.
async fn control(line: &str, nodes: &mut BTreeMap<u64, Option<Node>>, configs: &[NodeConfig]) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (verb, id) = match words.as_slice() {
        [] => return,
        [verb, id] => (*verb, id.parse::<u64>().ok().filter(|id| nodes.contains_key(id))),
        _ => ("?", None),
    };
    match (verb, id) {
        ("stop", Some(id)) => match nodes.get_mut(&id).and_then(Option::take) {
            Some(node) => {
                node.shutdown().await;
                println!("node {id} stopped");
            }
            None => println!("node {id} is not running"),
        },
        ("start", Some(id)) if nodes[&id].is_some() => println!("node {id} is already running"),
        ("start", Some(id)) => {
            let config = configs[id as usize - 1].clone();
            match Node::start(config, NodeOptions::default()).await {
                Ok(node) => {
                    nodes.insert(id, Some(node));
                    println!("node {id} started");
                }
                Err(e) => println!("node {id} failed to start: {e}"),
            }
        }
        _ => println!("commands: stop N | start N   (N = 1..={})", nodes.len()),
    }
}

/// Registers the demo accounts; an account that exists already is fine.
async fn create_demo_users(client_addr: &str) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{client_addr}"))?
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    let mut auth = AuthServiceClient::new(channel);
    for (username, password) in DEMO_USERS {
        let req =
            RegisterRequest { username: username.into(), password: password.into(), ..Default::default() };
        match auth.register(req).await {
            Ok(_) => {}
            Err(s) if rim_proto::error::code_of_status(&s) == ErrorCode::ErrorAlreadyExists => {}
            Err(s) => anyhow::bail!("creating demo user {username}: {}", s.message()),
        }
    }
    Ok(())
}
