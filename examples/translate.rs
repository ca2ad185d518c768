//! Translate with NLLB-200 (beam search), or run T5 / FLAN-T5 text-to-text.
//!
//! ```sh
//! cargo run --release --example translate -- facebook/nllb-200-distilled-600M "The kiln is hot."
//! cargo run --release --example translate -- google-t5/t5-small "translate English to German: The house is wonderful."
//! cargo run --release --example translate -- tests/fixtures/nllb-tiny "The little robot."   # offline, random weights
//! ```
//!
//! Arguments: the model (folder or hub id) and the text. NLLB translates English (`eng_Latn`)
//! to French (`fra_Latn`) with 4 beams; a T5 model gets the text as its encoder input.

use kiln::auto::Seq2SeqModel;
use kiln::backend::{Backend, device};
use kiln::core::GenerationConfig;
use kiln::core::seq2seq::generate_seq2seq;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .unwrap_or_else(|| "facebook/nllb-200-distilled-600M".into());
    let text = args.next().unwrap_or_else(|| "The kiln is hot.".into());

    eprintln!("[{model} on {}]", kiln::backend::NAME);
    let loaded = kiln::auto::load_seq2seq::<Backend>(&model, &device())?;
    let tokenizer = loaded
        .tokenizer
        .as_ref()
        .ok_or("the model has no tokenizer")?;
    let config = GenerationConfig::default()
        .with_num_beams(4)
        .with_max_new_tokens(64);

    let output = match &loaded.model {
        Seq2SeqModel::M2M100(nllb) => {
            kiln::m2m100::translate(nllb, tokenizer, &[&text], "eng_Latn", "fra_Latn", &config)?
                .remove(0)
        }
        Seq2SeqModel::T5(t5) => {
            let ids = tokenizer.encode(&text, true)?;
            let out = generate_seq2seq(t5, &[ids], &config)?;
            // T5 pads its vocabulary past the tokenizer's (32128 rows, 32100 pieces).
            let ids: Vec<u32> = out[0]
                .tokens
                .iter()
                .copied()
                .filter(|&t| (t as usize) < tokenizer.vocab_size())
                .collect();
            tokenizer.decode(&ids, true)?
        }
    };
    println!("{text}\n{output}");
    Ok(())
}
