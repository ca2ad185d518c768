//! # kiln-auto
//!
//! Load whatever a checkpoint holds in one call, on any Burn backend: a folder in Hugging Face
//! layout, a hub id (through `hf-hub`'s cache), or a llama.cpp `.gguf` file. The model family
//! comes from `config.json`'s `model_type` (or the GGUF architecture); the tokenizer and
//! `generation_config.json` come with it, so generation stops where HF's `generate` would.
//!
//! ```no_run
//! # fn main() -> kiln_core::Result<()> {
//! use kiln_core::generate;
//! use kiln_core::loading::SamplingOverrides;
//!
//! type B = burn::backend::Flex;
//! let device = Default::default();
//! let loaded = kiln_auto::load::<B>("HuggingFaceTB/SmolLM2-135M-Instruct", &device)?;
//! let tokenizer = loaded.tokenizer.as_ref().expect("the folder has a tokenizer.json");
//! let prompt = tokenizer.encode("The capital of France is", true)?;
//! // EOS, pad and sampling from generation_config.json, at most 32 new tokens.
//! let config = loaded
//!     .generation_config(&SamplingOverrides::default())
//!     .with_max_new_tokens(32);
//! generate(&loaded.model, &[prompt], &config, Some(tokenizer), |_, piece| print!("{piece}"))?;
//! # Ok(())
//! # }
//! ```
//!
//! Library crates of kiln never pick a backend: this one is generic over `B: Backend` like the
//! models it loads. [`LoadOptions`] sets the weight precision and quantisation.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use kiln_core::loading::{
    GenerationDefaults, LoadOptions, ModelFiles, TokenIds, read_json_value, resolve_model,
};
use kiln_core::{Error, Result, Tokenizer};
use kiln_llama::{Llama, LlamaConfig};

/// A loaded decoder-only model with its tokenizer and generation defaults.
pub struct LoadedModel<B: Backend> {
    /// The model.
    pub model: Llama<B>,
    /// Its tokenizer (absent when the folder has no tokenizer.json).
    pub tokenizer: Option<Tokenizer>,
    /// EOS ids, sampling defaults and so on.
    pub defaults: GenerationDefaults,
    /// A human-readable description (`llama 1.1B, 22 layers, ...`).
    pub description: String,
    /// Where the files are.
    pub files: ModelFiles,
}

/// The model families kiln knows, by `model_type`.
pub const SUPPORTED: &str = "llama, mistral, yi";

/// The hub id of kiln's default model.
pub const DEFAULT_HUB_ID: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

/// Where `tools/fetch_smollm2.sh` puts SmolLM2-135M-Instruct's GGUF
/// (`$KILN_CACHE`, default `~/.cache/kiln`).
pub fn default_gguf_path() -> PathBuf {
    let cache = std::env::var_os("KILN_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln")
        });
    cache.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The model to use when none is named: the local SmolLM2 GGUF if fetched, else its hub id.
pub fn default_model() -> String {
    let gguf = default_gguf_path();
    if gguf.is_file() {
        gguf.display().to_string()
    } else {
        DEFAULT_HUB_ID.to_string()
    }
}

/// A decoder-only model (folder, GGUF file or hub id) as an ensemble member: its tokenizer,
/// input embeddings and EOS ids from [`load`]. Ensembling works on text, so a model without a
/// tokenizer is an error.
pub fn decoder_member<B: Backend>(
    spec: &str,
    device: &B::Device,
) -> Result<Box<dyn kiln_ensemble::Member<B>>> {
    let loaded = load::<B>(spec, device)?;
    let tokenizer = loaded.tokenizer.ok_or_else(|| {
        Error::arg(
            "model",
            format!("{spec} has no tokenizer.json; ensembling works on text"),
        )
    })?;
    let embeddings = loaded.model.model.embed_tokens.dense_weight();
    let eos = loaded.defaults.eos_token_id.to_vec();
    Ok(Box::new(kiln_ensemble::DecoderMember::new(
        spec,
        loaded.model,
        tokenizer,
        embeddings,
        eos,
    )))
}

/// Loads the model at `spec`: a folder in HF layout, a hub id, or a `.gguf` file.
pub fn load<B: Backend>(spec: &str, device: &B::Device) -> Result<LoadedModel<B>> {
    load_with(spec, device, &LoadOptions::default())
}

/// [`load`] with a weight precision or quantisation ([`LoadOptions`]).
pub fn load_with<B: Backend>(
    spec: &str,
    device: &B::Device,
    options: &LoadOptions,
) -> Result<LoadedModel<B>> {
    let path = Path::new(spec);
    if path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return load_gguf(path, device, options);
    }
    let files = resolve_model(spec)?;
    let config_path = files.file("config.json");
    let value = read_json_value(&config_path)?;
    let model_type = value
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_lowercase();
    match model_type.as_str() {
        "llama" | "mistral" | "yi" => {}
        other => {
            return Err(Error::UnsupportedModel(format!(
                "{}: model_type `{other}`; kiln supports {SUPPORTED}",
                config_path.display()
            )));
        }
    }
    let config = LlamaConfig::from_json(value, &config_path)?;
    let model = Llama::from_pretrained_with(&files.dir, device, options)?;
    let tokenizer = load_tokenizer(&files.dir)?;
    let defaults = GenerationDefaults::from_dir(&files.dir)?;
    let description = describe(&config);
    Ok(LoadedModel {
        model,
        tokenizer,
        defaults,
        description,
        files,
    })
}

fn load_gguf<B: Backend>(
    path: &Path,
    device: &B::Device,
    options: &LoadOptions,
) -> Result<LoadedModel<B>> {
    let (model, tokenizer) = Llama::from_gguf_with(path, device, options)?;
    let config = model.config();
    let ids = |id: Option<u32>| id.map(TokenIds::One).unwrap_or_default();
    let defaults = GenerationDefaults {
        bos_token_id: ids(config.bos_token_id),
        eos_token_id: TokenIds::Many(config.eos_token_ids.clone()),
        pad_token_id: ids(config.pad_token_id),
        ..Default::default()
    };
    Ok(LoadedModel {
        description: format!("GGUF, {}", describe(config)),
        tokenizer: Some(tokenizer),
        defaults,
        files: ModelFiles {
            dir: path.to_path_buf(),
        },
        model,
    })
}

/// `1.10B`, `135M`, `852k`.
fn human_count(n: usize) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.0}M", n / 1e6)
    } else {
        format!("{:.0}k", n / 1e3)
    }
}

fn describe(config: &LlamaConfig) -> String {
    format!(
        "{:?} {} params, {} layers, {} heads / {} kv heads, vocab {}, context {}{}",
        config.flavor,
        human_count(config.num_parameters()),
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.vocab_size,
        config.max_position_embeddings,
        config
            .sliding_window
            .map(|w| format!(", sliding window {w}"))
            .unwrap_or_default()
    )
}

fn load_tokenizer(dir: &Path) -> Result<Option<Tokenizer>> {
    if dir.join("tokenizer.json").is_file() {
        Tokenizer::from_dir(dir).map(Some)
    } else {
        Ok(None)
    }
}

/// Any model kiln loads, with its tokenizer and generation defaults (see [`load_any`]).
// One value per process holds a whole model; boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum AnyModel<B: Backend> {
    /// A decoder-only model: Llama, Mistral, Yi (folder, hub id or GGUF).
    Decoder(LoadedModel<B>),
    /// An encoder-decoder: T5 or M2M100/NLLB-200.
    Seq2Seq(LoadedSeq2Seq<B>),
}

/// Loads whatever `spec` holds (a folder in HF layout, a hub id, or a `.gguf` file), choosing
/// the family by `config.json`'s `model_type`; an unknown type is
/// [`Error::UnsupportedModel`] naming the file and the types kiln knows.
pub fn load_any<B: Backend>(
    spec: &str,
    device: &B::Device,
    options: &LoadOptions,
) -> Result<AnyModel<B>> {
    match model_type(spec)?.as_str() {
        "t5" | "m2m_100" | "m2m100" | "nllb" => {
            load_seq2seq_with(spec, device, options).map(AnyModel::Seq2Seq)
        }
        // GGUF and the decoder families; `load_with` names the file of any other type.
        _ => load_with(spec, device, options).map(AnyModel::Decoder),
    }
}

/// An encoder-decoder kiln knows: T5 (original, v1.1, FLAN) or M2M100/NLLB.
// One value per process holds a whole model; boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Seq2SeqModel<B: Backend> {
    /// `model_type: t5`.
    T5(kiln_t5::T5<B>),
    /// `model_type: m2m_100` (NLLB-200, M2M100).
    M2M100(kiln_m2m100::M2M100<B>),
}

/// A loaded encoder-decoder with its tokenizer and generation defaults.
pub struct LoadedSeq2Seq<B: Backend> {
    /// The model.
    pub model: Seq2SeqModel<B>,
    /// Its tokenizer (absent when the folder has no tokenizer.json).
    pub tokenizer: Option<Tokenizer>,
    /// Beam width, length limits and token ids from generation_config.json.
    pub defaults: GenerationDefaults,
    /// Where the files are.
    pub files: ModelFiles,
}

/// The encoder-decoder families kiln knows, by `model_type`.
pub const SUPPORTED_SEQ2SEQ: &str = "t5, m2m_100 (NLLB-200)";

/// The `model_type` of the checkpoint at `spec` (folder or hub id), lower-cased; `gguf` for a
/// `.gguf` file.
pub fn model_type(spec: &str) -> Result<String> {
    let path = Path::new(spec);
    if path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return Ok("gguf".into());
    }
    let files = resolve_model(spec)?;
    let config_path = files.file("config.json");
    let value = read_json_value(&config_path)?;
    Ok(value
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_lowercase())
}

/// Loads the encoder-decoder at `spec`: a folder in HF layout or a hub id.
pub fn load_seq2seq<B: Backend>(spec: &str, device: &B::Device) -> Result<LoadedSeq2Seq<B>> {
    load_seq2seq_with(spec, device, &LoadOptions::default())
}

/// [`load_seq2seq`] with a weight precision or quantisation ([`LoadOptions`]).
pub fn load_seq2seq_with<B: Backend>(
    spec: &str,
    device: &B::Device,
    options: &LoadOptions,
) -> Result<LoadedSeq2Seq<B>> {
    let files = resolve_model(spec)?;
    let config_path = files.file("config.json");
    let value = read_json_value(&config_path)?;
    let model_type = value
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_lowercase();
    let model = match model_type.as_str() {
        "t5" => Seq2SeqModel::T5(kiln_t5::T5::from_pretrained_with(
            &files.dir, device, options,
        )?),
        "m2m_100" | "m2m100" | "nllb" => Seq2SeqModel::M2M100(
            kiln_m2m100::M2M100::from_pretrained_with(&files.dir, device, options)?,
        ),
        other => {
            return Err(Error::UnsupportedModel(format!(
                "{}: model_type `{other}` is not an encoder-decoder kiln knows ({SUPPORTED_SEQ2SEQ})",
                config_path.display()
            )));
        }
    };
    Ok(LoadedSeq2Seq {
        model,
        tokenizer: load_tokenizer(&files.dir)?,
        defaults: GenerationDefaults::from_dir(&files.dir)?,
        files,
    })
}

impl<B: Backend> LoadedModel<B> {
    /// The generation settings HF's `generate` would use for this model (generation_config.json:
    /// EOS and pad ids, sampling, length limits), with the caller's `sampling` overrides.
    pub fn generation_config(
        &self,
        sampling: &kiln_core::loading::SamplingOverrides,
    ) -> kiln_core::GenerationConfig {
        self.defaults.generation_config(sampling)
    }
}

impl<B: Backend> LoadedSeq2Seq<B> {
    /// The decoding HF's `generate` uses for this model (generation_config.json: EOS and pad
    /// ids, beams, length penalty, no-repeat n-grams, length limit, sampling), with the caller's
    /// `sampling` overrides.
    pub fn generation_config(
        &self,
        sampling: &kiln_core::loading::SamplingOverrides,
    ) -> kiln_core::GenerationConfig {
        let d = &self.defaults;
        d.generation_config(sampling)
            .with_num_beams(d.num_beams.unwrap_or(1))
            .with_length_penalty(d.length_penalty.unwrap_or(1.0))
            .with_no_repeat_ngram_size(d.no_repeat_ngram_size.unwrap_or(0))
            .with_max_new_tokens(d.max_new_tokens.or(d.max_length).unwrap_or(200))
    }

    /// The token NLLB's decoder must start with for target language `tgt` (a FLORES-200 code);
    /// `None` for T5, whose task prefix names the languages instead.
    pub fn forced_target(&self, tgt: Option<&str>) -> Result<Option<u32>> {
        match &self.model {
            Seq2SeqModel::T5(_) => Ok(None),
            Seq2SeqModel::M2M100(_) => {
                let tgt = tgt.ok_or_else(|| {
                    Error::arg("target language", "NLLB needs one (e.g. fra_Latn)")
                })?;
                kiln_m2m100::language_token_id(self.text_tokenizer()?, tgt, "target language")
                    .map(Some)
            }
        }
    }

    /// Encoder ids for `text`. NLLB: the source language token (a FLORES-200 code, needed),
    /// the text, EOS. T5: `translate <src> to <tgt>: <text>` with language names, or the text
    /// as written when neither is given.
    pub fn encode_input(
        &self,
        text: &str,
        src: Option<&str>,
        tgt: Option<&str>,
    ) -> Result<Vec<u32>> {
        let tokenizer = self.text_tokenizer()?;
        match &self.model {
            Seq2SeqModel::M2M100(model) => {
                let src = src.ok_or_else(|| {
                    Error::arg("source language", "NLLB needs one (e.g. eng_Latn)")
                })?;
                let eos = *kiln_core::seq2seq::Seq2SeqLm::<B>::eos_token_ids(model)
                    .first()
                    .ok_or_else(|| Error::arg("model", "its config names no EOS token"))?;
                kiln_m2m100::encode_source(tokenizer, text, src, eos)
            }
            Seq2SeqModel::T5(_) => {
                let prefix = match (src, tgt) {
                    (Some(src), Some(tgt)) => format!("translate {src} to {tgt}: "),
                    (None, None) => String::new(),
                    _ => {
                        return Err(Error::arg(
                            "language",
                            "for T5 give both source and target (language names), or neither",
                        ));
                    }
                };
                tokenizer.encode(&format!("{prefix}{text}"), true)
            }
        }
    }

    /// Runs the model on a batch of encoder inputs.
    pub fn generate(
        &self,
        inputs: &[Vec<u32>],
        config: &kiln_core::GenerationConfig,
    ) -> Result<Vec<kiln_core::seq2seq::Seq2SeqOutput>> {
        match &self.model {
            Seq2SeqModel::M2M100(model) => {
                kiln_core::seq2seq::generate_seq2seq(model, inputs, config)
            }
            Seq2SeqModel::T5(model) => kiln_core::seq2seq::generate_seq2seq(model, inputs, config),
        }
    }

    /// The tokenizer, or an error naming what is missing.
    pub fn text_tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| Error::arg("model", "this model folder has no tokenizer.json"))
    }
}
