//! A matrix-vector product, a softmax and a vector-matrix product in one pass over the rows:
//! the inner loop of DeePEn's inverse search (kiln-ensemble), which otherwise streams its
//! relative matrix twice per step (`R · g`, then `softmax(z) · R` with the new `z`). Rows are
//! taken in blocks small enough to stay in L2 between the two reads, so main memory serves each
//! byte once; the softmax is the online one (a running max per run, the sum rescaled when it
//! rises), as flash attention's.

use super::{PackedMatrix, RowGroup, SendPtr, VECMAT_GROUP, kernels, pool};

/// What [`PackedMatrix::matvec_softmax_vecmat`] returns: `softmax(z) · W`, and the two numbers
/// that give the softmax of any row, `exp(z_r − max) / sum`.
#[derive(Debug, Clone, PartialEq)]
pub struct SoftmaxMap {
    /// `softmax(z) · W`, `[cols]`.
    pub map: Vec<f32>,
    /// The largest `z_r` (−∞ when every one is).
    pub max: f32,
    /// `Σ exp(z_r − max)`.
    pub sum: f32,
    /// A row whose logit is `max`.
    pub argmax: usize,
}

/// One run of an online softmax-weighted sum (`Σ_r exp(z_r − max) · W_r` over the rows it has
/// seen, kept in a caller's accumulator): its largest logit so far (at least the floor it
/// started from), `Σ exp(z_r − max)`, and the row of that largest logit. Runs are merged by
/// [`SoftmaxMap::merge`]. Public so that kiln-ensemble's sparse matrices reuse it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SoftmaxRun {
    /// The largest logit so far, or the starting floor (−∞ for none).
    pub max: f32,
    /// `Σ exp(z_r − max)` over the rows added.
    pub sum: f32,
    /// The row whose logit is `max` (the caller's starting row until one exceeds the floor).
    pub argmax: usize,
}

impl SoftmaxRun {
    /// A run whose sums start from `floor` (a logit known to be near the top, or −∞).
    pub fn new(floor: f32, argmax: usize) -> Self {
        Self {
            max: floor,
            sum: 0.0,
            argmax,
        }
    }

    /// Before rows whose largest logit is `block_max` are added: raises the max to it where it
    /// is higher, scaling the sum and `acc` down to the new max. Returns false while the max
    /// is still −∞ (every weight is 0: nothing to add).
    pub fn raise(&mut self, block_max: f32, acc: &mut [f32]) -> bool {
        if block_max > self.max {
            if self.max > f32::NEG_INFINITY {
                let c = (self.max - block_max).exp();
                acc.iter_mut().for_each(|a| *a *= c);
                self.sum *= c;
            }
            self.max = block_max;
        }
        self.max > f32::NEG_INFINITY
    }
}

impl SoftmaxMap {
    /// The runs' sums brought to their common max, added and normalised: `softmax(z) · W` over
    /// every row the runs saw, `cols` wide.
    pub fn merge<'a>(cols: usize, runs: impl IntoIterator<Item = (SoftmaxRun, &'a [f32])>) -> Self {
        let runs: Vec<_> = runs.into_iter().collect();
        let (max, argmax) = runs.iter().fold((f32::NEG_INFINITY, 0), |(m, a), (r, _)| {
            if r.max > m { (r.max, r.argmax) } else { (m, a) }
        });
        let mut map = vec![0f32; cols];
        let mut sum = 0f32;
        for (run, part) in &runs {
            if run.max == f32::NEG_INFINITY {
                continue;
            }
            let c = (run.max - max).exp();
            sum += c * run.sum;
            kernels::axpy(c, part, &mut map);
        }
        if sum > 0.0 {
            map.iter_mut().for_each(|v| *v /= sum);
        }
        Self {
            map,
            max,
            sum,
            argmax,
        }
    }
}

/// Bytes of rows a block reads twice: they stay in a core's L2 (1 MiB on Zen 4, 256 KiB on
/// older cores shared with the sums) between the product and the sum.
const BLOCK_BYTES: usize = 128 * 1024;

impl PackedMatrix {
    /// One pass over the rows: for each row `r`, `y_r = W_r · x`, then its logit
    /// `z_r = update(r, Some(y_r), &mut state[r])`, then `softmax(z) · W` summed from the same
    /// rows while they are still in cache. The same values as [`matmul_t`](Self::matmul_t) (one
    /// row), a softmax and [`vecmat`](Self::vecmat), reading the matrix once instead of twice.
    ///
    /// Two things let it read less, neither changing a value:
    /// - rows where `needs_product(&state[r])` is false get `update(r, None, ..)`, and a block of
    ///   such rows is not read for the product;
    /// - `likely_max`, a row whose logit is likely the largest (the last argmax), is updated
    ///   first, and the sums start from its logit: a row more than 104 below it has softmax
    ///   weight exactly 0 in f32, so it is not read for the sum either (without the hint a
    ///   thread's own largest logit would set the scale, and its rows would be added only to
    ///   be scaled to nothing at the end).
    ///
    /// `update` runs once per row, on the kernel threads, in no particular order.
    ///
    /// Panics if `x.len() != cols` or `state.len() != rows`.
    pub fn matvec_softmax_vecmat<S: Send>(
        &self,
        x: &[f32],
        state: &mut [S],
        likely_max: Option<usize>,
        needs_product: impl Fn(&S) -> bool + Sync,
        update: impl Fn(usize, Option<f32>, &mut S) -> f32 + Sync,
    ) -> SoftmaxMap {
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!(x.len(), cols, "vector is not [{cols}]");
        assert_eq!(state.len(), rows, "state is not [{rows}]");
        if rows == 0 {
            return SoftmaxMap {
                map: vec![0.0; cols],
                max: f32::NEG_INFINITY,
                sum: 0.0,
                argmax: 0,
            };
        }
        let rb = self.row_bytes();
        let block = (BLOCK_BYTES / rb.max(1)).clamp(VECMAT_GROUP, 256) / 4 * 4;
        // Two runs per thread, as `vecmat`: each with its own sum, max and total.
        let runs = (2 * pool::threads()).min(rows);
        let run_rows = rows.div_ceil(runs);
        let runs = rows.div_ceil(run_rows);
        let acts = kernels::Acts::new(self.format, self.activations, x, 1, cols);
        let dot = kernels::dot_kernel(self.format, self.activations);
        let product = |r: usize| {
            let mut y = [0f32];
            dot(self.format, self.row(r), &acts, &mut y);
            y[0]
        };
        // The hint row first; every thread's sum starts from its logit.
        let hint = likely_max.filter(|&h| h < rows).map(|h| {
            let y = needs_product(&state[h]).then(|| product(h));
            (h, update(h, y, &mut state[h]))
        });
        let floor = match hint {
            Some((_, z)) if z.is_finite() => z,
            _ => f32::NEG_INFINITY,
        };
        let mut sums = vec![0f32; runs * cols];
        let mut totals = vec![SoftmaxRun::new(f32::NEG_INFINITY, 0); runs];
        let (out, tot, st) = (
            SendPtr(sums.as_mut_ptr()),
            SendPtr(totals.as_mut_ptr()),
            SendPtr(state.as_mut_ptr()),
        );
        pool::for_each(runs, &|t| {
            let (r0, r1) = (t * run_rows, ((t + 1) * run_rows).min(rows));
            // Safety: each task writes its own `cols` values of `sums`, its own entry of
            // `totals` and rows r0..r1 of `state`, all of which outlive the call.
            let acc = unsafe { std::slice::from_raw_parts_mut(out.ptr().add(t * cols), cols) };
            let state = unsafe { std::slice::from_raw_parts_mut(st.ptr().add(r0), r1 - r0) };
            let mut run = SoftmaxRun::new(floor, hint.map_or(r0, |(h, _)| h));
            let (mut y, mut z) = (vec![0f32; block], vec![0f32; block]);
            let mut group = RowGroup::new(self.format);
            for b0 in (r0..r1).step_by(block) {
                let n = block.min(r1 - b0);
                let rows_state = &mut state[b0 - r0..b0 - r0 + n];
                let read = rows_state.iter().any(&needs_product);
                if read {
                    dot(
                        self.format,
                        &self.bytes()[b0 * rb..(b0 + n) * rb],
                        &acts,
                        &mut y[..n],
                    );
                }
                let mut block_max = f32::NEG_INFINITY;
                for (i, row) in rows_state.iter_mut().enumerate() {
                    z[i] = match hint {
                        Some((h, zh)) if h == b0 + i => zh,
                        _ => update(b0 + i, read.then_some(y[i]), row),
                    };
                    if z[i] > block_max {
                        block_max = z[i];
                        if block_max > run.max {
                            run.argmax = b0 + i;
                        }
                    }
                }
                if !run.raise(block_max, acc) {
                    continue;
                }
                for (i, &zi) in z[..n].iter().enumerate() {
                    let w = (zi - run.max).exp();
                    run.sum += w;
                    if w != 0.0 {
                        group.push(self.row(b0 + i), w, acc);
                    }
                }
                // The block's rows are added before the next block can raise the max.
                group.flush(acc);
            }
            // Safety: as above.
            unsafe { *tot.ptr().add(t) = run };
        });
        SoftmaxMap::merge(cols, totals.into_iter().zip(sums.chunks_exact(cols)))
    }
}
