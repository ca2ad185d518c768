//! Parsing of real lines of the paper's data: SVAMP and the CQA test split, committed under
//! `tests/data/datasets/step-by-step` (see its README for source and licence). The CQA train
//! split (8 MB) is not committed: its test is `#[ignore]`d and reads the project's
//! `../shared/datasets/step-by-step` (`cargo test -p kiln-distill -- --ignored`).

use std::path::PathBuf;

use kiln_distill::data::{load_cqa, load_svamp, parse_svamp_output};

fn repo_data() -> PathBuf {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/datasets/step-by-step");
    assert!(
        p.join("svamp/svamp_train.json").is_file(),
        "{} is missing from the checkout",
        p.display()
    );
    p
}

#[test]
fn svamp_real_lines() {
    let root = repo_data();
    let train = load_svamp(&root, "train").unwrap();
    assert_eq!(train.examples.len(), 800);
    // Same counts as the paper's `_parse_llm_output` run over the files with Python.
    assert_eq!(train.unparsed_rationales, 11);
    assert_eq!(train.unparsed_llm_labels, 13);
    let e = &train.examples[0];
    assert_eq!(e.label, "( 84.0 / 2.0 )");
    assert_eq!(
        e.rationale.as_deref(),
        Some(
            "Luke scored 84 points after 2 rounds. So he scored 84 points in 2 rounds. 84 / 2 = 42."
        )
    );
    assert_eq!(e.llm_label.as_deref(), Some("(84 / 2)"));
    assert_eq!(
        train.examples[2].llm_label.as_deref(),
        Some("(17 + 15 + 2)")
    );
    assert!(kiln_distill::arith::same_value(
        &e.label,
        e.llm_label.as_ref().unwrap()
    ));
    // Every gold label evaluates with the safe parser.
    for e in &train.examples {
        kiln_distill::arith::eval_expression(&e.label)
            .unwrap_or_else(|err| panic!("{}: {err}", e.label));
    }
    let test = load_svamp(&root, "test").unwrap();
    assert_eq!(test.examples.len(), 200);
    assert_eq!((test.unparsed_rationales, test.unparsed_llm_labels), (2, 2));
    // The raw line runs on into a hallucinated `Q:`; parsing cuts it.
    let raw = "Faye has 7 rows of pencils and crayons. Each row has 36 pencils and 30 crayons. So she has 7 * 36 pencils and 7 * 30 crayons. 7 * 36 is 252. The answer is (7 * 36).\n\nQ: There are 15 trees in the grove.";
    assert_eq!(parse_svamp_output(raw).1.as_deref(), Some("(7 * 36)"));
    assert_eq!(train.examples[1].llm_label.as_deref(), Some("(7 * 36)"));
}

#[test]
fn cqa_test_split() {
    let test = load_cqa(&repo_data(), "test").unwrap();
    assert_eq!(test.examples.len(), 1221);
    assert_eq!((test.unparsed_rationales, test.unparsed_llm_labels), (0, 0));
    assert!(
        test.examples
            .iter()
            .all(|e| e.input.contains("\nAnswer Choices:\n(a) "))
    );
}

#[test]
#[ignore = "needs the CQA train split from ../shared/datasets/step-by-step (not committed, 8 MB)"]
fn cqa_real_lines() {
    let root =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/datasets/step-by-step");
    let train = load_cqa(&root, "train").unwrap();
    assert_eq!(train.examples.len(), 9741);
    assert_eq!(
        (train.unparsed_rationales, train.unparsed_llm_labels),
        (0, 3)
    );
    let e = &train.examples[0];
    assert_eq!(e.label, "math problem");
    assert_eq!(e.llm_label.as_deref(), Some("math problem"));
    assert_eq!(
        e.rationale.as_deref(),
        Some(
            "The answer must be something that has to do with the above problem. Of the above choices, only math problem has to do with the above problem."
        )
    );
    assert!(e.input.ends_with("\nAnswer Choices:\n(a) park\n(b) coloring book\n(c) garden center\n(d) math problem\n(e) gravity"));
    let test = load_cqa(&root, "test").unwrap();
    assert_eq!(test.examples.len(), 1221);
    assert_eq!((test.unparsed_rationales, test.unparsed_llm_labels), (0, 0));
}
