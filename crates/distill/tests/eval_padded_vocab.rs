//! Evaluation on a tiny T5 fixture. T5 pads its vocabulary past the tokenizer's (32128 rows for
//! 32100 pieces): a prediction that uses a padding row must score as wrong, not stop the
//! evaluation with an error. The gold-label cross-entropy is HF's loss, per token, whatever the
//! batching.

use burn::backend::NdArray;
use kiln_core::Tokenizer;
use kiln_core::seq2seq::Seq2SeqLm;
use kiln_distill::data::{Example, Task};
use kiln_distill::eval::{EvalOptions, evaluate, label_cross_entropy};
use kiln_distill::train::Mode;
use kiln_t5::T5;

/// The `t5v11-gated-untied` fixture (HF parity tests) and its tokenizer.
fn fixture() -> (T5<NdArray>, Tokenizer) {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/t5v11-gated-untied");
    let model = T5::<NdArray>::from_pretrained(&dir, &Default::default()).unwrap();
    (model, Tokenizer::from_dir(&dir).unwrap())
}

#[test]
fn padding_rows_in_predictions_are_not_an_error() {
    let (model, tokenizer) = fixture();
    assert!(model.config().vocab_size > tokenizer.vocab_size());
    // This fixture's greedy output for the HF reference input reaches rows past the tokenizer.
    let example = Example {
        input: "The robot walked into the old library.".into(),
        label: "x".into(),
        llm_label: None,
        rationale: None,
    };
    let options = EvalOptions {
        mode: Mode::Standard,
        batch_size: 1,
        max_new_tokens: 12,
        max_input_len: 64,
    };
    let r = evaluate(&model, &tokenizer, &[example], Task::Text, &options, |_| {}).unwrap();
    assert_eq!((r.total, r.correct), (1, 0));
}

/// Against HF's own loss (`tools/make_fixtures.py --only distill-label-loss`: `labels=` on the
/// three examples in one padded batch, the mean over every label token), in batches of one and
/// of three. The labels have different lengths (EOS alone, a few tokens, many): averaging per
/// batch instead of per token would make the batches of one miss the oracle.
#[test]
fn label_cross_entropy_is_hf_loss_per_token_whatever_the_batch() {
    let (model, tokenizer) = fixture();
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/distill-label-loss/reference.json");
    let oracle: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let hf = oracle["mean_nats_per_token"].as_f64().unwrap();
    let inputs = oracle["inputs"].as_array().unwrap();
    let labels = oracle["labels"].as_array().unwrap();
    let examples: Vec<Example> = inputs
        .iter()
        .zip(labels)
        .map(|(i, l)| Example {
            // The oracle's inputs carry the step-by-step prefix kiln adds itself.
            input: i
                .as_str()
                .unwrap()
                .strip_prefix("predict: ")
                .unwrap()
                .into(),
            label: l.as_str().unwrap().into(),
            llm_label: None,
            rationale: None,
        })
        .collect();
    // The same label tokens as HF's (EOS appended).
    let eos = model.eos_token_ids()[0];
    for (label, want) in labels.iter().zip(oracle["label_ids"].as_array().unwrap()) {
        let mut ids = tokenizer.encode(label.as_str().unwrap(), false).unwrap();
        ids.push(eos);
        let want: Vec<u32> = serde_json::from_value(want.clone()).unwrap();
        assert_eq!(ids, want, "{label}");
    }
    let ce = |batch_size| {
        let options = EvalOptions {
            mode: Mode::StepByStep,
            batch_size,
            max_new_tokens: 4,
            max_input_len: 64,
        };
        label_cross_entropy(&model, &tokenizer, &examples, &options, 64).unwrap()
    };
    let (one, three) = (ce(1), ce(3));
    for (batch, got) in [(1, one), (3, three)] {
        assert!(
            (got - hf).abs() < 1e-5 * hf,
            "batch {batch}: {got}, HF {hf}"
        );
    }
}
