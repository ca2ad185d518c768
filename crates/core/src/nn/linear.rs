use burn::module::{Initializer, Param};
use burn::prelude::*;

/// A linear layer whose weight keeps PyTorch's `nn.Linear` layout, `[d_output, d_input]`, and
/// computes `y = (W · xᵀ)ᵀ + b`.
///
/// Written instead of using burn-nn's `Linear`, which stores `[d_input, d_output]`: that layout
/// makes loading transpose every checkpoint weight, and on the CPU backends `x · W` is slower
/// for a decode step than `W · xᵀ` on the checkpoint's own layout (TinyLlama's 2048→5632
/// matrix on flex: 1.59 vs 1.17 ms at m = 1, equal at m = 128; `examples/matmul_layout.rs`).
/// The weight stays contiguous, so no backend copies it per call.
#[derive(Module, Debug)]
pub struct TorchLinear<B: Backend> {
    /// `[d_output, d_input]`, as in the checkpoint.
    pub weight: Param<Tensor<B, 2>>,
    /// `[d_output]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
}

/// Shape and initialisation of a [`TorchLinear`].
#[derive(Config, Debug)]
pub struct TorchLinearConfig {
    /// Input features.
    pub d_input: usize,
    /// Output features.
    pub d_output: usize,
    /// Whether there is a bias.
    #[config(default = true)]
    pub bias: bool,
}

impl TorchLinearConfig {
    /// A layer initialised as burn-nn's `Linear` (Kaiming uniform over `d_input` fan-in; PyTorch's
    /// default too), lazily, so loading weights over it costs nothing.
    pub fn init<B: Backend>(&self, device: &B::Device) -> TorchLinear<B> {
        let init = Initializer::KaimingUniform {
            gain: 1.0 / 3.0f64.sqrt(),
            fan_out_only: false,
        };
        let fans = (Some(self.d_input), Some(self.d_output));
        TorchLinear {
            weight: init.init_with([self.d_output, self.d_input], fans.0, fans.1, device),
            bias: self
                .bias
                .then(|| init.init_with([self.d_output], fans.0, fans.1, device)),
        }
    }
}

impl<B: Backend> TorchLinear<B> {
    /// `[..., d_input]` → `[..., d_output]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let y = linear_out_in(x, self.weight.val());
        match &self.bias {
            Some(bias) => y + bias.val().unsqueeze(),
            None => y,
        }
    }
}

/// `x [..., d_in]` times the transpose of `weight [d_out, d_in]`, computed as `(W · xᵀ)ᵀ` so the
/// (large) weight is the contiguous left operand and only the (small) activations are
/// transposed: CPU backends copy a non-contiguous operand on every matmul.
pub fn linear_out_in<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
) -> Tensor<B, D> {
    let mut dims = x.dims();
    let d_in = dims[D - 1];
    let rows: usize = dims[..D - 1].iter().product();
    dims[D - 1] = weight.dims()[0];
    let y = weight.matmul(x.reshape([rows, d_in]).transpose());
    y.transpose().reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    #[test]
    fn matches_x_times_w_transposed_plus_bias() {
        let device = Default::default();
        let layer = TorchLinear::<NdArray> {
            weight: Param::from_tensor(Tensor::from_floats(
                [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]],
                &device,
            )),
            bias: Some(Param::from_tensor(Tensor::from_floats(
                [10.0, 20.0],
                &device,
            ))),
        };
        let x = Tensor::<NdArray, 3>::from_floats([[[1.0, 0.0, 1.0], [2.0, 1.0, 0.0]]], &device);
        let y = layer.forward(x).into_data();
        y.assert_approx_eq::<f32>(
            &TensorData::from([[[14.0, 20.5], [14.0, 20.0]]]),
            burn::tensor::Tolerance::default(),
        );
    }
}
