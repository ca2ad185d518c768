//! Text in, text out as transformers does it: chat templates (`text/chat_templates.rs`) and
//! tokenizers (`text/tokenizer_parity.rs`), in one test binary to keep link time down.

mod common;

mod text {
    mod chat_templates;
    mod tokenizer_parity;
}
