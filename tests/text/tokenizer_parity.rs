//! kiln's tokenizer against HF transformers' (`tools/make_fixtures.py --only tokenizer-parity`):
//! the ids of a multilingual text set (emoji, CJK, leading and double spaces, `\n\n`, special
//! token strings inline), with and without the special tokens each model adds (BOS, EOS), and
//! the decoded text with and without special tokens, on every fixture tokenizer and the real
//! SmolLM2, Mistral-7B (SentencePiece with byte fallback) and T5 (Unigram) tokenizers in
//! `tests/data`. Streaming decoding must give the text of decoding the whole sequence.

use std::path::PathBuf;

use kiln::core::{TokenStream, Tokenizer};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    texts: Vec<String>,
    tokenizers: std::collections::BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
struct Entry {
    dir: String,
    rows: Vec<Row>,
}

#[derive(Deserialize)]
struct Row {
    with_special: Vec<u32>,
    plain: Vec<u32>,
    decode: String,
    decode_skip_special: String,
}

fn reference() -> Reference {
    let path = crate::common::fixture("tokenizer-parity/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn load(dir: &str) -> Tokenizer {
    Tokenizer::from_dir(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir)).unwrap()
}

#[test]
fn encode_and_decode_as_transformers() {
    let reference = reference();
    assert!(reference.tokenizers.len() >= 10);
    let mut failures = Vec::new();
    for (name, entry) in &reference.tokenizers {
        let tokenizer = load(&entry.dir);
        for (text, row) in reference.texts.iter().zip(&entry.rows) {
            let mut check = |what: &str, ok: bool, detail: String| {
                if !ok {
                    failures.push(format!("{name} {what} {text:?}: {detail}"));
                }
            };
            let ids = tokenizer.encode(text, true).unwrap();
            check(
                "encode+special",
                ids == row.with_special,
                format!("HF {:?} kiln {ids:?}", row.with_special),
            );
            let ids = tokenizer.encode(text, false).unwrap();
            check(
                "encode",
                ids == row.plain,
                format!("HF {:?} kiln {ids:?}", row.plain),
            );
            let s = tokenizer.decode(&row.with_special, false).unwrap();
            check(
                "decode",
                s == row.decode,
                format!("HF {:?} kiln {s:?}", row.decode),
            );
            let s = tokenizer.decode(&row.with_special, true).unwrap();
            check(
                "decode(skip special)",
                s == row.decode_skip_special,
                format!("HF {:?} kiln {s:?}", row.decode_skip_special),
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Token-by-token streaming yields exactly the text of decoding all tokens at once, including
/// characters split across byte-fallback or byte-level pieces.
#[test]
fn streaming_equals_whole_decode() {
    let reference = reference();
    for (name, entry) in &reference.tokenizers {
        let tokenizer = load(&entry.dir);
        for (text, row) in reference.texts.iter().zip(&entry.rows) {
            let mut stream = TokenStream::new();
            let mut streamed = String::new();
            for &id in &row.plain {
                if let Some(piece) = stream.push(&tokenizer, id).unwrap() {
                    streamed.push_str(&piece);
                }
            }
            if let Some(rest) = stream.finish(&tokenizer).unwrap() {
                streamed.push_str(&rest);
            }
            let whole = tokenizer.decode(&row.plain, true).unwrap();
            assert_eq!(streamed, whole, "{name}: {text:?}");
        }
    }
}
