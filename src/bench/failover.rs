//! `rim bench failover` (being written).

use std::path::PathBuf;

use clap::Args;

use super::Outcome;
use super::target::{Target, TargetArgs};

/// Flags of `rim bench failover`.
#[derive(Args, Debug)]
pub struct FailoverArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Result file (default bench-failover.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Runs the scenario.
pub async fn run(_args: &FailoverArgs, _target: &Target) -> anyhow::Result<Outcome> {
    anyhow::bail!("rim bench failover: not written yet")
}
