use std::sync::Arc;

use burn::module::{Initializer, Param};
use burn::prelude::*;

use crate::packed::PackedMatrix;

/// A linear layer whose weight keeps PyTorch's `nn.Linear` layout, `[d_output, d_input]`, and
/// computes `y = x · Wᵀ + b` (see [`linear_out_in`] for the order of the product).
///
/// Written instead of using burn-nn's `Linear`, which stores `[d_input, d_output]`: that layout
/// makes loading transpose every checkpoint weight, and on the CPU backends `x · W` is slower
/// for a decode step than `W · xᵀ` on the checkpoint's own layout (TinyLlama's 2048→5632
/// matrix on flex: 1.59 vs 1.17 ms at m = 1, equal at m = 128; `bench/matmul_layout.rs`).
/// The weight stays contiguous, so no backend copies it per call.
///
/// On the CPU backends the loaders hold the weight in [`packed`](Self::packed) instead (in the
/// precision the file ships in, or quantised), multiplied by kiln's own kernels
/// ([`crate::packed`]); `weight` is then an empty `[0, d_input]` tensor, so code that reads it
/// by mistake fails on the shape instead of computing with stale values. Use
/// [`dense_weight`](Self::dense_weight) to read the weight either way.
#[derive(Module, Debug)]
pub struct TorchLinear<B: Backend> {
    /// `[d_output, d_input]`, as in the checkpoint.
    pub weight: Param<Tensor<B, 2>>,
    /// `[d_output]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// The weight on the host, when the loader packed it (not part of the module's record).
    #[module(skip)]
    pub packed: Option<Arc<PackedMatrix>>,
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
            packed: None,
        }
    }
}

impl<B: Backend> TorchLinear<B> {
    /// `[..., d_input]` → `[..., d_output]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let y = match &self.packed {
            Some(packed) => super::host::packed_matmul(x, packed),
            None => linear_out_in(x, self.weight.val()),
        };
        self.add_bias(y)
    }

    /// Each layer's [`forward`](Self::forward) of the same `x` (a layer's query, key and value
    /// projections; its gate and up projections). When all the weights are packed and equally
    /// wide, a decode step multiplies them in one pass of the host kernel threads
    /// ([`PackedMatrix::matmul_t_many`]) and waits for the threads once instead of `N` times.
    pub fn forward_many<const D: usize, const N: usize>(
        linears: [&Self; N],
        x: Tensor<B, D>,
    ) -> [Tensor<B, D>; N] {
        let packed: Option<Vec<&PackedMatrix>> =
            linears.iter().map(|l| l.packed.as_deref()).collect();
        match packed {
            Some(ws) if N > 1 && ws.iter().all(|w| w.cols() == ws[0].cols()) => {
                let mut ys = super::host::packed_matmul_many(x, &ws).into_iter();
                linears.map(|l| l.add_bias(ys.next().expect("one product per layer")))
            }
            _ => linears.map(|l| l.forward(x.clone())),
        }
    }

    fn add_bias<const D: usize>(&self, y: Tensor<B, D>) -> Tensor<B, D> {
        match &self.bias {
            Some(bias) => y + bias.val().unsqueeze(),
            None => y,
        }
    }
}

impl<B: Backend> TorchLinear<B> {
    /// Holds `packed` as the weight from now on (see the type's docs); `weight` becomes empty.
    pub fn set_packed(&mut self, packed: Arc<PackedMatrix>) {
        self.weight = super::host::empty_weight(&self.weight, packed.cols());
        self.packed = Some(packed);
    }

    /// The weight `[d_output, d_input]` as a tensor, dequantised when it is packed.
    pub fn dense_weight(&self) -> Tensor<B, 2> {
        super::host::dense_or_param(self.packed.as_deref(), &self.weight)
    }

    /// Holds the weight as a dense parameter again (dequantised when it was packed), e.g.
    /// before saving the module.
    pub fn unpack(&mut self) {
        if self.packed.is_some() {
            self.weight = burn::module::Param::from_tensor(self.dense_weight());
            self.packed = None;
        }
    }
}

/// Rows from which [`linear_out_in`] multiplies `x · Wᵀ` instead of `(W · xᵀ)ᵀ`.
///
/// Measured on flex with TinyLlama's 2048→5632 weight (release build, `bench/matmul_layout.rs`,
/// 2-core AMD EPYC): with few rows (decode steps, small batches) `(W · xᵀ)ᵀ` is up to 1.8×
/// faster (7.1 vs 12.7 ms at 8 rows, 12.5 vs 18.6 ms at 32, 22.7 vs 25.0 ms at 64); from 96 rows
/// on (prefill) `x · Wᵀ` wins (31 vs 33 ms at 96, 67 vs 90 ms at 256, 120 vs 165 ms at 512), as
/// it also returns a contiguous `[rows, d_out]` where the other form leaves a transposed view
/// that the next reshape has to copy.
pub const ROWS_FOR_X_TIMES_WT: usize = 96;

/// `x [..., d_in]` times the transpose of `weight [d_out, d_in]`. The weight stays the
/// contiguous checkpoint matrix either way; only the order of the product changes with the
/// number of rows (`ROWS_FOR_X_TIMES_WT`, 96). Backends take the transposed operand as a
/// strided view (flex hands the strides to gemm), so neither form copies the weight.
///
/// A weight held in another dtype than `x` (f16 on a GPU backend) is multiplied in its own
/// dtype: `x` is cast to it and the product back to `x`'s, so only the matrices are half and
/// norms, softmax and the residual stream stay in the float type (as HF upcasts them).
pub fn linear_out_in<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
) -> Tensor<B, D> {
    let (x_dtype, w_dtype) = (x.dtype(), weight.dtype());
    if x_dtype != w_dtype {
        return linear_out_in(x.cast(w_dtype), weight).cast(x_dtype);
    }
    let mut dims = x.dims();
    let d_in = dims[D - 1];
    let rows: usize = dims[..D - 1].iter().product();
    dims[D - 1] = weight.dims()[0];
    let x = x.reshape([rows, d_in]);
    let y = if rows >= ROWS_FOR_X_TIMES_WT {
        x.matmul(weight.transpose())
    } else {
        weight.matmul(x.transpose()).transpose()
    };
    y.reshape(dims)
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
            packed: None,
        };
        let x = Tensor::<NdArray, 3>::from_floats([[[1.0, 0.0, 1.0], [2.0, 1.0, 0.0]]], &device);
        let y = layer.forward(x).into_data();
        y.assert_approx_eq::<f32>(
            &TensorData::from([[[14.0, 20.5], [14.0, 20.0]]]),
            burn::tensor::Tolerance::default(),
        );
    }

    #[test]
    fn both_product_orders_agree_with_a_host_loop() {
        let device = Default::default();
        let (d_in, d_out) = (5, 3);
        let weight: Vec<f32> = (0..d_out * d_in).map(|i| (i as f32 * 0.37).sin()).collect();
        for rows in [
            1,
            ROWS_FOR_X_TIMES_WT - 1,
            ROWS_FOR_X_TIMES_WT,
            2 * ROWS_FOR_X_TIMES_WT,
        ] {
            let x: Vec<f32> = (0..rows * d_in).map(|i| (i as f32 * 0.11).cos()).collect();
            let expected: Vec<f32> = (0..rows * d_out)
                .map(|i| {
                    let (r, o) = (i / d_out, i % d_out);
                    (0..d_in)
                        .map(|j| x[r * d_in + j] * weight[o * d_in + j])
                        .sum()
                })
                .collect();
            let xt = Tensor::<NdArray, 3>::from_data(TensorData::new(x, [1, rows, d_in]), &device);
            let wt = Tensor::<NdArray, 2>::from_data(
                TensorData::new(weight.clone(), [d_out, d_in]),
                &device,
            );
            linear_out_in(xt, wt).into_data().assert_approx_eq::<f32>(
                &TensorData::new(expected, [1, rows, d_out]),
                burn::tensor::Tolerance::default(),
            );
        }
    }
}
