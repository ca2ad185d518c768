//! A thin wrapper over HF `tokenizers`: errors as [`Error`], the model's special tokens from
//! `tokenizer_config.json`, streaming decoding, and chat templates.

use std::path::Path;
use std::str::FromStr;

use serde::Serialize;

use crate::chat_template::{ChatTemplate, ChatTemplateInputs, RenderedChat, TemplateLimits};
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
    chat_template: Option<ChatTemplate>,
    /// `bos_token`, `eos_token`, ... from tokenizer_config.json, passed to the chat template.
    special_tokens: Vec<(String, String)>,
    /// `inner.get_vocab_size(true)`, which builds the whole vocabulary map on every call: read
    /// once, since decoding checks ids against it for every streamed token.
    vocab_size: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special_tokens", &self.special_tokens)
            .field(
                "chat_template",
                &self.chat_template.as_ref().map(ChatTemplate::origin),
            )
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`, and `tokenizer_config.json` beside it when present. The chat
    /// template is, as in HF, `chat_template.jinja` when the folder has it, else
    /// tokenizer_config.json's `chat_template` (a string, or a list whose `default` entry is
    /// used).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::MissingFile {
                path,
                hint: " (kiln needs the HF `tokenizers` JSON file)".into(),
            });
        }
        let config = dir.join("tokenizer_config.json");
        let config_value = if config.is_file() {
            Some(read_json_value(&config)?)
        } else {
            None
        };
        let rebuild = config_value
            .as_ref()
            .filter(|c| crate::tokenizer_class::rebuilds(c));
        let json = match rebuild {
            Some(c) => {
                let mut json = read_json_value(&path)?;
                crate::tokenizer_class::apply(&mut json, c);
                Some(json.to_string())
            }
            None => None,
        };
        // The `tokenizers` crate panics on some malformed files (e.g. BPE merges that do not
        // split into two pieces); a panic while parsing is an error naming the file.
        let inner = guard(&path.display().to_string(), || {
            match &json {
                Some(text) => tokenizers::Tokenizer::from_str(text),
                None => tokenizers::Tokenizer::from_file(&path),
            }
            .map_err(|e| e.to_string())
        })?;
        // The `tokenizers` crate trusts its file: e.g. a post-processor template naming a
        // special token the file does not define panics at the first encode. Probe once here
        // so such a file is an error naming it, not a crash later.
        guard(&format!("{}: unusable", path.display()), || {
            inner
                .encode("a <s> 1", true)
                .map(|e| inner.decode(e.get_ids(), false))
                .map(|_| ())
                .map_err(|e| e.to_string())
        })?;
        let mut tokenizer = Self::new(inner);
        if let Some(value) = config_value {
            tokenizer.chat_template = chat_template_of(&value)
                .map(|t| ChatTemplate::new(t, config.display().to_string()));
            tokenizer.special_tokens = SPECIAL_TOKEN_KEYS
                .iter()
                .filter_map(|k| token_string(value.get(*k)).map(|t| (k.to_string(), t)))
                .collect();
        }
        let file = dir.join("chat_template.jinja");
        if file.is_file() {
            let source = std::fs::read_to_string(&file).map_err(|e| Error::Io {
                path: file.clone(),
                source: e,
            })?;
            tokenizer.chat_template = Some(ChatTemplate::new(source, file.display().to_string()));
        }
        Ok(tokenizer)
    }

    /// Wraps an HF tokenizer with no chat template.
    pub fn new(inner: tokenizers::Tokenizer) -> Self {
        Self {
            vocab_size: inner.get_vocab_size(true),
            inner,
            chat_template: None,
            special_tokens: Vec::new(),
        }
    }

    /// Sets the chat template (Jinja source given by the caller).
    pub fn with_chat_template(self, template: Option<String>) -> Self {
        self.with_template(template.map(|t| ChatTemplate::new(t, "the chat template set in code")))
    }

    /// Sets the chat template with its origin and limits.
    pub fn with_template(mut self, template: Option<ChatTemplate>) -> Self {
        let limits = self.template_limits();
        self.chat_template = template.map(|t| {
            if t.limits() == TemplateLimits::default() {
                t.with_limits(limits)
            } else {
                t
            }
        });
        self
    }

    /// Sets the bounds on chat template rendering (instructions, prompt size).
    pub fn with_template_limits(mut self, limits: TemplateLimits) -> Self {
        self.chat_template = self.chat_template.map(|t| t.with_limits(limits));
        self
    }

    fn template_limits(&self) -> TemplateLimits {
        self.chat_template
            .as_ref()
            .map_or_else(TemplateLimits::default, ChatTemplate::limits)
    }

    /// Sets the BOS/EOS token strings the chat template may use.
    pub fn with_special_tokens(mut self, bos: Option<String>, eos: Option<String>) -> Self {
        self.special_tokens
            .retain(|(k, _)| k != "bos_token" && k != "eos_token");
        for (key, value) in [("bos_token", bos), ("eos_token", eos)] {
            if let Some(v) = value {
                self.special_tokens.push((key.to_string(), v));
            }
        }
        self
    }

    fn special_token(&self, key: &str) -> Option<&str> {
        self.special_tokens
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The wrapped HF tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Token ids of `text`; `add_special` adds BOS etc. as the tokenizer's post-processor says.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        guard("encoding failed", || {
            self.inner
                .encode(text, add_special)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| e.to_string())
        })
    }

    /// [`Self::encode`] with each token's byte range in `text` (for placing markers between
    /// tokens without re-encoding pieces of the text).
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special: bool,
    ) -> Result<Vec<(u32, std::ops::Range<usize>)>> {
        guard("encoding failed", || {
            self.inner
                .encode(text, add_special)
                .map(|e| {
                    let spans = e.get_offsets().iter().map(|&(start, end)| start..end);
                    e.get_ids().iter().copied().zip(spans).collect()
                })
                .map_err(|e| e.to_string())
        })
    }

    /// Text of `ids`. Ids the tokenizer has no token for (a model's vocabulary padded past the
    /// tokenizer's, as T5's 32128 rows for 32100 tokens) give no text, as in HF's fast
    /// tokenizers: a model may generate them.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let vocab = self.vocab_size();
        let known: std::borrow::Cow<[u32]> = if ids.iter().any(|&id| id as usize >= vocab) {
            ids.iter()
                .copied()
                .filter(|&id| (id as usize) < vocab)
                .collect()
        } else {
            ids.into()
        };
        guard("decoding failed", || {
            self.inner
                .decode(&known, skip_special)
                .map_err(|e| e.to_string())
        })
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
        self.special_token("eos_token")
    }

    /// The BOS token string from tokenizer_config.json.
    pub fn bos_token(&self) -> Option<&str> {
        self.special_token("bos_token")
    }

    /// The chat template's Jinja source, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_ref().map(ChatTemplate::source)
    }

    /// The chat template with its origin and limits, if the model has one.
    pub fn template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Renders `messages` with the model's chat template, as HF `apply_chat_template(messages,
    /// add_generation_prompt=..., tokenize=False)`.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let inputs =
            ChatTemplateInputs::new(messages).with_generation_prompt(add_generation_prompt);
        Ok(self.render_chat(&inputs)?.text)
    }

    /// Renders any [`ChatTemplateInputs`] (tools, documents, extra variables) with the model's
    /// chat template and its special tokens.
    pub fn render_chat(&self, inputs: &ChatTemplateInputs) -> Result<RenderedChat> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            Error::ChatTemplate(
                "this model has no chat template (tokenizer_config.json `chat_template`, \
                 chat_template.jinja or GGUF `tokenizer.chat_template`)"
                    .into(),
            )
        })?;
        let special: Vec<(&str, &str)> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        template.render(inputs, &special)
    }
}

/// Runs a call into the `tokenizers` crate, turning its error or panic into
/// [`Error::Tokenizer`] prefixed by `what`.
fn guard<T>(what: &str, f: impl FnOnce() -> std::result::Result<T, String>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::Tokenizer(format!("{what}: {e}"))),
        Err(panic) => Err(Error::Tokenizer(format!(
            "{what}: the tokenizers crate failed on it ({})",
            crate::panic_message(panic.as_ref())
        ))),
    }
}

/// Special tokens HF passes to chat templates (`special_tokens_map`).
const SPECIAL_TOKEN_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

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

#[cfg(test)]
mod tests {
    use super::*;

    /// HF's fast tokenizer drops ids it has no token for; recorded with `tokenizers` 0.22:
    /// `decode([490, 433, 281, 220, 84, 485, 502, 490, ...])` on this fixture (vocabulary 496,
    /// model rows 512) gives 'Once uponOnce upon'.
    #[test]
    fn ids_past_the_tokenizer_give_no_text_as_in_hf() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/llama-tied");
        let tokenizer = Tokenizer::from_dir(&dir).unwrap();
        let ids = [490, 433, 281, 220, 84, 485];
        assert_eq!(tokenizer.encode("Once upon", true).unwrap(), ids);
        let mut padded = ids.to_vec();
        padded.push(502);
        padded.extend(ids);
        assert_eq!(
            tokenizer.decode(&padded, false).unwrap(),
            "<|begin_of_text|>Once upon<|begin_of_text|>Once upon"
        );
        assert_eq!(
            tokenizer.decode(&padded, true).unwrap(),
            "Once uponOnce upon"
        );
    }
}
