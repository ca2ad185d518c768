//! Every class of bad input is a clear error naming the file, tensor, field or argument —
//! never a panic.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use kiln::core::{Error, GenerationConfig, generate};
use kiln::llama::Llama;
use safetensors::SafeTensors;

/// A copy of a good fixture to break.
fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    (tmp, dir)
}

fn load(dir: &Path) -> Result<Llama<B>, Error> {
    Llama::<B>::from_pretrained(dir, &device())
}

fn load_err(dir: &Path) -> Error {
    match load(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

/// Rewrites model.safetensors through `edit(name, values) -> Option<values>` (None drops it).
fn rewrite_weights(dir: &Path, edit: impl Fn(&str, Vec<f32>) -> Option<Vec<f32>>) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        if let Some(values) = edit(&name, values) {
            let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            out.push((name, view.shape().to_vec(), data));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = out
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(&path, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
}

#[test]
fn the_good_fixture_loads() {
    let (_tmp, dir) = copy_fixture("llama2-mha");
    load(&dir).unwrap();
}

#[test]
fn missing_config() {
    let (_tmp, dir) = copy_fixture("llama2-mha");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let err = load_err(&dir);
    assert!(
        matches!(&err, Error::MissingFile { path, .. } if path.ends_with("config.json")),
        "{err}"
    );
}

#[test]
fn missing_weights() {
    let (_tmp, dir) = copy_fixture("llama2-mha");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = load_err(&dir);
    assert!(
        matches!(&err, Error::MissingFile { path, .. } if path.ends_with("model.safetensors")),
        "{err}"
    );
}

#[test]
fn truncated_weights() {
    let (_tmp, dir) = copy_fixture("llama2-mha");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for cut in [4, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = load_err(&dir);
        assert!(
            matches!(&err, Error::WeightFile { path: p, .. } if *p == path),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn garbage_weights() {
    let (_tmp, dir) = copy_fixture("llama2-mha");
    std::fs::write(
        dir.join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a safetensors file",
    )
    .unwrap();
    assert!(matches!(load_err(&dir), Error::WeightFile { .. }));
}

#[test]
fn missing_tensor_is_named() {
    let (_tmp, dir) = copy_fixture("llama2-mha");
    rewrite_weights(&dir, |name, v| {
        (name != "model.layers.1.mlp.up_proj.weight").then_some(v)
    });
    let err = load_err(&dir);
    assert!(
        matches!(&err, Error::MissingTensor { tensor, .. } if tensor == "model.layers.1.mlp.up_proj.weight"),
        "{err}"
    );
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn wrong_shape_is_named() {
    let (_tmp, dir) = copy_fixture("llama2-mha");
    edit_config(&dir, |c| c["intermediate_size"] = 96.into());
    let err = load_err(&dir);
    match &err {
        Error::TensorShape {
            tensor,
            expected,
            found,
            file,
        } => {
            assert!(tensor.contains("mlp"), "{err}");
            assert_ne!(expected, found);
            assert!(file.ends_with("model.safetensors"));
        }
        _ => panic!("{err}"),
    }
}

#[test]
fn nan_weights_are_rejected() {
    let (_tmp, dir) = copy_fixture("llama2-mha");
    rewrite_weights(&dir, |name, mut v| {
        if name == "model.norm.weight" {
            v[3] = f32::NAN;
        }
        Some(v)
    });
    let err = load_err(&dir);
    assert!(
        matches!(&err, Error::TensorData { tensor, .. } if tensor == "model.norm.weight"),
        "{err}"
    );
}

#[test]
fn unknown_architecture() {
    let (_tmp, dir) = copy_fixture("llama2-mha");
    edit_config(&dir, |c| {
        c["model_type"] = "gpt_neox".into();
        c["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    });
    let err = load_err(&dir);
    assert!(
        matches!(&err, Error::UnsupportedModel(m) if m.contains("gpt_neox")),
        "{err}"
    );
}

/// `kiln_auto::load_any` picks the family by `model_type` (and says what it knows otherwise).
#[test]
fn load_any_picks_the_family_and_names_an_unknown_one() {
    use kiln::auto::{AnyModel, Seq2SeqModel, load_any};
    use kiln::core::loading::LoadOptions;
    let device = Default::default();
    let opts = LoadOptions::default();
    let path = |name: &str| fixture(name).to_str().unwrap().to_string();
    assert!(matches!(
        load_any::<B>(&path("llama3-gqa"), &device, &opts),
        Ok(AnyModel::Decoder(_))
    ));
    assert!(matches!(
        load_any::<B>(&path("nllb-tiny"), &device, &opts),
        Ok(AnyModel::Seq2Seq(l)) if matches!(l.model, Seq2SeqModel::M2M100(_))
    ));
    assert!(matches!(
        load_any::<B>(&path("t5-relu-tied"), &device, &opts),
        Ok(AnyModel::Seq2Seq(l)) if matches!(l.model, Seq2SeqModel::T5(_))
    ));
    let (_tmp, dir) = copy_fixture("llama2-mha");
    edit_config(&dir, |c| c["model_type"] = "gpt_neox".into());
    match load_any::<B>(dir.to_str().unwrap(), &device, &opts) {
        Err(Error::UnsupportedModel(m)) => {
            assert!(m.contains("gpt_neox") && m.contains("config.json"), "{m}")
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("gpt_neox loaded"),
    }
}

#[test]
fn config_field_of_wrong_type_is_named() {
    let (_tmp, dir) = copy_fixture("llama2-mha");
    edit_config(&dir, |c| c["hidden_size"] = "sixty-four".into());
    let err = load_err(&dir);
    assert!(
        matches!(&err, Error::Config { message, .. } if message.contains("hidden_size")),
        "{err}"
    );
}

#[test]
fn inconsistent_heads_are_rejected() {
    let (_tmp, dir) = copy_fixture("llama3-gqa");
    edit_config(&dir, |c| c["num_key_value_heads"] = 3.into());
    let err = load_err(&dir);
    assert!(err.to_string().contains("num_key_value_heads"), "{err}");
}

#[test]
fn config_that_is_not_json_or_not_utf8() {
    let (_tmp, dir) = copy_fixture("llama2-mha");
    std::fs::write(dir.join("config.json"), b"{\"hidden_size\": \xff\xfe}").unwrap();
    assert!(matches!(load_err(&dir), Error::Config { .. }));
    std::fs::write(dir.join("config.json"), b"{\"hidden_size\": 64,").unwrap();
    assert!(matches!(load_err(&dir), Error::Config { .. }));
}

#[test]
fn missing_shard_is_named() {
    let (_tmp, dir) = copy_fixture("llama3-sharded");
    std::fs::remove_file(dir.join("model-00002-of-00003.safetensors")).unwrap();
    let err = load_err(&dir);
    assert!(
        matches!(&err, Error::MissingFile { path, .. } if path.ends_with("model-00002-of-00003.safetensors")),
        "{err}"
    );
}

#[test]
fn prompt_longer_than_context() {
    let model = Llama::<B>::from_pretrained(&fixture("llama2-mha"), &device()).unwrap();
    let prompt = vec![5u32; 300];
    let err = generate(
        &model,
        &[prompt],
        &GenerationConfig::default(),
        None,
        |_, _| {},
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::ContextOverflow {
                prompt: 300,
                context: 128,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn token_ids_outside_the_vocabulary() {
    let model = Llama::<B>::from_pretrained(&fixture("llama2-mha"), &device()).unwrap();
    let err = generate(
        &model,
        &[vec![1, 99_999]],
        &GenerationConfig::default(),
        None,
        |_, _| {},
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { name: "prompt", .. }),
        "{err}"
    );
}

#[test]
fn cli_rejects_invalid_utf8_prompt_file() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("prompt.txt");
    std::fs::write(&file, b"caf\xe9").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["generate", "--model"])
        .arg(fixture("llama2-mha"))
        .arg("--prompt-file")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not valid UTF-8") && stderr.contains("prompt.txt"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn cli_json_output() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "generate",
            "--json",
            "-n",
            "6",
            "--prompt-ids",
            "1,5,6",
            "--model",
        ])
        .arg(fixture("llama2-mha"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["prompt_tokens"], serde_json::json!([1, 5, 6]));
    assert_eq!(json["tokens"].as_array().unwrap().len(), 6);
    assert!(json["text"].is_string());
}

/// Found by `tests/untrusted/fuzz.rs`: a tokenizer.json whose post-processor template names a special
/// token it does not define made the `tokenizers` crate panic at the first encode. Loading it is
/// now an error naming the file.
/// Also found by fuzzing: a tokenizer.json whose BPE merges made the `tokenizers` crate panic
/// while parsing it.
#[test]
fn tokenizers_that_crash_the_tokenizers_crate_are_errors() {
    for file in [
        "tokenizer-template-undefined-special.json",
        "tokenizer-bpe-merge-panic.json",
    ] {
        let (_tmp, dir) = copy_fixture("llama3-gqa");
        std::fs::copy(
            fixture(&format!("fuzz-regressions/{file}")),
            dir.join("tokenizer.json"),
        )
        .unwrap();
        let err = kiln::core::Tokenizer::from_dir(&dir).unwrap_err();
        assert!(matches!(err, Error::Tokenizer(_)), "{file}: {err}");
        assert!(err.to_string().contains("tokenizer.json"), "{file}: {err}");
    }
}

/// A broken GGUF file is an `Error::WeightFormat` naming the file, with the GGUF reader's own
/// error kept as its source (not flattened to a string).
#[test]
fn gguf_errors_keep_their_source() {
    use std::error::Error as _;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("broken.gguf");
    std::fs::write(&path, b"GGUF\x03\x00\x00\x00truncated").unwrap();
    let err = match Llama::<B>::from_gguf(&path, &Default::default()) {
        Err(e) => e,
        Ok(_) => panic!("a 16-byte GGUF loaded"),
    };
    assert!(
        matches!(&err, Error::WeightFormat { path: p, .. } if *p == path),
        "{err}"
    );
    let source = err.source().expect("a source");
    assert!(
        source.downcast_ref::<kiln_gguf::GgufError>().is_some(),
        "{source:?}"
    );
}
