//! `rim-jepsen`: the consistency harness's command line.
//!
//! `rim-jepsen check DIR` re-checks a saved run: it reads `DIR/history.jsonl`,
//! writes `DIR/results.json` and `DIR/results.txt`, prints the text summary,
//! and exits 0 (valid), 1 (anomalies) or 2 (unknown, or the history could
//! not be read).

use clap::{Parser, Subcommand};
use rim_jepsen::checker::{CheckOptions, Consistency, check_dir};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "rim-jepsen", about = "rim consistency harness")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
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
