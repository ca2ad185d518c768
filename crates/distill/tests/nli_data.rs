//! e-SNLI and ANLI-R1 in the reference's files (google-research/distilling-step-by-step
//! `data_utils.py`): the data is not available here, so small samples in that format are
//! written by the test, and the LLM-output parsing is checked against what the reference's
//! Python functions return for the same strings (run with python3, values pasted below).

use kiln_distill::data::{
    DataSource, Task, load_anli1, load_esnli, parse_anli_output, parse_esnli_output,
};

/// (output, rationale, label) as the reference returns them; `""`/`" "` mean unparsed.
const ESNLI: &[(&str, &str, &str)] = &[
    (
        "A man playing a guitar is making music. Answer: entailment\n\nPremise: A dog runs.",
        "A man playing a guitar is making music.",
        "entailment",
    ),
    (
        "The dog cannot both sleep and run.\nAnswer: contradiction",
        "The dog cannot both sleep and run.",
        "contradiction",
    ),
    ("No answer marker here.", "No answer marker here.", " "),
    ("Answer:neutral", "", " "),
    (
        "It may or may not be true. Answer: neutral Premise: x Answer: entailment",
        "It may or may not be true.",
        "neutral",
    ),
];

const ANLI: &[(&str, &str, &str)] = &[
    (
        "The premise says the event was in 1990. So the answer is contradiction.\n\nPremise: next one",
        "The premise says the event was in 1990.",
        "contradiction",
    ),
    ("Nothing to conclude.", "", ""),
    ("Two So the answer is here So the answer is there.", "", ""),
    // The reference drops the last character whether or not it is a period.
    (
        "It is stated directly. So the answer is entailment",
        "It is stated directly.",
        "entailmen",
    ),
    ("Reason. So the answer is   neutral.", "Reason.", "neutral"),
];

fn python(s: &str) -> Option<String> {
    Some(s.to_string()).filter(|s| !s.trim().is_empty())
}

#[test]
fn parsing_matches_the_reference() {
    for &(output, rationale, label) in ESNLI {
        assert_eq!(
            parse_esnli_output(output),
            (python(rationale), python(label)),
            "{output:?}"
        );
    }
    for &(output, rationale, label) in ANLI {
        assert_eq!(
            parse_anli_output(output),
            (python(rationale), python(label)),
            "{output:?}"
        );
    }
}

fn write(dir: &std::path::Path, name: &str, text: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn loaders_read_the_reference_format() {
    let root = tempfile::tempdir().unwrap();
    // As HF datasets' to_json writes them: one object per line, label as an index.
    let esnli = root.path().join("esnli");
    write(
        &esnli,
        "esnli_valid.json",
        concat!(
            r#"{"premise":"A man plays a guitar.","hypothesis":"A man makes music.","label":0,"explanation_1":"x","explanation_2":"","explanation_3":""}"#,
            "\n",
            r#"{"premise":"A dog sleeps.","hypothesis":"A dog runs.","label":2,"explanation_1":"y","explanation_2":"","explanation_3":""}"#,
            "\n"
        ),
    );
    write(
        &esnli.join("llm"),
        "valid_CoT_0.json",
        &serde_json::to_string(&[ESNLI[0].0, ESNLI[1].0]).unwrap(),
    );
    let split = load_esnli(root.path(), "valid").unwrap();
    assert_eq!(split.task, Task::Text);
    let e = &split.examples;
    assert_eq!(e[0].input, "A man plays a guitar.</s>A man makes music.");
    assert_eq!(
        (e[0].label.as_str(), e[1].label.as_str()),
        ("entailment", "contradiction")
    );
    assert_eq!(e[1].llm_label.as_deref(), Some("contradiction"));
    assert_eq!(
        e[0].rationale.as_deref(),
        Some("A man playing a guitar is making music.")
    );

    let anli = root.path().join("anli1");
    write(
        &anli,
        "anli1_test.json",
        concat!(
            r#"{"uid":"a","premise":"P1","hypothesis":"H1","label":1,"reason":""}"#,
            "\n",
            r#"{"uid":"b","premise":"P2","hypothesis":"H2","label":2,"reason":""}"#,
            "\n"
        ),
    );
    write(
        &anli.join("llm"),
        "test_CoT_0.json",
        &serde_json::to_string(&[ANLI[4].0, ANLI[1].0]).unwrap(),
    );
    let split = DataSource::Anli1(root.path().to_path_buf())
        .load("test")
        .unwrap();
    assert_eq!(split.examples[0].label, "neutral");
    assert_eq!(split.examples[0].llm_label.as_deref(), Some("neutral"));
    assert_eq!(
        (split.unparsed_rationales, split.unparsed_llm_labels),
        (1, 1)
    );
    assert!(load_anli1(root.path(), "train").is_err());

    // A label index outside 0..=2 names the file and line.
    write(
        &anli,
        "anli1_valid.json",
        r#"{"uid":"c","premise":"P","hypothesis":"H","label":-1,"reason":""}"#,
    );
    write(&anli.join("llm"), "valid_CoT_0.json", r#"["x"]"#);
    let err = load_anli1(root.path(), "valid").unwrap_err().to_string();
    assert!(
        err.contains("anli1_valid.json") && err.contains("-1"),
        "{err}"
    );
}
