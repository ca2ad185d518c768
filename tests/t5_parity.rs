//! Parity of T5 (original: ReLU, tied; v1.1: gated-GELU, untied, 2 enc + 3 dec layers; the
//! v1.1 and FLAN forms transformers >= 5.17 writes, with `scale_decoder_outputs`) against
//! HF transformers' encoder states, teacher-forced logits, greedy, beam and batched outputs
//! recorded by `tools/make_fixtures.py`.

mod common;

use std::sync::Arc;

use burn::prelude::*;
use common::*;
use kiln::core::loading::SafetensorsWeights;
use kiln::core::seq2seq::{Seq2SeqLm, generate_seq2seq};
use kiln::core::{Error, GenerationConfig};
use kiln::t5::{T5, T5Config};

fn tokens<B: Backend>(ids: &[u32], batch: usize, device: &B::Device) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(data, [batch, ids.len() / batch]), device)
}

fn host<B: Backend>(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

fn load(name: &str) -> T5<B> {
    T5::<B>::from_pretrained(&fixture(name), &device()).unwrap()
}

/// Tolerance of the teacher-forced logits. `t5-relu-tied` is badly conditioned (embeddings with
/// std 1, unscaled attention scores in the tens): HF's own float32 reference is 7.5e-5 away
/// from the exact logits. Backends summing in different orders land 4.8e-5 (flex, one build),
/// 1.4e-4 (flex, another build of the same code) and 2.2e-4 (ndarray) away at one position. The
/// formula is exact: kiln run in float64 matched HF run in float64 (with T5LayerNorm's float32
/// variance patched to float64) to 5e-13 on encoder states and logits. So this one fixture gets
/// a documented looser float32 bound on every backend; a wrong formula misses it by orders of
/// magnitude. `t5v11-gated-tied-noscale` applies the tied head to the unscaled decoder output,
/// so its logits are 4x the others' (std 3.99 against ~1) and so are float32 rounding
/// differences: on an AVX-512 machine (gemm's wider kernels) cached step 10 lands 1.04e-4 away;
/// its bound is TOL scaled by that std.
fn logits_tol(name: &str) -> f32 {
    match name {
        "t5-relu-tied" => 3e-4,
        "t5v11-gated-tied-noscale" => 4.0 * TOL,
        _ => TOL,
    }
}

/// HF's generate row (start token included, padding after EOS) cut after its first EOS.
fn trim(row: &[u32], eos: &[u32]) -> Vec<u32> {
    match row.iter().skip(1).position(|t| eos.contains(t)) {
        Some(i) => row[..i + 2].to_vec(),
        None => row.to_vec(),
    }
}

/// Encoder output and teacher-forced decoder logits (all positions in one step, then one
/// position per cached step).
pub fn check_forward(name: &str) {
    forward_parity::<B>(name, &device(), logits_tol(name));
}

fn forward_parity<D: Backend>(name: &str, device: &D::Device, tol: f32) {
    let reference = Reference::load(name);
    let model = T5::<D>::from_pretrained(&fixture(name), device).unwrap();
    let tokens = |ids: &[u32], batch| tokens::<D>(ids, batch, device);
    let (_, input) = reference.ids("input_ids");
    let (_, dec_in) = reference.ids("decoder_input_ids");
    let (_, expected_logits) = reference.f32("decoder_logits");

    seq2seq_deviation(&model, &reference).assert_within(name, TOL, tol);

    let encoded = model.encode(tokens(&input, 1), None);

    let mut cache = model.new_decoder_cache(&encoded);
    let logits = host(model.decode_step(tokens(&dec_in, 1), &mut cache));
    let diff = max_abs_diff(&logits, &expected_logits);
    println!("{name}: teacher-forced logits max |Δ| = {diff:e}");
    assert!(diff <= tol, "{name}: decoder logits differ by {diff}");

    // The open pieces compose to the same logits: `decode_hidden` is what HF's head receives.
    let mut cache = model.new_decoder_cache(&encoded);
    let hidden = model.decode_hidden(tokens(&dec_in, 1), &mut cache);
    assert_eq!(hidden.dims(), [1, dec_in.len(), model.config().d_model]);
    let diff = max_abs_diff(&host(model.logits(hidden)), &expected_logits);
    assert!(
        diff <= tol,
        "{name}: logits(decode_hidden) differ by {diff}"
    );
}

/// Greedy and both beam settings equal HF's sequences (and beam scores).
pub fn check_generate(name: &str) {
    let reference = Reference::load(name);
    let model = load(name);
    let (_, input) = reference.ids("input_ids");
    let start = model.decoder_start_token_id();
    let eos = model.eos_token_ids();
    let full = |tokens: &[u32]| [&[start], tokens].concat();

    let (_, greedy) = reference.ids("greedy_ids");
    let config = GenerationConfig::default().with_max_new_tokens(12);
    let out = generate_seq2seq(&model, std::slice::from_ref(&input), &config).unwrap();
    assert_eq!(full(&out[0].tokens), greedy, "{name}: greedy");

    for (ids, score, lp, ngram) in [
        ("beam_ids", "beam_score", 1.0, 0),
        ("beam_ngram_ids", "beam_ngram_score", 0.6, 2),
    ] {
        let (_, expected) = reference.ids(ids);
        let (_, expected_score) = reference.f32(score);
        let config = GenerationConfig::default()
            .with_max_new_tokens(12)
            .with_num_beams(3)
            .with_length_penalty(lp)
            .with_early_stopping(true)
            .with_no_repeat_ngram_size(ngram);
        let out = generate_seq2seq(&model, std::slice::from_ref(&input), &config).unwrap();
        assert_eq!(full(&out[0].tokens), expected, "{name}: {ids}");
        let diff = (out[0].score.unwrap() - expected_score[0]).abs();
        println!("{name}: {score} |Δ| = {diff:e}");
        assert!(diff <= TOL, "{name}: {score} differs by {diff}");
        assert_eq!(trim(&expected, &eos), expected, "{name}: {ids} ends at EOS");
    }
}

/// A right-padded batch gives HF's batched greedy output, and each row equals the row alone.
pub fn check_batch(name: &str) {
    let reference = Reference::load(name);
    let model = load(name);
    let (shape, ids) = reference.ids("batch_input_ids");
    let (_, mask) = reference.ids("batch_attention_mask");
    let (gshape, greedy) = reference.ids("batch_greedy_ids");
    let width = shape[1];
    let inputs: Vec<Vec<u32>> = ids
        .chunks_exact(width)
        .zip(mask.chunks_exact(width))
        .map(|(row, m)| {
            row.iter()
                .zip(m)
                .filter(|&(_, &m)| m == 1)
                .map(|(&t, _)| t)
                .collect()
        })
        .collect();
    let start = model.decoder_start_token_id();
    let eos = model.eos_token_ids();
    let config = GenerationConfig::default().with_max_new_tokens(gshape[1] - 1);
    let out = generate_seq2seq(&model, &inputs, &config).unwrap();
    for (row, o) in out.iter().enumerate() {
        let expected = trim(&greedy[row * gshape[1]..(row + 1) * gshape[1]], &eos);
        assert_eq!(
            [&[start], &o.tokens[..]].concat(),
            expected,
            "{name}: batch row {row}"
        );
        let alone = generate_seq2seq(&model, &inputs[row..row + 1], &config).unwrap();
        assert_eq!(
            alone[0].tokens, o.tokens,
            "{name}: row {row} batched vs alone"
        );
    }
}

macro_rules! parity {
    ($($test:ident => $fixture:literal),* $(,)?) => {$(
        mod $test {
            #[test]
            fn encoder_and_teacher_forced_logits() { super::check_forward($fixture) }
            #[test]
            fn greedy_and_beams() { super::check_generate($fixture) }
            #[test]
            fn right_padded_batch() { super::check_batch($fixture) }
        }
    )*};
}

parity! {
    t5_relu_tied => "t5-relu-tied",
    t5v11_gated_untied => "t5v11-gated-untied",
    t5v11_gated_tied_noscale => "t5v11-gated-tied-noscale",
    flan_t5_current => "flan-t5-current",
}

/// The decoder-output scaling as HF's T5Config derives it, for every config form: today's
/// `scale_decoder_outputs` wins; without it `tie_word_embeddings: false` means unscaled.
#[test]
fn config_forms_decide_scaling() {
    let path = std::path::Path::new("config.json");
    let base = serde_json::json!({"vocab_size": 8, "d_model": 4, "d_kv": 2, "d_ff": 8,
                                  "num_layers": 1, "num_heads": 2});
    for (tie, scale, expected) in [
        (None, None, true),
        (Some(true), None, true),
        (Some(false), None, false),
        (Some(true), Some(false), false),
        (Some(false), Some(true), true),
    ] {
        let mut value = base.clone();
        if let Some(t) = tie {
            value["tie_word_embeddings"] = t.into();
        }
        if let Some(s) = scale {
            value["scale_decoder_outputs"] = s.into();
        }
        let config = T5Config::from_json(value, path).unwrap();
        assert_eq!(
            config.scale_decoder_outputs, expected,
            "tie_word_embeddings {tie:?}, scale_decoder_outputs {scale:?}"
        );
    }
}

#[test]
fn missing_tensor_is_an_error() {
    let dir = fixture("t5v11-gated-untied");
    let config = T5Config::from_file(&dir.join("config.json")).unwrap();
    let weights = Arc::new(SafetensorsWeights::open_dir(&dir).unwrap());
    // One more decoder layer than the checkpoint has.
    let mut bigger = config.clone();
    bigger.num_decoder_layers += 1;
    match T5::<B>::from_weights(&bigger, weights.clone(), &device()) {
        Err(Error::MissingTensor { tensor, .. }) => {
            assert!(tensor.starts_with("decoder.block.3."), "{tensor}")
        }
        other => panic!("expected MissingTensor, got {:?}", other.map(|_| ())),
    }
}

/// As HF, the checkpoint decides whether the LM head is `lm_head.weight` or `shared`; a config
/// saying otherwise does not make a stored head missing or a missing head required.
#[test]
fn checkpoint_decides_the_lm_head() {
    for (name, has_head) in [("t5-relu-tied", false), ("t5v11-gated-untied", true)] {
        let dir = fixture(name);
        let mut config = T5Config::from_file(&dir.join("config.json")).unwrap();
        config.tie_word_embeddings = has_head;
        let weights = Arc::new(SafetensorsWeights::open_dir(&dir).unwrap());
        let model = T5::<B>::from_weights(&config, weights, &device()).unwrap();
        assert_eq!(model.lm_head.is_some(), has_head, "{name}");
        assert_eq!(model.config().tie_word_embeddings, !has_head, "{name}");
    }
}

#[test]
fn wrong_shape_is_an_error() {
    let dir = fixture("t5v11-gated-untied");
    let mut config = T5Config::from_file(&dir.join("config.json")).unwrap();
    config.d_ff = 96;
    let weights = Arc::new(SafetensorsWeights::open_dir(&dir).unwrap());
    match T5::<B>::from_weights(&config, weights, &device()) {
        Err(Error::TensorShape {
            tensor,
            expected,
            found,
            ..
        }) => {
            assert!(tensor.contains("DenseReluDense"), "{tensor}");
            assert_ne!(expected, found);
        }
        other => panic!("expected TensorShape, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn bad_inputs_are_errors() {
    let model = load("t5-relu-tied");
    let config = GenerationConfig::default().with_max_new_tokens(2);
    assert!(matches!(
        generate_seq2seq(&model, &[], &config),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        generate_seq2seq(&model, &[vec![]], &config),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        generate_seq2seq(&model, &[vec![5, 9999]], &config),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        generate_seq2seq(&model, &[vec![5, 1]], &config.clone().with_num_beams(0)),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn unsupported_feed_forward_is_a_config_error() {
    let dir = fixture("t5-relu-tied");
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    value["feed_forward_proj"] = "gated-tanhshrink".into();
    let err = T5Config::from_json(value, &dir.join("config.json")).unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("feed_forward_proj"), "{err}");
}

/// Beam search over a right-padded batch gives each row's result alone (rows finish on their
/// own), and seeded sampling is reproducible.
#[test]
fn batched_beams_and_sampling() {
    let name = "t5v11-gated-untied";
    let reference = Reference::load(name);
    let model = load(name);
    let (shape, ids) = reference.ids("batch_input_ids");
    let (_, mask) = reference.ids("batch_attention_mask");
    let width = shape[1];
    let mut inputs: Vec<Vec<u32>> = ids
        .chunks_exact(width)
        .zip(mask.chunks_exact(width))
        .map(|(row, m)| {
            row.iter()
                .zip(m)
                .filter(|&(_, &m)| m == 1)
                .map(|(&t, _)| t)
                .collect()
        })
        .collect();
    inputs.push(reference.ids("input_ids").1);
    let config = GenerationConfig::default()
        .with_max_new_tokens(10)
        .with_num_beams(3)
        .with_length_penalty(0.6)
        .with_no_repeat_ngram_size(2);
    let batched = generate_seq2seq(&model, &inputs, &config).unwrap();
    for (row, out) in batched.iter().enumerate() {
        let alone = generate_seq2seq(&model, &inputs[row..row + 1], &config).unwrap();
        assert_eq!(alone[0].tokens, out.tokens, "row {row} batched vs alone");
        let diff = (alone[0].score.unwrap() - out.score.unwrap()).abs();
        assert!(diff <= TOL, "row {row} score differs by {diff}");
    }

    let sampled = GenerationConfig::default()
        .with_max_new_tokens(10)
        .with_sampling(
            kiln::core::SamplingConfig::default()
                .with_temperature(1.5)
                .with_top_k(Some(20))
                .with_seed(7),
        );
    let a = generate_seq2seq(&model, &inputs, &sampled).unwrap();
    let b = generate_seq2seq(&model, &inputs, &sampled).unwrap();
    assert_eq!(a, b, "seeded sampling is reproducible");
    let greedy = generate_seq2seq(
        &model,
        &inputs,
        &GenerationConfig::default().with_max_new_tokens(10),
    )
    .unwrap();
    assert_ne!(
        a, greedy,
        "temperature 1.5 sampling differs from greedy somewhere"
    );
}

/// `dropout_rate` acts in training only: under autodiff two teacher-forced passes differ, and
/// the same model without autodiff (`valid()`, what evaluation and generation use) gives HF's
/// dropout-free logits.
#[test]
fn dropout_is_active_only_in_training() {
    use burn::backend::Autodiff;
    use burn::module::AutodiffModule;
    type AB = Autodiff<B>;
    let name = "t5v11-gated-untied";
    let dir = fixture(name);
    let mut config = T5Config::from_file(&dir.join("config.json")).unwrap();
    assert_eq!(
        config.dropout_rate, 0.0,
        "the fixture is saved without dropout"
    );
    config.dropout_rate = 0.3;
    let weights = Arc::new(SafetensorsWeights::open_dir(&dir).unwrap());
    let model = T5::<AB>::from_weights(&config, weights, &device()).unwrap();
    let reference = Reference::load(name);
    let (_, input) = reference.ids("input_ids");
    let (_, dec) = reference.ids("decoder_input_ids");
    let run = |m: &T5<AB>| {
        let enc = m.encode(tokens::<AB>(&input, 1, &device()), None);
        let mut cache = m.new_decoder_cache(&enc);
        host(m.decode_step(tokens::<AB>(&dec, 1, &device()), &mut cache))
    };
    let (a, b) = (run(&model), run(&model));
    assert!(
        max_abs_diff(&a, &b) > 1e-3,
        "dropout did nothing in training"
    );
    let inference = model.valid();
    let enc = inference.encode(tokens::<B>(&input, 1, &device()), None);
    let mut cache = inference.new_decoder_cache(&enc);
    let logits = host(inference.decode_step(tokens::<B>(&dec, 1, &device()), &mut cache));
    let (_, expected) = reference.f32("decoder_logits");
    assert!(max_abs_diff(&logits, &expected) < TOL);
}

/// `save_pretrained` writes back exactly the tensors HF wrote (same keys, shapes and f32
/// values; no `embed_tokens` copies), a config that reads back to the same model, and the
/// written folder generates HF's greedy tokens.
#[test]
fn save_pretrained_round_trips() {
    use safetensors::SafeTensors;
    for name in [
        "t5v11-gated-untied",
        "t5-relu-tied",
        "t5v11-gated-tied-noscale",
    ] {
        let model = load(name);
        let tmp = tempfile::tempdir().unwrap();
        model.save_pretrained(tmp.path()).unwrap();
        let original = std::fs::read(fixture(name).join("model.safetensors")).unwrap();
        let written = std::fs::read(tmp.path().join("model.safetensors")).unwrap();
        let (a, b) = (
            SafeTensors::deserialize(&original).unwrap(),
            SafeTensors::deserialize(&written).unwrap(),
        );
        let mut keys_a: Vec<_> = a.names();
        let mut keys_b: Vec<_> = b.names();
        keys_a.sort();
        keys_b.sort();
        assert_eq!(keys_a, keys_b, "{name}");
        for key in keys_a {
            let (ta, tb) = (a.tensor(key).unwrap(), b.tensor(key).unwrap());
            assert_eq!(ta.shape(), tb.shape(), "{name} {key}");
            assert_eq!(ta.data(), tb.data(), "{name} {key}");
        }
        let config = T5Config::from_file(&tmp.path().join("config.json")).unwrap();
        let mut expected = model.config().clone();
        expected.tie_word_embeddings = model.lm_head.is_none();
        assert_eq!(config, expected, "{name}");
        for file in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(fixture(name).join(file), tmp.path().join(file)).unwrap();
        }
        let reloaded = T5::<B>::from_pretrained(tmp.path(), &device()).unwrap();
        let reference = Reference::load(name);
        let (_, input) = reference.ids("input_ids");
        let (_, greedy) = reference.ids("greedy_ids");
        let config = GenerationConfig::default().with_max_new_tokens(greedy.len() - 1);
        let out = generate_seq2seq(&reloaded, &[input], &config).unwrap();
        let eos = reloaded.config().eos_token_ids.clone();
        assert_eq!(out[0].tokens, trim(&greedy, &eos)[1..], "{name}");
    }
}

/// A student trained by `kiln distill train` and written by `kiln distill export` loads in
/// transformers, which generates these tokens (`tools/make_fixtures.py --only
/// t5-distill-export`); kiln reads the folder back and generates the same.
#[test]
fn distill_export_loads_in_transformers() {
    let dir = fixture("t5-distill-export");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let model = T5::<B>::from_pretrained(&dir, &device()).unwrap();
    let eos = model.config().eos_token_ids.clone();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for row in reference["rows"].as_array().unwrap() {
        let input = ids(&row["input_ids"]);
        let greedy = ids(&row["greedy_ids"]);
        let config = GenerationConfig::default().with_max_new_tokens(12);
        let out = generate_seq2seq(&model, std::slice::from_ref(&input), &config).unwrap();
        assert_eq!(out[0].tokens, trim(&greedy, &eos)[1..], "{}", row["text"]);
        let enc = model.encode(tokens::<B>(&input, 1, &device()), None);
        let mut cache = model.new_decoder_cache(&enc);
        let logits = host(model.decode_step(tokens::<B>(&greedy[..1], 1, &device()), &mut cache));
        let expected: Vec<f32> = row["first_step_logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert!(max_abs_diff(&logits, &expected) < TOL, "{}", row["text"]);
    }
}

/// With `--dtype f16` on a GPU backend (matrices held and multiplied in f16, norms, the
/// position bias and the residual stream in f32): encoder states and teacher-forced logits of
/// every T5 form at least as close to HF's f32 reference as HF's own f16 forward
/// ([`hf_f16_deviation`]), and HF's greedy output. Nothing to
/// check where the backend has no f16 compute.
#[test]
fn half_precision_on_gpu() {
    use kiln::core::loading::{LoadOptions, WeightDtype};
    if !gpu_f16() {
        return;
    }
    let options = LoadOptions::default().with_dtype(WeightDtype::F16);
    for name in [
        "t5-relu-tied",
        "t5v11-gated-untied",
        "t5v11-gated-tied-noscale",
        "flan-t5-current",
    ] {
        let reference = Reference::load(name);
        let model = T5::<B>::from_pretrained_with(&fixture(name), &device(), &options).unwrap();
        let (_, input) = reference.ids("input_ids");
        let deviation = seq2seq_deviation(&model, &reference);
        let (hidden, worst) = (deviation.encoder, deviation.cached_logits);
        eprintln!("{name} f16: encoder max |Δ| {hidden:.2e}, cached logits max |Δ| {worst:.2e}");
        let hf = hf_f16_deviation(name);
        assert!(
            hidden <= hf.encoder.unwrap(),
            "{name}: encoder hidden differs by {hidden}"
        );
        assert!(
            worst <= hf.logits,
            "{name}: cached logits differ by {worst}"
        );

        // t5-relu-tied's third greedy token is a near tie in f16: HF's own f16 forward gives
        // 2.707 vs 2.703 for its top two (f32: 2.789 vs 2.686), so greedy equality is not a
        // fair demand there; the logits bound above still holds.
        if name == "t5-relu-tied" {
            continue;
        }
        let (_, greedy) = reference.ids("greedy_ids");
        let config = GenerationConfig::default().with_max_new_tokens(12);
        let out = generate_seq2seq(&model, std::slice::from_ref(&input), &config).unwrap();
        let start = model.decoder_start_token_id();
        assert_eq!(
            [&[start], &out[0].tokens[..]].concat(),
            greedy,
            "{name}: greedy"
        );
    }
}
