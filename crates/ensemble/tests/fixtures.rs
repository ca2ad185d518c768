//! DeePEn / GaC / UniTE on the tiny fixtures: a model ensembled with itself reproduces its own
//! greedy output; members with different tokenizers (byte-level BPE and SentencePiece with
//! byte fallback) and an encoder-decoder stay in step; bad input gets clear errors.

use std::path::PathBuf;

use burn::backend::{Flex, NdArray};
use kiln_core::seq2seq::Seq2SeqLm;
use kiln_core::{FinishReason, GenerationConfig, Tokenizer, generate};
use kiln_ensemble::{
    AnchorConfig, DecoderMember, Ensemble, EnsembleConfig, EnsembleError, EnsembleOutput, Member,
    Method, RelativeConfig, Seq2SeqMember, Vocab, find_anchors,
};
use kiln_llama::Llama;
use kiln_m2m100::{M2M100, language_token_id};

/// The default test backend; cross-backend checks also run on [`NdArray`].
type B = Flex;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

const PROMPT: &str = "The quick brown fox";

fn llama(name: &str) -> Box<dyn Member<B>> {
    llama_on::<B>(name)
}

fn llama_on<C: burn::prelude::Backend>(name: &str) -> Box<dyn Member<C>> {
    let dir = fixture(name);
    let model = Llama::<C>::from_pretrained(&dir, &Default::default()).unwrap();
    let embeddings = model.model.embed_tokens.dense_weight();
    let eos = model.config().eos_token_ids.clone();
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    Box::new(DecoderMember::new(name, model, tokenizer, embeddings, eos))
}

fn nllb() -> Box<dyn Member<B>> {
    let dir = fixture("nllb-tiny");
    let model = M2M100::<B>::from_pretrained(&dir, &Default::default()).unwrap();
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let src = language_token_id(&tokenizer, "eng_Latn", "src").unwrap();
    let tgt = language_token_id(&tokenizer, "deu_Latn", "tgt").unwrap();
    let eos = model.eos_token_ids()[0];
    let embeddings = model.model.shared.dense_weight();
    Box::new(
        Seq2SeqMember::new("nllb-tiny", model, tokenizer, embeddings)
            .with_source_affixes(vec![src], vec![eos])
            .with_forced_prefix(vec![tgt])
            .with_max_context(128),
    )
}

fn greedy(n: usize) -> GenerationConfig {
    GenerationConfig::default().with_max_new_tokens(n)
}

#[test]
fn self_ensemble_reproduces_greedy_output() {
    let dir = fixture("llama3-gqa");
    let model = Llama::<B>::from_pretrained(&dir, &Default::default()).unwrap();
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let prompt = tokenizer.encode(PROMPT, true).unwrap();
    let reference = generate(
        &model,
        &[prompt],
        &GenerationConfig::default().with_max_new_tokens(12),
        None,
        |_, _| {},
    )
    .unwrap();
    let want = &reference[0].tokens;
    for method in [Method::Deepen, Method::Gac, Method::Unite] {
        let config = EnsembleConfig::default().with_method(method);
        let mut ensemble =
            Ensemble::new(vec![llama("llama3-gqa"), llama("llama3-gqa")], config).unwrap();
        let out = ensemble.generate(&[PROMPT], &greedy(12)).unwrap();
        assert_eq!(&out.tokens, want, "{method:?}");
        // The assistant got the same ids, fed directly (same vocabulary).
        assert_eq!(&out.member_tokens[1], want, "{method:?}");
        let alone = ensemble.generate_member(0, PROMPT, &greedy(12)).unwrap();
        assert_eq!(&alone.tokens, want);
    }
}

#[test]
fn anchors_of_byte_level_and_sentencepiece_fixtures() {
    let a = Tokenizer::from_dir(&fixture("llama3-gqa")).unwrap();
    let b = Tokenizer::from_dir(&fixture("llama2-mha")).unwrap();
    let va = Vocab::from_tokenizer(&a, 496);
    let vb = Vocab::from_tokenizer(&b, 509);
    let names = ["a".to_string(), "b".to_string()];
    let anchors = find_anchors(&[&va, &vb], &names, &AnchorConfig::default()).unwrap();
    // " the" is `Ġthe` in one and `▁the` in the other.
    let the = anchors
        .keys
        .iter()
        .position(|k| k == b" the")
        .expect("` the` is shared");
    assert_eq!(a.id_to_token(anchors.ids[0][the]).unwrap(), "Ġthe");
    assert_eq!(b.id_to_token(anchors.ids[1][the]).unwrap(), "▁the");
    // A newline: `Ċ` (byte-level) and `<0x0A>` (byte fallback).
    assert!(anchors.keys.iter().any(|k| k == b"\n"), "newline is shared");
    // Every anchor spells the same bytes in both vocabularies; specials are not anchors.
    for (k, key) in anchors.keys.iter().enumerate() {
        assert_eq!(va.token_bytes(anchors.ids[0][k]), &key[..]);
        assert_eq!(vb.token_bytes(anchors.ids[1][k]), &key[..]);
        assert!(!va.is_special(anchors.ids[0][k]) && !vb.is_special(anchors.ids[1][k]));
    }
    let subset = find_anchors(
        &[&va, &vb],
        &names,
        &AnchorConfig::default().with_max_anchors(Some(10)),
    )
    .unwrap();
    assert_eq!(subset.len(), 10);
    assert_eq!(subset.keys[..], anchors.keys[..10]);
}

/// Each member's own stream must spell the chosen text: all of it but an unfinished character
/// at the end, for members that can spell any byte (byte-level, byte fallback); NLLB, which
/// cannot, at least follows.
fn check_in_step<C: burn::prelude::Backend>(ensemble: &Ensemble<C>, out: &EnsembleOutput) {
    for (m, member) in ensemble.members().iter().enumerate() {
        let bytes: Vec<u8> = member
            .generated()
            .iter()
            .flat_map(|&t| ensemble.vocabs()[m].token_bytes(t).to_vec())
            .collect();
        if member.name() == "nllb-tiny" {
            assert!(out.bytes.is_empty() || !member.generated().is_empty());
            continue;
        }
        assert!(
            out.bytes.starts_with(&bytes),
            "member {}: {:?} vs {:?}",
            member.name(),
            bytes,
            out.bytes
        );
        assert!(
            out.bytes.len() - bytes.len() <= 3,
            "member {} lags: {:?} vs {:?}",
            member.name(),
            bytes,
            out.bytes
        );
    }
}

#[test]
fn different_tokenizers_stay_in_step() {
    for method in [Method::Deepen, Method::Gac, Method::Unite] {
        let config = EnsembleConfig::default().with_method(method);
        let mut ensemble =
            Ensemble::new(vec![llama("llama3-gqa"), llama("llama2-mha")], config).unwrap();
        let out = ensemble.generate(&[PROMPT], &greedy(16)).unwrap();
        assert!(!out.text.is_empty(), "{method:?}");
        check_in_step(&ensemble, &out);
        let again = ensemble.generate(&[PROMPT], &greedy(16)).unwrap();
        assert_eq!(out, again, "{method:?}: not reproducible");
        // The same tokens on another backend.
        let mut other = Ensemble::<NdArray>::new(
            vec![llama_on("llama3-gqa"), llama_on("llama2-mha")],
            EnsembleConfig::default().with_method(method),
        )
        .unwrap();
        let theirs = other.generate(&[PROMPT], &greedy(16)).unwrap();
        assert_eq!(
            out.tokens, theirs.tokens,
            "{method:?}: flex and ndarray differ"
        );
        eprintln!("{method:?}: {:?} {:?}", out.text, out.tokens);
    }
}

#[test]
fn top_k_relative_matrices_run() {
    let config =
        EnsembleConfig::default().with_relative(RelativeConfig::default().with_top_k(Some(16)));
    let mut ensemble =
        Ensemble::new(vec![llama("llama2-mha"), llama("llama3-gqa")], config).unwrap();
    let out = ensemble.generate(&[PROMPT], &greedy(10)).unwrap();
    check_in_step(&ensemble, &out);
}

#[test]
fn llama_and_nllb_translate_together() {
    let prompt = "Translate to German: The quick brown fox\nGerman:";
    let source = "The quick brown fox";
    // Llama main with an NLLB assistant, then the reverse.
    for members in [
        vec![llama("llama3-gqa"), nllb()],
        vec![nllb(), llama("llama2-mha")],
    ] {
        let main_is_nllb = members[0].name() == "nllb-tiny";
        let mut ensemble = Ensemble::new(members, EnsembleConfig::default()).unwrap();
        let prompts = if main_is_nllb {
            [source, prompt]
        } else {
            [prompt, source]
        };
        let out = ensemble.generate(&prompts, &greedy(10)).unwrap();
        check_in_step(&ensemble, &out);
        eprintln!("{:?}", out.text);
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let members = || vec![llama("llama3-gqa"), llama("llama2-mha")];
    let err = |r: Result<Ensemble<B>, EnsembleError>| r.err().expect("an error").to_string();
    let e = err(Ensemble::new(
        members(),
        EnsembleConfig::default().with_weights(Some(vec![0.7, 0.7])),
    ));
    assert!(e.contains("sum to 1.4"), "{e}");
    let e = err(Ensemble::new(
        members(),
        EnsembleConfig::default().with_weights(Some(vec![1.0])),
    ));
    assert!(e.contains("1 weights for 2 members"), "{e}");
    let e = err(Ensemble::new(
        members(),
        EnsembleConfig::default().with_weights(Some(vec![f32::NAN, 1.0])),
    ));
    assert!(e.contains("finite"), "{e}");
    let e = err(Ensemble::new(
        members(),
        EnsembleConfig::default()
            .with_relative(RelativeConfig::default().with_top_k(Some(100_000))),
    ));
    assert!(e.contains("top_k"), "{e}");
    let mut ensemble = Ensemble::new(members(), EnsembleConfig::default()).unwrap();
    let e = ensemble
        .generate(&["a", "b", "c"], &greedy(2))
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 prompts for 2 members"), "{e}");
}

#[test]
fn members_with_no_shared_tokens_are_refused() {
    // Two word-level tokenizers with disjoint vocabularies.
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, words: [&str; 2]| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": {words[0]: 0, words[1]: 1, "[UNK]": 2}, "unk_token": "[UNK]"}
        });
        std::fs::write(d.join("tokenizer.json"), json.to_string()).unwrap();
        Tokenizer::from_dir(&d).unwrap()
    };
    let a = Vocab::from_tokenizer(&write("a", ["cat", "dog"]), 3);
    let b = Vocab::from_tokenizer(&write("b", ["sun", "moon"]), 3);
    let names = ["first".to_string(), "second".to_string()];
    // `[UNK]` is the one shared string; with it gone there is nothing.
    let e = find_anchors(
        &[&a, &b],
        &names,
        &AnchorConfig::default().with_max_anchors(Some(1)),
    )
    .unwrap();
    assert_eq!(e.keys, vec![b"[UNK]".to_vec()]);
    let c = Vocab::from_tokenizer(&write("c", ["sun", "moon"]), 2);
    let a2 = Vocab::from_tokenizer(&write("d", ["cat", "dog"]), 2);
    let e = find_anchors(&[&a2, &c], &names, &AnchorConfig::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("first and second share no token"), "{e}");
}

/// A member whose EOS becomes its argmax, by a hair, once it has generated `at` tokens.
struct EosAt {
    inner: Box<dyn Member<B>>,
    at: usize,
}

impl EosAt {
    fn edit(&self, logits: burn::tensor::Tensor<B, 1>) -> burn::tensor::Tensor<B, 1> {
        if self.inner.generated().len() != self.at {
            return logits;
        }
        let mut host: Vec<f32> = logits.to_data().convert::<f32>().into_vec().unwrap();
        let max = host.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        host[self.inner.eos_token_ids()[0] as usize] = max + 1e-3;
        burn::tensor::Tensor::from_floats(host.as_slice(), &logits.device())
    }
}

impl Member<B> for EosAt {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn tokenizer(&self) -> &Tokenizer {
        self.inner.tokenizer()
    }
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    fn embeddings(&self) -> burn::tensor::Tensor<B, 2> {
        self.inner.embeddings()
    }
    fn device(&self) -> burn::tensor::Device<B> {
        self.inner.device()
    }
    fn eos_token_ids(&self) -> Vec<u32> {
        self.inner.eos_token_ids()
    }
    fn max_context(&self) -> usize {
        self.inner.max_context()
    }
    fn start(&mut self, prompt: &str) -> kiln_ensemble::Result<burn::tensor::Tensor<B, 1>> {
        let l = self.inner.start(prompt)?;
        Ok(self.edit(l))
    }
    fn start_ids(&mut self, prompt: &[u32]) -> kiln_ensemble::Result<burn::tensor::Tensor<B, 1>> {
        let l = self.inner.start_ids(prompt)?;
        Ok(self.edit(l))
    }
    fn prompt_len(&self) -> usize {
        self.inner.prompt_len()
    }
    fn feed(&mut self, tokens: &[u32]) -> kiln_ensemble::Result<burn::tensor::Tensor<B, 1>> {
        let l = self.inner.feed(tokens)?;
        Ok(self.edit(l))
    }
    fn generated(&self) -> &[u32] {
        self.inner.generated()
    }
    fn rewind(&mut self, len: usize) -> kiln_ensemble::Result<burn::tensor::Tensor<B, 1>> {
        let l = self.inner.rewind(len)?;
        Ok(self.edit(l))
    }
    fn commit(&mut self, len: usize) {
        self.inner.commit(len)
    }
}

/// DeePEn's stopping rule, as the reference: a step where the main model's own argmax is its
/// EOS takes the main model's scores, so the ensemble stops there even when the other member
/// outweighs it; without the rule the searched scores decide and generation goes on.
#[test]
fn main_model_eos_ends_the_ensemble() {
    let at = 3;
    let run = |fallback: bool| {
        let members: Vec<Box<dyn Member<B>>> = vec![
            Box::new(EosAt {
                inner: llama("llama2-mha"),
                at,
            }),
            llama("llama3-gqa"),
        ];
        let config = EnsembleConfig::default()
            .with_weights(Some(vec![0.05, 0.95]))
            .with_main_eos_fallback(fallback);
        let mut ensemble = Ensemble::new(members, config).unwrap();
        ensemble.generate(&[PROMPT], &greedy(8)).unwrap()
    };
    let with = run(true);
    assert_eq!(with.finish, kiln_core::FinishReason::Eos, "{with:?}");
    assert_eq!(with.tokens.len(), at + 1, "{with:?}");
    let without = run(false);
    assert!(
        without.tokens.len() > at + 1,
        "the test needs the search to pick another token: {without:?}"
    );
}

/// Token ids in: the main model starts from the ids, the other members from their text, and
/// the result is that of the same prompt given as text.
#[test]
fn prompt_ids_equal_the_text_prompt() {
    let make = || {
        let members: Vec<Box<dyn Member<B>>> = vec![llama("llama2-mha"), llama("llama3-gqa")];
        Ensemble::new(members, EnsembleConfig::default()).unwrap()
    };
    let by_text = make().generate(&[PROMPT], &greedy(6)).unwrap();
    let mut ensemble = make();
    let ids = ensemble.members()[0]
        .tokenizer()
        .encode(PROMPT, true)
        .unwrap();
    let by_ids = ensemble.generate_from_ids(&ids, &greedy(6)).unwrap();
    assert_eq!(by_ids.tokens, by_text.tokens);
    assert_eq!(by_ids.text, by_text.text);
}

/// Multiple choice (the reference's MMLU/ARC/PIQA protocol): one token, the choice whose logit
/// is highest. A member alone picks what HF's logits for the same prompt pick among the choices
/// (llama3-gqa's reference.safetensors); DeePEn picks one of the choices; GaC refuses.
#[test]
fn choices_pick_the_highest_scoring_option() {
    let choices: Vec<String> = [" the", " a", " of", " and", " to", " in"]
        .map(String::from)
        .to_vec();
    let dir = fixture("llama3-gqa");
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor("prefill_logits").unwrap();
    let [seq, vocab] = [view.shape()[0], view.shape()[1]];
    let logits: Vec<f32> = view.data()[(seq - 1) * vocab * 4..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let ids: Vec<u32> = choices
        .iter()
        .map(|c| tokenizer.token_to_id(&c.replace(' ', "Ġ")).unwrap())
        .collect();
    let best = *ids
        .iter()
        .max_by(|a, b| logits[**a as usize].total_cmp(&logits[**b as usize]))
        .unwrap();
    // The unrestricted argmax is not among the choices, so the restriction is what decides.
    assert!(!ids.contains(&(kiln_core::sampling::argmax(&logits))));

    let prompt = "The robot walked into the library";
    let mut ensemble = Ensemble::new(
        vec![llama("llama3-gqa"), llama("llama2-mha")],
        EnsembleConfig::default(),
    )
    .unwrap();
    let alone = ensemble.choose_member(0, prompt, &choices).unwrap();
    assert_eq!(alone.tokens, vec![best]);
    let out = ensemble.choose(&[prompt], &choices).unwrap();
    assert_eq!(out.tokens.len(), 1);
    assert!(choices.contains(&out.text), "{:?}", out.text);

    let mut gac = Ensemble::new(
        vec![llama("llama3-gqa"), llama("llama2-mha")],
        EnsembleConfig::default().with_method(Method::Gac),
    )
    .unwrap();
    let err = gac.choose(&[prompt], &choices).unwrap_err();
    assert!(err.to_string().contains("choices"), "{err}");
    let err = ensemble
        .choose(&[prompt], &[" zzqx".to_string()])
        .unwrap_err();
    assert!(err.to_string().contains("zzqx"), "{err}");
}

/// `generate_streaming`: a model ensembled with itself streams, piece by piece, HF's greedy
/// continuation (llama3-gqa's reference ids, decoded); a stop string is never streamed; `Break`
/// ends it after the piece it saw.
#[test]
fn streaming_matches_the_single_model_stream() {
    use std::ops::ControlFlow;
    let dir = fixture("llama3-gqa");
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let hf: Vec<u32> = st.tensor("greedy_ids").unwrap().data()[..12 * 8]
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    let prompt = "The robot walked into the library";
    let alone = tokenizer.decode(&hf, true).unwrap();
    assert!(!alone.is_empty());

    let mut ensemble = Ensemble::new(
        vec![llama("llama3-gqa"), llama("llama3-gqa")],
        EnsembleConfig::default(),
    )
    .unwrap();
    let (mut pieces, mut ids) = (Vec::new(), Vec::new());
    let out = ensemble
        .generate_streaming(&[prompt], &greedy(12), |e| {
            pieces.push(e.text.to_string());
            ids.extend(e.id);
        })
        .unwrap();
    assert!(
        pieces.iter().filter(|p| !p.is_empty()).count() > 1,
        "{pieces:?}"
    );
    assert_eq!(pieces.concat(), out.text);
    assert_eq!(out.text, alone);
    assert_eq!(out.tokens, hf);
    assert_eq!(ids, hf);

    // A stop string taken from the middle of the text: the stream ends before it.
    let stop: String = alone
        .chars()
        .skip(alone.chars().count() / 2)
        .take(3)
        .collect();
    let mut streamed = String::new();
    let out = ensemble
        .generate_streaming(
            &[prompt],
            &greedy(12).with_stop_strings(vec![stop.clone()]),
            |e| streamed.push_str(e.text),
        )
        .unwrap();
    assert_eq!(out.finish, FinishReason::Stop);
    assert_eq!(streamed, out.text);
    assert!(alone.starts_with(&streamed) && !streamed.contains(&stop));

    let mut seen = 0;
    let out = ensemble
        .generate_streaming(&[prompt], &greedy(12), |_| {
            seen += 1;
            if seen == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(seen, 2);
    assert_eq!(out.finish, FinishReason::Cancelled);
    assert!(out.tokens.len() < 12);
}
