//! ggml's K-quant super-blocks (Q2_K to Q6_K) and IQ4_XS: their layouts, the portable dequantisation
//! (ggml's `dequantize_row_q*_K`, operation for operation, so bit-identical to it and to
//! `kiln_gguf::dequantize`), and quantisation through kiln-gguf's port of ggml's reference
//! quantisers.
//!
//! Every K-quant value is `scale · q + offset` with one scale and offset per 32 values (Q4_K,
//! Q5_K: `d·sc` and `−dmin·m`) or per 16 (Q3_K, Q6_K: `d·sc`, no offset). The SIMD kernels
//! ([`super::avx2`]) read the same fields through [`sub_scales`].

use half::f16;

use super::PackedFormat;

/// Values per super-block.
pub(super) const QK_K: usize = 256;

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K / Q5_K block, from its 12 packed
/// bytes (`get_scale_min_k4`): sub-blocks 0..4 keep 6 bits in bytes 0..8, 4..8 split theirs
/// between the nibbles of bytes 8..12 and the top two bits of bytes 0..8.
#[inline(always)]
pub(super) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Per 32-value sub-block of one Q4_K / Q5_K block: `d·sc` and `dmin·m` (what ggml's
/// dequantisation multiplies and subtracts).
#[inline(always)]
pub(super) fn sub_scales(b: &[u8]) -> ([f32; 8], [f32; 8]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (mut sc, mut mn) = ([0f32; 8], [0f32; 8]);
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, &b[4..16]);
        sc[j] = d * s as f32;
        mn[j] = dmin * m as f32;
    }
    (sc, mn)
}

/// One row of K-quant blocks to f32 (`src` whole blocks, `dst` their values).
pub(super) fn dequantize_row(format: PackedFormat, src: &[u8], dst: &mut [f32]) {
    let bb = format.block_bytes();
    for (b, y) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(QK_K)) {
        match format {
            PackedFormat::Q4_K => q4_k(b, y),
            PackedFormat::Q5_K => q5_k(b, y),
            PackedFormat::Q6_K => q6_k(b, y),
            PackedFormat::Q3_K => q3_k(b, y),
            PackedFormat::IQ4_XS => iq4_xs(b, y),
            PackedFormat::Q2_K => q2_k(b, y),
            _ => unreachable!("{format} is not a K-quant"),
        }
    }
}

/// `block_q4_K { half d; half dmin; u8 scales[12]; u8 qs[128]; }`: byte `32j + l` of `qs`
/// holds value `64j + l` (low nibble) and `64j + 32 + l` (high).
fn q4_k(b: &[u8], y: &mut [f32]) {
    let (sc, mn) = sub_scales(b);
    for j in 0..4 {
        let q = &b[16 + 32 * j..48 + 32 * j];
        let (lo, hi) = y[64 * j..64 * j + 64].split_at_mut(32);
        for l in 0..32 {
            lo[l] = sc[2 * j] * (q[l] & 0x0F) as f32 - mn[2 * j];
            hi[l] = sc[2 * j + 1] * (q[l] >> 4) as f32 - mn[2 * j + 1];
        }
    }
}

/// `block_q5_K { half d; half dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; }`: as Q4_K, plus
/// bit `s` of `qh[l]` as the fifth bit of value `32s + l`.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let (sc, mn) = sub_scales(b);
    let qh = &b[16..48];
    for j in 0..4 {
        let q = &b[48 + 32 * j..80 + 32 * j];
        let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
        let (lo, hi) = y[64 * j..64 * j + 64].split_at_mut(32);
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            lo[l] = sc[2 * j] * ((q[l] & 0x0F) + h1) as f32 - mn[2 * j];
            hi[l] = sc[2 * j + 1] * ((q[l] >> 4) + h2) as f32 - mn[2 * j + 1];
        }
    }
}

/// `block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; half d; }`: the quant of value
/// `128n + 32k + l` is [`q6_quant`]; group `v / 16` has scale `scales[v / 16]`.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for (v, y) in y.iter_mut().enumerate() {
        // ggml: d * sc (a float times an int8), then times the quant.
        *y = d * (b[192 + v / 16] as i8) as f32 * q6_quant(b, v) as f32;
    }
}

/// The sixteen signed scales (`sc − 32`, −32..31) of a Q3_K block, from its 12 packed bytes
/// at 96..108: group `k`'s low four bits in the nibble `k / 8` of byte `k % 8`, its high two
/// at bit `2·(k / 4)` of byte `8 + k % 4` (ggml's `kmask` unpacking, one group at a time).
#[inline(always)]
pub(super) fn q3_scales(b: &[u8]) -> [i8; 16] {
    let sb = &b[96..108];
    std::array::from_fn(|k| {
        let lo = (sb[k % 8] >> (4 * (k / 8))) & 0x0F;
        let hi = (sb[8 + k % 4] >> (2 * (k / 4))) & 0x03;
        (lo | (hi << 4)) as i8 - 32
    })
}

/// `block_q3_K { u8 hmask[32]; u8 qs[64]; u8 scales[12]; half d; }`: the quant of value
/// `128n + 32j + l` is bits `2j..2j+2` of `qs[32n + l]`, minus 4 where bit `4n + j` of
/// `hmask[l]` is clear; group `v / 16` has scale [`q3_scales`]`[v / 16]`.
fn q3_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 108);
    let sc = q3_scales(b);
    for (v, y) in y.iter_mut().enumerate() {
        // ggml: d * (sc − 32) (a float times an int8), then times the quant.
        *y = d * sc[v / 16] as f32 * q3_quant(b, v) as f32;
    }
}

/// `block_q2_K { u8 scales[16]; u8 qs[64]; half d; half dmin; }`: the quant of value
/// `128n + 32j + l` is bits `2j..2j+2` of `qs[32n + l]`; group `g = v / 16` has scale
/// `scales[g] & 15` and min `scales[g] >> 4`, computed as ggml's `dequantize_row_q2_K`.
fn q2_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    for (g, y) in y.chunks_exact_mut(16).enumerate() {
        let (dl, ml) = (d * (b[g] & 0x0F) as f32, dmin * (b[g] >> 4) as f32);
        for (i, y) in y.iter_mut().enumerate() {
            let v = 16 * g + i;
            let q = (b[16 + 32 * (v / 128) + v % 32] >> (2 * (v % 128 / 32))) & 3;
            *y = dl * q as f32 - ml;
        }
    }
}

/// The eight sub-block scales (`ls − 32`, −32..31) of an IQ4_XS block: the low four bits
/// in nibble `ib % 2` of `scales_l[ib / 2]` (bytes 4..8), the high two at bit `2·ib` of the
/// u16 `scales_h` (bytes 2..4).
#[inline(always)]
pub(super) fn iq4_xs_scales(b: &[u8]) -> [i8; 8] {
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    std::array::from_fn(|ib| {
        let lo = (b[4 + ib / 2] >> (4 * (ib % 2))) & 0x0F;
        let hi = ((scales_h >> (2 * ib)) & 3) as u8;
        (lo | (hi << 4)) as i8 - 32
    })
}

/// `block_iq4_xs { half d; u16 scales_h; u8 scales_l[4]; u8 qs[128]; }`: value `32ib + j` is
/// level `qs[8 + 16ib + j] & 15` (j < 16) or that byte's high nibble (`j − 16`) under
/// `d·(ls − 32)`, computed as ggml's `dequantize_row_iq4_xs`.
fn iq4_xs(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (ib, (sc, y)) in iq4_xs_scales(b)
        .into_iter()
        .zip(y.chunks_exact_mut(32))
        .enumerate()
    {
        let dl = d * sc as f32;
        for (j, &q) in b[8 + 16 * ib..24 + 16 * ib].iter().enumerate() {
            y[j] = dl * kiln_gguf::IQ4_LEVELS[(q & 0x0F) as usize] as f32;
            y[j + 16] = dl * kiln_gguf::IQ4_LEVELS[(q >> 4) as usize] as f32;
        }
    }
}

/// The signed 3-bit quant (−4..3) of value `v` of a Q3_K block (see [`q3_k`]).
#[inline(always)]
pub(super) fn q3_quant(b: &[u8], v: usize) -> i32 {
    let (n, j, l) = (v / 128, v % 128 / 32, v % 32);
    let low = (b[32 + 32 * n + l] >> (2 * j)) & 3;
    let high = (b[l] >> (4 * n + j)) & 1;
    (low | (high << 2)) as i32 - 4
}

/// The signed 6-bit quant (`q − 32`) of value `v` of a Q6_K block: low 4 bits from `ql`
/// (byte `64n + 32·(k&1) + l`, high nibble for k ≥ 2), high 2 bits from `qh[32n + l]` at
/// bit `2k`, where `v = 128n + 32k + l`.
#[inline(always)]
pub(super) fn q6_quant(b: &[u8], v: usize) -> i32 {
    let (n, k, l) = (v / 128, v % 128 / 32, v % 32);
    let low = b[64 * n + 32 * (k & 1) + l] >> (4 * (k / 2)) & 0x0F;
    let high = (b[128 + 32 * n + l] >> (2 * k)) & 3;
    (low | (high << 4)) as i32 - 32
}

/// The ggml type of a format (kiln-gguf quantises and dequantises the block formats).
pub(super) fn ggml_type(format: PackedFormat) -> kiln_gguf::GgmlType {
    match format {
        PackedFormat::F32 => kiln_gguf::GgmlType::F32,
        PackedFormat::F16 => kiln_gguf::GgmlType::F16,
        PackedFormat::BF16 => kiln_gguf::GgmlType::BF16,
        PackedFormat::Q8_0 => kiln_gguf::GgmlType::Q8_0,
        PackedFormat::Q4_0 => kiln_gguf::GgmlType::Q4_0,
        PackedFormat::Q4_1 => kiln_gguf::GgmlType::Q4_1,
        PackedFormat::Q5_0 => kiln_gguf::GgmlType::Q5_0,
        PackedFormat::Q5_1 => kiln_gguf::GgmlType::Q5_1,
        PackedFormat::Q4_K => kiln_gguf::GgmlType::Q4_K,
        PackedFormat::Q5_K => kiln_gguf::GgmlType::Q5_K,
        PackedFormat::Q6_K => kiln_gguf::GgmlType::Q6_K,
        PackedFormat::Q3_K => kiln_gguf::GgmlType::Q3_K,
        PackedFormat::IQ4_XS => kiln_gguf::GgmlType::IQ4_XS,
        PackedFormat::Q2_K => kiln_gguf::GgmlType::Q2_K,
        PackedFormat::IQ4_NL => kiln_gguf::GgmlType::IQ4_NL,
    }
}
