//! Speed and memory of a Llama-family checkpoint on this build's backend: load time, prefill
//! tok/s (one cached forward over a prompt of random ids, logits of the last position only),
//! greedy decode tok/s (single-token cached steps) and peak RSS, as a table row and one JSON
//! line. `bench/candle` measures candle the same way; `bench/README.md` has the results.
//!
//! ```text
//! cargo run --release --example random_checkpoint -- --preset tinyllama-1.1b --out /tmp/tinyllama-random
//! cargo run --release --example bench -- --model /tmp/tinyllama-random --prompt-len 128 --gen 32 --repeats 3
//! cargo run --release --no-default-features --features flex --example bench -- --model /tmp/tinyllama-random
//! cargo run --release --example bench -- --model ~/.cache/kiln/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
//! cargo run --release --example bench -- --model /tmp/tinyllama-random --quant q8_0
//! ```
//!
//! After the measured runs it probes this machine's read bandwidth (a parallel sum over 1 GiB,
//! best of three) and prints each decode figure beside its limit: the bytes of weights a step
//! streams divided by that bandwidth.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::prelude::*;
use clap::Parser;
use kiln::backend::{self, Backend as B};
use kiln::core::CausalLm;
use kiln::core::loading::{
    HostKernels, LoadOptions, PackSlot, PackSlots, Quantization, WeightDtype,
};
use kiln::core::packed::ActivationPrecision;
use kiln::llama::Llama;

#[path = "common/roofline.rs"]
mod roofline;

/// Measures load time, prefill and decode throughput and peak memory of a Llama-family
/// checkpoint on the backend this example was built with (cargo features `ndarray`, `flex`,
/// `wgpu`, `cuda`, ...), and prints a table row and a JSON line.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Folder in HF layout (config.json + safetensors), e.g. one made by the
    /// `random_checkpoint` example, or a llama.cpp `.gguf` file (its blocks kept as stored, see `--dtype`).
    #[arg(long)]
    model: PathBuf,
    /// Prompt length in tokens (random ids, seeded; the same ids as bench/candle).
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Number of greedy decode steps, one token each, with the KV cache.
    #[arg(long = "gen", default_value_t = 32)]
    new_tokens: usize,
    /// Measured runs (prefill + decode each, fresh cache); the table shows the median and best.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Unmeasured warm-up runs first (a short prefill and two decode steps each).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Seed of the random prompt.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Weight precision: auto (what the file holds, f32 for safetensors), f32, f16, bf16.
    #[arg(long, default_value = "auto")]
    dtype: WeightDtype,
    /// Requantise the matrices at load: none, q8_0, q4_0, q4_1, iq4_nl.
    #[arg(long, default_value = "none")]
    quant: Quantization,
    /// Activations of quantised weights: f32, or q8 (8-bit, as llama.cpp; decode steps, and
    /// prefill where the integer kernels are faster).
    #[arg(long, default_value = "f32")]
    activations: ActivationPrecision,
    /// kiln's host kernels for the matrices: auto (on for CPU backends), always, never (Burn's
    /// own matmul, every weight a Burn tensor).
    #[arg(long, default_value = "auto")]
    host_kernels: String,
    /// Skip the bandwidth probe (it allocates 1 GiB after the measurements).
    #[arg(long)]
    no_probe: bool,
}

/// Bytes of weights one decode step reads: every matrix (packed or dense); the embedding counts
/// only when it is also the LM head (a lookup reads one row).
fn weight_bytes(model: &mut Llama<B>) -> usize {
    let tied = model.lm_head.is_none();
    model
        .pack_slots()
        .iter()
        .filter(|(_, slot)| tied || !matches!(slot, PackSlot::Embedding(_)))
        .map(|(_, slot)| roofline::slot_bytes(slot))
        .sum()
}

/// splitmix64; bench/candle uses the same generator so both feed identical prompts.
struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn prompt(seed: u64, len: usize, vocab: usize) -> Vec<u32> {
    let mut rng = SplitMix(seed);
    (0..len)
        .map(|_| (rng.next() % vocab as u64) as u32)
        .collect()
}

/// `VmHWM` / `VmRSS` of this process in GiB (NaN off Linux).
fn rss_gib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / (1024.0 * 1024.0))
}

fn tokens(ids: &[u32], device: &Device<B>) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(data, [1, ids.len()]), device)
}

/// Greedy choice from `[1, 1, vocab]` logits; reading it back also waits for the device.
fn argmax(logits: Tensor<B, 3>) -> u32 {
    let data = logits.argmax(2).into_data();
    data.iter::<i64>().next().expect("one id") as u32
}

struct Run {
    prefill_s: f64,
    decode_s: f64,
}

fn run_once(model: &Llama<B>, device: &Device<B>, ids: &[u32], new_tokens: usize) -> Run {
    let mut cache = model.new_cache(vec![0]);
    let t = Instant::now();
    let mut next = argmax(model.forward(tokens(ids, device), &mut cache, false));
    let prefill_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..new_tokens {
        next = argmax(model.forward(tokens(&[next], device), &mut cache, false));
    }
    let decode_s = t.elapsed().as_secs_f64();
    Run {
        prefill_s,
        decode_s,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = backend::device();

    let t = Instant::now();
    let host_kernels = match args.host_kernels.as_str() {
        "auto" => HostKernels::Auto,
        "always" => HostKernels::Always,
        "never" => HostKernels::Never,
        other => anyhow::bail!("--host-kernels {other}: expected auto, always or never"),
    };
    let options = LoadOptions::default()
        .with_dtype(args.dtype)
        .with_quantization(args.quant)
        .with_activations(args.activations)
        .with_host_kernels(host_kernels);
    let mut model = if args.model.extension().is_some_and(|e| e == "gguf") {
        Llama::<B>::from_gguf_with(&args.model, &device, &options).map(|(model, _)| model)
    } else {
        Llama::<B>::from_pretrained_with(&args.model, &device, &options)
    }
    .with_context(|| format!("loading {}", args.model.display()))?;
    let _ = <B as burn::tensor::backend::Backend>::sync(&device);
    let load_s = t.elapsed().as_secs_f64();
    let rss_after_load = rss_gib("VmRSS:");

    let ids = prompt(args.seed, args.prompt_len, model.vocab_size());
    anyhow::ensure!(
        args.prompt_len + args.new_tokens <= model.max_context(),
        "prompt + gen exceeds the model's context of {}",
        model.max_context()
    );
    for _ in 0..args.warmup {
        run_once(&model, &device, &ids[..ids.len().min(16)], 2);
    }
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for r in 0..args.repeats {
        let run = run_once(&model, &device, &ids, args.new_tokens);
        let (p, d) = (
            args.prompt_len as f64 / run.prefill_s,
            args.new_tokens as f64 / run.decode_s,
        );
        eprintln!(
            "run {r}: prefill {:.3} s ({p:.2} tok/s), decode {:.3} s ({d:.2} tok/s)",
            run.prefill_s, run.decode_s
        );
        prefill.push(p);
        decode.push(d);
    }
    let peak = rss_gib("VmHWM:");
    let best = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    let bytes = weight_bytes(&mut model);
    drop(model);
    let bandwidth = if args.no_probe {
        f64::NAN
    } else {
        roofline::probe_bandwidth()
    };
    let limit = bandwidth * 1e9 / bytes as f64;
    let weights = format!(
        "{:?}/{:?}/act-{:?}",
        args.dtype, args.quant, args.activations
    )
    .to_lowercase();

    println!(
        "kiln ({}, weights {weights}): load {load_s:.2} s | prefill {:.2} tok/s (best {:.2}) | \
         decode {:.2} tok/s (best {:.2}; limit {limit:.1} = {:.1} MB/token at {bandwidth:.1} GB/s, \
         {:.0}%) | peak RSS {peak:.2} GiB (after load {rss_after_load:.2})",
        backend::NAME,
        median(prefill.clone()),
        best(&prefill),
        median(decode.clone()),
        best(&decode),
        bytes as f64 / 1e6,
        100.0 * median(decode.clone()) / limit,
    );
    let json = serde_json::json!({
        "impl": "kiln",
        "backend": backend::NAME,
        "compute_dtype": "f32",
        "weights": weights,
        "weight_bytes_per_token": bytes,
        "bandwidth_gb_s": bandwidth,
        "decode_limit_tok_s": limit,
        "decode_fraction_of_limit": median(decode.clone()) / limit,
        "model": args.model.display().to_string(),
        "prompt_len": args.prompt_len,
        "gen": args.new_tokens,
        "repeats": args.repeats,
        "load_s": load_s,
        "prefill_tok_s": median(prefill.clone()),
        "prefill_tok_s_best": best(&prefill),
        "prefill_tok_s_runs": prefill,
        "decode_tok_s": median(decode.clone()),
        "decode_tok_s_best": best(&decode),
        "decode_tok_s_runs": decode,
        "peak_rss_gib": peak,
        "rss_after_load_gib": rss_after_load,
    });
    println!("{json}");
    Ok(())
}
