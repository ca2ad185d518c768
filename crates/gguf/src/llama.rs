//! Llama-architecture hyper-parameters, tensor names and the Q/K row permutation.

use crate::error::{GgufError, Result};
use crate::file::GgufFile;
use crate::types::Value;

/// RoPE scaling read from `{arch}.rope.scaling.*` (absent keys are `None`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RopeScaling {
    /// `{arch}.rope.scaling.type`: `"none"`, `"linear"`, `"yarn"`, `"longrope"`, …
    pub scaling_type: Option<String>,
    /// `{arch}.rope.scaling.factor`.
    pub factor: Option<f32>,
    /// `{arch}.rope.scaling.original_context_length`.
    pub original_context_length: Option<u64>,
    /// `{arch}.rope.scaling.attn_factor`.
    pub attn_factor: Option<f32>,
    /// `{arch}.rope.scaling.finetuned`.
    pub finetuned: Option<bool>,
}

/// The hyper-parameters of a Llama-family model (llama, mistral, qwen2, …) as stored in a GGUF
/// file, with the keys read as `{arch}.…` where `arch` is `general.architecture`.
///
/// Plain data: no Burn types, so any model crate can map it onto its own config.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaMetadata {
    /// `general.architecture` (`"llama"`, `"mistral"`, `"qwen2"`, …).
    pub architecture: String,
    /// `general.name`, if present.
    pub name: Option<String>,
    /// `{arch}.block_count`: number of decoder layers.
    pub block_count: usize,
    /// `{arch}.embedding_length`: hidden size.
    pub embedding_length: usize,
    /// `{arch}.feed_forward_length`: MLP intermediate size.
    pub feed_forward_length: usize,
    /// `{arch}.attention.head_count`.
    pub head_count: usize,
    /// `{arch}.attention.head_count_kv` (defaults to `head_count`).
    pub head_count_kv: usize,
    /// `{arch}.attention.key_length`, else `embedding_length / head_count`.
    pub head_dim: usize,
    /// `{arch}.rope.freq_base` (RoPE theta; default 10000).
    pub rope_freq_base: f32,
    /// `{arch}.attention.layer_norm_rms_epsilon` (default 1e-5).
    pub rms_norm_eps: f32,
    /// `{arch}.context_length`: trained context length.
    pub context_length: usize,
    /// `{arch}.rope.dimension_count` (defaults to `head_dim`).
    pub rope_dimension_count: usize,
    /// `{arch}.vocab_size`, else the length of `tokenizer.ggml.tokens`, else the outer
    /// dimension of `token_embd.weight`.
    pub vocab_size: usize,
    /// RoPE scaling, when any `{arch}.rope.scaling.*` key is present.
    pub rope_scaling: Option<RopeScaling>,
    /// Whether the file has a separate `output.weight` (LM head). When not, the LM head is tied
    /// to `token_embd.weight`.
    pub has_output_weight: bool,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_token_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad_token_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk_token_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`, if present.
    pub add_bos_token: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`, if present.
    pub add_eos_token: Option<bool>,
}

impl LlamaMetadata {
    /// Whether the embeddings and the LM head share one matrix (no `output.weight`).
    pub fn tie_word_embeddings(&self) -> bool {
        !self.has_output_weight
    }

    /// Whether llama.cpp's converter permuted the rows of the Q and K weights of this
    /// architecture (see [`unpermute_qk`]): true for the architectures whose GGUF graph uses
    /// the interleaved ("normal") RoPE, i.e. `llama`, `mistral`, `granite`, `deci`; false for
    /// NeoX-RoPE ones such as `qwen2`, whose weights are stored as in Hugging Face.
    pub fn qk_permuted(&self) -> bool {
        matches!(
            self.architecture.as_str(),
            "llama" | "mistral" | "granite" | "granitemoe" | "deci" | "llama4"
        )
    }
}

impl GgufFile {
    /// Reads the Llama-family hyper-parameters (see [`LlamaMetadata`]).
    ///
    /// Required keys: `general.architecture`, `{arch}.block_count`, `{arch}.embedding_length`,
    /// `{arch}.feed_forward_length`, `{arch}.attention.head_count`, `{arch}.context_length`.
    pub fn llama_metadata(&self) -> Result<LlamaMetadata> {
        let arch = self.required_str("general.architecture")?.to_string();
        let k = |suffix: &str| format!("{arch}.{suffix}");

        let block_count = self.required_usize(&k("block_count"))?;
        let embedding_length = self.required_usize(&k("embedding_length"))?;
        let feed_forward_length = self.required_usize(&k("feed_forward_length"))?;
        let head_count = self.required_usize(&k("attention.head_count"))?;
        if head_count == 0 {
            return Err(self.bad_value(&k("attention.head_count"), "a positive count", "0"));
        }
        let head_count_kv = self
            .optional_usize(&k("attention.head_count_kv"))?
            .unwrap_or(head_count);
        if head_count_kv == 0 || head_count % head_count_kv != 0 {
            return Err(self.bad_value(
                &k("attention.head_count_kv"),
                &format!("a positive divisor of head_count {head_count}"),
                &head_count_kv.to_string(),
            ));
        }
        let head_dim = match self.optional_usize(&k("attention.key_length"))? {
            Some(d) => d,
            None => embedding_length / head_count,
        };
        let context_length = self.required_usize(&k("context_length"))?;
        let rope_dimension_count = self
            .optional_usize(&k("rope.dimension_count"))?
            .unwrap_or(head_dim);
        let rope_freq_base = self.optional_f32(&k("rope.freq_base"))?.unwrap_or(10000.0);
        let rms_norm_eps = self
            .optional_f32(&k("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5);

        let vocab_size = match self.optional_usize(&k("vocab_size"))? {
            Some(v) => v,
            None => match self.get("tokenizer.ggml.tokens").and_then(Value::as_array) {
                Some(tokens) => tokens.len(),
                None => match self.tensor_info("token_embd.weight") {
                    Some(t) if t.dims().len() == 2 => t.dims()[1] as usize,
                    _ => return Err(self.missing(&k("vocab_size"))),
                },
            },
        };

        let scaling = RopeScaling {
            scaling_type: self.optional_string(&k("rope.scaling.type"))?,
            factor: self.optional_f32(&k("rope.scaling.factor"))?,
            original_context_length: self
                .optional_usize(&k("rope.scaling.original_context_length"))?
                .map(|v| v as u64),
            attn_factor: self.optional_f32(&k("rope.scaling.attn_factor"))?,
            finetuned: self.optional_bool(&k("rope.scaling.finetuned"))?,
        };
        let rope_scaling = (scaling != RopeScaling::default()).then_some(scaling);

        Ok(LlamaMetadata {
            name: self.optional_string("general.name")?,
            block_count,
            embedding_length,
            feed_forward_length,
            head_count,
            head_count_kv,
            head_dim,
            rope_freq_base,
            rms_norm_eps,
            context_length,
            rope_dimension_count,
            vocab_size,
            rope_scaling,
            has_output_weight: self.tensor_info("output.weight").is_some(),
            bos_token_id: self.optional_u32("tokenizer.ggml.bos_token_id")?,
            eos_token_id: self.optional_u32("tokenizer.ggml.eos_token_id")?,
            pad_token_id: self.optional_u32("tokenizer.ggml.padding_token_id")?,
            unk_token_id: self.optional_u32("tokenizer.ggml.unknown_token_id")?,
            add_bos_token: self.optional_bool("tokenizer.ggml.add_bos_token")?,
            add_eos_token: self.optional_bool("tokenizer.ggml.add_eos_token")?,
            architecture: arch,
        })
    }

    pub(crate) fn missing(&self, key: &str) -> GgufError {
        GgufError::MissingKey {
            path: self.path().to_string(),
            key: key.to_string(),
        }
    }

    pub(crate) fn bad_value(&self, key: &str, expected: &str, found: &str) -> GgufError {
        GgufError::BadValue {
            path: self.path().to_string(),
            key: key.to_string(),
            expected: expected.to_string(),
            found: found.to_string(),
        }
    }

    pub(crate) fn required_str(&self, key: &str) -> Result<&str> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_str()
            .ok_or_else(|| self.bad_value(key, "a string", &v.describe()))
    }

    fn required_usize(&self, key: &str) -> Result<usize> {
        self.optional_usize(key)?.ok_or_else(|| self.missing(key))
    }

    fn optional_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.bad_value(key, "a non-negative integer", &v.describe())),
        }
    }

    pub(crate) fn optional_u32(&self, key: &str) -> Result<Option<u32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.bad_value(key, "a u32 token id", &v.describe())),
        }
    }

    fn optional_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|f| Some(f as f32))
                .ok_or_else(|| self.bad_value(key, "a number", &v.describe())),
        }
    }

    pub(crate) fn optional_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad_value(key, "a bool", &v.describe())),
        }
    }

    pub(crate) fn optional_string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| self.bad_value(key, "a string", &v.describe())),
        }
    }
}

/// The Hugging Face (`transformers` Llama) name of a GGUF tensor, or `None` for names outside
/// the Llama family's set.
///
/// | GGUF | Hugging Face |
/// |---|---|
/// | `token_embd.weight` | `model.embed_tokens.weight` |
/// | `output_norm.weight` | `model.norm.weight` |
/// | `output.weight` | `lm_head.weight` |
/// | `blk.N.attn_norm.weight` | `model.layers.N.input_layernorm.weight` |
/// | `blk.N.attn_q.weight` | `model.layers.N.self_attn.q_proj.weight` |
/// | `blk.N.attn_k.weight` | `model.layers.N.self_attn.k_proj.weight` |
/// | `blk.N.attn_v.weight` | `model.layers.N.self_attn.v_proj.weight` |
/// | `blk.N.attn_output.weight` | `model.layers.N.self_attn.o_proj.weight` |
/// | `blk.N.ffn_norm.weight` | `model.layers.N.post_attention_layernorm.weight` |
/// | `blk.N.ffn_gate.weight` | `model.layers.N.mlp.gate_proj.weight` |
/// | `blk.N.ffn_up.weight` | `model.layers.N.mlp.up_proj.weight` |
/// | `blk.N.ffn_down.weight` | `model.layers.N.mlp.down_proj.weight` |
///
/// `.bias` suffixes map the same way (Qwen2 has Q/K/V biases). `rope_freqs.weight` (Llama 3.1's
/// precomputed RoPE factors) has no Hugging Face tensor and gives `None`.
///
/// Remember that for `llama`-like architectures the Q and K weights (and biases) are stored
/// row-permuted; see [`unpermute_qk`].
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    let (stem, suffix) = gguf_name.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let global = match stem {
        "token_embd" => Some("model.embed_tokens"),
        "output_norm" => Some("model.norm"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(g) = global {
        return Some(format!("{g}.{suffix}"));
    }
    let rest = stem.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

fn check_qk_shape(len: usize, rows: usize, cols: usize, n_head: usize) -> Result<usize> {
    if rows.checked_mul(cols) != Some(len) {
        return Err(GgufError::Shape(format!(
            "{len} values are not {rows} rows x {cols} columns"
        )));
    }
    if n_head == 0 || !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) {
        return Err(GgufError::Shape(format!(
            "{rows} rows cannot be split into {n_head} heads of an even size"
        )));
    }
    Ok(rows / n_head)
}

/// Undoes llama.cpp's row permutation of a Q or K projection (weight `[rows, cols]` row-major,
/// or a bias with `cols = 1`), giving Hugging Face's layout, whose RoPE is `rotate_half`.
/// Works on any element type, so quantised rows (`cols` = bytes per row) move as they are.
///
/// `convert_hf_to_gguf.py` (`LlamaModel.permute`) stores
/// `w.reshape(n_head, 2, head_dim / 2, cols).swapaxes(1, 2).reshape(rows, cols)`, so that the
/// two halves of each head are interleaved (ggml's RoPE rotates adjacent pairs). For K pass
/// `n_head = head_count_kv`. In index terms, GGUF row `h*head_dim + 2*j + i` is HF row
/// `h*head_dim + i*head_dim/2 + j`.
pub fn unpermute_qk<T: Copy + Default>(
    data: &mut [T],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> Result<()> {
    let head_dim = check_qk_shape(data.len(), rows, cols, n_head)?;
    let half = head_dim / 2;
    let mut tmp = vec![T::default(); head_dim * cols];
    for head in data.chunks_exact_mut(head_dim * cols) {
        tmp.copy_from_slice(head);
        for j in 0..half {
            for i in 0..2 {
                let src = (2 * j + i) * cols;
                let dst = (i * half + j) * cols;
                head[dst..dst + cols].copy_from_slice(&tmp[src..src + cols]);
            }
        }
    }
    Ok(())
}

/// The permutation `convert_hf_to_gguf.py` applies (the inverse of [`unpermute_qk`]): from
/// Hugging Face's row order to llama.cpp's.
pub fn permute_qk<T: Copy + Default>(
    data: &mut [T],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> Result<()> {
    let head_dim = check_qk_shape(data.len(), rows, cols, n_head)?;
    let half = head_dim / 2;
    let mut tmp = vec![T::default(); head_dim * cols];
    for head in data.chunks_exact_mut(head_dim * cols) {
        tmp.copy_from_slice(head);
        for j in 0..half {
            for i in 0..2 {
                let src = (i * half + j) * cols;
                let dst = (2 * j + i) * cols;
                head[dst..dst + cols].copy_from_slice(&tmp[src..src + cols]);
            }
        }
    }
    Ok(())
}
