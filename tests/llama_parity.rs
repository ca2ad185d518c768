//! Parity of the Llama family (Llama 2/3, tied, Yi, Mistral sliding window, bf16, sharded)
//! against HF transformers' logits and greedy outputs recorded by `tools/make_fixtures.py`.

mod common;

use burn::prelude::*;
use common::*;
use kiln::core::loading::{LoadOptions, WeightDtype};
use kiln::core::{CausalLm, GenerationConfig, generate};
use kiln::llama::Llama;

fn tokens(ids: &[u32], batch: usize) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(data, [batch, ids.len() / batch]), &device())
}

fn host(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

/// Prefill logits, each cached decode step's logits, and the greedy continuation.
fn check_single(name: &str) {
    check_single_with(name, &LoadOptions::default());
}

fn check_single_with(name: &str, options: &LoadOptions) {
    let reference = Reference::load(name);
    let model = Llama::<B>::from_pretrained_with(&fixture(name), &device(), options).unwrap();
    let (_, prompt) = reference.ids("prompt_ids");
    let (_, greedy) = reference.ids("greedy_ids");
    let (_, prefill) = reference.f32("prefill_logits");
    let (step_shape, steps) = reference.f32("step_logits");
    let vocab = step_shape[1];

    let mut cache = model.new_cache(vec![0]);
    let all = host(model.forward(tokens(&prompt, 1), &mut cache, true));
    let diff = max_abs_diff(&all, &prefill);
    assert!(diff <= TOL, "{name}: prefill logits differ by {diff}");

    // Cached decode: step 0 is the prompt's last position, step i feeds greedy[i-1].
    let mut cache = model.new_cache(vec![0]);
    let mut logits = host(model.forward(tokens(&prompt, 1), &mut cache, false));
    for (i, expected) in steps.chunks_exact(vocab).enumerate() {
        let diff = max_abs_diff(&logits, expected);
        assert!(
            diff <= TOL,
            "{name}: decode step {i} logits differ by {diff}"
        );
        if i + 1 < greedy.len() {
            logits = host(model.forward(tokens(&greedy[i..i + 1], 1), &mut cache, false));
        }
    }

    let config = GenerationConfig::default().with_max_new_tokens(greedy.len());
    let out = generate(&model, &[prompt], &config, None, |_, _| {}).unwrap();
    assert_eq!(out[0].tokens, greedy, "{name}: greedy tokens");
}

/// A left-padded batch: first-step logits and greedy tokens equal HF's and equal one-by-one.
fn check_batch(name: &str) {
    let reference = Reference::load(name);
    let model = Llama::<B>::from_pretrained(&fixture(name), &device()).unwrap();
    let (shape, ids) = reference.ids("batch_input_ids");
    let (_, mask) = reference.ids("batch_attention_mask");
    let (gshape, greedy) = reference.ids("batch_greedy_ids");
    let (_, expected_logits) = reference.f32("batch_logits");
    let (batch, width) = (shape[0], shape[1]);
    let pad: Vec<usize> = mask
        .chunks_exact(width)
        .map(|m| m.iter().filter(|&&x| x == 0).count())
        .collect();

    let mut cache = model.new_cache(pad.clone());
    let logits = host(model.forward(tokens(&ids, batch), &mut cache, false));
    let diff = max_abs_diff(&logits, &expected_logits);
    assert!(diff <= TOL, "{name}: batched logits differ by {diff}");

    let prompts: Vec<Vec<u32>> = ids
        .chunks_exact(width)
        .zip(&pad)
        .map(|(row, &p)| row[p..].to_vec())
        .collect();
    let config = GenerationConfig::default().with_max_new_tokens(gshape[1]);
    let batched = generate(&model, &prompts, &config, None, |_, _| {}).unwrap();
    for (row, out) in batched.iter().enumerate() {
        assert_eq!(
            out.tokens,
            greedy[row * gshape[1]..(row + 1) * gshape[1]],
            "{name}: batch row {row}"
        );
        let alone = generate(&model, &prompts[row..row + 1], &config, None, |_, _| {}).unwrap();
        assert_eq!(
            alone[0].tokens, out.tokens,
            "{name}: row {row} batched vs alone"
        );
    }
}

macro_rules! parity {
    ($($test:ident => $fixture:literal),* $(,)?) => {$(
        mod $test {
            #[test]
            fn prefill_decode_greedy() { super::check_single($fixture) }
            #[test]
            fn left_padded_batch() { super::check_batch($fixture) }
        }
    )*};
}

parity! {
    llama2_mha => "llama2-mha",
    llama3_gqa_rope_scaling => "llama3-gqa",
    llama3_old_config_form => "llama3-gqa-oldconfig",
    llama_tied_with_bias => "llama-tied",
    yi => "yi",
    mistral_sliding_window => "mistral-sw",
    llama2_bf16 => "llama2-bf16",
    llama3_sharded_f16 => "llama3-sharded",
}

/// The half-precision fixtures held in their own precision (`--dtype bf16` / `f16`: packed
/// bf16/f16 rows, multiplied in f32 by the host kernels). The weights are the same values, so
/// HF's reference (computed in f32 from the rounded weights) holds to the same tolerance. GPU
/// backends keep their float type and must refuse with an error naming the backend.
mod held_in_half_precision {
    use super::*;

    fn check(name: &str, dtype: WeightDtype) {
        let options = LoadOptions::default().with_dtype(dtype);
        if matches!(kiln::backend::NAME, "flex" | "ndarray") {
            check_single_with(name, &options);
        } else {
            let err = Llama::<B>::from_pretrained_with(&fixture(name), &device(), &options)
                .expect_err("a GPU backend refuses a half-precision host dtype");
            assert!(err.to_string().contains("CPU backends"), "{err}");
        }
    }

    #[test]
    fn bf16_fixture_in_bf16() {
        check("llama2-bf16", WeightDtype::BF16);
    }

    #[test]
    fn f16_sharded_fixture_in_f16() {
        check("llama3-sharded", WeightDtype::F16);
    }
}
