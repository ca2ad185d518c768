//! What transformers 5 does to a `tokenizer.json` for the tokenizer classes that rebuild their
//! pipeline: `LlamaTokenizer` and `NllbTokenizer` replace the file's normalizer, pre-tokenizer
//! and decoder with their own (`models/llama/tokenization_llama.py`,
//! `models/nllb/tokenization_nllb.py`). Loading the file as it stands gives other ids for text
//! that starts with a space or follows a special token (`" hi"`, `"<s> x"`), and for runs of
//! spaces in NLLB files without a precompiled charsmap. Every other class (`PreTrainedTokenizerFast`,
//! GPT-2, T5, ...) uses the file as it stands.

use serde_json::{Value, json};

/// Whether the class named by `config` (tokenizer_config.json) rebuilds the pipeline.
pub(crate) fn rebuilds(config: &Value) -> bool {
    matches!(class(config), "LlamaTokenizer" | "NllbTokenizer")
}

fn class(config: &Value) -> &str {
    let class = config
        .get("tokenizer_class")
        .and_then(Value::as_str)
        .unwrap_or("");
    class.strip_suffix("Fast").unwrap_or(class)
}

/// Rewrites `tokenizer` (the parsed tokenizer.json) as the transformers class named by
/// `config` (tokenizer_config.json) builds it. Returns whether anything changed.
pub(crate) fn apply(tokenizer: &mut Value, config: &Value) -> bool {
    match class(config) {
        "LlamaTokenizer" => {
            // add_prefix_space defaults to true; legacy (default false) prepends to every
            // segment between special tokens, else only to the first.
            let add_prefix_space = config
                .get("add_prefix_space")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            let legacy = config
                .get("legacy")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let scheme = match (add_prefix_space, legacy) {
                (false, _) => "never",
                (true, true) => "always",
                (true, false) => "first",
            };
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if add_prefix_space {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            tokenizer["normalizer"] = Value::Null;
            tokenizer["pre_tokenizer"] = json!({
                "type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": false
            });
            tokenizer["decoder"] = json!({"type": "Sequence", "decoders": decoders});
            true
        }
        "NllbTokenizer" => {
            // The normalizer is kept only as [Precompiled, collapse runs of spaces], and only
            // when the file has a precompiled charsmap.
            let charsmap = find_precompiled(&tokenizer["normalizer"]);
            tokenizer["normalizer"] = match charsmap {
                Some(precompiled) => json!({"type": "Sequence", "normalizers": [
                    precompiled,
                    {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}
                ]}),
                None => Value::Null,
            };
            let metaspace = json!({
                "type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true
            });
            tokenizer["pre_tokenizer"] = metaspace.clone();
            tokenizer["decoder"] = metaspace;
            true
        }
        _ => false,
    }
}

fn find_precompiled(normalizer: &Value) -> Option<Value> {
    match normalizer.get("type").and_then(Value::as_str) {
        Some("Precompiled") => Some(normalizer.clone()),
        Some("Sequence") => normalizer
            .get("normalizers")?
            .as_array()?
            .iter()
            .find_map(find_precompiled),
        _ => None,
    }
}
