//! Dequantisation of ggml blocks to `f32`.
//!
//! Block layouts and arithmetic follow `dequantize_row_*` in ggml's `ggml-quants.c`, operation
//! for operation (the same products and differences, in the same order, all in `f32`), so the
//! results are bit-identical to ggml's reference code and to the `gguf` Python package's
//! `gguf.quants.dequantize` (checked by the fixture tests).

use half::f16;

use crate::error::{GgufError, Result};
use crate::types::GgmlType;

/// Below this many elements a tensor is dequantised on the calling thread.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 18;

/// Dequantises `data` (whole blocks of `ggml_type`) to a new `Vec<f32>`.
///
/// `data.len()` must be a multiple of the type's block size in bytes; the result has
/// `data.len() / type_size * block_size` elements.
pub fn dequantize(ggml_type: GgmlType, data: &[u8]) -> Result<Vec<f32>> {
    let ts = ggml_type.type_size();
    if !data.len().is_multiple_of(ts) {
        return Err(GgufError::Shape(format!(
            "{} bytes is not a whole number of {ggml_type} blocks ({ts} bytes each)",
            data.len()
        )));
    }
    let mut out = vec![0f32; data.len() / ts * ggml_type.block_size()];
    dequantize_into(ggml_type, data, &mut out)?;
    Ok(out)
}

/// Dequantises `data` into `out`, whose length must be exactly the number of elements the
/// blocks hold. Large inputs are split over threads (`std::thread::available_parallelism`).
pub fn dequantize_into(ggml_type: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    let (bs, ts) = (ggml_type.block_size(), ggml_type.type_size());
    let n_blocks = data.len() / ts;
    if !data.len().is_multiple_of(ts) || n_blocks.checked_mul(bs) != Some(out.len()) {
        return Err(GgufError::Shape(format!(
            "{} bytes of {ggml_type} ({ts} bytes per {bs} elements) do not make {} elements",
            data.len(),
            out.len()
        )));
    }
    let kernel = kernel(ggml_type).ok_or_else(|| GgufError::UnsupportedType {
        path: String::new(),
        tensor: String::new(),
        ggml_type,
    })?;

    if out.len() < PARALLEL_MIN_ELEMENTS {
        kernel(data, out);
        return Ok(());
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads <= 1 {
        kernel(data, out);
        return Ok(());
    }
    let blocks_per_chunk = n_blocks.div_ceil(threads * 4).max(1);
    std::thread::scope(|s| {
        let mut src = data.chunks(blocks_per_chunk * ts);
        let mut dst = out.chunks_mut(blocks_per_chunk * bs);
        let chunks: Vec<_> = src.by_ref().zip(dst.by_ref()).collect();
        // Hand the chunks out round-robin to `threads` workers.
        let mut per_thread: Vec<Vec<(&[u8], &mut [f32])>> =
            (0..threads).map(|_| Vec::new()).collect();
        for (i, c) in chunks.into_iter().enumerate() {
            per_thread[i % threads].push(c);
        }
        for work in per_thread {
            s.spawn(move || {
                for (src, dst) in work {
                    kernel(src, dst);
                }
            });
        }
    });
    Ok(())
}

pub(crate) type Kernel = fn(&[u8], &mut [f32]);

pub(crate) fn kernel(t: GgmlType) -> Option<Kernel> {
    use GgmlType::*;
    Some(match t {
        F32 => dq_f32,
        F16 => dq_f16,
        BF16 => dq_bf16,
        Q4_0 => dq_q4_0,
        Q4_1 => dq_q4_1,
        Q5_0 => dq_q5_0,
        Q5_1 => dq_q5_1,
        Q8_0 => dq_q8_0,
        Q2_K => dq_q2_k,
        Q3_K => dq_q3_k,
        Q4_K => dq_q4_k,
        Q5_K => dq_q5_k,
        Q6_K => dq_q6_k,
        IQ4_NL => dq_iq4_nl,
        IQ4_XS => dq_iq4_xs,
        _ => return None,
    })
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

fn dq_f32(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(4).zip(dst.iter_mut()) {
        *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

fn dq_f16(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *y = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    }
}

fn dq_bf16(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *y = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
    }
}

/// `block_q4_0 { half d; u8 qs[16]; }`: `y = (q - 8) * d`; low nibbles are elements 0..16,
/// high nibbles 16..32.
fn dq_q4_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let qs = &b[2..18];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            lo[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
            hi[j] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// `block_q4_1 { half d; half m; u8 qs[16]; }`: `y = q * d + m`.
fn dq_q4_1(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(20).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let qs = &b[4..20];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            lo[j] = (qs[j] & 0x0F) as f32 * d + m;
            hi[j] = (qs[j] >> 4) as f32 * d + m;
        }
    }
}

/// `block_q5_0 { half d; u8 qh[4]; u8 qs[16]; }`: the fifth bit of element `j` is bit `j` of
/// `qh`; `y = (q - 16) * d`.
fn dq_q5_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(22).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            let h0 = ((qh >> j) & 1) << 4;
            let h1 = ((qh >> (j + 16)) & 1) << 4;
            lo[j] = (((qs[j] & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
            hi[j] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
        }
    }
}

/// `block_q5_1 { half d; half m; u8 qh[4]; u8 qs[16]; }`: `y = q * d + m`.
fn dq_q5_1(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(24).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let qs = &b[8..24];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            let h0 = ((qh >> j) & 1) << 4;
            let h1 = ((qh >> (j + 16)) & 1) << 4;
            lo[j] = ((qs[j] & 0x0F) as u32 | h0) as f32 * d + m;
            hi[j] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
        }
    }
}

/// `block_q8_0 { half d; i8 qs[32]; }`: `y = q * d`.
fn dq_q8_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(34).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        for (y, &q) in y.iter_mut().zip(&b[2..34]) {
            *y = (q as i8) as f32 * d;
        }
    }
}

/// `block_q2_K { u8 scales[16]; u8 qs[64]; half d; half dmin; }`: sixteen groups of 16, each
/// with a 4-bit scale (low nibble) and 4-bit min (high nibble); 2-bit quants.
fn dq_q2_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(84).zip(dst.chunks_exact_mut(256)) {
        let scales = &b[0..16];
        let d = f16_at(b, 80);
        let dmin = f16_at(b, 82);
        let mut is = 0;
        for n in 0..2 {
            let q = &b[16 + 32 * n..16 + 32 * n + 32];
            let y = &mut y[128 * n..128 * n + 128];
            for j in 0..4 {
                let shift = 2 * j;
                for half in 0..2 {
                    let sc = scales[is];
                    is += 1;
                    let dl = d * (sc & 0x0F) as f32;
                    let ml = dmin * (sc >> 4) as f32;
                    for l in 16 * half..16 * half + 16 {
                        y[32 * j + l] = dl * ((q[l] >> shift) & 3) as f32 - ml;
                    }
                }
            }
        }
    }
}

/// `block_q3_K { u8 hmask[32]; u8 qs[64]; u8 scales[12]; half d; }`: sixteen groups of 16 with
/// 6-bit signed scales; 2 low bits in `qs`, the third (inverted: set means no `-4`) in `hmask`.
fn dq_q3_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(110).zip(dst.chunks_exact_mut(256)) {
        let hm = &b[0..32];
        let sb = &b[96..108];
        let d_all = f16_at(b, 108);
        let mut scales = [0i8; 16];
        for (k, s) in scales.iter_mut().enumerate() {
            let lo = (sb[k % 8] >> (4 * (k / 8))) & 0x0F;
            let hi = (sb[8 + k % 4] >> (2 * (k / 4))) & 0x03;
            *s = ((lo | (hi << 4)) as i8).wrapping_sub(32);
        }
        let mut is = 0;
        let mut m = 1u8;
        for n in 0..2 {
            let q = &b[32 + 32 * n..32 + 32 * n + 32];
            let y = &mut y[128 * n..128 * n + 128];
            for j in 0..4 {
                let shift = 2 * j;
                for half in 0..2 {
                    let dl = d_all * scales[is] as f32;
                    is += 1;
                    for l in 16 * half..16 * half + 16 {
                        let low = ((q[l] >> shift) & 3) as i8;
                        let sub = if hm[l] & m != 0 { 0 } else { 4 };
                        y[32 * j + l] = dl * (low - sub) as f32;
                    }
                }
                m <<= 1;
            }
        }
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K / Q5_K block
/// (`get_scale_min_k4`).
#[inline(always)]
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

/// `block_q4_K { half d; half dmin; u8 scales[12]; u8 qs[128]; }`: eight sub-blocks of 32
/// with 6-bit scales and mins; `y = d*sc * q - dmin*m`.
fn dq_q4_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(144).zip(dst.chunks_exact_mut(256)) {
        let d = f16_at(b, 0);
        let dmin = f16_at(b, 2);
        let scales = &b[4..16];
        for j in 0..4 {
            let q = &b[16 + 32 * j..16 + 32 * j + 32];
            let (sc1, m1) = scale_min_k4(2 * j, scales);
            let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
            let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
            let y = &mut y[64 * j..64 * j + 64];
            let (lo, hi) = y.split_at_mut(32);
            for l in 0..32 {
                lo[l] = d1 * (q[l] & 0x0F) as f32 - min1;
                hi[l] = d2 * (q[l] >> 4) as f32 - min2;
            }
        }
    }
}

/// `block_q5_K { half d; half dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; }`: as Q4_K with a
/// fifth bit per element in `qh`.
fn dq_q5_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(176).zip(dst.chunks_exact_mut(256)) {
        let d = f16_at(b, 0);
        let dmin = f16_at(b, 2);
        let scales = &b[4..16];
        let qh = &b[16..48];
        for j in 0..4 {
            let ql = &b[48 + 32 * j..48 + 32 * j + 32];
            let (sc1, m1) = scale_min_k4(2 * j, scales);
            let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
            let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
            let u1 = 1u8 << (2 * j);
            let u2 = 2u8 << (2 * j);
            let y = &mut y[64 * j..64 * j + 64];
            let (lo, hi) = y.split_at_mut(32);
            for l in 0..32 {
                let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                lo[l] = d1 * ((ql[l] & 0x0F) + h1) as f32 - min1;
                hi[l] = d2 * ((ql[l] >> 4) + h2) as f32 - min2;
            }
        }
    }
}

/// `block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; half d; }`: sixteen groups of 16 with
/// 8-bit signed scales; `y = d * sc * (q - 32)`.
/// The sixteen non-uniform levels of IQ4_NL and IQ4_XS (`kvalues_iq4nl`).
pub const IQ4_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// `block_iq4_nl { half d; u8 qs[16]; }`: 32 values, `y = d * IQ4_LEVELS[q]`, low nibbles the
/// first 16.
fn dq_iq4_nl(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        for (j, &q) in b[2..18].iter().enumerate() {
            y[j] = d * IQ4_LEVELS[(q & 0x0F) as usize] as f32;
            y[j + 16] = d * IQ4_LEVELS[(q >> 4) as usize] as f32;
        }
    }
}

/// `block_iq4_xs { half d; u16 scales_h; u8 scales_l[4]; u8 qs[128]; }`: eight sub-blocks of
/// 32, each an IQ4_NL block under the scale `d * (ls − 32)` with a 6-bit `ls` (low four bits in
/// `scales_l`, high two in `scales_h`).
fn dq_iq4_xs(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(136).zip(dst.chunks_exact_mut(256)) {
        let d = f16_at(b, 0);
        let scales_h = u16::from_le_bytes([b[2], b[3]]);
        for (ib, y) in y.chunks_exact_mut(32).enumerate() {
            let lo = (b[4 + ib / 2] >> (4 * (ib % 2))) & 0x0F;
            let hi = ((scales_h >> (2 * ib)) & 3) as u8;
            let dl = d * ((lo | (hi << 4)) as i32 - 32) as f32;
            let qs = &b[8 + 16 * ib..24 + 16 * ib];
            for (j, &q) in qs.iter().enumerate() {
                y[j] = dl * IQ4_LEVELS[(q & 0x0F) as usize] as f32;
                y[j + 16] = dl * IQ4_LEVELS[(q >> 4) as usize] as f32;
            }
        }
    }
}

fn dq_q6_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(210).zip(dst.chunks_exact_mut(256)) {
        let d = f16_at(b, 208);
        for n in 0..2 {
            let ql = &b[64 * n..64 * n + 64];
            let qh = &b[128 + 32 * n..128 + 32 * n + 32];
            let sc = &b[192 + 8 * n..192 + 8 * n + 8];
            let y = &mut y[128 * n..128 * n + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
            }
        }
    }
}
