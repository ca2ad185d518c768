use std::path::Path;
use std::sync::Arc;

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::prelude::*;
use burn::tensor::activation::{gelu, relu, silu};
use kiln_core::Result;
use kiln_core::loading::{
    LoadOptions, PackSlot, PackSlots, SafetensorsWeights, WeightSource, check_config_sizes,
    load_packed, save_hf_folder, seq2seq_generation_json,
};
use kiln_core::nn::{
    AttentionMask, Embedding, EmbeddingConfig, KvCache, TorchLinear, TorchLinearConfig,
    scaled_dot_product_attention,
};
use kiln_core::seq2seq::{DecoderCache, EncoderOutput, Seq2SeqLm, decoder_causal_mask};

use crate::{M2M100Activation, M2M100Config};

/// HF `M2M100SinusoidalPositionalEmbedding.get_embedding` rows for `positions`, `[n, dim]`
/// flattened: `sin` in the first half, `cos` in the second, frequencies
/// `exp(-j·ln(10000)/(dim/2 - 1))`, the `padding_idx` row zero; `f32` arithmetic as torch.
pub fn sinusoidal_positions(positions: &[i64], dim: usize, padding_idx: i64) -> Vec<f32> {
    let half = dim / 2;
    let step = (10000f64.ln() / (half as f64 - 1.0)) as f32;
    let freqs: Vec<f32> = (0..half).map(|j| (j as f32 * -step).exp()).collect();
    let mut out = Vec::with_capacity(positions.len() * dim);
    for &p in positions {
        if p == padding_idx {
            out.extend(std::iter::repeat_n(0.0, dim));
            continue;
        }
        let args: Vec<f32> = freqs.iter().map(|&f| p as f32 * f).collect();
        out.extend(args.iter().map(|a| a.sin()));
        out.extend(args.iter().map(|a| a.cos()));
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    out
}

/// HF `create_position_ids_from_input_ids`: non-padding tokens count from `padding_idx + 1`
/// (after `past` earlier positions), padding gets `padding_idx`.
pub fn position_ids(ids: &[i64], padding_idx: i64, past: usize) -> Vec<i64> {
    let mut count = past as i64;
    ids.iter()
        .map(|&t| {
            if t == padding_idx {
                padding_idx
            } else {
                count += 1;
                count + padding_idx
            }
        })
        .collect()
}

/// Multi-head attention (HF `M2M100Attention`), scaled by `1/sqrt(head_dim)`.
#[derive(Module, Debug)]
pub struct M2M100Attention<B: Backend> {
    /// Query projection.
    pub q_proj: TorchLinear<B>,
    /// Key projection.
    pub k_proj: TorchLinear<B>,
    /// Value projection.
    pub v_proj: TorchLinear<B>,
    /// Output projection.
    pub out_proj: TorchLinear<B>,
    heads: usize,
    head_dim: usize,
}

impl<B: Backend> M2M100Attention<B> {
    fn split(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        let [batch, seq, _] = x.dims();
        x.reshape([batch, seq, self.heads, self.head_dim])
            .swap_dims(1, 2)
    }

    /// Keys and values of `x` (the encoder's states, for cross-attention).
    fn key_values(&self, x: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [k, v] = TorchLinear::forward_many([&self.k_proj, &self.v_proj], x);
        (self.split(k), self.split(v))
    }

    /// Queries, keys and values of `x` (self-attention).
    fn query_key_values(&self, x: Tensor<B, 3>) -> [Tensor<B, 4>; 3] {
        TorchLinear::forward_many([&self.q_proj, &self.k_proj, &self.v_proj], x)
            .map(|t| self.split(t))
    }

    fn query(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        self.split(self.q_proj.forward(x))
    }

    /// Attention of the split queries `q` over `k` and `v`, through `out_proj`.
    fn attend(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        mask: Option<&AttentionMask<B>>,
    ) -> Tensor<B, 3> {
        let [batch, _, seq, _] = q.dims();
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = scaled_dot_product_attention(q, k, v, mask, None, scale);
        self.out_proj.forward(
            out.swap_dims(1, 2)
                .reshape([batch, seq, self.heads * self.head_dim]),
        )
    }
}

fn activate<B: Backend>(act: M2M100Activation, x: Tensor<B, 3>) -> Tensor<B, 3> {
    match act {
        M2M100Activation::Relu => relu(x),
        M2M100Activation::Gelu => gelu(x),
        M2M100Activation::GeluNew => {
            let inner = (x.clone() + x.clone().powi_scalar(3) * 0.044715)
                * (2.0 / std::f64::consts::PI).sqrt();
            x * 0.5 * (inner.tanh() + 1.0)
        }
        M2M100Activation::Silu => silu(x),
    }
}

/// One pre-norm encoder layer (HF `M2M100EncoderLayer`).
#[derive(Module, Debug)]
pub struct EncoderLayer<B: Backend> {
    /// Self-attention.
    pub self_attn: M2M100Attention<B>,
    /// Norm before self-attention.
    pub self_attn_layer_norm: LayerNorm<B>,
    /// Feed-forward in.
    pub fc1: TorchLinear<B>,
    /// Feed-forward out.
    pub fc2: TorchLinear<B>,
    /// Norm before the feed-forward.
    pub final_layer_norm: LayerNorm<B>,
    #[module(skip)]
    activation: M2M100Activation,
}

/// One pre-norm decoder layer (HF `M2M100DecoderLayer`).
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Causal self-attention.
    pub self_attn: M2M100Attention<B>,
    /// Norm before self-attention.
    pub self_attn_layer_norm: LayerNorm<B>,
    /// Cross-attention over the encoder output.
    pub encoder_attn: M2M100Attention<B>,
    /// Norm before cross-attention.
    pub encoder_attn_layer_norm: LayerNorm<B>,
    /// Feed-forward in.
    pub fc1: TorchLinear<B>,
    /// Feed-forward out.
    pub fc2: TorchLinear<B>,
    /// Norm before the feed-forward.
    pub final_layer_norm: LayerNorm<B>,
    #[module(skip)]
    activation: M2M100Activation,
}

/// The encoder (its token embeddings are `model.shared`; positions are not weights).
#[derive(Module, Debug)]
pub struct M2M100Encoder<B: Backend> {
    /// Layers.
    pub layers: Vec<EncoderLayer<B>>,
    /// Final norm.
    pub layer_norm: LayerNorm<B>,
}

/// The decoder.
#[derive(Module, Debug)]
pub struct M2M100Decoder<B: Backend> {
    /// Layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm.
    pub layer_norm: LayerNorm<B>,
}

/// HF `M2M100Model`.
#[derive(Module, Debug)]
pub struct M2M100Model<B: Backend> {
    /// Token embeddings shared by encoder, decoder and the (tied) LM head.
    pub shared: Embedding<B>,
    /// Encoder.
    pub encoder: M2M100Encoder<B>,
    /// Decoder.
    pub decoder: M2M100Decoder<B>,
}

/// `M2M100ForConditionalGeneration` (M2M100, NLLB-200): field names follow the checkpoint's
/// keys. transformers 5 stores only `model.shared.weight` for the tied embeddings.
#[derive(Module, Debug)]
pub struct M2M100<B: Backend> {
    /// Encoder-decoder.
    pub model: M2M100Model<B>,
    /// Untied LM head; `None` when tied to `model.shared`.
    pub lm_head: Option<TorchLinear<B>>,
    #[module(skip)]
    config: M2M100Config,
}

impl M2M100Config {
    /// A model with uninitialised weights, to be loaded.
    pub fn init<B: Backend>(&self, device: &B::Device) -> M2M100<B> {
        let d = self.d_model;
        let linear = |i, o| TorchLinearConfig::new(i, o).init(device);
        let norm = || LayerNormConfig::new(d).init(device);
        let attention = |heads: usize| M2M100Attention {
            q_proj: linear(d, d),
            k_proj: linear(d, d),
            v_proj: linear(d, d),
            out_proj: linear(d, d),
            heads,
            head_dim: d / heads,
        };
        let encoder = (0..self.encoder_layers)
            .map(|_| EncoderLayer {
                self_attn: attention(self.encoder_attention_heads),
                self_attn_layer_norm: norm(),
                fc1: linear(d, self.encoder_ffn_dim),
                fc2: linear(self.encoder_ffn_dim, d),
                final_layer_norm: norm(),
                activation: self.activation,
            })
            .collect();
        let decoder = (0..self.decoder_layers)
            .map(|_| DecoderLayer {
                self_attn: attention(self.decoder_attention_heads),
                self_attn_layer_norm: norm(),
                encoder_attn: attention(self.decoder_attention_heads),
                encoder_attn_layer_norm: norm(),
                fc1: linear(d, self.decoder_ffn_dim),
                fc2: linear(self.decoder_ffn_dim, d),
                final_layer_norm: norm(),
                activation: self.activation,
            })
            .collect();
        M2M100 {
            model: M2M100Model {
                shared: EmbeddingConfig::new(self.vocab_size, d).init(device),
                encoder: M2M100Encoder {
                    layers: encoder,
                    layer_norm: norm(),
                },
                decoder: M2M100Decoder {
                    layers: decoder,
                    layer_norm: norm(),
                },
            },
            lm_head: (!self.tie_word_embeddings).then(|| {
                TorchLinearConfig::new(d, self.vocab_size)
                    .with_bias(false)
                    .init(device)
            }),
            config: self.clone(),
        }
    }
}

impl<B: Backend> PackSlots<B> for M2M100<B> {
    fn pack_slots(&mut self) -> Vec<(String, PackSlot<'_, B>)> {
        fn attention<'a, B: Backend>(
            slots: &mut Vec<(String, PackSlot<'a, B>)>,
            prefix: String,
            a: &'a mut M2M100Attention<B>,
        ) {
            slots.extend([
                (format!("{prefix}.q_proj"), PackSlot::Linear(&mut a.q_proj)),
                (format!("{prefix}.k_proj"), PackSlot::Linear(&mut a.k_proj)),
                (format!("{prefix}.v_proj"), PackSlot::Linear(&mut a.v_proj)),
                (
                    format!("{prefix}.out_proj"),
                    PackSlot::Linear(&mut a.out_proj),
                ),
            ]);
        }
        let model = &mut self.model;
        let mut slots = vec![(
            "model.shared".to_string(),
            PackSlot::Embedding(&mut model.shared),
        )];
        for (i, layer) in model.encoder.layers.iter_mut().enumerate() {
            let p = format!("model.encoder.layers.{i}");
            attention(&mut slots, format!("{p}.self_attn"), &mut layer.self_attn);
            slots.push((format!("{p}.fc1"), PackSlot::Linear(&mut layer.fc1)));
            slots.push((format!("{p}.fc2"), PackSlot::Linear(&mut layer.fc2)));
        }
        for (i, layer) in model.decoder.layers.iter_mut().enumerate() {
            let p = format!("model.decoder.layers.{i}");
            attention(&mut slots, format!("{p}.self_attn"), &mut layer.self_attn);
            attention(
                &mut slots,
                format!("{p}.encoder_attn"),
                &mut layer.encoder_attn,
            );
            slots.push((format!("{p}.fc1"), PackSlot::Linear(&mut layer.fc1)));
            slots.push((format!("{p}.fc2"), PackSlot::Linear(&mut layer.fc2)));
        }
        if let Some(head) = &mut self.lm_head {
            slots.push(("lm_head".to_string(), PackSlot::Linear(head)));
        }
        slots
    }
}

impl<B: Backend> M2M100<B> {
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
        let config = M2M100Config::from_file(&dir.join("config.json"))?;
        let weights = SafetensorsWeights::open_dir(dir)?;
        Self::from_weights_with(&config, Arc::new(weights), device, options)
    }

    /// Builds the model from `config` and any weight source. Copies of the tied embeddings
    /// (`model.encoder.embed_tokens`, `lm_head`) are ignored when present.
    pub fn from_weights(
        config: &M2M100Config,
        weights: Arc<dyn WeightSource>,
        device: &B::Device,
    ) -> Result<Self> {
        Self::from_weights_with(config, weights, device, &LoadOptions::default())
    }

    /// [`from_weights`](Self::from_weights) with a precision or quantisation.
    pub fn from_weights_with(
        config: &M2M100Config,
        weights: Arc<dyn WeightSource>,
        device: &B::Device,
        options: &LoadOptions,
    ) -> Result<Self> {
        check_config_sizes(
            weights.as_ref(),
            &[
                ("vocab_size", config.vocab_size),
                ("d_model", config.d_model),
                ("encoder_attention_heads", config.encoder_attention_heads),
                ("decoder_attention_heads", config.decoder_attention_heads),
                ("encoder_ffn_dim", config.encoder_ffn_dim),
                ("decoder_ffn_dim", config.decoder_ffn_dim),
            ],
            &[
                ("encoder_layers", config.encoder_layers),
                ("decoder_layers", config.decoder_layers),
            ],
        )?;
        load_packed(config.init(device), weights, device, options)
    }

    /// The decoder over `tokens` (appended to `cache`, as [`Seq2SeqLm::decode_step`]): its final
    /// hidden states `[batch, new, d_model]` after the last layer norm, HF's
    /// `decoder_hidden_states[-1]`, what [`logits`](Self::logits) takes.
    pub fn decode_hidden(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut DecoderCache<B>,
    ) -> Tensor<B, 3> {
        let [_, new] = tokens.dims();
        let device = tokens.device();
        let past = cache.seen;
        let total = past + new;
        let causal = decoder_causal_mask::<B>(past, new, &device);
        let mut x = self.embed(tokens, past);
        for ((layer, kv), (ck, cv)) in self
            .model
            .decoder
            .layers
            .iter()
            .zip(cache.self_attn.iter_mut())
            .zip(cache.cross.iter())
        {
            let h = layer.self_attn_layer_norm.forward(x.clone());
            let [q, k, v] = layer.self_attn.query_key_values(h);
            let (k, v) = kv.update(k, v, usize::MAX);
            x = x + layer.self_attn.attend(q, k, v, causal.as_ref());
            let h = layer.encoder_attn_layer_norm.forward(x.clone());
            x = x + layer.encoder_attn.attend(
                layer.encoder_attn.query(h),
                ck.clone(),
                cv.clone(),
                cache.encoder_mask.as_ref(),
            );
            let h = layer.final_layer_norm.forward(x.clone());
            x = x + layer
                .fc2
                .forward(activate(layer.activation, layer.fc1.forward(h)));
        }
        cache.seen = total;
        self.model.decoder.layer_norm.forward(x)
    }

    /// Logits `[batch, new, vocab]` of decoder hidden states (the LM head, or the tied
    /// embeddings).
    pub fn logits(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(x),
            None => self.model.shared.lm_head(x),
        }
    }

    /// The model's config.
    pub fn config(&self) -> &M2M100Config {
        &self.config
    }

    /// Writes the model as an HF folder transformers and kiln both load: `model.safetensors`
    /// (f32; `model.shared.weight` and, when untied, `lm_head.weight`; no copies of the tied
    /// embeddings and no position table, as transformers stores neither), `config.json` and
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

    /// Scaled token embeddings plus sinusoidal positions.
    fn embed(&self, ids: Tensor<B, 2, Int>, past: usize) -> Tensor<B, 3> {
        let [batch, len] = ids.dims();
        let device = ids.device();
        let d = self.config.d_model;
        let pad = self.config.pad_token_id as i64;
        let host: Vec<i64> = ids
            .clone()
            .into_data()
            .convert::<i64>()
            .into_vec()
            .expect("int ids");
        let positions: Vec<i64> = host
            .chunks_exact(len)
            .flat_map(|row| position_ids(row, pad, past))
            .collect();
        let table = sinusoidal_positions(&positions, d, pad);
        let positions = Tensor::<B, 3>::from_data(TensorData::new(table, [batch, len, d]), &device);
        let scale = if self.config.scale_embedding {
            (d as f64).sqrt()
        } else {
            1.0
        };
        self.model.shared.forward(ids) * scale + positions
    }
}

impl<B: Backend> Seq2SeqLm<B> for M2M100<B> {
    type Cache = DecoderCache<B>;

    fn encode(
        &self,
        input_ids: Tensor<B, 2, Int>,
        padding: Option<Tensor<B, 2, Bool>>,
    ) -> EncoderOutput<B> {
        let [batch, len] = input_ids.dims();
        let mask = padding.map(|p| p.reshape([batch, 1, 1, len]));
        let mut x = self.embed(input_ids, 0);
        for layer in &self.model.encoder.layers {
            let h = layer.self_attn_layer_norm.forward(x.clone());
            let [q, k, v] = layer.self_attn.query_key_values(h);
            x = x + layer.self_attn.attend(q, k, v, mask.as_ref());
            let h = layer.final_layer_norm.forward(x.clone());
            x = x + layer
                .fc2
                .forward(activate(layer.activation, layer.fc1.forward(h)));
        }
        EncoderOutput {
            hidden: self.model.encoder.layer_norm.forward(x),
            mask,
        }
    }

    fn new_decoder_cache(&self, encoder: &EncoderOutput<B>) -> DecoderCache<B> {
        let cross = self
            .model
            .decoder
            .layers
            .iter()
            .map(|layer| layer.encoder_attn.key_values(encoder.hidden.clone()))
            .collect();
        DecoderCache {
            self_attn: vec![KvCache::new(); self.model.decoder.layers.len()],
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
        self.model.shared.weight.val().device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_skip_padding() {
        assert_eq!(position_ids(&[5, 6, 7, 1, 1], 1, 0), vec![2, 3, 4, 1, 1]);
        assert_eq!(position_ids(&[9], 1, 3), vec![5]);
    }

    #[test]
    fn sinusoid_layout_is_sin_then_cos() {
        let row = sinusoidal_positions(&[2], 8, 1);
        assert!((row[0] - 2f32.sin()).abs() < 1e-7);
        assert!((row[4] - 2f32.cos()).abs() < 1e-7);
        assert_eq!(sinusoidal_positions(&[1], 8, 1), vec![0.0; 8]);
    }
}
