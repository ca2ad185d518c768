//! Writes a Llama checkpoint with random weights at a real model's shapes, in HF layout
//! (`config.json`, `model.safetensors`, optionally a real `tokenizer.json`), for benchmarks
//! (`bench/bench.rs`, `bench/candle`) that need real sizes but no download.
//!
//! ```text
//! cargo run --release --example random_checkpoint -- --preset tinyllama-1.1b --out /tmp/tinyllama-random
//! cargo run --release --example random_checkpoint -- --preset llama2-7b --dtype bf16 --out /tmp/llama2-7b-random
//! cargo run --release --example random_checkpoint -- --preset tinyllama-1.1b --gguf q4_0 --out /tmp/tinyllama-q4_0
//! cargo run --release --example random_checkpoint -- --preset smollm2-135m \
//!     --tokenizer /work/shared/tokenizers/smollm2-135m-instruct/tokenizer.json --out /tmp/smollm2-random
//! ```
//!
//! Weights are normal with standard deviation `--std` (RMS norm weights are ones, as HF
//! initialises them), from a seeded generator: the same arguments give the same bytes. Tensors
//! are generated one at a time while the file is written, so memory stays at about one tensor
//! (a 7B f32 checkpoint is 27 GB on disk, not in RAM).
//!
//! With `--gguf q4_0|q8_0|q4_k_m` it writes `model.gguf` instead, the same random weights
//! quantised by ggml's reference quantisers (kiln's `PackedMatrix::from_f32`; `q4_k_m` picks
//! Q4_K/Q6_K per matrix as llama.cpp's Q4_K_M does, with its Q5_0/Q8_0 fallbacks where a width
//! is not a whole number of 256-value super-blocks), llama.cpp's tensor names, and a
//! synthetic SentencePiece vocabulary (`<unk>`, `<s>`, `</s>`, the 256 byte tokens, then
//! `t<i>`), so that kiln, candle and llama.cpp can all load it. Q/K rows are not permuted:
//! the weights are random, so no reader can tell.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::{bf16, f16};
use clap::{Parser, ValueEnum};
use safetensors::{Dtype, View};

/// Model shapes to imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Preset {
    /// TinyLlama 1.1B: hidden 2048, MLP 5632, 22 layers, 32 heads / 4 kv heads, vocab 32000.
    #[value(name = "tinyllama-1.1b")]
    TinyLlama,
    /// Llama 2 7B: hidden 4096, MLP 11008, 32 layers, 32 heads (MHA), vocab 32000.
    #[value(name = "llama2-7b")]
    Llama2_7b,
    /// SmolLM2 135M: hidden 576, MLP 1536, 30 layers, 9 heads / 3 kv heads, vocab 49152, tied.
    #[value(name = "smollm2-135m")]
    SmolLm2_135m,
}

/// Storage type of the weights on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StoreDtype {
    /// 32-bit float (4 bytes a weight).
    F32,
    /// bfloat16 (2 bytes a weight; what most hub checkpoints use).
    Bf16,
    /// IEEE half precision (2 bytes a weight).
    F16,
}

/// Writes an HF-layout Llama checkpoint with random (seeded, normal) weights at a real model's
/// shapes: config.json, model.safetensors and, with --tokenizer, a copy of a real tokenizer.json.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Which model's shapes and hyper-parameters to use.
    #[arg(long, value_enum)]
    preset: Preset,
    /// Output folder (created; existing files in it are overwritten).
    #[arg(long)]
    out: PathBuf,
    /// Storage dtype of model.safetensors (loaders convert it to their compute dtype).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: StoreDtype,
    /// A tokenizer.json to copy into the folder; its ids must fit the preset's vocabulary
    /// (e.g. /work/shared/tokenizers/smollm2-135m-instruct/tokenizer.json for smollm2-135m,
    /// /work/shared/tokenizers/mistral-7b-v0.1/tokenizer.json for the 32000-token presets).
    /// Without it the folder has no tokenizer.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Seed of the weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Standard deviation of the weights (HF's `initializer_range`).
    #[arg(long, default_value_t = 0.02)]
    std: f32,
    /// Write `model.gguf` with the matrices in this ggml block type instead of safetensors.
    #[arg(long, value_enum)]
    gguf: Option<GgufType>,
}

/// Block types of the `--gguf` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum GgufType {
    /// ggml Q4_0 (4.5 bits a weight).
    #[value(name = "q4_0")]
    Q4_0,
    /// ggml Q8_0 (8.5 bits a weight).
    #[value(name = "q8_0")]
    Q8_0,
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the embedding and some `attn_v`/`ffn_down`.
    #[value(name = "q4_k_m")]
    Q4KM,
}

/// The hyper-parameters written to config.json.
struct Shape {
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    rope_theta: f64,
    max_pos: usize,
    rms_eps: f64,
    tied: bool,
    bos: u32,
    eos: u32,
}

impl Preset {
    fn shape(self) -> Shape {
        match self {
            Preset::TinyLlama => Shape {
                hidden: 2048,
                intermediate: 5632,
                layers: 22,
                heads: 32,
                kv_heads: 4,
                vocab: 32000,
                rope_theta: 10000.0,
                max_pos: 2048,
                rms_eps: 1e-5,
                tied: false,
                bos: 1,
                eos: 2,
            },
            Preset::Llama2_7b => Shape {
                hidden: 4096,
                intermediate: 11008,
                layers: 32,
                heads: 32,
                kv_heads: 32,
                vocab: 32000,
                rope_theta: 10000.0,
                max_pos: 4096,
                rms_eps: 1e-5,
                tied: false,
                bos: 1,
                eos: 2,
            },
            Preset::SmolLm2_135m => Shape {
                hidden: 576,
                intermediate: 1536,
                layers: 30,
                heads: 9,
                kv_heads: 3,
                vocab: 49152,
                rope_theta: 100000.0,
                max_pos: 8192,
                rms_eps: 1e-5,
                tied: true,
                bos: 1,
                eos: 2,
            },
        }
    }
}

/// How a tensor's values are made.
#[derive(Clone, Copy)]
enum Init {
    Normal { seed: u64, std: f32 },
    Ones,
}

/// A tensor that is generated only when the writer asks for its bytes.
struct LazyTensor {
    shape: Vec<usize>,
    dtype: StoreDtype,
    init: Init,
}

impl LazyTensor {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl View for LazyTensor {
    fn dtype(&self) -> Dtype {
        match self.dtype {
            StoreDtype::F32 => Dtype::F32,
            StoreDtype::Bf16 => Dtype::BF16,
            StoreDtype::F16 => Dtype::F16,
        }
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(generate(self.numel(), self.dtype, self.init))
    }

    fn data_len(&self) -> usize {
        let width = match self.dtype {
            StoreDtype::F32 => 4,
            StoreDtype::Bf16 | StoreDtype::F16 => 2,
        };
        self.numel() * width
    }
}

/// splitmix64: tiny, fast, and good enough for benchmark weights.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 + 1.0) * (1.0 / (1u64 << 24) as f32)
    }
}

/// Elements per independently seeded chunk (so threads can fill chunks in parallel and the
/// result does not depend on the thread count).
const CHUNK: usize = 1 << 16;

/// `numel` values as little-endian bytes of `dtype`.
fn generate(numel: usize, dtype: StoreDtype, init: Init) -> Vec<u8> {
    let width = match dtype {
        StoreDtype::F32 => 4,
        StoreDtype::Bf16 | StoreDtype::F16 => 2,
    };
    let mut bytes = vec![0u8; numel * width];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunks: Vec<(usize, &mut [u8])> = bytes.chunks_mut(CHUNK * width).enumerate().collect();
    let per_thread = chunks.len().div_ceil(threads).max(1);
    let mut chunks = chunks;
    std::thread::scope(|scope| {
        while !chunks.is_empty() {
            let rest = chunks.split_off(chunks.len().min(per_thread));
            let mine = std::mem::replace(&mut chunks, rest);
            scope.spawn(move || {
                for (index, out) in mine {
                    fill(out, index as u64, dtype, init, width);
                }
            });
        }
    });
    bytes
}

fn fill(out: &mut [u8], chunk: u64, dtype: StoreDtype, init: Init, width: usize) {
    let (mut rng, std) = match init {
        Init::Normal { seed, std } => (
            SplitMix(seed ^ chunk.wrapping_mul(0xD1B5_4A32_D192_ED03)),
            std,
        ),
        Init::Ones => (SplitMix(0), 0.0),
    };
    let mut spare: Option<f32> = None;
    for slot in out.chunks_exact_mut(width) {
        let x = match init {
            Init::Ones => 1.0,
            Init::Normal { .. } => match spare.take() {
                Some(z) => z * std,
                None => {
                    // Box-Muller: two normals from two uniforms.
                    let (u1, u2) = (rng.unit(), rng.unit());
                    let r = (-2.0 * u1.ln()).sqrt();
                    let theta = std::f32::consts::TAU * u2;
                    spare = Some(r * theta.sin());
                    r * theta.cos() * std
                }
            },
        };
        match dtype {
            StoreDtype::F32 => slot.copy_from_slice(&x.to_le_bytes()),
            StoreDtype::Bf16 => slot.copy_from_slice(&bf16::from_f32(x).to_bits().to_le_bytes()),
            StoreDtype::F16 => slot.copy_from_slice(&f16::from_f32(x).to_bits().to_le_bytes()),
        }
    }
}

/// A per-tensor seed from the global seed and the tensor's name (FNV-1a).
fn tensor_seed(seed: u64, name: &str) -> u64 {
    let mut h = 0xCBF2_9CE4_8422_2325u64 ^ seed;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// The checkpoint's tensors by HF name.
fn tensors(shape: &Shape, args: &Args) -> Vec<(String, LazyTensor)> {
    let head_dim = shape.hidden / shape.heads;
    let (d, q, kv, m) = (
        shape.hidden,
        shape.heads * head_dim,
        shape.kv_heads * head_dim,
        shape.intermediate,
    );
    let mut out = Vec::new();
    let mut add = |name: String, dims: Vec<usize>, ones: bool| {
        let init = if ones {
            Init::Ones
        } else {
            Init::Normal {
                seed: tensor_seed(args.seed, &name),
                std: args.std,
            }
        };
        out.push((
            name,
            LazyTensor {
                shape: dims,
                dtype: args.dtype,
                init,
            },
        ));
    };
    add(
        "model.embed_tokens.weight".into(),
        vec![shape.vocab, d],
        false,
    );
    for l in 0..shape.layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.self_attn.q_proj.weight"), vec![q, d], false);
        add(format!("{p}.self_attn.k_proj.weight"), vec![kv, d], false);
        add(format!("{p}.self_attn.v_proj.weight"), vec![kv, d], false);
        add(format!("{p}.self_attn.o_proj.weight"), vec![d, q], false);
        add(format!("{p}.mlp.gate_proj.weight"), vec![m, d], false);
        add(format!("{p}.mlp.up_proj.weight"), vec![m, d], false);
        add(format!("{p}.mlp.down_proj.weight"), vec![d, m], false);
        add(format!("{p}.input_layernorm.weight"), vec![d], true);
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![d],
            true,
        );
    }
    add("model.norm.weight".into(), vec![d], true);
    if !shape.tied {
        add("lm_head.weight".into(), vec![shape.vocab, d], false);
    }
    out
}

fn config_json(shape: &Shape, args: &Args) -> serde_json::Value {
    let dtype = match args.dtype {
        StoreDtype::F32 => "float32",
        StoreDtype::Bf16 => "bfloat16",
        StoreDtype::F16 => "float16",
    };
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.hidden / shape.heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": shape.max_pos,
        "rms_norm_eps": shape.rms_eps,
        "rope_theta": shape.rope_theta,
        "rope_scaling": null,
        "tie_word_embeddings": shape.tied,
        "attention_bias": false,
        "mlp_bias": false,
        "attention_dropout": 0.0,
        "initializer_range": args.std,
        "bos_token_id": shape.bos,
        "eos_token_id": shape.eos,
        "torch_dtype": dtype,
        "use_cache": true,
        "kiln_random_checkpoint": {
            "preset": format!("{:?}", args.preset),
            "seed": args.seed,
            "std": args.std,
        },
    })
}

/// Largest token id a tokenizer.json can produce (model vocabulary and added tokens).
fn max_token_id(path: &Path) -> Result<u64> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mut max = 0u64;
    if let Some(vocab) = value["model"]["vocab"].as_object() {
        max = vocab
            .values()
            .filter_map(|v| v.as_u64())
            .fold(max, u64::max);
    } else if let Some(vocab) = value["model"]["vocab"].as_array() {
        // Unigram: a list of [piece, score]; ids are positions.
        max = max.max(vocab.len().saturating_sub(1) as u64);
    }
    if let Some(added) = value["added_tokens"].as_array() {
        max = added
            .iter()
            .filter_map(|t| t["id"].as_u64())
            .fold(max, u64::max);
    }
    Ok(max)
}

/// The llama.cpp name of an HF tensor name.
fn gguf_name(hf: &str) -> String {
    let hf = hf.strip_suffix(".weight").unwrap_or(hf);
    let name = match hf {
        "model.embed_tokens" => "token_embd".to_string(),
        "model.norm" => "output_norm".to_string(),
        "lm_head" => "output".to_string(),
        other => {
            let rest = other.strip_prefix("model.layers.").expect("a layer tensor");
            let (layer, part) = rest.split_once('.').expect("layer.part");
            let part = match part {
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                "input_layernorm" => "attn_norm",
                "post_attention_layernorm" => "ffn_norm",
                other => panic!("unknown tensor {other}"),
            };
            format!("blk.{layer}.{part}")
        }
    };
    name + ".weight"
}

fn write_gguf(shape: &Shape, args: &Args, kind: GgufType) -> Result<()> {
    use kiln::core::packed::{PackedFormat, PackedMatrix};
    use kiln_gguf::writer::{TensorSpec, write_gguf};
    use kiln_gguf::{GgmlType, Value, ValueType};

    let mut specs = Vec::new();
    for (name, t) in tensors(shape, args) {
        let cols = t.shape.last().copied().unwrap_or(0);
        let (format, ggml_type) = match kind {
            GgufType::Q4_0 => (PackedFormat::Q4_0, GgmlType::Q4_0),
            GgufType::Q8_0 => (PackedFormat::Q8_0, GgmlType::Q8_0),
            GgufType::Q4KM => {
                match kiln_gguf::writer::q4_k_m_type(&gguf_name(&name), cols, shape.layers) {
                    Some(GgmlType::Q6_K) => (PackedFormat::Q6_K, GgmlType::Q6_K),
                    Some(GgmlType::Q8_0) => (PackedFormat::Q8_0, GgmlType::Q8_0),
                    Some(GgmlType::Q5_0) => (PackedFormat::Q5_0, GgmlType::Q5_0),
                    _ => (PackedFormat::Q4_K, GgmlType::Q4_K),
                }
            }
        };
        let values: Vec<f32> = generate(t.numel(), StoreDtype::F32, t.init)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let (ggml_type, data, dims) = match t.shape.as_slice() {
            [rows, cols] => {
                let packed = PackedMatrix::from_f32(*rows, *cols, &values, format)?;
                (
                    ggml_type,
                    packed.bytes().to_vec(),
                    vec![*cols as u64, *rows as u64],
                )
            }
            _ => (
                GgmlType::F32,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                vec![t.numel() as u64],
            ),
        };
        specs.push(TensorSpec {
            name: gguf_name(&name),
            dims,
            ggml_type,
            data,
        });
    }
    let mut tokens = vec!["<unk>".to_string(), "<s>".to_string(), "</s>".to_string()];
    tokens.extend((0..256).map(|b| format!("<0x{b:02X}>")));
    tokens.extend((tokens.len()..shape.vocab).map(|i| format!("t{i}")));
    let n = tokens.len();
    let array = |elem_type, items| Value::Array { elem_type, items };
    let types: Vec<Value> = (0..n)
        .map(|i| {
            Value::I32(match i {
                0 => 2,
                1 | 2 => 3,
                3..=258 => 6,
                _ => 1,
            })
        })
        .collect();
    let u32v = |v: usize| Value::U32(v as u32);
    let kvs: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        (
            "general.name",
            Value::String(format!("kiln random {:?}", args.preset)),
        ),
        ("llama.block_count", u32v(shape.layers)),
        ("llama.context_length", u32v(shape.max_pos)),
        ("llama.embedding_length", u32v(shape.hidden)),
        ("llama.feed_forward_length", u32v(shape.intermediate)),
        ("llama.attention.head_count", u32v(shape.heads)),
        ("llama.attention.head_count_kv", u32v(shape.kv_heads)),
        (
            "llama.rope.dimension_count",
            u32v(shape.hidden / shape.heads),
        ),
        ("llama.rope.freq_base", Value::F32(shape.rope_theta as f32)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(shape.rms_eps as f32),
        ),
        ("llama.vocab_size", u32v(shape.vocab)),
        ("tokenizer.ggml.model", Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens",
            array(
                ValueType::String,
                tokens.into_iter().map(Value::String).collect(),
            ),
        ),
        (
            "tokenizer.ggml.scores",
            array(ValueType::F32, vec![Value::F32(0.0); n]),
        ),
        ("tokenizer.ggml.token_type", array(ValueType::I32, types)),
        ("tokenizer.ggml.bos_token_id", Value::U32(shape.bos)),
        ("tokenizer.ggml.eos_token_id", Value::U32(shape.eos)),
    ];
    let path = args.out.join("model.gguf");
    let bytes = write_gguf(3, &kvs, &specs, 32);
    std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "wrote {} ({:.2} GB, {kind:?})",
        path.display(),
        bytes.len() as f64 / 1e9
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let shape = args.preset.shape();
    if shape.hidden % shape.heads != 0 || shape.heads % shape.kv_heads != 0 {
        bail!("inconsistent preset shape");
    }
    if let Some(kind) = args.gguf {
        std::fs::create_dir_all(&args.out)
            .with_context(|| format!("creating {}", args.out.display()))?;
        return write_gguf(&shape, &args, kind);
    }
    if let Some(tok) = &args.tokenizer {
        let max = max_token_id(tok)?;
        if max >= shape.vocab as u64 {
            bail!(
                "{} has token ids up to {max}, but {:?} has a vocabulary of {}: pick a \
                 tokenizer of that size (or none)",
                tok.display(),
                args.preset,
                shape.vocab
            );
        }
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    let config = config_json(&shape, &args);
    std::fs::write(
        args.out.join("config.json"),
        serde_json::to_string_pretty(&config)? + "\n",
    )?;
    let generation = serde_json::json!({
        "bos_token_id": shape.bos,
        "eos_token_id": shape.eos,
        "do_sample": false,
    });
    std::fs::write(
        args.out.join("generation_config.json"),
        serde_json::to_string_pretty(&generation)? + "\n",
    )?;
    let tokenizer_out = args.out.join("tokenizer.json");
    match &args.tokenizer {
        Some(tok) => {
            std::fs::copy(tok, &tokenizer_out)
                .with_context(|| format!("copying {}", tok.display()))?;
        }
        None => {
            // Leave no stale tokenizer from an earlier run in the folder.
            if tokenizer_out.exists() {
                std::fs::remove_file(&tokenizer_out)?;
            }
        }
    }

    let tensors = tensors(&shape, &args);
    let params: usize = tensors.iter().map(|(_, t)| t.numel()).sum();
    let bytes: usize = tensors.iter().map(|(_, t)| t.data_len()).sum();
    let path = args.out.join("model.safetensors");
    eprintln!(
        "writing {} tensors, {:.3}B parameters, {:.2} GB ({:?}) to {}",
        tensors.len(),
        params as f64 / 1e9,
        bytes as f64 / 1e9,
        args.dtype,
        path.display()
    );
    let start = Instant::now();
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(tensors, Some(metadata), &path)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("done in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}
