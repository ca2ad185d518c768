//! The shared attention kernel on this build's backend against a plain host computation:
//! masks broadcast over heads and grouped queries, one-query decode steps included. This is
//! what "same code, any backend" rests on, so it runs on every backend CI builds.

mod common;

use burn::prelude::*;
use common::{B, device};
use kiln::core::nn::scaled_dot_product_attention;

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// softmax(q·kᵀ·scale, masked)·v on the host; query head h uses kv head h / group.
#[allow(clippy::too_many_arguments)]
fn host_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    hidden: &[bool],
    [batch, heads, q_len, dim]: [usize; 4],
    kv_heads: usize,
    k_len: usize,
    scale: f32,
) -> Vec<f32> {
    let group = heads / kv_heads;
    let mut out = vec![0.0; batch * heads * q_len * dim];
    for b in 0..batch {
        for h in 0..heads {
            let kh = h / group;
            for i in 0..q_len {
                let qi = &q[((b * heads + h) * q_len + i) * dim..][..dim];
                let mut scores: Vec<f32> = (0..k_len)
                    .map(|j| {
                        if hidden[(b * q_len + i) * k_len + j] {
                            return f32::NEG_INFINITY;
                        }
                        let kj = &k[((b * kv_heads + kh) * k_len + j) * dim..][..dim];
                        qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = scores
                    .iter_mut()
                    .map(|s| {
                        *s = (*s - max).exp();
                        *s
                    })
                    .sum();
                let o = &mut out[((b * heads + h) * q_len + i) * dim..][..dim];
                for j in 0..k_len {
                    let vj = &v[((b * kv_heads + kh) * k_len + j) * dim..][..dim];
                    for d in 0..dim {
                        o[d] += scores[j] / sum * vj[d];
                    }
                }
            }
        }
    }
    out
}

fn check(batch: usize, heads: usize, kv_heads: usize, q_len: usize, k_len: usize) {
    check_scaled(batch, heads, kv_heads, q_len, k_len, 0.5);
}

/// With `scale` 1/√head_dim, prompts on the GPU backends take Burn's fused attention.
fn check_scaled(
    batch: usize,
    heads: usize,
    kv_heads: usize,
    q_len: usize,
    k_len: usize,
    scale: f32,
) {
    let dim = 8;
    let device = device();
    let q = values(batch * heads * q_len * dim, 1);
    let k = values(batch * kv_heads * k_len * dim, 2);
    let v = values(batch * kv_heads * k_len * dim, 3);
    // Row b hides its first b+1 keys (left padding) and keys after the query (causal).
    let hidden: Vec<bool> = (0..batch * q_len * k_len)
        .map(|i| {
            let (b, rest) = (i / (q_len * k_len), i % (q_len * k_len));
            let (qi, j) = (rest / k_len, rest % k_len);
            j < b + 1 || j > k_len - q_len + qi
        })
        .collect();
    let t = |data: Vec<f32>, shape: [usize; 4]| {
        Tensor::<B, 4>::from_data(TensorData::new(data, shape), &device)
    };
    let mask = Tensor::<B, 4, Bool>::from_data(
        TensorData::new(hidden.clone(), [batch, 1, q_len, k_len]),
        &device,
    );
    let out = scaled_dot_product_attention(
        t(q.clone(), [batch, heads, q_len, dim]),
        t(k.clone(), [batch, kv_heads, k_len, dim]),
        t(v.clone(), [batch, kv_heads, k_len, dim]),
        Some(&mask),
        None,
        scale as f64,
    );
    let got = out.into_data().convert::<f32>().to_vec::<f32>().unwrap();
    let want = host_attention(
        &q,
        &k,
        &v,
        &hidden,
        [batch, heads, q_len, dim],
        kv_heads,
        k_len,
        scale,
    );
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        diff < 1e-5,
        "batch {batch}, heads {heads}/{kv_heads}, q {q_len}, k {k_len}: max |Δ| {diff}"
    );
}

#[test]
fn masked_prefill_mha() {
    check(2, 4, 4, 5, 7);
}

#[test]
fn masked_prefill_gqa() {
    check(2, 4, 2, 5, 7);
}

/// The default scale, so on a GPU backend this runs `burn::tensor::module::attention` (K and V
/// repeated per query head for GQA, the mask expanded to every head).
#[test]
fn masked_prefill_default_scale() {
    let scale = 1.0 / 8f32.sqrt();
    check_scaled(2, 4, 4, 5, 7, scale);
    check_scaled(2, 4, 2, 5, 7, scale);
    check_scaled(3, 6, 2, 9, 9, scale);
}

#[test]
fn masked_decode_step_mha() {
    check(2, 4, 4, 1, 9);
}

#[test]
fn masked_decode_step_gqa() {
    check(3, 6, 2, 1, 9);
}

/// RoPE of a left-padded batch: each row has its own positions.
#[test]
fn rope_positions_per_row() {
    rope_positions(6, 0);
}

/// A decode step: one new position per row, rows at different positions.
#[test]
fn rope_decode_positions_per_row() {
    rope_positions(1, 24);
}

/// The rotation against HF's formula on the host: `x·cos + rotate_half(x)·sin`, with
/// `rotate_half(x) = cat(-x₂, x₁)` and channel `c` turning at frequency `c mod dim/2`.
fn rope_positions(seq: usize, start: i64) {
    use kiln::core::nn::{RopeScaling, RotaryEmbedding};
    let device = device();
    let (batch, heads, dim) = (3, 2, 8);
    let half = dim / 2;
    let positions: Vec<i64> = (0..batch * seq)
        .map(|i| (start + (i % seq) as i64 - 7 * (i / seq) as i64).max(0))
        .collect();
    let x = values(batch * seq * heads * dim, 5);
    let rope = RotaryEmbedding::<B>::new(dim, 10000.0, &RopeScaling::None, &device);
    let angles = rope
        .angles(Tensor::from_data(
            TensorData::new(positions.clone(), [batch, seq]),
            &device,
        ))
        .for_heads(heads);
    let got = angles
        .apply(Tensor::from_data(
            TensorData::new(x.clone(), [batch, seq, heads, dim]),
            &device,
        ))
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap();
    for (i, &p) in positions.iter().enumerate() {
        for h in 0..heads {
            let row = &x[(i * heads + h) * dim..][..dim];
            for c in 0..dim {
                let freq = 1.0 / 10000f64.powf((2 * (c % half)) as f64 / dim as f64);
                let (sin, cos) = (p as f64 * freq).sin_cos();
                let rotated = if c < half {
                    -row[c + half]
                } else {
                    row[c - half]
                };
                let want = (row[c] as f64 * cos + rotated as f64 * sin) as f32;
                let have = got[(i * heads + h) * dim + c];
                assert!(
                    (have - want).abs() < 1e-5,
                    "position {p} (flat {i}), head {h}, channel {c}: {have} vs {want}"
                );
            }
        }
    }
}
