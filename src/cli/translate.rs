//! `kiln translate`: encoder-decoder generation (NLLB-200 translation, T5 text-to-text).

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::time::Instant;

use super::sampling::SamplingArgs;
use anyhow::{Context, bail};
use clap::Args;
use kiln::auto::{self, Seq2SeqModel};
use kiln::backend::{Backend, NAME, device};
use kiln::core::seq2seq::Seq2SeqOutput;
use kiln::core::{GenerationConfig, Tokenizer};
use kiln::m2m100::language_codes;

pub const LONG_ABOUT: &str = "\
Translate with NLLB-200 (M2M100), or run a T5 / FLAN-T5 model on text-to-text prompts.

NLLB needs --src and --tgt as FLORES-200 codes (eng_Latn, fra_Latn, deu_Latn, zho_Hans, ...;
--list-languages prints the tokenizer's). For T5, --src/--tgt are language names and the input
becomes `translate <src> to <tgt>: <text>` (the original T5 task prefix); without them the text
is passed as written (e.g. `summarize: ...`, or any FLAN-T5 instruction).

Decoding is greedy unless --num-beams > 1 (beam search, HF semantics: length penalty, early
stopping, no-repeat n-grams) or --temperature > 0 (sampling). Defaults for beams and length come
from the model's generation_config.json.

Examples:
  kiln translate --model facebook/nllb-200-distilled-600M --src eng_Latn --tgt fra_Latn \"The kiln is hot.\"
  kiln translate --model ./nllb --src eng_Latn --tgt deu_Latn --file sentences.txt --num-beams 4 --json
  cat sentences.txt | kiln translate --model ./nllb --src eng_Latn --tgt deu_Latn --batch-size 8
  kiln translate --model google-t5/t5-small --src English --tgt German --text \"The house is wonderful.\"
  kiln translate --model google/flan-t5-small --text \"Answer: what is the capital of France?\"";

#[derive(Args, Debug)]
pub struct TranslateArgs {
    /// Model folder or Hugging Face hub id (NLLB/M2M100 or T5).
    #[arg(
        long,
        env = "KILN_SEQ2SEQ_MODEL",
        default_value = "facebook/nllb-200-distilled-600M"
    )]
    model: String,
    /// Texts to translate, one input each (a batch).
    #[arg(conflicts_with = "file")]
    inputs: Vec<String>,
    /// Text to translate; repeatable (the same as a positional input).
    #[arg(long, short = 'p', conflicts_with = "file")]
    text: Vec<String>,
    /// Read one input per line from a UTF-8 file (`-` for stdin); empty lines are skipped.
    /// With no input at all and stdin not a terminal, stdin is read this way.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Encoder input as comma-separated token ids, used as given (no tokenizer, no language
    /// token or task prefix added: write them in), e.g. `256047,9038,2` for NLLB. NLLB still
    /// needs --tgt for the forced target-language token.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["inputs", "text", "file"])]
    prompt_ids: Option<Vec<u32>>,
    /// Source language: NLLB code (eng_Latn) or, for T5, a name (English).
    #[arg(long)]
    src: Option<String>,
    /// Target language: NLLB code (fra_Latn) or, for T5, a name (French).
    #[arg(long)]
    tgt: Option<String>,
    /// Print the language codes the NLLB tokenizer knows and exit.
    #[arg(long)]
    list_languages: bool,
    /// Beam width (1 = greedy or sampling). Default: generation_config.json's, else 1.
    #[arg(long)]
    num_beams: Option<usize>,
    /// Beam length penalty (>1 favours longer outputs). Default: generation_config.json's, else 1.
    #[arg(long)]
    length_penalty: Option<f32>,
    /// Forbid repeating any n-gram of this size. Default: generation_config.json's, else off.
    #[arg(long)]
    no_repeat_ngram_size: Option<usize>,
    /// Most generated tokens per input. Default: generation_config.json's max_length, else 200.
    #[arg(long, short = 'n')]
    max_new_tokens: Option<usize>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Inputs per batch (padded together).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Print one JSON object per input: {"input": ..., "tokens": [...], "text": ..., "score": ...}.
    #[arg(long)]
    json: bool,
}

pub fn run(args: TranslateArgs) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let device = device();
    let start = Instant::now();
    let loaded = auto::load_seq2seq::<Backend>(&args.model, &device)
        .with_context(|| format!("loading {}", args.model))?;
    let tokenizer = loaded
        .tokenizer
        .as_ref()
        .context("this model folder has no tokenizer.json")?;
    eprintln!(
        "kiln: {} loaded in {:.1}s on {NAME}",
        loaded.files.dir.display(),
        start.elapsed().as_secs_f64()
    );
    if args.list_languages {
        for code in language_codes(tokenizer) {
            println!("{code}");
        }
        return Ok(());
    }

    let given: Vec<String> = args.inputs.iter().chain(&args.text).cloned().collect();
    let texts = match &args.file {
        _ if args.prompt_ids.is_some() => vec![],
        Some(path) => read_lines(path)?,
        None if given.is_empty() && !std::io::stdin().is_terminal() => {
            read_lines(&PathBuf::from("-"))?
        }
        None if given.is_empty() => {
            bail!("give input: TEXT arguments, --text TEXT, --file FILE, or lines on stdin")
        }
        None => given,
    };
    let defaults = &loaded.defaults;
    let num_beams = args.num_beams.or(defaults.num_beams).unwrap_or(1);
    if num_beams > 1 && args.sampling.repetition_penalty.is_some_and(|p| p != 1.0) {
        bail!(
            "--repetition-penalty applies to greedy decoding and sampling, not to beam search \
             (--num-beams {num_beams}); use --num-beams 1 or --no-repeat-ngram-size"
        );
    }
    let mut config = GenerationConfig::default()
        .with_sampling(args.sampling.to_config(defaults))
        .with_num_beams(num_beams)
        .with_length_penalty(
            args.length_penalty
                .or(defaults.length_penalty)
                .unwrap_or(1.0),
        )
        .with_no_repeat_ngram_size(
            args.no_repeat_ngram_size
                .or(defaults.no_repeat_ngram_size)
                .unwrap_or(0),
        )
        .with_max_new_tokens(
            args.max_new_tokens
                .or(defaults.max_new_tokens)
                .or(defaults.max_length)
                .unwrap_or(200),
        );

    // Token ids per input, and the forced target-language token (NLLB).
    let forced = match (&loaded.model, &args.tgt) {
        (Seq2SeqModel::M2M100(_), None) => bail!(
            "NLLB needs --src and --tgt (e.g. --src eng_Latn --tgt fra_Latn; --list-languages)"
        ),
        _ => loaded.forced_target(args.tgt.as_deref())?,
    };
    config = config.with_forced_bos_token_id(forced);
    let inputs: Vec<Vec<u32>> = match &args.prompt_ids {
        Some(ids) => vec![ids.clone()],
        None => texts
            .iter()
            .map(|t| loaded.encode_input(t, args.src.as_deref(), args.tgt.as_deref()))
            .collect::<Result<_, _>>()?,
    };

    // What the JSON output names as each input.
    let texts = match &args.prompt_ids {
        Some(ids) => vec![ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")],
        None => texts,
    };
    let start = Instant::now();
    let mut generated = 0;
    for (chunk_texts, chunk) in texts
        .chunks(args.batch_size)
        .zip(inputs.chunks(args.batch_size))
    {
        let outputs = loaded.generate(chunk, &config)?;
        for (text, out) in chunk_texts.iter().zip(&outputs) {
            generated += out.tokens.len();
            print_output(text, out, tokenizer, args.json)?;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    eprintln!(
        "kiln: {} inputs, {generated} tokens in {elapsed:.2}s ({:.1} tok/s)",
        texts.len(),
        generated as f64 / elapsed.max(1e-9)
    );
    Ok(())
}

fn print_output(
    input: &str,
    out: &Seq2SeqOutput,
    tokenizer: &Tokenizer,
    json: bool,
) -> anyhow::Result<()> {
    let text = tokenizer.decode(&out.tokens, true)?;
    if json {
        let json = serde_json::json!({
            "input": input,
            "tokens": out.tokens,
            "text": text,
            "score": out.score,
            "finish_reason": out.finish,
        });
        println!("{json}");
    } else {
        println!("{text}");
    }
    Ok(())
}

fn read_lines(path: &PathBuf) -> anyhow::Result<Vec<String>> {
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let file =
            std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        Box::new(std::io::BufReader::new(file))
    };
    let mut lines = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => {
                anyhow::anyhow!("{} line {}: not valid UTF-8", path.display(), i + 1)
            }
            _ => anyhow::anyhow!("{}: {e}", path.display()),
        })?;
        if !line.trim().is_empty() {
            lines.push(line);
        }
    }
    if lines.is_empty() {
        let name = if path.as_os_str() == "-" {
            "stdin".to_string()
        } else {
            path.display().to_string()
        };
        bail!("{name} holds no non-empty lines");
    }
    Ok(lines)
}
