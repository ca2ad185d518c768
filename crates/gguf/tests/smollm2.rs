//! The real SmolLM2-135M-Instruct Q4_1 GGUF (98 MB, not committed): fetched by
//! `tools/fetch_smollm2.sh`, or named by `$KILN_SMOLLM2_GGUF`. Every test here skips, saying
//! why, when the file is absent, and fails instead when `KILN_REQUIRE_DATA` is set (CI).
//!
//! Reference values come from the `gguf` Python package (`tools/gguf_reference.py --smollm2`)
//! and from the Hugging Face `tokenizer.json`/`config.json` in `tests/data/tokenizers/`.

mod common;

use kiln_gguf::{GgmlType, GgufFile, hf_tensor_name};
use serde_json::Value as Json;

fn fixture() -> Json {
    let text = std::fs::read_to_string(common::fixtures().join("smollm2_q4_1.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn open() -> Option<GgufFile> {
    let path = common::smollm2_gguf()?;
    let f = GgufFile::open(&path).unwrap();
    let expected = fixture()["file_size"].as_u64().unwrap();
    let size = std::fs::metadata(&path).unwrap().len();
    if size != expected {
        common::skip(&format!(
            "{} is {size} bytes, the fixture was made from {expected}",
            path.display()
        ));
        return None;
    }
    Some(f)
}

fn bits_eq(got: &[f32], want: &[Json], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let w = w.as_f64().unwrap() as f32;
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "{what}[{i}]: ours {g}, gguf-py {w}"
        );
    }
}

#[test]
fn header_and_metadata_match_hf_config() {
    let Some(f) = open() else { return };
    assert_eq!(f.version(), 3);
    assert_eq!(f.tensors().len(), 272);
    let m = f.llama_metadata().unwrap();
    eprintln!("{m:#?}");

    let Some(cfg) = common::shared_tokenizer_file("smollm2-135m-instruct/config.json") else {
        return;
    };
    let cfg: Json = serde_json::from_str(&std::fs::read_to_string(cfg).unwrap()).unwrap();
    let u = |k: &str| cfg[k].as_u64().unwrap() as usize;
    assert_eq!(m.architecture, cfg["model_type"].as_str().unwrap());
    assert_eq!(m.block_count, u("num_hidden_layers"));
    assert_eq!(m.embedding_length, u("hidden_size"));
    assert_eq!(m.feed_forward_length, u("intermediate_size"));
    assert_eq!(m.head_count, u("num_attention_heads"));
    assert_eq!(m.head_count_kv, u("num_key_value_heads"));
    assert_eq!(m.head_dim, u("head_dim"));
    assert_eq!(m.rope_dimension_count, u("head_dim"));
    assert_eq!(m.context_length, u("max_position_embeddings"));
    assert_eq!(m.vocab_size, u("vocab_size"));
    assert_eq!(m.rms_norm_eps as f64, cfg["rms_norm_eps"].as_f64().unwrap());
    assert_eq!(
        m.rope_freq_base as f64,
        cfg["rope_parameters"]["rope_theta"].as_f64().unwrap()
    );
    assert_eq!(
        m.tie_word_embeddings(),
        cfg["tie_word_embeddings"].as_bool().unwrap()
    );
    assert_eq!(m.bos_token_id, Some(u("bos_token_id") as u32));
    assert_eq!(m.eos_token_id, Some(u("eos_token_id") as u32));
    assert_eq!(m.pad_token_id, Some(u("pad_token_id") as u32));
    assert_eq!(m.add_bos_token, Some(false));
    assert!(m.qk_permuted());

    // Every tensor has a Hugging Face name.
    for t in f.tensors() {
        assert!(hf_tensor_name(t.name()).is_some(), "{}", t.name());
    }

    let template = f.chat_template().unwrap();
    assert!(template.contains("<|im_start|>"));
    if let Some(p) = common::shared_tokenizer_file("smollm2-135m-instruct/chat_template.jinja") {
        assert_eq!(template.trim(), std::fs::read_to_string(p).unwrap().trim());
    }
}

#[test]
fn rows_are_bit_exact_against_gguf_py() {
    let Some(f) = open() else { return };
    let fx = fixture();
    for (name, ty) in [
        ("token_embd.weight", GgmlType::Q8_0),
        ("blk.0.attn_q.weight", GgmlType::Q4_1),
        ("output_norm.weight", GgmlType::F32),
    ] {
        assert_eq!(f.tensor_info(name).unwrap().ggml_type(), ty);
        let (shape, values) = f.tensor_f32(name).unwrap();
        let entry = &fx["rows"][name];
        match entry["rows"].as_array() {
            None => bits_eq(&values, entry["values"].as_array().unwrap(), name),
            Some(rows) => {
                let cols = *shape.last().unwrap();
                for (r, want) in rows.iter().zip(entry["values"].as_array().unwrap()) {
                    let r = r.as_u64().unwrap() as usize;
                    bits_eq(
                        &values[r * cols..(r + 1) * cols],
                        want.as_array().unwrap(),
                        &format!("{name} row {r}"),
                    );
                }
            }
        }
    }
}

#[test]
fn every_tensor_matches_gguf_py_checksums() {
    let Some(f) = open() else { return };
    let fx = fixture();
    let tensors = fx["tensors"].as_object().unwrap();
    assert_eq!(tensors.len(), f.tensors().len());
    let start = std::time::Instant::now();
    let mut n_params = 0usize;
    for t in f.tensors() {
        let want = &tensors[t.name()];
        assert_eq!(
            t.ggml_type().name(),
            want["type"].as_str().unwrap(),
            "{}",
            t.name()
        );
        let (shape, values) = f.tensor_f32(t.name()).unwrap();
        let want_shape: Vec<usize> = want["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(shape, want_shape, "{}", t.name());
        n_params += values.len();
        let (mut sum, mut wsum, mut abs_wsum) = (0f64, 0f64, 0f64);
        for (i, &v) in values.iter().enumerate() {
            let w = (i % 997 + 1) as f64;
            sum += v as f64;
            wsum += v as f64 * w;
            abs_wsum += (v as f64).abs() * w;
        }
        let tol = 1e-9 * abs_wsum + 1e-9;
        let (ws, ww) = (
            want["sum"].as_f64().unwrap(),
            want["weighted_sum"].as_f64().unwrap(),
        );
        assert!((sum - ws).abs() <= tol, "{}: sum {sum} vs {ws}", t.name());
        assert!(
            (wsum - ww).abs() <= tol,
            "{}: weighted sum {wsum} vs {ww}",
            t.name()
        );
    }
    eprintln!(
        "dequantised all {} tensors ({n_params} values) in {:.2?} and matched gguf-py's checksums",
        f.tensors().len(),
        start.elapsed()
    );
}

#[test]
fn tokenizer_matches_hf_tokenizer_json() {
    let Some(f) = open() else { return };
    let Some(path) = common::shared_tokenizer_file("smollm2-135m-instruct/tokenizer.json") else {
        return;
    };
    let hf = tokenizers::Tokenizer::from_file(path).unwrap();
    let ours = f.tokenizer().unwrap();
    assert_eq!(ours.get_vocab_size(true), hf.get_vocab_size(true));
    let texts = [
        "Once upon a time",
        "What is the capital of France?",
        "Hello, y'all! How are you 😁 ?我想在apple工作",
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "  leading spaces and\ttabs\n\nnew lines   ",
        "fn main() { println!(\"hi\"); }",
        "Ünïcödé façade — “quotes” …",
        "",
    ];
    for text in texts {
        let a = ours.encode(text, true).unwrap();
        let b = hf.encode(text, true).unwrap();
        assert_eq!(a.get_ids(), b.get_ids(), "{text:?}");
        assert_eq!(ours.decode(a.get_ids(), false).unwrap(), text);
    }
    // The prompt from shared/tokenizers/README.md.
    assert_eq!(
        ours.encode("Once upon a time", false).unwrap().get_ids(),
        [6403, 1980, 253, 655]
    );

    // Digits: llama.cpp's `smollm` pre-tokenizer splits off every digit (as SmolLM2's original
    // tokenizer does); the shared tokenizer.json, converted from this GGUF by transformers, has
    // no such step, but the vocabulary has no multi-digit or space+digit tokens, so both give
    // single digits.
    let a = ours.encode("in 2024", false).unwrap();
    let b = hf.encode("in 2024", false).unwrap();
    assert_eq!(a.get_tokens(), ["in", "Ġ", "2", "0", "2", "4"]);
    assert_eq!(a.get_ids(), b.get_ids());
}
