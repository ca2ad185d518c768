//! The candle side of kiln's CPU benchmark: the same measurement as kiln's `bench/bench.rs`
//! (load time, prefill tok/s, greedy cached decode tok/s, peak RSS) on the same HF-layout
//! folder, with `candle_transformers::models::llama::Llama` in f32 on the CPU.
//!
//! A `.gguf` file is run with `candle_transformers::models::quantized_llama` instead: weights stay
//! quantised (candle's own path for GGUF, as its `quantized` example), activations f32.
//!
//! ```text
//! cargo run --release -- --model /tmp/tinyllama-random --prompt-len 128 --gen 32 --repeats 3
//! cargo run --release -- --model ~/.cache/kiln/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::{Cache, Config, Llama, LlamaConfig};
use candle_transformers::models::quantized_llama::ModelWeights;
use clap::Parser;

/// Measures load time, prefill and decode throughput and peak memory of a Llama checkpoint
/// with candle on the CPU (f32), and prints a table row and a JSON line.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Folder in HF layout (config.json + model.safetensors or shards with an index json), or a
    /// llama.cpp `.gguf` file.
    #[arg(long)]
    model: PathBuf,
    /// Prompt length in tokens (random ids, seeded; the same ids as kiln's bench).
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Number of greedy decode steps, one token each, with the KV cache.
    #[arg(long, default_value_t = 32)]
    gen: usize,
    /// Measured runs (prefill + decode each, fresh cache); the table shows the median and best.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Unmeasured warm-up runs first (a short prefill and two decode steps each).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Seed of the random prompt.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// splitmix64; kiln's bench uses the same generator so both feed identical prompts.
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

/// `VmHWM` / `VmRSS` of this process in GiB.
fn rss_gib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / (1024.0 * 1024.0))
}

fn weight_files(dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let value: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&index).with_context(|| format!("reading {}", index.display()))?,
    )?;
    let mut files: Vec<String> = value["weight_map"]
        .as_object()
        .context("index json without weight_map")?
        .values()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

fn argmax(logits: &Tensor) -> Result<u32> {
    Ok(logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?)
}

struct Run {
    prefill_s: f64,
    decode_s: f64,
}

/// The two candle models, behind one "fresh cache, then forward at a position" interface.
enum Model {
    F32 {
        model: Llama,
        config: Config,
        cache: Option<Cache>,
    },
    Quantized(ModelWeights),
}

impl Model {
    fn reset(&mut self, device: &Device) -> Result<()> {
        match self {
            Model::F32 { config, cache, .. } => {
                *cache = Some(Cache::new(true, DType::F32, config, device)?)
            }
            Model::Quantized(m) => m.clear_kv_cache(),
        }
        Ok(())
    }

    fn forward(&mut self, input: &Tensor, pos: usize) -> Result<Tensor> {
        Ok(match self {
            Model::F32 { model, cache, .. } => {
                model.forward(input, pos, cache.as_mut().context("reset first")?)?
            }
            Model::Quantized(m) => m.forward(input, pos)?,
        })
    }
}

fn run_once(model: &mut Model, device: &Device, ids: &[u32], gen: usize) -> Result<Run> {
    model.reset(device)?;
    let input = Tensor::new(ids, device)?.unsqueeze(0)?;
    let t = Instant::now();
    let logits = model.forward(&input, 0)?;
    let mut next = argmax(&logits)?;
    let prefill_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for step in 0..gen {
        let input = Tensor::new(&[next], device)?.unsqueeze(0)?;
        let logits = model.forward(&input, ids.len() + step)?;
        next = argmax(&logits)?;
    }
    let decode_s = t.elapsed().as_secs_f64();
    Ok(Run {
        prefill_s,
        decode_s,
    })
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
    let device = Device::Cpu;

    let t = Instant::now();
    let gguf = args.model.extension().is_some_and(|e| e == "gguf");
    let (mut model, vocab, dtype) = if gguf {
        let mut file = std::fs::File::open(&args.model)
            .with_context(|| format!("opening {}", args.model.display()))?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
        let vocab = content
            .metadata
            .get("tokenizer.ggml.tokens")
            .context("GGUF without tokenizer.ggml.tokens")?
            .to_vec()?
            .len();
        let weights = ModelWeights::from_gguf(content, &mut file, &device)?;
        (Model::Quantized(weights), vocab, "quantized")
    } else {
        let raw = std::fs::read(args.model.join("config.json"))
            .with_context(|| format!("reading {}/config.json", args.model.display()))?;
        let llama_config: LlamaConfig = serde_json::from_slice(&raw)?;
        let config = llama_config.into_config(false);
        let files = weight_files(&args.model)?;
        // SAFETY: the checkpoint is not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &device)? };
        let model = Llama::load(vb, &config)?;
        let vocab = config.vocab_size;
        (
            Model::F32 {
                model,
                config,
                cache: None,
            },
            vocab,
            "f32",
        )
    };
    let load_s = t.elapsed().as_secs_f64();
    let rss_after_load = rss_gib("VmRSS:");

    let ids = prompt(args.seed, args.prompt_len, vocab);
    for _ in 0..args.warmup {
        run_once(&mut model, &device, &ids[..ids.len().min(16)], 2)?;
    }
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for r in 0..args.repeats {
        let run = run_once(&mut model, &device, &ids, args.gen)?;
        let (p, d) = (
            args.prompt_len as f64 / run.prefill_s,
            args.gen as f64 / run.decode_s,
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

    println!(
        "candle (cpu, {dtype}, {} threads): load {load_s:.2} s | prefill {:.2} tok/s (best {:.2}) | \
         decode {:.2} tok/s (best {:.2}) | peak RSS {peak:.2} GiB (after load {rss_after_load:.2})",
        candle_core::utils::get_num_threads(),
        median(prefill.clone()),
        best(&prefill),
        median(decode.clone()),
        best(&decode),
    );
    let json = serde_json::json!({
        "impl": "candle",
        "backend": "cpu",
        "weights": dtype,
        "threads": candle_core::utils::get_num_threads(),
        "model": args.model.display().to_string(),
        "prompt_len": args.prompt_len,
        "gen": args.gen,
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
