use burn::config::Config;
use burn::module::{Module, Param};
use burn::prelude::*;

/// Configuration of an [`RmsNorm`].
#[derive(Config, Debug)]
pub struct RmsNormConfig {
    /// Size of the normalised (last) dimension.
    pub size: usize,
    /// Added to the mean square before the square root.
    #[config(default = 1e-6)]
    pub eps: f64,
}

impl RmsNormConfig {
    /// A norm with unit weight.
    pub fn init<B: Backend>(&self, device: &B::Device) -> RmsNorm<B> {
        RmsNorm {
            weight: Param::from_tensor(Tensor::ones([self.size], device)),
            eps: self.eps,
        }
    }
}

/// Root-mean-square norm as in Llama's `LlamaRMSNorm` and T5's `T5LayerNorm`:
/// `x / sqrt(mean(x²) + eps) * weight`, no mean subtraction, no bias.
///
/// Written here rather than using burn-nn's `RmsNorm` because that one names its parameter
/// `gamma`, while every checkpoint calls it `weight`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Per-channel scale.
    pub weight: Param<Tensor<B, 1>>,
    /// Epsilon.
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// Normalises over the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let variance = x.clone().square().mean_dim(D - 1);
        let normed = x * (variance + self.eps).sqrt().recip();
        normed * self.weight.val().unsqueeze()
    }
}
