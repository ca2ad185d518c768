//! The opt-in 8-bit activation path ([`ActivationPrecision::Q8`](super::ActivationPrecision)):
//! for Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 weights, each 32-value block of an activation row is
//! rounded to i8 with one f32 scale (ggml's `quantize_row_q8_0` rule: `d = amax/127`,
//! `q = round(x/d)`), and the dot products run on integers: `vpmaddubsw` + `vpmaddwd` per
//! block, one f32 multiply-add by `d_w·d_x`. This is what llama.cpp does for these formats
//! (`ggml_vec_dot_q4_1_q8_1` and its siblings). For the K-quants each 256 values share one
//! scale, as in llama.cpp's `block_q8_K`: one row at a time, a super-block's integer sums
//! (each sub-block's scaled by its integer scale) add up before one float multiply-add; for
//! several rows each sub-block's integer sum meets its scale in f32, eight at a time. It does a third of the
//! integer work of the default path's two i16 parts, and
//! the Q8_0 kernel skips the widening to f32; the price is activations held to half a step of
//! `amax/127` instead of f32 precision.
//!
//! The result is exactly the product of the dequantised weights with the dequantised
//! activations `q·d` (up to f32 rounding of the per-block sums): the tests hold the kernels to
//! that in f64.

use super::PackedFormat;
use super::kernels::{Acts, DotKernel, dequantize_row};

/// Whether the CPU has AVX512-VNNI (with 256-bit forms), which the 32-value block formats'
/// fastest kernels use.
pub(super) fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    if super::avx2::available() {
        return avx2::vnni();
    }
    false
}

/// Whether `format` has 8-bit activation kernels (the block formats).
pub(super) fn applies(format: PackedFormat) -> bool {
    matches!(
        format,
        PackedFormat::Q8_0
            | PackedFormat::Q4_0
            | PackedFormat::Q4_1
            | PackedFormat::Q5_0
            | PackedFormat::Q5_1
            | PackedFormat::Q4_K
            | PackedFormat::Q5_K
            | PackedFormat::Q6_K
            | PackedFormat::Q3_K
            | PackedFormat::IQ4_XS
            | PackedFormat::Q2_K
            | PackedFormat::IQ4_NL
    )
}

/// The values one activation scale covers for `format`: 32 (ggml's `block_q8_0`), or 256 for
/// the K-quants (ggml's `block_q8_K`, one scale per super-block, so a super-block's integer
/// sums add up before any float multiply).
pub(super) fn scale_len(format: PackedFormat) -> usize {
    if format.is_k_quant() { 256 } else { 32 }
}

/// Rounds `x` to i8 with one scale per `block` values (32 or 256; ggml's rule: `d = amax/127`,
/// `q = round(x/d)`): the quants, the scales, and per 32 values `d·Σq` (what a block offset,
/// Q4_1's `m`, Q4_0's `−8·d_w`, a K-quant's `−dmin·m`, multiplies).
pub(super) fn quantize(x: &[f32], acts: &mut Acts, block: usize) {
    let blocks = x.len() / block;
    acts.q8 = vec![0; blocks * block];
    acts.q8_scale = vec![0.0; blocks];
    acts.q8_sum = vec![0.0; blocks * block / 32];
    #[cfg(target_arch = "x86_64")]
    if super::avx2::available() {
        // Safety: AVX2 is available; the buffers were sized for `blocks` just above.
        unsafe { avx2::quantize(x, acts, blocks, block / 32) };
        let rows_t = if block == 32 { 2 } else { avx2::KT_MIN_ROWS };
        // Without VNNI only the 32-value formats' `group_t_avx2` (2..=8 rows) reads it.
        if acts.m >= rows_t && (vnni() || (block == 32 && acts.m <= 8)) {
            transpose(acts);
        }
        return;
    }
    quantize_scalar(x, acts, block);
}

/// Fills [`Acts::q8t`]: in each row's whole groups of eight blocks, value `4i + e` of block
/// `k` (plus 128) goes to byte `32i + 4k + e` (the layout `group_t` multiplies).
pub(super) fn transpose(acts: &mut Acts) {
    let cols = acts.cols;
    let groups = cols / 256;
    acts.q8t = vec![0; acts.m * cols];
    for (src, dst) in acts
        .q8
        .chunks_exact(cols)
        .zip(acts.q8t.chunks_exact_mut(cols))
    {
        for g in 0..groups {
            let (src, dst) = (&src[g * 256..][..256], &mut dst[g * 256..][..256]);
            for k in 0..8 {
                for i in 0..8 {
                    for e in 0..4 {
                        dst[32 * i + 4 * k + e] = (src[32 * k + 4 * i + e] as u8) ^ 0x80;
                    }
                }
            }
        }
    }
}

/// [`quantize`] one value at a time (rounding half away from zero, as ggml's reference; the
/// AVX2 loop rounds half to even, which moves a tie by one step).
pub(super) fn quantize_scalar(x: &[f32], acts: &mut Acts, block: usize) {
    for (b, (xb, qb)) in x
        .chunks_exact(block)
        .zip(acts.q8.chunks_exact_mut(block))
        .enumerate()
    {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (c, (x32, q32)) in xb.chunks_exact(32).zip(qb.chunks_exact_mut(32)).enumerate() {
            let mut sum = 0i32;
            for (q, v) in q32.iter_mut().zip(x32) {
                let t = (v * id).round().clamp(-127.0, 127.0) as i32;
                *q = t as i8;
                sum += t;
            }
            acts.q8_sum[b * block / 32 + c] = d * sum as f32;
        }
        acts.q8_scale[b] = d;
    }
}

/// The portable kernel (and the tests' reference for the SIMD one): each weight row
/// dequantised to f32, multiplied block by block with the i8 activations, scaled by `d_x`.
pub(super) fn dot_portable(format: PackedFormat, w: &[u8], acts: &Acts, out: &mut [f32]) {
    let (cols, m) = (acts.cols, acts.m);
    let blocks = cols / 32;
    let mut row = vec![0f32; cols];
    for (wr, out) in w
        .chunks_exact(format.row_bytes(cols).max(1))
        .zip(out.chunks_exact_mut(m))
    {
        dequantize_row(format, wr, &mut row);
        for (j, y) in out.iter_mut().enumerate() {
            *y = (0..blocks)
                .map(|b| {
                    let q = &acts.q8[(j * blocks + b) * 32..][..32];
                    let w = &row[b * 32..(b + 1) * 32];
                    let s: f32 = w.iter().zip(q).map(|(w, &q)| w * q as f32).sum();
                    s * acts.q8_scale[(j * cols + b * 32) / scale_len(format)]
                })
                .sum();
        }
    }
}

/// The fastest 8-bit activation kernel this CPU runs for `format` (called on every product, so
/// it picks without allocating).
pub(super) fn dot_kernel(format: PackedFormat) -> DotKernel {
    #[cfg(target_arch = "x86_64")]
    if super::avx2::available() {
        return simd_kernel(format, avx2::vnni());
    }
    dot_portable
}

/// Every 8-bit activation kernel this CPU runs for `format`, fastest first, by name (the
/// tests check each).
#[cfg(test)]
pub(super) fn kernels(format: PackedFormat) -> Vec<(&'static str, DotKernel)> {
    let mut all: Vec<(&'static str, DotKernel)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    if super::avx2::available() {
        if avx2::vnni() {
            all.push(("avx512-vnni", simd_kernel(format, true)));
        }
        all.push(("avx2", simd_kernel(format, false)));
    }
    all.push(("portable", dot_portable));
    all
}

/// The AVX2 kernel for `format`, with `vpdpbusd` when `vnni`. Only call when AVX2 (and for
/// `vnni`, AVX512-VNNI) is available.
#[cfg(target_arch = "x86_64")]
fn simd_kernel(format: PackedFormat, vnni: bool) -> DotKernel {
    use super::avx2::{K_IQ4_XS, K_Q2, K_Q3, K_Q4, K_Q5, K_Q6};
    match (format, vnni) {
        (PackedFormat::Q2_K, true) => avx2::entry_k::<K_Q2, true>,
        (PackedFormat::Q2_K, false) => avx2::entry_k::<K_Q2, false>,
        (PackedFormat::IQ4_XS, true) => avx2::entry_k::<K_IQ4_XS, true>,
        (PackedFormat::IQ4_XS, false) => avx2::entry_k::<K_IQ4_XS, false>,
        (PackedFormat::Q3_K, true) => avx2::entry_k::<K_Q3, true>,
        (PackedFormat::Q3_K, false) => avx2::entry_k::<K_Q3, false>,
        (PackedFormat::Q4_K, true) => avx2::entry_k::<K_Q4, true>,
        (PackedFormat::Q5_K, true) => avx2::entry_k::<K_Q5, true>,
        (PackedFormat::Q6_K, true) => avx2::entry_k::<K_Q6, true>,
        (PackedFormat::Q4_K, false) => avx2::entry_k::<K_Q4, false>,
        (PackedFormat::Q5_K, false) => avx2::entry_k::<K_Q5, false>,
        (PackedFormat::Q6_K, false) => avx2::entry_k::<K_Q6, false>,
        (PackedFormat::Q8_0, true) => avx2::entry::<{ avx2::Q8_0 }, true>,
        (PackedFormat::Q4_0, true) => avx2::entry::<{ avx2::Q4_0 }, true>,
        (PackedFormat::Q5_0, true) => avx2::entry::<{ avx2::Q5_0 }, true>,
        (PackedFormat::Q5_1, true) => avx2::entry::<{ avx2::Q5_1 }, true>,
        (PackedFormat::IQ4_NL, true) => avx2::entry::<{ avx2::IQ4_NL }, true>,
        (_, true) => avx2::entry::<{ avx2::Q4_1 }, true>,
        (PackedFormat::Q8_0, false) => avx2::entry::<{ avx2::Q8_0 }, false>,
        (PackedFormat::Q4_0, false) => avx2::entry::<{ avx2::Q4_0 }, false>,
        (PackedFormat::Q5_0, false) => avx2::entry::<{ avx2::Q5_0 }, false>,
        (PackedFormat::Q5_1, false) => avx2::entry::<{ avx2::Q5_1 }, false>,
        (PackedFormat::IQ4_NL, false) => avx2::entry::<{ avx2::IQ4_NL }, false>,
        (_, false) => avx2::entry::<{ avx2::Q4_1 }, false>,
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::PackedFormat;
    use super::super::avx2::{
        K_IQ4_XS, K_Q2, K_Q3, K_Q4, K_Q5, K_Q6, h2f, has_mins, hmax, hsum, iq4_levels, k_bytes,
        k_d_at, q2_k_mins, scales_mins_k4, signed, signed_scales16,
    };
    use super::Acts;

    /// `$kernel::<$f, M>($args)` with `M` the group's row count, 1 to 4 (the kernels take it
    /// as a constant so that their per-row sums stay in registers).
    macro_rules! by_rows {
        ($n:expr, $kernel:ident, $f:ident, ($($arg:expr),*)) => {
            match $n {
                4 => $kernel::<$f, 4>($($arg),*),
                3 => $kernel::<$f, 3>($($arg),*),
                2 => $kernel::<$f, 2>($($arg),*),
                _ => $kernel::<$f, 1>($($arg),*),
            }
        };
    }

    pub(super) const Q8_0: u8 = 0;
    pub(super) const Q4_0: u8 = 1;
    pub(super) const Q4_1: u8 = 2;
    pub(super) const Q5_0: u8 = 3;
    pub(super) const Q5_1: u8 = 4;
    pub(super) const IQ4_NL: u8 = 5;

    /// Whether the 32-value block format `F` has signed quants and no offset (Q8_0, and
    /// IQ4_NL's levels): its kernels take the sign trick (`|w|` × `x·sign(w)`) where the
    /// unsigned 4- and 5-bit quants take their offset times the block's `d_x·Σq`.
    const fn signed_block<const F: u8>() -> bool {
        F == Q8_0 || F == IQ4_NL
    }

    /// Whether the CPU has AVX512-VNNI with 256-bit forms (checked once; `KILN_NO_VNNI` turns it
    /// off, for comparing the two kernels).
    pub(super) fn vnni() -> bool {
        static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *VNNI.get_or_init(|| {
            std::env::var_os("KILN_NO_VNNI").is_none()
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
        })
    }

    const fn block_bytes<const F: u8>() -> usize {
        match F {
            Q8_0 => 34,
            Q4_0 | IQ4_NL => 18,
            Q5_0 => 22,
            Q5_1 => 24,
            _ => 20,
        }
    }

    pub(super) fn entry<const F: u8, const VNNI: bool>(
        format: PackedFormat,
        w: &[u8],
        acts: &Acts,
        out: &mut [f32],
    ) {
        assert_eq!(format.block_bytes(), block_bytes::<F>());
        let cols = acts.cols;
        if VNNI && (2..=8).contains(&acts.m) && cols >= 256 && acts.q8t.len() >= acts.m * cols {
            each_group(format, w, acts, out, 32, 8, |wr, a, o| {
                // Safety: VNNI is available (`kernels` hands this out only then); `each_group`
                // bounds the reads, and `q8t` holds `m` rows of `cols` (checked above).
                unsafe { group_t::<F>(wr, a, cols, o) }
            });
            return;
        }
        if VNNI && acts.m > 8 && cols >= 256 && acts.q8t.len() >= acts.m * cols {
            each_pair(format, w, acts, out, 32, |wr, a, n, sums| {
                // Safety: VNNI is available (`kernels` hands this out only then); `each_pair`
                // bounds the reads.
                unsafe {
                    if wr.len() > format.row_bytes(cols) {
                        group_tp::<F, 2>(wr, a, cols, n, sums)
                    } else {
                        group_tp::<F, 1>(wr, a, cols, n, sums)
                    }
                }
            });
            return;
        }
        if !VNNI && (2..=8).contains(&acts.m) && cols >= 256 && acts.q8t.len() >= acts.m * cols {
            each_group(format, w, acts, out, 32, 8, |wr, a, o| {
                // Safety: AVX2 is available (`kernels` hands this out only then); `each_group`
                // bounds the reads, and `q8t` holds `m` rows of `cols` (checked above).
                unsafe { group_t_avx2::<F>(wr, a, cols, o) }
            });
            return;
        }
        if acts.m == 1 && cols >= 256 {
            each_group(format, w, acts, out, 32, 1, |wr, a, o| {
                // Safety: AVX2, and with `VNNI` AVX512-VNNI, are available (`kernels` hands
                // this out only then); `each_group` bounds the reads.
                unsafe {
                    if VNNI {
                        group_h_vnni::<F>(wr, a, cols, o)
                    } else {
                        group_h::<F>(wr, a, cols, o)
                    }
                }
            });
            return;
        }
        each_group(format, w, acts, out, 32, 4, |wr, a, o| {
            // Safety: `kernels` hands this out only when AVX2 (and for VNNI, AVX512-VNNI) is
            // available; `each_group`'s asserts bound every read (`o.len()` rows of `cols`
            // quants and their scales).
            unsafe {
                if VNNI {
                    by_rows!(o.len(), group_vnni, F, (wr, a, cols, o))
                } else {
                    by_rows!(o.len(), group, F, (wr, a, cols, o))
                }
            }
        });
    }

    /// [`entry`] for the K-quants (`F` one of [`K_Q3`], [`K_Q4`], [`K_Q5`], [`K_Q6`]): rows of
    /// 256-value super-blocks against activations with one scale per 256 values
    /// ([`super::scale_len`]), [`group_k`]. With `VL` (only when the CPU has AVX-512VL and
    /// VNNI, [`vnni`]), [`group_k_vl`], or [`entry_kt`] from [`KT_MIN_ROWS`] rows on.
    pub(super) fn entry_k<const F: u8, const VL: bool>(
        format: PackedFormat,
        w: &[u8],
        acts: &Acts,
        out: &mut [f32],
    ) {
        assert_eq!(format.block_bytes(), k_block_bytes::<F>());
        let cols = acts.cols;
        // (No transposing kernel for Q2_K, Q3_K and IQ4_XS: it was written for VNNI machines,
        // and none was at hand to test their forms on.)
        if VL
            && F != K_Q2
            && F != K_Q3
            && F != K_IQ4_XS
            && acts.m >= KT_MIN_ROWS
            && acts.q8t.len() >= acts.m * cols
        {
            entry_kt::<F>(format, w, acts, out);
            return;
        }
        each_group(format, w, acts, out, 256, 4, |wr, a, o| {
            // Safety: as in `entry` (whole super-blocks: `cols` is a multiple of 256).
            unsafe {
                if VL {
                    by_rows!(o.len(), group_k_vl, F, (wr, a, cols, o))
                } else {
                    by_rows!(o.len(), group_k, F, (wr, a, cols, o))
                }
            }
        });
    }

    /// Every weight row of `w` against the activation rows in groups of up to `most`: `kernel`
    /// gets the row, the group's activations (one scale per `scale_len` values, a sum per 32)
    /// and the group's outputs. Checks the lengths every kernel relies on.
    fn each_group(
        format: PackedFormat,
        w: &[u8],
        acts: &Acts,
        out: &mut [f32],
        scale_len: usize,
        most: usize,
        mut kernel: impl FnMut(&[u8], &Rows, &mut [f32]),
    ) {
        let (cols, m) = (acts.cols, acts.m);
        let (scales, chunks) = (cols / scale_len, cols / 32);
        assert!(m > 0 && out.len().is_multiple_of(m) && cols.is_multiple_of(scale_len));
        assert_eq!(w.len(), out.len() / m * format.row_bytes(cols));
        assert!(acts.q8.len() >= m * cols);
        assert!(acts.q8_scale.len() >= m * scales && acts.q8_sum.len() >= m * chunks);
        if format == PackedFormat::Q2_K {
            assert!(acts.sum16.len() >= m * (cols / 16));
        }
        let rb = format.row_bytes(cols);
        for (r, o) in out.chunks_exact_mut(m).enumerate() {
            let wr = &w[r * rb..(r + 1) * rb];
            let mut j = 0;
            while j < m {
                let n = (m - j).min(most);
                let a = Rows {
                    q: &acts.q8[j * cols..],
                    t: acts.q8t.get(j * cols..).unwrap_or_default(),
                    scale: &acts.q8_scale[j * scales..],
                    sum: &acts.q8_sum[j * chunks..],
                    sum16: acts.sum16.get(j * cols / 16..).unwrap_or_default(),
                };
                kernel(wr, &a, &mut o[j..j + n]);
                j += n;
            }
        }
    }

    const fn k_block_bytes<const F: u8>() -> usize {
        match F {
            K_Q4 => 144,
            K_Q5 => 176,
            K_Q3 => 110,
            K_IQ4_XS => 136,
            K_Q2 => 84,
            _ => 210,
        }
    }

    /// `M` activation rows against one row of K-quant super-blocks, as llama.cpp's
    /// `ggml_vec_dot_q4_K_q8_K` and siblings: each 32-value sub-block's quants ([`k_bytes`])
    /// times the i8 activations by `vpmaddubsw`, and `vpmaddwd` multiplies the pair sums by the
    /// sub-block's integer scale (Q6_K: each 16-value half's i8 scale, its signed `q − 32`
    /// through the sign trick), so a super-block's sum stays an exact i32 until one multiply
    /// by `d · d_x`. Q4_K/Q5_K's mins take `−dmin · Σ m·(d_x·Σq)` per super-block, eight at
    /// once. The scales are widened to i16 once per super-block and each sub-block's is
    /// broadcast by one `vpshufb` (as llama.cpp's `get_scale_shuffle_k4`), instead of a scalar
    /// load and broadcast per sub-block: with the vector mins that took Q4_K at one row from
    /// 27 to 40 GB/s (`packed_matmul`, 32768×2048). [`group_k_vl`] adds the scaled pair sums
    /// with VNNI's `vpdpwssd`; from [`KT_MIN_ROWS`] rows on, [`group_kt`] takes over.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group_k<const F: u8, const M: usize>(
        w: &[u8],
        a: &Rows,
        cols: usize,
        out: &mut [f32],
    ) {
        unsafe { group_k_body::<F, M, false>(w, a, cols, out) }
    }

    /// [`group_k`] compiled with AVX-512VL, whose 32 vector registers hold a super-block's
    /// eight unpacked sub-blocks and scales without spilling them, and VNNI's `vpdpwssd`
    /// (four rows, 5632×2048 Q4_K: 0.36–0.41 → 0.32 ms).
    /// `packed_matmul`, 5632×2048, four activation rows: Q4_K 0.59 → 0.36 ms, Q6_K 0.84 →
    /// 0.46 ms; at one row, memory-bound, no change.
    #[target_feature(enable = "avx2,fma,f16c,avx512vl,avx512vnni")]
    unsafe fn group_k_vl<const F: u8, const M: usize>(
        w: &[u8],
        a: &Rows,
        cols: usize,
        out: &mut [f32],
    ) {
        unsafe { group_k_body::<F, M, true>(w, a, cols, out) }
    }

    /// The body of [`group_k`] and [`group_k_vl`]; `DP`: `vpdpwssd` (AVX512-VNNI) does the
    /// scale multiply and the add of the i16 pair sums in one instruction (same integers).
    #[inline(always)]
    unsafe fn group_k_body<const F: u8, const M: usize, const DP: bool>(
        w: &[u8],
        a: &Rows,
        cols: usize,
        out: &mut [f32],
    ) {
        // Safety: reads are bounded by `entry_k`'s asserts; the callers' target features
        // cover every intrinsic.
        unsafe {
            let (supers, chunks) = (cols / 256, cols / 32);
            let masks: [__m256i; 8] = std::array::from_fn(|s| {
                _mm256_loadu_si256(
                    SCALE_SHUFFLE[usize::from(!has_mins::<F>())][s]
                        .as_ptr()
                        .cast(),
                )
            });
            let mut acc = [_mm256_setzero_ps(); M];
            for sb in 0..supers {
                let p = w.as_ptr().add(sb * k_block_bytes::<F>());
                // Per sub-block s, `vpshufb(scales[s / 4], masks[s])` is its scale in every i16
                // lane (Q6_K: the first 16 values' scale in the low half, the next 16's in the
                // high half).
                let (d, scales, mins) = if !has_mins::<F>() {
                    let s8 = if F == K_Q2 {
                        _mm_and_si128(_mm_loadu_si128(p.cast()), _mm_set1_epi8(0x0F))
                    } else if F != K_Q6 {
                        signed_scales16::<F>(p)
                    } else {
                        _mm_loadu_si128(p.add(192).cast())
                    };
                    let s16 = _mm256_cvtepi8_epi16(s8);
                    (
                        h2f(p.add(k_d_at::<F>())),
                        [
                            _mm256_permute2x128_si256::<0x00>(s16, s16),
                            _mm256_permute2x128_si256::<0x11>(s16, s16),
                        ],
                        _mm256_setzero_ps(),
                    )
                } else {
                    let sm = scales_mins_k4(p);
                    let s16 = _mm256_cvtepu8_epi16(sm);
                    let s16 = _mm256_permute2x128_si256::<0x00>(s16, s16);
                    let mins = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(sm)));
                    (
                        h2f(p),
                        [s16, s16],
                        _mm256_mul_ps(mins, _mm256_set1_ps(h2f(p.add(2)))),
                    )
                };
                // Q2_K: `dmin·m` of its sixteen groups.
                let q2_mins = if F == K_Q2 {
                    q2_k_mins(p)
                } else {
                    [_mm256_setzero_ps(); 2]
                };
                let mut sums = [_mm256_setzero_si256(); M];
                for (s, mask) in masks.iter().enumerate() {
                    let q = k_bytes::<F>(p, s);
                    let scale = _mm256_shuffle_epi8(scales[s / 4], *mask);
                    // (unsigned quants, signs for the activations)
                    let (u, sign) = if signed::<F>() {
                        (_mm256_sign_epi8(q, q), Some(q))
                    } else {
                        (q, None)
                    };
                    for (j, sum) in sums.iter_mut().enumerate() {
                        let x = _mm256_loadu_si256(
                            a.q.as_ptr().add(j * cols + sb * 256 + 32 * s).cast(),
                        );
                        let x = match sign {
                            Some(sg) => _mm256_sign_epi8(x, sg),
                            None => x,
                        };
                        let pairs = _mm256_maddubs_epi16(u, x);
                        // (One row: the adds' one-cycle chain, not `vpdpwssd`'s latency.)
                        *sum = if DP && M > 1 {
                            _mm256_dpwssd_epi32(*sum, pairs, scale)
                        } else {
                            _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, scale))
                        };
                    }
                }
                for j in 0..M {
                    let dx = *a.scale.get_unchecked(j * supers + sb);
                    acc[j] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(sums[j]),
                        _mm256_set1_ps(d * dx),
                        acc[j],
                    );
                    if F == K_Q2 {
                        // −dmin·m per group of 16 times its d_x·Σq.
                        let s = a.sum16.as_ptr().add(j * cols / 16 + sb * 16);
                        acc[j] = _mm256_fnmadd_ps(q2_mins[0], _mm256_loadu_ps(s), acc[j]);
                        acc[j] = _mm256_fnmadd_ps(q2_mins[1], _mm256_loadu_ps(s.add(8)), acc[j]);
                    }
                    if has_mins::<F>() {
                        // −dmin·m per sub-block times its d_x·Σq.
                        let bsum = _mm256_loadu_ps(a.sum.as_ptr().add(j * chunks + sb * 8));
                        acc[j] = _mm256_fnmadd_ps(mins, bsum, acc[j]);
                    }
                }
            }
            for j in 0..M {
                out[j] = hsum(acc[j]);
            }
        }
    }

    /// The fewest activation rows for which [`group_kt`] (its transpose paid once per
    /// weight row and super-block) beats [`group_k_vl`].
    pub(super) const KT_MIN_ROWS: usize = 6;

    /// The most activation rows one call of [`group_kt`] takes (its sums live in an array of
    /// this many vectors per weight row; `tiled_int8`'s blocks of rows fit).
    const KT_MAX_ROWS: usize = 64;

    /// The K-quant kernel for [`KT_MIN_ROWS`] activation rows or more: [`group_kt`] on
    /// [`each_pair`].
    fn entry_kt<const F: u8>(format: PackedFormat, w: &[u8], acts: &Acts, out: &mut [f32]) {
        let cols = acts.cols;
        each_pair(format, w, acts, out, 256, |wr, a, n, sums| {
            // Safety: VNNI is available (`entry_k` calls this only then); `each_pair`'s
            // asserts bound every read.
            unsafe {
                if wr.len() > format.row_bytes(cols) {
                    group_kt::<F, 2>(wr, a, cols, n, sums)
                } else {
                    group_kt::<F, 1>(wr, a, cols, n, sums)
                }
            }
        });
    }

    /// Every weight row of `w` against the activations (`q8t` built), for the transposing
    /// kernels: `kernel` gets two weight rows at a time (the last one alone when they are
    /// odd), the activations from some row on, their count `n` (at most [`KT_MAX_ROWS`]),
    /// and the sums to fill (`sums[r * KT_MAX_ROWS + j]`: weight row `r` times activation
    /// row `j`). Checks the lengths every kernel relies on.
    fn each_pair(
        format: PackedFormat,
        w: &[u8],
        acts: &Acts,
        out: &mut [f32],
        scale_len: usize,
        mut kernel: impl FnMut(&[u8], &Rows, usize, &mut [f32; 2 * KT_MAX_ROWS]),
    ) {
        let (cols, m) = (acts.cols, acts.m);
        let (scales, chunks, rb) = (cols / scale_len, cols / 32, format.row_bytes(cols));
        assert!(m > 0 && out.len().is_multiple_of(m) && cols.is_multiple_of(scale_len));
        let rows = out.len() / m;
        assert_eq!(w.len(), rows * rb);
        assert!(acts.q8.len() >= m * cols && acts.q8t.len() >= m * cols);
        assert!(acts.q8_scale.len() >= m * scales && acts.q8_sum.len() >= m * chunks);
        let mut sums = [0f32; 2 * KT_MAX_ROWS];
        let mut j = 0;
        while j < m {
            let n = (m - j).min(KT_MAX_ROWS);
            let a = Rows {
                q: &acts.q8[j * cols..],
                t: &acts.q8t[j * cols..],
                scale: &acts.q8_scale[j * scales..],
                sum: &acts.q8_sum[j * chunks..],
                sum16: acts.sum16.get(j * cols / 16..).unwrap_or_default(),
            };
            let mut r = 0;
            while r < rows {
                let k = (rows - r).min(2);
                kernel(&w[r * rb..(r + k) * rb], &a, n, &mut sums);
                for (i, s) in sums.chunks_exact(KT_MAX_ROWS).take(k).enumerate() {
                    out[(r + i) * m + j..][..n].copy_from_slice(&s[..n]);
                }
                r += k;
            }
            j += n;
        }
    }

    /// `m` (at most [`KT_MAX_ROWS`]) activation rows against `R` rows of K-quant super-blocks
    /// (`w`, one after the other), as [`group_t`] does for the 32-value formats: each
    /// super-block's eight sub-blocks of quants (Q6_K's signed `q − 32`) are transposed into
    /// the layout of [`Acts::q8t`], so that eight `vpdpbusd` with the activations (plus 128)
    /// leave sub-block `k`'s integer dot product in lane `k` (Q6_K: its two 16-value halves in
    /// two sums, each with its own scale). Less `128·Σq` per lane (once per weight row and
    /// super-block), converted once, it meets the vector of the sub-blocks' `d·sc` times
    /// `d_x` in one multiply-add, and Q4_K/Q5_K's mins `−dmin·m·d_x·Σx` in another. Per row
    /// and super-block that is 8 integer multiplies where [`group_k_body`] takes 16
    /// (`vpmaddubsw` and `vpmaddwd` per sub-block); the unpacking and the transpose are paid
    /// once for all `m` rows, and each activation load serves `R` weight rows (at one, the
    /// loads from L2 bound it). `out[r * KT_MAX_ROWS + j]` gets weight row `r` times
    /// activation row `j`.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    unsafe fn group_kt<const F: u8, const R: usize>(
        w: &[u8],
        a: &Rows,
        cols: usize,
        m: usize,
        out: &mut [f32; 2 * KT_MAX_ROWS],
    ) {
        // Safety: reads are bounded by `entry_kt`'s asserts.
        unsafe {
            let (supers, chunks) = (cols / 256, cols / 32);
            let rb = w.len() / R;
            let ones = _mm256_set1_epi8(1);
            // Q6_K's 16 scales, even ones to the low 8 bytes and odd ones to the high.
            let evens_odds = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
            let mut acc = [[_mm256_setzero_ps(); KT_MAX_ROWS]; R];
            for sb in 0..supers {
                // Per weight row: the transposed quants (word i of every sub-block in t[i]:
                // i < 4 its first 16 values), `−128·Σq` of each lane's words (Q6_K: of t[..4]
                // and t[4..]), and the float scales (Q6_K: even and odd ones) and mins.
                let mut t = [[_mm256_setzero_si256(); 8]; R];
                let mut ws = [[_mm256_setzero_si256(); 2]; R];
                let mut sc = [[_mm256_setzero_ps(); 2]; R];
                for r in 0..R {
                    let p = w.as_ptr().add(r * rb + sb * k_block_bytes::<F>());
                    t[r] = transpose8(std::array::from_fn(|s| k_bytes::<F>(p, s)));
                    for (h, ws) in ws[r].iter_mut().enumerate() {
                        for ti in &t[r][4 * h..4 * h + 4] {
                            *ws = _mm256_dpbusd_epi32(*ws, ones, *ti);
                        }
                        *ws = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<7>(*ws));
                    }
                    let to_f = |v: __m256i, d: f32| {
                        _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(v))
                    };
                    sc[r] = if F == K_Q6 {
                        let d = h2f(p.add(208));
                        let v = _mm_shuffle_epi8(_mm_loadu_si128(p.add(192).cast()), evens_odds);
                        [
                            to_f(_mm256_cvtepi8_epi32(v), d),
                            to_f(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(v)), d),
                        ]
                    } else {
                        let sm = scales_mins_k4(p);
                        [
                            to_f(_mm256_cvtepu8_epi32(sm), h2f(p)),
                            to_f(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(sm)), h2f(p.add(2))),
                        ]
                    };
                }
                for j in 0..m {
                    let xp = a.t.as_ptr().add(j * cols + 256 * sb);
                    let x: [__m256i; 8] =
                        std::array::from_fn(|i| _mm256_loadu_si256(xp.add(32 * i).cast()));
                    let dx = _mm256_set1_ps(*a.scale.get_unchecked(j * supers + sb));
                    for r in 0..R {
                        // Two chains of four (Q6_K: the two halves), so the adds overlap.
                        // (Each starts from its `−128·Σq`.)
                        let (mut lo, mut hi) = (ws[r][0], ws[r][1]);
                        for i in 0..4 {
                            lo = _mm256_dpbusd_epi32(lo, x[i], t[r][i]);
                            hi = _mm256_dpbusd_epi32(hi, x[4 + i], t[r][4 + i]);
                        }
                        let acc = &mut acc[r][j];
                        if F == K_Q6 {
                            let v = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(lo),
                                sc[r][0],
                                _mm256_mul_ps(_mm256_cvtepi32_ps(hi), sc[r][1]),
                            );
                            *acc = _mm256_fmadd_ps(v, dx, *acc);
                        } else {
                            let s = _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi));
                            *acc = _mm256_fmadd_ps(s, _mm256_mul_ps(sc[r][0], dx), *acc);
                            // −dmin·m per sub-block times its d_x·Σq.
                            let bsum = _mm256_loadu_ps(a.sum.as_ptr().add(j * chunks + sb * 8));
                            *acc = _mm256_fnmadd_ps(sc[r][1], bsum, *acc);
                        }
                    }
                }
            }
            for r in 0..R {
                for j in 0..m {
                    out[r * KT_MAX_ROWS + j] = hsum(acc[r][j]);
                }
            }
        }
    }

    /// `vpshufb` masks that broadcast one i16 scale of a 128-bit lane (of eight) to the
    /// whole lane: `[0]` for Q4_K/Q5_K, sub-block `s` takes scale `s` in both lanes; `[1]` for
    /// Q6_K, sub-block `s` takes scale `2s mod 8` in the low lane and `2s + 1 mod 8` in the
    /// high one.
    static SCALE_SHUFFLE: [[[u8; 32]; 8]; 2] = {
        let mut m = [[[0u8; 32]; 8]; 2];
        let mut s = 0;
        while s < 8 {
            let mut b = 0;
            while b < 32 {
                let (lo, hi) = ((2 * s) % 8, (2 * s + 1) % 8);
                let q6 = if b < 16 { lo } else { hi };
                m[0][s][b] = (2 * s + b % 2) as u8;
                m[1][s][b] = (2 * q6 + b % 2) as u8;
                b += 1;
            }
            s += 1;
        }
        m
    };

    /// The i8 activations of a group of rows, from its first row on.
    struct Rows<'a> {
        q: &'a [i8],
        /// [`Acts::q8t`] from the first row on (empty where it was not built).
        t: &'a [u8],
        scale: &'a [f32],
        sum: &'a [f32],
        /// Q2_K: [`Acts::sum16`] from the first row on (empty for other formats).
        sum16: &'a [f32],
    }

    /// `M` activation rows against one weight row. Per block and row: the 32 products summed
    /// in pairs by `vpmaddubsw` (u8 × i8 → i16; at most 2·128·127 < 2¹⁵, so it never
    /// saturates), in fours by `vpmaddwd`, converted once and multiplied by `d_w·d_x`. Q8_0's
    /// signed weights go through the sign trick (`|w|` × `x·sign(w)`); the 4- and 5-bit quants
    /// are already unsigned (0..31: at most 2·31·127 per pair) and their offset multiplies the
    /// block's `d_x·Σq`. Even and odd blocks
    /// use separate accumulators so the adds overlap.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group<const F: u8, const M: usize>(w: &[u8], a: &Rows, cols: usize, out: &mut [f32]) {
        unsafe { group_body::<F, M, false>(w, a, cols, out) }
    }

    /// [`group`] with AVX512-VNNI's `vpdpbusd` (on 256-bit registers), which sums the four
    /// u8 × i8 products of each i32 lane in one instruction where AVX2 needs two.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    unsafe fn group_vnni<const F: u8, const M: usize>(
        w: &[u8],
        a: &Rows,
        cols: usize,
        out: &mut [f32],
    ) {
        unsafe { group_body::<F, M, true>(w, a, cols, out) }
    }

    /// The body of [`group`] and [`group_vnni`], inlined into each so that it is compiled with
    /// their target features.
    #[inline(always)]
    unsafe fn group_body<const F: u8, const M: usize, const VNNI: bool>(
        w: &[u8],
        a: &Rows,
        cols: usize,
        out: &mut [f32],
    ) {
        // Safety: as `block_sums`.
        let sums = unsafe { block_sums::<F, M, VNNI>(w, a, cols, 0) };
        out[..M].copy_from_slice(&sums);
    }

    /// The dot products of [`group_body`] over blocks `b0..` only.
    #[inline(always)]
    unsafe fn block_sums<const F: u8, const M: usize, const VNNI: bool>(
        w: &[u8],
        a: &Rows,
        cols: usize,
        b0: usize,
    ) -> [f32; M] {
        // Safety: the callers' target features cover every intrinsic; reads are bounded
        // by `entry`'s asserts.
        unsafe {
            let blocks = cols / 32;
            let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); M], [_mm256_setzero_ps(); M]);
            let (mut off0, mut off1) = ([0f32; M], [0f32; M]);
            let ones = _mm256_set1_epi16(1);
            let mask = _mm_set1_epi8(0x0F);
            let wp = w.as_ptr();
            macro_rules! block {
                ($b:expr, $acc:ident, $off:ident) => {{
                    let b = $b;
                    let p = wp.add(b * block_bytes::<F>());
                    let d = h2f(p);
                    // (unsigned weights, their signs for the activations, the block offset)
                    let (q, off) = block_quants::<F>(p, d, mask);
                    let (u, sign) = if signed_block::<F>() {
                        (_mm256_sign_epi8(q, q), Some(q))
                    } else {
                        (q, None)
                    };
                    for j in 0..M {
                        let x = _mm256_loadu_si256(a.q.as_ptr().add(j * cols + b * 32).cast());
                        let x = match sign {
                            Some(s) => _mm256_sign_epi8(x, s),
                            None => x,
                        };
                        let s = if VNNI {
                            _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x)
                        } else {
                            _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), ones)
                        };
                        let k = j * blocks + b;
                        let scale = _mm256_set1_ps(d * *a.scale.get_unchecked(k));
                        $acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, $acc[j]);
                        if !signed_block::<F>() {
                            $off[j] += off * *a.sum.get_unchecked(k);
                        }
                    }
                }};
            }
            let mut b = b0;
            while b + 1 < blocks {
                block!(b, acc0, off0);
                block!(b + 1, acc1, off1);
                b += 2;
            }
            if b < blocks {
                block!(b, acc0, off0);
            }
            std::array::from_fn(|j| hsum(_mm256_add_ps(acc0[j], acc1[j])) + (off0[j] + off1[j]))
        }
    }

    /// Two to eight activation rows against one weight row of a 32-value block format, eight
    /// blocks at a time with each 32-bit lane of the sums holding one block: the eight blocks'
    /// quants are transposed (an 8×8 transpose of 32-bit words) into the layout of
    /// [`Acts::q8t`], so that eight `vpdpbusd` of the activations (plus 128, unsigned)
    /// with them leave block `k`'s integer dot product in lane `k`. Less `128·Σq` per block
    /// (eight more `vpdpbusd`, once per weight row), converted once, it meets a vector of
    /// the eight blocks' `d_w·d_x` in one multiply-add, and the offsets' `off·d_x·Σq` in
    /// another: per row and eight blocks, 8 integer and 4 float operations, where
    /// [`group_body`] takes 8 and 32 (and Q8_0's 8 sign flips). The transpose is paid once
    /// per weight row, so one activation row keeps [`group_body`]. Blocks past the last whole
    /// eight go through [`block_sums`].
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    unsafe fn group_t<const F: u8>(w: &[u8], a: &Rows, cols: usize, out: &mut [f32]) {
        // Safety: reads are bounded by `each_group`'s asserts and `entry`'s `q8t` check.
        unsafe {
            let (blocks, m) = (cols / 32, out.len());
            let groups = blocks / 8;
            let ones = _mm256_set1_epi8(1);
            let mask = _mm_set1_epi8(0x0F);
            let mut acc = [_mm256_setzero_ps(); 8];
            for g in 0..groups {
                let mut q = [_mm256_setzero_si256(); 8];
                let (mut d, mut off) = ([0f32; 8], [0f32; 8]);
                for k in 0..8 {
                    let p = w.as_ptr().add((8 * g + k) * block_bytes::<F>());
                    d[k] = h2f(p);
                    (q[k], off[k]) = block_quants::<F>(p, d[k], mask);
                }
                let t = transpose8(q);
                let mut wsum = _mm256_setzero_si256();
                for ti in &t {
                    wsum = _mm256_dpbusd_epi32(wsum, ones, *ti);
                }
                let wsum = _mm256_slli_epi32::<7>(wsum);
                let (d, off) = (_mm256_loadu_ps(d.as_ptr()), _mm256_loadu_ps(off.as_ptr()));
                for (j, acc) in acc.iter_mut().enumerate().take(m) {
                    let xp = a.t.as_ptr().add(j * cols + 256 * g);
                    // Two chains of four, so that the adds of `vpdpbusd` overlap.
                    let (mut s, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                    for i in 0..4 {
                        let x = |i: usize| _mm256_loadu_si256(xp.add(32 * i).cast());
                        s = _mm256_dpbusd_epi32(s, x(2 * i), t[2 * i]);
                        s1 = _mm256_dpbusd_epi32(s1, x(2 * i + 1), t[2 * i + 1]);
                    }
                    let s = _mm256_add_epi32(s, s1);
                    let k = j * blocks + 8 * g;
                    let dx = _mm256_loadu_ps(a.scale.as_ptr().add(k));
                    let s = _mm256_cvtepi32_ps(_mm256_sub_epi32(s, wsum));
                    *acc = _mm256_fmadd_ps(s, _mm256_mul_ps(d, dx), *acc);
                    if !signed_block::<F>() {
                        *acc = _mm256_fmadd_ps(off, _mm256_loadu_ps(a.sum.as_ptr().add(k)), *acc);
                    }
                }
            }
            let mut tail = [0f32; 8];
            tail_sums::<F, true>(w, a, cols, groups * 8, &mut tail[..m]);
            for j in 0..m {
                out[j] = hsum(acc[j]) + tail[j];
            }
        }
    }

    /// [`group_t`] without VNNI: the same transposed layouts, so that each 32-bit lane of the
    /// sums holds one block and one float multiply-add scales eight blocks, where
    /// [`group_body`] converts and scales every block of every row. The activations come back
    /// to signed bytes (`q8t` holds them plus 128) and, as in [`group_body`], Q8_0's signed
    /// weights go through the sign trick (`|w|` × `x·sign(w)`, at most 2·128·127 per pair, so
    /// `vpmaddubsw` never saturates); the 4- and 5-bit quants are unsigned already. Per row
    /// and eight blocks: 8 loads, 8 flips, 8 `vpmaddubsw`, 8 `vpmaddwd`, 8 adds (Q8_0: 8 sign
    /// flips more) and 3 float operations; the weights' transpose is paid once per row of
    /// weights, so this serves two to eight activation rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group_t_avx2<const F: u8>(w: &[u8], a: &Rows, cols: usize, out: &mut [f32]) {
        // Safety: reads are bounded by `each_group`'s asserts and `entry`'s `q8t` check.
        unsafe {
            let (blocks, m) = (cols / 32, out.len());
            let groups = blocks / 8;
            let ones = _mm256_set1_epi16(1);
            let flip = _mm256_set1_epi8(-128);
            let mask = _mm_set1_epi8(0x0F);
            let mut acc = [_mm256_setzero_ps(); 8];
            for g in 0..groups {
                let mut q = [_mm256_setzero_si256(); 8];
                let (mut d, mut off) = ([0f32; 8], [0f32; 8]);
                for k in 0..8 {
                    let p = w.as_ptr().add((8 * g + k) * block_bytes::<F>());
                    d[k] = h2f(p);
                    (q[k], off[k]) = block_quants::<F>(p, d[k], mask);
                }
                let t = transpose8(q);
                let u: [__m256i; 8] = if signed_block::<F>() {
                    std::array::from_fn(|i| _mm256_sign_epi8(t[i], t[i]))
                } else {
                    t
                };
                let (d, off) = (_mm256_loadu_ps(d.as_ptr()), _mm256_loadu_ps(off.as_ptr()));
                for (j, acc) in acc.iter_mut().enumerate().take(m) {
                    let xp = a.t.as_ptr().add(j * cols + 256 * g);
                    let x = |i: usize| {
                        let x = _mm256_xor_si256(_mm256_loadu_si256(xp.add(32 * i).cast()), flip);
                        if signed_block::<F>() {
                            _mm256_sign_epi8(x, t[i])
                        } else {
                            x
                        }
                    };
                    let dot = |i: usize| _mm256_madd_epi16(_mm256_maddubs_epi16(u[i], x(i)), ones);
                    // Two chains of four, so that the adds overlap.
                    let (mut s0, mut s1) = (dot(0), dot(1));
                    for i in 1..4 {
                        s0 = _mm256_add_epi32(s0, dot(2 * i));
                        s1 = _mm256_add_epi32(s1, dot(2 * i + 1));
                    }
                    let k = j * blocks + 8 * g;
                    let dx = _mm256_loadu_ps(a.scale.as_ptr().add(k));
                    let s = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
                    *acc = _mm256_fmadd_ps(s, _mm256_mul_ps(d, dx), *acc);
                    if !signed_block::<F>() {
                        *acc = _mm256_fmadd_ps(off, _mm256_loadu_ps(a.sum.as_ptr().add(k)), *acc);
                    }
                }
            }
            let mut tail = [0f32; 8];
            tail_sums::<F, false>(w, a, cols, groups * 8, &mut tail[..m]);
            for j in 0..m {
                out[j] = hsum(acc[j]) + tail[j];
            }
        }
    }

    /// [`group_t`] for more than eight activation rows (at most [`KT_MAX_ROWS`]) against `R`
    /// weight rows (`w`, one after the other): the transpose is paid once for all `m` rows,
    /// and each activation load serves `R` weight rows (at one, the loads from L2 bound it).
    /// `packed_matmul`, 5632×2048 at 64 rows: Q8_0 5.6–6.4 → 4.1–4.2 ms, Q4_1 6.2 → 4.4–4.6,
    /// Q5_0 6.8 → 4.8–5.2; at two to four rows [`group_t`], whose sums stay in registers, is
    /// ~20% faster. `out[r * KT_MAX_ROWS + j]` gets weight row `r` times activation row `j`.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    unsafe fn group_tp<const F: u8, const R: usize>(
        w: &[u8],
        a: &Rows,
        cols: usize,
        m: usize,
        out: &mut [f32; 2 * KT_MAX_ROWS],
    ) {
        // Safety: reads are bounded by `each_pair`'s asserts.
        unsafe {
            let (blocks, rb) = (cols / 32, w.len() / R);
            let groups = blocks / 8;
            let ones = _mm256_set1_epi8(1);
            let mask = _mm_set1_epi8(0x0F);
            let mut acc = [[_mm256_setzero_ps(); KT_MAX_ROWS]; R];
            for g in 0..groups {
                let mut t = [[_mm256_setzero_si256(); 8]; R];
                let mut ws = [_mm256_setzero_si256(); R];
                let (mut d, mut off) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
                for r in 0..R {
                    let mut q = [_mm256_setzero_si256(); 8];
                    let (mut dr, mut offr) = ([0f32; 8], [0f32; 8]);
                    for k in 0..8 {
                        let p = w.as_ptr().add(r * rb + (8 * g + k) * block_bytes::<F>());
                        dr[k] = h2f(p);
                        (q[k], offr[k]) = block_quants::<F>(p, dr[k], mask);
                    }
                    t[r] = transpose8(q);
                    for ti in &t[r] {
                        ws[r] = _mm256_dpbusd_epi32(ws[r], ones, *ti);
                    }
                    ws[r] = _mm256_slli_epi32::<7>(ws[r]);
                    d[r] = _mm256_loadu_ps(dr.as_ptr());
                    off[r] = _mm256_loadu_ps(offr.as_ptr());
                }
                for j in 0..m {
                    let xp = a.t.as_ptr().add(j * cols + 256 * g);
                    let x: [__m256i; 8] =
                        std::array::from_fn(|i| _mm256_loadu_si256(xp.add(32 * i).cast()));
                    let k = j * blocks + 8 * g;
                    let dx = _mm256_loadu_ps(a.scale.as_ptr().add(k));
                    for r in 0..R {
                        // Two chains of four, so that the adds of `vpdpbusd` overlap.
                        let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                        for i in 0..4 {
                            s0 = _mm256_dpbusd_epi32(s0, x[2 * i], t[r][2 * i]);
                            s1 = _mm256_dpbusd_epi32(s1, x[2 * i + 1], t[r][2 * i + 1]);
                        }
                        let s = _mm256_sub_epi32(_mm256_add_epi32(s0, s1), ws[r]);
                        let acc = &mut acc[r][j];
                        *acc =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d[r], dx), *acc);
                        if !signed_block::<F>() {
                            let sum = _mm256_loadu_ps(a.sum.as_ptr().add(k));
                            *acc = _mm256_fmadd_ps(off[r], sum, *acc);
                        }
                    }
                }
            }
            for r in 0..R {
                let mut tail = [0f32; KT_MAX_ROWS];
                tail_sums::<F, true>(
                    &w[r * rb..(r + 1) * rb],
                    a,
                    cols,
                    groups * 8,
                    &mut tail[..m],
                );
                for j in 0..m {
                    out[r * KT_MAX_ROWS + j] = hsum(acc[r][j]) + tail[j];
                }
            }
        }
    }

    /// The blocks of one weight row from block `b0` on (those after the last whole eight of
    /// [`group_t`] and [`group_tp`]) against `tail.len()` activation rows, by [`block_sums`]
    /// four rows at a time, into `tail` (zeros where there are none).
    #[inline(always)]
    unsafe fn tail_sums<const F: u8, const VNNI: bool>(
        w: &[u8],
        a: &Rows,
        cols: usize,
        b0: usize,
        tail: &mut [f32],
    ) {
        // Safety: the callers' target features cover `block_sums`; reads are bounded by
        // their callers' asserts.
        unsafe {
            let blocks = cols / 32;
            let m = tail.len();
            let mut j = 0;
            while b0 < blocks && j < m {
                let rows = Rows {
                    q: &a.q[j * cols..],
                    t: &[],
                    scale: &a.scale[j * blocks..],
                    sum: &a.sum[j * blocks..],
                    sum16: &[],
                };
                let n = (m - j).min(4);
                let dst = &mut tail[j..j + n];
                match n {
                    4 => dst.copy_from_slice(&block_sums::<F, 4, VNNI>(w, &rows, cols, b0)),
                    3 => dst.copy_from_slice(&block_sums::<F, 3, VNNI>(w, &rows, cols, b0)),
                    2 => dst.copy_from_slice(&block_sums::<F, 2, VNNI>(w, &rows, cols, b0)),
                    _ => dst.copy_from_slice(&block_sums::<F, 1, VNNI>(w, &rows, cols, b0)),
                }
                j += n;
            }
        }
    }

    /// One activation row against one weight row of a 32-value block format, eight blocks at
    /// a time: eight `vpdpbusd` (AVX2: `vpmaddubsw` and `vpmaddwd`) into separate sums,
    /// reduced by `vphaddd` to one vector whose lane `k` is block `k`'s integer dot product;
    /// the eight blocks' scales (and Q4_1/Q5_1 mins) come in by one gather and one
    /// conversion, so one multiply-add scales eight blocks where [`block_sums`] takes a
    /// conversion, a broadcast and two multiply-adds per block.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group_h<const F: u8>(w: &[u8], a: &Rows, cols: usize, out: &mut [f32]) {
        unsafe { group_h_body::<F, false>(w, a, cols, out) }
    }

    /// [`group_h`] with `vpdpbusd`.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    unsafe fn group_h_vnni<const F: u8>(w: &[u8], a: &Rows, cols: usize, out: &mut [f32]) {
        unsafe { group_h_body::<F, true>(w, a, cols, out) }
    }

    /// The body of [`group_h`] and [`group_h_vnni`].
    #[inline(always)]
    unsafe fn group_h_body<const F: u8, const VNNI: bool>(
        w: &[u8],
        a: &Rows,
        cols: usize,
        out: &mut [f32],
    ) {
        // Safety: reads are bounded by `each_group`'s asserts (the gather reads the first four
        // bytes of each of eight whole blocks); the callers' target features cover the rest.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let dot = |u, x| {
                if VNNI {
                    _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x)
                } else {
                    _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), ones)
                }
            };
            let blocks = cols / 32;
            let groups = blocks / 8;
            let mask = _mm_set1_epi8(0x0F);
            let bb = block_bytes::<F>() as i32;
            let index = _mm256_setr_epi32(0, bb, 2 * bb, 3 * bb, 4 * bb, 5 * bb, 6 * bb, 7 * bb);
            // Bytes 0,1 (the f16 `d`) and 2,3 (Q4_1/Q5_1's f16 min) of each 32-bit lane.
            let lo16 = _mm256_setr_epi8(
                0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 4, 5, 8, 9, 12, 13,
                -1, -1, -1, -1, -1, -1, -1, -1,
            );
            let hi16 = _mm256_add_epi8(lo16, _mm256_set1_epi8(2));
            let halves = |v: __m256i, sel: __m256i| {
                let v = _mm256_permute4x64_epi64::<0b1000>(_mm256_shuffle_epi8(v, sel));
                _mm256_cvtph_ps(_mm256_castsi256_si128(v))
            };
            let mut acc = _mm256_setzero_ps();
            for g in 0..groups {
                let p0 = w.as_ptr().add(8 * g * block_bytes::<F>());
                let heads = _mm256_i32gather_epi32::<1>(p0.cast(), index);
                let d = halves(heads, lo16);
                let mut sums = [_mm256_setzero_si256(); 8];
                for (k, sum) in sums.iter_mut().enumerate() {
                    let p = p0.add(k * block_bytes::<F>());
                    let x = _mm256_loadu_si256(a.q.as_ptr().add((8 * g + k) * 32).cast());
                    let (q, _) = block_quants::<F>(p, 0.0, mask);
                    *sum = if signed_block::<F>() {
                        dot(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q))
                    } else {
                        dot(q, x)
                    };
                }
                let h01 = _mm256_hadd_epi32(sums[0], sums[1]);
                let h23 = _mm256_hadd_epi32(sums[2], sums[3]);
                let h45 = _mm256_hadd_epi32(sums[4], sums[5]);
                let h67 = _mm256_hadd_epi32(sums[6], sums[7]);
                let q0 = _mm256_hadd_epi32(h01, h23);
                let q1 = _mm256_hadd_epi32(h45, h67);
                let r = _mm256_add_epi32(
                    _mm256_permute2x128_si256::<0x20>(q0, q1),
                    _mm256_permute2x128_si256::<0x31>(q0, q1),
                );
                let dx = _mm256_loadu_ps(a.scale.as_ptr().add(8 * g));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(r), _mm256_mul_ps(d, dx), acc);
                if !signed_block::<F>() {
                    let off = match F {
                        Q4_0 => _mm256_mul_ps(d, _mm256_set1_ps(-8.0)),
                        Q5_0 => _mm256_mul_ps(d, _mm256_set1_ps(-16.0)),
                        _ => halves(heads, hi16),
                    };
                    acc = _mm256_fmadd_ps(off, _mm256_loadu_ps(a.sum.as_ptr().add(8 * g)), acc);
                }
            }
            let tail = if groups * 8 < blocks {
                block_sums::<F, 1, VNNI>(w, a, cols, groups * 8)[0]
            } else {
                0.0
            };
            out[0] = hsum(acc) + tail;
        }
    }

    /// The 32 quants of the block at `p` as signed bytes (Q8_0 as stored; IQ4_NL's levels,
    /// one `vpshufb` per 16; the 4- and 5-bit formats 0..31) and the block's offset (`−8·d`,
    /// `−16·d`, its min, or none).
    #[inline(always)]
    unsafe fn block_quants<const F: u8>(p: *const u8, d: f32, mask: __m128i) -> (__m256i, f32) {
        unsafe {
            if F == Q8_0 {
                return (_mm256_loadu_si256(p.add(2).cast()), 0.0);
            }
            if F == IQ4_NL {
                return (iq4_levels(p.add(2)), 0.0);
            }
            let (off, at, qh) = match F {
                Q4_0 => (-8.0 * d, 2, None),
                Q5_0 => (-16.0 * d, 6, Some(2)),
                Q5_1 => (h2f(p.add(2)), 8, Some(4)),
                _ => (h2f(p.add(2)), 4, None),
            };
            let qs = _mm_loadu_si128(p.add(at).cast());
            let lo = _mm_and_si128(qs, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
            let u = _mm256_set_m128i(hi, lo);
            let u = match qh {
                Some(h) => _mm256_or_si256(u, fifth_bits(p.add(h))),
                None => u,
            };
            (u, off)
        }
    }

    /// 16 in byte `v` where bit `v` of the 32-bit mask at `p` is set (ggml's
    /// `bytes_from_bits_32`): the 5-bit formats' fifth bits.
    #[inline(always)]
    unsafe fn fifth_bits(p: *const u8) -> __m256i {
        unsafe {
            let bits = p.cast::<i32>().read_unaligned();
            let shuf = _mm256_setr_epi64x(
                0,
                0x0101_0101_0101_0101,
                0x0202_0202_0202_0202,
                0x0303_0303_0303_0303,
            );
            let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits), shuf);
            let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
            let set = _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
            _mm256_and_si256(set, _mm256_set1_epi8(16))
        }
    }

    /// The 8×8 transpose of 32-bit words: word `k` of output `i` is word `i` of input `k`.
    #[inline(always)]
    unsafe fn transpose8(r: [__m256i; 8]) -> [__m256i; 8] {
        unsafe {
            let a: [__m256i; 8] = std::array::from_fn(|n| {
                let (x, y) = (r[n / 2 * 2], r[n / 2 * 2 + 1]);
                if n % 2 == 0 {
                    _mm256_unpacklo_epi32(x, y)
                } else {
                    _mm256_unpackhi_epi32(x, y)
                }
            });
            // b[0..4]: words 0 / 1 / 2 / 3 (| 4 / 5 / 6 / 7) of inputs 0..4; b[4..8] of 4..8.
            let b: [__m256i; 8] = std::array::from_fn(|n| {
                let (h, i) = (n / 4, n % 4);
                let (x, y) = (a[4 * h + i / 2], a[4 * h + 2 + i / 2]);
                if i % 2 == 0 {
                    _mm256_unpacklo_epi64(x, y)
                } else {
                    _mm256_unpackhi_epi64(x, y)
                }
            });
            std::array::from_fn(|i| {
                if i < 4 {
                    _mm256_permute2x128_si256::<0x20>(b[i], b[4 + i])
                } else {
                    _mm256_permute2x128_si256::<0x31>(b[i - 4], b[i])
                }
            })
        }
    }

    /// [`super::quantize`] eight lanes at a time (ggml's `quantize_row_q8_0` AVX2 loop, with
    /// the scale kept in f32), `chunks` 32-value chunks per scale.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize(x: &[f32], acts: &mut Acts, blocks: usize, chunks: usize) {
        const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        let sign = _mm256_set1_ps(-0.0);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        assert!(x.len() >= blocks * chunks * 32 && acts.q8.len() >= blocks * chunks * 32);
        assert!(acts.q8_scale.len() >= blocks && acts.q8_sum.len() >= blocks * chunks);
        let abs = |v| _mm256_andnot_ps(sign, v);
        for b in 0..blocks {
            unsafe {
                let p = x.as_ptr().add(b * chunks * 32);
                let mut m = _mm256_setzero_ps();
                for k in 0..chunks * 4 {
                    m = _mm256_max_ps(m, abs(_mm256_loadu_ps(p.add(8 * k))));
                }
                let d = hmax(m) / 127.0;
                let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
                for c in 0..chunks {
                    let p = p.add(32 * c);
                    let v = [
                        _mm256_loadu_ps(p),
                        _mm256_loadu_ps(p.add(8)),
                        _mm256_loadu_ps(p.add(16)),
                        _mm256_loadu_ps(p.add(24)),
                    ];
                    let q = v.map(|v| {
                        _mm256_cvtps_epi32(_mm256_round_ps::<NEAREST>(_mm256_mul_ps(v, id)))
                    });
                    let total = _mm256_add_epi32(
                        _mm256_add_epi32(q[0], q[1]),
                        _mm256_add_epi32(q[2], q[3]),
                    );
                    let total = hsum(_mm256_cvtepi32_ps(total));
                    // packs works per 128-bit lane; the permutation puts the values back in order.
                    let q16 = [
                        _mm256_packs_epi32(q[0], q[1]),
                        _mm256_packs_epi32(q[2], q[3]),
                    ];
                    let q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16[0], q16[1]), order);
                    let at = b * chunks + c;
                    _mm256_storeu_si256(acts.q8.as_mut_ptr().add(at * 32).cast(), q8);
                    *acts.q8_sum.get_unchecked_mut(at) = d * total;
                }
                *acts.q8_scale.get_unchecked_mut(b) = d;
            }
        }
    }
}
