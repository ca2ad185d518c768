//! A multi-turn chat through the model's own chat template, with the KV cache kept between
//! turns.
//!
//! ```sh
//! bash tools/fetch_smollm2.sh
//! cargo run --release --example chat
//! cargo run --release --example chat -- ./Mistral-7B-Instruct-v0.2
//! ```
//!
//! The argument is the model (default: SmolLM2-135M-Instruct); it needs a chat template
//! (tokenizer_config.json, chat_template.jinja or the GGUF's). Each turn prints the reply and
//! how many prompt tokens came from the cache.

use std::io::Write;

use kiln::backend::{Backend, device};
use kiln::core::ChatSession;
use kiln::core::loading::SamplingOverrides;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model = std::env::args()
        .nth(1)
        .unwrap_or_else(kiln::auto::default_model);
    let loaded = kiln::auto::load::<Backend>(&model, &device())?;
    let tokenizer = loaded
        .tokenizer
        .as_ref()
        .ok_or("the model has no tokenizer")?;

    // The template's end-of-turn token ends a reply too (ChatML's <|im_end|>, ...).
    let config = loaded
        .defaults
        .generation_config(&SamplingOverrides::default())
        .with_max_new_tokens(64)
        .with_eos_token_ids(loaded.defaults.chat_eos_token_ids(tokenizer));
    let system = Some("You are a concise assistant.".to_string());
    let mut session = ChatSession::new(&loaded.model, tokenizer, config, system)?;

    for question in [
        "What is the capital of France?",
        "And what is the capital of Italy?",
    ] {
        println!("> {question}");
        session.reply(question, |piece| {
            print!("{piece}");
            let _ = std::io::stdout().flush();
        })?;
        println!(
            "\n[{} prompt tokens reused from the cache]",
            session.last_reused()
        );
    }
    Ok(())
}
