//! The embedded tokenizers against llama.cpp's own test vectors (`test-tokenizer-0`).
//!
//! The `.inp` file holds the test strings, each followed by a line `__ggml_vocab_test__`
//! (i.e. cases are separated by `"\n__ggml_vocab_test__\n"`, and the file ends with one); the
//! `.out` file has one line per case with the expected token ids separated by spaces.
//! llama.cpp tokenizes them with `add_special = false, parse_special = false`.

mod common;

use kiln_gguf::GgufFile;

/// Test strings with their expected ids.
type Cases = Vec<(String, Vec<u32>)>;

fn cases(stem: &str) -> Option<(GgufFile, Cases)> {
    let gguf = common::shared_tokenizer_file(&format!("llama-vocab-tests/{stem}.gguf"))?;
    let inp = std::fs::read_to_string(gguf.with_extension("gguf.inp")).unwrap();
    let out = std::fs::read_to_string(gguf.with_extension("gguf.out")).unwrap();
    let mut inputs: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    assert_eq!(
        inputs.pop(),
        Some(""),
        "the .inp file ends with a separator"
    );
    let outputs: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(inputs.len(), outputs.len(), "{stem}: cases in .inp vs .out");
    let file = GgufFile::open(&gguf).unwrap();
    Some((
        file,
        inputs
            .into_iter()
            .map(str::to_string)
            .zip(outputs)
            .collect(),
    ))
}

fn run(stem: &str) {
    let Some((file, cases)) = cases(stem) else {
        return;
    };
    let mut tok = file.tokenizer().unwrap();
    // llama.cpp's test does not parse special tokens in the text.
    tok.set_encode_special_tokens(true);
    let mut failures = Vec::new();
    for (text, expected) in &cases {
        let got = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        if &got != expected {
            failures.push(format!(
                "{text:?}\n   expected {expected:?}\n   got      {got:?}"
            ));
        }
    }
    let passed = cases.len() - failures.len();
    eprintln!("{stem}: {passed}/{} cases pass", cases.len());
    for f in &failures {
        eprintln!("FAIL {f}");
    }
    assert!(
        failures.is_empty(),
        "{stem}: {} of {} cases fail",
        failures.len(),
        cases.len()
    );
}

#[test]
fn llama_spm_vocab_matches_llama_cpp() {
    run("ggml-vocab-llama-spm");
}

#[test]
fn llama_bpe_vocab_matches_llama_cpp() {
    run("ggml-vocab-llama-bpe");
}

#[test]
fn bos_and_decode() {
    for (stem, bos) in [
        ("ggml-vocab-llama-spm", 1),
        ("ggml-vocab-llama-bpe", 128000),
    ] {
        let Some(path) = common::shared_tokenizer_file(&format!("llama-vocab-tests/{stem}.gguf"))
        else {
            return;
        };
        let file = GgufFile::open(&path).unwrap();
        let tok = file.tokenizer().unwrap();
        let text = "Hello world, this is 🦙.cpp!";
        let with = tok.encode(text, true).unwrap().get_ids().to_vec();
        let without = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(with[0], bos, "{stem}");
        assert_eq!(&with[1..], &without[..], "{stem}");
        assert_eq!(tok.decode(&with, true).unwrap(), text, "{stem}");
        assert!(file.chat_template().is_none());
    }
}
