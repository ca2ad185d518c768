//! `kiln distill`: work in progress.

use clap::Args;

pub const LONG_ABOUT: &str = "Work in progress.";

#[derive(Args, Debug)]
pub struct DistillArgs {}

pub fn run(_args: DistillArgs) -> anyhow::Result<()> {
    anyhow::bail!("kiln distill is not implemented yet")
}
