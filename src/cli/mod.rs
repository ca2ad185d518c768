//! Command-line interface.

mod anchor;
mod chat;
mod distill;
mod ensemble;
mod generate;
mod precision;
mod sampling;
mod serve;
mod template;
mod translate;

use clap::{Parser, Subcommand};

/// kiln: a model zoo for Burn. Llama, Mistral, Yi, T5 and NLLB from Hugging Face checkpoints,
/// on CPU or GPU, plus model ensembling (DeePEn), anchor-based attention (AnLLM) and
/// step-by-step distillation.
///
/// The backend is chosen when kiln is built: `cargo run --release` uses the CPU (flex);
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
    /// Talk with an instruction-tuned model: streamed replies, history kept (KV cache reused).
    #[command(long_about = chat::LONG_ABOUT)]
    Chat(chat::ChatArgs),
    /// Translate with NLLB-200, or run T5 / FLAN-T5 text-to-text (greedy, sampling or beams).
    #[command(long_about = translate::LONG_ABOUT)]
    Translate(translate::TranslateArgs),
    /// Generate with an ensemble of models (DeePEn, GaC or UniTE).
    #[command(long_about = ensemble::LONG_ABOUT)]
    Ensemble(Box<ensemble::EnsembleArgs>),
    /// Anchor-based attention (AnLLM): train, evaluate, export as an HF folder.
    #[command(long_about = anchor::LONG_ABOUT)]
    Anchor(anchor::AnchorArgs),
    /// Distilling step-by-step: train and evaluate a T5 on labels and rationales.
    #[command(long_about = distill::LONG_ABOUT)]
    Distill(distill::DistillArgs),
    /// Serve a model over HTTP with the OpenAI API (chat, completions, streaming), batching
    /// requests continuously.
    #[command(long_about = serve::LONG_ABOUT)]
    Serve(serve::ServeArgs),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Translate(args) => translate::run(args),
        Command::Ensemble(args) => ensemble::run(*args),
        Command::Anchor(args) => anchor::run(args),
        Command::Distill(args) => distill::run(args),
        Command::Serve(args) => serve::run(args),
    }
}
