//! The teaching examples run as written on the tiny fixtures, on whichever backend this build
//! picked (tools/test.sh runs this file on flex and on wgpu).
//!
//! `cargo test` builds the examples next to the test binaries (`target/<profile>/examples/`).
//! With `--test examples` alone it does not (and `--examples` builds them as test harnesses), so
//! build them first: `cargo build --example generate --example translate` with the same features.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{Reference, fixture};
use kiln::core::Tokenizer;

/// Runs `examples/<name>.rs` (already built) with `args`; returns its stdout. The example names
/// its backend on stderr, which must be this build's: a binary left by another feature set's
/// build fails here.
fn run_example(name: &str, args: &[&str]) -> String {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path: PathBuf = dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is not built: `cargo test` builds it; with `--test examples` alone, run \
         `cargo build --example {name}` with the same features first",
        path.display()
    );
    let out = Command::new(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "example {name} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(" on {}]", kiln::backend::NAME)),
        "{} was built for another backend than {}: {stderr}",
        path.display(),
        kiln::backend::NAME
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `examples/generate.rs` on llama3-gqa streams HF's greedy continuation of the prompt (the
/// fixture's generation_config.json is greedy; HF's ids are in the reference, decoded here).
#[test]
fn generate_streams_hf_greedy_text() {
    let name = "llama3-gqa";
    let reference = Reference::load(name);
    let dir = fixture(name);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let prompt = json["prompt"].as_str().unwrap();
    let out = run_example("generate", &[prompt, dir.to_str().unwrap()]);

    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let (_, prompt_ids) = reference.ids("prompt_ids");
    assert_eq!(tokenizer.encode(prompt, true).unwrap(), prompt_ids);
    // The last line reports `[n tokens, finish]`; HF's 20 greedy ids were taken with EOS
    // suppressed, so the example's n tokens are compared with HF's first n.
    let (text, summary) = out.trim_end().rsplit_once('\n').unwrap();
    let n: usize = summary
        .trim_start_matches('[')
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let (_, greedy) = reference.ids("greedy_ids");
    let n = n.min(greedy.len());
    assert!(n > 0, "{out}");
    let expected = tokenizer.decode(&greedy[..n], true).unwrap();
    assert!(
        text.starts_with(&format!("{prompt}{expected}")),
        "example printed {text:?}, HF's greedy text is {expected:?}"
    );
}

/// `examples/translate.rs` runs on the NLLB and T5 fixtures (random weights: the text is noise;
/// nllb_parity and t5_parity pin the decoding itself to HF).
#[test]
fn translate_runs_on_nllb_and_t5() {
    for name in ["nllb-tiny", "t5v11-gated-untied"] {
        let source = "The little robot.";
        let out = run_example("translate", &[fixture(name).to_str().unwrap(), source]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.first(), Some(&source), "{name}: {out}");
        assert!(lines.len() >= 2, "{name}: no translation line in {out:?}");
    }
}
