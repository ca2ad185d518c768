//! Translation throughput of an encoder-decoder checkpoint (NLLB-200 / M2M100, T5) on this
//! build's backend: sentences/s and generated tokens/s for whole `generate` calls (encoder, cached
//! decoder, greedy or beams) at several batch sizes. `tools/translate_bench.py` writes a
//! random-weight NLLB-600M-shaped folder and measures HF transformers the same way, on the same
//! source ids; `bench/README.md` has the results. Each row also gives the call's memory limit:
//! the weight bytes it must stream over the read bandwidth probed at start (binding at batch 1;
//! larger batches are bound by arithmetic as well).
//!
//! ```text
//! python tools/translate_bench.py --write /tmp/nllb600m-random
//! cargo run --release --example translate_bench -- --model /tmp/nllb600m-random --batch 1,8
//! python tools/translate_bench.py --model /tmp/nllb600m-random --batch 1,8
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use kiln::auto::{self, Seq2SeqModel};
use kiln::backend::{self, Backend as B};
use kiln::core::GenerationConfig;
use kiln::core::loading::{
    HostKernels, LoadOptions, PackSlot, PackSlots, Quantization, WeightDtype,
};
use kiln::core::packed::ActivationPrecision;
use kiln::core::seq2seq::{Seq2SeqLm, generate_seq2seq};

#[path = "common/roofline.rs"]
mod roofline;

/// Measures whole-translation throughput (encode + `--gen` decoder steps per sentence) for each
/// batch size, and prints a table row and a JSON line per batch size.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Encoder-decoder folder in HF layout, e.g. one written by `tools/translate_bench.py --write`.
    #[arg(long)]
    model: PathBuf,
    /// Batch sizes to measure (sentences per `generate` call).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch: Vec<usize>,
    /// Source length in tokens, language code and `</s>` included.
    #[arg(long, default_value_t = 24)]
    src_len: usize,
    /// Tokens generated per sentence (EOS is ignored so every run does the same work; the forced
    /// target-language token counts as the first).
    #[arg(long = "gen", default_value_t = 32)]
    new_tokens: usize,
    /// Beam width (1 = greedy).
    #[arg(long, default_value_t = 1)]
    beams: usize,
    /// Measured calls per batch size; the table shows the median.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// First source token (NLLB `eng_Latn` = 256047).
    #[arg(long, default_value_t = 256047)]
    src_lang: u32,
    /// Forced first generated token (NLLB `deu_Latn` = 256042).
    #[arg(long, default_value_t = 256042)]
    tgt_lang: u32,
    /// Weight precision: auto (f32 for safetensors), f32, f16, bf16.
    #[arg(long, default_value = "auto")]
    dtype: WeightDtype,
    /// Requantise the matrices at load: none, q8_0, q4_0, q4_1, iq4_nl.
    #[arg(long, default_value = "none")]
    quant: Quantization,
    /// Activations of quantised weights: f32, or q8 (8-bit, as llama.cpp; decode steps, and
    /// prefill where the integer kernels are faster).
    #[arg(long, default_value = "f32")]
    activations: ActivationPrecision,
    /// Burn's own matmul with every weight a Burn tensor, instead of kiln's host kernels.
    #[arg(long)]
    no_host_kernels: bool,
    /// Skip the bandwidth probe (it allocates 1 GiB before the measurements).
    #[arg(long)]
    no_probe: bool,
}

/// Bytes of weights a call streams at least: the encoder's and the cross-attention key/value
/// projections' once, and per decoder step every other decoder matrix and the LM head (the
/// shared embedding when it is tied). Embedding lookups read single rows and are not counted.
struct CallBytes {
    once: usize,
    per_step: usize,
}

fn call_bytes<M: PackSlots<B>>(model: &mut M) -> CallBytes {
    let slots = model.pack_slots();
    let tied = !slots.iter().any(|(name, _)| name == "lm_head");
    let mut bytes = CallBytes {
        once: 0,
        per_step: 0,
    };
    for (name, slot) in &slots {
        let cross_kv = [".encoder_attn.k_proj", ".encoder_attn.v_proj"]
            .iter()
            .chain(&[".EncDecAttention.k", ".EncDecAttention.v"])
            .any(|s| name.ends_with(s));
        let n = roofline::slot_bytes(slot);
        match slot {
            PackSlot::Embedding(_) if tied => bytes.per_step += n,
            PackSlot::Embedding(_) => {}
            _ if cross_kv || name.starts_with("encoder.") || name.contains(".encoder.") => {
                bytes.once += n
            }
            _ => bytes.per_step += n,
        }
    }
    bytes
}

/// splitmix64, as `tools/translate_bench.py`, so both feed identical sentences.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Sentence `i`: `[src_lang, w_1 .. w_{len-2}, </s>]` with words drawn from ids 4..250000 (below
/// NLLB's language codes).
fn sentence(i: usize, len: usize, src_lang: u32) -> Vec<u32> {
    let mut state = i as u64;
    let mut ids = vec![src_lang];
    ids.extend((0..len.saturating_sub(2)).map(|_| 4 + (splitmix(&mut state) % 249_996) as u32));
    ids.push(2);
    ids
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

fn bench<M: Seq2SeqLm<B> + PackSlots<B>>(model: &mut M, args: &Args, bandwidth: f64) -> Result<()> {
    let bytes = call_bytes(model);
    let model = &*model;
    // At batch 1 a call cannot take less than its weight bytes over the read bandwidth.
    let limit_s = (bytes.once + args.new_tokens * bytes.per_step) as f64 / (bandwidth * 1e9);
    let config = GenerationConfig::default()
        .with_max_new_tokens(args.new_tokens)
        .with_num_beams(args.beams)
        .with_forced_bos_token_id(Some(args.tgt_lang))
        .with_eos_token_ids(vec![]);
    // Warm-up: one short call.
    generate_seq2seq(
        model,
        &[sentence(0, 8, args.src_lang)],
        &config.clone().with_max_new_tokens(2),
    )?;
    for &batch in &args.batch {
        let inputs: Vec<Vec<u32>> = (0..batch)
            .map(|i| sentence(i, args.src_len, args.src_lang))
            .collect();
        let mut secs = Vec::new();
        for _ in 0..args.repeats {
            let t = Instant::now();
            let outputs = generate_seq2seq(model, &inputs, &config)?;
            secs.push(t.elapsed().as_secs_f64());
            anyhow::ensure!(
                outputs.iter().all(|o| o.tokens.len() == args.new_tokens),
                "a sentence stopped early"
            );
        }
        let s = median(secs.clone());
        let sentences = batch as f64 / s;
        let tokens = (batch * args.new_tokens) as f64 / s;
        println!(
            "kiln ({}): batch {batch}, beams {}: {s:.2} s per call | {sentences:.2} sentences/s | \
             {tokens:.1} tokens/s | memory limit {limit_s:.2} s ({:.0}%: {:.0} MB per step at \
             {bandwidth:.1} GB/s)",
            backend::NAME,
            args.beams,
            100.0 * limit_s / s,
            bytes.per_step as f64 / 1e6,
        );
        let json = serde_json::json!({
            "impl": "kiln", "backend": backend::NAME, "batch": batch, "beams": args.beams,
            "weights": format!("{:?}/{:?}/act-{:?}", args.dtype, args.quant, args.activations).to_lowercase(),
            "src_len": args.src_len, "gen": args.new_tokens, "seconds": s, "seconds_runs": secs,
            "sentences_per_s": sentences, "tokens_per_s": tokens,
            "bandwidth_gb_s": bandwidth, "bytes_once": bytes.once, "bytes_per_step": bytes.per_step,
            "memory_limit_s": limit_s, "fraction_of_memory_limit": limit_s / s,
        });
        println!("{json}");
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Probed first, so its 1 GiB is gone again before the model loads.
    let bandwidth = if args.no_probe {
        f64::NAN
    } else {
        roofline::probe_bandwidth()
    };
    let device = backend::device();
    let t = Instant::now();
    let options = LoadOptions::default()
        .with_dtype(args.dtype)
        .with_quantization(args.quant)
        .with_activations(args.activations)
        .with_host_kernels(if args.no_host_kernels {
            HostKernels::Never
        } else {
            HostKernels::Auto
        });
    let spec = args.model.to_str().context("UTF-8 path")?;
    let mut loaded = auto::load_seq2seq_with::<B>(spec, &device, &options)
        .with_context(|| format!("loading {}", args.model.display()))?;
    eprintln!("loaded in {:.1} s", t.elapsed().as_secs_f64());
    match &mut loaded.model {
        Seq2SeqModel::M2M100(model) => bench(model, &args, bandwidth),
        Seq2SeqModel::T5(model) => bench(model, &args, bandwidth),
    }
}
