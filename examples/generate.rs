//! Load a model and stream generated text: the shortest kiln program.
//!
//! ```sh
//! bash tools/fetch_smollm2.sh                      # or any Llama/Mistral/Yi folder, GGUF or hub id
//! cargo run --release --example generate -- "Once upon a time"
//! cargo run --release --example generate -- "Once upon a time" ./TinyLlama-1.1B-Chat-v1.0
//! cargo run --release --no-default-features --features wgpu --example generate -- "Hi"
//! ```
//!
//! The second argument is the model (default: SmolLM2-135M-Instruct). EOS, padding and
//! sampling come from the model's generation_config.json, as HF's `generate` uses them.

use std::io::Write;

use kiln::backend::{Backend, device};
use kiln::core::generate;
use kiln::core::loading::SamplingOverrides;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let prompt = args.next().unwrap_or_else(|| "Once upon a time".into());
    let model = args.next().unwrap_or_else(kiln::auto::default_model);

    eprintln!("[{model} on {}]", kiln::backend::NAME);
    let loaded = kiln::auto::load::<Backend>(&model, &device())?;
    let tokenizer = loaded
        .tokenizer
        .as_ref()
        .ok_or("the model has no tokenizer")?;
    let ids = tokenizer.encode(&prompt, true)?;
    let config = loaded
        .defaults
        .generation_config(&SamplingOverrides::default())
        .with_max_new_tokens(48);

    print!("{prompt}");
    let out = generate(
        &loaded.model,
        &[ids],
        &config,
        Some(tokenizer),
        |_, piece| {
            print!("{piece}");
            let _ = std::io::stdout().flush();
        },
    )?;
    println!("\n[{} tokens, {:?}]", out[0].tokens.len(), out[0].finish);
    Ok(())
}
