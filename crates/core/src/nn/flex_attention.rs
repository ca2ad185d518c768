//! Attention of a few query rows (decode steps) on flex, read in place from flex's buffers.
//!
//! flex runs `q·kᵀ` and `p·v` through the `gemm` crate, one call per key/value head on the
//! calling thread, and `gemm` packs its operands first: at one query row per head that is a
//! copy of the whole cache per step. `perf` of SmolLM2 Q4_1 decode at 1500 cached tokens put 35 %
//! of the step in that packing, all on one core. Here each (batch row, key/value head, chunk of
//! keys) streams its keys and values once, on the packed kernels' threads, and the chunks are
//! merged as flash-decoding does (running max and sum per chunk).

use std::any::Any;

use burn::prelude::*;
use burn::tensor::{DType, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;

use super::AttentionMask;
use crate::packed::{SendPtr, parallel_for, threads};

/// Query rows per key/value head (grouped heads × query length) up to which this kernel runs;
/// past it (prefill) `gemm`'s packing pays for itself.
const MAX_ROWS: usize = 16;

/// Fewest keys per task: below it the merge costs more than the split gains.
const MIN_CHUNK: usize = 32;

/// `softmax(q·kᵀ·scale, masked)·v` with `q [batch, heads, q_len, d]`, `k`/`v
/// [batch, kv_heads, len, d]` (views allowed), on flex in f32 with few query rows; `None` when
/// any of that does not hold, and the caller takes Burn's ops.
pub(super) fn attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: Option<&AttentionMask<B>>,
    scale: f64,
) -> Option<Tensor<B, 4>> {
    let [batch, heads, q_len, dim] = q.dims();
    let [_, kv_heads, len, _] = k.dims();
    let v_dim = v.dims()[3];
    let group = heads / kv_heads;
    if group * q_len > MAX_ROWS || len == 0 {
        return None;
    }
    let device = q.device();
    let (q, k, v) = (flex(q)?, flex(k)?, flex(v)?);
    // Keys and values are read row by row: unit stride along a row, rows forward.
    let rows_forward =
        |t: &FlexTensor| t.layout().strides()[3] == 1 && t.layout().strides()[2] >= 0;
    if [&q, &k, &v].iter().any(|t| t.dtype() != DType::F32)
        || !rows_forward(&k)
        || !rows_forward(&v)
    {
        return None;
    }
    let mask = match mask {
        Some(m) => {
            let [mb, _, mq, ml] = m.dims();
            if !(mb == batch || mb == 1) || !(mq == q_len || mq == 1) || ml != len {
                return None;
            }
            Some(flex_bool(m)?)
        }
        None => None,
    };
    let (qs, ks, vs) = (
        Strided::new(&q, q.storage::<f32>()),
        Strided::new(&k, k.storage::<f32>()),
        Strided::new(&v, v.storage::<f32>()),
    );
    let masks = mask.as_ref().map(|m| Strided::new(m, m.storage::<u8>()));

    let rows = group * q_len;
    let heads_kv = batch * kv_heads;
    let chunks = (4 * threads())
        .div_ceil(heads_kv)
        .clamp(1, len.div_ceil(MIN_CHUNK));
    let chunk = len.div_ceil(chunks);
    let chunks = len.div_ceil(chunk);
    // Per task and row: running max, sum of exponentials, unnormalised output.
    let stride = 2 + v_dim;
    let mut partial = vec![0f32; heads_kv * chunks * rows * stride];
    let ctx = Ctx {
        qs,
        ks,
        vs,
        masks,
        kv_heads,
        group,
        q_len,
        dim,
        v_dim,
        len,
        chunk,
        chunks,
        scale: scale as f32,
        out: SendPtr(partial.as_mut_ptr()),
    };
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // Safety: the features were just detected.
        parallel_for(heads_kv * chunks, &|task| unsafe { task_avx2(&ctx, task) });
    } else {
        parallel_for(heads_kv * chunks, &|task| run_task::<false>(&ctx, task));
    }
    #[cfg(not(target_arch = "x86_64"))]
    parallel_for(heads_kv * chunks, &|task| run_task::<false>(&ctx, task));

    // Merge the chunks of each row: weights exp(max_c − max) (a chunk whose keys were all
    // hidden has max −inf and weight 0; every query sees at least one key).
    let mut y = vec![0f32; batch * heads * q_len * v_dim];
    for bh in 0..heads_kv {
        let (b, h) = (bh / kv_heads, bh % kv_heads);
        for r in 0..rows {
            let (g, i) = (r / q_len, r % q_len);
            let part = |c: usize| {
                let at = ((bh * chunks + c) * rows + r) * stride;
                &partial[at..at + stride]
            };
            let max = (0..chunks)
                .map(|c| part(c)[0])
                .fold(f32::NEG_INFINITY, f32::max);
            let at = ((b * heads + h * group + g) * q_len + i) * v_dim;
            let dst = &mut y[at..at + v_dim];
            let mut sum = 0.0;
            for c in 0..chunks {
                let p = part(c);
                if p[0] == f32::NEG_INFINITY {
                    continue;
                }
                let w = (p[0] - max).exp();
                sum += w * p[1];
                axpy(w, &p[2..], dst);
            }
            dst.iter_mut().for_each(|x| *x /= sum);
        }
    }
    Some(Tensor::from_data(
        TensorData::new(y, [batch, heads, q_len, v_dim]),
        &device,
    ))
}

/// What every task of one call reads.
struct Ctx<'a> {
    qs: Strided<'a, f32>,
    ks: Strided<'a, f32>,
    vs: Strided<'a, f32>,
    masks: Option<Strided<'a, u8>>,
    kv_heads: usize,
    group: usize,
    q_len: usize,
    dim: usize,
    v_dim: usize,
    len: usize,
    chunk: usize,
    chunks: usize,
    scale: f32,
    /// `[batch · kv_heads, chunks, rows, 2 + v_dim]`: running max, sum, unnormalised output.
    out: SendPtr,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn task_avx2(ctx: &Ctx, task: usize) {
    run_task::<true>(ctx, task)
}

/// One key/value head's chunk of keys against all its query rows; `AVX`: the caller runs with
/// AVX2 and FMA.
#[inline(always)]
fn run_task<const AVX: bool>(ctx: &Ctx, task: usize) {
    let (qs, ks, vs) = (&ctx.qs, &ctx.ks, &ctx.vs);
    let (dim, v_dim, q_len, group, chunks) = (ctx.dim, ctx.v_dim, ctx.q_len, ctx.group, ctx.chunks);
    let (rows, stride) = (group * q_len, 2 + v_dim);
    let (bh, c) = (task / chunks, task % chunks);
    let (b, h) = (bh / ctx.kv_heads, bh % ctx.kv_heads);
    let keys = c * ctx.chunk..((c + 1) * ctx.chunk).min(ctx.len);
    let n_keys = keys.len();
    // Safety: each task writes its own `rows · stride` values.
    let mine = unsafe {
        std::slice::from_raw_parts_mut(ctx.out.ptr().add(task * rows * stride), rows * stride)
    };
    // As the explicit path: the query scaled first.
    let qrows: Vec<f32> = (0..rows)
        .flat_map(|r| {
            let (g, i) = (r / q_len, r % q_len);
            (0..dim).map(move |e| qs.at([b, h * group + g, i, e]) * ctx.scale)
        })
        .collect();
    let keys_at = ks.row([b, h, keys.start], dim).as_ptr();
    let key_step = ks.strides[2] as usize;
    let _ = ks.row([b, h, keys.end - 1], dim); // bounds of the last key
    let mut scores = vec![0f32; rows * n_keys];
    for (r, q) in qrows.chunks_exact(dim).enumerate() {
        let s = &mut scores[r * n_keys..(r + 1) * n_keys];
        for (n, s8) in s.chunks_mut(8).enumerate() {
            let first = n * 8;
            // Safety: keys `first .. first + s8.len()` lie inside the checked range.
            unsafe { dot8::<AVX>(q, keys_at.add(first * key_step), key_step, s8) };
        }
        if let Some(m) = &ctx.masks {
            for (n, x) in s.iter_mut().enumerate() {
                if m.at([b, 0, r % q_len, keys.start + n]) != 0 {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
    }
    let values_at = vs.row([b, h, keys.start], v_dim).as_ptr();
    let value_step = vs.strides[2] as usize;
    let _ = vs.row([b, h, keys.end - 1], v_dim);
    for (r, s) in scores.chunks_exact_mut(n_keys).enumerate() {
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let out = &mut mine[r * stride..(r + 1) * stride];
        out[0] = max;
        // A chunk whose keys are all hidden leaves max −∞; the merge skips it.
        if max > f32::NEG_INFINITY {
            out[1] = exp_shifted::<AVX>(s, max);
            // Safety: as for the keys.
            unsafe { weighted_sum::<AVX>(s, values_at, value_step, &mut out[2..]) };
        }
    }
}

/// `out[t] = q · key t` for the `out.len() ≤ 8` keys at `k + t·step`, each `q.len()` long.
///
/// # Safety
/// Those keys are readable; `AVX` only where the CPU has AVX2 and FMA.
#[inline(always)]
unsafe fn dot8<const AVX: bool>(q: &[f32], k: *const f32, step: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if AVX {
        return unsafe { avx::dot8(q, k, step, out) };
    }
    for (t, o) in out.iter_mut().enumerate() {
        let key = unsafe { std::slice::from_raw_parts(k.add(t * step), q.len()) };
        *o = q.iter().zip(key).map(|(a, b)| a * b).sum();
    }
}

/// `s[j] = exp(s[j] − max)`, returning their sum (`max` finite).
#[inline(always)]
fn exp_shifted<const AVX: bool>(s: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if AVX {
        // Safety: the caller runs with AVX2 and FMA.
        return unsafe { super::vector_math::exp_shifted(s, max) };
    }
    let mut sum = 0.0;
    for x in s.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    sum
}

/// `out = Σ_j p[j] · value j` for the values at `v + j·step`, each `out.len()` long.
///
/// # Safety
/// As [`dot8`].
#[inline(always)]
unsafe fn weighted_sum<const AVX: bool>(p: &[f32], v: *const f32, step: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if AVX {
        return unsafe { avx::weighted_sum(p, v, step, out) };
    }
    out.fill(0.0);
    for (j, &w) in p.iter().enumerate() {
        if w != 0.0 {
            let value = unsafe { std::slice::from_raw_parts(v.add(j * step), out.len()) };
            axpy(w, value, out);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    /// [`super::dot8`]: eight keys' sums in eight registers (eight independent chains; one
    /// dot product alone is a chain of dependent multiply-adds), reduced by one `vhaddps` tree.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot8(q: &[f32], k: *const f32, step: usize, out: &mut [f32]) {
        let (dim, count) = (q.len(), out.len());
        let whole = dim / 8 * 8;
        let key = |t: usize| unsafe { k.add(t.min(count - 1) * step) };
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut e = 0;
        while e < whole {
            let qv = unsafe { _mm256_loadu_ps(q.as_ptr().add(e)) };
            for (t, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(qv, unsafe { _mm256_loadu_ps(key(t).add(e)) }, *a);
            }
            e += 8;
        }
        let h0 = _mm256_hadd_ps(acc[0], acc[1]);
        let h1 = _mm256_hadd_ps(acc[2], acc[3]);
        let h2 = _mm256_hadd_ps(acc[4], acc[5]);
        let h3 = _mm256_hadd_ps(acc[6], acc[7]);
        let g0 = _mm256_hadd_ps(h0, h1);
        let g1 = _mm256_hadd_ps(h2, h3);
        let sums = _mm256_add_ps(
            _mm256_permute2f128_ps(g0, g1, 0x20),
            _mm256_permute2f128_ps(g0, g1, 0x31),
        );
        let mut lanes = [0f32; 8];
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sums) };
        for (t, o) in out.iter_mut().enumerate() {
            let tail: f32 = (whole..dim).map(|e| q[e] * unsafe { *key(t).add(e) }).sum();
            *o = lanes[t] + tail;
        }
    }

    /// [`super::weighted_sum`]: 64 outputs at a time in eight registers, the keys inner.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_sum(p: &[f32], v: *const f32, step: usize, out: &mut [f32]) {
        let dim = out.len();
        let mut e = 0;
        while e + 64 <= dim {
            unsafe { block::<8>(p, v.add(e), step, out.as_mut_ptr().add(e)) };
            e += 64;
        }
        while e + 8 <= dim {
            unsafe { block::<1>(p, v.add(e), step, out.as_mut_ptr().add(e)) };
            e += 8;
        }
        for (e, o) in out.iter_mut().enumerate().skip(e) {
            *o = p
                .iter()
                .enumerate()
                .map(|(j, w)| w * unsafe { *v.add(j * step + e) })
                .sum();
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block<const W: usize>(p: &[f32], v: *const f32, step: usize, out: *mut f32) {
        let mut acc = [_mm256_setzero_ps(); W];
        for (j, &w) in p.iter().enumerate() {
            let w = _mm256_set1_ps(w);
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(w, unsafe { _mm256_loadu_ps(v.add(j * step + 8 * i)) }, *a);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            unsafe { _mm256_storeu_ps(out.add(8 * i), *a) };
        }
    }
}

/// A rank-4 view into a flex buffer.
struct Strided<'a, E> {
    data: &'a [E],
    offset: usize,
    strides: [isize; 4],
}

impl<'a, E: Copy> Strided<'a, E> {
    /// A size-1 axis gets stride 0, so it broadcasts (a mask shared by the batch).
    fn new(t: &FlexTensor, data: &'a [E]) -> Self {
        let layout = t.layout();
        Self {
            data,
            offset: layout.start_offset(),
            strides: std::array::from_fn(|i| {
                if layout.shape()[i] == 1 {
                    0
                } else {
                    layout.strides()[i]
                }
            }),
        }
    }

    fn index(&self, at: [usize; 4]) -> usize {
        let off = (0..4)
            .map(|i| at[i] as isize * self.strides[i])
            .sum::<isize>();
        (self.offset as isize + off) as usize
    }

    fn at(&self, at: [usize; 4]) -> E {
        self.data[self.index(at)]
    }

    /// The `n` values from `[a, b, c, 0]` on (unit stride along the last axis).
    fn row(&self, [a, b, c]: [usize; 3], n: usize) -> &[E] {
        let start = self.index([a, b, c, 0]);
        &self.data[start..start + n]
    }
}

fn flex<B: Backend>(t: &Tensor<B, 4>) -> Option<FlexTensor> {
    match t.clone().into_primitive() {
        TensorPrimitive::Float(p) => (Box::new(p) as Box<dyn Any>)
            .downcast::<FlexTensor>()
            .ok()
            .map(|t| *t),
        TensorPrimitive::QFloat(_) => None,
    }
}

fn flex_bool<B: Backend>(t: &Tensor<B, 4, Bool>) -> Option<FlexTensor> {
    let t = (Box::new(t.clone().into_primitive()) as Box<dyn Any>)
        .downcast::<FlexTensor>()
        .ok()?;
    // flex keeps booleans as one byte each.
    (t.dtype().size() == 1).then_some(*t)
}

/// `y += a·x`.
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * *x;
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::prelude::*;
    use burn::tensor::TensorData;

    type B = Flex;

    /// Deterministic values of both signs, not normalised.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 3.0
            })
            .collect()
    }

    /// The attention in f64, written out: `q [b, h, n, d]`, `k`/`v [b, kvh, len, d]`
    /// contiguous, `hidden[b][i][j]`.
    #[allow(clippy::too_many_arguments)]
    fn oracle(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        hidden: &dyn Fn(usize, usize, usize) -> bool,
        [b_n, h_n, q_len, d]: [usize; 4],
        kvh: usize,
        len: usize,
        scale: f64,
    ) -> Vec<f32> {
        let group = h_n / kvh;
        let mut out = vec![0f32; b_n * h_n * q_len * d];
        for b in 0..b_n {
            for h in 0..h_n {
                let kh = h / group;
                for i in 0..q_len {
                    let qr = &q[((b * h_n + h) * q_len + i) * d..][..d];
                    let s: Vec<f64> = (0..len)
                        .map(|j| {
                            if hidden(b, i, j) {
                                return f64::NEG_INFINITY;
                            }
                            let kr = &k[((b * kvh + kh) * len + j) * d..][..d];
                            scale
                                * qr.iter()
                                    .zip(kr)
                                    .map(|(x, y)| *x as f64 * *y as f64)
                                    .sum::<f64>()
                        })
                        .collect();
                    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = p.iter().sum();
                    for e in 0..d {
                        let y: f64 = (0..len)
                            .map(|j| p[j] * v[((b * kvh + kh) * len + j) * d + e] as f64)
                            .sum();
                        out[((b * h_n + h) * q_len + i) * d + e] = (y / z) as f32;
                    }
                }
            }
        }
        out
    }

    /// Grouped heads (6 query heads on 2 key/value heads), one and two query rows, keys read
    /// through a narrowed view of a larger buffer (as the KV cache hands them out), a mask that
    /// hides all but the last 40 of 700 keys of one row (whole chunks: 350 keys each on two
    /// threads) or all but one of fewer, or is shared by the batch,
    /// scale ≠ 1/√d: the kernel runs (not Burn's path) and matches the f64 attention.
    #[test]
    fn decode_attention_matches_the_f64_attention() {
        let device = Default::default();
        let (b_n, h_n, kvh, d) = (2, 6, 2, 40);
        for (q_len, len) in [(1, 5), (1, 700), (2, 37), (2, 700)] {
            let cap = len + 9;
            let q = values(b_n * h_n * q_len * d, 1);
            let kb = values(b_n * kvh * cap * d, 2);
            let vb = values(b_n * kvh * cap * d, 3);
            // Slots 4..4 + len of the buffers are the keys.
            let live = |buf: &[f32]| -> Vec<f32> {
                (0..b_n * kvh)
                    .flat_map(|bh| buf[(bh * cap + 4) * d..(bh * cap + 4 + len) * d].to_vec())
                    .collect()
            };
            let tensor = |x: Vec<f32>, shape: [usize; 4]| {
                Tensor::<B, 4>::from_data(TensorData::new(x, shape), &device)
            };
            let kt = tensor(kb.clone(), [b_n, kvh, cap, d]).narrow(2, 4, len);
            let vt = tensor(vb.clone(), [b_n, kvh, cap, d]).narrow(2, 4, len);
            let qt = tensor(q.clone(), [b_n, h_n, q_len, d]);
            // At 37 keys one mask row serves the whole batch (broadcast).
            let shared = len == 37;
            let hide = if len > 100 { len - 40 } else { len - 1 };
            let hidden = |b: usize, i: usize, j: usize| {
                (!shared && b == 1 && j < hide) || j > len - q_len + i
            };
            let mask_rows = if shared { 1 } else { b_n };
            let mask: Vec<bool> = (0..mask_rows)
                .flat_map(|b| (0..q_len).flat_map(move |i| (0..len).map(move |j| hidden(b, i, j))))
                .collect();
            let mask = Tensor::<B, 4, Bool>::from_data(
                TensorData::new(mask, [mask_rows, 1, q_len, len]),
                &device,
            );
            let scale = 0.37;
            let direct = super::attention(&qt, &kt, &vt, Some(&mask), scale);
            assert!(
                direct.is_some(),
                "the kernel takes q_len {q_len}, {len} keys"
            );
            let got = crate::nn::scaled_dot_product_attention(qt, kt, vt, Some(&mask), None, scale)
                .into_data()
                .into_vec::<f32>()
                .unwrap();
            let want = oracle(
                &q,
                &live(&kb),
                &live(&vb),
                &hidden,
                [b_n, h_n, q_len, d],
                kvh,
                len,
                scale,
            );
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "q_len {q_len}, {len} keys: max |Δ| {worst}");
        }
    }
}
