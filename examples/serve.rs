//! Serve a model over the OpenAI API from your own program: load it, then hand it to
//! `kiln_serve::serve` (what `kiln serve` does, minus the flags).
//!
//! ```sh
//! bash tools/fetch_smollm2.sh                      # or any Llama/Mistral/Yi folder, GGUF or hub id
//! cargo run --release --example serve              # listens on 127.0.0.1:8080 until Ctrl-C
//! curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \
//!   -d '{"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32}'
//! ```
//!
//! The first argument is the model (default: SmolLM2-135M-Instruct), the second the port.
//! Requests that arrive together decode as one batch; see the README's "Serving".

use kiln::backend::{Backend, device};
use kiln::serve::{ServeConfig, serve};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(kiln::auto::default_model);
    let port = args.next().map_or(Ok(8080), |p| p.parse())?;

    let loaded = kiln::auto::load::<Backend>(&model, &device())?;
    let tokenizer = loaded.tokenizer.ok_or("the model has no tokenizer")?;
    let config = ServeConfig::default()
        .with_port(port)
        .with_model_id("kiln-example")
        .with_max_concurrent(8);
    serve(loaded.model, tokenizer, loaded.defaults, config, |addr| {
        eprintln!("listening on http://{addr}/v1 (Ctrl-C stops)")
    })?;
    Ok(())
}
