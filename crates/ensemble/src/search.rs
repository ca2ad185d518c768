//! From the relative space back to the main model's vocabulary (DeePEn §3.3): a few gradient
//! steps on the main model's logits `z` that bring `softmax(z) · R_main` close to the
//! aggregated relative representation.
//!
//! The gradient is closed-form (`s ⊙ (g − ⟨s, g⟩)` with `g = −(t / q) · Rᵀ`): matmuls on the
//! device for a dense matrix on a GPU (two passes over `R` per step), loops on the host for a
//! sparse one, kiln-core's matrix kernels on the host for a dense one on the CPU (see
//! [`crate::relative`]). On the host a row's gradient needs only its own row of `R` once
//! `⟨s, g⟩ = ⟨q, −t / q⟩` is known, so each step reads the matrix once, dense or sparse: the
//! gradient, the update and the next step's `softmax(z) · R` from the same rows
//! ([`PackedMatrix::matvec_softmax_vecmat`](kiln_core::packed::PackedMatrix::matvec_softmax_vecmat),
//! and its sparse counterpart in [`crate::relative`]), and the first step starts from the map the average already made. Burn's autodiff computes
//! the same gradient ([`SearchGradient::Autodiff`]; the tests hold the two together) but records
//! a graph and replays it each step, and its sparse map runs through gather/scatter: the search
//! cost 2–3× both members' forwards that way.
//!
//! The loss is `KL(target ‖ softmax(z) · R_main)`, as the reference code's
//! `nn.KLDivLoss()(log(softmax(z) · R), target)` (mean over anchors). Its default optimiser is
//! the reference code's too: AdamW (β = 0.9, 0.999, weight decay 0.01) with the learning rate
//! annealed by a cosine from η to η/4 over 10 steps, starting from the main model's logits.

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::activation::softmax;

use crate::ensemble::host_vec;
use crate::error::{EnsembleError, Result};
use crate::relative::{HostMap, RelativeMatrix, host_softmax};

/// The update rule of the search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchOptimizer {
    /// AdamW with cosine annealing, as the reference code (default).
    AdamW,
    /// Plain gradient descent `z ← z − η ∇z`, as the paper's equation, on the summed KL.
    Sgd,
}

/// How the search's gradient is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SearchGradient {
    /// The closed form, in plain tensor ops (default).
    #[default]
    Analytic,
    /// Burn's autodiff through the loss (slower; the reference the closed form is tested on).
    Autodiff,
}

/// Learning rate, steps and optimiser of the inverse search.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchConfig {
    /// Learning rate η (the paper tunes it per task in 0.05–0.3; 0.15 is its common value).
    pub learning_rate: f32,
    /// Number of steps T (reference code: 5).
    pub steps: usize,
    /// Update rule.
    pub optimizer: SearchOptimizer,
    /// How the gradient is computed.
    pub gradient: SearchGradient,
}

impl Default for SearchConfig {
    fn default() -> Self {
        Self {
            learning_rate: 0.15,
            steps: 5,
            optimizer: SearchOptimizer::AdamW,
            gradient: SearchGradient::Analytic,
        }
    }
}

impl SearchConfig {
    /// Sets η.
    pub fn with_learning_rate(mut self, lr: f32) -> Self {
        self.learning_rate = lr;
        self
    }
    /// Sets T.
    pub fn with_steps(mut self, steps: usize) -> Self {
        self.steps = steps;
        self
    }
    /// Sets the optimiser.
    pub fn with_optimizer(mut self, optimizer: SearchOptimizer) -> Self {
        self.optimizer = optimizer;
        self
    }

    /// Sets how the gradient is computed.
    pub fn with_gradient(mut self, gradient: SearchGradient) -> Self {
        self.gradient = gradient;
        self
    }

    /// Checks the fields are in range.
    pub fn validate(&self) -> Result<()> {
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            return Err(EnsembleError::arg(
                "learning_rate",
                format!(
                    "must be finite and non-negative, got {}",
                    self.learning_rate
                ),
            ));
        }
        Ok(())
    }
}

/// AdamW's constants (PyTorch defaults, as the reference code) and the cosine schedule's period.
const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const EPS: f32 = 1e-8;
const WEIGHT_DECAY: f32 = 0.01;
const COSINE_PERIOD: f32 = 10.0;

/// Sparse matrices can leave an anchor with no mass at all; a floor keeps the log finite.
const Q_FLOOR: f32 = 1e-30;

/// The loss `KL(target ‖ softmax(z) · R)` without the constant `Σ target ln target`:
/// `−Σ target · ln(softmax(z) · R)`, divided by the number of anchors when `mean`.
fn loss<B: Backend>(
    z: Tensor<B, 2>,
    target: Tensor<B, 2>,
    relative: &RelativeMatrix<B>,
    mean: bool,
) -> Tensor<B, 1> {
    let q = relative.map(softmax(z, 1));
    let anchors = q.dims()[1];
    let nll = (target * q.clamp_min(Q_FLOOR).log()).sum().neg();
    if mean { nll / anchors as f32 } else { nll }
}

/// ∇z of [`loss`] in closed form. With `s = softmax(z)` and `q = s · R`:
/// `∂L/∂q = −t / q` (zero where the floor holds, as the clamp's own gradient), `∂L/∂s =
/// (∂L/∂q) · Rᵀ`, and through the softmax `∂L/∂z = s ⊙ (∂L/∂s − ⟨s, ∂L/∂s⟩)`.
/// This one for a dense matrix, in tensor ops on its device.
fn dense_gradient<B: Backend>(
    z: Tensor<B, 2>,
    target: Tensor<B, 2>,
    relative: &Tensor<B, 2>,
    mean: bool,
) -> Tensor<B, 2> {
    let s = softmax(z, 1);
    let q = s.clone().matmul(relative.clone());
    let anchors = q.dims()[1];
    let scale = if mean { -1.0 / anchors as f32 } else { -1.0 };
    let floored = q.clone().lower_equal_elem(Q_FLOOR);
    let dq = (target / q.clamp_min(Q_FLOOR)).mask_fill(floored, 0.0) * scale;
    // `R · dqᵀ`, transposed back, rather than `dq · Rᵀ`: CPU backends copy a transposed
    // right-hand side on every matmul, here the whole |V| × |A| matrix per step.
    let [rows, vocab] = s.dims();
    let ds = relative
        .clone()
        .matmul(dq.transpose())
        .transpose()
        .reshape([rows, vocab]);
    let dot = (s.clone() * ds.clone()).sum_dim(1);
    s * (ds - dot)
}

/// A row's logit and its AdamW moments, in the host search.
#[derive(Debug, Clone, Copy)]
struct Row {
    z: f32,
    m: f32,
    v: f32,
}

/// The anchor-side terms of [`loss`]'s gradient at `q = softmax(z) · R`: `∂L/∂q = −t / q`
/// (zero where the floor holds) and `⟨q, ∂L/∂q⟩`, which equals `⟨s, ∂L/∂s⟩` because
/// `∂L/∂s = R · ∂L/∂q`, so a row's gradient `s_r ((R · ∂L/∂q)_r − ⟨s, ∂L/∂s⟩)` needs only its
/// own row of `R` ([`row_gradient`]).
fn anchor_terms(q: &[f32], target: &[f32], mean: bool) -> (Vec<f32>, f32) {
    let scale = if mean { -1.0 / q.len() as f32 } else { -1.0 };
    let dq: Vec<f32> = q
        .iter()
        .zip(target)
        .map(|(&q, &t)| if q > Q_FLOOR { scale * t / q } else { 0.0 })
        .collect();
    let dot = q.iter().zip(&dq).map(|(a, b)| a * b).sum();
    (dq, dot)
}

/// One row's gradient: `s_r (ds_r − dot)` with `s_r = exp(z_r − max) / sum`.
#[inline]
fn row_gradient(z: f32, ds: f32, max: f32, sum: f32, dot: f32) -> f32 {
    (z - max).exp() / sum * (ds - dot)
}

/// Where a host search starts: the main model's logits `z`, their softmax (`exp(z_r − max) /
/// sum`) and its map `q = softmax(z) · R`, which [`relative_average`](crate::relative_average)
/// has already computed for the main member (one pass over `R` fewer per step of DeePEn).
pub(crate) struct HostStart {
    z: Vec<f32>,
    max: f32,
    sum: f32,
    q: Vec<f32>,
}

impl HostStart {
    /// From the logits, their softmax's max and sum, and its map.
    pub(crate) fn new(z: Vec<f32>, max: f32, sum: f32, q: Vec<f32>) -> Self {
        Self { z, max, sum, q }
    }

    /// From the logits alone: the softmax and one map.
    fn map<H: HostMap>(z: Vec<f32>, relative: &H) -> Self {
        let (s, max, sum) = host_softmax(&z);
        let q = relative.map(&s);
        Self { z, max, sum, q }
    }
}

/// The search for a matrix in host memory (sparse, or dense packed). A step is one pass over
/// `R` where the matrix allows ([`HostMap::map_softmax_step`]): each row's gradient from
/// `R · ∂L/∂q`, its update, and the next step's `softmax(z) · R` from the same rows; the last
/// step needs no map. So T steps read a dense matrix T + 1 times, against 2T as a gradient
/// then a map. Starts from `start` where the caller has it, else from `logits`.
fn host_search<B: Backend, H: HostMap>(
    relative: &H,
    start: Option<HostStart>,
    logits: &Tensor<B, 1>,
    target: &Tensor<B, 1>,
    config: &SearchConfig,
    mean: bool,
    lr_at: impl Fn(usize) -> f32,
) -> Result<Vec<f32>> {
    let target = host_vec(target.clone(), "target")?;
    let HostStart {
        z,
        mut max,
        mut sum,
        mut q,
    } = match start {
        Some(start) => start,
        None => HostStart::map(host_vec(logits.clone(), "logits")?, relative),
    };
    let mut argmax = z.iter().position(|&z| z == max);
    let mut rows: Vec<Row> = z.into_iter().map(|z| Row { z, m: 0.0, v: 0.0 }).collect();
    for t in 0..config.steps {
        let (dq, dot) = anchor_terms(&q, &target, mean);
        let (lr, step) = (lr_at(t), (t + 1) as i32);
        let (c1, c2) = (1.0 - BETA1.powi(step), 1.0 - BETA2.powi(step));
        let (max_t, sum_t) = (max, sum);
        // A row more than 104 below the max has softmax weight exactly 0 in f32, so gradient 0
        // whatever its product: the pass need not read it for that.
        let needs_product = |row: &Row| row.z - max_t >= -104.0;
        let update = |_: usize, ds: Option<f32>, row: &mut Row| {
            let g = row_gradient(row.z, ds.unwrap_or(0.0), max_t, sum_t, dot);
            match config.optimizer {
                SearchOptimizer::Sgd => row.z -= config.learning_rate * g,
                SearchOptimizer::AdamW => {
                    row.m = row.m * BETA1 + g * (1.0 - BETA1);
                    row.v = row.v * BETA2 + g * g * (1.0 - BETA2);
                    let (m_hat, v_hat) = (row.m / c1, row.v / c2);
                    row.z = row.z * (1.0 - lr * WEIGHT_DECAY) - m_hat / (v_hat.sqrt() + EPS) * lr;
                }
            }
            row.z
        };
        if t + 1 < config.steps {
            let next = relative.map_softmax_step(&dq, &mut rows, argmax, needs_product, update);
            (q, max, sum, argmax) = (next.map, next.max, next.sum, Some(next.argmax));
        } else {
            let ds = relative.map_transposed(&dq);
            for (r, (row, &ds)) in rows.iter_mut().zip(&ds).enumerate() {
                update(r, Some(ds), row);
            }
        }
    }
    Ok(rows.into_iter().map(|r| r.z).collect())
}

/// ∇z of [`loss`] through Burn's autodiff.
fn autodiff_gradient<B: Backend>(
    z: Tensor<B, 2>,
    target: &Tensor<Autodiff<B>, 2>,
    relative: &RelativeMatrix<Autodiff<B>>,
    mean: bool,
) -> Result<Tensor<B, 2>> {
    let zt = Tensor::<Autodiff<B>, 2>::from_inner(z).require_grad();
    let grads = loss(zt.clone(), target.clone(), relative, mean).backward();
    zt.grad(&grads)
        .ok_or_else(|| EnsembleError::arg("logits", "no gradient reached the logits"))
}

/// Searches main-model logits whose relative representation matches `target`: starts from
/// `logits` (`[vocab]`) and returns the logits after `config.steps` steps.
pub fn inverse_search<B: Backend>(
    logits: Tensor<B, 1>,
    target: Tensor<B, 1>,
    relative: &RelativeMatrix<B>,
    config: &SearchConfig,
) -> Result<Tensor<B, 1>> {
    inverse_search_from(logits, None, target, relative, config)
}

/// [`inverse_search`], where a host search may start from `start` (the logits' softmax and map
/// already computed; it must be of `logits`).
pub(crate) fn inverse_search_from<B: Backend>(
    logits: Tensor<B, 1>,
    start: Option<HostStart>,
    target: Tensor<B, 1>,
    relative: &RelativeMatrix<B>,
    config: &SearchConfig,
) -> Result<Tensor<B, 1>> {
    config.validate()?;
    let vocab = logits.dims()[0];
    if relative.vocab() != vocab {
        return Err(EnsembleError::arg(
            "logits",
            format!(
                "{vocab} logits for a relative matrix of {} rows",
                relative.vocab()
            ),
        ));
    }
    if config.steps == 0 || config.learning_rate == 0.0 {
        return Ok(logits);
    }
    let lr0 = config.learning_rate;
    let lr_min = lr0 / 4.0;
    // CosineAnnealingLR(T_max = 10, eta_min = η/4), stepped after each update.
    let lr_at = |t: usize| {
        lr_min
            + (lr0 - lr_min) * (1.0 + (std::f32::consts::PI * t as f32 / COSINE_PERIOD).cos()) / 2.0
    };
    // The reference code's KLDivLoss averages over anchors; the paper's plain step sums.
    let mean = config.optimizer == SearchOptimizer::AdamW;
    let device = logits.device();
    let on_host = match (config.gradient, relative) {
        (SearchGradient::Analytic, RelativeMatrix::Sparse(r)) => Some(host_search(
            r, start, &logits, &target, config, mean, lr_at,
        )?),
        (SearchGradient::Analytic, RelativeMatrix::Packed(r)) => Some(host_search(
            r, start, &logits, &target, config, mean, lr_at,
        )?),
        _ => None,
    };
    if let Some(z) = on_host {
        return Ok(Tensor::from_data(TensorData::new(z, [vocab]), &device));
    }
    let target = target.unsqueeze::<2>();
    // The autodiff view of the matrix and target, built once for all steps.
    let autodiff = (config.gradient == SearchGradient::Autodiff).then(|| {
        (
            relative.convert(&device, Tensor::from_inner),
            Tensor::<Autodiff<B>, 2>::from_inner(target.clone()),
        )
    });
    let mut z = logits.unsqueeze::<2>();
    let (mut m, mut v) = (z.zeros_like(), z.zeros_like());
    for t in 0..config.steps {
        let g = match (&autodiff, relative) {
            (Some((rel, target)), _) => autodiff_gradient(z.clone(), target, rel, mean)?,
            (None, RelativeMatrix::Dense(r)) => dense_gradient(z.clone(), target.clone(), r, mean),
            (None, RelativeMatrix::Sparse(_) | RelativeMatrix::Packed(_)) => {
                unreachable!("handled on the host above")
            }
        };
        z = match config.optimizer {
            SearchOptimizer::Sgd => z - g * lr0,
            SearchOptimizer::AdamW => {
                let (lr, step) = (lr_at(t), (t + 1) as i32);
                m = m * BETA1 + g.clone() * (1.0 - BETA1);
                v = v * BETA2 + g.powi_scalar(2) * (1.0 - BETA2);
                let m_hat = m.clone() / (1.0 - BETA1.powi(step));
                let v_hat = v.clone() / (1.0 - BETA2.powi(step));
                z.clone() * (1.0 - lr * WEIGHT_DECAY) - m_hat / (v_hat.sqrt() + EPS) * lr
            }
        };
    }
    Ok(z.squeeze::<1>())
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;

    use super::*;
    use crate::relative::RelativeConfig;

    type B = NdArray;

    fn setup() -> (RelativeMatrix<B>, Vec<f32>, Vec<f64>) {
        let e =
            Tensor::<B, 2>::from_data([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], &Default::default());
        let config = RelativeConfig::default().with_temperature(1.0);
        let r = RelativeMatrix::build(e, &[0, 1], &config).unwrap();
        let ee = std::f64::consts::E;
        let (hi, lo) = (ee / (ee + 1.0), 1.0 / (ee + 1.0));
        (r, vec![0.5, -0.2, 0.1], vec![hi, lo, lo, hi, 0.5, 0.5])
    }

    /// ∇z of −Σ t ln(softmax(z)·R), by hand: g_s[v] = −Σ_a R[v,a] t_a / q_a, then through the
    /// softmax: s ⊙ (g_s − ⟨s, g_s⟩).
    fn hand_gradient(z: &[f32], r: &[f64], t: &[f64]) -> Vec<f64> {
        let m = z.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
        let ex: Vec<f64> = z.iter().map(|&x| (x as f64 - m).exp()).collect();
        let sum: f64 = ex.iter().sum();
        let s: Vec<f64> = ex.iter().map(|x| x / sum).collect();
        let q: Vec<f64> = (0..2)
            .map(|a| (0..3).map(|v| s[v] * r[v * 2 + a]).sum())
            .collect();
        let gs: Vec<f64> = (0..3)
            .map(|v| -(0..2).map(|a| r[v * 2 + a] * t[a] / q[a]).sum::<f64>())
            .collect();
        let dot: f64 = s.iter().zip(&gs).map(|(a, b)| a * b).sum();
        (0..3).map(|v| s[v] * (gs[v] - dot)).collect()
    }

    const GRADIENTS: [SearchGradient; 2] = [SearchGradient::Analytic, SearchGradient::Autodiff];

    /// `inverse_search` from host logits and target, back on the host.
    fn search(z: &[f32], target: &[f32], r: &RelativeMatrix<B>, config: &SearchConfig) -> Vec<f32> {
        let device = Default::default();
        let logits = Tensor::<B, 1>::from_data(z, &device);
        let target = Tensor::<B, 1>::from_data(target, &device);
        inverse_search(logits, target, r, config)
            .unwrap()
            .into_data()
            .into_vec()
            .unwrap()
    }

    #[test]
    fn one_sgd_step_by_hand() {
        let (r, z, rh) = setup();
        let t = [0.2f64, 0.8];
        let g = hand_gradient(&z, &rh, &t);
        let lr = 0.5;
        for gradient in GRADIENTS {
            let config = SearchConfig::default()
                .with_learning_rate(lr)
                .with_steps(1)
                .with_optimizer(SearchOptimizer::Sgd)
                .with_gradient(gradient);
            let out = search(&z, &[0.2, 0.8], &r, &config);
            for v in 0..3 {
                let want = z[v] as f64 - lr as f64 * g[v];
                assert!(
                    (out[v] as f64 - want).abs() < 1e-5,
                    "{gradient:?}: {out:?} vs step {g:?}"
                );
            }
        }
    }

    #[test]
    fn one_adamw_step_by_hand() {
        // First Adam step: m̂ = g, v̂ = g², so the update is η·g/(|g| + ε) ≈ η·sign(g), after
        // the decoupled decay z·(1 − η·0.01).
        let (r, z, rh) = setup();
        let g = hand_gradient(&z, &rh, &[0.2, 0.8]);
        let lr = 0.15f64;
        for gradient in GRADIENTS {
            let config = SearchConfig::default()
                .with_steps(1)
                .with_gradient(gradient);
            let out = search(&z, &[0.2, 0.8], &r, &config);
            for v in 0..3 {
                let want = z[v] as f64 * (1.0 - lr * 0.01) - lr * g[v].signum();
                assert!((out[v] as f64 - want).abs() < 1e-4, "{gradient:?}: {out:?}");
            }
        }
    }

    /// A pseudo-random case bigger than the hand-computed one: 64 tokens, 12 anchors, dense and
    /// top-5 sparse matrices.
    fn random_case(top_k: Option<usize>) -> (RelativeMatrix<B>, Tensor<B, 2>, Tensor<B, 2>) {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let (vocab, dim) = (64, 8);
        let device = Default::default();
        let e: Vec<f32> = (0..vocab * dim).map(|_| next()).collect();
        let e = Tensor::<B, 2>::from_data(TensorData::new(e, [vocab, dim]), &device);
        let anchors: Vec<u32> = (0..12).map(|i| i * 5).collect();
        // A low temperature keeps the rows spread out, so every entry of the gradient matters.
        let config = RelativeConfig::default()
            .with_temperature(3.0)
            .with_top_k(top_k);
        let r = RelativeMatrix::build(e, &anchors, &config).unwrap();
        let z: Vec<f32> = (0..vocab).map(|_| 4.0 * next()).collect();
        let z = Tensor::<B, 2>::from_data(TensorData::new(z, [1, vocab]), &device);
        let t: Vec<f32> = (0..12).map(|_| next() + 0.6).collect();
        let sum: f32 = t.iter().sum();
        let t: Vec<f32> = t.iter().map(|x| x / sum).collect();
        let t = Tensor::<B, 2>::from_data(TensorData::new(t, [1, 12]), &device);
        (r, z, t)
    }

    /// The dense matrix as a device tensor (what GPU backends hold), from the host one.
    fn on_device(r: &RelativeMatrix<B>) -> RelativeMatrix<B> {
        let values = r.to_f32().unwrap();
        RelativeMatrix::Dense(Tensor::from_data(
            TensorData::new(values, [r.vocab(), r.anchors()]),
            &Default::default(),
        ))
    }

    /// The host search's gradient at `z`, from its pieces.
    fn host_gradient<H: HostMap>(z: &[f32], target: &[f32], r: &H, mean: bool) -> Vec<f32> {
        let (s, max, sum) = host_softmax(z);
        let (dq, dot) = anchor_terms(&r.map(&s), target, mean);
        let ds = r.map_transposed(&dq);
        z.iter()
            .zip(&ds)
            .map(|(&z, &ds)| row_gradient(z, ds, max, sum, dot))
            .collect()
    }

    #[test]
    fn analytic_gradient_equals_autodiff() {
        // Dense on the host (what the CPU backends hold), dense on the device, sparse.
        let (packed, _, _) = random_case(None);
        assert!(matches!(packed, RelativeMatrix::Packed(_)));
        let cases = [
            (packed.clone(), "host dense"),
            (on_device(&packed), "device dense"),
            (random_case(Some(5)).0, "top-5"),
        ];
        for (r, what) in cases {
            for mean in [false, true] {
                let (_, z, t) = random_case(None);
                let analytic: Vec<f32> = match &r {
                    RelativeMatrix::Dense(d) => dense_gradient(z.clone(), t.clone(), d, mean)
                        .into_data()
                        .into_vec()
                        .unwrap(),
                    RelativeMatrix::Sparse(_) | RelativeMatrix::Packed(_) => {
                        let zh: Vec<f32> = z.clone().into_data().into_vec().unwrap();
                        let th: Vec<f32> = t.clone().into_data().into_vec().unwrap();
                        match &r {
                            RelativeMatrix::Sparse(s) => host_gradient(&zh, &th, s, mean),
                            RelativeMatrix::Packed(p) => host_gradient(&zh, &th, p, mean),
                            RelativeMatrix::Dense(_) => unreachable!(),
                        }
                    }
                };
                let rel = r.convert(&Default::default(), Tensor::from_inner);
                let auto: Vec<f32> = autodiff_gradient(z, &Tensor::from_inner(t), &rel, mean)
                    .unwrap()
                    .into_data()
                    .into_vec()
                    .unwrap();
                let scale = auto.iter().fold(0f32, |a, b| a.max(b.abs()));
                assert!(scale > 1e-4, "degenerate case: gradient {scale}");
                for (a, b) in analytic.iter().zip(&auto) {
                    assert!(
                        (a - b).abs() <= 1e-5 * scale,
                        "{what}, mean {mean}: {a} vs {b} (scale {scale})"
                    );
                }
            }
        }
    }

    #[test]
    fn sparse_search_with_every_anchor_equals_dense() {
        // The host loops (sparse), the host kernels (dense, packed) and the device matmuls
        // (dense) are three codings of one search.
        let (dense, z, t) = random_case(None);
        let (sparse, _, _) = random_case(Some(12));
        let device = on_device(&dense);
        for optimizer in [SearchOptimizer::Sgd, SearchOptimizer::AdamW] {
            let config = SearchConfig::default()
                .with_optimizer(optimizer)
                .with_learning_rate(0.5)
                .with_steps(6);
            let run = |r: &RelativeMatrix<B>| -> Vec<f32> {
                inverse_search(z.clone().squeeze(), t.clone().squeeze(), r, &config)
                    .unwrap()
                    .into_data()
                    .into_vec()
                    .unwrap()
            };
            let (a, b, c) = (run(&dense), run(&sparse), run(&device));
            for ((x, y), w) in a.iter().zip(&b).zip(&c) {
                assert!((x - y).abs() < 1e-4, "{optimizer:?}: {x} vs {y}");
                assert!(
                    (x - w).abs() < 1e-4,
                    "{optimizer:?}: {x} vs {w} on the device"
                );
            }
        }
    }

    #[test]
    fn sgd_searches_agree_over_several_steps() {
        for top_k in [None, Some(5)] {
            let (r, z, t) = random_case(top_k);
            let run = |gradient| -> Vec<f32> {
                let config = SearchConfig::default()
                    .with_optimizer(SearchOptimizer::Sgd)
                    .with_learning_rate(2.0)
                    .with_steps(6)
                    .with_gradient(gradient);
                inverse_search(z.clone().squeeze(), t.clone().squeeze(), &r, &config)
                    .unwrap()
                    .into_data()
                    .into_vec()
                    .unwrap()
            };
            let (a, b) = (run(SearchGradient::Analytic), run(SearchGradient::Autodiff));
            let start: Vec<f32> = z.clone().into_data().into_vec().unwrap();
            let moved = a
                .iter()
                .zip(&start)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(moved > 1e-3, "the search did not move: {moved}");
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-5, "top_k {top_k:?}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn search_moves_towards_the_target() {
        // Main puts its mass on token 0 (anchor 0); the target favours anchor 1: after the
        // search token 1 must have gained probability.
        let (r, _, _) = setup();
        let logits = Tensor::<B, 1>::from_data([2.0f32, 0.0, 0.0], &Default::default());
        let target = Tensor::<B, 1>::from_data([0.27f32, 0.73], &Default::default());
        let out = inverse_search(logits.clone(), target, &r, &SearchConfig::default()).unwrap();
        let p = |t: Tensor<B, 1>| -> Vec<f32> {
            softmax(t.unsqueeze::<2>(), 1)
                .into_data()
                .into_vec()
                .unwrap()
        };
        assert!(p(out)[1] > p(logits)[1] + 0.05);
    }
}
