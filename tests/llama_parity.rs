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
    check_single_with(name, &LoadOptions::default(), auto_tol(name));
}

/// The tolerance of a fixture loaded with `--dtype auto`: a GPU backend keeps the f16
/// checkpoint's matrices in f16 (see `held_in_half_precision`).
fn auto_tol(name: &str) -> f32 {
    if name == "llama3-sharded" && gpu_f16() {
        hf_f16_deviation(name).logits
    } else {
        TOL
    }
}

fn check_single_with(name: &str, options: &LoadOptions, tol: f32) {
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
    assert!(diff <= tol, "{name}: prefill logits differ by {diff}");
    let mut worst = diff;

    // Cached decode: step 0 is the prompt's last position, step i feeds greedy[i-1].
    let mut cache = model.new_cache(vec![0]);
    let mut logits = host(model.forward(tokens(&prompt, 1), &mut cache, false));
    for (i, expected) in steps.chunks_exact(vocab).enumerate() {
        let diff = max_abs_diff(&logits, expected);
        assert!(
            diff <= tol,
            "{name}: decode step {i} logits differ by {diff}"
        );
        worst = worst.max(diff);
        if i + 1 < greedy.len() {
            logits = host(model.forward(tokens(&greedy[i..i + 1], 1), &mut cache, false));
        }
    }

    eprintln!("{name}: max |Δlogit| {worst:.2e} ({:?})", options.dtype);

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
    assert!(
        diff <= auto_tol(name),
        "{name}: batched logits differ by {diff}"
    );

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

/// Weights held in half precision.
///
/// CPU backends (`--dtype bf16` / `f16`): packed bf16/f16 rows multiplied in f32 by the host
/// kernels. The half fixtures' weights are the same values, so HF's reference (computed in f32
/// from the rounded weights) holds to the same tolerance.
///
/// GPU backends that compute in f16: every fixture with its matrices held and multiplied in f16
/// (activations in f32), at least as close to HF's f32 reference as HF's own f16 forward is
/// ([`hf_f16_deviation`]; measured on wgpu/lavapipe: 1.6e-2 to 2.8e-2 where HF's f16 is 2.6e-2
/// to 4.1e-2), with HF's greedy tokens; bf16 where the backend cannot compute in it is an error
/// naming the backend.
mod held_in_half_precision {
    use super::*;

    fn check(name: &str, dtype: WeightDtype) {
        let options = LoadOptions::default().with_dtype(dtype);
        if matches!(kiln::backend::NAME, "flex" | "ndarray") {
            check_single_with(name, &options, TOL);
        } else if <B as burn::tensor::backend::Backend>::supports_dtype(
            &device(),
            match dtype {
                WeightDtype::BF16 => burn::tensor::DType::BF16,
                _ => burn::tensor::DType::F16,
            },
        ) {
            check_single_with(name, &options, hf_f16_deviation(name).logits);
        } else {
            let err = Llama::<B>::from_pretrained_with(&fixture(name), &device(), &options)
                .expect_err("a dtype the backend cannot compute in is refused");
            assert!(err.to_string().contains("cannot compute in"), "{err}");
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

    /// Every fixture in f16 where a GPU backend computes in it (CPU backends: the two above).
    #[test]
    fn every_fixture_in_f16_on_gpu() {
        if !gpu_f16() {
            return;
        }
        for name in [
            "llama2-mha",
            "llama3-gqa",
            "llama3-gqa-oldconfig",
            "llama-tied",
            "yi",
            "mistral-sw",
            "llama2-bf16",
        ] {
            check_single_with(
                name,
                &LoadOptions::default().with_dtype(WeightDtype::F16),
                hf_f16_deviation(name).logits,
            );
        }
    }
}

/// The open internals compose to HF's forward: `embed` → `forward_hidden` (every layer's hidden
/// state against HF's `output_hidden_states`) → `logits`, over the prompt and one cached step.
mod hidden_states {
    use super::*;

    fn check(name: &str) {
        let reference = Reference::load(name);
        let model = Llama::<B>::from_pretrained(&fixture(name), &device()).unwrap();
        let (_, prompt) = reference.ids("prompt_ids");
        let (_, greedy) = reference.ids("greedy_ids");
        let (hidden_shape, hidden) = reference.f32("prefill_hidden_states");
        let (_, prefill) = reference.f32("prefill_logits");
        let (step_shape, steps) = reference.f32("step_logits");
        let layers = model.config().num_hidden_layers;
        assert_eq!(hidden_shape[0], layers + 1, "{name}: reference layout");

        let mut cache = model.new_cache(vec![0]);
        let out = model.forward_hidden(model.embed(tokens(&prompt, 1)), &mut cache, true);
        assert_eq!(
            out.all.len(),
            layers + 1,
            "{name}: embeddings + one per layer"
        );
        let per = hidden.len() / (layers + 1);
        for (i, h) in out.all.into_iter().enumerate() {
            let diff = max_abs_diff(&host(h), &hidden[i * per..(i + 1) * per]);
            assert!(diff <= TOL, "{name}: hidden state {i} differs by {diff}");
        }
        let diff = max_abs_diff(&host(model.logits(out.last)), &prefill);
        assert!(diff <= TOL, "{name}: logits(last) differ by {diff}");

        // One cached step through the same calls: HF's logits for the first greedy token.
        let step = model.forward_hidden(model.embed(tokens(&greedy[..1], 1)), &mut cache, false);
        assert!(step.all.is_empty());
        let vocab = step_shape[1];
        let diff = max_abs_diff(&host(model.logits(step.last)), &steps[vocab..2 * vocab]);
        assert!(
            diff <= TOL,
            "{name}: cached step through forward_hidden differs by {diff}"
        );
    }

    #[test]
    fn llama3_gqa() {
        check("llama3-gqa");
    }

    #[test]
    fn llama_tied() {
        check("llama-tied");
    }
}

/// `CausalLm::reorder_cache` with repeated and permuted rows: after the left-padded batch's
/// prefill, rows [2, 0, 0, 1] go on greedily and each gives HF's greedy tokens for its source
/// row (batch_greedy_ids).
mod reorder_cache {
    use super::*;

    fn check(name: &str) {
        let reference = Reference::load(name);
        let model = Llama::<B>::from_pretrained(&fixture(name), &device()).unwrap();
        let (shape, ids) = reference.ids("batch_input_ids");
        let (_, mask) = reference.ids("batch_attention_mask");
        let (gshape, greedy) = reference.ids("batch_greedy_ids");
        let (batch, width, steps) = (shape[0], shape[1], gshape[1]);
        assert_eq!(batch, 3, "{name}: reference layout");
        let pad: Vec<usize> = mask
            .chunks_exact(width)
            .map(|m| m.iter().filter(|&&x| x == 0).count())
            .collect();
        let argmax = |logits: Tensor<B, 3>| -> Vec<u32> {
            let [rows, _, vocab] = logits.dims();
            host(logits)
                .chunks_exact(vocab)
                .take(rows)
                .map(|r| {
                    let best = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    r.iter().position(|&v| v == best).unwrap() as u32
                })
                .collect()
        };
        let expected = |row: usize, step: usize| greedy[row * steps + step];

        let mut cache = model.new_cache(pad);
        let first = argmax(model.forward(tokens(&ids, batch), &mut cache, false));
        let order = [2, 0, 0, 1];
        assert!(model.reorder_cache(&mut cache, &order));
        assert!(!model.reorder_cache(&mut cache, &[7]), "{name}: row 7 of 4");
        let mut next: Vec<u32> = order.iter().map(|&r| first[r]).collect();
        for step in 1..steps {
            next = argmax(model.forward(tokens(&next, order.len()), &mut cache, false));
            for (i, &row) in order.iter().enumerate() {
                assert_eq!(
                    next[i],
                    expected(row, step),
                    "{name}: row {i} (from {row}), step {step}"
                );
            }
        }
    }

    #[test]
    fn llama3_gqa() {
        check("llama3-gqa");
    }

    #[test]
    fn mistral_sliding_window() {
        check("mistral-sw");
    }
}

/// `save_pretrained` writes a folder kiln reloads to HF's logits, with the same config.
mod save_pretrained {
    use super::*;

    fn check(name: &str) {
        let reference = Reference::load(name);
        let model = Llama::<B>::from_pretrained(&fixture(name), &device()).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        model.save_pretrained(tmp.path()).unwrap();
        let back = Llama::<B>::from_pretrained(tmp.path(), &device()).unwrap();
        assert_eq!(back.config(), model.config(), "{name}: config round trip");
        let (_, prompt) = reference.ids("prompt_ids");
        let (_, prefill) = reference.f32("prefill_logits");
        let mut cache = back.new_cache(vec![0]);
        let diff = max_abs_diff(
            &host(back.forward(tokens(&prompt, 1), &mut cache, true)),
            &prefill,
        );
        assert!(diff <= TOL, "{name}: reloaded logits differ by {diff}");
        // Only checkpoint keys: no RoPE table, and no head when it is tied.
        let bytes = std::fs::read(tmp.path().join("model.safetensors")).unwrap();
        let keys: Vec<String> = safetensors::SafeTensors::deserialize(&bytes)
            .unwrap()
            .names()
            .into_iter()
            .map(str::to_string)
            .collect();
        assert!(
            keys.iter()
                .all(|k| k.starts_with("model.") || k == "lm_head.weight"),
            "{keys:?}"
        );
        assert_eq!(
            keys.iter().any(|k| k == "lm_head.weight"),
            !model.config().tie_word_embeddings,
            "{name}"
        );
    }

    #[test]
    fn llama3_gqa_with_llama3_rope_scaling() {
        check("llama3-gqa");
    }

    #[test]
    fn tied_head_with_biases() {
        check("llama-tied");
    }

    #[test]
    fn mistral_sliding_window() {
        check("mistral-sw");
    }
}

/// `LoadOptions::with_key_prefix`: a checkpoint whose Llama sits under `backbone.` next to
/// other tensors (as a composite module saves it) loads to HF's logits; without the prefix the
/// first missing tensor is named.
#[test]
fn weights_under_a_key_prefix() {
    let name = "llama3-gqa";
    let tmp = tempfile::tempdir().unwrap();
    for file in ["config.json", "generation_config.json"] {
        std::fs::copy(fixture(name).join(file), tmp.path().join(file)).unwrap();
    }
    let bytes = std::fs::read(fixture(name).join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let extra = vec![0u8; 4 * 3];
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (format!("backbone.{k}"), v))
        .collect();
    views.push((
        "classifier.weight".into(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![3], &extra).unwrap(),
    ));
    safetensors::serialize_to_file(views, None, &tmp.path().join("model.safetensors")).unwrap();

    let options = LoadOptions::default().with_key_prefix("backbone.");
    let model = Llama::<B>::from_pretrained_with(tmp.path(), &device(), &options).unwrap();
    let reference = Reference::load(name);
    let (_, prompt) = reference.ids("prompt_ids");
    let (_, prefill) = reference.f32("prefill_logits");
    let mut cache = model.new_cache(vec![0]);
    let diff = max_abs_diff(
        &host(model.forward(tokens(&prompt, 1), &mut cache, true)),
        &prefill,
    );
    assert!(diff <= TOL, "logits under a prefix differ by {diff}");

    let err = Llama::<B>::from_pretrained(tmp.path(), &device()).unwrap_err();
    assert!(
        matches!(&err, kiln::core::Error::MissingTensor { tensor, .. } if !tensor.starts_with("backbone.")),
        "{err}"
    );
}

/// `CausalLm` knows EOS and pad from the model's config.json, and `GenerationConfig::for_model`
/// starts from them (read here from the file itself).
#[test]
fn generation_config_for_model_takes_eos_and_pad_from_the_config() {
    for name in ["llama3-gqa", "mistral-sw", "llama2-mha"] {
        let model = Llama::<B>::from_pretrained(&fixture(name), &device()).unwrap();
        let text = std::fs::read_to_string(fixture(name).join("config.json")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let eos: Vec<u32> = match &json["eos_token_id"] {
            serde_json::Value::Array(ids) => {
                ids.iter().map(|v| v.as_u64().unwrap() as u32).collect()
            }
            v => vec![v.as_u64().unwrap() as u32],
        };
        let pad = json["pad_token_id"].as_u64().map(|p| p as u32);
        let config = GenerationConfig::for_model(&model);
        assert_eq!(config.eos_token_ids, Some(eos.clone()), "{name}");
        assert_eq!(config.pad_token_id, Some(pad.unwrap_or(eos[0])), "{name}");
    }
}

/// The reference's left-padded batch as unpadded prompts, HF's greedy ids (row after row) and
/// the steps per row.
fn batch_prompts(reference: &Reference) -> (Vec<Vec<u32>>, Vec<u32>, usize) {
    let (shape, ids) = reference.ids("batch_input_ids");
    let (_, mask) = reference.ids("batch_attention_mask");
    let (gshape, greedy) = reference.ids("batch_greedy_ids");
    let width = shape[1];
    let prompts = ids
        .chunks_exact(width)
        .zip(mask.chunks_exact(width))
        .map(|(row, m)| row[m.iter().filter(|&&x| x == 0).count()..].to_vec())
        .collect();
    (prompts, greedy, gshape[1])
}

/// A stream callback that returns `ControlFlow::Break` ends its own row right there: in a
/// left-padded batch, row 1 stops at its third streamed piece with `FinishReason::Cancelled`
/// and HF's first greedy tokens, and no piece of it is streamed after the break; the other
/// rows go on to HF's whole greedy continuation.
#[test]
fn stream_break_cancels_only_its_row() {
    use kiln::core::{FinishReason, Tokenizer};
    use std::ops::ControlFlow;
    let name = "llama3-gqa";
    let reference = Reference::load(name);
    let model = Llama::<B>::from_pretrained(&fixture(name), &device()).unwrap();
    let tokenizer = Tokenizer::from_dir(&fixture(name)).unwrap();
    let (prompts, greedy, steps) = batch_prompts(&reference);
    let batch = prompts.len();
    let config = GenerationConfig::default().with_max_new_tokens(steps);
    let mut pieces = vec![0usize; batch];
    let out = generate(&model, &prompts, &config, Some(&tokenizer), |row, _| {
        pieces[row] += 1;
        assert!(row != 1 || pieces[1] <= 3, "row 1 streamed after its break");
        if row == 1 && pieces[1] == 3 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    let hf = |row: usize| &greedy[row * steps..(row + 1) * steps];
    assert_eq!(out[1].finish, FinishReason::Cancelled);
    assert!(
        out[1].tokens.len() >= 3 && out[1].tokens.len() < steps,
        "{:?}",
        out[1]
    );
    assert_eq!(out[1].tokens, hf(1)[..out[1].tokens.len()]);
    for row in [0, 2] {
        assert_eq!(out[row].tokens, hf(row), "row {row}");
        assert_ne!(out[row].finish, FinishReason::Cancelled);
    }
}

/// `generate_tokens` reports every token of every row in order: the ids are HF's greedy ids of
/// the left-padded batch, each row's text pieces join to the decoded ids (decoding is pinned
/// to `tokenizers` by text_parity), and a `false` after row 0's fourth token ends only row 0.
#[test]
fn token_events_are_hf_greedy_ids_with_their_text() {
    use kiln::core::{FinishReason, Tokenizer, generate_tokens};
    let name = "llama3-gqa";
    let reference = Reference::load(name);
    let model = Llama::<B>::from_pretrained(&fixture(name), &device()).unwrap();
    let tokenizer = Tokenizer::from_dir(&fixture(name)).unwrap();
    let (prompts, greedy, steps) = batch_prompts(&reference);
    let batch = prompts.len();
    let hf = |row: usize| &greedy[row * steps..(row + 1) * steps];
    let config = GenerationConfig::default().with_max_new_tokens(steps);
    let mut seen: Vec<Vec<u32>> = vec![Vec::new(); batch];
    let mut text = vec![String::new(); batch];
    let out = generate_tokens(&model, &prompts, &config, Some(&tokenizer), |e| {
        if let Some(id) = e.id {
            seen[e.row].push(id);
        }
        text[e.row].push_str(e.text);
        !(e.row == 0 && seen[0].len() == 4)
    })
    .unwrap();
    assert_eq!(seen[0], hf(0)[..4]);
    assert_eq!(out[0].finish, FinishReason::Cancelled);
    for row in 1..batch {
        assert_eq!(seen[row], hf(row), "row {row}");
        assert_eq!(out[row].tokens, hf(row), "row {row}");
        let decoded = tokenizer.decode(hf(row), true).unwrap();
        assert_eq!(text[row], decoded, "row {row}");
    }
}

/// `GenerationConfig::default()` stops at the model's own EOS (config.json), as HF's
/// `generate` does: with a copy of the fixture whose config.json names HF's fourth greedy token
/// of row 0 as EOS, every row of the batch ends right after that token's first occurrence in
/// its HF greedy ids (`FinishReason::Eos`) and runs on otherwise; an explicit empty list never
/// stops on a token.
#[test]
fn default_config_stops_at_the_models_eos() {
    use kiln::core::FinishReason;
    let name = "llama3-gqa";
    let reference = Reference::load(name);
    let (prompts, greedy, steps) = batch_prompts(&reference);
    let hf = |row: usize| &greedy[row * steps..(row + 1) * steps];
    let eos = hf(0)[3];
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, tmp.path().join(path.file_name().unwrap())).unwrap();
    }
    let config_path = tmp.path().join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    json["eos_token_id"] = serde_json::json!(eos);
    std::fs::write(&config_path, json.to_string()).unwrap();
    let model = Llama::<B>::from_pretrained(tmp.path(), &device()).unwrap();

    let config = GenerationConfig::default().with_max_new_tokens(steps);
    let out = generate(&model, &prompts, &config, None, |_, _| {}).unwrap();
    let mut stopped = 0;
    for (row, o) in out.iter().enumerate() {
        match hf(row).iter().position(|&t| t == eos) {
            Some(i) => {
                stopped += 1;
                assert_eq!(o.tokens, hf(row)[..=i], "row {row}");
                assert_eq!(o.finish, FinishReason::Eos, "row {row}");
            }
            None => {
                assert_eq!(o.tokens, hf(row), "row {row}");
                assert_eq!(o.finish, FinishReason::Length, "row {row}");
            }
        }
    }
    assert!(stopped >= 1);
    let never = config.with_eos_token_ids(vec![]);
    let out = generate(&model, &prompts, &never, None, |_, _| {}).unwrap();
    for (row, o) in out.iter().enumerate() {
        assert_eq!(o.tokens, hf(row), "row {row}");
    }
}
