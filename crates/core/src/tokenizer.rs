//! A thin wrapper over HF `tokenizers`: errors as [`Error`], the model's special tokens from
//! `tokenizer_config.json`, streaming decoding, and chat templates.

use std::path::Path;

use serde::Serialize;

use crate::loading::read_json_value;
use crate::{Error, Result};

/// One chat message.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A tokenizer with the special tokens and chat template of its model.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`, and `tokenizer_config.json` beside it when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::MissingFile {
                path,
                hint: " (kiln needs the HF `tokenizers` JSON file)".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let mut tokenizer = Self::new(inner);
        let config = dir.join("tokenizer_config.json");
        if config.is_file() {
            let value = read_json_value(&config)?;
            tokenizer.chat_template = chat_template_of(&value);
            tokenizer.bos_token = token_string(value.get("bos_token"));
            tokenizer.eos_token = token_string(value.get("eos_token"));
        }
        Ok(tokenizer)
    }

    /// Wraps an HF tokenizer with no chat template.
    pub fn new(inner: tokenizers::Tokenizer) -> Self {
        Self {
            inner,
            chat_template: None,
            bos_token: None,
            eos_token: None,
        }
    }

    /// Sets the chat template (Jinja).
    pub fn with_chat_template(mut self, template: Option<String>) -> Self {
        self.chat_template = template;
        self
    }

    /// Sets the BOS/EOS token strings the chat template may use.
    pub fn with_special_tokens(mut self, bos: Option<String>, eos: Option<String>) -> Self {
        self.bos_token = bos;
        self.eos_token = eos;
        self
    }

    /// The wrapped HF tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`; `add_special` adds BOS etc. as the tokenizer's post-processor says.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special)
            .map_err(|e| Error::Tokenizer(format!("encoding failed: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let vocab = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::arg(
                "token id",
                format!("{bad} is outside the vocabulary of {vocab} tokens"),
            ));
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(format!("decoding failed: {e}")))
    }

    /// Id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// String of a token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The EOS token string from tokenizer_config.json.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Renders `messages` with the model's chat template (as HF `apply_chat_template`).
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::ChatTemplate("this model's tokenizer_config.json has no `chat_template`".into())
        })?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| Error::ChatTemplate(e.to_string()))?;
        let rendered = env
            .get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => self.bos_token.clone().unwrap_or_default(),
                    eos_token => self.eos_token.clone().unwrap_or_default(),
                })
            })
            .map_err(|e| Error::ChatTemplate(e.to_string()))?;
        Ok(rendered)
    }
}

/// `chat_template` is a string, or a list of `{name, template}` where `default` is the one.
fn chat_template_of(config: &serde_json::Value) -> Option<String> {
    match config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// A special token in tokenizer_config.json: a string, or an AddedToken object `{content: ...}`.
fn token_string(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// Turns a stream of token ids into text as it is produced.
///
/// Decoding token by token breaks multi-byte characters split over tokens (byte-level BPE,
/// byte fallback) and loses SentencePiece's leading spaces, so the text of all tokens since
/// the last emitted boundary is decoded and only its new, complete suffix is emitted.
#[derive(Debug, Clone)]
pub struct TokenStream {
    tokens: Vec<u32>,
    prefix_start: usize,
    emitted_start: usize,
}

impl Default for TokenStream {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenStream {
    /// An empty stream.
    pub fn new() -> Self {
        Self {
            tokens: Vec::new(),
            prefix_start: 0,
            emitted_start: 0,
        }
    }

    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> Result<Option<String>> {
        let prefix = tokenizer.decode(&self.tokens[self.prefix_start..self.emitted_start], true)?;
        self.tokens.push(token);
        let text = tokenizer.decode(&self.tokens[self.prefix_start..], true)?;
        if text.len() > prefix.len()
            && !text.ends_with('\u{FFFD}')
            && text.is_char_boundary(prefix.len())
        {
            let new = text[prefix.len()..].to_string();
            self.prefix_start = self.emitted_start;
            self.emitted_start = self.tokens.len();
            Ok(Some(new))
        } else {
            Ok(None)
        }
    }

    /// Whatever is left undecoded at the end (e.g. an incomplete character).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        let prefix = tokenizer.decode(&self.tokens[self.prefix_start..self.emitted_start], true)?;
        let text = tokenizer.decode(&self.tokens[self.prefix_start..], true)?;
        self.prefix_start = self.tokens.len();
        self.emitted_start = self.tokens.len();
        Ok(text
            .get(prefix.len()..)
            .filter(|s| !s.is_empty())
            .map(str::to_string))
    }
}
