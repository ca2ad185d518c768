//! The paper's few-shot protocol: `<AC>` only after each demonstration (§4.3), options
//! tokenised as lm-evaluation-harness does, and the harness's scoring (a masked full forward at
//! true positions) checked against HF transformers' logits.

use burn::backend::Flex;
use burn::prelude::*;
use kiln_anchor::Session;
use kiln_anchor::score::{MaskedSession, greedy_decode};
use kiln_anchor::{
    AnchorMode, AnchorSession, AnchorSet, FewShotFormat, FullSession, McQuestion, PositionMode,
    PromptAnchors, add_ac_token, few_shot_choices,
};
use kiln_core::Tokenizer;
use kiln_llama::Llama;

type B = Flex;

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn question(q: &str, choices: &[&str], answer: usize) -> McQuestion {
    McQuestion {
        question: q.into(),
        choices: choices.iter().map(|c| c.to_string()).collect(),
        answer,
    }
}

/// The prompts as written out by hand.
const DEMO_1: &str =
    "Q: Where do fish live? Answer choices: (a) water (b) tree. A: So the answer is water.";
const DEMO_2: &str = "Q: What is hot? Answer choices: (a) fire (b) ice. A: So the answer is fire.";
const QUESTION: &str = "Q: What is cold? Answer choices: (a) ice (b) fire. A: So the answer is";

fn items(anchors: PromptAnchors, ac: Option<u32>) -> (Tokenizer, Vec<kiln_anchor::score::Choice>) {
    let base = Tokenizer::from_dir(&fixture("llama2-mha")).unwrap();
    let (tokenizer, _) = add_ac_token(&base).unwrap();
    let demos = vec![
        (question("Where do fish live?", &["water", "tree"], 0), None),
        (question("What is hot?", &["fire", "ice"], 0), None),
    ];
    let questions = [question("What is cold?", &["ice", "fire"], 0)];
    let format = FewShotFormat {
        ac,
        anchors,
        bos: Some(1),
    };
    let items = few_shot_choices(&tokenizer, &demos, &questions, format).unwrap();
    (tokenizer, items)
}

fn split_at(ids: &[u32], ac: u32) -> Vec<Vec<u32>> {
    ids.split(|&t| t == ac).map(<[u32]>::to_vec).collect()
}

#[test]
fn paper_prompts_anchor_each_demonstration_only() {
    let base = Tokenizer::from_dir(&fixture("llama2-mha")).unwrap();
    let (_, ac) = add_ac_token(&base).unwrap();
    let (tok, items) = items(PromptAnchors::Demonstrations, Some(ac));
    let context = format!("{DEMO_1} {DEMO_2} {QUESTION}");
    let item = &items[0];
    // The ids without <AC> are the whole text's own encoding (HF tokenizers), after BOS.
    let plain: Vec<u32> = item.context.iter().copied().filter(|&t| t != ac).collect();
    assert_eq!(plain[0], 1);
    assert_eq!(plain[1..], tok.encode(&context, false).unwrap()[..]);
    // Exactly two anchors, each closing one demonstration; the question has none.
    let parts = split_at(&item.context[1..], ac);
    assert_eq!(parts.len(), 3, "{parts:?}");
    for (part, text) in parts.iter().zip([DEMO_1, DEMO_2, QUESTION]) {
        assert_eq!(tok.decode(part, true).unwrap().trim(), text);
    }
    // Options: what follows the context in running text, leading space included.
    for (option, text) in item.options.iter().zip([" ice.", " fire."]) {
        let whole = tok.encode(&format!("{context}{text}"), false).unwrap();
        assert_eq!(whole[whole.len() - option.len()..], option[..]);
        assert_eq!(tok.decode(option, true).unwrap().trim(), text.trim());
    }
    assert_eq!(item.answer, 0);
}

#[test]
fn sentence_protocol_anchors_the_question_too() {
    let base = Tokenizer::from_dir(&fixture("llama2-mha")).unwrap();
    let (_, ac) = add_ac_token(&base).unwrap();
    let (tok, items) = items(PromptAnchors::Sentences, Some(ac));
    let parts = split_at(&items[0].context[1..], ac);
    // Counted by hand: three closed sentences per demonstration and two in the question
    // ("Q: What is cold?", "Answer choices: (a) ice (b) fire."); the open "A: So the answer is"
    // is what the options see besides the anchors.
    assert_eq!(parts.len(), 9, "{parts:?}");
    assert_eq!(
        tok.decode(parts.last().unwrap(), true).unwrap().trim(),
        "A: So the answer is"
    );
    // EP / plain models: no id inserted.
    let (tok, items) = items_plain();
    let context = format!("{DEMO_1} {DEMO_2} {QUESTION}");
    assert_eq!(
        items[0].context[1..],
        tok.encode(&context, false).unwrap()[..]
    );
}

fn items_plain() -> (Tokenizer, Vec<kiln_anchor::score::Choice>) {
    items(PromptAnchors::Demonstrations, None)
}

fn reference_f32(name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(fixture("llama2-mha").join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(name).unwrap();
    let values = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (view.shape().to_vec(), values)
}

fn reference_ids(name: &str) -> Vec<u32> {
    let bytes = std::fs::read(fixture("llama2-mha").join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

fn host(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

/// The harness's scoring recomputes one masked forward at true positions per feed: with no
/// anchor in the text it is HF's causal forward, fed in two chunks (logits of the second chunk
/// against HF's prefill logits of the same positions).
#[test]
fn masked_session_is_hfs_forward() {
    let model = Llama::<B>::from_pretrained(&fixture("llama2-mha"), &Default::default()).unwrap();
    let prompt = reference_ids("prompt_ids");
    let (shape, hf) = reference_f32("prefill_logits");
    let vocab = shape[1];
    // An anchor id the prompt does not hold: the AnSAN mask is the causal one.
    let unused = (0..vocab as u32).find(|t| !prompt.contains(t)).unwrap();
    let anchors = AnchorSet::new(AnchorMode::Ep, [unused]).unwrap();
    for anchors in [None, Some(anchors)] {
        let mut session = MaskedSession::new(&model, anchors);
        let first = host(session.feed(&prompt[..5]).unwrap());
        let rest = host(session.feed(&prompt[5..]).unwrap());
        let got: Vec<f32> = first.into_iter().chain(rest).collect();
        let diff = got
            .iter()
            .zip(&hf)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-4, "max |Δ| {diff}");
        assert_eq!(session.cache_len(), 0);
    }
}

/// With anchors in the text, the harness's masked full forward and the compacted anchor cache
/// with true positions give the same logits (the equivalence the README states), while the
/// cache holds only the anchors and the open sentence.
#[test]
fn masked_session_equals_the_anchor_cache_at_true_positions() {
    let model = Llama::<B>::from_pretrained(&fixture("llama2-mha"), &Default::default()).unwrap();
    let prompt = reference_ids("prompt_ids");
    let anchors = AnchorSet::new(AnchorMode::Ep, [prompt[3], prompt[8]]).unwrap();
    let mut masked = MaskedSession::new(&model, Some(anchors.clone()));
    let mut cached = AnchorSession::new(&model, anchors, PositionMode::True);
    for chunk in [&prompt[..4], &prompt[4..6], &prompt[6..]] {
        let a = host(masked.feed(chunk).unwrap());
        let b = host(cached.feed(chunk).unwrap());
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-4, "max |Δ| {diff}");
    }
    // Anchors at indices 3 and 8 (the last), nothing after it: the cache holds the two anchors.
    let last = prompt
        .iter()
        .rposition(|t| *t == prompt[3] || *t == prompt[8])
        .unwrap();
    let held = prompt
        .iter()
        .filter(|t| **t == prompt[3] || **t == prompt[8])
        .count()
        + (prompt.len() - 1 - last);
    assert_eq!(cached.cache_len(), held);
}

/// `greedy_decode` through the full cache, the anchor cache with an anchor the text never
/// holds, and no cache at all gives HF's greedy ids; the measured KV bytes are the f32 cache of
/// every layer (2 · layers · kv_heads · head_dim · positions · 4, from config.json) for the
/// cached sessions and 0 without a cache.
#[test]
fn greedy_decode_gives_hfs_greedy_ids_and_measures_the_cache() {
    let model = Llama::<B>::from_pretrained(&fixture("llama2-mha"), &Default::default()).unwrap();
    let prompt = reference_ids("prompt_ids");
    let greedy = reference_ids("greedy_ids");
    let text = std::fs::read_to_string(fixture("llama2-mha").join("config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&text).unwrap();
    let get = |k: &str| config[k].as_u64().unwrap() as usize;
    let heads = get("num_attention_heads");
    let kv_heads = config["num_key_value_heads"]
        .as_u64()
        .map_or(heads, |v| v as usize);
    let per_position = 2 * get("num_hidden_layers") * kv_heads * (get("hidden_size") / heads) * 4;
    let steps = 8;
    let positions = prompt.len() + steps - 1;
    let unused = (0..model.config().vocab_size as u32)
        .find(|t| !prompt.contains(t) && !greedy.contains(t))
        .unwrap();
    let anchors = AnchorSet::new(AnchorMode::Ep, [unused]).unwrap();

    let full = greedy_decode(&mut FullSession::new(&model), &prompt, steps).unwrap();
    let cached = greedy_decode(
        &mut AnchorSession::new(&model, anchors.clone(), PositionMode::Compacted),
        &prompt,
        steps,
    )
    .unwrap();
    let none = greedy_decode(
        &mut MaskedSession::new(&model, Some(anchors)),
        &prompt,
        steps,
    )
    .unwrap();
    for r in [&full, &cached, &none] {
        assert_eq!(r.tokens, greedy[..steps]);
    }
    for r in [&full, &cached] {
        assert_eq!(r.cache_len, positions);
        assert_eq!(r.kv_bytes, per_position * positions);
    }
    assert_eq!((none.cache_len, none.kv_bytes), (0, 0));
}
