//! `rim dev`: a local 3-node cluster in one process.
//!
//! Data lives in `./rim-data/node-{1,2,3}`; a second run resumes it. The
//! cluster secret and the phone sign-in code are fixed, public development
//! values: never expose these ports.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use rim_node::{Node, NodeConfig, NodeOptions};

/// Development cluster secret (public; development only).
pub const DEV_SECRET: &str = "rim-dev-secret-do-not-use-in-production";

/// Flags of `rim dev`.
#[derive(Args, Debug)]
pub struct DevArgs {
    /// Data directory of the local cluster.
    #[arg(long, default_value = "rim-data", env = "RIM_DATA")]
    data: PathBuf,
    /// Data shards.
    #[arg(long, default_value_t = 4)]
    shards: u32,
    /// First port; nodes use base+1..3 (internal), base+101..103 (client), base+201..203 (http).
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
    let peers: BTreeMap<u64, String> =
        (1..=3u64).map(|id| (id, format!("127.0.0.1:{}", args.base_port + id as u16))).collect();
    let configs: Vec<NodeConfig> = (1..=3).map(|id| config(&args, id, &peers)).collect();
    for c in &configs {
        c.validate()?;
    }
    // Start the three together, so no node spends long calling peers that do not exist yet.
    let [a, b, c] = [0, 1, 2].map(|i| Node::start(configs[i].clone(), NodeOptions::default()));
    let (a, b, c) = tokio::try_join!(a, b, c)?;
    let nodes = vec![a, b, c];
    for n in &nodes {
        n.wait_ready(Duration::from_secs(60)).await?;
    }
    let p = |off: u16| {
        (1..=3).map(|id| format!("127.0.0.1:{}", args.base_port + off + id)).collect::<Vec<_>>().join(", ")
    };
    println!();
    println!("rim dev: 3 logic nodes, {} shards, data in {}", args.shards, args.data.display());
    println!("  client gRPC : {}", p(100));
    println!("  internal    : {}   (cluster secret: {DEV_SECRET})", p(0));
    println!("  metrics     : http://127.0.0.1:{}/metrics  (/healthz)", args.base_port + 201);
    println!("  phone sign-in code (dev only): 123456");
    println!();
    println!(
        "status:  rim admin --addr 127.0.0.1:{} --cluster-secret {DEV_SECRET} status",
        args.base_port + 1
    );
    println!("Ctrl-C stops the cluster; running `rim dev` again resumes it.");
    crate::shutdown_signal().await;
    for n in nodes {
        n.shutdown().await;
    }
    Ok(())
}
