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
        // Per run: its largest logit (at least `floor`), the sum of exp(z − it), its row.
        let mut totals = vec![(f32::NEG_INFINITY, 0f32, 0usize); runs];
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
            let (mut max, mut sum, mut argmax) = (floor, 0f32, hint.map_or(r0, |(h, _)| h));
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
                        if block_max > max {
                            argmax = b0 + i;
                        }
                    }
                }
                if block_max > max {
                    if max > f32::NEG_INFINITY {
                        let c = (max - block_max).exp();
                        acc.iter_mut().for_each(|a| *a *= c);
                        sum *= c;
                    }
                    max = block_max;
                }
                if max == f32::NEG_INFINITY {
                    continue;
                }
                for (i, &zi) in z[..n].iter().enumerate() {
                    let w = (zi - max).exp();
                    sum += w;
                    if w != 0.0 {
                        group.push(self.row(b0 + i), w, acc);
                    }
                }
                // The block's rows are added before the next block can raise the max.
                group.flush(acc);
            }
            // Safety: as above.
            unsafe { *tot.ptr().add(t) = (max, sum, argmax) };
        });
        let (max, argmax) = totals
            .iter()
            .fold((f32::NEG_INFINITY, 0), |(m, a), &(mt, _, at)| {
                if mt > m { (mt, at) } else { (m, a) }
            });
        let mut map = vec![0f32; cols];
        let mut sum = 0f32;
        for (&(m, s, _), part) in totals.iter().zip(sums.chunks_exact(cols)) {
            if m == f32::NEG_INFINITY {
                continue;
            }
            let c = (m - max).exp();
            sum += c * s;
            kernels::axpy(c, part, &mut map);
        }
        if sum > 0.0 {
            map.iter_mut().for_each(|v| *v /= sum);
        }
        SoftmaxMap {
            map,
            max,
            sum,
            argmax,
        }
    }
}
