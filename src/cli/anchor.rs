//! `kiln anchor`: work in progress.

use clap::Args;

pub const LONG_ABOUT: &str = "Work in progress.";

#[derive(Args, Debug)]
pub struct AnchorArgs {}

pub fn run(_args: AnchorArgs) -> anyhow::Result<()> {
    anyhow::bail!("kiln anchor is not implemented yet")
}
