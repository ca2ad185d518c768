//! The OpenAI API's request and response bodies, as far as kiln serves them, and its error
//! body. Unknown fields are ignored (clients send many); known fields of the wrong type, and
//! features kiln does not have, are a 400 naming the field.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// An error as the OpenAI API sends it: a status and `{"error": {message, type, param, code}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong, for the client.
    pub message: String,
    /// OpenAI's error type (`invalid_request_error`, ...).
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<String>,
    /// A machine-readable code (`context_length_exceeded`, ...).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
        }
    }

    /// A 400 for a feature kiln does not have.
    pub fn unsupported(param: &str, what: &str) -> Self {
        Self::invalid(param, format!("{what} is not supported by kiln serve"))
    }

    /// Sets the code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        let mut response = (status, axum::Json(self.body())).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        response
    }
}

/// Parses a JSON body: the endpoint's own fields as `T` and the shared [`Sampling`] fields,
/// each naming the field at fault on a type error.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<(T, Sampling), ApiError> {
    let value = json_object(body)?;
    Ok((from_value(&value)?, from_value(&value)?))
}

/// Parses a JSON object body into `T` alone (an endpoint without the sampling fields).
pub fn parse_one<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    from_value(&json_object(body)?)
}

fn json_object(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("the body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::invalid("body", "the body is not a JSON object"));
    }
    Ok(value)
}

fn from_value<T: DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::invalid("body", inner.to_string())
        } else {
            ApiError::invalid(path.clone(), format!("`{path}`: {inner}"))
        }
    })
}

/// A string or a list of strings (`stop`, `prompt`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The strings.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the token counts.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The sampling and stopping fields `/v1/chat/completions` and `/v1/completions` share (read
/// from the same body as the endpoint's own fields).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    /// Most tokens to generate; default: up to the model's context.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// The newer name of `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    /// 0 is greedy; default: the model's generation_config.json.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Top-k (llama.cpp's and vLLM's extension).
    #[serde(default)]
    pub top_k: Option<i64>,
    /// HF's repetition penalty (vLLM's extension).
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    /// OpenAI's frequency penalty, -2..2.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// OpenAI's presence penalty, -2..2.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Seed of the sampler; without one, each request draws its own.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop strings (not included in the output).
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    /// Server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// `include_usage`.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Only 1 is supported.
    #[serde(default)]
    pub n: Option<u64>,
    /// Not supported when true / non-zero.
    #[serde(default)]
    pub logprobs: Option<Value>,
    /// Not supported when non-empty.
    #[serde(default)]
    pub logit_bias: Option<serde_json::Map<String, Value>>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Not supported when non-empty.
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// Only `{"type": "text"}`.
    #[serde(default)]
    pub response_format: Option<Value>,
}

/// One message.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// A string, or a list of `{"type": "text", "text": ...}` parts.
    #[serde(default)]
    pub content: Option<Content>,
}

/// Message content.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Parts.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// Only `text`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    #[serde(default)]
    pub text: Option<String>,
}

impl ChatMessage {
    /// The message as the chat template reads it, text parts joined.
    pub fn to_template_json(&self, index: usize) -> Result<Value, ApiError> {
        let content = match &self.content {
            None => String::new(),
            Some(Content::Text(s)) => s.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (i, part) in parts.iter().enumerate() {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::unsupported(
                                &format!("messages[{index}].content[{i}]"),
                                &format!("a content part of type `{kind}` (text only)"),
                            ));
                        }
                    }
                }
                text
            }
        };
        Ok(json!({"role": self.role, "content": content}))
    }
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The prompt: one string (a list of one string is accepted).
    pub prompt: OneOrMany,
    /// Not supported when true.
    #[serde(default)]
    pub echo: Option<bool>,
    /// Not supported.
    #[serde(default)]
    pub suffix: Option<String>,
    /// Only 1.
    #[serde(default)]
    pub best_of: Option<u64>,
}

/// `usage`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

impl Usage {
    /// Counts.
    pub fn new(prompt: usize, completion: usize) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}
