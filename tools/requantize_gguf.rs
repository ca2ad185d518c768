//! Requantises a GGUF file's matrices with kiln-gguf's port of ggml's reference quantisers:
//! the K-quant test files and benchmarks of `bench/README.md` ("K-quants kept packed").
//!
//! ```text
//! cargo run --release --example requantize_gguf -- IN.gguf OUT.gguf --recipe q4_k_m
//! cargo run --release --example requantize_gguf -- OUT.gguf OUT-q8.gguf --recipe k-to-q8_0
//! ```
//!
//! * `q4_k_m`: llama.cpp's Q4_K_M choice per matrix (Q4_K; Q6_K for the embedding/output and
//!   for `attn_v`/`ffn_down` in some layers; where the width is not a whole number of 256-value
//!   super-blocks, llama.cpp's fallbacks Q5_0 and Q8_0); other tensors are copied as stored.
//! * `k-to-q8_0`: the K-quant, Q5_0 and Q5_1 matrices dequantised and quantised to Q8_0,
//!   everything else copied: what kiln made of such a file at load before it kept these
//!   blocks packed, as a file, so the two can be compared with one binary.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use kiln_gguf::{GgmlType, GgufFile};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Recipe {
    /// Q4_K with Q6_K where llama.cpp's Q4_K_M puts it (Q5_0 / Q8_0 on other widths).
    #[value(name = "q4_k_m")]
    Q4KM,
    /// Q4_K, Q5_K, Q6_K, Q5_0 and Q5_1 matrices to Q8_0.
    #[value(name = "k-to-q8_0")]
    KToQ8,
}

#[derive(Parser, Debug)]
#[command(about = "Requantise a GGUF file's matrices")]
struct Args {
    input: PathBuf,
    output: PathBuf,
    #[arg(long, value_enum)]
    recipe: Recipe,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let file = GgufFile::open(&args.input)?;
    let layers = file.llama_metadata().map(|m| m.block_count).unwrap_or(0);
    let bytes =
        kiln_gguf::writer::requantize(&file, |name, [_, cols], stored| match args.recipe {
            Recipe::Q4KM => kiln_gguf::writer::q4_k_m_type(name, cols, layers),
            Recipe::KToQ8 => matches!(
                stored,
                GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K | GgmlType::Q5_0 | GgmlType::Q5_1
            )
            .then_some(GgmlType::Q8_0),
        })?;
    std::fs::write(&args.output, &bytes)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let out = GgufFile::open(&args.output)?;
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for t in out.tensors() {
        *counts.entry(t.ggml_type().to_string()).or_default() += 1;
    }
    eprintln!(
        "wrote {} ({:.1} MB): {counts:?}",
        args.output.display(),
        bytes.len() as f64 / 1e6
    );
    Ok(())
}
