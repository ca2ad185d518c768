//! AVX2 + FMA + F16C dot products over packed rows, chosen at run time.
//!
//! Each 32-value block is dequantised into four 8-lane registers exactly as ggml dequantises
//! it, then multiplied into four independent accumulators per activation row (so FMA latency
//! overlaps across blocks). Activation rows go through in groups of up to four, so a weight
//! block is loaded and unpacked once per group. The K-quants ([`group_k`]) go 32 values (one
//! sub-block) at a time, as the 4-bit formats do.

use super::PackedFormat;
use super::kernels::{Acts, DotKernel};

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Whether this CPU has AVX2, FMA and F16C (checked once).
#[cfg(target_arch = "x86_64")]
pub(super) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::env::var_os("KILN_NO_AVX2").is_none()
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

const F32: u8 = 0;
const F16: u8 = 1;
const BF16: u8 = 2;
const Q8_0: u8 = 3;
const Q4_0: u8 = 4;
const Q4_1: u8 = 5;
const Q4_K: u8 = 6;
const Q5_K: u8 = 7;
const Q6_K: u8 = 8;
const Q5_0: u8 = 9;
const Q5_1: u8 = 10;
const Q3_K: u8 = 11;
const IQ4_XS: u8 = 12;
const Q2_K: u8 = 13;
const IQ4_NL: u8 = 14;

/// The AVX2 kernel for `format`. Only call after [`available`] returned true.
#[cfg(target_arch = "x86_64")]
pub(super) fn dot_kernel(format: PackedFormat) -> DotKernel {
    if super::int8::vnni() {
        match format {
            PackedFormat::Q4_0 => return entry::<Q4_0, true>,
            PackedFormat::Q4_1 => return entry::<Q4_1, true>,
            PackedFormat::Q5_0 => return entry::<Q5_0, true>,
            PackedFormat::Q5_1 => return entry::<Q5_1, true>,
            PackedFormat::Q4_K => return entry::<Q4_K, true>,
            PackedFormat::Q5_K => return entry::<Q5_K, true>,
            PackedFormat::Q6_K => return entry::<Q6_K, true>,
            PackedFormat::Q3_K => return entry::<Q3_K, true>,
            PackedFormat::IQ4_XS => return entry::<IQ4_XS, true>,
            PackedFormat::Q2_K => return entry::<Q2_K, true>,
            PackedFormat::IQ4_NL => return entry::<IQ4_NL, true>,
            _ => {}
        }
    }
    dot_kernel_avx2(format)
}

/// [`dot_kernel`] without AVX512-VNNI (the tests check both).
#[cfg(target_arch = "x86_64")]
pub(super) fn dot_kernel_avx2(format: PackedFormat) -> DotKernel {
    match format {
        PackedFormat::F32 => entry::<F32, false>,
        PackedFormat::F16 => entry::<F16, false>,
        PackedFormat::BF16 => entry::<BF16, false>,
        PackedFormat::Q8_0 => entry::<Q8_0, false>,
        PackedFormat::Q4_0 => entry::<Q4_0, false>,
        PackedFormat::Q4_1 => entry::<Q4_1, false>,
        PackedFormat::Q5_0 => entry::<Q5_0, false>,
        PackedFormat::Q5_1 => entry::<Q5_1, false>,
        PackedFormat::Q4_K => entry::<Q4_K, false>,
        PackedFormat::Q5_K => entry::<Q5_K, false>,
        PackedFormat::Q6_K => entry::<Q6_K, false>,
        PackedFormat::Q3_K => entry::<Q3_K, false>,
        PackedFormat::IQ4_XS => entry::<IQ4_XS, false>,
        PackedFormat::Q2_K => entry::<Q2_K, false>,
        PackedFormat::IQ4_NL => entry::<IQ4_NL, false>,
    }
}

#[cfg(target_arch = "x86_64")]
fn entry<const F: u8, const DP: bool>(
    format: PackedFormat,
    w: &[u8],
    acts: &Acts,
    out: &mut [f32],
) {
    let (cols, m) = (acts.cols, acts.m);
    assert!(m > 0 && out.len().is_multiple_of(m));
    assert_eq!(w.len(), out.len() / m * format.row_bytes(cols));
    assert!(acts.x.len() >= m * cols);
    if matches!(
        F,
        Q4_0 | Q4_1 | Q5_0 | Q5_1 | IQ4_NL | Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | IQ4_XS
    ) {
        let group = super::kernels::scale_group(format);
        assert!(acts.sum.len() >= m * (cols / 32) && acts.scale.len() >= m * (cols / group));
        assert!(acts.q16.len() >= m * cols && acts.q16_lo.len() >= m * cols);
        if F == Q2_K {
            assert!(acts.sum16.len() >= m * (cols / 16));
        }
    }
    // Safety: `dot_kernel` is only handed out when `available()`; the asserts above bound every
    // read (w is `out.len() / m` whole rows; x, q16, sum and scale hold `m` rows).
    // With `DP`, `dot_kernel` checked AVX512-VNNI too.
    unsafe { weight_rows::<F, DP>(format, w, acts, out) }
}

/// Every weight row of `w` against every activation row. With three or more activation rows,
/// the float formats take weight rows in pairs ([`pair`]): each activation load then feeds two
/// FMAs. Measured with `bench/packed_matmul.rs` on 32768×1024 (bench/README.md):
/// f32 at 8 rows went from 12.3–13.0 to 9.2–9.8 ms; at 2 rows pairs were slower (5.6 → 6.4
/// ms, the product is still memory-bound there), so one and two rows keep [`dot_rows`]. Q8_0
/// in pairs, dequantising eight values at a time, was slower than [`group_q8`] (which scales
/// once per block): 8.4–12.6 against 7.5–9.1 ms at 8 rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weight_rows<const F: u8, const DP: bool>(
    format: PackedFormat,
    w: &[u8],
    acts: &Acts,
    out: &mut [f32],
) {
    let (cols, m) = (acts.cols, acts.m);
    let rb = format.row_bytes(cols);
    let n = out.len() / m;
    let mut r = 0;
    if matches!(F, F32 | F16 | BF16) && m >= 3 {
        while r + 2 <= n {
            let (o0, o1) = out[r * m..(r + 2) * m].split_at_mut(m);
            let (w0, w1) = (&w[r * rb..], &w[(r + 1) * rb..]);
            let mut j = 0;
            while j < m {
                let k = (m - j).min(4);
                let x = &acts.x[j * cols..];
                let (a, b) = (&mut o0[j..j + k], &mut o1[j..j + k]);
                unsafe {
                    match k {
                        4 => pair::<F, 4, 1>(w0, w1, rb, x, cols, a, b),
                        3 => pair::<F, 3, 1>(w0, w1, rb, x, cols, a, b),
                        2 => pair::<F, 2, 2>(w0, w1, rb, x, cols, a, b),
                        _ => pair::<F, 1, 2>(w0, w1, rb, x, cols, a, b),
                    }
                }
                j += k;
            }
            r += 2;
        }
    }
    while r < n {
        let (wr, o) = (&w[r * rb..(r + 1) * rb], &mut out[r * m..(r + 1) * m]);
        unsafe {
            if DP {
                dot_rows_vnni::<F>(format, wr, acts, o)
            } else {
                dot_rows::<F>(format, wr, acts, o)
            }
        };
        r += 1;
    }
}

/// Two weight rows of a float format against `M` activation rows (row stride `cols`), eight
/// values at a time: each activation vector is loaded once for both weight rows. `S`
/// sets of accumulators (2 for one or two activation rows) keep at least four FMA chains in
/// flight. The last `cols % 8` values (float formats only) go one by one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn pair<const F: u8, const M: usize, const S: usize>(
    w0: &[u8],
    w1: &[u8],
    rb: usize,
    x: &[f32],
    cols: usize,
    out0: &mut [f32],
    out1: &mut [f32],
) {
    let width = if F == F32 { 4 } else { 2 };
    assert!(w0.len() >= cols * width && w1.len() >= cols * width);
    assert!(x.len() >= (M - 1) * cols + cols && out0.len() == M && out1.len() == M);
    let mut acc0 = [[_mm256_setzero_ps(); M]; S];
    let mut acc1 = [[_mm256_setzero_ps(); M]; S];
    let (p0, p1, xp) = (w0.as_ptr(), w1.as_ptr(), x.as_ptr());
    let chunks = cols / 8;
    let mut c = 0;
    unsafe {
        while c + S <= chunks {
            // The next pair of rows, one pair ahead: on DRAM-resident weights the hardware
            // prefetcher alone left the FMAs waiting (see `weight_rows`).
            let ahead = 2 * rb + c * 8 * width;
            _mm_prefetch::<_MM_HINT_T0>(p0.wrapping_add(ahead).cast());
            _mm_prefetch::<_MM_HINT_T0>(p1.wrapping_add(ahead).cast());
            for s in 0..S {
                let k = (c + s) * 8;
                let (a, b) = (load8::<F>(p0, k), load8::<F>(p1, k));
                for j in 0..M {
                    let xv = _mm256_loadu_ps(xp.add(j * cols + k));
                    acc0[s][j] = _mm256_fmadd_ps(a, xv, acc0[s][j]);
                    acc1[s][j] = _mm256_fmadd_ps(b, xv, acc1[s][j]);
                }
            }
            c += S;
        }
        while c < chunks {
            let k = c * 8;
            let (a, b) = (load8::<F>(p0, k), load8::<F>(p1, k));
            for j in 0..M {
                let xv = _mm256_loadu_ps(xp.add(j * cols + k));
                acc0[0][j] = _mm256_fmadd_ps(a, xv, acc0[0][j]);
                acc1[0][j] = _mm256_fmadd_ps(b, xv, acc1[0][j]);
            }
            c += 1;
        }
    }
    let done = chunks * 8;
    let mut t0 = [0f32; 8];
    let mut t1 = [0f32; 8];
    let format = match F {
        F32 => PackedFormat::F32,
        F16 => PackedFormat::F16,
        _ => PackedFormat::BF16,
    };
    if done < cols {
        super::kernels::dequantize_row_scalar(
            format,
            &w0[done * width..cols * width],
            &mut t0[..cols - done],
        );
        super::kernels::dequantize_row_scalar(
            format,
            &w1[done * width..cols * width],
            &mut t1[..cols - done],
        );
    }
    for j in 0..M {
        let (mut s0, mut s1) = (acc0[0][j], acc1[0][j]);
        for s in 1..S {
            s0 = _mm256_add_ps(s0, acc0[s][j]);
            s1 = _mm256_add_ps(s1, acc1[s][j]);
        }
        let xr = &x[j * cols + done..j * cols + cols];
        out0[j] = hsum(s0) + t0.iter().zip(xr).map(|(a, b)| a * b).sum::<f32>();
        out1[j] = hsum(s1) + t1.iter().zip(xr).map(|(a, b)| a * b).sum::<f32>();
    }
}

/// Eight values of a float format starting at value `k` of the row at `p`, as f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8<const F: u8>(p: *const u8, k: usize) -> __m256 {
    unsafe {
        match F {
            F32 => _mm256_loadu_ps(p.cast::<f32>().add(k)),
            F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * k).cast())),
            _ => bf16x8(p.add(2 * k)),
        }
    }
}

/// Bytes of one 32-value block (of one 256-value super-block for the K-quants).
const fn block_bytes<const F: u8>() -> usize {
    match F {
        F32 => 128,
        F16 | BF16 => 64,
        Q8_0 => 34,
        Q4_0 | IQ4_NL => 18,
        Q5_0 => 22,
        Q5_1 => 24,
        Q4_K => 144,
        Q5_K => 176,
        Q6_K => 210,
        Q3_K => 110,
        IQ4_XS => 136,
        Q2_K => 84,
        _ => 20,
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows<const F: u8>(format: PackedFormat, w: &[u8], acts: &Acts, out: &mut [f32]) {
    unsafe { dot_rows_body::<F, false>(format, w, acts, out) }
}

/// [`dot_rows`] with AVX512-VNNI's `vpdpwssd` in the 4-bit and K-quant kernels: one
/// instruction for each `vpmaddwd` and the add after it (the same integers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn dot_rows_vnni<const F: u8>(format: PackedFormat, w: &[u8], acts: &Acts, out: &mut [f32]) {
    unsafe { dot_rows_body::<F, true>(format, w, acts, out) }
}

/// `acc + Σ` of `vpmaddwd(a, b)`'s pairs: `vpdpwssd` with `DP` (AVX512-VNNI), else
/// `vpmaddwd` and an add. Only inline it into functions with those features.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn madd_add<const DP: bool>(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    unsafe {
        if DP {
            _mm256_dpwssd_epi32(acc, a, b)
        } else {
            _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
        }
    }
}

/// The i32 pair sums of 32 i16 weights (`w0` values 0..16 of the block, `w1` 16..32, in
/// the activations' order) times the 32 i16 activations at `x`. Only inline it into functions
/// with [`madd_add`]'s features.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot32<const DP: bool>(w0: __m256i, w1: __m256i, x: *const i16) -> __m256i {
    // Safety: the caller's target features cover it; `x` holds 32 values.
    unsafe {
        let a = _mm256_madd_epi16(w0, _mm256_loadu_si256(x.cast()));
        madd_add::<DP>(a, w1, _mm256_loadu_si256(x.add(16).cast()))
    }
}

/// The body of [`dot_rows`] and [`dot_rows_vnni`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_rows_body<const F: u8, const DP: bool>(
    format: PackedFormat,
    w: &[u8],
    acts: &Acts,
    out: &mut [f32],
) {
    let (x, cols) = (acts.x, acts.cols);
    let m = out.len();
    debug_assert_eq!(m, acts.m);
    let blocks = cols / 32;
    let mut j = 0;
    while j < m {
        let n = (m - j).min(4);
        let xs = &x[j * cols..];
        let o = &mut out[j..j + n];
        unsafe {
            if matches!(
                F,
                Q4_0 | Q4_1 | Q5_0 | Q5_1 | IQ4_NL | Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | IQ4_XS
            ) {
                let q = Q16 {
                    q: &acts.q16[j * cols..],
                    lo: &acts.q16_lo[j * cols..],
                    sum: &acts.sum[j * blocks..],
                    sum16: acts.sum16.get(j * cols / 16..).unwrap_or_default(),
                    scale: &acts.scale[j * (cols / super::kernels::scale_group(format))..],
                };
                if matches!(F, Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | IQ4_XS) {
                    match n {
                        4 => group_k::<F, 4, DP>(w, &q, cols, o),
                        3 => group_k::<F, 3, DP>(w, &q, cols, o),
                        2 => group_k::<F, 2, DP>(w, &q, cols, o),
                        _ => group_k::<F, 1, DP>(w, &q, cols, o),
                    }
                } else {
                    match n {
                        4 => group_q4::<F, 4, DP>(w, &q, cols, o),
                        3 => group_q4::<F, 3, DP>(w, &q, cols, o),
                        2 => group_q4::<F, 2, DP>(w, &q, cols, o),
                        _ => group_q4::<F, 1, DP>(w, &q, cols, o),
                    }
                }
            } else if F == Q8_0 {
                match n {
                    4 => group_q8::<4>(w, xs, cols, o),
                    3 => group_q8::<3>(w, xs, cols, o),
                    2 => group_q8::<2>(w, xs, cols, o),
                    _ => group_q8::<1>(w, xs, cols, o),
                }
            } else {
                match n {
                    4 => group::<F, 4>(w, xs, cols, o),
                    3 => group::<F, 3>(w, xs, cols, o),
                    2 => group::<F, 2>(w, xs, cols, o),
                    _ => group::<F, 1>(w, xs, cols, o),
                }
            }
        }
        j += n;
    }
    // Float formats allow any width: the last `cols % 32` values go one by one.
    let done = cols / 32 * 32;
    if done < cols {
        // Only the tail's bytes, on the stack: this runs for every row of the matrix.
        let width = format.row_bytes(1);
        let mut tail = [0f32; 31];
        let tail = &mut tail[..cols - done];
        super::kernels::dequantize_row(format, &w[done * width..], tail);
        for (j, y) in out.iter_mut().enumerate() {
            let xr = &x[j * cols + done..(j + 1) * cols];
            *y += tail.iter().zip(xr).map(|(a, b)| a * b).sum::<f32>();
        }
    }
}

/// [`Acts::new`]'s split of 4-bit activations into two i16 parts, eight lanes at a time (the
/// scalar loop, with `roundf` calls, was a twentieth of a SmolLM2 Q4_1 decode step, serial on
/// the calling thread while the kernel threads waited). One scale per `group` values (32, or
/// 256 for the K-quants); one exact sum per 32; with `even_odd`, each 32 values stored even
/// ones first ([`Acts::q16`]). Rounds half to even: `hi + lo/65536` holds the value to half
/// a step of `lo`. `x` holds whole groups; the `acts` buffers are sized for them.
#[cfg(target_arch = "x86_64")]
pub(super) fn split_i16(x: &[f32], acts: &mut Acts, group: usize, even_odd: bool) {
    assert!(group == 32 || group == 256);
    let groups = x.len() / group;
    assert_eq!(x.len(), groups * group);
    assert!(acts.sum.len() >= x.len() / 32 && acts.scale.len() >= groups);
    assert!(acts.q16.len() >= x.len() && acts.q16_lo.len() >= x.len());
    // Safety: only called when `available()`; the asserts bound every access.
    unsafe { split_i16_avx2(x, acts, group, even_odd) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn split_i16_avx2(x: &[f32], acts: &mut Acts, group: usize, even_odd: bool) {
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let sign = _mm256_set1_ps(-0.0);
    let (lim, neg) = (_mm256_set1_ps(32767.0), _mm256_set1_ps(-32767.0));
    let k16 = _mm256_set1_ps(65536.0);
    let abs = |v| _mm256_andnot_ps(sign, v);
    for (g, xs) in x.chunks_exact(group).enumerate() {
        unsafe {
            let mut amax = _mm256_setzero_ps();
            for v in xs.chunks_exact(8) {
                amax = _mm256_max_ps(amax, abs(_mm256_loadu_ps(v.as_ptr())));
            }
            let scale = hmax(amax) / 32767.0;
            *acts.scale.get_unchecked_mut(g) = scale;
            let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            for (i, block) in xs.chunks_exact(32).enumerate() {
                let b = g * group / 32 + i;
                let p = block.as_ptr();
                let v = [
                    _mm256_loadu_ps(p),
                    _mm256_loadu_ps(p.add(8)),
                    _mm256_loadu_ps(p.add(16)),
                    _mm256_loadu_ps(p.add(24)),
                ];
                let sum = _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3]));
                *acts.sum.get_unchecked_mut(b) = hsum(sum);
                let mut hi = [_mm256_setzero_si256(); 4];
                let mut lo = [_mm256_setzero_si256(); 4];
                for i in 0..4 {
                    let t = _mm256_mul_ps(v[i], inv);
                    let h = _mm256_max_ps(_mm256_min_ps(_mm256_round_ps::<NEAREST>(t), lim), neg);
                    let r = _mm256_round_ps::<NEAREST>(_mm256_mul_ps(_mm256_sub_ps(t, h), k16));
                    let l = _mm256_max_ps(_mm256_min_ps(r, lim), neg);
                    hi[i] = _mm256_cvtps_epi32(h);
                    lo[i] = _mm256_cvtps_epi32(l);
                }
                // packs works per 128-bit lane: [a0..3 b0..3 a4..7 b4..7] → reorder the quarters.
                let pack =
                    |a, b| _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(a, b));
                // Values 0..16 and 16..32 as i16; or even values and odd ones (the i32 words
                // of i16 pairs, low halves sign-extended, then the high ones).
                let halves = |v: [__m256i; 4]| {
                    let (a, b) = (pack(v[0], v[1]), pack(v[2], v[3]));
                    if !even_odd {
                        return (a, b);
                    }
                    let low = |v| _mm256_srai_epi32::<16>(_mm256_slli_epi32::<16>(v));
                    let high = |v| _mm256_srai_epi32::<16>(v);
                    (pack(low(a), low(b)), pack(high(a), high(b)))
                };
                let q = acts.q16.as_mut_ptr().add(b * 32);
                let ql = acts.q16_lo.as_mut_ptr().add(b * 32);
                let (h0, h1) = halves(hi);
                let (l0, l1) = halves(lo);
                _mm256_storeu_si256(q.cast(), h0);
                _mm256_storeu_si256(q.add(16).cast(), h1);
                _mm256_storeu_si256(ql.cast(), l0);
                _mm256_storeu_si256(ql.add(16).cast(), l1);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn hmax(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// The i16 activations of a group of rows (see [`Acts::new`]).
struct Q16<'a> {
    q: &'a [i16],
    lo: &'a [i16],
    sum: &'a [f32],
    sum16: &'a [f32],
    scale: &'a [f32],
}

/// `M` rows of i16 activations against one row of 4- or 5-bit blocks: per block, `vpmaddwd`
/// of the quants (0..15, 0..31 for Q5_0/Q5_1, IQ4_NL's levels −127..113: [`small_quants`])
/// with both i16 parts of the activations gives exact i32 partial sums, scaled once by `d·s`
/// (s the activations' scale); the offset (`m` for Q4_1 and Q5_1, `−8·d` for Q4_0, `−16·d` for
/// Q5_0, none for IQ4_NL) multiplies the block's exact f32 sum. Even and odd blocks go to separate accumulators so the
/// loop-carried adds overlap; all of them are locals (an accumulator behind a reference or a
/// run-time index stayed in memory, and the store-to-load chain was a third of the time).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn group_q4<const F: u8, const M: usize, const DP: bool>(
    w: &[u8],
    acts: &Q16,
    cols: usize,
    out: &mut [f32],
) {
    // Safety: inlined only into the callers whose target features cover it; they
    // bound the reads.
    unsafe {
        let blocks = cols / 32;
        let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); M], [_mm256_setzero_ps(); M]);
        let (mut off0, mut off1) = ([0f32; M], [0f32; M]);
        let wp = w.as_ptr();
        let inv = _mm256_set1_ps(1.0 / 65536.0);
        macro_rules! block {
            ($b:expr, $acc:ident, $off:ident) => {{
                let b = $b;
                let p = wp.add(b * block_bytes::<F>());
                let d = h2f(p);
                let off = match F {
                    Q4_0 => -8.0 * d,
                    Q5_0 => -16.0 * d,
                    IQ4_NL => 0.0,
                    _ => h2f(p.add(2)),
                };
                let (lo, hi) = small_quants::<F>(p);
                for j in 0..M {
                    let xq = acts.q.as_ptr().add(j * cols + b * 32);
                    let xl = acts.lo.as_ptr().add(j * cols + b * 32);
                    // Integer sums, exact: |q·x| ≤ 127·32767 < 2²² per product.
                    let (s, r) = (dot32::<DP>(lo, hi, xq), dot32::<DP>(lo, hi, xl));
                    let t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(r), inv, _mm256_cvtepi32_ps(s));
                    let k = j * blocks + b;
                    let scale = _mm256_set1_ps(d * *acts.scale.get_unchecked(k));
                    $acc[j] = _mm256_fmadd_ps(t, scale, $acc[j]);
                    if F != IQ4_NL {
                        $off[j] += off * *acts.sum.get_unchecked(k);
                    }
                }
            }};
        }
        let mut b = 0;
        while b + 1 < blocks {
            block!(b, acc0, off0);
            block!(b + 1, acc1, off1);
            b += 2;
        }
        if b < blocks {
            block!(b, acc0, off0);
        }
        for j in 0..M {
            out[j] = hsum(_mm256_add_ps(acc0[j], acc1[j])) + (off0[j] + off1[j]);
        }
    }
}

/// The 32 quants of a Q4_0, Q4_1, Q5_0, Q5_1 or IQ4_NL block at `p` as two vectors of 16 i16:
/// values 0..16 (the low nibbles) and 16..32 (the high ones), ggml's order. The 5-bit formats
/// add bit `v` of their 32-bit mask `qh` as bit 4 of value `v`; IQ4_NL's nibbles index its
/// levels (−127..113), one `vpshufb` per 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn small_quants<const F: u8>(p: *const u8) -> (__m256i, __m256i) {
    let (qs, qh) = match F {
        Q4_0 | IQ4_NL => (2, None),
        Q4_1 => (4, None),
        Q5_0 => (6, Some(2)),
        _ => (8, Some(4)),
    };
    let mask = _mm_set1_epi8(0x0F);
    unsafe {
        if F == IQ4_NL {
            let v = iq4_levels(p.add(qs));
            return (
                _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v)),
                _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(v)),
            );
        }
        let qs = _mm_loadu_si128(p.add(qs).cast());
        let lo = _mm256_cvtepu8_epi16(_mm_and_si128(qs, mask));
        let hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(qs, 4), mask));
        let Some(h) = qh else {
            return (lo, hi);
        };
        let bits = u32::from_le(p.add(h).cast::<u32>().read_unaligned());
        // Lane i of `sel` has bit i set: lanes whose bit is set in `bits` get 16.
        let sel = _mm256_setr_epi16(
            1,
            2,
            4,
            8,
            16,
            32,
            64,
            128,
            256,
            512,
            1024,
            2048,
            4096,
            8192,
            16384,
            i16::MIN,
        );
        let sixteen = _mm256_set1_epi16(16);
        let fifth = |half: u32| {
            let b = _mm256_set1_epi16(half as u16 as i16);
            _mm256_and_si256(_mm256_cmpeq_epi16(_mm256_and_si256(b, sel), sel), sixteen)
        };
        (
            _mm256_or_si256(lo, fifth(bits & 0xFFFF)),
            _mm256_or_si256(hi, fifth(bits >> 16)),
        )
    }
}

/// `M` rows of i16 activations against one row of K-quant super-blocks. The activations
/// share one i16 scale per 256 values ([`Acts::new`]), so a super-block's eight sub-blocks
/// add up in integers: each sub-block's weights times its 6-bit scale (Q6_K: its per-16 i8
/// scales, [`k_weights`]) stay i16, and `vpmaddwd` with both i16 parts of the activations
/// gives exact i32 sums. They meet `d` and the activations' scale once per super-block, in
/// f32; Q4_K/Q5_K's offsets `−dmin·m` multiply the sub-blocks' exact f32 sums, eight lanes at
/// once. (Scaling every sub-block in f32, as before, cost two conversions and two FMAs per
/// 32 values and row: TinyLlama Q4_K_M decoded at half the speed of the 8-bit path.)
///
/// Integer bounds, per i32 lane of a sum over `n` sub-blocks (four products per sub-block,
/// activations |x| ≤ 32767): Q4_K |w·sc| ≤ 15·63 and Q5_K ≤ 31·63, 32 products fit; Q6_K
/// |(q − 32)·sc| ≤ 32·128 and IQ4_XS |level·(ls − 32)| ≤ 127·32, only 16 do
/// (16·4096·32767 < 2³¹), so they convert every four; Q3_K |q·(sc − 32)| ≤ 4·32 and Q2_K
/// q·sc and its min terms ≤ 3·15, all 32 fit.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn group_k<const F: u8, const M: usize, const DP: bool>(
    w: &[u8],
    acts: &Q16,
    cols: usize,
    out: &mut [f32],
) {
    // Safety: inlined only into the callers whose target features cover it; they
    // bound the reads.
    unsafe {
        let (blocks, subs) = (cols / 256, cols / 32);
        let mut acc = [_mm256_setzero_ps(); M];
        let inv = _mm256_set1_ps(1.0 / 65536.0);
        for b in 0..blocks {
            let p = w.as_ptr().add(b * block_bytes::<F>());
            // Q4_K/Q5_K: bytes 0..8 the sub-blocks' scales, 8..16 their mins; Q3_K, IQ4_XS:
            // the signed scales of the sixteen groups of 16; Q2_K: its sixteen bytes of
            // scale (low nibble) and min (high).
            let mut sm = [0u8; 16];
            if has_mins::<F>() {
                _mm_storeu_si128(sm.as_mut_ptr().cast(), scales_mins_k4(p));
            } else if F == Q2_K {
                sm.copy_from_slice(std::slice::from_raw_parts(p, 16));
            } else if F != Q6_K {
                _mm_storeu_si128(sm.as_mut_ptr().cast(), signed_scales16::<F>(p));
            }
            let d = _mm256_set1_ps(h2f(p.add(k_d_at::<F>())));
            let (mut hi, mut lo) = ([_mm256_setzero_si256(); M], [_mm256_setzero_si256(); M]);
            macro_rules! sub {
                ($s:expr) => {{
                    let s = $s;
                    let (w0, w1) = k_weights::<F>(p, s, &sm);
                    for j in 0..M {
                        let at = j * cols + b * 256 + s * 32;
                        let (xq, xl) = (acts.q.as_ptr().add(at), acts.lo.as_ptr().add(at));
                        hi[j] = _mm256_add_epi32(hi[j], dot32::<DP>(w0, w1, xq));
                        lo[j] = _mm256_add_epi32(lo[j], dot32::<DP>(w0, w1, xl));
                    }
                    if s == 7 || ((F == Q6_K || F == IQ4_XS) && s == 3) {
                        for j in 0..M {
                            let t = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(lo[j]),
                                inv,
                                _mm256_cvtepi32_ps(hi[j]),
                            );
                            let scale = _mm256_set1_ps(*acts.scale.get_unchecked(j * blocks + b));
                            acc[j] = _mm256_fmadd_ps(t, _mm256_mul_ps(d, scale), acc[j]);
                            (hi[j], lo[j]) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                        }
                    }
                }};
            }
            // Written out, so that each sub-block's shifts and offsets are constants.
            sub!(0);
            sub!(1);
            sub!(2);
            sub!(3);
            sub!(4);
            sub!(5);
            sub!(6);
            sub!(7);
            if F == Q2_K {
                // −dmin·m per group of 16 times its Σx.
                let [m0, m1] = q2_k_mins(p);
                for (j, acc) in acc.iter_mut().enumerate() {
                    let s = acts.sum16.as_ptr().add(j * cols / 16 + b * 16);
                    *acc = _mm256_fnmadd_ps(m0, _mm256_loadu_ps(s), *acc);
                    *acc = _mm256_fnmadd_ps(m1, _mm256_loadu_ps(s.add(8)), *acc);
                }
            }
            if has_mins::<F>() {
                let mins = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    sm.as_ptr().add(8).cast(),
                )));
                let mins = _mm256_mul_ps(mins, _mm256_set1_ps(h2f(p.add(2))));
                for (j, acc) in acc.iter_mut().enumerate() {
                    let sums = _mm256_loadu_ps(acts.sum.as_ptr().add(j * subs + b * 8));
                    *acc = _mm256_fnmadd_ps(mins, sums, *acc);
                }
            }
        }
        for j in 0..M {
            out[j] = hsum(acc[j]);
        }
    }
}

/// The eight 6-bit scales and mins of the Q4_K / Q5_K super-block at `p`, unpacked on
/// 32-bit words as ggml does (`scale_min_k4` for all eight at once): bytes 0..8 the
/// scales, 8..16 the mins.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn scales_mins_k4(p: *const u8) -> __m128i {
    // Safety: the callers' target features cover SSE2; `p` starts a whole super-block.
    unsafe {
        let word = |i: usize| p.add(4 + 4 * i).cast::<u32>().read_unaligned();
        let (u0, u1, u2) = (word(0), word(1), word(2));
        let (k1, k2, k3) = (0x3f3f_3f3fu32, 0x0f0f_0f0fu32, 0x0303_0303u32);
        _mm_setr_epi32(
            (u0 & k1) as i32,
            ((u2 & k2) | (((u0 >> 6) & k3) << 4)) as i32,
            (u1 & k1) as i32,
            (((u2 >> 4) & k2) | (((u1 >> 6) & k3) << 4)) as i32,
        )
    }
}

/// Sub-block `s` (values `32s..32s + 32`) of the K-quant super-block at `p` times its scales,
/// as two vectors of 16 i16 in [`Acts::new`]'s K-quant order: the even values (0, 2, …, 30),
/// then the odd ones. Q4_K/Q5_K: quants times `sc` (the 6-bit scale from `sm`), one
/// `vpmaddubsw` per vector with `sc` in every other byte, which also widens them (replacing
/// an unpack and two `vpmullw`: Q4_K 32000×2048 at one row, 2.78 → 2.35 ms on an AVX2 Zen 3).
/// Q2_K: the same with each group of 16's own 4-bit scale (its low nibble in `sm`). Q6_K, Q3_K
/// and IQ4_XS: the signed quant (IQ4_XS: level) times each group of 16's own scale (Q6_K's
/// i8; Q3_K's and IQ4_XS's from `sm`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn k_weights<const F: u8>(p: *const u8, s: usize, sm: &[u8; 16]) -> (__m256i, __m256i) {
    unsafe {
        let q = k_bytes::<F>(p, s);
        if F == Q2_K {
            // As below, with each half's own scale (values 0..16 in the low 128 bits).
            let even = _mm256_set_m128i(
                _mm_set1_epi16((sm[2 * s + 1] & 0x0F) as i16),
                _mm_set1_epi16((sm[2 * s] & 0x0F) as i16),
            );
            let odd = _mm256_slli_epi16::<8>(even);
            return (_mm256_maddubs_epi16(q, even), _mm256_maddubs_epi16(q, odd));
        }
        if has_mins::<F>() {
            // Bytes (sc, 0) and (0, sc): each i16 lane takes its even or its odd quant.
            let even = _mm256_set1_epi16(sm[s] as i16);
            let odd = _mm256_slli_epi16::<8>(even);
            return (_mm256_maddubs_epi16(q, even), _mm256_maddubs_epi16(q, odd));
        }
        let even = _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(q));
        let odd = _mm256_srai_epi16::<8>(q);
        // Lanes 0..8 of either vector hold values of the first 16, lanes 8..16 the second's.
        let sc = if F != Q6_K {
            sm.as_ptr().add(2 * s).cast::<i8>()
        } else {
            p.add(192 + 2 * s).cast::<i8>()
        };
        let scales = _mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(_mm_set1_epi16(*sc as i16)),
            _mm_set1_epi16(*sc.add(1) as i16),
        );
        (
            _mm256_mullo_epi16(even, scales),
            _mm256_mullo_epi16(odd, scales),
        )
    }
}

/// Sub-block `s` of the K-quant super-block at `p` as two vectors of 16 i16 quants: Q4_K
/// 0..15, Q5_K 0..31, Q6_K `q − 32`, Q3_K −4..3, IQ4_XS its levels. Layouts as in
/// [`super::kquant`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn k_quants<const F: u8>(p: *const u8, s: usize) -> (__m256i, __m256i) {
    let q = unsafe { k_bytes::<F>(p, s) };
    let (lo, hi) = (_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
    if signed::<F>() {
        (_mm256_cvtepi8_epi16(lo), _mm256_cvtepi8_epi16(hi))
    } else {
        (_mm256_cvtepu8_epi16(lo), _mm256_cvtepu8_epi16(hi))
    }
}

/// Sub-block `s` (values `32s..32s + 32`) of the K-quant super-block at `p` as 32 bytes in
/// order: Q4_K 0..15 and Q5_K 0..31 unsigned, Q6_K `q − 32`, Q3_K −4..3 and IQ4_XS's levels
/// (−127..113) signed. `F` is one of this
/// module's K-quant constants ([`K_Q4`], [`K_Q5`], [`K_Q6`] outside it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn k_bytes<const F: u8>(p: *const u8, s: usize) -> __m256i {
    let low4 = _mm256_set1_epi8(0x0F);
    unsafe {
        match F {
            Q4_K | Q5_K => {
                // Byte l of the 32 at `qs + 32·(s/2)`: low nibble for even s, high for odd.
                let qs = if F == Q4_K { 16 } else { 48 };
                let bytes = _mm256_loadu_si256(p.add(qs + 32 * (s / 2)).cast());
                let shift = _mm_cvtsi32_si128(4 * (s as i32 & 1));
                let q = _mm256_and_si256(_mm256_srl_epi16(bytes, shift), low4);
                if F == Q5_K {
                    let bit = _mm256_set1_epi8((1u8 << s) as i8);
                    let qh = _mm256_loadu_si256(p.add(16).cast());
                    let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
                    return _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(16)));
                }
                q
            }
            Q2_K => {
                // s = 4n + j: two bits at bit 2j of qs[32n..].
                let qs = _mm256_loadu_si256(p.add(16 + 32 * (s / 4)).cast());
                _mm256_and_si256(
                    _mm256_srl_epi16(qs, _mm_cvtsi32_si128(2 * (s as i32 % 4))),
                    _mm256_set1_epi8(3),
                )
            }
            // Sub-block s: qs[16s..16s + 16].
            IQ4_XS => iq4_levels(p.add(8 + 16 * s)),
            Q3_K => {
                // s = 4n + j: two low bits at bit 2j of qs[32n..], the third at bit s of
                // hmask (set: q, clear: q − 4).
                let qs = _mm256_loadu_si256(p.add(32 + 32 * (s / 4)).cast());
                let low = _mm256_and_si256(
                    _mm256_srl_epi16(qs, _mm_cvtsi32_si128(2 * (s as i32 % 4))),
                    _mm256_set1_epi8(3),
                );
                let bit = _mm256_set1_epi8((1u8 << s) as i8);
                let hm = _mm256_loadu_si256(p.cast());
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), bit);
                let four = _mm256_set1_epi8(4);
                _mm256_sub_epi8(_mm256_or_si256(low, _mm256_and_si256(set, four)), four)
            }
            _ => {
                // s = 4n + k: low 4 bits in ql[64n + 32(k & 1)..] (high nibble for k ≥ 2),
                // high 2 bits at bit 2k of qh[32n..].
                let (n, k) = (s / 4, s % 4);
                let ql = _mm256_loadu_si256(p.add(64 * n + 32 * (k & 1)).cast());
                let qh = _mm256_loadu_si256(p.add(128 + 32 * n).cast());
                let lo = _mm256_and_si256(
                    _mm256_srl_epi16(ql, _mm_cvtsi32_si128(4 * (k as i32 / 2))),
                    low4,
                );
                let hi = _mm256_and_si256(
                    _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * k as i32)),
                    _mm256_set1_epi8(3),
                );
                _mm256_sub_epi8(
                    _mm256_or_si256(lo, _mm256_slli_epi16::<4>(hi)),
                    _mm256_set1_epi8(32),
                )
            }
        }
    }
}

/// [`k_bytes`]'s format constants for the other kernel modules.
pub(super) const K_Q4: u8 = Q4_K;
/// See [`K_Q4`].
pub(super) const K_Q5: u8 = Q5_K;
/// See [`K_Q4`].
pub(super) const K_Q6: u8 = Q6_K;
/// See [`K_Q4`].
pub(super) const K_Q3: u8 = Q3_K;
/// See [`K_Q4`].
pub(super) const K_IQ4_XS: u8 = IQ4_XS;
/// See [`K_Q4`].
pub(super) const K_Q2: u8 = Q2_K;

/// Whether the K-quant `F` has signed quants under signed per-16 scales (Q6_K, Q3_K; IQ4_XS's
/// per-32 scales taken twice): the 8-bit kernels multiply them by the sign trick.
pub(super) const fn signed<const F: u8>() -> bool {
    F == Q6_K || F == Q3_K || F == IQ4_XS
}

/// Whether the K-quant `F` has per-32 mins (Q4_K, Q5_K: unsigned quants, `d·sc·q − dmin·m`,
/// the mins against the activations' sums per 32). Q2_K has per-16 ones ([`q2_k_mins`]); the
/// [`signed`] formats have none.
pub(super) const fn has_mins<const F: u8>() -> bool {
    F == Q4_K || F == Q5_K
}

/// Where the K-quant `F`'s f16 `d` sits in its super-block.
pub(super) const fn k_d_at<const F: u8>() -> usize {
    match F {
        Q6_K => 208,
        Q3_K => 108,
        Q2_K => 80,
        _ => 0,
    }
}

/// The signed scales of the sixteen groups of 16 values of the Q3_K or IQ4_XS super-block at
/// `p`, one i8 per byte ([`super::kquant::q3_scales`]; IQ4_XS: each of
/// [`super::kquant::iq4_xs_scales`] twice). Unpacked on words as ggml's AVX2 kernels do: the
/// decode kernels call this once per super-block and weight row, where the byte-by-byte form
/// cost ~100 scalar instructions against ~120 vector ones for the block's products.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn signed_scales16<const F: u8>(p: *const u8) -> __m128i {
    // Safety: `p` starts a whole super-block of `F`; SSE2 is x86_64's baseline.
    unsafe {
        let word = |at: usize| p.add(at).cast::<u32>().read_unaligned();
        let (m2, m4) = (0x0303_0303u32, 0x0F0F_0F0Fu32);
        let unsigned = if F == IQ4_XS {
            // scales_l (bytes 4..8): scale 2k's low four bits in byte k's low nibble, 2k + 1's
            // in its high one; scales_h (bytes 2..4): bits 2i..2i + 2 are scale i's high two.
            let l = word(4);
            let lo = _mm_unpacklo_epi8(
                _mm_cvtsi32_si128((l & m4) as i32),
                _mm_cvtsi32_si128(((l >> 4) & m4) as i32),
            );
            // Each 2-bit field of the u16 into its own byte.
            let mut h = u64::from(p.add(2).cast::<u16>().read_unaligned());
            h = (h | (h << 24)) & 0x0000_00FF_0000_00FF;
            h = (h | (h << 12)) & 0x000F_000F_000F_000F;
            h = (h | (h << 6)) & 0x0303_0303_0303_0303;
            let v = _mm_or_si128(lo, _mm_cvtsi64_si128((h << 4) as i64));
            _mm_unpacklo_epi8(v, v)
        } else {
            // scales (bytes 96..108): as ggml's `ggml_vec_dot_q3_K_q8_K`.
            let (a0, a1, a2) = (word(96), word(100), word(104));
            _mm_setr_epi32(
                ((a0 & m4) | ((a2 & m2) << 4)) as i32,
                ((a1 & m4) | (((a2 >> 2) & m2) << 4)) as i32,
                (((a0 >> 4) & m4) | (((a2 >> 4) & m2) << 4)) as i32,
                (((a1 >> 4) & m4) | (((a2 >> 6) & m2) << 4)) as i32,
            )
        };
        _mm_sub_epi8(unsigned, _mm_set1_epi8(32))
    }
}

/// The 32 IQ4_NL / IQ4_XS levels (−127..113, signed bytes) that the 16 bytes at `qs` index:
/// the low nibbles are values 0..16, the high ones 16..32 (ggml's order); one `vpshufb` each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn iq4_levels(qs: *const u8) -> __m256i {
    // Safety: `qs` holds 16 bytes.
    unsafe {
        let qs = _mm_loadu_si128(qs.cast());
        let levels = _mm_loadu_si128(kiln_gguf::IQ4_LEVELS.as_ptr().cast());
        let low4 = _mm_set1_epi8(0x0F);
        let lo = _mm_shuffle_epi8(levels, _mm_and_si128(qs, low4));
        let hi = _mm_shuffle_epi8(levels, _mm_and_si128(_mm_srli_epi16::<4>(qs), low4));
        _mm256_set_m128i(hi, lo)
    }
}

/// `dmin·m` of the sixteen groups of 16 of the Q2_K super-block at `p` (each `m` the high
/// nibble of its scale byte), groups 0..8 then 8..16: the kernels multiply them by the
/// activations' sums per 16 ([`Acts::sum16`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn q2_k_mins(p: *const u8) -> [__m256; 2] {
    // Safety: `p` starts a whole Q2_K super-block.
    unsafe {
        let dmin = _mm256_set1_ps(h2f(p.add(82)));
        let m = _mm_srli_epi16::<4>(_mm_loadu_si128(p.cast()));
        let m = _mm_and_si128(m, _mm_set1_epi8(0x0F));
        let mins = |m| _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(m)));
        [mins(m), mins(_mm_srli_si128::<8>(m))]
    }
}

/// `M` activation rows against one weight row: full 32-value blocks only.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn group<const F: u8, const M: usize>(w: &[u8], x: &[f32], cols: usize, out: &mut [f32]) {
    let blocks = cols / 32;
    // Two accumulators per row: with four rows that is 8 registers plus the block's 4, so
    // nothing spills (four per row did, and ran compute-bound at 8 rows).
    let mut acc = [[_mm256_setzero_ps(); 2]; M];
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    for b in 0..blocks {
        let wv = unsafe { load::<F>(wp.add(b * block_bytes::<F>())) };
        for (j, acc) in acc.iter_mut().enumerate() {
            let xb = unsafe { xp.add(j * cols + b * 32) };
            for (k, w) in wv.iter().enumerate() {
                let a = &mut acc[k & 1];
                *a = _mm256_fmadd_ps(*w, unsafe { _mm256_loadu_ps(xb.add(8 * k)) }, *a);
            }
        }
    }
    for (y, acc) in out.iter_mut().zip(acc) {
        *y = hsum(_mm256_add_ps(acc[0], acc[1]));
    }
}

/// `M` activation rows against one row of Q8_0 blocks: the quants, widened to f32, multiply
/// the activations, and the sum is scaled once by `d`. Even and odd blocks go to separate local
/// accumulators (see [`group_q4`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn group_q8<const M: usize>(w: &[u8], x: &[f32], cols: usize, out: &mut [f32]) {
    let blocks = cols / 32;
    let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); M], [_mm256_setzero_ps(); M]);
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    macro_rules! block {
        ($b:expr, $acc:ident) => {{
            let b = $b;
            let p = wp.add(b * 34);
            let dv = _mm256_set1_ps(h2f(p));
            let q = [
                i8x8(p.add(2)),
                i8x8(p.add(10)),
                i8x8(p.add(18)),
                i8x8(p.add(26)),
            ];
            for j in 0..M {
                let xb = xp.add(j * cols + b * 32);
                let s = _mm256_mul_ps(q[0], _mm256_loadu_ps(xb));
                let s = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xb.add(8)), s);
                let t = _mm256_mul_ps(q[2], _mm256_loadu_ps(xb.add(16)));
                let t = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xb.add(24)), t);
                $acc[j] = _mm256_fmadd_ps(_mm256_add_ps(s, t), dv, $acc[j]);
            }
        }};
    }
    let mut b = 0;
    unsafe {
        while b + 1 < blocks {
            block!(b, acc0);
            block!(b + 1, acc1);
            b += 2;
        }
        if b < blocks {
            block!(b, acc0);
        }
    }
    for j in 0..M {
        out[j] = hsum(_mm256_add_ps(acc0[j], acc1[j]));
    }
}

/// The f16 at `p` as an f32 scalar.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn h2f(p: *const u8) -> f32 {
    let bits = unsafe { p.cast::<u16>().read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// 32 values of a float format at `p`, as f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load<const F: u8>(p: *const u8) -> [__m256; 4] {
    unsafe {
        match F {
            F32 => load4(p.cast()),
            F16 => [
                _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(16).cast())),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(32).cast())),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(48).cast())),
            ],
            _ => [
                bf16x8(p),
                bf16x8(p.add(16)),
                bf16x8(p.add(32)),
                bf16x8(p.add(48)),
            ],
        }
    }
}

/// 32 f32 at `p` as four registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load4(p: *const f32) -> [__m256; 4] {
    unsafe {
        [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ]
    }
}

/// Four registers to 32 f32 at `p`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn store4(p: *mut f32, v: [__m256; 4]) {
    unsafe {
        _mm256_storeu_ps(p, v[0]);
        _mm256_storeu_ps(p.add(8), v[1]);
        _mm256_storeu_ps(p.add(16), v[2]);
        _mm256_storeu_ps(p.add(24), v[3]);
    }
}

/// Eight bf16 at `p` as f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn bf16x8(p: *const u8) -> __m256 {
    let v = _mm256_cvtepu16_epi32(unsafe { _mm_loadu_si128(p.cast()) });
    _mm256_castsi256_ps(_mm256_slli_epi32(v, 16))
}

/// Eight i8 at `p` as f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn i8x8(p: *const u8) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(p.cast()) }))
}

/// One row to f32, with the scalar dequantiser's arithmetic (`(q − 8)·d`, `q·d + m` without a
/// fused multiply-add, `q·d`), so the results are bit-identical; `false` when the format or
/// width is not one it handles (the caller falls back to the scalar loop). f16/bf16 rows may
/// have any width.
#[cfg(target_arch = "x86_64")]
pub(super) fn dequantize_row(format: PackedFormat, src: &[u8], dst: &mut [f32]) -> bool {
    if src.len() != format.row_bytes(dst.len()) {
        return false;
    }
    if format.block_len() == 1 && !dst.len().is_multiple_of(32) {
        // f16/bf16 rows of any width: whole 32-value runs here, the last few one by one.
        let (head, tail) = dst.split_at_mut(dst.len() / 32 * 32);
        let (src_head, src_tail) = src.split_at(format.row_bytes(head.len()));
        super::kernels::dequantize_row_scalar(format, src_tail, tail);
        return head.is_empty() || dequantize_row(format, src_head, head);
    }
    let blocks = dst.len() / 32;
    let whole = if format.is_k_quant() { 256 } else { 32 };
    if !dst.len().is_multiple_of(whole) {
        return false;
    }
    // Safety: `available()` was checked by the caller; lengths checked above.
    unsafe {
        match format {
            PackedFormat::F32 => return false,
            PackedFormat::F16 => dequant::<F16>(src, dst, blocks),
            PackedFormat::BF16 => dequant::<BF16>(src, dst, blocks),
            PackedFormat::Q8_0 => dequant::<Q8_0>(src, dst, blocks),
            PackedFormat::Q4_0 => dequant::<Q4_0>(src, dst, blocks),
            PackedFormat::Q4_1 => dequant::<Q4_1>(src, dst, blocks),
            PackedFormat::Q5_0 => dequant::<Q5_0>(src, dst, blocks),
            PackedFormat::Q5_1 => dequant::<Q5_1>(src, dst, blocks),
            PackedFormat::Q4_K => dequant_k::<Q4_K>(src, dst, blocks / 8),
            PackedFormat::Q5_K => dequant_k::<Q5_K>(src, dst, blocks / 8),
            PackedFormat::Q6_K => dequant_k::<Q6_K>(src, dst, blocks / 8),
            PackedFormat::Q3_K => dequant_k::<Q3_K>(src, dst, blocks / 8),
            PackedFormat::IQ4_XS => dequant_k::<IQ4_XS>(src, dst, blocks / 8),
            PackedFormat::Q2_K => dequant_k::<Q2_K>(src, dst, blocks / 8),
            PackedFormat::IQ4_NL => dequant::<IQ4_NL>(src, dst, blocks),
        }
    }
    true
}

/// [`super::kernels::axpy`] compiled for AVX2: the same loop, eight lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    super::kernels::axpy_portable(a, x, y);
}

/// K-quant super-blocks to f32 (prefill tiles), with [`super::kquant`]'s arithmetic: `d·sc`
/// and `dmin·m` in f32, then `d·sc · q − dmin·m` (Q4_K, Q5_K) or `(d·sc) · q` (Q6_K, Q3_K,
/// IQ4_XS), each
/// rounded as the scalar code rounds it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequant_k<const F: u8>(src: &[u8], dst: &mut [f32], blocks: usize) {
    // 16 i16 as two vectors of 8 f32.
    let f32x16 = |q: __m256i| {
        (
            _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(q))),
            _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(q))),
        )
    };
    for b in 0..blocks {
        unsafe {
            let p = src.as_ptr().add(b * block_bytes::<F>());
            let out = dst.as_mut_ptr().add(b * 256);
            if F == Q2_K {
                let (d, dmin) = (h2f(p.add(80)), h2f(p.add(82)));
                for s in 0..8 {
                    let (q0, q1) = k_quants::<F>(p, s);
                    for (h, q) in [q0, q1].into_iter().enumerate() {
                        let g = 2 * s + h;
                        let sc = *p.add(g);
                        let dl = _mm256_set1_ps(d * (sc & 0x0F) as f32);
                        let ml = _mm256_set1_ps(dmin * (sc >> 4) as f32);
                        let (a, c) = f32x16(q);
                        _mm256_storeu_ps(out.add(16 * g), _mm256_sub_ps(_mm256_mul_ps(dl, a), ml));
                        _mm256_storeu_ps(
                            out.add(16 * g + 8),
                            _mm256_sub_ps(_mm256_mul_ps(dl, c), ml),
                        );
                    }
                }
            } else if signed::<F>() {
                let d = h2f(p.add(k_d_at::<F>()));
                let sc: [i8; 16] = if F != Q6_K {
                    let mut sc = [0i8; 16];
                    _mm_storeu_si128(sc.as_mut_ptr().cast(), signed_scales16::<F>(p));
                    sc
                } else {
                    std::array::from_fn(|g| *p.add(192 + g) as i8)
                };
                for s in 0..8 {
                    let (q0, q1) = k_quants::<F>(p, s);
                    for (h, q) in [q0, q1].into_iter().enumerate() {
                        let g = 2 * s + h;
                        let dsc = _mm256_set1_ps(d * sc[g] as f32);
                        let (a, c) = f32x16(q);
                        _mm256_storeu_ps(out.add(16 * g), _mm256_mul_ps(dsc, a));
                        _mm256_storeu_ps(out.add(16 * g + 8), _mm256_mul_ps(dsc, c));
                    }
                }
            } else {
                let (sc, mn) = super::kquant::sub_scales(std::slice::from_raw_parts(p, 16));
                for s in 0..8 {
                    let (q0, q1) = k_quants::<F>(p, s);
                    let (scv, mnv) = (_mm256_set1_ps(sc[s]), _mm256_set1_ps(mn[s]));
                    for (h, q) in [q0, q1].into_iter().enumerate() {
                        let (a, c) = f32x16(q);
                        let at = out.add(32 * s + 16 * h);
                        _mm256_storeu_ps(at, _mm256_sub_ps(_mm256_mul_ps(scv, a), mnv));
                        _mm256_storeu_ps(at.add(8), _mm256_sub_ps(_mm256_mul_ps(scv, c), mnv));
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequant<const F: u8>(src: &[u8], dst: &mut [f32], blocks: usize) {
    for b in 0..blocks {
        unsafe {
            let v = block_values::<F>(src.as_ptr().add(b * block_bytes::<F>()));
            store4(dst.as_mut_ptr().add(b * 32), v);
        }
    }
}

/// `acc += Σᵢ a[i] · rowᵢ` for whole rows of `format` (`acc.len()` values each): the rows of a
/// group are dequantised block by block in registers and multiplied into the same accumulator
/// registers, so `acc` is loaded and stored once per group rather than once per row. False
/// where there is no such kernel (the K-quants).
pub(super) fn axpy_rows(format: PackedFormat, rows: &[&[u8]], a: &[f32], acc: &mut [f32]) -> bool {
    let n = acc.len();
    if format.is_k_quant()
        || rows.len() != a.len()
        || rows.iter().any(|r| r.len() != format.row_bytes(n))
    {
        return false;
    }
    let acc = if format.block_len() == 1 && !n.is_multiple_of(32) {
        // Element formats of any width (e.g. DeePEn's relative matrices, one column per
        // anchor): the last few values one by one here, the whole 32-value runs below (the
        // kernel reads only the rows' first `acc.len()` values).
        let (head, tail) = acc.split_at_mut(n / 32 * 32);
        let split = format.row_bytes(head.len());
        let mut values = [0f32; 32];
        for (row, &ai) in rows.iter().zip(a) {
            let values = &mut values[..tail.len()];
            super::kernels::dequantize_row_scalar(format, &row[split..], values);
            for (y, &v) in tail.iter_mut().zip(values.iter()) {
                *y += ai * v;
            }
        }
        head
    } else if n.is_multiple_of(32) {
        acc
    } else {
        return false;
    };
    // Safety: `available()` was checked by the caller; row lengths checked above, and the
    // kernels read `acc.len() / 32` whole runs of each row.
    unsafe {
        match format {
            PackedFormat::F32 => axpy_rows_f::<F32>(rows, a, acc),
            PackedFormat::F16 => axpy_rows_f::<F16>(rows, a, acc),
            PackedFormat::BF16 => axpy_rows_f::<BF16>(rows, a, acc),
            PackedFormat::Q8_0 => axpy_rows_f::<Q8_0>(rows, a, acc),
            PackedFormat::Q4_0 => axpy_rows_f::<Q4_0>(rows, a, acc),
            PackedFormat::Q4_1 => axpy_rows_f::<Q4_1>(rows, a, acc),
            PackedFormat::Q5_0 => axpy_rows_f::<Q5_0>(rows, a, acc),
            PackedFormat::Q5_1 => axpy_rows_f::<Q5_1>(rows, a, acc),
            PackedFormat::IQ4_NL => axpy_rows_f::<IQ4_NL>(rows, a, acc),
            PackedFormat::Q3_K
            | PackedFormat::Q4_K
            | PackedFormat::Q5_K
            | PackedFormat::Q6_K
            | PackedFormat::IQ4_XS
            | PackedFormat::Q2_K => {
                return false;
            }
        }
    }
    true
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_rows_f<const F: u8>(rows: &[&[u8]], a: &[f32], acc: &mut [f32]) {
    for b in 0..acc.len() / 32 {
        unsafe {
            let out = acc.as_mut_ptr().add(b * 32);
            let mut s = load4(out);
            for (row, &ai) in rows.iter().zip(a) {
                let p = row.as_ptr().add(b * block_bytes::<F>());
                if F == Q8_0 {
                    // `q · (d·a)`: one multiply fewer per value than `(q·d) · a`.
                    let da = _mm256_set1_ps(h2f(p) * ai);
                    for (k, s) in s.iter_mut().enumerate() {
                        *s = _mm256_fmadd_ps(i8x8(p.add(2 + 8 * k)), da, *s);
                    }
                    continue;
                }
                let v = block_values::<F>(p);
                let ai = _mm256_set1_ps(ai);
                for k in 0..4 {
                    s[k] = _mm256_fmadd_ps(v[k], ai, s[k]);
                }
            }
            store4(out, s);
        }
    }
}

/// One 32-value block of `F` at `p` as four registers, with ggml's dequantisation arithmetic.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block_values<const F: u8>(p: *const u8) -> [__m256; 4] {
    unsafe {
        match F {
            Q8_0 => {
                let d = _mm256_set1_ps(h2f(p));
                [
                    _mm256_mul_ps(i8x8(p.add(2)), d),
                    _mm256_mul_ps(i8x8(p.add(10)), d),
                    _mm256_mul_ps(i8x8(p.add(18)), d),
                    _mm256_mul_ps(i8x8(p.add(26)), d),
                ]
            }
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | IQ4_NL => {
                let d = _mm256_set1_ps(h2f(p));
                let (lo, hi) = small_quants::<F>(p);
                let widen = |v: __m256i| {
                    [
                        _mm256_cvtepi16_epi32(_mm256_castsi256_si128(v)),
                        _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(v)),
                    ]
                };
                let ([a, b], [c, e]) = (widen(lo), widen(hi));
                let q = [a, b, c, e];
                if F == IQ4_NL {
                    // `d · level`, as ggml's `dequantize_row_iq4_nl`.
                    q.map(|q| _mm256_mul_ps(d, _mm256_cvtepi32_ps(q)))
                } else if F == Q4_0 || F == Q5_0 {
                    let s = _mm256_set1_epi32(if F == Q4_0 { 8 } else { 16 });
                    q.map(|q| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, s)), d))
                } else {
                    let m = _mm256_set1_ps(h2f(p.add(2)));
                    q.map(|q| _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), d), m))
                }
            }
            _ => load::<F>(p),
        }
    }
}
