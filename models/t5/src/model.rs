use std::path::Path;
use std::sync::Arc;

use burn::module::Module;
use burn::nn::EmbeddingConfig as BiasEmbeddingConfig;
use burn::nn::{Dropout, DropoutConfig, Embedding as BiasEmbedding};
use burn::prelude::*;
use burn::tensor::activation::{gelu, relu, silu};
use kiln_core::Result;
use kiln_core::loading::{
    LoadOptions, PackSlot, PackSlots, SafetensorsWeights, WeightSource, check_config_sizes,
    load_packed, save_hf_folder, seq2seq_generation_json,
};
use kiln_core::nn::{
    AttentionMask, Embedding, EmbeddingConfig, KvCache, RmsNorm, RmsNormConfig, TorchLinear,
    TorchLinearConfig, attention_with_dropout,
};
use kiln_core::seq2seq::{DecoderCache, EncoderOutput, Seq2SeqLm, decoder_causal_mask};

use crate::{T5Activation, T5Config};

/// HF's `T5Attention._relative_position_bucket`, in the same `f32` arithmetic as torch.
///
/// `relative_position` is `key - query`. Bidirectional (encoder): half the buckets for keys
/// after the query. Causal (decoder): only keys at or before the query get distinct buckets.
/// Within each half, distances below `num_buckets / 2` are exact, larger ones share
/// logarithmically sized buckets up to `max_distance`.
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> i64 {
    let mut buckets = 0i64;
    let mut num_buckets = num_buckets as i64;
    let rel = if bidirectional {
        num_buckets /= 2;
        if relative_position > 0 {
            buckets += num_buckets;
        }
        relative_position.abs()
    } else {
        -relative_position.min(0)
    };
    let max_exact = num_buckets / 2;
    if rel < max_exact {
        buckets + rel
    } else {
        let scale = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
        let large = max_exact
            + ((rel as f32 / max_exact as f32).ln() / scale * (num_buckets - max_exact) as f32)
                as i64;
        buckets + large.min(num_buckets - 1)
    }
}

/// One T5 attention (HF `T5Attention`): no biases, no `1/sqrt(d)` scaling; the first layer of
/// each stack owns the relative-position bias shared by all layers of the stack.
#[derive(Module, Debug)]
pub struct T5Attention<B: Backend> {
    /// Query projection.
    pub q: TorchLinear<B>,
    /// Key projection.
    pub k: TorchLinear<B>,
    /// Value projection.
    pub v: TorchLinear<B>,
    /// Output projection.
    pub o: TorchLinear<B>,
    /// `[num_buckets, heads]`, only in the first self-attention of each stack.
    pub relative_attention_bias: Option<BiasEmbedding<B>>,
    heads: usize,
    d_kv: usize,
    num_buckets: usize,
    max_distance: usize,
}

impl<B: Backend> T5Attention<B> {
    fn split(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        let [batch, seq, _] = x.dims();
        x.reshape([batch, seq, self.heads, self.d_kv])
            .swap_dims(1, 2)
    }

    /// Keys and values of `x`, `[batch, heads, seq, d_kv]`.
    fn key_values(&self, x: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [k, v] = TorchLinear::forward_many([&self.k, &self.v], x);
        (self.split(k), self.split(v))
    }

    /// Queries, keys and values of `x` (self-attention).
    fn query_key_values(&self, x: Tensor<B, 3>) -> [Tensor<B, 4>; 3] {
        TorchLinear::forward_many([&self.q, &self.k, &self.v], x).map(|t| self.split(t))
    }

    fn query(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        self.split(self.q.forward(x))
    }

    /// Attention of the split queries `q` over `k` and `v`, through `o`.
    fn attend(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        mask: Option<&AttentionMask<B>>,
        bias: Option<Tensor<B, 4>>,
        dropout: &Dropout,
    ) -> Tensor<B, 3> {
        let [batch, _, seq, _] = q.dims();
        let out = attention_with_dropout(q, k, v, mask, bias, 1.0, Some(dropout));
        self.o.forward(
            out.swap_dims(1, 2)
                .reshape([batch, seq, self.heads * self.d_kv]),
        )
    }

    /// The position bias `[1, heads, q_len, k_len]` for queries at `q_start..q_start + q_len`
    /// against keys `0..k_len` (HF `compute_bias`).
    fn compute_bias(
        &self,
        q_start: usize,
        q_len: usize,
        k_len: usize,
        bidirectional: bool,
        device: &B::Device,
    ) -> Option<Tensor<B, 4>> {
        let table = self.relative_attention_bias.as_ref()?;
        let mut ids = Vec::with_capacity(q_len * k_len);
        for q in q_start..q_start + q_len {
            for k in 0..k_len {
                ids.push(relative_position_bucket(
                    k as i64 - q as i64,
                    bidirectional,
                    self.num_buckets,
                    self.max_distance,
                ));
            }
        }
        let ids = Tensor::from_data(TensorData::new(ids, [1, q_len * k_len]), device);
        let values = table.forward(ids); // [1, q*k, heads]
        Some(
            values
                .reshape([q_len, k_len, self.heads])
                .permute([2, 0, 1])
                .unsqueeze::<4>(),
        )
    }
}

/// T5's feed-forward (HF `T5DenseActDense` with `wi`, or `T5DenseGatedActDense` with `wi_0`
/// and `wi_1`).
#[derive(Module, Debug)]
pub struct T5DenseReluDense<B: Backend> {
    /// Input projection (non-gated).
    pub wi: Option<TorchLinear<B>>,
    /// Activated input projection (gated).
    pub wi_0: Option<TorchLinear<B>>,
    /// Linear input projection (gated).
    pub wi_1: Option<TorchLinear<B>>,
    /// Output projection.
    pub wo: TorchLinear<B>,
    #[module(skip)]
    activation: T5Activation,
}

/// `gelu_new`: `0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))`.
fn gelu_new<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let inner =
        (x.clone() + x.clone().powi_scalar(3) * 0.044715) * (2.0 / std::f64::consts::PI).sqrt();
    x * 0.5 * (inner.tanh() + 1.0)
}

impl<B: Backend> T5DenseReluDense<B> {
    fn act(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self.activation {
            T5Activation::Relu => relu(x),
            T5Activation::GeluNew => gelu_new(x),
            T5Activation::Gelu => gelu(x),
            T5Activation::Silu => silu(x),
        }
    }

    fn forward(&self, x: Tensor<B, 3>, dropout: &Dropout) -> Tensor<B, 3> {
        let h = match (&self.wi, &self.wi_0, &self.wi_1) {
            (Some(wi), _, _) => self.act(wi.forward(x)),
            (None, Some(wi_0), Some(wi_1)) => {
                let [gate, up] = TorchLinear::forward_many([wi_0, wi_1], x);
                self.act(gate) * up
            }
            _ => unreachable!("T5DenseReluDense built with neither wi nor wi_0/wi_1"),
        };
        self.wo.forward(dropout.forward(h))
    }
}

/// One sub-layer of a T5 block (`block.N.layer.M`): its pre-norm plus exactly one of
/// self-attention, cross-attention or feed-forward.
///
/// HF names the sub-layer's module after its kind (`layer.0.SelfAttention`,
/// `layer.1.EncDecAttention`, `layer.1.DenseReluDense`, ...). burn-store puts enum variant
/// names into parameter paths, so an enum would not match the checkpoint keys; one struct with
/// an optional field per kind does, with no remap table.
#[allow(non_snake_case)]
#[derive(Module, Debug)]
pub struct T5Layer<B: Backend> {
    /// Self-attention sub-layer.
    pub SelfAttention: Option<T5Attention<B>>,
    /// Cross-attention sub-layer (decoder).
    pub EncDecAttention: Option<T5Attention<B>>,
    /// Feed-forward sub-layer.
    pub DenseReluDense: Option<T5DenseReluDense<B>>,
    /// Pre-norm (T5LayerNorm).
    pub layer_norm: RmsNorm<B>,
}

/// One block: `[self-attn, ff]` in the encoder, `[self-attn, cross-attn, ff]` in the decoder.
#[derive(Module, Debug)]
pub struct T5Block<B: Backend> {
    /// The sub-layers, in order.
    pub layer: Vec<T5Layer<B>>,
}

/// An encoder or decoder stack (HF `T5Stack`). Its `embed_tokens` is `shared`, so it is not
/// stored here (transformers 5 does not save it either).
#[derive(Module, Debug)]
pub struct T5Stack<B: Backend> {
    /// Blocks.
    pub block: Vec<T5Block<B>>,
    /// Final norm.
    pub final_layer_norm: RmsNorm<B>,
}

impl<B: Backend> T5Stack<B> {
    fn first_attention(&self) -> &T5Attention<B> {
        self.block[0].layer[0]
            .SelfAttention
            .as_ref()
            .expect("T5 block starts with self-attention")
    }
}

/// `T5ForConditionalGeneration`: field names follow the checkpoint's keys.
#[derive(Module, Debug)]
pub struct T5<B: Backend> {
    /// Token embeddings shared by encoder, decoder and (tied) LM head.
    pub shared: Embedding<B>,
    /// Encoder.
    pub encoder: T5Stack<B>,
    /// Decoder.
    pub decoder: T5Stack<B>,
    /// Untied LM head; `None` when tied to `shared`.
    pub lm_head: Option<TorchLinear<B>>,
    /// `dropout_rate`, applied where HF's T5 applies it (embeddings, attention probabilities,
    /// the feed-forward's hidden layer, each sub-layer's output, the stacks' outputs). Burn's
    /// dropout acts only under autodiff, so training uses it and inference never does.
    pub dropout: Dropout,
    #[module(skip)]
    config: T5Config,
}

impl T5Config {
    /// A model with uninitialised weights, to be loaded.
    pub fn init<B: Backend>(&self, device: &B::Device) -> T5<B> {
        let linear = |i, o| TorchLinearConfig::new(i, o).with_bias(false).init(device);
        let d = self.d_model;
        let inner = self.num_heads * self.d_kv;
        let norm = || {
            RmsNormConfig::new(d)
                .with_eps(self.layer_norm_epsilon)
                .init(device)
        };
        let attention = |bias: bool| T5Attention {
            q: linear(d, inner),
            k: linear(d, inner),
            v: linear(d, inner),
            o: linear(inner, d),
            relative_attention_bias: bias.then(|| {
                BiasEmbeddingConfig::new(self.relative_attention_num_buckets, self.num_heads)
                    .init(device)
            }),
            heads: self.num_heads,
            d_kv: self.d_kv,
            num_buckets: self.relative_attention_num_buckets,
            max_distance: self.relative_attention_max_distance,
        };
        let layer =
            |self_attn: Option<T5Attention<B>>, cross: Option<T5Attention<B>>, ff: bool| T5Layer {
                SelfAttention: self_attn,
                EncDecAttention: cross,
                DenseReluDense: ff.then(|| T5DenseReluDense {
                    wi: (!self.gated).then(|| linear(d, self.d_ff)),
                    wi_0: self.gated.then(|| linear(d, self.d_ff)),
                    wi_1: self.gated.then(|| linear(d, self.d_ff)),
                    wo: linear(self.d_ff, d),
                    activation: self.activation,
                }),
                layer_norm: norm(),
            };
        let encoder = (0..self.num_layers)
            .map(|i| T5Block {
                layer: vec![
                    layer(Some(attention(i == 0)), None, false),
                    layer(None, None, true),
                ],
            })
            .collect();
        let decoder = (0..self.num_decoder_layers)
            .map(|i| T5Block {
                layer: vec![
                    layer(Some(attention(i == 0)), None, false),
                    layer(None, Some(attention(false)), false),
                    layer(None, None, true),
                ],
            })
            .collect();
        T5 {
            shared: EmbeddingConfig::new(self.vocab_size, d).init(device),
            encoder: T5Stack {
                block: encoder,
                final_layer_norm: norm(),
            },
            decoder: T5Stack {
                block: decoder,
                final_layer_norm: norm(),
            },
            lm_head: (!self.tie_word_embeddings).then(|| linear(d, self.vocab_size)),
            dropout: DropoutConfig::new(self.dropout_rate).init(),
            config: self.clone(),
        }
    }
}

impl<B: Backend> PackSlots<B> for T5<B> {
    fn pack_slots(&mut self) -> Vec<(String, PackSlot<'_, B>)> {
        let mut slots = vec![("shared".to_string(), PackSlot::Embedding(&mut self.shared))];
        for (name, stack) in [
            ("encoder", &mut self.encoder),
            ("decoder", &mut self.decoder),
        ] {
            for (b, block) in stack.block.iter_mut().enumerate() {
                for (l, layer) in block.layer.iter_mut().enumerate() {
                    let p = |rest: &str| format!("{name}.block.{b}.layer.{l}.{rest}");
                    for (kind, attn) in [
                        ("SelfAttention", layer.SelfAttention.as_mut()),
                        ("EncDecAttention", layer.EncDecAttention.as_mut()),
                    ] {
                        if let Some(a) = attn {
                            slots.extend([
                                (p(&format!("{kind}.q")), PackSlot::Linear(&mut a.q)),
                                (p(&format!("{kind}.k")), PackSlot::Linear(&mut a.k)),
                                (p(&format!("{kind}.v")), PackSlot::Linear(&mut a.v)),
                                (p(&format!("{kind}.o")), PackSlot::Linear(&mut a.o)),
                            ]);
                        }
                    }
                    if let Some(ff) = layer.DenseReluDense.as_mut() {
                        for (n, lin) in [
                            ("wi", ff.wi.as_mut()),
                            ("wi_0", ff.wi_0.as_mut()),
                            ("wi_1", ff.wi_1.as_mut()),
                            ("wo", Some(&mut ff.wo)),
                        ] {
                            if let Some(lin) = lin {
                                slots.push((
                                    p(&format!("DenseReluDense.{n}")),
                                    PackSlot::Linear(lin),
                                ));
                            }
                        }
                    }
                }
            }
        }
        if let Some(head) = &mut self.lm_head {
            slots.push(("lm_head".to_string(), PackSlot::Linear(head)));
        }
        slots
    }
}

impl<B: Backend> T5<B> {
    /// Loads the checkpoint in `dir` (config.json + safetensors).
    pub fn from_pretrained(dir: &Path, device: &B::Device) -> Result<Self> {
        Self::from_pretrained_with(dir, device, &LoadOptions::default())
    }

    /// [`from_pretrained`](Self::from_pretrained) with a precision or quantisation.
    pub fn from_pretrained_with(
        dir: &Path,
        device: &B::Device,
        options: &LoadOptions,
    ) -> Result<Self> {
        let config = T5Config::from_file(&dir.join("config.json"))?;
        let weights = SafetensorsWeights::open_dir(dir)?;
        Self::from_weights_with(&config, Arc::new(weights), device, options)
    }

    /// Builds the model from `config` and any weight source. Checkpoints may or may not hold
    /// `encoder.embed_tokens` / `decoder.embed_tokens` (copies of `shared`); only `shared` is
    /// read. The LM head is `lm_head.weight` when the source holds it, else `shared`, whatever
    /// `config.tie_word_embeddings` says (HF's rule).
    pub fn from_weights(
        config: &T5Config,
        weights: Arc<dyn WeightSource>,
        device: &B::Device,
    ) -> Result<Self> {
        Self::from_weights_with(config, weights, device, &LoadOptions::default())
    }

    /// [`from_weights`](Self::from_weights) with a precision or quantisation.
    pub fn from_weights_with(
        config: &T5Config,
        weights: Arc<dyn WeightSource>,
        device: &B::Device,
        options: &LoadOptions,
    ) -> Result<Self> {
        // As HF: the checkpoint, not the config, says whether there is a separate LM head.
        check_config_sizes(
            weights.as_ref(),
            &[
                ("vocab_size", config.vocab_size),
                ("d_model", config.d_model),
                ("d_kv", config.d_kv),
                ("d_ff", config.d_ff),
                ("num_heads", config.num_heads),
                (
                    "relative_attention_num_buckets",
                    config.relative_attention_num_buckets,
                ),
            ],
            &[
                ("num_layers", config.num_layers),
                ("num_decoder_layers", config.num_decoder_layers),
            ],
        )?;
        let mut config = config.clone();
        config.tie_word_embeddings = !weights.tensors().iter().any(|t| t.name == "lm_head.weight");
        load_packed(config.init(device), weights, device, options)
    }

    /// The model's config.
    pub fn config(&self) -> &T5Config {
        &self.config
    }

    /// Writes the model as an HF folder transformers and kiln both load: `model.safetensors`
    /// (f32, `shared.weight` and, when untied, `lm_head.weight`; the tied `embed_tokens` are not
    /// stored, as transformers does not store them), `config.json` and
    /// `generation_config.json`. The tokenizer is the caller's to copy.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        let mut config = self.config.clone();
        config.tie_word_embeddings = self.lm_head.is_none();
        let generation = seq2seq_generation_json(
            config.decoder_start_token_id,
            &config.eos_token_ids,
            config.pad_token_id,
        );
        save_hf_folder(self, dir, &config.to_hf_json(), &generation)
    }

    /// The decoder over `tokens` (appended to `cache`, as [`Seq2SeqLm::decode_step`]): its final
    /// hidden states `[batch, new, d_model]`, HF's `decoder_hidden_states[-1]` (T5Model's
    /// `last_hidden_state`), what [`logits`](Self::logits) takes.
    pub fn decode_hidden(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut DecoderCache<B>,
    ) -> Tensor<B, 3> {
        let [_, new] = tokens.dims();
        let device = tokens.device();
        let past = cache.seen;
        let total = past + new;
        let bias = self
            .decoder
            .first_attention()
            .compute_bias(past, new, total, false, &device);
        let causal = decoder_causal_mask::<B>(past, new, &device);
        let d = &self.dropout;
        let mut x = d.forward(self.shared.forward(tokens));
        for ((block, kv), (ck, cv)) in self
            .decoder
            .block
            .iter()
            .zip(cache.self_attn.iter_mut())
            .zip(cache.cross.iter())
        {
            let sa = &block.layer[0];
            let attn = sa.SelfAttention.as_ref().expect("self-attention");
            let h = sa.layer_norm.forward(x.clone());
            let [q, k, v] = attn.query_key_values(h);
            let (k, v) = kv.update(k, v, usize::MAX);
            x = x + d.forward(attn.attend(q, k, v, causal.as_ref(), bias.clone(), d));

            let ca = &block.layer[1];
            let attn = ca.EncDecAttention.as_ref().expect("cross-attention");
            let h = ca.layer_norm.forward(x.clone());
            let mask = cache.encoder_mask.as_ref();
            x = x + d.forward(attn.attend(attn.query(h), ck.clone(), cv.clone(), mask, None, d));

            let ff = &block.layer[2];
            let h = ff.layer_norm.forward(x.clone());
            x = x + d.forward(
                ff.DenseReluDense
                    .as_ref()
                    .expect("feed-forward")
                    .forward(h, d),
            );
        }
        cache.seen = total;
        d.forward(self.decoder.final_layer_norm.forward(x))
    }

    /// Logits `[batch, new, vocab]` of decoder hidden states (the tied-head scaling when the
    /// checkpoint has it, then the LM head or the tied embeddings).
    pub fn logits(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = if self.config.scale_decoder_outputs {
            x * (self.config.d_model as f64).powf(-0.5)
        } else {
            x
        };
        match &self.lm_head {
            Some(head) => head.forward(x),
            None => self.shared.lm_head(x),
        }
    }
}

impl<B: Backend> Seq2SeqLm<B> for T5<B> {
    type Cache = DecoderCache<B>;

    fn encode(
        &self,
        input_ids: Tensor<B, 2, Int>,
        padding: Option<Tensor<B, 2, Bool>>,
    ) -> EncoderOutput<B> {
        let [batch, len] = input_ids.dims();
        let device = input_ids.device();
        let mask = padding.map(|p| p.reshape([batch, 1, 1, len]));
        let bias = self
            .encoder
            .first_attention()
            .compute_bias(0, len, len, true, &device);
        let d = &self.dropout;
        let mut x = d.forward(self.shared.forward(input_ids));
        for block in &self.encoder.block {
            let sa = &block.layer[0];
            let attn = sa.SelfAttention.as_ref().expect("self-attention");
            let h = sa.layer_norm.forward(x.clone());
            let [q, k, v] = attn.query_key_values(h);
            x = x + d.forward(attn.attend(q, k, v, mask.as_ref(), bias.clone(), d));
            let ff = &block.layer[1];
            let h = ff.layer_norm.forward(x.clone());
            x = x + d.forward(
                ff.DenseReluDense
                    .as_ref()
                    .expect("feed-forward")
                    .forward(h, d),
            );
        }
        EncoderOutput {
            hidden: d.forward(self.encoder.final_layer_norm.forward(x)),
            mask,
        }
    }

    fn new_decoder_cache(&self, encoder: &EncoderOutput<B>) -> DecoderCache<B> {
        let cross = self
            .decoder
            .block
            .iter()
            .map(|block| {
                block.layer[1]
                    .EncDecAttention
                    .as_ref()
                    .expect("cross-attention")
                    .key_values(encoder.hidden.clone())
            })
            .collect();
        DecoderCache {
            self_attn: vec![KvCache::new(); self.decoder.block.len()],
            cross,
            encoder_mask: encoder.mask.clone(),
            seen: 0,
        }
    }

    fn decode_step(&self, tokens: Tensor<B, 2, Int>, cache: &mut DecoderCache<B>) -> Tensor<B, 3> {
        let hidden = self.decode_hidden(tokens, cache);
        self.logits(hidden)
    }

    fn reorder_cache(&self, cache: &mut DecoderCache<B>, indices: Tensor<B, 1, Int>) {
        cache.select_rows(indices);
    }

    fn decoder_start_token_id(&self) -> u32 {
        self.config.decoder_start_token_id
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        self.config.eos_token_ids.clone()
    }

    fn pad_token_id(&self) -> u32 {
        self.config.pad_token_id
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn device(&self) -> B::Device {
        self.shared.weight.val().device()
    }
}

#[cfg(test)]
mod tests {
    use super::relative_position_bucket as bucket;

    #[test]
    fn buckets_match_hf() {
        // Values from transformers' T5Attention._relative_position_bucket(32, 128).
        assert_eq!(bucket(0, true, 32, 128), 0);
        assert_eq!(bucket(3, true, 32, 128), 19);
        assert_eq!(bucket(-3, true, 32, 128), 3);
        assert_eq!(bucket(-20, true, 32, 128), 10);
        assert_eq!(bucket(200, true, 32, 128), 31);
        assert_eq!(bucket(3, false, 32, 128), 0);
        assert_eq!(bucket(-5, false, 32, 128), 5);
        assert_eq!(bucket(-40, false, 32, 128), 23);
        assert_eq!(bucket(-1000, false, 32, 128), 31);
    }
}
