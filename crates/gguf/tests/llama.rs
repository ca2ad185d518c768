//! Llama metadata, tensor-name mapping and the Q/K permutation.

mod common;

use common::{TensorSpec, s, str_array, write_gguf};
use kiln_gguf::{GgmlType, GgufError, GgufFile, Value, hf_tensor_name, permute_qk, unpermute_qk};

#[test]
fn hf_names() {
    let cases = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ),
        (
            "blk.12.attn_k.weight",
            "model.layers.12.self_attn.k_proj.weight",
        ),
        (
            "blk.3.attn_v.weight",
            "model.layers.3.self_attn.v_proj.weight",
        ),
        ("blk.3.attn_v.bias", "model.layers.3.self_attn.v_proj.bias"),
        (
            "blk.29.attn_output.weight",
            "model.layers.29.self_attn.o_proj.weight",
        ),
        (
            "blk.1.ffn_gate.weight",
            "model.layers.1.mlp.gate_proj.weight",
        ),
        ("blk.1.ffn_up.weight", "model.layers.1.mlp.up_proj.weight"),
        (
            "blk.1.ffn_down.weight",
            "model.layers.1.mlp.down_proj.weight",
        ),
        (
            "blk.7.attn_norm.weight",
            "model.layers.7.input_layernorm.weight",
        ),
        (
            "blk.7.ffn_norm.weight",
            "model.layers.7.post_attention_layernorm.weight",
        ),
    ];
    for (g, hf) in cases {
        assert_eq!(hf_tensor_name(g).as_deref(), Some(hf), "{g}");
    }
    for bad in [
        "rope_freqs.weight",
        "blk.x.attn_q.weight",
        "blk..attn_q.weight",
        "blk.1.attn_q",
        "blk.1.attn_qq.weight",
        "blk.1.attn_q.scale",
        "",
        "weight",
        "token_embd",
    ] {
        assert_eq!(hf_tensor_name(bad), None, "{bad}");
    }
}

#[test]
fn permute_by_hand() {
    // convert_hf_to_gguf.py: w.reshape(n_head, 2, head_dim // 2, cols).swapaxes(1, 2).
    // One head of 4 rows: HF rows [a0 a1 | b0 b1] become [a0 b0 a1 b1].
    let mut w = vec![0.0, 1.0, 2.0, 3.0];
    permute_qk(&mut w, 4, 1, 1).unwrap();
    assert_eq!(w, [0.0, 2.0, 1.0, 3.0]);
    unpermute_qk(&mut w, 4, 1, 1).unwrap();
    assert_eq!(w, [0.0, 1.0, 2.0, 3.0]);

    // Head size 6: [0 1 2 | 3 4 5] -> [0 3 1 4 2 5].
    let mut w: Vec<f32> = (0..6).map(|i| i as f32).collect();
    permute_qk(&mut w, 6, 1, 1).unwrap();
    assert_eq!(w, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);

    // Two heads of 4 rows, 2 columns: rows move whole.
    let mut w: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let gguf_rows = [0, 2, 1, 3, 4, 6, 5, 7];
    permute_qk(&mut w, 8, 2, 2).unwrap();
    let expect: Vec<f32> = gguf_rows
        .iter()
        .flat_map(|&r| [2.0 * r as f32, 2.0 * r as f32 + 1.0])
        .collect();
    assert_eq!(w, expect);
    // GGUF row h*hd + 2j + i  ==  HF row h*hd + i*hd/2 + j.
    unpermute_qk(&mut w, 8, 2, 2).unwrap();
    assert_eq!(w, (0..16).map(|i| i as f32).collect::<Vec<_>>());
}

#[test]
fn permute_then_unpermute_is_identity() {
    for (rows, cols, n_head) in [
        (576, 7, 9),
        (192, 3, 3),
        (64, 1, 1),
        (4096, 2, 32),
        (8, 5, 4),
    ] {
        let orig: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.5 - 3.0).collect();
        let mut w = orig.clone();
        permute_qk(&mut w, rows, cols, n_head).unwrap();
        if rows / n_head > 2 {
            assert_ne!(w, orig);
        }
        unpermute_qk(&mut w, rows, cols, n_head).unwrap();
        assert_eq!(w, orig, "{rows}x{cols}, {n_head} heads");
    }
}

#[test]
fn permute_shape_errors() {
    let mut w = vec![0.0; 12];
    assert!(matches!(
        unpermute_qk(&mut w, 4, 4, 1),
        Err(GgufError::Shape(_))
    ));
    assert!(matches!(
        unpermute_qk(&mut w, 12, 1, 0),
        Err(GgufError::Shape(_))
    ));
    assert!(matches!(
        unpermute_qk(&mut w, 12, 1, 5),
        Err(GgufError::Shape(_))
    ));
    assert!(matches!(
        unpermute_qk(&mut w, 6, 2, 2),
        Err(GgufError::Shape(_))
    )); // odd head size
}

#[test]
fn metadata_of_llama_vocab_files() {
    let Some(spm) = common::shared_tokenizer_file("llama-vocab-tests/ggml-vocab-llama-spm.gguf")
    else {
        return;
    };
    let m = GgufFile::open(spm).unwrap().llama_metadata().unwrap();
    assert_eq!(m.architecture, "llama");
    assert_eq!(
        (m.block_count, m.embedding_length, m.feed_forward_length),
        (32, 4096, 11008)
    );
    assert_eq!((m.head_count, m.head_count_kv, m.head_dim), (32, 32, 128));
    assert_eq!(m.rope_freq_base, 10000.0); // absent: default
    assert_eq!(m.rms_norm_eps, 1e-5);
    assert_eq!(
        (m.context_length, m.rope_dimension_count, m.vocab_size),
        (4096, 128, 32000)
    );
    assert_eq!(
        (m.bos_token_id, m.eos_token_id, m.unk_token_id),
        (Some(1), Some(2), Some(0))
    );
    assert_eq!(m.add_bos_token, Some(true));
    assert!(m.tie_word_embeddings()); // vocab-only file: no output.weight
    assert!(m.qk_permuted());

    let bpe = common::shared_tokenizer_file("llama-vocab-tests/ggml-vocab-llama-bpe.gguf").unwrap();
    let m = GgufFile::open(bpe).unwrap().llama_metadata().unwrap();
    assert_eq!((m.head_count, m.head_count_kv), (32, 8));
    assert_eq!(m.rope_freq_base, 500000.0);
    assert_eq!(m.vocab_size, 128256);
    assert_eq!(m.bos_token_id, Some(128000));
    assert_eq!(m.rope_scaling, None);
}

fn qwen_like(arch: &str) -> Vec<(&'static str, Value)> {
    let k = |s: &str| -> &'static str { Box::leak(format!("{arch}.{s}").into_boxed_str()) };
    vec![
        ("general.architecture", s(arch)),
        ("general.name", s("tiny")),
        (k("block_count"), Value::U32(2)),
        (k("embedding_length"), Value::U32(64)),
        (k("feed_forward_length"), Value::U64(128)),
        (k("attention.head_count"), Value::U32(4)),
        (k("attention.head_count_kv"), Value::U32(2)),
        (k("context_length"), Value::U32(32768)),
        (k("rope.freq_base"), Value::F32(1_000_000.0)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
        (k("rope.scaling.type"), s("yarn")),
        (k("rope.scaling.factor"), Value::F32(4.0)),
        (k("rope.scaling.original_context_length"), Value::U32(8192)),
        ("tokenizer.ggml.model", s("gpt2")),
        (
            "tokenizer.ggml.tokens",
            str_array(&["a", "b", "ab", "<|eos|>"]),
        ),
        ("tokenizer.ggml.merges", str_array(&["a b"])),
        ("tokenizer.ggml.eos_token_id", Value::U32(3)),
        ("tokenizer.ggml.padding_token_id", Value::U32(3)),
    ]
}

#[test]
fn metadata_with_other_architecture_prefixes() {
    for arch in ["mistral", "qwen2"] {
        let out = TensorSpec {
            name: "output.weight".into(),
            dims: vec![64, 4],
            ggml_type: GgmlType::F32,
            data: vec![0; 64 * 4 * 4],
        };
        let f =
            GgufFile::from_bytes("q.gguf", write_gguf(3, &qwen_like(arch), &[out], 32)).unwrap();
        let m = f.llama_metadata().unwrap();
        assert_eq!(m.architecture, arch);
        assert_eq!(m.name.as_deref(), Some("tiny"));
        assert_eq!(
            (m.block_count, m.embedding_length, m.feed_forward_length),
            (2, 64, 128)
        );
        assert_eq!((m.head_count, m.head_count_kv, m.head_dim), (4, 2, 16));
        assert_eq!(m.rope_dimension_count, 16);
        assert_eq!(m.rope_freq_base, 1_000_000.0);
        assert_eq!(m.rms_norm_eps, 1e-6);
        assert_eq!(m.vocab_size, 4); // from the token list
        assert!(m.has_output_weight && !m.tie_word_embeddings());
        let rs = m.rope_scaling.as_ref().unwrap();
        assert_eq!(rs.scaling_type.as_deref(), Some("yarn"));
        assert_eq!(rs.factor, Some(4.0));
        assert_eq!(rs.original_context_length, Some(8192));
        assert_eq!(
            (m.bos_token_id, m.eos_token_id, m.pad_token_id),
            (None, Some(3), Some(3))
        );
        assert_eq!(m.qk_permuted(), arch == "mistral");
        let tok = f.tokenizer().unwrap();
        assert_eq!(tok.encode("abab", false).unwrap().get_ids(), [2, 2]);
    }

    // Missing and mistyped keys name the key.
    let mut kvs = qwen_like("qwen2");
    kvs.retain(|(k, _)| *k != "qwen2.block_count");
    let f = GgufFile::from_bytes("q.gguf", write_gguf(3, &kvs, &[], 32)).unwrap();
    let err = f.llama_metadata().unwrap_err();
    assert!(
        matches!(&err, GgufError::MissingKey { key, .. } if key == "qwen2.block_count"),
        "{err}"
    );

    let mut kvs = qwen_like("qwen2");
    kvs.push(("qwen2.rope.dimension_count", s("sixty-four")));
    let f = GgufFile::from_bytes("q.gguf", write_gguf(3, &kvs, &[], 32)).unwrap();
    let err = f.llama_metadata().unwrap_err();
    assert!(
        err.to_string().contains("qwen2.rope.dimension_count"),
        "{err}"
    );

    let mut kvs = qwen_like("qwen2");
    kvs.push(("qwen2.attention.head_count_kv", Value::U32(3)));
    kvs.retain(|(k, v)| *k != "qwen2.attention.head_count_kv" || *v == Value::U32(3));
    let f = GgufFile::from_bytes("q.gguf", write_gguf(3, &kvs, &[], 32)).unwrap();
    assert!(f.llama_metadata().is_err());
}

#[test]
fn unsupported_tokenizers_are_errors() {
    let mut kvs = qwen_like("qwen2");
    kvs.push(("tokenizer.ggml.pre", s("some-future-pre")));
    let f = GgufFile::from_bytes("p.gguf", write_gguf(3, &kvs, &[], 32)).unwrap();
    let err = f.tokenizer().unwrap_err();
    assert!(err.to_string().contains("some-future-pre"), "{err}");

    let mut kvs = qwen_like("qwen2");
    kvs.retain(|(k, _)| *k != "tokenizer.ggml.model");
    kvs.push(("tokenizer.ggml.model", s("bert")));
    let f = GgufFile::from_bytes("p.gguf", write_gguf(3, &kvs, &[], 32)).unwrap();
    assert!(matches!(f.tokenizer(), Err(GgufError::Tokenizer { .. })));

    let mut kvs = qwen_like("qwen2");
    kvs.retain(|(k, _)| *k != "tokenizer.ggml.merges");
    kvs.push(("tokenizer.ggml.merges", str_array(&["nospace"])));
    let f = GgufFile::from_bytes("p.gguf", write_gguf(3, &kvs, &[], 32)).unwrap();
    assert!(
        f.tokenizer()
            .unwrap_err()
            .to_string()
            .contains("tokenizer.ggml.merges")
    );

    let mut kvs = qwen_like("qwen2");
    kvs.push(("tokenizer.ggml.add_bos_token", Value::Bool(true)));
    kvs.push(("tokenizer.ggml.bos_token_id", Value::U32(99)));
    let f = GgufFile::from_bytes("p.gguf", write_gguf(3, &kvs, &[], 32)).unwrap();
    assert!(
        f.tokenizer()
            .unwrap_err()
            .to_string()
            .contains("bos_token_id")
    );
}
