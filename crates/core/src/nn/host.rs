//! Moving activations between a Burn tensor and the host kernels of [`crate::packed`].

use burn::prelude::*;
use burn::tensor::{DType, TensorData};

use crate::packed::PackedMatrix;

/// `x [..., cols] · Wᵀ` for a packed `W [rows, cols]`, as a tensor `[..., rows]` on `x`'s
/// device.
///
/// On the CPU backends the activation's values are read out (no copy on flex when `x` is not
/// shared), multiplied on the host and wrapped again. Under autodiff the weight is dequantised
/// into a constant tensor instead, so gradients still flow to `x` (the weight stays frozen).
pub fn packed_matmul<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    w: &PackedMatrix,
) -> Tensor<B, D> {
    let mut y = packed_matmul_many(x, &[w]);
    y.pop().expect("one product per matrix")
}

/// [`packed_matmul`] of several matrices of the same width on the same `x`, in one pass of the
/// kernel threads for decode-sized `x` ([`PackedMatrix::matmul_t_many`]).
pub fn packed_matmul_many<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    ws: &[&PackedMatrix],
) -> Vec<Tensor<B, D>> {
    let device = x.device();
    if B::ad_enabled(&device) {
        return ws
            .iter()
            .map(|w| super::linear_out_in(x.clone(), dense(w, &device)))
            .collect();
    }
    let dims = x.dims();
    let m: usize = dims[..D - 1].iter().product();
    let data = x.into_data();
    let dtype = data.dtype;
    let ys = match data.as_slice::<f32>() {
        Ok(xs) => PackedMatrix::matmul_t_many(ws, xs, m),
        Err(_) => PackedMatrix::matmul_t_many(
            ws,
            &data.convert::<f32>().into_vec::<f32>().expect("f32"),
            m,
        ),
    };
    ys.into_iter()
        .zip(ws)
        .map(|(y, w)| {
            let mut dims = dims;
            dims[D - 1] = w.rows();
            let y = TensorData::new(y, dims);
            Tensor::from_data(
                if dtype == DType::F32 {
                    y
                } else {
                    y.convert_dtype(dtype)
                },
                &device,
            )
        })
        .collect()
}

/// The packed matrix as a dense tensor on `device`.
pub fn dense<B: Backend>(w: &PackedMatrix, device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(w.to_f32(), [w.rows(), w.cols()]), device)
}

/// The placeholder a module's weight parameter becomes once the matrix is packed: an empty
/// `[0, cols]` tensor, so code that reads it by mistake fails on the shape.
pub(crate) fn empty_weight<B: Backend>(
    weight: &burn::module::Param<Tensor<B, 2>>,
    cols: usize,
) -> burn::module::Param<Tensor<B, 2>> {
    burn::module::Param::from_tensor(Tensor::zeros([0, cols], &weight.lazy_device()))
}

/// The weight as a tensor in the float type: the packed matrix dequantised when there is one,
/// else the parameter (cast when it is held in half precision).
pub(crate) fn dense_or_param<B: Backend>(
    packed: Option<&PackedMatrix>,
    weight: &burn::module::Param<Tensor<B, 2>>,
) -> Tensor<B, 2> {
    match packed {
        Some(packed) => dense(packed, &weight.lazy_device()),
        None => {
            let weight = weight.val();
            let float = super::float_dtype::<B>(&weight.device());
            if weight.dtype() == float {
                weight
            } else {
                weight.cast(float)
            }
        }
    }
}
