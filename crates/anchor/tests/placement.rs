//! `<AC>` placement on the real SmolLM2 and Mistral tokenizers against an oracle computed
//! without kiln: `tests/data/placement_oracle.json`, written by `tools/anchor_placement_oracle.py`
//! (HF's Python `tokenizers` encodes each text once; the sentences are written by hand; the
//! anchors are placed from the tokens' vocabulary bytes, not from offsets).

use kiln_anchor::{AcPlacement, add_ac_token, encode_ac, split_sentences};
use kiln_core::Tokenizer;
use serde_json::Value;

const ORACLE: &str = include_str!("data/placement_oracle.json");

fn oracle() -> Value {
    serde_json::from_str(ORACLE).unwrap()
}

/// The committed tokenizer with `<AC>` added; a missing file fails the test.
fn tokenizer(kind: &str) -> (Tokenizer, u32) {
    let dir = match kind {
        "smollm2" => "smollm2-135m-instruct",
        "mistral" => "mistral-7b-v0.1",
        _ => unreachable!(),
    };
    let path = format!(
        "{}/../../tests/data/tokenizers/{dir}/tokenizer.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let inner = tokenizers::Tokenizer::from_file(&path)
        .unwrap_or_else(|e| panic!("{path}: {e} (the committed tokenizer is required)"));
    add_ac_token(&Tokenizer::new(inner)).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_owned())
        .collect()
}

/// Runs `check` on every tokenizer and case with kiln's tokenizer and `<AC>` id.
fn each_case(mut check: impl FnMut(&str, &Tokenizer, u32, &Value)) {
    let oracle = oracle();
    for kind in ["smollm2", "mistral"] {
        let (tok, ac) = tokenizer(kind);
        assert_eq!(
            u64::from(ac),
            oracle[kind]["ac_id"].as_u64().unwrap(),
            "{kind}"
        );
        let cases = oracle[kind]["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 7);
        for case in cases {
            check(kind, &tok, ac, case);
        }
    }
}

fn placements() -> [(AcPlacement, &'static str); 2] {
    [
        (AcPlacement::Document, "document"),
        (AcPlacement::Prompt, "prompt"),
    ]
}

#[test]
fn splitter_matches_the_hand_written_sentences() {
    each_case(|_, _, _, case| {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<String> = strings(&case["sentences"])
            .iter()
            .map(|s| s.trim().to_owned())
            .collect();
        assert_eq!(split_sentences(text), expected, "{}", case["name"]);
    });
}

#[test]
fn tokens_are_the_whole_text_encoding() {
    each_case(|kind, tok, ac, case| {
        let text = case["text"].as_str().unwrap();
        let whole = ids(&case["ids"]);
        assert_eq!(
            tok.encode(text, false).unwrap(),
            whole,
            "{kind} {}",
            case["name"]
        );
        for (placement, _) in placements() {
            let got = encode_ac(tok, text, ac, None, placement).unwrap();
            let without: Vec<u32> = got.iter().copied().filter(|&t| t != ac).collect();
            assert_eq!(without, whole, "{kind} {} {placement:?}", case["name"]);
        }
    });
}

#[test]
fn anchors_where_the_oracle_puts_them() {
    each_case(|kind, tok, ac, case| {
        let text = case["text"].as_str().unwrap();
        let n = case["sentences"].as_array().unwrap().len();
        let closed = case["last_closed"].as_bool().unwrap();
        for (placement, form) in placements() {
            let got = encode_ac(tok, text, ac, None, placement).unwrap();
            assert_eq!(got, ids(&case[form]), "{kind} {} {form}", case["name"]);
            // The rule, from the hand-written sentences alone.
            let anchors = got.iter().filter(|&&t| t == ac).count();
            let last = usize::from(placement == AcPlacement::Prompt && closed);
            assert_eq!(anchors, n - 1 + last, "{kind} {} {form}", case["name"]);
            assert_eq!(got.last() == Some(&ac), last == 1 && !text.ends_with('\n'));
            let with_bos = encode_ac(tok, text, ac, Some(7), placement).unwrap();
            assert_eq!(with_bos[0], 7);
            assert_eq!(with_bos[1..], got[..]);
        }
    });
}

#[test]
fn text_between_anchors_is_each_sentence() {
    each_case(|kind, tok, ac, case| {
        let text = case["text"].as_str().unwrap();
        let sentences = strings(&case["sentences"]);
        for (placement, form) in placements() {
            let got = encode_ac(tok, text, ac, None, placement).unwrap();
            // Decoding prefixes (Mistral's decoder drops the text's first space only), the text
            // each anchor closes is the hand-written sentence with its leading whitespace.
            let mut plain: Vec<u32> = Vec::new();
            let mut before = String::new();
            let mut k = 0;
            for &t in &got {
                if t != ac {
                    plain.push(t);
                    continue;
                }
                let upto = tok.decode(&plain, false).unwrap();
                let piece = upto.strip_prefix(before.as_str()).unwrap();
                assert_eq!(piece, sentences[k], "{kind} {} {form}", case["name"]);
                before = upto;
                k += 1;
            }
            let all = tok.decode(&plain, false).unwrap();
            assert_eq!(all, text, "{kind} {}", case["name"]);
            let tail = &text[sentences.concat().len()..];
            let rest = sentences[k..].concat() + tail;
            assert_eq!(all[before.len()..], rest, "{kind} {} {form}", case["name"]);
        }
    });
}

/// The old per-sentence encoding lost the space token at sentence starts: SmolLM2 encoded
/// "The U.S. team won." on its own as `The`, where the text has ` The` (`ĠThe`).
#[test]
fn sentence_starts_keep_their_space_token() {
    let oracle = oracle();
    let (tok, ac) = tokenizer("smollm2");
    let space_the = oracle["smollm2"]["space_the_id"].as_u64().unwrap() as u32;
    let the = oracle["smollm2"]["the_id"].as_u64().unwrap() as u32;
    assert_eq!(tok.id_to_token(space_the).as_deref(), Some("\u{120}The"));
    let text = "Mr. Smith met Dr. J. Watson at 5 p.m. on Baker St. today. \
                It rained, e.g. on the roads, i.e. everywhere. The U.S. team won.";
    let got = encode_ac(&tok, text, ac, None, AcPlacement::Document).unwrap();
    let after: Vec<u32> = got
        .windows(2)
        .filter(|w| w[0] == ac)
        .map(|w| w[1])
        .collect();
    assert_eq!(after.len(), 2);
    assert_eq!(after[1], space_the);
    let last = got.iter().rposition(|&t| t == ac).unwrap();
    assert_eq!(
        tok.decode(&got[last + 1..], false).unwrap(),
        " The U.S. team won."
    );
    // What the per-sentence encoding gave.
    assert_eq!(tok.encode("The U.S. team won.", false).unwrap()[0], the);
    assert_ne!(the, space_the);
}
