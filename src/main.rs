//! The `rim` binary: a thin command line over the library crates.
//!
//! Each subcommand parses its flags into the typed options of a library and
//! calls it. The cluster itself (logic nodes, gateways, chat client) arrives
//! with the following issues; until then `rim dev` checks that the storage
//! engine works on this machine and says what it will start.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rim_raft_store::{Db, DbOptions, Limits, ShardId};

#[derive(Parser, Debug)]
#[command(name = "rim", version, about = "rim: a Raft-replicated instant-messaging backend")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Local development cluster: 3 logic nodes and a gateway in one process.
    Dev {
        /// Data directory of the local cluster.
        #[arg(long, default_value = "rim-data", env = "RIM_DATA")]
        data: PathBuf,
    },
    /// Print the Raft state of every shard stored in a node's data directory.
    Inspect {
        /// The node's data directory.
        #[arg(long)]
        data: PathBuf,
        /// Shards to show (the meta group is 0).
        #[arg(long, value_delimiter = ',', default_value = "0,1,2,3,4")]
        shards: Vec<u32>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Dev { data } => dev(data),
        Command::Inspect { data, shards } => inspect(data, &shards),
    }
}

fn dev(data: PathBuf) -> anyhow::Result<()> {
    let node_dir = data.join("node-1");
    let db =
        Db::open(&DbOptions::new(&node_dir)).with_context(|| format!("opening {}", node_dir.display()))?;
    drop(db);
    println!("rim dev: storage is ready in {}", node_dir.display());
    println!();
    println!("This build has the storage layer only (RocksDB + openraft state machine).");
    println!("`rim dev` will start, in one process, with data under {}:", data.display());
    println!("  - logic nodes 1..3 (meta group + 4 shards, Raft on 127.0.0.1:7101..7103)");
    println!("  - a gateway: TCP on 127.0.0.1:8002, WebSocket on ws://127.0.0.1:8003/ws");
    println!("and print the `rim chat` commands for two demo users.");
    Ok(())
}

fn inspect(data: PathBuf, shards: &[u32]) -> anyhow::Result<()> {
    let db = Db::open(&DbOptions::new(&data)).with_context(|| format!("opening {}", data.display()))?;
    let limits = Arc::new(Limits::default());
    println!("{:>5}  {:>12}  {:>20}  digest", "shard", "applied", "membership");
    for &s in shards {
        let sm = rim_raft_store::StateMachine::open(db.clone(), ShardId(s), limits.clone())?;
        let (applied, membership) = sm.applied_summary();
        let digest = sm.reader().digest()?;
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        println!("{s:>5}  {applied:>12}  {membership:>20}  {hex}");
    }
    Ok(())
}
