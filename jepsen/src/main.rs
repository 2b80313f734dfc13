//! `rim-jepsen`: the consistency harness's command line.
//!
//! * `rim-jepsen test --nodes 3 --time-limit 60 --nemesis partition,kill,pause`
//!   runs the real cluster under faults (see `rim_jepsen::run`), checks the
//!   history and renders the report into `STORE/<run>/`.
//! * `rim-jepsen check DIR` re-checks a saved run: it reads
//!   `DIR/history.jsonl`, writes `DIR/results.json` and `DIR/results.txt`,
//!   and prints the text summary.
//! * `rim-jepsen report DIR` re-renders the timeline and plots of a run.
//! * `rim-jepsen webhook-receiver --listen A --out F --secret S` is the
//!   app's webhook receiver of a run (`rim_jepsen::webhooks`); `test`
//!   starts it as its own process.
//!
//! Exit codes: 0 valid, 1 anomalies, 2 unknown (or the run could not be
//! carried out, or the history could not be read).

use clap::{Args, Parser, Subcommand};
use rim_jepsen::checker::{CheckOptions, Consistency, check_dir};
use rim_jepsen::nemesis::{Fault, NemesisOptions, Shape, Target};
use rim_jepsen::run::{TestOptions, run_test};
use rim_jepsen::workload::{GatewayTransport, WorkloadOptions};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "rim-jepsen", about = "rim consistency harness")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the cluster under faults, record the history, check it, report.
    Test(Box<TestArgs>),
    /// Re-render DIR's timeline and plots from DIR/history.jsonl.
    Report {
        /// The run directory.
        dir: PathBuf,
    },
    /// The app's webhook receiver of a run (started by `test`): appends
    /// every request to OUT, checking Standard Webhooks signatures.
    WebhookReceiver {
        /// Address to listen on.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The receipts file (appended to).
        #[arg(long)]
        out: PathBuf,
        /// A `whsec_...` secret signatures may verify with (repeatable).
        #[arg(long, required = true)]
        secret: Vec<String>,
    },
    /// Check DIR/history.jsonl; write DIR/results.json and DIR/results.txt.
    Check {
        /// The run directory.
        dir: PathBuf,
        /// IM-8 strength: linearizable, session (read-your-writes) or eventual (off).
        #[arg(long, default_value = "linearizable")]
        consistency: Consistency,
        /// All users share one shard: also check recipients' lists in real time and IM-10.
        #[arg(long)]
        single_shard: bool,
        /// Print only the verdict line.
        #[arg(long, short)]
        quiet: bool,
    },
}

/// Flags of `rim-jepsen test`.
#[derive(Args, Debug)]
struct TestArgs {
    /// The `rim` binary (default: RIM_BIN, else the cargo target dir).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Logic nodes.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Data shards.
    #[arg(long, default_value_t = 4)]
    shards: u32,
    /// Seconds of workload under the nemesis.
    #[arg(long, default_value_t = 60)]
    time_limit: u64,
    /// Faults: partition,kill,pause,clock (or all, or none).
    #[arg(long, default_value = "partition,kill,pause")]
    nemesis: String,
    /// Mean seconds of each quiet period and each fault.
    #[arg(long, default_value_t = 5.0)]
    nemesis_interval: f64,
    /// Kill and pause targets: one,leader,majority,all,shard-majority
    /// (default: a weighted mix; shard-majority from 5 nodes).
    #[arg(long, default_value = "")]
    targets: String,
    /// Partition shapes: isolate,isolate-leader,halves,majorities-ring,
    /// bridge,one-way,shard-majority (default: all of them; shard-majority
    /// from 5 nodes).
    #[arg(long, default_value = "")]
    shapes: String,
    /// Users.
    #[arg(long, default_value_t = 6)]
    users: u64,
    /// Devices per user (even ones use the gateway, odd ones gRPC).
    #[arg(long, default_value_t = 2)]
    devices: u64,
    /// Target operations per second, all clients together.
    #[arg(long, default_value_t = 40.0)]
    rate: f64,
    /// Seconds before a request counts as indeterminate.
    #[arg(long, default_value_t = 5.0)]
    op_timeout: f64,
    /// After an indeterminate send, re-send the same payload id (checks dedup).
    #[arg(long)]
    retry_same_id: bool,
    /// Gateway transport: tcp, ws or mixed.
    #[arg(long, default_value = "mixed")]
    transport: GatewayTransport,
    /// Fraction of sends that go to a group (two small groups and a super
    /// group are created at set-up); 0 = 1:1 only, no groups.
    #[arg(long, default_value_t = 0.3)]
    group_sends: f64,
    /// Seed of every random choice (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Seconds of quiet after recovery before the final reads.
    #[arg(long, default_value_t = 3)]
    recovery_time: u64,
    /// Where run directories go.
    #[arg(long, default_value = "store")]
    store: PathBuf,
    /// IM-8 strength to check: linearizable, session or eventual.
    #[arg(long, default_value = "linearizable")]
    consistency: Consistency,
    /// TEST ONLY: run a deliberately broken build (`rim node --sabotage`).
    #[arg(long, value_name = "FLAGS")]
    sabotage: Option<String>,
    /// Report unknown (exit 2) when fewer sends than this were acked.
    #[arg(long, default_value_t = 0)]
    min_acked: u64,
    /// Gracefully restart every node after set-up (see the skip-fsync self-test).
    #[arg(long)]
    restart_after_setup: bool,
    /// Keep the nodes' data dirs of a valid run (kept anyway otherwise).
    #[arg(long)]
    keep_data: bool,
    /// Run without the app's webhook receiver (IM-13 is then not checked).
    #[arg(long)]
    no_webhooks: bool,
    /// No progress line.
    #[arg(long, short)]
    quiet: bool,
}

impl TestArgs {
    fn into_options(self) -> Result<TestOptions, String> {
        let bin = match self.bin {
            Some(b) => b,
            None => rim_jepsen::control::rim_bin().map_err(|e| e.to_string())?,
        };
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                % 1_000_000
        });
        let secs = |v: f64, what: &str| {
            Duration::try_from_secs_f64(v).map_err(|_| format!("--{what}: {v} is not a number of seconds"))
        };
        Ok(TestOptions {
            bin,
            nodes: self.nodes,
            shards: self.shards,
            time_limit: Duration::from_secs(self.time_limit),
            recovery_time: Duration::from_secs(self.recovery_time),
            workload: WorkloadOptions {
                users: self.users.max(1),
                devices: self.devices.max(1),
                rate: self.rate,
                op_timeout: secs(self.op_timeout, "op-timeout")?,
                retry_same_id: self.retry_same_id,
                transport: self.transport,
                group_sends: self.group_sends.clamp(0.0, 1.0),
                seed,
            },
            nemesis: NemesisOptions {
                faults: Fault::parse_list(&self.nemesis)?,
                interval: secs(self.nemesis_interval, "nemesis-interval")?,
                seed,
                shapes: Shape::parse_list(&self.shapes)?,
                targets: Target::parse_list(&self.targets)?,
            },
            store: self.store,
            node_env: Vec::new(),
            sabotage: self.sabotage,
            consistency: self.consistency,
            progress: !self.quiet,
            min_acked: self.min_acked,
            restart_after_setup: self.restart_after_setup,
            keep_data: self.keep_data,
            webhook_receiver: if self.no_webhooks {
                None
            } else {
                Some(std::env::current_exe().map_err(|e| format!("finding rim-jepsen itself: {e}"))?)
            },
        })
    }
}

fn test(args: TestArgs) -> ExitCode {
    let opts = match args.into_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("rim-jepsen test: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rim-jepsen test: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run_test(opts)) {
        Ok(outcome) => {
            print!("{}", rim_jepsen::checker::render_text(&outcome.results));
            println!("run dir: {}", outcome.dir.display());
            ExitCode::from(outcome.results.valid.exit_code() as u8)
        }
        Err(e) => {
            eprintln!("rim-jepsen test: {e}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Test(args) => test(*args),
        Command::WebhookReceiver { listen, out, secret } => {
            let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("rim-jepsen webhook-receiver: {e}");
                    return ExitCode::from(2);
                }
            };
            match rt.block_on(rim_jepsen::webhooks::serve(listen, &out, secret)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("rim-jepsen webhook-receiver: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Report { dir } => {
            let history = match rim_jepsen::history::read_history(dir.join("history.jsonl")) {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("rim-jepsen report: {e}");
                    return ExitCode::from(2);
                }
            };
            let results = rim_jepsen::checker::check_loaded(&history, &CheckOptions::default());
            match rim_jepsen::report::write_report(&dir, &history.ops, &results) {
                Ok(_) => {
                    println!("report written to {}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("rim-jepsen report: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Check { dir, consistency, single_shard, quiet } => {
            let options = CheckOptions { consistency, single_shard };
            match check_dir(&dir, &options) {
                Ok(results) => {
                    let text = rim_jepsen::checker::render_text(&results);
                    if quiet {
                        println!("{}", text.lines().next().unwrap_or_default());
                    } else {
                        print!("{text}");
                    }
                    ExitCode::from(results.valid.exit_code() as u8)
                }
                Err(e) => {
                    eprintln!("rim-jepsen check: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
