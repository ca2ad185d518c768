//! `kiln ensemble`: work in progress.

use clap::Args;

pub const LONG_ABOUT: &str = "Work in progress.";

#[derive(Args, Debug)]
pub struct EnsembleArgs {}

pub fn run(_args: EnsembleArgs) -> anyhow::Result<()> {
    anyhow::bail!("kiln ensemble is not implemented yet")
}
