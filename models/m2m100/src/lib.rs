//! # kiln-m2m100
//!
//! HF `M2M100ForConditionalGeneration` for Burn, as used by NLLB-200: scaled embeddings,
//! sinusoidal positions offset past the padding id, pre-LayerNorm encoder and decoder with
//! final norms, tied LM head. Implements [`kiln_core::seq2seq::Seq2SeqLm`] (greedy, sampling and
//! beam search from kiln-core) and NLLB's language-code handling in [`translate`].
//!
//! ```no_run
//! # fn main() -> kiln_core::Result<()> {
//! use burn::backend::NdArray;
//! use kiln_core::Tokenizer;
//! use kiln_core::GenerationConfig;
//! use kiln_m2m100::{M2M100, translate};
//!
//! let dir = std::path::Path::new("nllb-200-distilled-600M");
//! let model = M2M100::<NdArray>::from_pretrained(dir, &Default::default())?;
//! let tokenizer = Tokenizer::from_dir(dir)?;
//! let options = GenerationConfig::default().with_num_beams(4).with_max_new_tokens(64);
//! let out = translate(&model, &tokenizer, &["Hello, world!"], "eng_Latn", "deu_Latn", &options)?;
//! println!("{}", out[0]);
//! # Ok(()) }
//! ```

mod config;
mod model;
mod nllb;

pub use config::{M2M100Activation, M2M100Config};
pub use model::{
    DecoderLayer, EncoderLayer, M2M100, M2M100Attention, M2M100Decoder, M2M100Encoder, M2M100Model,
    position_ids, sinusoidal_positions,
};
pub use nllb::{encode_source, is_language_code, language_codes, language_token_id, translate};
