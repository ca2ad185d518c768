//! A kiln Llama as a frozen backbone inside a user's own Burn `Module`: mean-pooled hidden
//! states → `Linear` → classes, the head trained with Burn's autodiff while the Llama stays as
//! loaded.
//!
//! ```text
//! cargo run --manifest-path examples/frozen-backbone/Cargo.toml [-- <Llama checkpoint folder>]
//! ```
//!
//! Without an argument it loads kiln's tiny random `llama3-gqa` test fixture. The task is made up
//! so that it is learnable from frozen random features: a sequence's tokens come from one of
//! three small disjoint sets of ids, and the class is which one. The program fails (exit 1) unless the
//! loss falls and the backbone's outputs are unchanged by training.

use std::path::PathBuf;

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use kiln_core::CausalLm;
use kiln_llama::Llama;

type Train = Autodiff<NdArray>;

const CLASSES: usize = 3;
const SEQ: usize = 12;
/// How many token ids each class draws from.
const WORDS: usize = 10;

/// The user's model: kiln's Llama is a field like any other Burn module.
#[derive(Module, Debug)]
struct Classifier<B: Backend> {
    backbone: Llama<B>,
    head: Linear<B>,
}

impl<B: Backend> Classifier<B> {
    /// Mean of the backbone's final hidden states over the sequence: `[batch, hidden]`.
    fn features(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [batch, _] = tokens.dims();
        // A fresh cache per call: no padding, so every position counts.
        let mut cache = self.backbone.new_cache(vec![0; batch]);
        let hidden = self
            .backbone
            .forward_hidden(self.backbone.embed(tokens), &mut cache, false)
            .last;
        hidden.mean_dim(1).squeeze_dim(1)
    }

    fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        self.head.forward(self.features(tokens))
    }
}

/// `n` sequences and their classes; class k draws its tokens from `WORDS` ids at the start of the
/// k-th third of the vocabulary
/// (a small deterministic generator, so runs repeat exactly).
fn dataset<B: Backend>(
    n: usize,
    vocab: usize,
    seed: u64,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 1, Int>) {
    let mut state = seed;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let band = vocab / CLASSES;
    let (mut tokens, mut labels) = (Vec::new(), Vec::new());
    for i in 0..n {
        let class = i % CLASSES;
        labels.push(class as i64);
        tokens.extend((0..SEQ).map(|_| (class * band + next() % WORDS) as i64));
    }
    (
        Tensor::from_data(TensorData::new(tokens, [n, SEQ]), device),
        Tensor::from_data(TensorData::new(labels, [n]), device),
    )
}

fn accuracy(
    model: &Classifier<NdArray>,
    tokens: Tensor<NdArray, 2, Int>,
    labels: Tensor<NdArray, 1, Int>,
) -> f32 {
    let n = labels.dims()[0];
    let hits = model
        .forward(tokens)
        .argmax(1)
        .squeeze_dim::<1>(1)
        .equal(labels)
        .int()
        .sum();
    hits.into_scalar() as f32 / n as f32
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama3-gqa")
        });
    let device = Default::default();
    Train::seed(&device, 42); // the head's initial weights

    // Load HF weights, then freeze them: `no_grad` marks every backbone parameter as not
    // requiring a gradient, so backward reaches only the head and the optimizer skips the rest.
    let backbone = Llama::<Train>::from_pretrained(&dir, &device)?.no_grad();
    let (hidden, vocab) = (backbone.config().hidden_size, backbone.config().vocab_size);
    let mut model = Classifier {
        backbone,
        head: LinearConfig::new(hidden, CLASSES).init(&device),
    };

    let (train_x, train_y) = dataset::<Train>(48, vocab, 1, &device);
    let (test_x, test_y) = dataset::<Train>(30, vocab, 2, &device);
    let probe = model.valid().features(test_x.clone().inner());

    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let mut optim = AdamConfig::new().init::<Train, Classifier<Train>>();
    let mut losses = Vec::new();
    for step in 0..40 {
        let loss = loss_fn.forward(model.forward(train_x.clone()), train_y.clone());
        let value = loss.clone().into_scalar();
        losses.push(value);
        if step % 10 == 0 {
            println!("step {step:>2}  loss {value:.4}");
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(5e-2, model, grads);
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    let eval = model.valid();
    let acc = accuracy(&eval, test_x.clone().inner(), test_y.inner());
    println!("loss {first:.4} → {last:.4}; held-out accuracy {acc:.2}");

    // The backbone's features are bit-for-bit what they were before training.
    let moved = (eval.features(test_x.inner()) - probe)
        .abs()
        .max()
        .into_scalar();
    println!("largest change in the frozen backbone's features: {moved}");
    if !(last < 0.5 * first) || moved != 0.0 {
        eprintln!("expected the loss to halve and the backbone to stay frozen");
        std::process::exit(1);
    }
    Ok(())
}
