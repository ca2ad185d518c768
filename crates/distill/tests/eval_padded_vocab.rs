//! Evaluation on a tiny T5 fixture. T5 pads its vocabulary past the tokenizer's (32128 rows for
//! 32100 pieces): a prediction that uses a padding row must score as wrong, not stop the
//! evaluation with an error. The gold-label cross-entropy is per token, whatever the batching.

use burn::backend::NdArray;
use kiln_core::Tokenizer;
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

/// Labels of different lengths (EOS alone, a few tokens, many): averaging per batch instead of per
/// token would make batches of one and a batch of three disagree.
#[test]
fn label_cross_entropy_is_per_token_whatever_the_batch() {
    let (model, tokenizer) = fixture();
    let example = |input: &str, label: &str| Example {
        input: input.into(),
        label: label.into(),
        llm_label: None,
        rationale: None,
    };
    let examples = [
        example("The robot walked into the old library.", ""),
        example("How many apples are left?", "( 5.0 - 2.0 )"),
        example(
            "Where do birds sleep?",
            "in a nest made of small sticks and grass",
        ),
    ];
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
    assert!(one.is_finite() && one > 0.0, "{one}");
    assert!(
        (one - three).abs() < 1e-5 * one,
        "batch 1: {one}, batch 3: {three}"
    );
}
