use burn::prelude::*;
use burn::tensor::activation::softmax;

/// Boolean attention mask `[batch, 1, query_len, key_len]`; `true` hides a key from a query.
pub type AttentionMask<B> = Tensor<B, 4, Bool>;

/// `softmax(q·kᵀ·scale + bias, masked) · v` with grouped key/value heads.
///
/// - `q`: `[batch, heads, q_len, head_dim]`
/// - `k`, `v`: `[batch, kv_heads, k_len, head_dim]`, `heads` a multiple of `kv_heads`
/// - `mask`: `[batch, 1, q_len, k_len]`, shared by all heads
/// - `bias`: added to the scores, `[1 or batch, heads, q_len, k_len]` (T5's relative positions)
///
/// Grouped-query attention folds each group's query heads into the query-length axis
/// (`[batch, kv_heads, group·q_len, head_dim]`) instead of repeating K and V, so no copy of the
/// cache is made per step. Masks must leave every query at least one key (the KV cache masks
/// do: a padding query sees itself), so `-inf` filling cannot produce NaN.
pub fn scaled_dot_product_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<&AttentionMask<B>>,
    bias: Option<Tensor<B, 4>>,
    scale: f64,
) -> Tensor<B, 4> {
    attention_with_dropout(q, k, v, mask, bias, scale, None)
}

/// [`scaled_dot_product_attention`] with dropout on the attention probabilities, as HF's T5
/// and BART-family attention apply in training (Burn's `Dropout` acts only under autodiff).
pub fn attention_with_dropout<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<&AttentionMask<B>>,
    bias: Option<Tensor<B, 4>>,
    scale: f64,
    dropout: Option<&burn::nn::Dropout>,
) -> Tensor<B, 4> {
    let [batch, heads, q_len, head_dim] = q.dims();
    let [_, kv_heads, k_len, _] = k.dims();
    let v_dim = v.dims()[3];
    let group = heads / kv_heads;

    // Prompts and encoders on CubeCL, in inference, with the default scale and no bias (T5's
    // position bias keeps the explicit form): Burn's fused attention. Its autotune picks a flash
    // kernel where one runs and is faster, which never holds the `[batch, heads, q_len, k_len]`
    // scores (gigabytes for a long prompt), and its explicit form otherwise. Decode steps (one
    // query row) keep the grouped form below: the fused op wants K and V repeated per query
    // head, a copy of the cache every step.
    let default_scale = (scale * (head_dim as f64).sqrt() - 1.0).abs() < 1e-9;
    if q_len > 1
        && bias.is_none()
        && dropout.is_none()
        && default_scale
        && !B::ad_enabled(&q.device())
        && !super::cpu_backend::<B>(&q.device())
    {
        let repeat = |t: Tensor<B, 4>| {
            if group == 1 {
                return t;
            }
            let [b, h, n, d] = t.dims();
            t.unsqueeze_dim::<5>(2)
                .expand([b, h, group, n, d])
                .reshape([b, heads, n, d])
        };
        let mask = mask.map(|m| m.clone().expand([batch, heads, q_len, k_len]));
        return burn::tensor::module::attention(
            q,
            repeat(k),
            repeat(v),
            mask,
            None,
            burn::tensor::ops::AttentionModuleOptions::default(),
        );
    }
    // Decode steps on flex: a kernel that reads the cache in place (flex_attention.rs).
    #[cfg(feature = "flex")]
    if bias.is_none()
        && dropout.is_none()
        && super::flex_backend::<B>(&q.device())
        && let Some(out) = super::flex_attention::attention(&q, &k, &v, mask, scale)
    {
        return out;
    }
    let q = (q * scale).reshape([batch, kv_heads, group * q_len, head_dim]);
    // One query row per head (a decode step without grouped heads) on CubeCL: cubecl 0.10's
    // matmul autotune can pick a vector-matrix kernel that refuses the layout of the right-hand
    // side and panics ("Vecmat plane parallel only supports col major rhs", seen on wgpu in
    // NLLB's batch-2 decode, both products; tracel-ai/cubecl#1611). Broadcast products summed
    // over the shared axis are the same sums and never reach that kernel.
    let vector_rows = group * q_len == 1 && !super::cpu_backend::<B>(&q.device());
    let mut scores = if vector_rows {
        (q * k).sum_dim(3).swap_dims(2, 3)
    } else {
        q.matmul(k.swap_dims(2, 3))
    };
    if let Some(bias) = bias {
        let bias_batch = bias.dims()[0];
        scores = scores + bias.reshape([bias_batch, kv_heads, group * q_len, k_len]);
    }
    if let Some(mask) = mask {
        let mask = if group > 1 {
            mask.clone().repeat_dim(2, group)
        } else {
            mask.clone()
        };
        let mask = mask.expand([batch, kv_heads, group * q_len, k_len]);
        scores = scores.mask_fill(mask, f32::NEG_INFINITY);
    }
    let mut probs = softmax(scores, 3);
    if let Some(dropout) = dropout {
        probs = dropout.forward(probs);
    }
    let out = if vector_rows {
        (probs.swap_dims(2, 3) * v).sum_dim(2)
    } else {
        probs.matmul(v)
    };
    out.reshape([batch, heads, q_len, v_dim])
}
