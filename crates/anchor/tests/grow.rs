//! `grow_vocab` on a model held under an autodiff backend, as `kiln anchor train --init
//! <model> --mode ac` does: the new `<AC>` row starts as a copy of the `.` row (or the mean of
//! all rows) and is a trainable parameter (it gets a gradient).

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use kiln_anchor::{AcInit, grow_vocab};
use kiln_llama::Llama;

type A = Autodiff<Flex>;

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn rows(t: Tensor<Flex, 2>) -> Vec<Vec<f32>> {
    let [_, h] = t.dims();
    let v: Vec<f32> = t.into_data().convert::<f32>().into_vec().unwrap();
    v.chunks(h).map(<[f32]>::to_vec).collect()
}

#[test]
fn grown_rows_are_trainable_under_autodiff() {
    let device = Default::default();
    // The plain weights, read under the inner backend: the oracle for the new row.
    let plain = Llama::<Flex>::from_pretrained(&fixture("llama2-mha"), &device).unwrap();
    let old = rows(plain.model.embed_tokens.dense_weight());
    let vocab = old.len();
    let model = Llama::<A>::from_pretrained(&fixture("llama2-mha"), &device).unwrap();
    let grown = grow_vocab(model, AcInit::Copy(29)).unwrap();
    assert_eq!(grown.config().vocab_size, vocab + 1);
    let weight = grown.model.embed_tokens.weight.val();
    let new = rows(weight.clone().inner());
    assert_eq!(new.len(), vocab + 1);
    assert_eq!(new[vocab], old[29]);
    assert_eq!(new[..vocab], old[..]);
    // A loss on the new row reaches it.
    let grads = weight.narrow(0, vocab, 1).sum().backward();
    let grad = grown
        .model
        .embed_tokens
        .weight
        .grad(&grads)
        .expect("a gradient for <AC>");
    assert_eq!(rows(grad)[vocab], vec![1.0; old[0].len()]);

    let model = Llama::<A>::from_pretrained(&fixture("llama2-mha"), &device).unwrap();
    let grown = grow_vocab(model, AcInit::Mean).unwrap();
    let new = rows(grown.model.embed_tokens.weight.val().inner());
    let h = old[0].len();
    let mean: Vec<f32> = (0..h)
        .map(|j| old.iter().map(|r| r[j]).sum::<f32>() / vocab as f32)
        .collect();
    let diff = new[vocab]
        .iter()
        .zip(&mean)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-6, "{diff}");
}
