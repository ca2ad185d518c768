//! Command-line interface.

mod generate;

use clap::{Parser, Subcommand};

/// kiln: a model zoo for Burn. Llama, Mistral and Yi from Hugging Face checkpoints, on CPU or GPU.
///
/// The backend is chosen when kiln is built: `cargo run --release` uses the CPU (ndarray);
/// add `--features wgpu`, `vulkan`, `metal` or `cuda` for a GPU.
#[derive(Parser, Debug)]
#[command(name = "kiln", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Continue a prompt with a decoder-only model (greedy unless --temperature is given).
    #[command(long_about = generate::LONG_ABOUT)]
    Generate(generate::GenerateArgs),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
    }
}
