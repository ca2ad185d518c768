//! Time-bounded fuzzing of every loader of untrusted model files (the targets of
//! `tests/fuzzing`): GGUF, safetensors (single and sharded index), config.json of every
//! architecture, tokenizer.json / tokenizer_config.json, chat templates, generation_config.json.
//!
//! ```sh
//! cargo run --release --example fuzz -- --seconds 60            # every target, 60 s each
//! cargo run --release --example fuzz -- --target gguf --seconds 600 --seed 7
//! ```
//!
//! Prints one line per target: inputs run, inputs that loaded, panics, inputs over the
//! per-input time limit (`--per-input-ms`) or memory limit (`--memory-mib`), the peak extra
//! memory of one input and the slowest input. Findings are written to `--out`.

#[path = "mod.rs"]
mod fuzzing;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[global_allocator]
static ALLOC: fuzzing::CountingAlloc = fuzzing::CountingAlloc;

#[derive(Parser)]
struct Args {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Run one target only (gguf, safetensors, safetensors-index, config, tokenizer,
    /// chat-template, generation-config).
    #[arg(long)]
    target: Option<String>,
    /// Seed of the mutation stream.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// An input slower than this is a finding.
    #[arg(long, default_value_t = 2000)]
    per_input_ms: u64,
    /// An input allocating more than this at once is a finding.
    #[arg(long, default_value_t = 256)]
    memory_mib: usize,
    /// Where scratch files and findings go.
    #[arg(long, default_value = "target/fuzz")]
    out: PathBuf,
}

fn main() {
    let args = Args::parse();
    println!(
        "| target | inputs | loaded | panics | slow (> {} ms) | heavy (> {} MiB) | peak MiB | slowest ms |",
        args.per_input_ms, args.memory_mib
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut findings = 0;
    for (name, target) in fuzzing::TARGETS {
        if args.target.as_deref().is_some_and(|t| t != *name) {
            continue;
        }
        let report = fuzzing::run(
            name,
            *target,
            args.seed,
            fuzzing::Limits {
                iterations: usize::MAX,
                budget: Duration::from_secs(args.seconds),
                per_input: Duration::from_millis(args.per_input_ms),
                memory: args.memory_mib << 20,
            },
            &args.out,
        );
        println!(
            "| {name} | {} | {} | {} | {} | {} | {:.1} | {:.0} |",
            report.execs,
            report.loaded,
            report.panics.len(),
            report.slow.len(),
            report.heavy.len(),
            report.max_peak as f64 / (1 << 20) as f64,
            report.max_time.as_secs_f64() * 1e3
        );
        for (i, msg, path) in &report.panics {
            eprintln!("  {name} #{i} panicked: {msg} ({})", path.display());
        }
        for (i, took, path) in &report.slow {
            eprintln!("  {name} #{i} took {took:?} ({})", path.display());
        }
        for (i, peak, path) in &report.heavy {
            eprintln!("  {name} #{i} allocated {peak} B ({})", path.display());
        }
        findings += report.panics.len() + report.slow.len() + report.heavy.len();
    }
    if findings > 0 {
        std::process::exit(1);
    }
}
