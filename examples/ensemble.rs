//! DeePEn: two decoder models with different vocabularies generate together, their
//! distributions averaged in the relative space of their shared tokens.
//!
//! ```sh
//! cargo run --release --example ensemble -- ./Llama-2-7b-chat ./Mistral-7B-Instruct "Question: ...\nAnswer:"
//! cargo run --release --example ensemble -- tests/fixtures/llama2-mha tests/fixtures/llama3-gqa   # offline, random weights
//! ```
//!
//! Arguments: the main model, the assistant (folders, GGUF files or hub ids) and the prompt.
//! The main model's tokens are the output; weights 0.5/0.5, the reference's search settings.

use kiln::backend::{Backend, device};
use kiln::core::GenerationConfig;
use kiln::ensemble::{Ensemble, EnsembleConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let main_model = args
        .next()
        .unwrap_or_else(|| "tests/fixtures/llama2-mha".into());
    let assist = args
        .next()
        .unwrap_or_else(|| "tests/fixtures/llama3-gqa".into());
    let prompt = args
        .next()
        .unwrap_or_else(|| "The capital of France is".into());

    let members = vec![
        kiln::auto::decoder_member::<Backend>(&main_model, &device())?,
        kiln::auto::decoder_member::<Backend>(&assist, &device())?,
    ];
    let mut ensemble = Ensemble::new(members, EnsembleConfig::default())?;
    if let Some(anchors) = ensemble.anchors() {
        println!("{} shared anchor tokens", anchors.len());
    }
    let out = ensemble.generate(
        &[&prompt],
        &GenerationConfig::default().with_max_new_tokens(24),
    )?;
    println!("{prompt}{}\n[{:?}]", out.text, out.finish);
    Ok(())
}
