//! Anchor-compressed generation (AnLLM, EP mode): the KV cache keeps only the `.` anchors and
//! the current sentence, and the program prints how much smaller it stays than a full cache.
//!
//! ```sh
//! bash tools/fetch_smollm2.sh
//! cargo run --release --example anchor
//! cargo run --release --example anchor -- ./TinyLlama-1.1B-Chat-v1.0
//! ```
//!
//! Any zoo decoder works, but a model not trained with anchors (`kiln anchor train`) loses
//! quality under the anchor mask; this shows the mechanics and the memory, not the accuracy.

use std::io::Write;

use kiln::anchor::{PositionMode, anchor_generate, ep_anchor_ids, kv_bytes};
use kiln::backend::{Backend, device};

const PROMPT: &str = "The kiln was built in 1820. It fired bricks for the new town. \
Every spring the river rose. The workers moved the clay to higher ground. Then they";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model = std::env::args()
        .nth(1)
        .unwrap_or_else(kiln::auto::default_model);
    let loaded = kiln::auto::load::<Backend>(&model, &device())?;
    let tokenizer = loaded
        .tokenizer
        .as_ref()
        .ok_or("the model has no tokenizer")?;
    let anchors = ep_anchor_ids(tokenizer, &["."])?;
    let prompt = tokenizer.encode(PROMPT, true)?;
    // Greedy, at most 40 tokens, stopping at the model's EOS (generation_config.json's).
    let config = loaded
        .defaults
        .generation_config(&Default::default())
        .with_max_new_tokens(40);

    print!("{PROMPT}");
    let out = anchor_generate(
        &loaded.model,
        &prompt,
        &anchors,
        PositionMode::Compacted,
        &config,
        Some(tokenizer),
        |event| {
            print!("{}", event.text);
            let _ = std::io::stdout().flush();
        },
    )?;
    let config = loaded.model.config();
    println!(
        "\n\n{} tokens seen; KV cache at the end: {} positions ({} bytes in f32), peak {}; \
         a full cache would hold {} positions ({} bytes)",
        out.seen,
        out.cache_len,
        kv_bytes(config, out.cache_len),
        out.peak_len,
        out.seen,
        kv_bytes(config, out.seen)
    );
    Ok(())
}
