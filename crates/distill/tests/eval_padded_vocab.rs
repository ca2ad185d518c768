//! T5 pads its vocabulary past the tokenizer's (32128 rows for 32100 pieces): a prediction that
//! uses a padding row must score as wrong, not stop the evaluation with an error.

use burn::backend::NdArray;
use kiln_core::Tokenizer;
use kiln_distill::data::{Example, Task};
use kiln_distill::eval::{EvalOptions, evaluate};
use kiln_distill::train::Mode;
use kiln_t5::T5;

#[test]
fn padding_rows_in_predictions_are_not_an_error() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/t5v11-gated-untied");
    let model = T5::<NdArray>::from_pretrained(&dir, &Default::default()).unwrap();
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
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
