//! `rim bench sync` (being written).

use std::path::PathBuf;

use clap::Args;

use super::Outcome;
use super::target::{Target, TargetArgs};

/// Flags of `rim bench sync`.
#[derive(Args, Debug)]
pub struct SyncArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Result file (default bench-sync.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Runs the scenario.
pub async fn run(_args: &SyncArgs, _target: &Target) -> anyhow::Result<Outcome> {
    anyhow::bail!("rim bench sync: not written yet")
}
