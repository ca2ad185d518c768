use std::path::Path;
use std::sync::Arc;

use burn::module::Module;
use burn::prelude::*;
use kiln_core::loading::{
    LoadOptions, PackSlot, PackSlots, SafetensorsWeights, WeightSource, check_config_sizes,
    load_packed, save_hf_folder,
};
use kiln_core::nn::{
    CacheState, Embedding, EmbeddingConfig, KvCache, RmsNorm, RmsNormConfig, RotaryAngles,
    RotaryEmbedding, TorchLinear, TorchLinearConfig, scaled_dot_product_attention, swiglu,
};
use kiln_core::{CausalLm, Result};

use crate::LlamaConfig;

/// Self-attention of one decoder layer (HF `LlamaAttention`).
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Query projection.
    pub q_proj: TorchLinear<B>,
    /// Key projection.
    pub k_proj: TorchLinear<B>,
    /// Value projection.
    pub v_proj: TorchLinear<B>,
    /// Output projection.
    pub o_proj: TorchLinear<B>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl<B: Backend> Attention<B> {
    /// `x [batch, seq, hidden]` → `[batch, seq, hidden]`: appends this step's keys and values to
    /// `cache` (keeping its last `keep`) and attends over all of them under `mask`
    /// (`[batch, 1, seq, cached + seq]`, `true` hides a key).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &LayerRope<B>,
        mask: Option<&Tensor<B, 4, Bool>>,
        cache: &mut KvCache<B>,
        keep: usize,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        let heads = |t: Tensor<B, 3>, heads| t.reshape([batch, seq, heads, self.head_dim]);
        // RoPE in the projections' [batch, seq, heads, head_dim] layout, then heads to the front.
        let [q, k, v] = TorchLinear::forward_many([&self.q_proj, &self.k_proj, &self.v_proj], x);
        let q = rope.q.apply(heads(q, self.heads));
        let k = rope.k.apply(heads(k, self.kv_heads));
        let v = heads(v, self.kv_heads);
        let (k, v) = cache.update(k.swap_dims(1, 2), v.swap_dims(1, 2), keep);
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = scaled_dot_product_attention(q.swap_dims(1, 2), k, v, mask, None, scale);
        let out = out
            .swap_dims(1, 2)
            .reshape([batch, seq, self.heads * self.head_dim]);
        self.o_proj.forward(out)
    }
}

/// The rotary angles of one forward pass, for the query heads and for the key heads
/// ([`Llama::rope_angles`]); every layer of the pass shares them.
#[derive(Debug, Clone)]
pub struct LayerRope<B: Backend> {
    /// For the query heads.
    pub q: RotaryAngles<B>,
    /// For the key heads (the same angles, laid out for the key/value heads).
    pub k: RotaryAngles<B>,
}

/// SwiGLU feed-forward (HF `LlamaMLP`).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// Gate projection.
    pub gate_proj: TorchLinear<B>,
    /// Up projection.
    pub up_proj: TorchLinear<B>,
    /// Down projection.
    pub down_proj: TorchLinear<B>,
}

impl<B: Backend> Mlp<B> {
    /// `down(silu(gate(x)) · up(x))`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [gate, up] = TorchLinear::forward_many([&self.gate_proj, &self.up_proj], x);
        self.down_proj.forward(swiglu(gate, up))
    }
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Attention.
    pub self_attn: Attention<B>,
    /// Feed-forward.
    pub mlp: Mlp<B>,
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Norm before the feed-forward.
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: Backend> DecoderLayer<B> {
    /// `x + attn(norm(x))`, then `+ mlp(norm(·))`: one layer of the pass (see
    /// [`Attention::forward`] for the cache, `keep` and the mask).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &LayerRope<B>,
        mask: Option<&Tensor<B, 4, Bool>>,
        cache: &mut KvCache<B>,
        keep: usize,
    ) -> Tensor<B, 3> {
        let h = self.input_layernorm.forward(x.clone());
        let x = x + self.self_attn.forward(h, rope, mask, cache, keep);
        let h = self.post_attention_layernorm.forward(x.clone());
        x + self.mlp.forward(h)
    }
}

/// Hidden states of a forward pass ([`Llama::forward_hidden`]).
#[derive(Debug, Clone)]
pub struct HiddenStates<B: Backend> {
    /// The last layer's output after the final norm, `[batch, seq, hidden]`: what
    /// [`Llama::logits`] takes.
    pub last: Tensor<B, 3>,
    /// When asked for, HF's `output_hidden_states`: the input embeddings, each layer's output,
    /// and for the last layer `last` (after the final norm), `layers + 1` tensors. Else empty.
    pub all: Vec<Tensor<B, 3>>,
}

/// The decoder stack (HF `LlamaModel`).
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    /// Token embeddings.
    pub embed_tokens: Embedding<B>,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
}

/// A Llama-family causal LM (HF `LlamaForCausalLM` / `MistralForCausalLM`); field names follow
/// the checkpoint's keys, so weights load without a remap table.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    /// The decoder.
    pub model: LlamaModel<B>,
    /// LM head; `None` when tied to `model.embed_tokens`.
    pub lm_head: Option<TorchLinear<B>>,
    rope: RotaryEmbedding<B>,
    #[module(skip)]
    config: LlamaConfig,
}

/// Per-sequence state: one KV cache per layer plus the shared positions/padding bookkeeping.
#[derive(Debug, Clone)]
pub struct LlamaCache<B: Backend> {
    /// Per-layer keys and values.
    pub layers: Vec<KvCache<B>>,
    /// Positions, padding and the sliding window.
    pub state: CacheState,
}

impl LlamaConfig {
    /// A model with uninitialised (lazy) weights, to be loaded.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Llama<B> {
        let linear = |i, o, bias| TorchLinearConfig::new(i, o).with_bias(bias).init(device);
        let d = self.hidden_size;
        let q_dim = self.num_attention_heads * self.head_dim;
        let kv_dim = self.num_key_value_heads * self.head_dim;
        let norm = || {
            RmsNormConfig::new(d)
                .with_eps(self.rms_norm_eps)
                .init(device)
        };
        let layers = (0..self.num_hidden_layers)
            .map(|_| DecoderLayer {
                self_attn: Attention {
                    q_proj: linear(d, q_dim, self.attention_bias),
                    k_proj: linear(d, kv_dim, self.attention_bias),
                    v_proj: linear(d, kv_dim, self.attention_bias),
                    o_proj: linear(q_dim, d, self.attention_bias),
                    heads: self.num_attention_heads,
                    kv_heads: self.num_key_value_heads,
                    head_dim: self.head_dim,
                },
                mlp: Mlp {
                    gate_proj: linear(d, self.intermediate_size, self.mlp_bias),
                    up_proj: linear(d, self.intermediate_size, self.mlp_bias),
                    down_proj: linear(self.intermediate_size, d, self.mlp_bias),
                },
                input_layernorm: norm(),
                post_attention_layernorm: norm(),
            })
            .collect();
        Llama {
            model: LlamaModel {
                embed_tokens: EmbeddingConfig::new(self.vocab_size, d).init(device),
                layers,
                norm: norm(),
            },
            lm_head: (!self.tie_word_embeddings).then(|| linear(d, self.vocab_size, false)),
            rope: RotaryEmbedding::new(self.head_dim, self.rope_theta, &self.rope_scaling, device),
            config: self.clone(),
        }
    }
}

impl<B: Backend> Llama<B> {
    /// Loads the checkpoint in `dir` (config.json + safetensors, sharded or not).
    pub fn from_pretrained(dir: &Path, device: &B::Device) -> Result<Self> {
        Self::from_pretrained_with(dir, device, &LoadOptions::default())
    }

    /// [`from_pretrained`](Self::from_pretrained) with a precision or quantisation.
    pub fn from_pretrained_with(
        dir: &Path,
        device: &B::Device,
        options: &LoadOptions,
    ) -> Result<Self> {
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let weights = SafetensorsWeights::open_dir(dir)?;
        Self::from_weights_with(&config, Arc::new(weights), device, options)
    }

    /// Builds the model from `config` and any weight source (safetensors, GGUF, ...).
    pub fn from_weights(
        config: &LlamaConfig,
        weights: Arc<dyn WeightSource>,
        device: &B::Device,
    ) -> Result<Self> {
        Self::from_weights_with(config, weights, device, &LoadOptions::default())
    }

    /// [`from_weights`](Self::from_weights) with a precision or quantisation.
    pub fn from_weights_with(
        config: &LlamaConfig,
        weights: Arc<dyn WeightSource>,
        device: &B::Device,
        options: &LoadOptions,
    ) -> Result<Self> {
        check_config_sizes(
            weights.as_ref(),
            &[
                ("vocab_size", config.vocab_size),
                ("hidden_size", config.hidden_size),
                ("intermediate_size", config.intermediate_size),
                ("num_attention_heads", config.num_attention_heads),
                ("num_key_value_heads", config.num_key_value_heads),
                ("head_dim", config.head_dim),
            ],
            &[("num_hidden_layers", config.num_hidden_layers)],
        )?;
        load_packed(config.init(device), weights, device, options)
    }

    /// The model's config.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }
}

impl<B: Backend> PackSlots<B> for Llama<B> {
    fn pack_slots(&mut self) -> Vec<(String, PackSlot<'_, B>)> {
        let mut slots = vec![(
            "model.embed_tokens".to_string(),
            PackSlot::Embedding(&mut self.model.embed_tokens),
        )];
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            let (attn, mlp) = (&mut layer.self_attn, &mut layer.mlp);
            let p = |name: &str| format!("model.layers.{i}.{name}");
            slots.extend([
                (p("self_attn.q_proj"), PackSlot::Linear(&mut attn.q_proj)),
                (p("self_attn.k_proj"), PackSlot::Linear(&mut attn.k_proj)),
                (p("self_attn.v_proj"), PackSlot::Linear(&mut attn.v_proj)),
                (p("self_attn.o_proj"), PackSlot::Linear(&mut attn.o_proj)),
                (p("mlp.gate_proj"), PackSlot::Linear(&mut mlp.gate_proj)),
                (p("mlp.up_proj"), PackSlot::Linear(&mut mlp.up_proj)),
                (p("mlp.down_proj"), PackSlot::Linear(&mut mlp.down_proj)),
            ]);
        }
        if let Some(head) = &mut self.lm_head {
            slots.push(("lm_head".to_string(), PackSlot::Linear(head)));
        }
        slots
    }
}

impl<B: Backend> Llama<B> {
    /// Writes the model as an HF folder transformers and kiln both load: `model.safetensors`
    /// (f32; packed weights are dequantised; no `lm_head.weight` when the head is tied, as
    /// transformers writes it), `config.json` ([`LlamaConfig::to_hf_json`]) and
    /// `generation_config.json` (BOS, EOS and pad ids). The tokenizer is the caller's to copy.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        let mut config = self.config.clone();
        config.tie_word_embeddings = self.lm_head.is_none();
        let hf = config.to_hf_json();
        let generation = serde_json::json!({
            "bos_token_id": hf["bos_token_id"],
            "eos_token_id": hf["eos_token_id"],
            "pad_token_id": hf["pad_token_id"],
        });
        save_hf_folder(self, dir, &hf, &generation)
    }

    /// The rotary angles for RoPE `positions` `[batch, seq]`, shared by every layer.
    pub fn rope_angles(&self, positions: Tensor<B, 2, Int>) -> LayerRope<B> {
        let (heads, kv_heads) = (
            self.config.num_attention_heads,
            self.config.num_key_value_heads,
        );
        let angles = self.rope.angles(positions);
        let q = angles.for_heads(heads);
        let k = if kv_heads == heads {
            q.clone()
        } else {
            angles.for_heads(kv_heads)
        };
        LayerRope { q, k }
    }

    /// The input embeddings of `tokens [batch, seq]`: `[batch, seq, hidden]` (what
    /// [`forward_hidden`](Self::forward_hidden) takes, as HF's `inputs_embeds`).
    pub fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.model.embed_tokens.forward(tokens)
    }

    /// Runs the decoder on `inputs_embeds [batch, seq, hidden]` (from [`embed`](Self::embed), or
    /// the caller's own), appending to `cache` as [`CausalLm::forward`] does, and returns the
    /// final hidden states, with every layer's when `output_hidden_states` (HF's flag of the
    /// same name).
    pub fn forward_hidden(
        &self,
        inputs_embeds: Tensor<B, 3>,
        cache: &mut LlamaCache<B>,
        output_hidden_states: bool,
    ) -> HiddenStates<B> {
        let mut all = Vec::new();
        let x = self.layers(
            inputs_embeds,
            cache,
            output_hidden_states.then_some(&mut all),
        );
        let last = self.model.norm.forward(x);
        if output_hidden_states {
            all.push(last.clone());
        }
        HiddenStates { last, all }
    }

    /// Logits `[batch, seq, vocab]` of final hidden states (the LM head, or the tied embeddings).
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => self.model.embed_tokens.lm_head(hidden),
        }
    }

    /// Every layer over `x`, before the final norm; pushes the input and each layer's output but
    /// the last to `hidden` when given.
    fn layers(
        &self,
        mut x: Tensor<B, 3>,
        cache: &mut LlamaCache<B>,
        mut hidden: Option<&mut Vec<Tensor<B, 3>>>,
    ) -> Tensor<B, 3> {
        let [_, seq, _] = x.dims();
        let step = cache.state.advance::<B>(seq, &x.device());
        let rope = self.rope_angles(step.positions);
        for (layer, kv) in self.model.layers.iter().zip(cache.layers.iter_mut()) {
            if let Some(h) = hidden.as_deref_mut() {
                h.push(x.clone());
            }
            x = layer.forward(x, &rope, step.mask.as_ref(), kv, step.keep);
        }
        x
    }

    /// Runs the decoder with explicit RoPE `positions` `[batch, seq]` and an explicit attention
    /// `mask` `[batch, 1, seq, cached + seq]` (`true` hides a key), returning logits for every
    /// position `[batch, seq, vocab]`.
    ///
    /// With `cache` (one [`KvCache`] per layer) the new keys and values are appended to it and
    /// the queries attend to the cached keys first; without it the call is a plain full forward.
    /// Nothing is trimmed: callers that compress the cache (anchor-based attention) compact it
    /// with [`KvCache::retain`] themselves. Works under `Autodiff<B>` for training with custom
    /// masks. [`CausalLm::forward`] does not go through here.
    pub fn forward_masked(
        &self,
        tokens: Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
        mask: Option<Tensor<B, 4, Bool>>,
        cache: Option<&mut [KvCache<B>]>,
    ) -> Result<Tensor<B, 3>> {
        let layers = self.model.layers.len();
        let [batch, seq] = tokens.dims();
        if positions.dims() != [batch, seq] {
            return Err(kiln_core::Error::arg(
                "positions",
                format!(
                    "shape {:?} differs from the tokens' [{batch}, {seq}]",
                    positions.dims()
                ),
            ));
        }
        let mut scratch;
        let caches = match cache {
            Some(caches) => caches,
            None => {
                scratch = vec![KvCache::new(); layers];
                &mut scratch[..]
            }
        };
        if caches.len() != layers {
            return Err(kiln_core::Error::arg(
                "cache",
                format!("{} KV caches for {layers} layers", caches.len()),
            ));
        }
        let keys = caches[0].len() + seq;
        if let Some(mask) = &mask
            && mask.dims() != [batch, 1, seq, keys]
        {
            return Err(kiln_core::Error::arg(
                "mask",
                format!(
                    "shape {:?}, expected [{batch}, 1, {seq}, {keys}]",
                    mask.dims()
                ),
            ));
        }
        let rope = self.rope_angles(positions);
        let mut x = self.embed(tokens);
        for (layer, kv) in self.model.layers.iter().zip(caches.iter_mut()) {
            x = layer.forward(x, &rope, mask.as_ref(), kv, usize::MAX);
        }
        Ok(self.logits(self.model.norm.forward(x)))
    }
}

impl<B: Backend> CausalLm<B> for Llama<B> {
    type Cache = LlamaCache<B>;

    fn new_cache(&self, pad: Vec<usize>) -> LlamaCache<B> {
        LlamaCache {
            layers: vec![KvCache::new(); self.config.num_hidden_layers],
            state: CacheState::new(pad, self.config.sliding_window),
        }
    }

    fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut LlamaCache<B>,
        all: bool,
    ) -> Tensor<B, 3> {
        let [_, seq] = tokens.dims();
        let x = self.layers(self.embed(tokens), cache, None);
        // Only the positions whose logits are wanted go through the norm and the head.
        let x = if all || seq == 1 {
            x
        } else {
            x.narrow(1, seq - 1, 1)
        };
        self.logits(self.model.norm.forward(x))
    }

    fn truncate_cache(&self, cache: &mut LlamaCache<B>, len: usize) -> bool {
        if !cache.state.truncate(len) {
            return false;
        }
        for layer in &mut cache.layers {
            layer.truncate(len);
        }
        true
    }

    fn append_cache(
        &self,
        cache: &mut LlamaCache<B>,
        other: LlamaCache<B>,
    ) -> std::result::Result<(), LlamaCache<B>> {
        if cache
            .layers
            .iter()
            .chain(&other.layers)
            .any(KvCache::is_empty)
        {
            return Err(other);
        }
        let mut state = cache.state.clone();
        let Some((left, left_other)) = state.append(other.state.clone()) else {
            return Err(other);
        };
        cache.state = state;
        for (layer, theirs) in cache.layers.iter_mut().zip(other.layers) {
            layer.append_rows(theirs, left, left_other);
        }
        Ok(())
    }

    fn retain_cache_rows(&self, cache: &mut LlamaCache<B>, rows: &[usize]) -> bool {
        let drop = cache.state.retain_rows(rows);
        let ids: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let ids =
            Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [rows.len()]), &self.device());
        for layer in &mut cache.layers {
            layer.select_rows(ids.clone());
            layer.drop_front(drop);
        }
        true
    }

    fn reorder_cache(&self, cache: &mut LlamaCache<B>, indices: &[usize]) -> bool {
        let batch = cache.state.batch();
        if indices.iter().any(|&i| i >= batch) {
            return false;
        }
        cache.state.select_rows(indices);
        let device = self.device();
        let ids: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [indices.len()]), &device);
        for layer in &mut cache.layers {
            layer.select_rows(ids.clone());
        }
        true
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        self.config.eos_token_ids.clone()
    }

    fn pad_token_id(&self) -> Option<u32> {
        self.config.pad_token_id
    }

    fn max_context(&self) -> usize {
        self.config.max_position_embeddings
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn device(&self) -> B::Device {
        self.model.norm.weight.val().device()
    }
}
