//! Gradient clipping to a global norm, as `torch.nn.utils.clip_grad_norm_` (and so HF's
//! Trainer with `max_grad_norm`) does it: the norm is taken over all gradients together, and
//! every gradient is scaled by the same factor. Burn's `GradientClippingConfig::Norm` clips each
//! parameter tensor on its own, which changes the direction of the update; the papers kiln
//! reproduces (AnLLM, Distilling step-by-step) train with the global form.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

/// Scales `grads` (of `module`'s parameters) so that their global L2 norm is at most
/// `max_norm`: by `max_norm / (norm + 1e-6)` when that is below 1, as PyTorch does. Returns the
/// gradients and their norm before clipping.
pub fn clip_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    mut grads: GradientsParams,
    max_norm: f64,
) -> (GradientsParams, f64) {
    let mut squares = SumSquares::<B> {
        grads: &grads,
        sum: 0.0,
        _backend: std::marker::PhantomData,
    };
    module.visit(&mut squares);
    let norm = squares.sum.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        let mut scale = Scale::<B> {
            grads: &mut grads,
            coef,
            _backend: std::marker::PhantomData,
        };
        module.visit(&mut scale);
    }
    (grads, norm)
}

struct SumSquares<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    sum: f64,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SumSquares<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let s: f64 = g.square().sum().into_scalar().elem();
            self.sum += s;
        }
    }
}

struct Scale<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    coef: f64,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register(param.id, g.mul_scalar(self.coef));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::module::Module;

    type B = Autodiff<NdArray>;

    #[derive(Module, Debug)]
    struct Two<B: Backend> {
        a: Param<Tensor<B, 1>>,
        b: Param<Tensor<B, 2>>,
    }

    /// Gradients of `sum(ca·a) + sum(cb·b)` are `ca` and `cb`.
    fn grads(ca: [f32; 2], cb: [[f32; 2]; 1]) -> (Two<B>, GradientsParams) {
        let device = Default::default();
        let model = Two::<B> {
            a: Param::from_tensor(Tensor::zeros([2], &device)),
            b: Param::from_tensor(Tensor::zeros([1, 2], &device)),
        };
        let loss = (model.a.val() * Tensor::from_floats(ca, &device)).sum()
            + (model.b.val() * Tensor::from_floats(cb, &device)).sum();
        let g = GradientsParams::from_grads(loss.backward(), &model);
        (model, g)
    }

    fn values<const D: usize>(g: &GradientsParams, p: &Param<Tensor<B, D>>) -> Vec<f32> {
        g.get::<NdArray, D>(p.id)
            .unwrap()
            .into_data()
            .into_vec()
            .unwrap()
    }

    /// Hand computation: gradients (3, 0) and (0, 4) have global norm 5; clipped to 1 they
    /// become (0.6, 0) and (0, 0.8). Clipping each tensor alone would give (1, 0), (0, 1).
    #[test]
    fn scales_all_gradients_by_one_factor() {
        let (model, g) = grads([3.0, 0.0], [[0.0, 4.0]]);
        let (g, norm) = clip_grad_norm(&model, g, 1.0);
        assert!((norm - 5.0).abs() < 1e-9, "{norm}");
        let coef = 1.0 / (5.0 + 1e-6);
        let a = values(&g, &model.a);
        let b = values(&g, &model.b);
        assert!((a[0] as f64 - 3.0 * coef).abs() < 1e-6, "{a:?}");
        assert_eq!(a[1], 0.0);
        assert!((b[1] as f64 - 4.0 * coef).abs() < 1e-6, "{b:?}");
    }

    #[test]
    fn leaves_small_gradients_alone() {
        let (model, g) = grads([3.0, 0.0], [[0.0, 4.0]]);
        let (g, norm) = clip_grad_norm(&model, g, 10.0);
        assert!((norm - 5.0).abs() < 1e-9);
        assert_eq!(values(&g, &model.a), vec![3.0, 0.0]);
        assert_eq!(values(&g, &model.b), vec![0.0, 4.0]);
    }
}
