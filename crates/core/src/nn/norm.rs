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

#[cfg(test)]
mod tests {
    use burn::backend::{Flex, NdArray};
    use burn::module::Param;
    use burn::prelude::*;
    use burn::tensor::TensorData;

    use super::RmsNorm;

    /// Against the norm in f64 written out, on flex and ndarray: rows of 13 values far from
    /// unit scale, weights ≠ 1, eps large enough to matter (dropping it fails), a 3-D input.
    #[test]
    fn rms_norm_matches_the_f64_norm() {
        check::<Flex>();
        check::<NdArray>();
    }

    fn check<B: Backend>() {
        let device = Default::default();
        let (rows, width, eps) = (6, 13, 0.05);
        let x: Vec<f32> = (0..rows * width)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.3 * (1 + i / width) as f32)
            .collect();
        let w: Vec<f32> = (0..width).map(|i| 0.5 + i as f32 * 0.25).collect();
        let norm = RmsNorm::<B> {
            weight: Param::from_tensor(Tensor::from_data(
                TensorData::new(w.clone(), [width]),
                &device,
            )),
            eps,
        };
        let got = norm
            .forward(Tensor::<B, 3>::from_data(
                TensorData::new(x.clone(), [2, rows / 2, width]),
                &device,
            ))
            .into_data()
            .into_vec::<f32>()
            .unwrap();
        for (r, row) in x.chunks(width).enumerate() {
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / width as f64;
            let inv = 1.0 / (ms + eps).sqrt();
            for (i, &v) in row.iter().enumerate() {
                let want = v as f64 * inv * w[i] as f64;
                let y = got[r * width + i] as f64;
                assert!(
                    (y - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{}: row {r}, {i}: {y} against {want}",
                    B::name(&device)
                );
            }
        }
    }
}
