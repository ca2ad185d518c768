//! Portable kernels: ggml's reference quantisers and dequantisers, and the dot products used
//! where AVX2 is not available (and as the oracle in the tests).

use std::cell::RefCell;

use half::{bf16, f16};

use super::{ActivationPrecision, PackedFormat, bf16_at, f16_at};
use crate::{Error, Result};

/// The activation rows of one product, with what the 4-bit kernels precompute from them.
pub(super) struct Acts<'a> {
    /// Row-major `[m, cols]`.
    pub x: &'a [f32],
    /// Rows.
    pub m: usize,
    /// Values per row.
    pub cols: usize,
    /// 4-bit formats: per row and 32-value block, the exact sum of the block (what the block's
    /// offset, `m` or `−8·d`, multiplies).
    pub sum: Vec<f32>,
    /// Q2_K: per row and 16 values, their sum (what each group's min multiplies): of `x`, or
    /// with [`ActivationPrecision::Q8`] of the rounded values (`d·Σq`). Empty for the other
    /// formats.
    pub sum16: Vec<f32>,
    /// 4-bit formats: the activations as i16, per [`scale_group`] scaled to ±32767 (`hi`), and
    /// what that rounding left, scaled by 2¹⁶ more (`lo`): `x ≈ s·(hi + lo/65536)`. The
    /// K-quants store each 32 values' even ones first, then the odd ones (their kernel widens
    /// the weights' bytes to i16 pairwise, `super::avx2`'s `k_weights`).
    pub q16: Vec<i16>,
    /// See `q16`.
    pub q16_lo: Vec<i16>,
    /// 4-bit formats: per row and [`scale_group`] (32 values, 256 for the K-quants), the i16
    /// scale (`amax / 32767`).
    pub scale: Vec<f32>,
    /// [`ActivationPrecision::Q8`]: the activations rounded to i8 per 32-value block.
    pub q8: Vec<i8>,
    /// See `q8`: per row and block, the scale `d` (`x ≈ q·d`).
    pub q8_scale: Vec<f32>,
    /// See `q8`: per row and block, `d·Σq`.
    pub q8_sum: Vec<f32>,
    /// See `q8`, for the 32-value block formats' VNNI kernel on two or more rows
    /// (`super::int8`'s `group_t`): each row's quants plus 128 (as u8), every eight blocks
    /// (256 values) transposed so that 32-bit lane `k` of the `i`-th 32 bytes holds values
    /// `4i..4i + 4` of block `k`. Empty where that kernel does not run.
    pub q8t: Vec<u8>,
}

impl<'a> Acts<'a> {
    /// Prepares `m` rows of `x` for `format`'s kernels.
    ///
    /// The 4-bit AVX2 kernels multiply the quants by the activations as two i16 parts per
    /// 32-value block, so that integer multiply-adds (`vpmaddwd`, exact) replace the widening,
    /// conversion and FMA of every value: those kernels are compute-bound, not memory-bound.
    /// Together the parts hold a value to 2⁻³² of its block's largest, finer than f32's own
    /// rounding (one part alone, 2⁻¹⁶, moved SmolLM2's logits by 0.014 against the f32 path;
    /// with both, as the f32 kernels). The block offsets stay in f32. The K-quants' scale
    /// covers a whole super-block, so that their kernel adds its sub-blocks in integers.
    ///
    /// With [`ActivationPrecision::Q8`] the block formats get i8 activations instead
    /// ([`super::int8`]).
    pub fn new(
        format: PackedFormat,
        activations: ActivationPrecision,
        x: &'a [f32],
        m: usize,
        cols: usize,
    ) -> Self {
        let mut acts = Self {
            x,
            m,
            cols,
            sum: Vec::new(),
            sum16: Vec::new(),
            q16: Vec::new(),
            q16_lo: Vec::new(),
            scale: Vec::new(),
            q8: Vec::new(),
            q8_scale: Vec::new(),
            q8_sum: Vec::new(),
            q8t: Vec::new(),
        };
        if activations == ActivationPrecision::Q8 && super::int8::applies(format) {
            let len = super::int8::scale_len(format);
            super::int8::quantize(&x[..m * cols], &mut acts, len);
            if format == PackedFormat::Q2_K {
                acts.sum16 = acts
                    .q8
                    .chunks_exact(16)
                    .enumerate()
                    .map(|(g, q)| {
                        let d = acts.q8_scale[g * 16 / len];
                        d * q.iter().map(|&q| i32::from(q)).sum::<i32>() as f32
                    })
                    .collect();
            }
            return acts;
        }
        // Only the AVX2 kernels read the i16 parts; the portable ones multiply `x`.
        #[cfg(target_arch = "x86_64")]
        if splits_i16(format) && super::avx2::available() {
            let group = scale_group(format);
            acts.sum = vec![0.0; m * (cols / 32)];
            acts.scale = vec![0.0; m * (cols / group)];
            acts.q16 = vec![0; m * cols];
            acts.q16_lo = vec![0; m * cols];
            let even_odd = format.is_k_quant();
            super::avx2::split_i16(&x[..m * cols], &mut acts, group, even_odd);
            if format == PackedFormat::Q2_K {
                acts.sum16 = x[..m * cols]
                    .chunks_exact(16)
                    .map(|c| c.iter().sum())
                    .collect();
            }
        }
        acts
    }
}

/// Whether `format`'s AVX2 kernel takes the two-part i16 activations (the 4-bit formats, and
/// the K-quants, whose small integer quants and per-32 (or per-16) scales fit the same
/// integer multiply-adds).
pub(super) fn splits_i16(format: PackedFormat) -> bool {
    matches!(
        format,
        PackedFormat::Q4_0
            | PackedFormat::Q4_1
            | PackedFormat::Q5_0
            | PackedFormat::Q5_1
            | PackedFormat::IQ4_NL
    ) || format.is_k_quant()
}

/// How many values share one scale of [`Acts::q16`]: a K-quant super-block (256), else a
/// 32-value block.
pub(super) fn scale_group(format: PackedFormat) -> usize {
    if format.is_k_quant() { 256 } else { 32 }
}

/// A dot-product kernel: `w` holds `n` whole packed weight rows and `out` is `[n, acts.m]`:
/// `out[r·m + j]` is the dot product of weight row `r` with activation row `j`. Taking a run
/// of rows lets a kernel share each activation load between weight rows.
pub(super) type DotKernel = fn(format: PackedFormat, w: &[u8], acts: &Acts, out: &mut [f32]);

/// The fastest kernel this CPU runs for `format` and `activations`.
pub(super) fn dot_kernel(format: PackedFormat, activations: ActivationPrecision) -> DotKernel {
    if activations == ActivationPrecision::Q8 && super::int8::applies(format) {
        return super::int8::dot_kernel(format);
    }
    #[cfg(target_arch = "x86_64")]
    if super::avx2::available() {
        return super::avx2::dot_kernel(format);
    }
    let _ = format;
    dot_portable
}

/// Every f32-activation kernel this CPU runs for `format`, fastest first, by name (the tests
/// check each).
#[cfg(test)]
pub(super) fn kernels(format: PackedFormat) -> Vec<(&'static str, DotKernel)> {
    let mut all: Vec<(&'static str, DotKernel)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    if super::avx2::available() {
        all.push(("simd", super::avx2::dot_kernel(format)));
        all.push(("avx2", super::avx2::dot_kernel_avx2(format)));
    }
    all.push(("portable", dot_portable));
    all
}

/// Dequantises the row into a per-thread buffer, then takes plain dot products (eight partial
/// sums, so the compiler can vectorise them).
pub(super) fn dot_portable(format: PackedFormat, w: &[u8], acts: &Acts, out: &mut [f32]) {
    let (x, cols, m) = (acts.x, acts.cols, acts.m);
    let row_bytes = format.row_bytes(cols);
    thread_local!(static ROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) });
    ROW.with_borrow_mut(|row| {
        row.resize(cols, 0.0);
        for (wr, out) in w
            .chunks_exact(row_bytes.max(1))
            .zip(out.chunks_exact_mut(m))
        {
            dequantize_row(format, wr, row);
            for (j, y) in out.iter_mut().enumerate() {
                *y = dot_f32(row, &x[j * cols..(j + 1) * cols]);
            }
        }
    });
}

/// `Σ a·b` with eight independent partial sums.
pub(super) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// One row of `format` bytes to f32, as ggml's `dequantize_row_*` computes it (with AVX2 where
/// the CPU has it: the same operations, bit-identical results).
pub(super) fn dequantize_row(format: PackedFormat, src: &[u8], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::avx2::available() && super::avx2::dequantize_row(format, src, dst) {
        return;
    }
    dequantize_row_scalar(format, src, dst);
}

/// `y += a · x`, in whatever SIMD the compiler finds for the target (the loop vectorises at
/// opt-level ≥ 1; separate mul and add, so the result does not depend on FMA being present).
pub(super) fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::avx2::available() {
        // Safety: AVX2 is present (checked above).
        unsafe { super::avx2::axpy(a, x, y) };
        return;
    }
    axpy_portable(a, x, y);
}

/// `acc += Σᵢ a[i] · rowᵢ` for whole packed rows of `format` (`acc.len()` values each): one
/// pass over `acc` per group of rows with AVX2 where the format has a kernel there, else each
/// row dequantised into `scratch` (f32 rows read in place) and added.
pub(super) fn axpy_rows(
    format: PackedFormat,
    rows: &[&[u8]],
    a: &[f32],
    acc: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    if super::avx2::available() && super::avx2::axpy_rows(format, rows, a, acc) {
        return;
    }
    let cols = acc.len();
    for (row, &ai) in rows.iter().zip(a) {
        if format == PackedFormat::F32 {
            scratch.clear();
            scratch.extend(
                row.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        } else {
            scratch.resize(cols, 0.0);
            dequantize_row(format, row, scratch);
        }
        axpy(ai, scratch, acc);
    }
}

#[inline(always)]
pub(super) fn axpy_portable(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// [`dequantize_row`] one value at a time: the reference.
pub(super) fn dequantize_row_scalar(format: PackedFormat, src: &[u8], dst: &mut [f32]) {
    match format {
        PackedFormat::F32 => {
            for (b, y) in src.chunks_exact(4).zip(dst) {
                *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        PackedFormat::F16 => {
            for (i, y) in dst.iter_mut().enumerate() {
                *y = f16_at(src, 2 * i);
            }
        }
        PackedFormat::BF16 => {
            for (i, y) in dst.iter_mut().enumerate() {
                *y = bf16_at(src, 2 * i);
            }
        }
        PackedFormat::Q8_0 => {
            for (b, y) in src.chunks_exact(34).zip(dst.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                for (y, &q) in y.iter_mut().zip(&b[2..34]) {
                    *y = (q as i8) as f32 * d;
                }
            }
        }
        PackedFormat::Q4_0 => {
            for (b, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                let (lo, hi) = y.split_at_mut(16);
                for j in 0..16 {
                    lo[j] = ((b[2 + j] & 0x0F) as i32 - 8) as f32 * d;
                    hi[j] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        PackedFormat::IQ4_NL => {
            // ggml's `dequantize_row_iq4_nl`: `d · level`, one f32 multiply.
            for (b, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                let (lo, hi) = y.split_at_mut(16);
                for j in 0..16 {
                    lo[j] = d * kiln_gguf::IQ4_LEVELS[(b[2 + j] & 0x0F) as usize] as f32;
                    hi[j] = d * kiln_gguf::IQ4_LEVELS[(b[2 + j] >> 4) as usize] as f32;
                }
            }
        }
        PackedFormat::Q4_1 => {
            for (b, y) in src.chunks_exact(20).zip(dst.chunks_exact_mut(32)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let (lo, hi) = y.split_at_mut(16);
                for j in 0..16 {
                    lo[j] = (b[4 + j] & 0x0F) as f32 * d + m;
                    hi[j] = (b[4 + j] >> 4) as f32 * d + m;
                }
            }
        }
        PackedFormat::Q5_0 | PackedFormat::Q5_1 => {
            let bb = format.block_bytes();
            for (b, y) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                // Q5_0: (q − 16)·d; Q5_1: q·d + m, as two roundings (no fused multiply-add).
                let (m, h) = if format == PackedFormat::Q5_0 {
                    (None, 2)
                } else {
                    (Some(f16_at(b, 2)), 4)
                };
                let qh = u32::from_le_bytes([b[h], b[h + 1], b[h + 2], b[h + 3]]);
                let qs = &b[h + 4..h + 20];
                let (lo, hi) = y.split_at_mut(16);
                for j in 0..16 {
                    let q0 = (qs[j] & 0x0F) as u32 | ((qh >> j) & 1) << 4;
                    let q1 = (qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
                    (lo[j], hi[j]) = match m {
                        None => ((q0 as i32 - 16) as f32 * d, (q1 as i32 - 16) as f32 * d),
                        Some(m) => (q0 as f32 * d + m, q1 as f32 * d + m),
                    };
                }
            }
        }
        PackedFormat::Q2_K
        | PackedFormat::Q3_K
        | PackedFormat::Q4_K
        | PackedFormat::Q5_K
        | PackedFormat::Q6_K
        | PackedFormat::IQ4_XS => super::kquant::dequantize_row(format, src, dst),
    }
}

/// One row of f32 to `format`: the float formats converted, the block formats quantised by
/// kiln-gguf's ports of ggml's `quantize_row_*_ref` (written once there, checked byte for byte
/// against gguf-py).
pub(super) fn quantize_row(format: PackedFormat, src: &[f32], dst: &mut [u8]) -> Result<()> {
    match format {
        PackedFormat::F32 => {
            for (v, b) in src.iter().zip(dst.chunks_exact_mut(4)) {
                b.copy_from_slice(&v.to_le_bytes());
            }
        }
        PackedFormat::F16 => {
            for (v, b) in src.iter().zip(dst.chunks_exact_mut(2)) {
                b.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        PackedFormat::BF16 => {
            for (v, b) in src.iter().zip(dst.chunks_exact_mut(2)) {
                b.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
            }
        }
        PackedFormat::Q8_0
        | PackedFormat::Q4_0
        | PackedFormat::Q4_1
        | PackedFormat::Q5_0
        | PackedFormat::Q5_1
        | PackedFormat::Q3_K
        | PackedFormat::Q4_K
        | PackedFormat::Q5_K
        | PackedFormat::Q6_K
        | PackedFormat::IQ4_XS
        | PackedFormat::Q2_K
        | PackedFormat::IQ4_NL => {
            kiln_gguf::quantize_into(super::kquant::ggml_type(format), src, dst)
                .map_err(|e| Error::arg("packed matrix", e.to_string()))?;
        }
    }
    Ok(())
}
