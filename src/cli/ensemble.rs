//! `kiln ensemble`: generate with several models at once (DeePEn, GaC, UniTE), or compare them
//! and their ensemble on a JSONL file of prompts and answers.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use kiln::auto;
use kiln::backend::{Backend, NAME, device};
use kiln::core::loading::{read_json_value, resolve_model};
use kiln::core::packed::PackedFormat;
use kiln::core::seq2seq::Seq2SeqLm;
use kiln::core::{GenerationConfig, SamplingConfig, Tokenizer};
use kiln::ensemble::eval::{Metric, apply_template, choice_tokens, is_correct, read_jsonl};
use kiln::ensemble::{
    AnchorConfig, AnchorMatching, Ensemble, EnsembleConfig, Member, Method, RelativeConfig,
    SearchConfig, SearchGradient, SearchOptimizer, Seq2SeqMember, weights_from_scores,
};
use kiln::m2m100::{M2M100, language_token_id};

pub const LONG_ABOUT: &str = "\
Generate with an ensemble of models whose vocabularies differ.

DeePEn (arXiv 2404.12715, the default): every model's next-token distribution is mapped to a shared
space (similarities to the tokens all vocabularies share), averaged there with --weights, and mapped
back to the main model's vocabulary by --steps gradient steps of size --lr on its logits. GaC averages
probabilities over the union of the vocabularies; UniTE over the union of each model's top-k tokens.
Each model keeps its own tokens and KV cache; after each chosen token the others are fed the new text
in their own tokens.

Models are folders in Hugging Face layout (or hub ids): Llama-family decoders, and NLLB (M2M100)
encoder-decoders, which translate --source (default: the prompt) from --src-lang to --tgt-lang.

Examples:
  kiln ensemble --main ./Llama-2-7b --assist ./Mistral-7B --prompt \"Question: ...\\nAnswer:\" -n 20
  kiln ensemble --main ./m1 --assist ./m2 --method gac --prompt \"The capital of France is\"
  kiln ensemble --main ./m1 --assist ./m2 --weights 0.6,0.4 --lr 0.15 --steps 5 --json --prompt \"...\"
  kiln ensemble --main ./Llama-2-7b --assist ./nllb-200-distilled-600M --src-lang eng_Latn --tgt-lang deu_Latn \\
      --prompt \"Translate English to German: Hello world\\nGerman:\" --source \"Hello world\"
  kiln ensemble --main ./m1 --assist ./m2 --eval qa.jsonl --metric contains --stop $'\\n'
      (JSONL lines: {\"prompt\": \"...\", \"answer\": \"...\" | \"answers\": [...], \"source\": optional};
       prints per-model and ensemble accuracy)";

#[derive(Args, Debug)]
pub struct EnsembleArgs {
    /// The main model (DeePEn returns tokens of its vocabulary): folder or hub id.
    #[arg(long)]
    main: String,
    /// Assistant models (repeatable).
    #[arg(long, required = true)]
    assist: Vec<String>,
    /// deepen, gac or unite.
    #[arg(long, default_value = "deepen")]
    method: String,
    /// One weight per model, main first, summing to 1 (default: equal, DeePEn-Avg).
    #[arg(long, value_delimiter = ',', conflicts_with = "scores")]
    weights: Option<Vec<f32>>,
    /// Dev-set scores, one per model: weights proportional to them (DeePEn-Adapt).
    #[arg(long, value_delimiter = ',')]
    scores: Option<Vec<f32>>,
    /// Learning rate of DeePEn's inverse search.
    #[arg(long, default_value_t = 0.15)]
    lr: f32,
    /// Steps of DeePEn's inverse search.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Use plain gradient descent instead of the reference code's AdamW in the search.
    #[arg(long)]
    sgd: bool,
    /// Compute the search's gradient with Burn's autodiff instead of its closed form (the same
    /// numbers, slower; for checking).
    #[arg(long)]
    autodiff_search: bool,
    /// Keep the k largest entries of each relative-matrix row (sparse; default dense).
    #[arg(long)]
    top_k: Option<usize>,
    /// How a dense relative matrix is stored: f32 (exact), or f16, bf16, q8_0 (fewer bytes to
    /// stream per token; held in host memory and mapped by kiln's CPU kernels).
    #[arg(long, default_value = "f32", value_name = "FORMAT")]
    dense_format: PackedFormat,
    /// Use only the first N shared tokens as anchors (default: all).
    #[arg(long)]
    max_anchors: Option<usize>,
    /// Also match special tokens as anchors.
    #[arg(long)]
    special_anchors: bool,
    /// Find anchors as the paper's code does: equal token strings after `Ġ` → `▁`, special
    /// tokens included (default: equal raw bytes across spellings, which finds more).
    #[arg(long)]
    reference_anchors: bool,
    /// Keep only the N anchors whose similarity rows agree most across the models (the
    /// paper's code's optional selection; default: all).
    #[arg(long, value_name = "N")]
    consistent_anchors: Option<usize>,
    /// Softmax temperature of the relative matrices.
    #[arg(long, default_value_t = 100.0)]
    temperature: f32,
    /// Tokens per model in UniTE's union.
    #[arg(long, default_value_t = 10)]
    unite_k: usize,
    /// Cache relative matrices here (keyed by the embedding values). Default: $KILN_CACHE/ensemble
    /// (~/.cache/kiln/ensemble); `none` turns it off.
    #[arg(long)]
    cache_dir: Option<String>,
    /// The prompt (decoder-only models).
    #[arg(long, short = 'p', required_unless_present_any = ["eval", "prompt_ids"])]
    prompt: Option<String>,
    /// The prompt as the main model's token ids, comma-separated (as `kiln generate
    /// --prompt-ids`); the other members get its text, decoded by the main tokenizer.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["prompt", "eval"])]
    prompt_ids: Option<Vec<u32>>,
    /// Source text for encoder-decoder models (default: the prompt).
    #[arg(long)]
    source: Option<String>,
    /// NLLB source language.
    #[arg(long, default_value = "eng_Latn")]
    src_lang: String,
    /// NLLB target language.
    #[arg(long, default_value = "deu_Latn")]
    tgt_lang: String,
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, short = 't', default_value_t = 0.0)]
    sampling_temperature: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Stop when the text contains this string (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Print one JSON object: {"text", "tokens", "member_tokens", "finish_reason", "method"}.
    #[arg(long)]
    json: bool,
    /// Evaluate on a JSONL file of prompts and answers instead of generating once.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// exact, contains, number (GSM8K: the last number, read as the paper's scorer does) or
    /// choice (multiple choice: one token among --choices, scored as the paper's MMLU/ARC/PIQA
    /// processor; the answer is the letter).
    #[arg(long, default_value = "contains")]
    metric: String,
    /// A member's prompt template, `{}` standing for the prompt (e.g. "<s>{}" or a chat
    /// format); repeat it once per model, main first (the paper's per-model templates). Not for
    /// encoder-decoder members, which get --source.
    #[arg(long = "template", value_name = "TEMPLATE")]
    templates: Vec<String>,
    /// Option letters for --metric choice (an example's own "choices" win).
    #[arg(long, value_delimiter = ',', default_value = "A,B,C,D")]
    choices: Vec<String>,
    /// Evaluate at most this many examples.
    #[arg(long)]
    limit: Option<usize>,
}

fn load_member(spec: &str, args: &EnsembleArgs) -> anyhow::Result<Box<dyn Member<Backend>>> {
    let device = device();
    let path = Path::new(spec);
    let is_gguf = path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if !is_gguf {
        let files = resolve_model(spec)?;
        let config = read_json_value(&files.file("config.json"))?;
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if model_type == "m2m_100" {
            let model = M2M100::<Backend>::from_pretrained(&files.dir, &device)?;
            let tokenizer = Tokenizer::from_dir(&files.dir)?;
            let src = language_token_id(&tokenizer, &args.src_lang, "src_lang")?;
            let tgt = language_token_id(&tokenizer, &args.tgt_lang, "tgt_lang")?;
            let eos = *model
                .eos_token_ids()
                .first()
                .with_context(|| format!("{spec}: its config names no EOS token"))?;
            let context = model.config().max_position_embeddings;
            let embeddings = model.model.shared.dense_weight();
            return Ok(Box::new(
                Seq2SeqMember::new(spec, model, tokenizer, embeddings)
                    .with_source_affixes(vec![src], vec![eos])
                    .with_forced_prefix(vec![tgt])
                    .with_max_context(context),
            ));
        }
    }
    auto::decoder_member::<Backend>(spec, &device).with_context(|| format!("loading {spec}"))
}

fn cache_dir(arg: &Option<String>) -> Option<PathBuf> {
    match arg.as_deref() {
        Some("none") => None,
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            let base = std::env::var_os("KILN_CACHE")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kiln"))
                })?;
            Some(base.join("ensemble"))
        }
    }
}

pub fn run(args: EnsembleArgs) -> anyhow::Result<()> {
    let method: Method = args.method.parse()?;
    let start = Instant::now();
    let specs: Vec<&String> = std::iter::once(&args.main).chain(&args.assist).collect();
    let members = specs
        .iter()
        .map(|s| load_member(s, &args))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let kinds: Vec<bool> = members.iter().map(|m| m.is_encoder_decoder()).collect();
    let weights = match (&args.weights, &args.scores) {
        (Some(w), _) => Some(w.clone()),
        (None, Some(s)) => Some(weights_from_scores(s)?),
        (None, None) => None,
    };
    let config = EnsembleConfig::default()
        .with_method(method)
        .with_weights(weights)
        .with_anchors(
            AnchorConfig::default()
                .with_include_special(args.special_anchors)
                .with_matching(if args.reference_anchors {
                    AnchorMatching::ReferenceStrings
                } else {
                    AnchorMatching::Bytes
                })
                .with_max_anchors(args.max_anchors)
                .with_consistent_anchors(args.consistent_anchors),
        )
        .with_relative(
            RelativeConfig::default()
                .with_temperature(args.temperature)
                .with_top_k(args.top_k)
                .with_dense_format(args.dense_format),
        )
        .with_search(
            SearchConfig::default()
                .with_learning_rate(args.lr)
                .with_steps(args.steps)
                .with_optimizer(if args.sgd {
                    SearchOptimizer::Sgd
                } else {
                    SearchOptimizer::AdamW
                })
                .with_gradient(if args.autodiff_search {
                    SearchGradient::Autodiff
                } else {
                    SearchGradient::Analytic
                }),
        )
        .with_unite_k(args.unite_k)
        .with_cache_dir(cache_dir(&args.cache_dir));
    let mut ensemble = Ensemble::new(members, config)?;
    if let Some(anchors) = ensemble.anchors() {
        eprintln!(
            "kiln: {} models, {} anchors, relative matrices {:.1} MB, ready in {:.1}s on {NAME}",
            specs.len(),
            anchors.len(),
            ensemble
                .relative()
                .iter()
                .map(|r| r.size_bytes())
                .sum::<usize>() as f64
                / 1e6,
            start.elapsed().as_secs_f64()
        );
    } else {
        eprintln!(
            "kiln: {} models ready in {:.1}s on {NAME}",
            specs.len(),
            start.elapsed().as_secs_f64()
        );
    }
    let generation = GenerationConfig::default()
        .with_max_new_tokens(args.max_new_tokens)
        .with_sampling(
            SamplingConfig::greedy()
                .with_temperature(args.sampling_temperature)
                .with_seed(args.seed),
        )
        .with_stop_strings(args.stop.clone());

    if let Some(file) = &args.eval {
        return evaluate(&mut ensemble, &kinds, &specs, file, &args, &generation);
    }
    let prompt = args.prompt.clone().unwrap_or_default();
    let source = args.source.clone().unwrap_or_else(|| prompt.clone());
    let owned = member_prompts(kinds.as_slice(), &args.templates, &prompt, &source)?;
    let prompts: Vec<&str> = owned.iter().map(String::as_str).collect();
    let start = Instant::now();
    // Plain output streams as it is generated; --json prints one object at the end.
    let mut streamed = false;
    let out = match &args.prompt_ids {
        Some(ids) => ensemble.generate_from_ids(ids, &generation)?,
        None if args.json => ensemble.generate(&prompts, &generation)?,
        None => {
            streamed = true;
            ensemble.generate_streaming(&prompts, &generation, |event| {
                print!("{}", event.text);
                let _ = std::io::Write::flush(&mut std::io::stdout());
            })?
        }
    };
    let elapsed = start.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "method": args.method,
                "text": out.text,
                "tokens": out.tokens,
                "member_tokens": out.member_tokens,
                "finish_reason": out.finish,
            })
        );
    } else if streamed {
        println!();
    } else {
        println!("{}", out.text);
    }
    let steps = out.tokens.len().max(1);
    eprintln!(
        "kiln: {} steps in {elapsed:.2}s ({:.3} s/token, prefill included)",
        out.tokens.len(),
        elapsed / steps as f64
    );
    Ok(())
}

/// Each member's input: the source for encoder-decoders, else the prompt through the member's
/// template (if any were given, one per member).
fn member_prompts(
    kinds: &[bool],
    templates: &[String],
    prompt: &str,
    source: &str,
) -> anyhow::Result<Vec<String>> {
    if !templates.is_empty() && templates.len() != kinds.len() {
        bail!(
            "{} --template values for {} models: give one per model, main first",
            templates.len(),
            kinds.len()
        );
    }
    kinds
        .iter()
        .enumerate()
        .map(|(m, &seq2seq)| match (seq2seq, templates.get(m)) {
            (true, _) => Ok(source.to_string()),
            (false, Some(t)) => Ok(apply_template(t, prompt)?),
            (false, None) => Ok(prompt.to_string()),
        })
        .collect()
}

fn evaluate(
    ensemble: &mut Ensemble<Backend>,
    kinds: &[bool],
    specs: &[&String],
    file: &Path,
    args: &EnsembleArgs,
    generation: &GenerationConfig,
) -> anyhow::Result<()> {
    let metric: Metric = args.metric.parse()?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut examples = read_jsonl(&text)?;
    if let Some(n) = args.limit {
        examples.truncate(n);
    }
    if examples.is_empty() {
        bail!("{} has no examples", file.display());
    }
    let n = specs.len();
    let mut correct = vec![0usize; n + 1];
    let start = Instant::now();
    for (i, ex) in examples.iter().enumerate() {
        let source = ex.source.clone().unwrap_or_else(|| ex.prompt.clone());
        let owned = member_prompts(kinds, &args.templates, &ex.prompt, &source)?;
        let prompts: Vec<&str> = owned.iter().map(String::as_str).collect();
        let choices = (metric == Metric::Choice)
            .then(|| choice_tokens(ex.choices.as_ref().unwrap_or(&args.choices)));
        for m in 0..n {
            let out = match &choices {
                Some(choices) => ensemble.choose_member(m, prompts[m], choices)?,
                None => ensemble.generate_member(m, prompts[m], generation)?,
            };
            correct[m] += is_correct(&out.text, &ex.answer, metric) as usize;
        }
        let out = match &choices {
            Some(choices) => ensemble.choose(&prompts, choices)?,
            None => ensemble.generate(&prompts, generation)?,
        };
        correct[n] += is_correct(&out.text, &ex.answer, metric) as usize;
        eprintln!(
            "kiln: {}/{} examples ({:.0}s)",
            i + 1,
            examples.len(),
            start.elapsed().as_secs_f64()
        );
    }
    let total = examples.len() as f64;
    println!(
        "| model | {} |",
        match metric {
            Metric::ExactMatch => "exact match",
            Metric::Contains => "contains",
            Metric::LastNumber => "last number",
            Metric::Choice => "choice",
        }
    );
    println!("|---|---|");
    for (m, spec) in specs.iter().enumerate() {
        let role = if m == 0 { "main" } else { "assist" };
        println!(
            "| {spec} ({role}) | {:.1}% ({}/{}) |",
            100.0 * correct[m] as f64 / total,
            correct[m],
            examples.len()
        );
    }
    println!(
        "| ensemble ({}) | {:.1}% ({}/{}) |",
        args.method,
        100.0 * correct[n] as f64 / total,
        correct[n],
        examples.len()
    );
    Ok(())
}
