//! The `kiln` binary end to end on tiny fixtures: what it prints equals HF's outputs.

mod common;

use std::process::Command;

use common::{Reference, fixture};

/// Runs `kiln args...` and parses each stdout line as JSON.
fn kiln_json(args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("running kiln");
    assert!(
        out.status.success(),
        "kiln {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn tokens(value: &serde_json::Value) -> Vec<u32> {
    value["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

const PROMPT: &str = "The robot walked into the old library.";

#[test]
fn generate_serves_t5_text_to_text() {
    let name = "t5v11-gated-untied";
    let (_, greedy) = Reference::load(name).ids("greedy_ids");
    let dir = fixture(name);
    let out = kiln_json(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "-n",
        "12",
        "--json",
    ]);
    // HF's row starts with the decoder start token.
    assert_eq!(tokens(&out[0]), greedy[1..]);
}

#[test]
fn translate_beam_search_equals_hf() {
    let name = "t5v11-gated-untied";
    let (_, beam) = Reference::load(name).ids("beam_ids");
    let dir = fixture(name);
    let out = kiln_json(&[
        "translate",
        "--model",
        dir.to_str().unwrap(),
        "--num-beams",
        "3",
        "-n",
        "12",
        "--json",
        PROMPT,
    ]);
    assert_eq!(tokens(&out[0]), beam[1..]);
}

#[test]
fn translate_rejects_unknown_language() {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["translate", "--model"])
        .arg(fixture("nllb-tiny"))
        .args(["--src", "xxx_Latn", "--tgt", "fra_Latn", "hello"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("xxx_Latn"), "{err}");
}

#[test]
fn chat_reads_turns_from_stdin_and_keeps_history() {
    use std::io::Write;
    let Some(gguf) = common::smollm2_gguf() else {
        return;
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["chat", "--model", gguf.to_str().unwrap(), "-n", "30"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running kiln");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\n\nAnd what is the capital of Italy?\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    // Two messages (the blank line is skipped), two streamed replies.
    let replies: Vec<&str> = stdout.lines().filter(|l| !l.is_empty()).collect();
    assert!(replies.len() >= 2, "{stdout}");
    assert!(
        stdout.contains("Paris") && stdout.contains("Rome"),
        "{stdout}"
    );
}
