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

/// generation_config.json's sampling fields are the defaults and flags override them, as in
/// HF's `generate`: a model whose file says `do_sample` samples with its temperature and top-k
/// unless `--temperature 0` asks for greedy.
#[test]
fn generation_config_defaults_merge_with_flags() {
    let source = fixture("llama2-mha");
    let dir = std::env::temp_dir().join(format!("kiln-genconfig-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let path = dir.join("generation_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["do_sample"] = true.into();
    config["temperature"] = 1.5.into();
    config["top_k"] = 20.into();
    config["max_new_tokens"] = 9.into();
    std::fs::write(&path, config.to_string()).unwrap();

    let run = |model: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt-ids",
            "1,324,75,397",
            "--ignore-eos",
            "--json",
        ];
        args.extend_from_slice(extra);
        tokens(&kiln_json(&args)[0])
    };
    let from_file = run(&dir, &[]);
    assert_eq!(from_file.len(), 9, "max_new_tokens from the file");
    let explicit = run(
        &source,
        &["--temperature", "1.5", "--top-k", "20", "-n", "9"],
    );
    assert_eq!(from_file, explicit);
    let greedy = run(&source, &["-n", "9"]);
    assert_ne!(
        from_file, greedy,
        "sampling at temperature 1.5 chose the greedy path"
    );
    assert_eq!(run(&dir, &["--temperature", "0"]), greedy);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A hub id resolves from the HF cache layout (`$HF_HOME/hub/models--org--name/snapshots/<rev>`,
/// `refs/main`) without the network when `HF_HUB_OFFLINE=1`, sharded checkpoints included,
/// and generates what the same folder does; an id missing from the cache is a clear error.
#[test]
fn hub_ids_resolve_offline_from_the_cache() {
    let home = std::env::temp_dir().join(format!("kiln-hf-home-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let revision = "0123456789abcdef0123456789abcdef01234567";
    for name in ["llama2-mha", "llama3-sharded"] {
        let repo = home.join(format!("hub/models--kiln-test--{name}"));
        let snapshot = repo.join("snapshots").join(revision);
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), revision).unwrap();
        for entry in std::fs::read_dir(fixture(name)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), snapshot.join(entry.file_name())).unwrap();
        }
    }
    let run = |model: &str| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["generate", "--model", model, "--prompt", PROMPT, "-n", "6"])
            .args(["--ignore-eos", "--json"])
            .env("HF_HOME", &home)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    for name in ["llama2-mha", "llama3-sharded"] {
        let from_cache = run(&format!("kiln-test/{name}"));
        assert!(
            from_cache.status.success(),
            "{}",
            String::from_utf8_lossy(&from_cache.stderr)
        );
        let from_folder = run(fixture(name).to_str().unwrap());
        assert_eq!(from_cache.stdout, from_folder.stdout, "{name}");
    }
    let missing = run("kiln-test/absent");
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("kiln-test/absent") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&home);
}

/// `kiln translate --prompt-ids`: the encoder ids as given, no tokenizer; HF's greedy output.
#[test]
fn translate_takes_token_ids() {
    let name = "t5v11-gated-untied";
    let reference = Reference::load(name);
    let (_, input) = reference.ids("input_ids");
    let (_, greedy) = reference.ids("greedy_ids");
    let ids: Vec<String> = input.iter().map(u32::to_string).collect();
    let out = kiln_json(&[
        "translate",
        "--model",
        fixture(name).to_str().unwrap(),
        "--prompt-ids",
        &ids.join(","),
        "-n",
        "12",
        "--json",
    ]);
    assert_eq!(out.len(), 1);
    assert_eq!(tokens(&out[0]), greedy[1..]);
    assert_eq!(out[0]["input"].as_str().unwrap(), ids.join(","));
}
