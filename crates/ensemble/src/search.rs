//! From the relative space back to the main model's vocabulary (DeePEn §3.3): a few gradient
//! steps on the main model's logits `z` that bring `softmax(z) · R_main` close to the
//! aggregated relative representation, run with Burn's autodiff.
//!
//! The loss is `KL(target ‖ softmax(z) · R_main)`, as the reference code's
//! `nn.KLDivLoss()(log(softmax(z) · R), target)` (mean over anchors). Its default optimiser is
//! the reference code's too: AdamW (β = 0.9, 0.999, weight decay 0.01) with the learning rate
//! annealed by a cosine from η to η/4 over 10 steps, starting from the main model's logits.

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::activation::softmax;

use crate::error::{EnsembleError, Result};
use crate::relative::RelativeMatrix;

/// The update rule of the search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchOptimizer {
    /// AdamW with cosine annealing, as the reference code (default).
    AdamW,
    /// Plain gradient descent `z ← z − η ∇z`, as the paper's equation, on the summed KL.
    Sgd,
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
}

impl Default for SearchConfig {
    fn default() -> Self {
        Self {
            learning_rate: 0.15,
            steps: 5,
            optimizer: SearchOptimizer::AdamW,
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
    // Sparse matrices can leave an anchor with no mass at all; a floor keeps the log finite.
    let nll = (target * q.clamp_min(1e-30).log()).sum().neg();
    if mean { nll / anchors as f32 } else { nll }
}

/// Searches main-model logits whose relative representation matches `target`: starts from
/// `logits` (`[vocab]`) and returns the logits after `config.steps` steps.
pub fn inverse_search<B: Backend>(
    logits: Tensor<B, 1>,
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
    type A<B> = Autodiff<B>;
    let rel: RelativeMatrix<A<B>> = relative.convert(Tensor::from_inner, Tensor::from_inner);
    let target = Tensor::<A<B>, 2>::from_inner(target.unsqueeze::<2>());
    let mut z = logits.unsqueeze::<2>();
    let (mut m, mut v) = (z.zeros_like(), z.zeros_like());
    let lr0 = config.learning_rate;
    let lr_min = lr0 / 4.0;
    for t in 0..config.steps {
        let zt = Tensor::<A<B>, 2>::from_inner(z.clone()).require_grad();
        let adam = config.optimizer == SearchOptimizer::AdamW;
        let grads = loss(zt.clone(), target.clone(), &rel, adam).backward();
        let Some(g) = zt.grad(&grads) else {
            return Err(EnsembleError::arg(
                "logits",
                "no gradient reached the logits",
            ));
        };
        z = match config.optimizer {
            SearchOptimizer::Sgd => z - g * lr0,
            SearchOptimizer::AdamW => {
                // CosineAnnealingLR(T_max = 10, eta_min = η/4), stepped after each update.
                let lr = lr_min
                    + (lr0 - lr_min)
                        * (1.0 + (std::f32::consts::PI * t as f32 / COSINE_PERIOD).cos())
                        / 2.0;
                let step = (t + 1) as i32;
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

    #[test]
    fn one_sgd_step_by_hand() {
        let (r, z, rh) = setup();
        let t = [0.2f64, 0.8];
        let g = hand_gradient(&z, &rh, &t);
        let lr = 0.5;
        let logits = Tensor::<B, 1>::from_data(z.as_slice(), &Default::default());
        let target = Tensor::<B, 1>::from_data([0.2f32, 0.8], &Default::default());
        let config = SearchConfig::default()
            .with_learning_rate(lr)
            .with_steps(1)
            .with_optimizer(SearchOptimizer::Sgd);
        let out: Vec<f32> = inverse_search(logits, target, &r, &config)
            .unwrap()
            .into_data()
            .into_vec()
            .unwrap();
        for v in 0..3 {
            let want = z[v] as f64 - lr as f64 * g[v];
            assert!((out[v] as f64 - want).abs() < 1e-5, "{out:?} vs step {g:?}");
        }
    }

    #[test]
    fn one_adamw_step_by_hand() {
        // First Adam step: m̂ = g, v̂ = g², so the update is η·g/(|g| + ε) ≈ η·sign(g), after
        // the decoupled decay z·(1 − η·0.01).
        let (r, z, rh) = setup();
        let g = hand_gradient(&z, &rh, &[0.2, 0.8]);
        let lr = 0.15f64;
        let logits = Tensor::<B, 1>::from_data(z.as_slice(), &Default::default());
        let target = Tensor::<B, 1>::from_data([0.2f32, 0.8], &Default::default());
        let config = SearchConfig::default().with_steps(1);
        let out: Vec<f32> = inverse_search(logits, target, &r, &config)
            .unwrap()
            .into_data()
            .into_vec()
            .unwrap();
        for v in 0..3 {
            let want = z[v] as f64 * (1.0 - lr * 0.01) - lr * g[v].signum();
            assert!((out[v] as f64 - want).abs() < 1e-4, "{out:?}");
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
