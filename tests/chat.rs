//! `ChatSession` (multi-turn chat that keeps the KV cache between turns) on the tiny Llama
//! fixture: every reply must equal a fresh `generate` on the rendered conversation, the cache must
//! be cut back to exactly the common prefix of what it held and the new prompt, and a
//! conversation longer than the context drops its oldest turns.

mod common;

use common::*;
use kiln::auto;
use kiln::core::{ChatSession, Error, GenerationConfig, Tokenizer, generate};

const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}\
{% if add_generation_prompt %}<assistant>{% endif %}";

fn setup() -> (auto::LoadedModel<B>, Tokenizer) {
    setup_fixture("llama2-mha")
}

fn setup_fixture(name: &str) -> (auto::LoadedModel<B>, Tokenizer) {
    let loaded = auto::load::<B>(fixture(name).to_str().unwrap(), &device()).unwrap();
    let tokenizer = loaded
        .tokenizer
        .clone()
        .unwrap()
        .with_chat_template(Some(TEMPLATE.into()));
    (loaded, tokenizer)
}

#[test]
fn replies_equal_fresh_generation_and_reuse_the_cache() {
    let (loaded, tokenizer) = setup();
    // No EOS: every reply is exactly `max_new_tokens` long, so the test does not depend on when
    // the random model happens to stop.
    let config = GenerationConfig::default().with_max_new_tokens(5);
    let mut session = ChatSession::new(
        &loaded.model,
        &tokenizer,
        config.clone(),
        Some("be brief".into()),
    )
    .unwrap();
    let mut held: Vec<u32> = Vec::new();
    for (turn, user) in ["hello there", "and again", "one more"]
        .into_iter()
        .enumerate()
    {
        let prompt_before = {
            let mut probe = session.messages().to_vec();
            probe.push(kiln::core::Message::new("user", user));
            let mut all = vec![kiln::core::Message::new("system", "be brief")];
            all.extend(probe);
            let text = tokenizer.apply_chat_template(&all, true).unwrap();
            tokenizer.encode(&text, false).unwrap()
        };
        let mut streamed = String::new();
        let out = session
            .reply(user, |piece| streamed.push_str(piece))
            .unwrap();
        let fresh = generate(
            &loaded.model,
            std::slice::from_ref(&prompt_before),
            &config,
            Some(&tokenizer),
            |_, _| {},
        )
        .unwrap();
        assert_eq!(out.tokens, fresh[0].tokens, "turn {turn}");
        assert_eq!(out.text, fresh[0].text, "turn {turn}");
        assert_eq!(Some(streamed), out.text, "turn {turn}");
        // The cache is cut back to the common prefix (no sliding window here, so it can be).
        let common = held
            .iter()
            .zip(&prompt_before)
            .take_while(|(a, b)| a == b)
            .count();
        assert_eq!(session.last_reused(), common, "turn {turn}");
        if turn > 0 {
            assert!(
                common > 0,
                "turn {turn}: the previous prompt was not reused"
            );
        }
        // The cache now holds the prompt and every reply token but the last (never fed back).
        held = prompt_before.clone();
        held.extend(&out.tokens[..out.tokens.len() - 1]);
    }
    assert_eq!(session.messages().len(), 6);
    session.reset();
    assert!(session.messages().is_empty());
}

#[test]
fn sliding_window_cache_is_rebuilt_when_it_cannot_be_cut_back() {
    // Mistral fixture, window 6: after the first turn the cache has dropped old keys, so a
    // prompt that departs from it cannot reuse it; the replies must still be exact.
    let (loaded, tokenizer) = setup_fixture("mistral-sw");
    let config = GenerationConfig::default().with_max_new_tokens(4);
    let mut session = ChatSession::new(&loaded.model, &tokenizer, config.clone(), None).unwrap();
    for user in ["hello there", "and again"] {
        let mut probe = session.messages().to_vec();
        probe.push(kiln::core::Message::new("user", user));
        let text = tokenizer.apply_chat_template(&probe, true).unwrap();
        let prompt = tokenizer.encode(&text, false).unwrap();
        let out = session.reply(user, |_| {}).unwrap();
        let fresh = generate(&loaded.model, &[prompt], &config, None, |_, _| {}).unwrap();
        assert_eq!(out.tokens, fresh[0].tokens);
    }
}

#[test]
fn long_conversations_drop_old_turns_and_one_huge_message_is_an_error() {
    let (loaded, tokenizer) = setup();
    let config = GenerationConfig::default().with_max_new_tokens(4);
    let mut session = ChatSession::new(&loaded.model, &tokenizer, config, None).unwrap();
    // The fixture's context is 128 tokens; each message here is a few dozen.
    let long = "the cat sat on the mat and looked at the dog ".repeat(3);
    for _ in 0..6 {
        session.reply(&long, |_| {}).unwrap();
        assert!(session.render().unwrap().len() < 128 + 4);
    }
    assert!(session.messages().len() < 12, "old turns were not dropped");
    let kept = session.messages().to_vec();
    let huge = "word ".repeat(400);
    let err = session.reply(&huge, |_| {}).unwrap_err();
    assert!(matches!(err, Error::ContextOverflow { .. }), "{err}");
    assert_eq!(
        session.messages(),
        kept.as_slice(),
        "a failed turn changed the history"
    );
}

#[test]
fn a_model_without_a_chat_template_is_an_error() {
    let (loaded, _) = setup();
    let plain = loaded.tokenizer.clone().unwrap().with_chat_template(None);
    let err = ChatSession::new(&loaded.model, &plain, GenerationConfig::default(), None)
        .err()
        .expect("no template");
    assert!(err.to_string().contains("chat template"), "{err}");
}
