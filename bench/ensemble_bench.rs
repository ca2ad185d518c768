//! Time per generated token of DeePEn against its members, on random-weight models at real
//! shapes built in memory (no checkpoint needed) with real tokenizers.
//!
//! ```text
//! cargo run --example ensemble_bench -- --tokens 16
//! cargo run --example ensemble_bench -- --tokens 16 --top-k 32 --max-anchors 8192
//! ```
//!
//! Main: SmolLM2-135M shapes (vocab 49152, byte-level BPE); assistant: a Llama of ~120M
//! parameters with Mistral-7B's 32000-token SentencePiece vocabulary. Tokenizers come from
//! `../shared/tokenizers/` (see its README). Reports each member alone, their sum, the
//! ensemble with dense and top-k relative matrices, the top-k/dense token agreement, and the
//! process's peak resident memory after each phase.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use kiln::backend::{Backend, NAME, device};
use kiln::core::packed::PackedFormat;
use kiln::core::{GenerationConfig, Tokenizer};
use kiln::ensemble::{
    AnchorConfig, DecoderMember, Ensemble, EnsembleConfig, Member, RelativeConfig, SearchConfig,
    SearchGradient,
};
use kiln::llama::LlamaConfig;

#[derive(Parser, Debug)]
struct Args {
    /// Generated tokens per timed run.
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// k of the sparse relative matrices.
    #[arg(long, default_value_t = 32)]
    top_k: usize,
    /// Anchors used (default: all shared tokens).
    #[arg(long)]
    max_anchors: Option<usize>,
    /// Steps of the inverse search (0 measures everything but the search).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Repetitions (members and ensemble interleaved); medians are reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Compute the search's gradient with Burn's autodiff instead of its closed form.
    #[arg(long)]
    autodiff: bool,
    /// Skip the dense ensemble (its matrices are |V| x |A| values each).
    #[arg(long)]
    no_dense: bool,
    /// Formats of the dense matrices to run (f32 is exact; f16, bf16, q8_0 stream fewer bytes).
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    dense_formats: Vec<PackedFormat>,
    /// Folder of the real tokenizers.
    #[arg(long, default_value = "../shared/tokenizers")]
    tokenizers: PathBuf,
    /// The prompt.
    #[arg(long, default_value = "The history of the city begins in the year")]
    prompt: String,
}

fn config(
    vocab: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv: usize,
    mlp: usize,
    tied: bool,
) -> Result<LlamaConfig> {
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "intermediate_size": mlp, "tie_word_embeddings": tied, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2,
    });
    Ok(LlamaConfig::from_json(
        json,
        std::path::Path::new("<bench>"),
    )?)
}

fn member(
    name: &str,
    config: &LlamaConfig,
    tokenizer: &std::path::Path,
) -> Result<Box<dyn Member<Backend>>> {
    let tokenizer =
        Tokenizer::from_dir(tokenizer).with_context(|| format!("{}", tokenizer.display()))?;
    // `init` gives randomly initialised weights (Burn's default initialisers).
    let model = config.init::<Backend>(&device());
    let embeddings = model.model.embed_tokens.dense_weight();
    // No EOS: every run generates exactly `tokens` tokens.
    Ok(Box::new(DecoderMember::new(
        name,
        model,
        tokenizer,
        embeddings,
        vec![],
    )))
}

fn peak_rss_gb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1e6)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds per token over `n` tokens, prefill removed (a 1-token run is subtracted).
fn per_token(mut run: impl FnMut(usize) -> Result<Vec<u32>>, n: usize) -> Result<(f64, Vec<u32>)> {
    run(1)?; // warm-up
    let t = Instant::now();
    run(1)?;
    let one = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let tokens = run(n)?;
    let all = t.elapsed().as_secs_f64();
    Ok(((all - one) / (n - 1) as f64, tokens))
}

/// Each member alone and the ensemble, interleaved rep by rep (the machine's speed drifts, so a
/// ratio is taken within one window): the median seconds per token of each member, of their sum
/// per rep and of the ensemble, and the ensemble's last tokens.
fn interleaved(e: &mut Ensemble<Backend>, args: &Args) -> Result<([f64; 2], f64, f64, Vec<u32>)> {
    let generation = |n| GenerationConfig::default().with_max_new_tokens(n);
    let (mut alone, mut sums) = ([Vec::new(), Vec::new()], Vec::new());
    let (mut together, mut tokens) = (Vec::new(), Vec::new());
    for _ in 0..args.reps {
        let mut sum = 0.0;
        for (m, times) in alone.iter_mut().enumerate() {
            let run = |n| Ok(e.generate_member(m, &args.prompt, &generation(n))?.tokens);
            let (s, _) = per_token(run, args.tokens)?;
            times.push(s);
            sum += s;
        }
        sums.push(sum);
        let (s, t) = per_token(
            |n| Ok(e.generate(&[&args.prompt], &generation(n))?.tokens),
            args.tokens,
        )?;
        together.push(s);
        tokens = t;
    }
    Ok((alone.map(median), median(sums), median(together), tokens))
}

/// Milliseconds of one DeePEn combination step (both mappings, the average and the search) on
/// random logits, without the members' forwards: the median of 9 runs.
fn combination_ms(ensemble: &Ensemble<Backend>) -> Result<f64> {
    use burn::tensor::{Distribution, Tensor};
    let logits: Vec<Tensor<Backend, 1>> = ensemble
        .relative()
        .iter()
        .map(|r| Tensor::random([r.vocab()], Distribution::Normal(0.0, 3.0), &device()))
        .collect();
    let mut times = Vec::new();
    for _ in 0..9 {
        let t = Instant::now();
        let out = ensemble.deepen_logits(&logits)?;
        // Reading the result back waits for the backend (and is what generation does).
        let _ = out.into_data();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.tokens >= 2, "--tokens must be at least 2");
    anyhow::ensure!(args.reps >= 1, "--reps must be at least 1");
    let smol_tok = args.tokenizers.join("smollm2-135m-instruct");
    let mistral_tok = args.tokenizers.join("mistral-7b-v0.1");
    let smol = config(49152, 576, 30, 9, 3, 1536, true)?;
    let small32k = config(32000, 768, 12, 12, 4, 2048, false)?;
    let build = |relative: RelativeConfig| -> Result<(Ensemble<Backend>, f64)> {
        let t = Instant::now();
        let members = vec![
            member("smollm2-135m", &smol, &smol_tok)?,
            member("llama-120m-32k", &small32k, &mistral_tok)?,
        ];
        let config = EnsembleConfig::default()
            .with_anchors(AnchorConfig::default().with_max_anchors(args.max_anchors))
            .with_relative(relative)
            .with_search(
                SearchConfig::default()
                    .with_steps(args.steps)
                    .with_gradient(if args.autodiff {
                        SearchGradient::Autodiff
                    } else {
                        SearchGradient::Analytic
                    }),
            );
        let e = Ensemble::new(members, config)?;
        Ok((e, t.elapsed().as_secs_f64()))
    };
    println!(
        "backend {NAME}, {} tokens per run, prompt {:?}",
        args.tokens, args.prompt
    );

    let (mut sparse, build_s) = build(RelativeConfig::default().with_top_k(Some(args.top_k)))?;
    let anchors = sparse.anchors().map_or(0, |a| a.len());
    println!(
        "anchors {anchors}; top-{} matrices {:.1} MB, built in {build_s:.1}s",
        args.top_k,
        sparse
            .relative()
            .iter()
            .map(|r| r.size_bytes())
            .sum::<usize>() as f64
            / 1e6
    );
    let names: Vec<String> = (0..2)
        .map(|m| sparse.members()[m].name().to_string())
        .collect();
    let (alone, sum, together, sparse_tokens) = interleaved(&mut sparse, &args)?;
    for (name, s) in names.iter().zip(alone) {
        println!("| {name} alone | {:.1} ms | |", s * 1e3);
    }
    println!("| sum of members | {:.1} ms | |", sum * 1e3);
    println!(
        "| DeePEn combination alone (map + search) | {:.1} ms | |",
        combination_ms(&sparse)?
    );
    let s = together;
    println!(
        "| DeePEn top-{} | {:.1} ms ({:.2}x the sum) | peak RSS {:.2} GB |",
        args.top_k,
        s * 1e3,
        s / sum,
        peak_rss_gb()
    );
    drop(sparse);
    for &format in if args.no_dense {
        &[][..]
    } else {
        &args.dense_formats[..]
    } {
        let (mut dense, build_s) = build(RelativeConfig::default().with_dense_format(format))?;
        println!(
            "dense {format} matrices {:.1} MB, built in {build_s:.1}s",
            dense
                .relative()
                .iter()
                .map(|r| r.size_bytes())
                .sum::<usize>() as f64
                / 1e6
        );
        // The members again beside the dense ensemble: the ratio is taken in one window.
        let (_, sum, s, dense_tokens) = interleaved(&mut dense, &args)?;
        println!(
            "| DeePEn dense {format} | {:.1} ms ({:.2}x the members' {:.1} ms) | combination \
             alone {:.1} ms | peak RSS {:.2} GB |",
            s * 1e3,
            s / sum,
            sum * 1e3,
            combination_ms(&dense)?,
            peak_rss_gb()
        );
        let prefix = sparse_tokens
            .iter()
            .zip(&dense_tokens)
            .take_while(|(a, b)| a == b)
            .count();
        let same = sparse_tokens
            .iter()
            .zip(&dense_tokens)
            .filter(|(a, b)| a == b)
            .count();
        println!(
            "top-{} vs dense: first {prefix} of {} tokens identical, {same} equal position by position",
            args.top_k,
            dense_tokens.len()
        );
    }
    Ok(())
}
