//! `kiln anchor`: AnLLM training and evaluation.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module};
use clap::{Args, Subcommand};
use kiln::anchor::score::{MaskedSession, greedy_decode, nll_masked, nll_streamed, score_choices};
use kiln::anchor::{
    AcInit, AnchorCheckpoint, AnchorMode, AnchorSession, AnchorSet, Corpus, FewShotFormat,
    FullSession, McQuestion, PositionMode, TrainConfig, add_ac_token, ep_anchor_ids,
    few_shot_choices, grow_vocab, load_checkpoint, read_questions, read_texts, save_checkpoint,
    tiny_config, tokenize, train,
};
use kiln::backend::{Backend, NAME, device};
use kiln::core::Tokenizer;
use kiln::llama::{Llama, LlamaConfig};

pub const LONG_ABOUT: &str = "\
Anchor-based LLMs (AnLLM, arXiv 2402.07616): train a Llama with the AnSAN attention mask, then
run it with an anchor-compressed KV cache (only anchors and the current sentence are kept).

Anchors are `.`-like tokens (--mode ep) or a new `<AC>` token put after every sentence
(--mode ac; added to the tokenizer and the embeddings, initialised from `.`). --mode causal
trains the plain baseline on the same text.

Examples:
  # a ~1M-parameter Llama from scratch on the step-by-step rationales, AC mode
  kiln anchor train --data ../shared/datasets/step-by-step/cqa/llm/train_CoT_0.json \\
      --tokenizer tests/fixtures/llama2-mha --mode ac --steps 300 --out runs/ac
  # continue a zoo model (HF folder) with EP anchors; resume after an interruption
  kiln anchor train --init ./TinyLlama --data corpus.txt --mode ep --out runs/ep --resume
  # held-out perplexity and CQA multiple choice, full vs anchor cache
  kiln anchor eval --model runs/ac --text ../shared/datasets/step-by-step/cqa/llm/test_CoT_0.json \\
      --choices ../shared/datasets/step-by-step/cqa/cqa_test.json --limit 50
  # generation with the anchor cache
  kiln generate --model runs/ac --anchor ac --prompt \"The sky is blue. Grass is\"
  # an HF folder (safetensors + config + tokenizer with <AC>) for transformers and kiln
  kiln anchor export --model runs/ac --out ac-hf";

#[derive(Args, Debug)]
pub struct AnchorArgs {
    #[command(subcommand)]
    command: AnchorCommand,
}

#[derive(Subcommand, Debug)]
enum AnchorCommand {
    /// Train (from scratch or continue a zoo model) with the AnSAN or causal mask.
    Train(Box<TrainArgs>),
    /// Perplexity and multiple-choice accuracy, KV-cache size and time: full vs anchor cache.
    Eval(EvalArgs),
    /// Write a trained model as an HF Llama folder that transformers and kiln load.
    #[command(long_about = EXPORT_ABOUT)]
    Export(ExportArgs),
}

const EXPORT_ABOUT: &str = "\
Write a model trained by `kiln anchor train` as a Hugging Face Llama folder:

  model.safetensors       f32 weights (no lm_head.weight when the head is tied)
  config.json             LlamaForCausalLM; vocab_size counts <AC>; BOS/EOS ids
  generation_config.json  BOS, EOS and pad ids
  tokenizer.json          the training tokenizer, <AC> an added special token
  tokenizer_config.json   PreTrainedTokenizerFast, <AC> in additional_special_tokens
  anchor.json             anchor mode and ids, BOS, position mode (kiln's; HF ignores it)

transformers loads it with AutoModelForCausalLM / AutoTokenizer and runs it with full attention
(the plain causal mask); `kiln generate --model DIR` does the same, and `--anchor ac` (or ep)
runs it with the anchor-compressed KV cache.

Example:
  kiln anchor export --model runs/ac --out ac-hf
  python3 -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('ac-hf')\"";

#[derive(Args, Debug)]
struct ExportArgs {
    /// A folder written by `kiln anchor train` (its final model or last checkpoint).
    #[arg(long)]
    model: PathBuf,
    /// The HF folder to write (created; files already there are replaced).
    #[arg(long)]
    out: PathBuf,
    /// Positions recorded in anchor.json for anchor-cache inference: compacted (the paper's) or
    /// true.
    #[arg(long, default_value = "compacted")]
    positions: String,
}

#[derive(Args, Debug)]
struct TrainArgs {
    /// Training text: plain text (a document per line), JSONL (--field) or a JSON array of strings.
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// JSONL field holding the text.
    #[arg(long)]
    field: Option<String>,
    /// Output folder (checkpoints, then the final model).
    #[arg(long)]
    out: PathBuf,
    /// ep, ac, or causal (the baseline).
    #[arg(long, default_value = "ac")]
    mode: String,
    /// EP mode: the tokens that are anchors, as exact vocabulary entries (the reference's
    /// `--anchor_symbols "."`), comma-separated, e.g. `.,!,?`.
    #[arg(long, value_delimiter = ',', default_value = ".")]
    anchor_symbols: Vec<String>,
    /// AC mode: how the new `<AC>` embedding row starts: `dot` copies the row of `.` (the
    /// reference code), `mean` is the mean of all rows (the paper's text).
    #[arg(long, value_parser = ["dot", "mean"], default_value = "dot")]
    ac_init: String,
    /// Continue this zoo model (HF folder or hub id) instead of training a small one from scratch.
    #[arg(long)]
    init: Option<String>,
    /// Tokenizer folder for a model from scratch.
    #[arg(long, default_value = "tests/fixtures/llama2-mha")]
    tokenizer: PathBuf,
    /// Hidden size / layers / heads of a model from scratch.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    #[arg(long, default_value_t = 4)]
    layers: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 300)]
    steps: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate. Default: 2e-5 with --init (the AnLLM reference's, constant after
    /// warm-up), else 3e-3 (cosine decay, for a small model from scratch).
    #[arg(long)]
    lr: Option<f64>,
    /// Warm-up steps. Default: 20 with --init (the reference's), else a tenth of --steps.
    #[arg(long)]
    warmup: Option<usize>,
    /// AdamW weight decay. Default: 0 with --init (the reference's), else 0.01.
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Clip gradients to this global L2 norm (0 = off). Default: 1.0 with --init (the
    /// reference's), else off.
    #[arg(long)]
    grad_clip: Option<f32>,
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    #[arg(long, default_value_t = 100)]
    save_every: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Use at most this many documents.
    #[arg(long)]
    limit: Option<usize>,
    /// Continue from the checkpoint in --out.
    #[arg(long)]
    resume: bool,
}

#[derive(Args, Debug)]
struct EvalArgs {
    /// A folder written by `kiln anchor train`.
    #[arg(long)]
    model: PathBuf,
    /// Held-out text for perplexity (same formats as train --data).
    #[arg(long)]
    text: Option<PathBuf>,
    /// CommonsenseQA-style JSONL (question, choices, answer) for multiple choice.
    #[arg(long)]
    choices: Option<PathBuf>,
    /// Few-shot demonstrations: the first N questions of --choices (with their answers; they
    /// are not scored).
    #[arg(long, default_value_t = 3)]
    shots: usize,
    /// Documents / questions to use.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Rotary positions of the anchor cache: compacted (the paper's inference code: cache
    /// length + offset) or true (the token's index; the same logits as the masked full forward).
    #[arg(long, default_value = "compacted")]
    positions: String,
    /// Where <AC> goes in the few-shot prompts: demonstrations (the paper, §4.3: after each
    /// demonstration only, the question stays fully visible) or sentences (after every
    /// sentence, the question's included).
    #[arg(long, value_parser = ["demonstrations", "sentences"], default_value = "demonstrations")]
    prompt_anchors: String,
    /// After the multiple choice, greedy-decode this many tokens after the first few-shot
    /// prompt with the full cache, the anchor cache and no cache (the AnSAN mask recomputed
    /// every step), and report time and KV bytes (0: skip).
    #[arg(long, default_value_t = 0)]
    decode: usize,
}

pub fn run(args: AnchorArgs) -> anyhow::Result<()> {
    match args.command {
        AnchorCommand::Train(a) => run_train(*a),
        AnchorCommand::Eval(a) => run_eval(a),
        AnchorCommand::Export(a) => {
            let mode: PositionMode = a.positions.parse()?;
            kiln::anchor::export::<Backend>(&a.model, &a.out, mode, &device())?;
            println!("{}", a.out.display());
            Ok(())
        }
    }
}

type A = Autodiff<Backend>;

fn run_train(args: TrainArgs) -> anyhow::Result<()> {
    let dev = device();
    let (model, tokenizer, config_json, bos): (
        Llama<A>,
        Tokenizer,
        serde_json::Value,
        Option<u32>,
    ) = match &args.init {
        Some(spec) => {
            let loaded =
                kiln::auto::load::<A>(spec, &dev).with_context(|| format!("loading {spec}"))?;
            let tokenizer = loaded
                .tokenizer
                .context("the model has no tokenizer.json")?;
            // From the loaded config, not the folder's config.json: a GGUF file has none.
            let json = loaded.model.config().to_hf_json();
            let bos = loaded.model.config().bos_token_id;
            (loaded.model, tokenizer, json, bos)
        }
        None => {
            let tokenizer = Tokenizer::from_dir(&args.tokenizer)?;
            // Room for <AC> from the start.
            let vocab = tokenizer.vocab_size() + usize::from(args.mode == "ac");
            let json = tiny_config(
                vocab,
                args.hidden,
                args.layers,
                args.heads,
                args.hidden * 8 / 3,
                4096,
            );
            let config = LlamaConfig::from_json(json.clone(), Path::new("config"))?;
            <A as burn::prelude::Backend>::seed(&dev, args.seed);
            let model: Llama<A> = kiln::anchor::init_model(&config, &dev);
            (model, tokenizer, json, tokenizer_bos(&args.tokenizer))
        }
    };
    let (model, tokenizer, anchors) = match args.mode.as_str() {
        "causal" => (model, tokenizer, None),
        "ep" => {
            let marks: Vec<&str> = args.anchor_symbols.iter().map(String::as_str).collect();
            let set = ep_anchor_ids(&tokenizer, &marks)?;
            (model, tokenizer, Some(set))
        }
        "ac" => {
            let (tokenizer, ac) = add_ac_token(&tokenizer)?;
            let model = if model.config().vocab_size <= ac as usize {
                let init = match args.ac_init.as_str() {
                    "mean" => AcInit::Mean,
                    _ => AcInit::Copy(
                        tokenizer
                            .encode(".", false)?
                            .last()
                            .copied()
                            .context("the tokenizer cannot encode `.`")?,
                    ),
                };
                grow_vocab(model, init)?
            } else {
                model
            };
            (
                model,
                tokenizer,
                Some(AnchorSet::new(AnchorMode::Ac, [ac])?),
            )
        }
        other => bail!("--mode `{other}`: expected ep, ac or causal"),
    };
    let mut texts = Vec::new();
    for path in &args.data {
        texts.extend(read_texts(path, args.field.as_deref())?);
    }
    if let Some(limit) = args.limit {
        texts.truncate(limit);
    }
    let ac = anchors.as_ref().filter(|a| a.mode == AnchorMode::Ac);
    let rows = tokenize(&tokenizer, &texts, ac, bos)?;
    let corpus = Corpus::new(rows, args.max_len);
    eprintln!(
        "kiln anchor: {} documents, {} parameters, mode {}, on {NAME}",
        corpus.rows.len(),
        model.num_params(),
        args.mode
    );
    // A pretrained model gets the reference's recipe; one from scratch the small-model one.
    let (base, lr, warmup) = if args.init.is_some() {
        (TrainConfig::pretrained(), 2e-5, 20)
    } else {
        (TrainConfig::default(), 3e-3, args.steps / 10)
    };
    let grad_clip = args
        .grad_clip
        .map_or(base.grad_clip, |c| (c > 0.0).then_some(c));
    let weight_decay = args.weight_decay.unwrap_or(base.weight_decay);
    let cfg = base
        .with_steps(args.steps)
        .with_warmup_steps(args.warmup.unwrap_or(warmup))
        .with_batch_size(args.batch_size)
        .with_grad_accum(args.grad_accum)
        .with_lr(args.lr.unwrap_or(lr))
        .with_weight_decay(weight_decay)
        .with_grad_clip(grad_clip)
        .with_seed(args.seed)
        .with_save_every(args.save_every)
        .with_log_every((args.steps / 20).max(1));
    let start = Instant::now();
    let (model, report) = train(
        model,
        &corpus,
        anchors.as_ref(),
        &cfg,
        Some(&args.out),
        args.resume,
        |step, loss, lr| {
            eprintln!(
                "step {step}/{}: loss {loss:.4}, lr {lr:.2e}, {:.0}s",
                args.steps,
                start.elapsed().as_secs_f64()
            );
        },
    )?;
    let meta = AnchorCheckpoint { anchors, bos };
    save_checkpoint(
        &args.out,
        &model.valid(),
        &config_json,
        Some(&tokenizer),
        &meta,
    )?;
    println!(
        "saved {} (step {}, final loss {:.4})",
        args.out.display(),
        report.step,
        report.losses.last().map_or(f32::NAN, |l| l.1)
    );
    Ok(())
}

fn tokenizer_bos(dir: &Path) -> Option<u32> {
    let t = Tokenizer::from_dir(dir).ok()?;
    t.token_to_id("<s>")
        .or_else(|| t.token_to_id("<|begin_of_text|>"))
}

fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    let dev = device();
    let (model, tokenizer, meta, _) = load_checkpoint::<Backend>(&args.model, &dev)?;
    let tokenizer = tokenizer.context("the checkpoint has no tokenizer.json")?;
    let anchors = match meta.anchors.clone() {
        Some(a) => a,
        None => ep_anchor_ids(&tokenizer, &["."])?,
    };
    let mode: PositionMode = args.positions.parse()?;
    let ac = (anchors.mode == AnchorMode::Ac).then(|| anchors.clone());
    let ac_id = ac.as_ref().and_then(|a| a.ids.first().copied());
    let skip = move |t: u32| Some(t) == ac_id;
    println!(
        "anchors: {:?} mode, ids {:?}; positions {mode:?}",
        anchors.mode, anchors.ids
    );
    if let Some(path) = &args.text {
        let mut texts = read_texts(path, None)?;
        texts.truncate(args.limit);
        let rows = tokenize(&tokenizer, &texts, ac.as_ref(), meta.bos)?;
        let t = Instant::now();
        let full = nll_masked(&model, &rows, None, &skip)?;
        let full_t = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let anchor = nll_streamed(
            &rows,
            || AnchorSession::new(&model, anchors.clone(), mode),
            &skip,
        )?;
        println!("| inference | perplexity | tokens | time (s) |\n|---|---|---|---|");
        println!(
            "| full attention | {:.3} | {} | {full_t:.1} |",
            full.perplexity(),
            full.count
        );
        println!(
            "| anchor cache (streamed) | {:.3} | {} | {:.1} |",
            anchor.perplexity(),
            anchor.count,
            t.elapsed().as_secs_f64()
        );
    }
    if let Some(path) = &args.choices {
        let questions = read_questions(path)?;
        if questions.len() <= args.shots {
            bail!(
                "{} has {} questions, none left after the {} shots",
                path.display(),
                questions.len(),
                args.shots
            );
        }
        let (shots, rest) = questions.split_at(args.shots);
        let shots: Vec<(McQuestion, Option<String>)> =
            shots.iter().map(|q| (q.clone(), None)).collect();
        let rest = &rest[..rest.len().min(args.limit)];
        let format = FewShotFormat {
            ac: ac_id,
            anchors: args.prompt_anchors.parse()?,
            bos: meta.bos,
        };
        let items = few_shot_choices(&tokenizer, &shots, rest, format)?;
        let full = score_choices(&items, || FullSession::new(&model))?;
        let masked = score_choices(&items, || MaskedSession::new(&model, Some(anchors.clone())))?;
        let anchor = score_choices(&items, || AnchorSession::new(&model, anchors.clone(), mode))?;
        println!(
            "\n{} questions, {}-shot, <AC> after {:?}, mean prompt {:.0} tokens",
            full.total, args.shots, format.anchors, full.mean_context_len
        );
        println!(
            "| inference | accuracy | KV positions after prompt | KV bytes after prompt \
             (measured) | time (s) |\n|---|---|---|---|---|"
        );
        for (name, r) in [
            ("full attention, full cache", &full),
            ("AnSAN mask, full forward (the paper's harness)", &masked),
            ("anchor cache", &anchor),
        ] {
            println!(
                "| {name} | {:.1}% | {:.0} | {:.0} | {:.2} |",
                100.0 * r.accuracy(),
                r.mean_cache_len,
                r.mean_kv_bytes,
                r.seconds
            );
        }
        if args.decode > 0 {
            let prompt = &items[0].context;
            println!(
                "\n{} greedy tokens after a {}-token {}-shot prompt",
                args.decode,
                prompt.len(),
                args.shots
            );
            println!(
                "| inference | KV positions at end | KV bytes at end (measured) | prefill (s) | \
                 decode (s) | tokens/s |\n|---|---|---|---|---|---|"
            );
            let runs = [
                (
                    "full cache",
                    greedy_decode(&mut FullSession::new(&model), prompt, args.decode)?,
                ),
                (
                    "anchor cache",
                    greedy_decode(
                        &mut AnchorSession::new(&model, anchors.clone(), mode),
                        prompt,
                        args.decode,
                    )?,
                ),
                (
                    "no cache (AnSAN mask recomputed)",
                    greedy_decode(
                        &mut MaskedSession::new(&model, Some(anchors.clone())),
                        prompt,
                        args.decode,
                    )?,
                ),
            ];
            for (name, r) in &runs {
                println!(
                    "| {name} | {} | {} | {:.2} | {:.2} | {:.1} |",
                    r.cache_len,
                    r.kv_bytes,
                    r.prefill_seconds,
                    r.decode_seconds,
                    (r.tokens.len().saturating_sub(1)) as f64 / r.decode_seconds.max(1e-9)
                );
            }
        }
    }
    if args.text.is_none() && args.choices.is_none() {
        bail!("give --text FILE and/or --choices FILE");
    }
    Ok(())
}
