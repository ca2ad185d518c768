//! Weights held on the host in the precision they ship in (f32, f16, bf16, or ggml's Q8_0,
//! Q4_0, Q4_1, Q5_0, Q5_1 blocks and its Q3_K, Q4_K, Q5_K, Q6_K super-blocks), and the CPU
//! kernels that multiply activations by them.
//!
//! Why kiln has its own kernels here: a decode step is a matrix-vector product per weight, so
//! its speed is the rate at which the weights stream from memory. Burn 0.21's CPU backends
//! reach about a third of this machine's read bandwidth on f32 matrix-vector products, and
//! their quantised matmul dequantises the whole weight before multiplying, which moves *more*
//! bytes than f32. No maintained crate multiplies f32 activations by ggml blocks in place
//! (candle and llama.cpp keep theirs inside their engines). So:
//!
//! * up to [`MATVEC_MAX_ROWS`] activation rows (decode steps, small batches), each output row is
//!   a dot product over the packed bytes, dequantised block by block in registers (AVX2 + FMA
//!   where the CPU has them, chosen at run time, a portable loop elsewhere), in f32, with the
//!   output rows split over the kernel threads of `pool` (the caller and spinning workers);
//! * more rows (prefill) dequantise the weight tile by tile into f32 and hand each tile to the
//!   `gemm` crate, which Burn's flex backend uses for its own matmuls; with 8-bit activations
//!   ([`ActivationPrecision::Q8`]) the integer kernels run instead where they are faster
//!   (tiles of weight rows against blocks of activation rows, [`INT8_BLOCK32_MAX_ROWS`]).
//!
//! The block layouts are ggml's (`block_q8_0`, `block_q4_0`, `block_q4_1`, `block_q4_K`,
//! `block_q5_K`, `block_q6_K`), so a GGUF file's tensor bytes are used as they are, and
//! dequantisation follows ggml's arithmetic.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod int8;
mod kernels;
mod kquant;
mod pool;
mod softmax_map;

pub use softmax_map::{SoftmaxMap, SoftmaxRun};

#[cfg(feature = "flex")]
pub(crate) use pool::{for_each as parallel_for, threads};

use half::{bf16, f16};
use rayon::prelude::*;

use crate::{Error, Result};

/// How a [`PackedMatrix`] stores its values.
#[allow(non_camel_case_types)] // ggml's names
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PackedFormat {
    /// Plain `f32`.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// ggml `block_q8_0`: blocks of 32 `i8` with one f16 scale (`y = q·d`), 8.5 bits a weight.
    Q8_0,
    /// ggml `block_q4_0`: blocks of 32 4-bit values with one f16 scale (`y = (q − 8)·d`),
    /// 4.5 bits a weight.
    Q4_0,
    /// ggml `block_q4_1`: blocks of 32 4-bit values with an f16 scale and min
    /// (`y = q·d + m`), 5 bits a weight.
    Q4_1,
    /// ggml `block_q5_0`: blocks of 32 5-bit values (low four bits in nibbles, fifth bits in a
    /// 32-bit mask) with one f16 scale (`y = (q − 16)·d`), 5.5 bits a weight. Where a Q4_K_M
    /// file's Q4_K matrices are not a whole number of 256-value super-blocks, llama.cpp writes
    /// this instead.
    Q5_0,
    /// ggml `block_q5_1`: as Q5_0 with an f16 min (`y = q·d + m`), 6 bits a weight (llama.cpp's
    /// stand-in for Q5_K on such widths).
    Q5_1,
    /// ggml `block_q4_K`: super-blocks of 256 4-bit values in eight sub-blocks of 32, each with
    /// a 6-bit scale and min under f16 `d` and `dmin` (`y = d·sc·q − dmin·m`), 4.5 bits a
    /// weight. Most of a Q4_K_M file.
    Q4_K,
    /// ggml `block_q5_K`: as Q4_K with a fifth bit per value, 5.5 bits a weight.
    Q5_K,
    /// ggml `block_q6_K`: 256 6-bit values in sixteen groups of 16 with i8 scales under one
    /// f16 `d` (`y = d·sc·(q − 32)`), 6.5625 bits a weight.
    Q6_K,
    /// ggml `block_q3_K`: 256 3-bit values (two low bits in `qs`, the third in `hmask`) in
    /// sixteen groups of 16 with 6-bit signed scales under one f16 `d`
    /// (`y = d·(sc − 32)·(q − 4)`), 3.4375 bits a weight. Most of a Q3_K_M file.
    Q3_K,
    /// ggml `block_iq4_xs`: 256 4-bit indices into sixteen non-uniform levels (−127..113) in
    /// eight sub-blocks of 32, each with a 6-bit signed scale under one f16 `d`
    /// (`y = d·(ls − 32)·level[q]`), 4.25 bits a weight.
    IQ4_XS,
    /// ggml `block_q2_K`: 256 2-bit values in sixteen groups of 16, each with a 4-bit scale
    /// and min under f16 `d` and `dmin` (`y = d·sc·q − dmin·m`), 2.625 bits a weight. Most of
    /// a Q2_K file.
    Q2_K,
    /// ggml `block_iq4_nl`: blocks of 32 4-bit indices into IQ4_XS's sixteen non-uniform
    /// levels under one f16 scale (`y = d·level[q]`), 4.5 bits a weight. llama.cpp writes it
    /// for the matrices of a Q2_K, Q3_K or IQ4_XS file whose rows are not whole 256-value
    /// super-blocks (all of SmolLM2-135M's, 576 wide), and for every matrix of an IQ4_NL file.
    IQ4_NL,
}

impl PackedFormat {
    /// Values per block (1 for the float formats).
    pub const fn block_len(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q8_0 | Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::IQ4_NL => 32,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K | Self::IQ4_XS => 256,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
            Self::Q3_K => 110,
            Self::IQ4_XS => 136,
            Self::Q2_K => 84,
            Self::IQ4_NL => 18,
        }
    }

    /// The name ggml and the CLI use (`f32`, `q4_1`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q4_K => "q4_k",
            Self::Q5_K => "q5_k",
            Self::Q6_K => "q6_k",
            Self::Q3_K => "q3_k",
            Self::IQ4_XS => "iq4_xs",
            Self::Q2_K => "q2_k",
            Self::IQ4_NL => "iq4_nl",
        }
    }

    /// Whether this is one of ggml's 256-value super-block formats (the K-quants, and IQ4_XS,
    /// which the same kernels take).
    pub const fn is_k_quant(self) -> bool {
        matches!(
            self,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K | Self::IQ4_XS
        )
    }

    /// Bytes one row of `cols` values takes.
    pub const fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_len() * self.block_bytes()
    }
}

impl PackedFormat {
    /// Every format, in declaration order.
    pub const ALL: [PackedFormat; 15] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q8_0,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
        Self::Q3_K,
        Self::IQ4_XS,
        Self::Q2_K,
        Self::IQ4_NL,
    ];
}

impl std::str::FromStr for PackedFormat {
    type Err = String;

    /// A [`name`](Self::name), in any case.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|f| f.name() == lower)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|f| f.name()).collect();
                format!("unknown format `{s}` ({})", names.join(", "))
            })
    }
}

impl std::fmt::Display for PackedFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the kernels do with the activations when the weights are Q8_0, Q4_0, Q4_1, Q5_0, Q5_1
/// or K-quant blocks: in decode steps (up to [`MATVEC_MAX_ROWS`] rows) and, with
/// [`Q8`](Self::Q8), in prefill too where the integer kernels are faster than dequantising for
/// `gemm` (the K-quants always, the other block formats as [`INT8_BLOCK32_MAX_ROWS`] says),
/// as llama.cpp also rounds prefill activations. Float weights always multiply f32
/// activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ActivationPrecision {
    /// As precise as f32 (the 4-bit kernels split each value into two i16 parts, to 2⁻³² of
    /// its block): the product equals the dequantised weights times the activations.
    #[default]
    F32,
    /// Rounded to 8 bits per 32-value block (`d = amax/127`), then integer dot products, as
    /// llama.cpp multiplies these formats: faster, and each activation moves by up to half a
    /// step `d`.
    Q8,
}

impl std::str::FromStr for ActivationPrecision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => Self::F32,
            "q8" | "q8_0" | "int8" => Self::Q8,
            other => return Err(format!("unknown activation precision `{other}` (f32, q8)")),
        })
    }
}

/// Up to this many activation rows, [`PackedMatrix::matmul_t`] runs the matrix-vector kernels
/// (each weight block is read once for all rows); from one more on it dequantises tiles for
/// `gemm`. Measured with `bench/packed_matmul.rs` (bench/README.md).
pub const MATVEC_MAX_ROWS: usize = 8;

/// With 8-bit activations, up to this many rows the 32-value block formats (Q8_0, Q4_0, Q4_1,
/// Q5_0, Q5_1) run the integer kernels in tiles (`tiled_int8`); beyond it, dequantising
/// tiles for `gemm` is faster on AVX2 alone. With AVX512-VNNI (the transposing kernels) the
/// integer kernels stay faster at any row count; the K-quants' everywhere. Since the
/// transposing kernels take two weight rows per activation load (Dec 6), at 128 rows:
/// 1536×576 Q8_0 / Q4_1 / Q5_0 1.16 / 1.18 / 1.23 ms against `gemm`'s 1.56 / 1.55 / 1.56,
/// 576×576 Q4_1 / Q5_0 0.49 / 0.50 against 0.82 / 0.81. Before that, Q4_1 and Q5_0 rows
/// under 1024 values were faster through `gemm`. Measured with `packed_matmul
/// --activations q8` (2 threads, Zen 4), best of alternating runs, integer against gemm:
/// AVX2 Q4_1 5632×2048 at 16 / 48 / 96 / 256 rows 2.6 / 7.9 / 15.8 / 41.9 ms against
/// 6.5 / 9.9 / 14.9 / 31.7; VNNI at 128 rows, 5632×2048 Q8_0 11.6 against 22.6 ms, Q4_1
/// 12.5 / 22.0, Q5_0 13.7 / 22.5; 576×576 Q8_0 0.56 / 0.64, Q4_1 0.63 / 0.59, Q5_0
/// 0.68 / 0.60; 49152×576 Q8_0 50.8 / 54.3, Q4_1 55.0 / 53.6; 4096×1024 Q8_0 at 192 rows
/// 8.4 / 9.6; Q4_K 5632×2048 at 128 rows 12.5 against 18.1 ms.
pub const INT8_BLOCK32_MAX_ROWS: usize = 64;

/// Rows [`PackedMatrix::vecmat`] adds into its running sum per pass over it.
const VECMAT_GROUP: usize = 8;

/// A `[rows, cols]` matrix (PyTorch's `[d_out, d_in]` for a Linear weight, `[vocab, d]` for
/// an embedding) held on the host in a [`PackedFormat`].
#[derive(Clone)]
pub struct PackedMatrix {
    rows: usize,
    cols: usize,
    format: PackedFormat,
    activations: ActivationPrecision,
    /// `rows × row_bytes` bytes, in 8-byte words so that f32/f16 rows are aligned for `gemm`.
    words: Vec<u64>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedMatrix({}x{} {})",
            self.rows, self.cols, self.format
        )
    }
}

impl PackedMatrix {
    /// Wraps the raw bytes of `rows` rows in `format` (a GGUF tensor's data, for instance).
    /// Errors when `cols` is not a whole number of blocks or `bytes` has the wrong length.
    pub fn from_bytes(
        rows: usize,
        cols: usize,
        format: PackedFormat,
        bytes: &[u8],
    ) -> Result<Self> {
        check_shape(rows, cols, format)?;
        let expected = rows
            .checked_mul(format.row_bytes(cols))
            .ok_or_else(|| Error::arg("packed matrix", format!("{rows}x{cols} overflows")))?;
        if bytes.len() != expected {
            return Err(Error::arg(
                "packed matrix",
                format!(
                    "{rows}x{cols} in {format} takes {expected} bytes, got {}",
                    bytes.len()
                ),
            ));
        }
        let mut words = vec![0u64; expected.div_ceil(8)];
        bytemuck_bytes_mut(&mut words)[..expected].copy_from_slice(bytes);
        Ok(Self {
            rows,
            cols,
            format,
            activations: ActivationPrecision::default(),
            words,
        })
    }

    /// Converts (and for the block formats, quantises as ggml's reference quantiser does)
    /// row-major `values` of a `[rows, cols]` matrix.
    pub fn from_f32(
        rows: usize,
        cols: usize,
        values: &[f32],
        format: PackedFormat,
    ) -> Result<Self> {
        check_shape(rows, cols, format)?;
        if values.len() != rows * cols {
            return Err(Error::arg(
                "packed matrix",
                format!(
                    "{rows}x{cols} needs {} values, got {}",
                    rows * cols,
                    values.len()
                ),
            ));
        }
        let row_bytes = format.row_bytes(cols);
        let mut bytes = vec![0u8; rows * row_bytes];
        if row_bytes > 0 {
            bytes
                .par_chunks_mut(row_bytes)
                .zip(values.par_chunks(cols.max(1)))
                .try_for_each(|(dst, src)| kernels::quantize_row(format, src, dst))?;
        }
        Self::from_bytes(rows, cols, format, &bytes)
    }

    /// A `[rows, cols]` matrix of zero bytes (zeros in every format), to be filled with
    /// [`set_rows_f32`](Self::set_rows_f32): builds a large matrix chunk by chunk without holding
    /// its f32 values or a second copy of its bytes.
    pub fn zeros(rows: usize, cols: usize, format: PackedFormat) -> Result<Self> {
        Self::from_bytes(
            rows,
            cols,
            format,
            &vec![0u8; rows.saturating_mul(format.row_bytes(cols))],
        )
    }

    /// Converts (as [`from_f32`](Self::from_f32)) row-major `values` into the rows from `r0` on.
    pub fn set_rows_f32(&mut self, r0: usize, values: &[f32]) -> Result<()> {
        let cols = self.cols.max(1);
        let n = values.len() / cols;
        if !values.len().is_multiple_of(cols) || r0 + n > self.rows {
            return Err(Error::arg(
                "packed matrix",
                format!(
                    "{} values from row {r0} are not whole rows inside {}x{}",
                    values.len(),
                    self.rows,
                    self.cols
                ),
            ));
        }
        let row_bytes = self.row_bytes();
        if row_bytes == 0 {
            return Ok(());
        }
        let format = self.format;
        bytemuck_bytes_mut(&mut self.words)[r0 * row_bytes..(r0 + n) * row_bytes]
            .par_chunks_mut(row_bytes)
            .zip(values.par_chunks(cols))
            .try_for_each(|(dst, src)| kernels::quantize_row(format, src, dst))
    }

    /// Sets what the decode kernels do with the activations (see [`ActivationPrecision`]).
    pub fn with_activations(mut self, activations: ActivationPrecision) -> Self {
        self.activations = activations;
        self
    }

    /// See [`with_activations`](Self::with_activations).
    pub fn activations(&self) -> ActivationPrecision {
        self.activations
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The storage format.
    pub fn format(&self) -> PackedFormat {
        self.format
    }

    /// Bytes of the values (what a matrix-vector product streams).
    pub fn byte_len(&self) -> usize {
        self.rows * self.row_bytes()
    }

    fn row_bytes(&self) -> usize {
        self.format.row_bytes(self.cols)
    }

    /// The raw bytes, row after row.
    pub fn bytes(&self) -> &[u8] {
        &bytemuck_bytes(&self.words)[..self.byte_len()]
    }

    fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.bytes()[r * rb..(r + 1) * rb]
    }

    /// The first row holding a non-finite value, if any. For the block formats only the f16
    /// scales (and Q4_1's and the K-quants' mins) are read: the quants and the K-quants'
    /// sub-block scales are small integers, so a block is finite exactly when they are.
    pub fn first_non_finite_row(&self) -> Option<usize> {
        let finite_f16 = |b: &[u8], i: usize| f16_at(b, i).is_finite();
        let row_ok = |r: usize| -> bool {
            let row = self.row(r);
            match self.format {
                PackedFormat::F32 => row
                    .chunks_exact(4)
                    .all(|v| f32::from_le_bytes([v[0], v[1], v[2], v[3]]).is_finite()),
                PackedFormat::F16 => (0..self.cols).all(|i| finite_f16(row, 2 * i)),
                PackedFormat::BF16 => (0..self.cols).all(|i| bf16_at(row, 2 * i).is_finite()),
                PackedFormat::Q8_0
                | PackedFormat::Q4_0
                | PackedFormat::Q5_0
                | PackedFormat::IQ4_XS
                | PackedFormat::IQ4_NL => row
                    .chunks_exact(self.format.block_bytes())
                    .all(|b| finite_f16(b, 0)),
                PackedFormat::Q4_1
                | PackedFormat::Q5_1
                | PackedFormat::Q4_K
                | PackedFormat::Q5_K => row
                    .chunks_exact(self.format.block_bytes())
                    .all(|b| finite_f16(b, 0) && finite_f16(b, 2)),
                PackedFormat::Q6_K => row.chunks_exact(210).all(|b| finite_f16(b, 208)),
                PackedFormat::Q3_K => row.chunks_exact(110).all(|b| finite_f16(b, 108)),
                PackedFormat::Q2_K => row
                    .chunks_exact(84)
                    .all(|b| finite_f16(b, 80) && finite_f16(b, 82)),
            }
        };
        (0..self.rows).into_par_iter().find_first(|&r| !row_ok(r))
    }

    /// Row `r` as f32, bit-identical to ggml's dequantisation.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        kernels::dequantize_row(self.format, self.row(r), &mut out[..self.cols]);
    }

    /// The whole matrix as row-major f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            out.par_chunks_mut(self.cols)
                .enumerate()
                .for_each(|(r, dst)| self.dequantize_row(r, dst));
        }
        out
    }

    /// The rows `ids` as row-major f32 `[ids.len(), cols]` (an embedding lookup). Errors on an
    /// id past the last row.
    pub fn gather_rows(&self, ids: &[usize]) -> Result<Vec<f32>> {
        if let Some(&bad) = ids.iter().find(|&&i| i >= self.rows) {
            return Err(Error::arg(
                "token id",
                format!("{bad} is past the embedding's {} rows", self.rows),
            ));
        }
        let mut out = vec![0f32; ids.len() * self.cols];
        for (dst, &id) in out.chunks_exact_mut(self.cols.max(1)).zip(ids) {
            self.dequantize_row(id, dst);
        }
        Ok(out)
    }

    /// `x · Wᵀ` for row-major `x` of `[m, cols]`: returns row-major `[m, rows]`.
    ///
    /// Panics if `x.len() != m * cols` (callers hold a tensor of that shape).
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(
            x.len(),
            m * self.cols,
            "activation is not [{m}, {}]",
            self.cols
        );
        if m == 0 || self.rows == 0 || self.cols == 0 {
            // (No columns: every output is an empty sum.)
            return vec![0f32; m * self.rows];
        }
        if m <= MATVEC_MAX_ROWS {
            self.matvec(x, m)
        } else if self.int8_prefill(m) {
            self.tiled_int8(x, m)
        } else {
            self.tiled_gemm(x, m)
        }
    }

    /// [`matmul_t`](Self::matmul_t) of several matrices that read the same `x` (a layer's
    /// query, key and value projections; its gate and up projections): the same values, but a
    /// decode-sized product (up to [`MATVEC_MAX_ROWS`] rows) runs all the matrices in one pass
    /// of the kernel threads, so the step waits for the threads once instead of once per
    /// matrix.
    ///
    /// Panics if the matrices' widths differ or `x.len() != m * cols`.
    pub fn matmul_t_many(mats: &[&PackedMatrix], x: &[f32], m: usize) -> Vec<Vec<f32>> {
        let Some(first) = mats.first() else {
            return Vec::new();
        };
        assert!(
            mats.iter().all(|w| w.cols == first.cols),
            "matrices of different widths"
        );
        if mats.len() == 1 || m == 0 || m > MATVEC_MAX_ROWS {
            return mats.iter().map(|w| w.matmul_t(x, m)).collect();
        }
        assert_eq!(
            x.len(),
            m * first.cols,
            "activation is not [{m}, {}]",
            first.cols
        );
        matvec(mats, x, m)
    }

    /// `x · W` for one vector `x` over the rows: returns `[cols]`, the sum of the rows each
    /// scaled by its entry of `x` (rows whose entry is 0 are skipped). This is the product
    /// [`matmul_t`](Self::matmul_t) transposes, on the same bytes, so a matrix needed both ways
    /// (DeePEn's relative matrix: `p · R` and `R · g`) is held once. Rows are split into two
    /// runs per kernel thread, each with its own sum, added at the end; within a run, rows go
    /// four at a time through one pass over the sum (AVX2: dequantised in registers).
    ///
    /// Panics if `x.len() != rows`.
    pub fn vecmat(&self, x: &[f32]) -> Vec<f32> {
        assert_eq!(x.len(), self.rows, "vector is not [{}]", self.rows);
        let (rows, cols) = (self.rows, self.cols);
        if rows == 0 || cols == 0 {
            return vec![0f32; cols];
        }
        let runs = (2 * pool::threads()).min(rows);
        let run_rows = rows.div_ceil(runs);
        let runs = rows.div_ceil(run_rows);
        let mut sums = vec![0f32; runs * cols];
        let out = SendPtr(sums.as_mut_ptr());
        pool::for_each(runs, &|t| {
            let r0 = t * run_rows;
            let r1 = (r0 + run_rows).min(rows);
            // Safety: each task writes its own `cols` values of `sums`, which outlives the call.
            let acc = unsafe { std::slice::from_raw_parts_mut(out.ptr().add(t * cols), cols) };
            let mut group = RowGroup::new(self.format);
            for (r, &xr) in x.iter().enumerate().take(r1).skip(r0) {
                if xr != 0.0 {
                    group.push(self.row(r), xr, acc);
                }
            }
            group.flush(acc);
        });
        let (first, rest) = sums.split_at_mut(cols);
        for part in rest.chunks_exact(cols) {
            kernels::axpy(1.0, part, first);
        }
        sums.truncate(cols);
        sums
    }

    /// The matrix-vector kernels: output rows split into chunks over the kernel threads
    /// ([`pool`]); each chunk computes every activation row against its weight rows, reading
    /// each weight byte once.
    fn matvec(&self, x: &[f32], m: usize) -> Vec<f32> {
        matvec(&[self], x, m).pop().unwrap_or_default()
    }

    /// Whether `m` rows (more than [`MATVEC_MAX_ROWS`]) go through [`tiled_int8`](Self::tiled_int8)
    /// rather than [`tiled_gemm`](Self::tiled_gemm): with 8-bit activations, where the integer
    /// kernels were measured faster ([`INT8_BLOCK32_MAX_ROWS`]).
    /// `KILN_NO_I8_PREFILL` turns it off, to compare the two.
    fn int8_prefill(&self, m: usize) -> bool {
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        self.activations == ActivationPrecision::Q8
            && int8::applies(self.format)
            && (self.format.is_k_quant() || m <= INT8_BLOCK32_MAX_ROWS || int8::vnni())
            && !*OFF.get_or_init(|| std::env::var_os("KILN_NO_I8_PREFILL").is_some())
    }

    /// Prefill with 8-bit activations: the rows of `x` are rounded in blocks of rows small
    /// enough to stay in L1/L2 (~64 KiB of i8), and each task runs the matrix-vector kernel of
    /// a tile of weight rows against every block in turn, so both stay in cache while the
    /// integer kernel reuses them.
    fn tiled_int8(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        let block_rows = (65536 / cols.max(1)).clamp(4, 64) / 4 * 4;
        let blocks: Vec<kernels::Acts> = x
            .chunks(block_rows * cols)
            .map(|xb| kernels::Acts::new(self.format, self.activations, xb, xb.len() / cols, cols))
            .collect();
        let dot = kernels::dot_kernel(self.format, self.activations);
        let rb = self.row_bytes();
        let tile = (262144 / rb.max(1))
            .clamp(4, 256)
            .min(rows.div_ceil(4 * pool::threads()).next_multiple_of(4))
            .max(1);
        let mut y = vec![0f32; m * rows];
        let out = SendPtr(y.as_mut_ptr());
        pool::for_each(rows.div_ceil(tile), &|t| {
            let r0 = t * tile;
            let n = tile.min(rows - r0);
            let w = &self.bytes()[r0 * rb..(r0 + n) * rb];
            let mut yt = vec![0f32; n * block_rows];
            for (b, acts) in blocks.iter().enumerate() {
                let yt = &mut yt[..n * acts.m];
                dot(self.format, w, acts, yt);
                for (i, vals) in yt.chunks_exact(acts.m).enumerate() {
                    for (j, v) in vals.iter().enumerate() {
                        // Safety: this task alone writes columns r0..r0+n of `y`, [m, rows].
                        unsafe { *out.ptr().add((b * block_rows + j) * rows + r0 + i) = *v };
                    }
                }
            }
        });
        y
    }

    /// Prefill: each task dequantises a tile of weight rows to f32 (f32 weights are used in
    /// place) and multiplies it with `gemm`, writing its own columns of the output.
    fn tiled_gemm(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        let mut y = vec![0f32; m * rows];
        // Tiles of ~256 KiB of f32: they stay in L2 while gemm packs them.
        let tile = (65536 / cols.max(1)).clamp(16, 512).min(rows);
        let out = SendPtr(y.as_mut_ptr());
        pool::for_each(rows.div_ceil(tile), &|t| {
            let r0 = t * tile;
            let n = tile.min(rows - r0);
            let mut scratch = Vec::new();
            let w: &[f32] = if self.format == PackedFormat::F32 {
                let bytes = &self.bytes()[r0 * cols * 4..(r0 + n) * cols * 4];
                // Safety: rows of f32 start at multiples of 4 bytes in 8-byte-aligned storage.
                unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), n * cols) }
            } else {
                scratch.resize(n * cols, 0.0);
                for (i, dst) in scratch.chunks_exact_mut(cols).enumerate() {
                    self.dequantize_row(r0 + i, dst);
                }
                &scratch
            };
            // Safety: dst is y[:, r0..r0+n] (row stride `rows`), disjoint between tasks; lhs is
            // x [m, cols] row-major; rhs(k, j) = w[j * cols + k], i.e. the tile transposed.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    cols,
                    out.ptr().add(r0),
                    1,
                    rows as isize,
                    false,
                    x.as_ptr(),
                    1,
                    cols as isize,
                    w.as_ptr(),
                    cols as isize,
                    1,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
        y
    }
}

/// The decode-sized product of each matrix in `mats` (all `cols` wide) with `x`, `[m, cols]`:
/// row-major `[m, rows]` per matrix. The matrices' rows, one after another, are split into two
/// equal runs per kernel thread (a run may cross from one matrix into the next). Measured (2
/// threads, alternating runs) against ~32 KiB tasks taken one by one: SmolLM2 Q4_1 decode
/// 102–105 → 121–141 tok/s with 8-bit activations, 99–104 → 104–114 with f32 ones (one task per
/// thread 125–140, four 113–136); 32768×1024 f32 at one row 4.7–4.9 → 2.4–2.8 ms, Q8_0 1.3–1.5
/// → 0.95 ms; NLLB-600M f32 2.05 → 1.82–1.93 s at batch 1. Each thread streams long contiguous
/// runs the prefetchers follow, takes two contended atomics instead of dozens, and no thread is
/// left finishing a whole small task after the other is done.
fn matvec(mats: &[&PackedMatrix], x: &[f32], m: usize) -> Vec<Vec<f32>> {
    let starts: Vec<usize> = mats
        .iter()
        .scan(0, |at, w| {
            let start = *at;
            *at += w.rows;
            Some(start)
        })
        .collect();
    let total: usize = mats.iter().map(|w| w.rows).sum();
    if total == 0 || m == 0 || mats.iter().any(|w| w.cols == 0) {
        return mats.iter().map(|w| vec![0f32; m * w.rows]).collect();
    }
    let chunk_rows = total
        .div_ceil(2 * pool::threads())
        .next_multiple_of(4)
        .min(total.max(1));
    // One preparation of the activations per kind of kernel (usually one for all).
    let mut prepared: Vec<(PackedFormat, ActivationPrecision, kernels::Acts)> = Vec::new();
    let kind: Vec<usize> = mats
        .iter()
        .map(|w| {
            let key = (w.format, w.activations);
            match prepared.iter().position(|(f, a, _)| (*f, *a) == key) {
                Some(i) => i,
                None => {
                    let acts = kernels::Acts::new(w.format, w.activations, x, m, w.cols);
                    prepared.push((w.format, w.activations, acts));
                    prepared.len() - 1
                }
            }
        })
        .collect();
    let dots: Vec<kernels::DotKernel> = mats
        .iter()
        .map(|w| kernels::dot_kernel(w.format, w.activations))
        .collect();
    // [rows, m] while computing, so that each task writes one contiguous run.
    let mut yts: Vec<Vec<f32>> = mats.iter().map(|w| vec![0f32; w.rows * m]).collect();
    let outs: Vec<SendPtr> = yts.iter_mut().map(|y| SendPtr(y.as_mut_ptr())).collect();
    pool::for_each(total.div_ceil(chunk_rows), &|c| {
        let (g0, g1) = (c * chunk_rows, ((c + 1) * chunk_rows).min(total));
        for (i, w) in mats.iter().enumerate() {
            let (r0, r1) = (
                g0.max(starts[i]) - starts[i],
                g1.min(starts[i] + w.rows).saturating_sub(starts[i]),
            );
            if r0 >= r1 {
                continue;
            }
            // Safety: tasks write disjoint row ranges of each `yts[i]`, which outlive the call.
            let out =
                unsafe { std::slice::from_raw_parts_mut(outs[i].ptr().add(r0 * m), (r1 - r0) * m) };
            let rb = w.row_bytes();
            dots[i](
                w.format,
                &w.bytes()[r0 * rb..r1 * rb],
                &prepared[kind[i]].2,
                out,
            );
        }
    });
    if m == 1 {
        return yts;
    }
    yts.into_iter()
        .zip(mats)
        .map(|(yt, w)| {
            let mut y = vec![0f32; m * w.rows];
            for (r, vals) in yt.chunks_exact(m).enumerate() {
                for (j, v) in vals.iter().enumerate() {
                    y[j * w.rows + r] = *v;
                }
            }
            y
        })
        .collect()
}

/// Rows to add to a running sum, scaled, handed to [`kernels::axpy_rows`] [`VECMAT_GROUP`] at
/// a time (one pass over the sum per group).
struct RowGroup<'a> {
    format: PackedFormat,
    rows: Vec<&'a [u8]>,
    coefs: Vec<f32>,
    scratch: Vec<f32>,
}

impl<'a> RowGroup<'a> {
    fn new(format: PackedFormat) -> Self {
        Self {
            format,
            rows: Vec::with_capacity(VECMAT_GROUP),
            coefs: Vec::with_capacity(VECMAT_GROUP),
            scratch: Vec::new(),
        }
    }

    /// `acc += coef · row`, once the group is full.
    fn push(&mut self, row: &'a [u8], coef: f32, acc: &mut [f32]) {
        self.rows.push(row);
        self.coefs.push(coef);
        if self.rows.len() == VECMAT_GROUP {
            self.flush(acc);
        }
    }

    /// Adds the rows held so far.
    fn flush(&mut self, acc: &mut [f32]) {
        if !self.rows.is_empty() {
            kernels::axpy_rows(self.format, &self.rows, &self.coefs, acc, &mut self.scratch);
            self.rows.clear();
            self.coefs.clear();
        }
    }
}

/// A pointer the kernel threads share to write disjoint elements of one buffer (f32 outputs,
/// or a caller's per-row state).
pub(crate) struct SendPtr<T = f32>(pub(crate) *mut T);

impl<T> SendPtr<T> {
    /// A method, so closures capture the whole wrapper rather than its raw-pointer field.
    pub(crate) fn ptr(&self) -> *mut T {
        self.0
    }
}
// Safety: tasks write disjoint parts of the buffer (see `tiled_gemm`), whose elements may move
// between threads.
unsafe impl<T: Send> Send for SendPtr<T> {}
unsafe impl<T: Send> Sync for SendPtr<T> {}

fn check_shape(rows: usize, cols: usize, format: PackedFormat) -> Result<()> {
    let _ = rows;
    if !cols.is_multiple_of(format.block_len()) {
        return Err(Error::arg(
            "packed matrix",
            format!(
                "{cols} columns is not a whole number of {format} blocks of {}",
                format.block_len()
            ),
        ));
    }
    Ok(())
}

fn bytemuck_bytes(words: &[u64]) -> &[u8] {
    // Safety: u8 has no alignment or validity requirements.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), words.len() * 8) }
}

fn bytemuck_bytes_mut(words: &mut [u64]) -> &mut [u8] {
    // Safety: as above, and the borrow is unique.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8) }
}

/// f16 value at byte `i` (little-endian).
#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// bf16 value at byte `i` (little-endian).
#[inline(always)]
fn bf16_at(b: &[u8], i: usize) -> f32 {
    bf16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

#[cfg(test)]
mod tests;
