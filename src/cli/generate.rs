use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use super::precision::PrecisionArgs;
use super::sampling::SamplingArgs;
use super::template::TemplateArgs;
use anyhow::{Context, bail};
use clap::Args;
use kiln::auto;
use kiln::backend::{Backend, NAME, device};
use kiln::core::loading::GenerationDefaults;
use kiln::core::{GenerationConfig, Message, generate};

pub const LONG_ABOUT: &str = "\
Continue a prompt with a decoder-only model (Llama 1/2/3.x, Mistral, Yi), or run a T5 / FLAN-T5
text-to-text prompt (the prompt is the encoder input; `kiln translate` has beams and NLLB).

The model is a folder in Hugging Face layout (config.json, *.safetensors, tokenizer.json), a
llama.cpp GGUF file, or a hub id such as `TinyLlama/TinyLlama-1.1B-Chat-v1.0`, downloaded into the HF cache (HF_HOME;
HF_HUB_OFFLINE=1 reads only the cache).

Examples:
  kiln generate --model ./TinyLlama-1.1B --prompt \"The capital of France is\" --max-new-tokens 20
  kiln generate --model ./TinyLlama-1.1B --chat --prompt \"Write a haiku about kilns\" --temperature 0.7 --top-p 0.9
  kiln generate --model ./m --prompt-ids 1,450,7483 --json
  kiln generate --model ./m --prompt \"A\" --prompt \"B\"       (a batch of two, left-padded)";

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model folder, `.gguf` file, or Hugging Face hub id (`org/name`, optionally `@revision`).
    /// Default: SmolLM2-135M-Instruct, from ~/.cache/kiln when `tools/fetch_smollm2.sh` fetched
    /// it, else from the hub.
    #[arg(long, env = "KILN_MODEL")]
    model: Option<String>,
    /// Prompt text; repeat for a batch.
    #[arg(long, short = 'p', conflicts_with_all = ["prompt_ids", "prompt_file"])]
    prompt: Vec<String>,
    /// Prompt as comma-separated token ids (no tokenizer needed), e.g. `1,450,7483`.
    #[arg(long, value_delimiter = ',', conflicts_with = "prompt_file")]
    prompt_ids: Option<Vec<u32>>,
    /// Read the prompt from a UTF-8 file (`-` for stdin).
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Most tokens to generate. Default: the model's generation_config.json, else 128.
    #[arg(long, short = 'n')]
    max_new_tokens: Option<usize>,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    precision: PrecisionArgs,
    #[command(flatten)]
    template: TemplateArgs,
    /// Stop when the text contains this string (repeatable); the text is cut before it.
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Keep going past the model's EOS tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object per prompt: {"prompt_tokens": [...], "tokens": [...], "text": "..."}.
    #[arg(long)]
    json: bool,
    /// Anchor-based inference (AnLLM, see `kiln anchor --help`): `ep` (the `.` token is the
    /// anchor, as in the reference) or `ac` (`<AC>` after every prompt sentence; the model must
    /// know the token, e.g. one trained by `kiln anchor train --mode ac`). The KV cache keeps
    /// only anchors and the current sentence; repeat --prompt for a batch (each row compacts its
    /// own cache). The model may also be a `kiln anchor train` folder.
    #[arg(long, value_parser = ["ep", "ac"])]
    anchor: Option<String>,
}

/// Length cap when neither `-n` nor the model's generation_config.json gives one.
const DEFAULT_MAX_NEW_TOKENS: usize = 128;

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if let Some(mode) = args.anchor.clone() {
        return run_anchor(&args, &mode);
    }
    let device = device();
    let start = Instant::now();
    let model = args.model.clone().unwrap_or_else(auto::default_model);
    if !std::path::Path::new(&model).is_file()
        && matches!(auto::model_type(&model).as_deref(), Ok("t5"))
    {
        return run_text_to_text(&args, &model);
    }
    let loaded = auto::load_with::<Backend>(&model, &device, &args.precision.to_options())
        .with_context(|| format!("loading {model}"))?;
    eprintln!(
        "kiln: {} ({}) loaded in {:.1}s on {NAME}",
        loaded.files.dir.display(),
        loaded.description,
        start.elapsed().as_secs_f64()
    );
    let tokenizer = loaded
        .tokenizer
        .clone()
        .map(|t| t.with_template_limits(args.template.limits()));
    let tokenizer = tokenizer.as_ref();

    let texts: Vec<String> = match (&args.prompt_ids, &args.prompt_file) {
        (Some(_), _) => vec![],
        (None, Some(path)) => vec![read_prompt_file(path)?],
        (None, None) if args.prompt.is_empty() => {
            bail!("give a prompt: --prompt TEXT, --prompt-ids 1,2,3 or --prompt-file FILE")
        }
        (None, None) => args.prompt.clone(),
    };
    let prompts: Vec<Vec<u32>> = match &args.prompt_ids {
        Some(ids) => vec![ids.clone()],
        None => {
            let tokenizer =
                tokenizer.context("this model folder has no tokenizer.json; use --prompt-ids")?;
            texts
                .iter()
                .map(|text| {
                    if args.chat {
                        let mut messages = Vec::new();
                        if let Some(system) = &args.system {
                            messages.push(Message::new("system", system.clone()));
                        }
                        messages.push(Message::new("user", text.clone()));
                        let rendered = tokenizer.apply_chat_template(&messages, true)?;
                        // The template writes BOS itself when the model wants one.
                        tokenizer.encode(&rendered, false)
                    } else {
                        tokenizer.encode(text, true)
                    }
                })
                .collect::<Result<_, _>>()?
        }
    };

    let eos = match tokenizer {
        _ if args.ignore_eos => vec![],
        Some(tokenizer) if args.chat => loaded.defaults.chat_eos_token_ids(tokenizer),
        _ => loaded.defaults.eos_token_id.to_vec(),
    };
    let sampling = args.sampling.to_config(&loaded.defaults);
    // Padding as HF: generation_config.json's, else the first EOS id, else 0.
    let pad = loaded
        .defaults
        .pad_token_id
        .to_vec()
        .first()
        .copied()
        .or(eos.first().copied())
        .unwrap_or(0);
    let config = GenerationConfig::default()
        .with_max_new_tokens(
            args.max_new_tokens
                .or(loaded.defaults.max_new_tokens)
                .unwrap_or(DEFAULT_MAX_NEW_TOKENS),
        )
        .with_sampling(sampling)
        .with_eos_token_ids(eos)
        .with_stop_strings(args.stop.clone())
        .with_pad_token_id(pad);

    let stream = !args.json && prompts.len() == 1 && tokenizer.is_some();
    let start = Instant::now();
    let mut stdout = std::io::stdout();
    let outputs = generate(&loaded.model, &prompts, &config, tokenizer, |_, piece| {
        if stream {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        }
    })?;
    let elapsed = start.elapsed().as_secs_f64();
    let generated: usize = outputs.iter().map(|o| o.tokens.len()).sum();

    for (prompt, out) in prompts.iter().zip(&outputs) {
        if args.json {
            let json = serde_json::json!({
                "prompt_tokens": prompt,
                "tokens": out.tokens,
                "text": out.text.clone().unwrap_or_default(),
                "finish_reason": out.finish,
            });
            println!("{json}");
        } else if stream {
            println!();
        } else {
            println!(
                "{}",
                out.text
                    .clone()
                    .unwrap_or_else(|| format!("{:?}", out.tokens))
            );
        }
    }
    eprintln!(
        "kiln: {generated} tokens in {elapsed:.2}s ({:.1} tok/s, prefill included)",
        generated as f64 / elapsed.max(1e-9)
    );
    Ok(())
}

fn read_prompt_file(path: &PathBuf) -> anyhow::Result<String> {
    let bytes = if path.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
        buf
    } else {
        std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
    };
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid UTF-8 (first bad byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// `--anchor`: generation with the anchor-compressed KV cache, one row per prompt.
fn run_anchor(args: &GenerateArgs, mode: &str) -> anyhow::Result<()> {
    use kiln::anchor::{
        AcPlacement, AnchorMode, AnchorSet, PositionMode, anchor_generate_batch, encode_ac,
        ep_anchor_ids, is_checkpoint, kv_bytes, load_checkpoint,
    };
    let device = device();
    let spec = args.model.clone().unwrap_or_else(auto::default_model);
    let (model, tokenizer, bos, eos_ids) = if is_checkpoint(std::path::Path::new(&spec)) {
        let (model, tokenizer, meta, _) =
            load_checkpoint::<Backend>(std::path::Path::new(&spec), &device)?;
        let eos = model.config().eos_token_ids.clone();
        (model, tokenizer, meta.bos, eos)
    } else {
        let loaded =
            auto::load::<Backend>(&spec, &device).with_context(|| format!("loading {spec}"))?;
        let bos = loaded.model.config().bos_token_id;
        let eos = loaded.defaults.eos_token_id.to_vec();
        (loaded.model, loaded.tokenizer, bos, eos)
    };
    let tokenizer = tokenizer.context("--anchor needs the model's tokenizer.json")?;
    let anchors = match mode {
        "ep" => ep_anchor_ids(&tokenizer, &["."])?,
        _ => {
            let id = tokenizer.token_to_id(kiln::anchor::AC_TOKEN).context(
                "the tokenizer has no <AC> token: train one with `kiln anchor train --mode ac`, or use --anchor ep",
            )?;
            AnchorSet::new(AnchorMode::Ac, [id])?
        }
    };
    let texts: Vec<String> = match (&args.prompt_file, args.prompt.as_slice()) {
        (Some(path), _) => vec![read_prompt_file(path)?],
        (None, []) => bail!("--anchor takes --prompt TEXT (repeat for a batch) or --prompt-file"),
        (None, texts) => texts.to_vec(),
    };
    let prompts: Vec<Vec<u32>> = texts
        .iter()
        .map(|text| -> anyhow::Result<Vec<u32>> {
            Ok(match anchors.mode {
                AnchorMode::Ac => encode_ac(
                    &tokenizer,
                    text,
                    *anchors.ids.first().unwrap_or(&0),
                    bos,
                    AcPlacement::Prompt,
                )?,
                AnchorMode::Ep => {
                    let mut ids: Vec<u32> = bos.into_iter().collect();
                    ids.extend(tokenizer.encode(text, false)?);
                    ids
                }
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let config = GenerationConfig::default()
        .with_sampling(args.sampling.to_config(&GenerationDefaults::default()))
        .with_max_new_tokens(args.max_new_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS))
        .with_eos_token_ids(if args.ignore_eos { vec![] } else { eos_ids })
        .with_stop_strings(args.stop.clone());
    // One prompt streams; a batch prints each row's text when all are done.
    let stream = prompts.len() == 1;
    let start = Instant::now();
    let mut stdout = std::io::stdout();
    let outputs = anchor_generate_batch(
        &model,
        &prompts,
        &anchors,
        PositionMode::Compacted,
        &config,
        Some(&tokenizer),
        |event| {
            if stream {
                let _ = write!(stdout, "{}", event.text);
                let _ = stdout.flush();
            }
        },
    )?;
    let elapsed = start.elapsed().as_secs_f64();
    for (row, out) in outputs.iter().enumerate() {
        if stream {
            println!();
        } else {
            println!("{}", out.text.clone().unwrap_or_default());
        }
        let of_row = if stream {
            String::new()
        } else {
            format!(" (prompt {row})")
        };
        eprintln!(
            "kiln: {} tokens in {elapsed:.2}s{of_row}; anchor KV cache {} positions ({} bytes) for {} tokens seen, peak {}",
            out.tokens.len(),
            out.cache_len,
            kv_bytes(model.config(), out.cache_len),
            out.seen,
            out.peak_len
        );
    }
    Ok(())
}

/// T5 / FLAN-T5 through `kiln generate`: each prompt is the encoder input, the output is the
/// decoder's text (no streaming; encoder-decoder generation returns whole sequences).
fn run_text_to_text(args: &GenerateArgs, spec: &str) -> anyhow::Result<()> {
    use kiln::core::seq2seq::generate_seq2seq;
    let device = device();
    let start = Instant::now();
    let loaded =
        auto::load_seq2seq::<Backend>(spec, &device).with_context(|| format!("loading {spec}"))?;
    let auto::Seq2SeqModel::T5(model) = &loaded.model else {
        bail!("{spec} is not a T5 model; use `kiln translate` for NLLB");
    };
    eprintln!(
        "kiln: {} (T5 encoder-decoder) loaded in {:.1}s on {NAME}",
        loaded.files.dir.display(),
        start.elapsed().as_secs_f64()
    );
    if args.chat || args.anchor.is_some() {
        bail!("--chat and --anchor need a decoder-only model; T5 takes the prompt as written");
    }
    let tokenizer = loaded.tokenizer.as_ref();
    let prompts: Vec<Vec<u32>> = match (&args.prompt_ids, &args.prompt_file) {
        (Some(ids), _) => vec![ids.clone()],
        (None, Some(path)) => {
            let tokenizer = tokenizer.context("this model folder has no tokenizer.json")?;
            vec![tokenizer.encode(&read_prompt_file(path)?, true)?]
        }
        (None, None) if args.prompt.is_empty() => {
            bail!("give a prompt: --prompt TEXT, --prompt-ids 1,2,3 or --prompt-file FILE")
        }
        (None, None) => {
            let tokenizer = tokenizer.context("this model folder has no tokenizer.json")?;
            args.prompt
                .iter()
                .map(|p| tokenizer.encode(p, true))
                .collect::<Result<_, _>>()?
        }
    };
    let sampling = args.sampling.to_config(&loaded.defaults);
    let mut config = GenerationConfig::default()
        .with_max_new_tokens(
            args.max_new_tokens
                .or(loaded.defaults.max_new_tokens)
                .unwrap_or(DEFAULT_MAX_NEW_TOKENS),
        )
        .with_sampling(sampling);
    if args.ignore_eos {
        config = config.with_eos_token_ids(vec![]);
    }
    let start = Instant::now();
    let outputs = generate_seq2seq(model, &prompts, &config)?;
    let elapsed = start.elapsed().as_secs_f64();
    let mut generated = 0;
    for (prompt, out) in prompts.iter().zip(&outputs) {
        generated += out.tokens.len();
        let mut text = match tokenizer {
            Some(t) => Some(t.decode(&out.tokens, true)?),
            None => None,
        };
        // Stop strings cut the text after the fact (the sequence is generated whole).
        if let Some(t) = text.as_mut()
            && let Some(cut) = args.stop.iter().filter_map(|s| t.find(s.as_str())).min()
        {
            t.truncate(cut);
        }
        if args.json {
            let json = serde_json::json!({
                "prompt_tokens": prompt,
                "tokens": out.tokens,
                "text": text.clone().unwrap_or_default(),
                "finish_reason": out.finish,
            });
            println!("{json}");
        } else {
            println!("{}", text.unwrap_or_else(|| format!("{:?}", out.tokens)));
        }
    }
    eprintln!(
        "kiln: {generated} tokens in {elapsed:.2}s ({:.1} tok/s, encoder included)",
        generated as f64 / elapsed.max(1e-9)
    );
    Ok(())
}
