//! Quantisation of `f32` rows to ggml blocks: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants
//! Q2_K, Q3_K, Q4_K, Q5_K and Q6_K, and IQ4_NL and IQ4_XS, as
//! ggml's reference quantisers (`quantize_row_*_ref` in `ggml-quants.c`, without an importance
//! matrix) compute them, operation for operation in `f32`, so that kiln can write the files
//! llama.cpp's `llama-quantize` writes without `--imatrix`.
//!
//! Why here: the K-quant block layouts and their dequantisation already live in this crate
//! ([`crate::dequantize`]); the writer ([`crate::writer`]) and kiln's packed kernels (which
//! keep these blocks in memory) both need the inverse.

use half::f16;

use crate::error::{GgufError, Result};
use crate::types::GgmlType;

/// Values per K-quant super-block.
const QK_K: usize = 256;
/// Below this, a group counts as all zero (ggml's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// Whether [`quantize`] handles this type.
pub fn can_quantize(ggml_type: GgmlType) -> bool {
    matches!(
        ggml_type,
        GgmlType::Q8_0
            | GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q2_K
            | GgmlType::Q3_K
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
            | GgmlType::IQ4_NL
            | GgmlType::IQ4_XS
    )
}

/// Quantises `values` (whole blocks of `ggml_type`) to a new buffer of its blocks.
pub fn quantize(ggml_type: GgmlType, values: &[f32]) -> Result<Vec<u8>> {
    let bs = ggml_type.block_size();
    if !values.len().is_multiple_of(bs) {
        return Err(GgufError::Shape(format!(
            "{} values is not a whole number of {ggml_type} blocks of {bs}",
            values.len()
        )));
    }
    let mut out = vec![0u8; values.len() / bs * ggml_type.type_size()];
    quantize_into(ggml_type, values, &mut out)?;
    Ok(out)
}

/// Quantises `values` into `out`, which must hold exactly their blocks.
pub fn quantize_into(ggml_type: GgmlType, values: &[f32], out: &mut [u8]) -> Result<()> {
    let (bs, ts) = (ggml_type.block_size(), ggml_type.type_size());
    if !values.len().is_multiple_of(bs) || values.len() / bs * ts != out.len() {
        return Err(GgufError::Shape(format!(
            "{} values do not make {} bytes of {ggml_type} ({ts} bytes per {bs} values)",
            values.len(),
            out.len()
        )));
    }
    let block: fn(&[f32], &mut [u8]) = match ggml_type {
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q2_K => q2_k,
        GgmlType::Q3_K => q3_k,
        GgmlType::Q4_K => q4_k,
        GgmlType::Q5_K => q5_k,
        GgmlType::Q6_K => q6_k,
        GgmlType::IQ4_NL => iq4_nl,
        GgmlType::IQ4_XS => iq4_xs,
        other => return Err(GgufError::CannotQuantize(other)),
    };
    for (x, y) in values.chunks_exact(bs).zip(out.chunks_exact_mut(ts)) {
        block(x, y);
    }
    Ok(())
}

fn put_f16(dst: &mut [u8], v: f32) {
    dst.copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

fn get_f16(src: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([src[0], src[1]])).to_f32()
}

/// ggml's `nearest_int`: round to nearest, ties to even, through the float's mantissa (exact
/// for |v| < 2²²; ggml asserts that range).
fn nearest_int(v: f32) -> i32 {
    let t = v + 12582912.0;
    (t.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// The value of largest magnitude, the first of equal magnitudes (ggml's `amax`/`max` loop, which
/// the signed-scale formats divide by so the extreme value gets the extreme quant).
fn signed_max(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// `block_q8_0`: `d = amax/127`, `q = round(x/d)` half away from zero.
fn q8_0(x: &[f32], y: &mut [u8]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(&mut y[..2], d);
    for (q, v) in y[2..34].iter_mut().zip(x) {
        *q = (v * id).round() as i8 as u8;
    }
}

/// `block_q4_0 { half d; u8 qs[16]; }`: `d = max/−8` (`max` the value of largest magnitude),
/// `q = min(15, trunc(x/d + 8.5))`; values `j` and `j + 16` share `qs[j]` (low, high nibble).
fn q4_0(x: &[f32], y: &mut [u8]) {
    let d = signed_max(x) / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(&mut y[..2], d);
    for j in 0..16 {
        let q0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let q1 = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        y[2 + j] = q0 | (q1 << 4);
    }
}

/// `block_q4_1 { half d; half m; u8 qs[16]; }`: `d = (max − min)/15`, `m = min`,
/// `q = min(15, trunc((x − min)/d + 0.5))`, nibbles as Q4_0.
fn q4_1(x: &[f32], y: &mut [u8]) {
    let min = x.iter().fold(f32::INFINITY, |a, &v| a.min(v));
    let max = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(&mut y[..2], d);
    put_f16(&mut y[2..4], min);
    for j in 0..16 {
        let q0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let q1 = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
        y[4 + j] = q0 | (q1 << 4);
    }
}

/// `block_q5_0 { half d; u8 qh[4]; u8 qs[16]; }`: `d = max/−16` (`max` the value of largest
/// magnitude), `q = min(31, trunc(x/d + 16.5))`; the low four bits of values `j` and `j + 16`
/// share `qs[j]`, their fifth bits are bits `j` and `j + 16` of `qh`.
fn q5_0(x: &[f32], y: &mut [u8]) {
    let d = signed_max(x) / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(&mut y[..2], d);
    let q = |v: f32| ((v * id + 16.5) as i8).min(31) as u8;
    put_q5(|j| q(x[j]), &mut y[2..22]);
}

/// `block_q5_1 { half d; half m; u8 qh[4]; u8 qs[16]; }`: `d = (max − min)/31`, `m = min`,
/// `q = trunc((x − min)/d + 0.5)`; bits laid out as in [`q5_0`].
fn q5_1(x: &[f32], y: &mut [u8]) {
    let min = x.iter().fold(f32::MAX, |a, &v| if v < a { v } else { a });
    let max = x.iter().fold(-f32::MAX, |a, &v| if v > a { v } else { a });
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(&mut y[..2], d);
    put_f16(&mut y[2..4], min);
    let q = |v: f32| ((v - min) * id + 0.5) as u8;
    put_q5(|j| q(x[j]), &mut y[4..24]);
}

/// The 32 five-bit quants `q(0..32)` as `qh[4]` then `qs[16]`.
fn put_q5(q: impl Fn(usize) -> u8, y: &mut [u8]) {
    let mut qh = 0u32;
    for j in 0..16 {
        let (a, b) = (q(j), q(j + 16));
        y[4 + j] = (a & 0x0F) | ((b & 0x0F) << 4);
        qh |= (((a & 0x10) >> 4) as u32) << j;
        qh |= (((b & 0x10) >> 4) as u32) << (j + 16);
    }
    y[..4].copy_from_slice(&qh.to_le_bytes());
}

/// ggml's `make_qkx2_quants`: the scale and (negated) min of `n` values on `0..=nmax` that
/// minimise the weighted error, searching `nstep + 1` scales around `nmax/(max − min)` and
/// solving least squares for each; `use_mad` weighs absolute errors instead of squared ones
/// (Q2_K). Returns `(scale, −min)` and fills `l`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        min = min.min(x[i]);
        max = max.max(x[i]);
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_error += weights[i] * err(diff);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let (w, q) = (weights[i], q as f32);
            sum_l += w * q;
            sum_l2 += w * q * q;
            sum_xl += w * q * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * err(diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qx_quants` with `rmse_type = 1` and no importance weights (weights `x²`): a
/// signed scale for `n` values on `−nmax..nmax`, trying 18 scales around `−nmax/max`. `l` gets
/// the quants offset by `nmax`.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [u8]) -> f32 {
    let n = x.len();
    let max = signed_max(x);
    if max.abs() < GROUP_MAX_EPS {
        l[..n].fill(0);
        return 0.0;
    }
    let nm = nmax as f32;
    let quant = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let mut iscale = -nm / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for i in 0..n {
        let q = quant(iscale, x[i]);
        l[i] = (q + nmax) as u8;
        let w = x[i] * x[i];
        sumlx += w * x[i] * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nm + 0.1 * is as f32) / max;
        let (mut slx, mut sl2) = (0f32, 0f32);
        for &v in x {
            let q = quant(iscale, v) as f32;
            let w = v * v;
            slx += w * v * q;
            sl2 += w * q * q;
        }
        if sl2 > 0.0 && slx * slx > best * sl2 {
            for i in 0..n {
                l[i] = (quant(iscale, x[i]) + nmax) as u8;
            }
            scale = slx / sl2;
            best = scale * slx;
        }
    }
    scale
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K / Q5_K block (`get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The shared part of Q4_K and Q5_K: per 32-value sub-block a scale and min (by
/// `make_qkx2_quants` with `nmax`, weights `√(Σx²/32) + |x|`), both rounded to 6 bits of the
/// block's largest, packed into `scales` (12 bytes) with `d`, `dmin` at `head[0..4]`; returns
/// the final quants, recomputed with the rounded scales.
fn k_scales(
    x: &[f32],
    head: &mut [u8],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> [u8; QK_K] {
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let sum_x2: f32 = xs.iter().map(|v| v * v).sum();
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut l[32 * j..32 * j + 32],
            &mut laux,
            rmin,
            rdelta,
            nstep,
            false,
        );
        scales[j] = s;
        mins[j] = m;
        max_scale = max_scale.max(s);
        max_min = max_min.max(m);
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut head[4..16];
    sc.fill(0);
    for j in 0..8 {
        // ggml stores nearest_int's result in a uint8_t before the MIN.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0x0F) | ((lm & 0x0F) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    put_f16(&mut head[0..2], max_scale / 63.0);
    put_f16(&mut head[2..4], max_min / 63.0);
    let (d_all, dmin_all) = (get_f16(&head[0..2]), get_f16(&head[2..4]));
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, &head[4..16]);
        let d = d_all * s as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * m as f32;
        for i in 32 * j..32 * j + 32 {
            l[i] = nearest_int((x[i] + dm) / d).clamp(0, nmax) as u8;
        }
    }
    l
}

/// `block_q4_K { half d; half dmin; u8 scales[12]; u8 qs[128]; }` (`quantize_row_q4_K_ref`).
fn q4_k(x: &[f32], y: &mut [u8]) {
    let l = k_scales(x, &mut y[..16], 15, -1.0, 0.1, 20);
    let qs = &mut y[16..144];
    for j in 0..4 {
        for i in 0..32 {
            qs[32 * j + i] = l[64 * j + i] | (l[64 * j + 32 + i] << 4);
        }
    }
}

/// `block_q5_K { half d; half dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; }`
/// (`quantize_row_q5_K_ref`): bit 4 of the quant of value `32·s + i` is bit `s` of `qh[i]`.
fn q5_k(x: &[f32], y: &mut [u8]) {
    let l = k_scales(x, &mut y[..16], 31, -0.5, 0.1, 15);
    let (qh, ql) = y[16..176].split_at_mut(32);
    qh.fill(0);
    for j in 0..4 {
        for i in 0..32 {
            let (l1, l2) = (l[64 * j + i], l[64 * j + 32 + i]);
            qh[i] |= ((l1 >> 4) << (2 * j)) | ((l2 >> 4) << (2 * j + 1));
            ql[32 * j + i] = (l1 & 0x0F) | ((l2 & 0x0F) << 4);
        }
    }
}

/// `block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; half d; }` (`quantize_row_q6_K_ref`):
/// per 16 values a signed scale by `make_qx_quants`, rounded to i8 of the block's largest.
fn q6_k(x: &[f32], y: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; 16];
    for ib in 0..16 {
        scales[ib] = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
    }
    let max_scale = signed_max(&scales);
    if max_scale.abs() < GROUP_MAX_EPS {
        y.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    put_f16(&mut y[208..210], 1.0 / iscale);
    let d_all = get_f16(&y[208..210]);
    for ib in 0..16 {
        y[192 + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }
    for j in 0..16 {
        let d = d_all * (y[192 + j] as i8) as f32;
        if d == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            l[i] = (nearest_int(x[i] / d).clamp(-32, 31) + 32) as u8;
        }
    }
    pack_q6_k(&l, y);
}

/// `block_q2_K { u8 scales[16]; u8 qs[64]; half d; half dmin; }` (`quantize_row_q2_K_ref`):
/// per 16 values a scale and min by [`make_qkx2_quants`] on 0..=3 (absolute errors weighted by
/// |x|), each rounded to 4 bits of the block's largest (`scales[j]`: scale low, min high);
/// quants as Q3_K's two low bits.
fn q2_k(x: &[f32], y: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 16];
    let (mut scales, mut mins) = ([0f32; 16], [0f32; 16]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        let weights: [f32; 16] = std::array::from_fn(|i| xs[i].abs());
        let (s, m) = make_qkx2_quants(
            3,
            xs,
            &weights,
            &mut l[16 * j..16 * j + 16],
            &mut laux,
            -0.5,
            0.1,
            15,
            true,
        );
        (scales[j], mins[j]) = (s, m);
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    y.fill(0);
    if max_scale > 0.0 {
        let iscale = 15.0 / max_scale;
        for j in 0..16 {
            y[j] = nearest_int(iscale * scales[j]) as u8;
        }
        put_f16(&mut y[80..82], max_scale / 15.0);
    }
    if max_min > 0.0 {
        let iscale = 15.0 / max_min;
        for j in 0..16 {
            y[j] |= (nearest_int(iscale * mins[j]) as u8) << 4;
        }
        put_f16(&mut y[82..84], max_min / 15.0);
    }
    let (d_all, dmin_all) = (get_f16(&y[80..82]), get_f16(&y[82..84]));
    for (j, &sm) in y[..16].iter().enumerate() {
        let d = d_all * (sm & 0x0F) as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * (sm >> 4) as f32;
        for i in 16 * j..16 * j + 16 {
            l[i] = nearest_int((x[i] + dm) / d).clamp(0, 3) as u8;
        }
    }
    // Value v's two bits at bit 2·(v % 128 / 32) of qs[32·(v / 128) + v % 32].
    for (v, &q) in l.iter().enumerate() {
        y[16 + 32 * (v / 128) + v % 32] |= q << (2 * (v % 128 / 32));
    }
}

/// ggml's `make_q3_quants(n, nmax, x, L, true)`: signed quants −nmax..nmax−1 of `x` from
/// `−nmax / max`, refined by five passes that move single quants where that raises the
/// x²-weighted fit `(Σwxl)² / Σwl²`; `l` gets them plus `nmax`, the result is the scale.
fn make_q3_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let max = signed_max(x);
    if max.abs() < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (li, &xi) in l.iter_mut().zip(x) {
        let q = nearest_int(iscale * xi).clamp(-nmax, nmax - 1);
        *li = q as i8;
        let w = xi * xi;
        sumlx += w * xi * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (li, &xi) in l.iter_mut().zip(x) {
            let w = xi * xi;
            let q = *li as i32;
            let mut slx = sumlx - w * xi * q as f32;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * q as f32 * q as f32;
                let new = nearest_int(xi * sl2 / slx).clamp(-nmax, nmax - 1);
                if new != q {
                    slx += w * xi * new as f32;
                    sl2 += w * new as f32 * new as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        (*li, sumlx, suml2) = (new as i8, slx, sl2);
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    for li in l.iter_mut() {
        *li += nmax as i8;
    }
    if suml2 > 0.0 { sumlx / suml2 } else { 0.0 }
}

/// `block_q3_K { u8 hmask[32]; u8 qs[64]; u8 scales[12]; half d; }` (`quantize_row_q3_K_ref`):
/// per 16 values a signed scale by [`make_q3_quants`], rounded to 6 bits (`sc + 32`) of the
/// block's largest; quants −4..3 as two low bits in `qs` and a high bit in `hmask`.
fn q3_k(x: &[f32], y: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    for j in 0..16 {
        scales[j] = make_q3_quants(4, &x[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
    }
    let max_scale = signed_max(&scales);
    y.fill(0);
    let sb = 96;
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for (j, &s) in scales.iter().enumerate() {
            let q = (nearest_int(iscale * s).clamp(-32, 31) + 32) as u8;
            y[sb + j % 8] |= (q & 0x0F) << (4 * (j / 8));
            y[sb + 8 + j % 4] |= (q >> 4) << (2 * (j / 4));
        }
        put_f16(&mut y[108..110], 1.0 / iscale);
    }
    let d_all = get_f16(&y[108..110]);
    for j in 0..16 {
        let lo = (y[sb + j % 8] >> (4 * (j / 8))) & 0x0F;
        let hi = (y[sb + 8 + j % 4] >> (2 * (j / 4))) & 0x03;
        let d = d_all * ((lo | (hi << 4)) as i32 - 32) as f32;
        if d == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            l[i] = (nearest_int(x[i] / d).clamp(-4, 3) + 4) as i8;
        }
    }
    // Value v: its high bit at bit v / 32 of hmask[v % 32], its low two bits at bit
    // 2·(v % 128 / 32) of qs[32·(v / 128) + v % 32].
    for (v, &q) in l.iter().enumerate() {
        let q = q as u8;
        if q > 3 {
            y[v % 32] |= 1 << (v / 32);
        }
        y[32 + 32 * (v / 128) + v % 32] |= (q & 3) << (2 * (v % 128 / 32));
    }
}

/// ggml's `best_index_int8`: the index of the IQ4 level nearest to `x`,
/// the upper one where ggml's `x − lower < upper − x` says no. ggml finds the pair around `x`
/// by binary search; here the upper index is the count of levels ≤ `x` (the same pair, since
/// the search keeps `levels[ml] ≤ x < levels[mu]`), sixteen compares without branches
/// (`--quant iq4_nl` of SmolLM2-135M, 512 calls per 32-value block: 23.3 → 18.1 s on 2 cores;
/// the scale search's arithmetic is the rest).
fn best_index_int8(x: f32) -> u8 {
    let levels = &IQ4_LEVELS_F32;
    if x <= levels[0] {
        return 0;
    }
    // (NaN too: every compare fails and ggml's search ends on the top level.)
    if x >= levels[15] || x.is_nan() {
        return 15;
    }
    let mu = levels.iter().map(|&l| usize::from(l <= x)).sum::<usize>();
    if x - levels[mu - 1] < levels[mu] - x {
        (mu - 1) as u8
    } else {
        mu as u8
    }
}

/// [`crate::quant::IQ4_LEVELS`] as f32 (exact), what ggml's `best_index_int8` compares with.
const IQ4_LEVELS_F32: [f32; 16] = {
    let mut f = [0f32; 16];
    let mut i = 0;
    while i < 16 {
        f[i] = crate::quant::IQ4_LEVELS[i] as f32;
        i += 1;
    }
    f
};

/// The scale of 32 values under the non-uniform IQ4 levels, as ggml's
/// `quantize_row_iq4_nl_impl` finds it with `ntry = 7` and no importance matrix: the least
/// squares scale, x²-weighted, for the levels nearest to `x / d` over fifteen trial `d`
/// around `−max / levels[0]`, the best kept. 0 for an all-zero group.
fn iq4_scale(xb: &[f32]) -> f32 {
    let levels = &IQ4_LEVELS_F32;
    let max = signed_max(xb);
    if max.abs() < GROUP_MAX_EPS {
        return 0.0;
    }
    // The weighted fit of `x` to the levels nearest to `id·x`: (Σ w·q·x, Σ w·q²).
    let fit = |id: f32| {
        let (mut sumqx, mut sumq2) = (0f32, 0f32);
        for &xj in xb {
            let q = levels[best_index_int8(id * xj) as usize];
            let w = xj * xj;
            sumqx += w * q * xj;
            sumq2 += w * q * q;
        }
        (sumqx, sumq2)
    };
    let (sumqx, sumq2) = fit(1.0 / (-max / levels[0]));
    let mut d = if sumq2 > 0.0 { sumqx / sumq2 } else { 0.0 };
    let mut best = d * sumqx;
    for itry in -7..=7 {
        let (sumqx, sumq2) = fit((itry as f32 + levels[0]) / max);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    d
}

/// Packs 32 level indices: value `j < 16` in the low nibble of byte `j`, `j + 16` in its
/// high one.
fn pack_iq4(l: &[u8], y: &mut [u8]) {
    for j in 0..16 {
        y[j] = l[j] | (l[16 + j] << 4);
    }
}

/// `block_iq4_nl { half d; u8 qs[16]; }` (`quantize_row_iq4_nl_ref`, i.e. ggml's
/// `quantize_row_iq4_nl_impl(32, 32, …, ntry = 7)`): [`iq4_scale`] as the f16 `d`, and each
/// value's nearest level under the unrounded scale.
fn iq4_nl(x: &[f32], y: &mut [u8]) {
    let d = iq4_scale(x);
    put_f16(&mut y[0..2], d);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let l: [u8; 32] = std::array::from_fn(|j| best_index_int8(id * x[j]));
    pack_iq4(&l, &mut y[2..18]);
}

/// `block_iq4_xs { half d; u16 scales_h; u8 scales_l[4]; u8 qs[128]; }`
/// (`quantize_row_iq4_xs_ref`, i.e. ggml's `quantize_row_iq4_nl_impl(256, 32, …, ntry = 7)`
/// without an importance matrix): [`iq4_scale`] per 32 values, then a 6-bit `ls − 32` of
/// `d = −max_scale / 32`, and each value's nearest level under `d·(ls − 32)`.
fn iq4_xs(x: &[f32], y: &mut [u8]) {
    let scales: [f32; 8] = std::array::from_fn(|ib| iq4_scale(&x[32 * ib..32 * ib + 32]));
    let (mut max_scale, mut amax_scale) = (0f32, 0f32);
    for &d in &scales {
        if d.abs() > amax_scale {
            amax_scale = d.abs();
            max_scale = d;
        }
    }
    y.fill(0);
    let d = -max_scale / 32.0;
    put_f16(&mut y[0..2], d);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut scales_h = 0u16;
    for ib in 0..8 {
        let ls = nearest_int(id * scales[ib]).clamp(-32, 31);
        let dl = d * ls as f32;
        let idl = if dl != 0.0 { 1.0 / dl } else { 0.0 };
        let l: [u8; 32] = std::array::from_fn(|j| best_index_int8(idl * x[32 * ib + j]));
        pack_iq4(&l, &mut y[8 + 16 * ib..24 + 16 * ib]);
        let ls = (ls + 32) as u8;
        y[4 + ib / 2] |= (ls & 0x0F) << (4 * (ib % 2));
        scales_h |= u16::from(ls >> 4) << (2 * ib);
    }
    y[2..4].copy_from_slice(&scales_h.to_le_bytes());
}

/// Q6_K's quants (0..63, `q + 32`) into its `ql` and `qh` bytes.
fn pack_q6_k(l: &[u8; QK_K], y: &mut [u8]) {
    let (ql, rest) = y.split_at_mut(128);
    let qh = &mut rest[..64];
    for n in 0..2 {
        let (l, ql, qh) = (&l[128 * n..], &mut ql[64 * n..], &mut qh[32 * n..]);
        for i in 0..32 {
            let (q1, q2, q3, q4) = (l[i], l[i + 32], l[i + 64], l[i + 96]);
            ql[i] = (q1 & 0x0F) | ((q3 & 0x0F) << 4);
            ql[i + 32] = (q2 & 0x0F) | ((q4 & 0x0F) << 4);
            qh[i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dequantize;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                // Mostly small, some outliers, as trained weights are.
                let v = u * 2.0 - 1.0;
                if s.is_multiple_of(97) {
                    v * 8.0
                } else {
                    v * 0.05
                }
            })
            .collect()
    }

    /// On normally distributed values (trained weights are roughly so) IQ4_NL's levels round
    /// closer than Q4_0's evenly spaced ones at the same 4.5 bits: what makes it the better
    /// 4-bit `--quant`. RMS errors relative to the data's, for the README.
    #[test]
    fn iq4_nl_rounds_gaussian_values_closer_than_q4_0() {
        let mut s = 11u64;
        let mut uniform = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 + 0.5) / (1u64 << 24) as f32
        };
        // Box–Muller.
        let x: Vec<f32> = (0..32 * 1024)
            .map(|_| {
                let (u, v) = (uniform(), uniform());
                (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect();
        let rel = |t: GgmlType| {
            let y = dequantize(t, &quantize(t, &x).unwrap()).unwrap();
            let e: f32 = x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum();
            (e / x.iter().map(|a| a * a).sum::<f32>()).sqrt()
        };
        let (nl, q4_0, q4_1) = (
            rel(GgmlType::IQ4_NL),
            rel(GgmlType::Q4_0),
            rel(GgmlType::Q4_1),
        );
        eprintln!("relative RMS error: IQ4_NL {nl:.4}, Q4_0 {q4_0:.4}, Q4_1 {q4_1:.4}");
        // Measured: 0.0760, 0.0856, 0.0779 (IQ4_NL is even closer than 5-bit Q4_1).
        assert!(
            nl < 0.95 * q4_0 && nl < q4_1,
            "IQ4_NL {nl}, Q4_0 {q4_0}, Q4_1 {q4_1}"
        );
    }

    /// Round trip error per type, relative to the data's RMS: each type within its bits.
    #[test]
    fn round_trips_within_the_step() {
        let x = values(4096, 7);
        let rms = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt();
        for (t, bound) in [
            (GgmlType::Q8_0, 0.02),
            (GgmlType::Q6_K, 0.05),
            (GgmlType::Q5_0, 0.1),
            (GgmlType::Q5_1, 0.1),
            (GgmlType::Q5_K, 0.1),
            (GgmlType::Q4_K, 0.2),
            (GgmlType::Q3_K, 0.35),
            (GgmlType::IQ4_XS, 0.2),
            (GgmlType::IQ4_NL, 0.2),
            (GgmlType::Q2_K, 0.6),
        ] {
            let y = dequantize(t, &quantize(t, &x).unwrap()).unwrap();
            let err = (x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum::<f32>()
                / x.len() as f32)
                .sqrt();
            assert!(err / rms < bound, "{t}: rms error {} of {rms}", err);
        }
    }

    /// Values already on a Q4_K / Q6_K grid come back exactly (the search finds the grid).
    #[test]
    fn zeros_and_exact_grids() {
        for t in [
            GgmlType::Q2_K,
            GgmlType::IQ4_XS,
            GgmlType::IQ4_NL,
            GgmlType::Q3_K,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::Q8_0,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
        ] {
            let z = vec![0f32; 256];
            assert_eq!(dequantize(t, &quantize(t, &z).unwrap()).unwrap(), z);
        }
        let grid: Vec<f32> = (0..256).map(|i| ((i * 7) % 16) as f32 - 8.0).collect();
        let y = dequantize(GgmlType::Q6_K, &quantize(GgmlType::Q6_K, &grid).unwrap()).unwrap();
        assert_eq!(y, grid);
    }

    #[test]
    fn rejects_partial_blocks_and_other_types() {
        assert!(quantize(GgmlType::Q4_K, &[0.0; 255]).is_err());
        assert!(quantize(GgmlType::IQ2_XS, &[0.0; 256]).is_err());
        assert!(quantize_into(GgmlType::Q6_K, &[0.0; 256], &mut [0u8; 209]).is_err());
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(
            [0.5, 1.5, 2.5, -0.5, -1.5, 3.4, -3.6].map(nearest_int),
            [0, 2, 2, 0, -2, 3, -4]
        );
    }
}
