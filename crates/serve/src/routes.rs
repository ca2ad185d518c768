//! The HTTP routes: requests become prompts and [`Job`]s, engine events become OpenAI
//! responses or server-sent event chunks.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kiln_core::batching::BatchEvent;
use kiln_core::loading::{GenerationDefaults, SamplingOverrides};
use kiln_core::{ChatTemplateInputs, FinishReason, GenerationConfig, Tokenizer};
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::ServeConfig;
use crate::api::{ApiError, ChatRequest, CompletionRequest, Sampling, Usage, parse, parse_one};
use crate::engine::{Admission, EngineHandle, Job, Slot};
use crate::translate::{Failure, TranslationRequest, TranslatorHandle};

/// What the server holds: a decoder behind the continuous batcher, or a translation model.
pub enum Served {
    /// Chat and completions.
    Decoder(Box<Decoder>),
    /// `/v1/translations`.
    Translator(TranslatorHandle),
}

impl Served {
    /// What ends the requests in flight when a shutdown's grace period is over: the decoder's
    /// running streams get their last chunk; a translation runs to its end.
    pub fn canceller(&self) -> Box<dyn Fn() + Send> {
        match self {
            Served::Decoder(d) => {
                let engine = d.engine.clone();
                Box::new(move || engine.cancel_all())
            }
            Served::Translator(_) => Box::new(|| {}),
        }
    }
}

/// A decoder model's engine and what its requests need.
pub struct Decoder {
    engine: EngineHandle,
    tokenizer: Tokenizer,
    defaults: GenerationDefaults,
    context: usize,
    /// The model's EOS ids (completions).
    eos: Vec<u32>,
    /// Those plus the chat template's end-of-turn token (chat).
    chat_eos: Vec<u32>,
}

impl Decoder {
    pub fn new(
        engine: EngineHandle,
        tokenizer: Tokenizer,
        defaults: GenerationDefaults,
        context: usize,
    ) -> Self {
        let eos = defaults.eos_token_id.to_vec();
        let chat_eos = defaults.chat_eos_token_ids(&tokenizer);
        Self {
            engine,
            tokenizer,
            defaults,
            context,
            eos,
            chat_eos,
        }
    }
}

/// What every handler reads.
pub struct AppState {
    served: Served,
    admission: Admission,
    model_id: String,
    api_key: Option<String>,
    created: u64,
    next_id: AtomicU64,
}

impl AppState {
    pub fn new(served: Served, config: &ServeConfig) -> Arc<Self> {
        Arc::new(Self {
            served,
            admission: Admission::new(config.max_concurrent.max(1) + config.queue),
            model_id: config.model_id.clone(),
            api_key: config.api_key.clone(),
            created: now(),
            next_id: AtomicU64::new(1),
        })
    }

    fn decoder(&self) -> Result<&Decoder, ApiError> {
        match &self.served {
            Served::Decoder(d) => Ok(d),
            Served::Translator(_) => Err(ApiError::invalid(
                "model",
                "this server holds an encoder-decoder model; use POST /v1/translations",
            )),
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/translations", post(translations))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such endpoint".into(),
                kind: "invalid_request_error",
                param: None,
                code: None,
            }
        })
        .with_state(state)
}

async fn authorize(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: "missing or wrong API key (Authorization: Bearer <key>)".into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("invalid_api_key"),
            }
            .into_response();
        }
    }
    next.run(request).await
}

async fn health(State(state): State<Arc<AppState>>) -> axum::Json<Value> {
    let (running, peak) = match &state.served {
        Served::Decoder(d) => {
            let stats = d.engine.stats();
            (
                stats.running.load(Ordering::Relaxed),
                stats.peak_running.load(Ordering::Relaxed),
            )
        }
        Served::Translator(_) => (0, 0),
    };
    axum::Json(json!({
        "status": "ok",
        "running": running,
        "admitted": state.admission.admitted(),
        "peak_running": peak,
    }))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn models(State(state): State<Arc<AppState>>) -> axum::Json<Value> {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_id,
            "object": "model",
            "created": state.created,
            "owned_by": "kiln",
        }],
    }))
}

/// Chat or plain completion: what differs in their responses.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (request, sampling): (ChatRequest, Sampling) = parse(&body)?;
    if request.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::unsupported("tools", "tool calling"));
    }
    if let Some(format) = &request.response_format
        && format.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(ApiError::unsupported(
            "response_format",
            "a response format other than text",
        ));
    }
    if request.messages.is_empty() {
        return Err(ApiError::invalid("messages", "needs at least one message"));
    }
    let messages = request
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| m.to_template_json(i))
        .collect::<Result<Vec<_>, _>>()?;
    let decoder = state.decoder()?;
    if decoder.tokenizer.template().is_none() {
        return Err(ApiError::invalid(
            "messages",
            "this model has no chat template; use /v1/completions",
        ));
    }
    let inputs = ChatTemplateInputs::from_json(messages).with_generation_prompt(true);
    let text = decoder
        .tokenizer
        .render_chat(&inputs)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?
        .text;
    // The template writes BOS itself when the model wants one.
    let prompt = decoder
        .tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let eos = decoder.chat_eos.clone();
    run(state, prompt, sampling, eos, Kind::Chat).await
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (request, sampling): (CompletionRequest, Sampling) = parse(&body)?;
    if request.echo == Some(true) {
        return Err(ApiError::unsupported("echo", "echo"));
    }
    if request.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported("suffix", "suffix"));
    }
    if request.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::unsupported("best_of", "best_of other than 1"));
    }
    let mut prompts = request.prompt.into_vec();
    if prompts.len() != 1 {
        return Err(ApiError::unsupported(
            "prompt",
            "more than one prompt per request",
        ));
    }
    let decoder = state.decoder()?;
    let prompt = decoder
        .tokenizer
        .encode(&prompts.remove(0), true)
        .map_err(|e| ApiError::invalid("prompt", e.to_string()))?;
    let eos = decoder.eos.clone();
    run(state, prompt, sampling, eos, Kind::Completion).await
}

/// The generation settings of a request, checked.
struct Plan {
    config: GenerationConfig,
    frequency_penalty: f32,
    presence_penalty: f32,
    stream: bool,
    include_usage: bool,
}

fn plan(
    state: &AppState,
    decoder: &Decoder,
    prompt_len: usize,
    s: Sampling,
    eos: Vec<u32>,
    kind: Kind,
) -> Result<Plan, ApiError> {
    if s.n.is_some_and(|n| n != 1) {
        return Err(ApiError::unsupported("n", "n other than 1"));
    }
    if s.logprobs
        .as_ref()
        .is_some_and(|l| !matches!(l, Value::Null | Value::Bool(false)))
    {
        return Err(ApiError::unsupported("logprobs", "logprobs"));
    }
    if s.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(ApiError::unsupported("logit_bias", "logit_bias"));
    }
    let range = |name: &str, v: Option<f32>, lo: f32, hi: f32| -> Result<(), ApiError> {
        match v {
            Some(x) if !(x >= lo && x <= hi) => Err(ApiError::invalid(
                name,
                format!("{x} is not in [{lo}, {hi}]"),
            )),
            _ => Ok(()),
        }
    };
    range("temperature", s.temperature, 0.0, 2.0)?;
    range("frequency_penalty", s.frequency_penalty, -2.0, 2.0)?;
    range("presence_penalty", s.presence_penalty, -2.0, 2.0)?;
    if let Some(p) = s.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(ApiError::invalid("top_p", format!("{p} is not in (0, 1]")));
    }
    if let Some(r) = s.repetition_penalty
        && !(r > 0.0 && r.is_finite())
    {
        return Err(ApiError::invalid(
            "repetition_penalty",
            format!("{r} is not > 0"),
        ));
    }
    if s.top_k.is_some_and(|k| k < -1) {
        return Err(ApiError::invalid(
            "top_k",
            "must be -1 (off), 0 (off) or more",
        ));
    }
    let stops = s.stop.map(|s| s.into_vec()).unwrap_or_default();
    if stops.len() > 16 || stops.iter().any(|s| s.is_empty() || s.len() > 1024) {
        return Err(ApiError::invalid(
            "stop",
            "at most 16 stop strings, each 1 to 1024 bytes",
        ));
    }
    let context = decoder.context;
    if prompt_len >= context {
        let param = match kind {
            Kind::Chat => "messages",
            Kind::Completion => "prompt",
        };
        return Err(ApiError::invalid(
            param,
            format!(
                "the prompt has {prompt_len} tokens; this model's context is {context} tokens, \
                 so no room is left to generate"
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let room = context - prompt_len;
    let max_tokens = match s.max_completion_tokens.or(s.max_tokens) {
        Some(0) => return Err(ApiError::invalid("max_tokens", "must be at least 1")),
        Some(n) if n > room as u64 => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "{n} tokens after a prompt of {prompt_len} exceed this model's context of \
                     {context} tokens (at most {room})"
                ),
            )
            .with_code("context_length_exceeded"));
        }
        Some(n) => n as usize,
        None => room,
    };
    let overrides = SamplingOverrides {
        temperature: s.temperature,
        top_k: s.top_k.map(|k| k.max(0) as usize),
        top_p: s.top_p,
        repetition_penalty: s.repetition_penalty,
    };
    let seed = s.seed.unwrap_or_else(|| {
        // A request without a seed samples its own stream, as OpenAI's API does.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos ^ state.next_id.load(Ordering::Relaxed).rotate_left(32)
    });
    let sampling = decoder.defaults.sampling(&overrides).with_seed(seed);
    let config = GenerationConfig::default()
        .with_max_new_tokens(max_tokens)
        .with_sampling(sampling)
        .with_eos_token_ids(eos)
        .with_stop_strings(stops);
    Ok(Plan {
        config,
        frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
        presence_penalty: s.presence_penalty.unwrap_or(0.0),
        stream: s.stream.unwrap_or(false),
        include_usage: s
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

fn admit(state: &AppState) -> Result<Slot, ApiError> {
    state.admission.admit().ok_or_else(|| {
        overloaded("the server is at its limit of running and queued requests; retry later")
    })
}

async fn translations(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Served::Translator(translator) = &state.served else {
        return Err(ApiError::invalid(
            "model",
            "this server holds a decoder-only model; use /v1/chat/completions or /v1/completions",
        ));
    };
    let request: TranslationRequest = parse_one(&body)?;
    if request.text.is_empty() {
        return Err(ApiError::invalid("text", "is empty"));
    }
    if let Some(t) = request.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(ApiError::invalid(
            "temperature",
            format!("{t} is not in [0, 2]"),
        ));
    }
    if request.num_beams == Some(0) || request.max_tokens == Some(0) {
        return Err(ApiError::invalid(
            "num_beams",
            "num_beams and max_tokens must be at least 1",
        ));
    }
    let _slot = admit(&state)?;
    let reply = translator
        .submit(request)
        .ok_or_else(|| overloaded("the server is shutting down"))?;
    let translation = match reply.await {
        Ok(Ok(t)) => t,
        Ok(Err(Failure::Request(message))) => return Err(ApiError::invalid("request", message)),
        Ok(Err(Failure::Internal(message))) => return Err(internal(message)),
        Err(_) => return Err(internal("the model stopped before the request ended")),
    };
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    Ok(axum::Json(json!({
        "id": format!("tr-{n:016x}"),
        "object": "translation",
        "created": now(),
        "model": state.model_id,
        "text": translation.text,
        "finish_reason": finish_reason(translation.finish),
        "usage": Usage::new(translation.prompt_tokens, translation.completion_tokens),
    }))
    .into_response())
}

fn overloaded(message: &str) -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: message.into(),
        kind: "server_error",
        param: None,
        code: Some("server_overloaded"),
    }
}

fn internal(message: impl Into<String>) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: message.into(),
        kind: "server_error",
        param: None,
        code: None,
    }
}

fn finish_reason(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Eos | FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
    }
}

/// Ids, object names and the envelope of one response.
struct Envelope {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Envelope {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn full(&self, text: &str, finish: &str, usage: Usage) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish,
            }),
            Kind::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        })
    }

    /// A stream chunk: `text` (or the role, for the first chat chunk) and/or the finish.
    fn chunk(&self, text: Option<&str>, role: bool, finish: Option<&str>) -> Event {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        self.event(json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }))
    }

    fn usage_chunk(&self, usage: Usage) -> Event {
        self.event(json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage,
        }))
    }

    fn event(&self, value: Value) -> Event {
        Event::default().data(value.to_string())
    }
}

async fn run(
    state: Arc<AppState>,
    prompt: Vec<u32>,
    sampling: Sampling,
    eos: Vec<u32>,
    kind: Kind,
) -> Result<Response, ApiError> {
    let decoder = state.decoder()?;
    let plan = plan(&state, decoder, prompt.len(), sampling, eos, kind)?;
    let slot = admit(&state)?;
    let mut events = decoder
        .engine
        .submit(Job {
            prompt,
            config: plan.config,
            frequency_penalty: plan.frequency_penalty,
            presence_penalty: plan.presence_penalty,
        })
        .ok_or_else(|| overloaded("the server is shutting down"))?;
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    let envelope = Envelope {
        id: match kind {
            Kind::Chat => format!("chatcmpl-{n:016x}"),
            Kind::Completion => format!("cmpl-{n:016x}"),
        },
        created: now(),
        model: state.model_id.clone(),
        kind,
    };
    if plan.stream {
        return Ok(stream(envelope, events, slot, plan.include_usage));
    }
    let _slot = slot;
    loop {
        match events.recv().await {
            Some(BatchEvent::Text(_)) => {}
            Some(BatchEvent::Done {
                generation,
                prompt_tokens,
            }) => {
                let usage = Usage::new(prompt_tokens, generation.tokens.len());
                let text = generation.text.unwrap_or_default();
                let body = envelope.full(&text, finish_reason(generation.finish), usage);
                return Ok(axum::Json(body).into_response());
            }
            Some(BatchEvent::Failed(e)) => return Err(ApiError::invalid("request", e.to_string())),
            None => return Err(internal("the engine stopped before the request ended")),
        }
    }
}

struct Streaming {
    envelope: Envelope,
    events: UnboundedReceiver<BatchEvent>,
    out: VecDeque<Event>,
    done: bool,
    include_usage: bool,
    _slot: Slot,
}

/// Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. Dropped when the
/// client disconnects, which closes the request's channel: the engine drops its row at the next
/// step and the slot is free.
fn stream(
    envelope: Envelope,
    events: UnboundedReceiver<BatchEvent>,
    slot: Slot,
    include_usage: bool,
) -> Response {
    let mut out = VecDeque::new();
    if envelope.kind == Kind::Chat {
        out.push_back(envelope.chunk(Some(""), true, None));
    }
    let state = Streaming {
        envelope,
        events,
        out,
        done: false,
        include_usage,
        _slot: slot,
    };
    let body = futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(event) = st.out.pop_front() {
                return Some((Ok::<_, Infallible>(event), st));
            }
            if st.done {
                return None;
            }
            match st.events.recv().await {
                Some(BatchEvent::Text(text)) => {
                    if !text.is_empty() {
                        st.out
                            .push_back(st.envelope.chunk(Some(&text), false, None));
                    }
                }
                Some(BatchEvent::Done {
                    generation,
                    prompt_tokens,
                }) => {
                    let finish = finish_reason(generation.finish);
                    let last = match st.envelope.kind {
                        Kind::Chat => st.envelope.chunk(None, false, Some(finish)),
                        Kind::Completion => st.envelope.chunk(Some(""), false, Some(finish)),
                    };
                    st.out.push_back(last);
                    if st.include_usage {
                        let usage = Usage::new(prompt_tokens, generation.tokens.len());
                        st.out.push_back(st.envelope.usage_chunk(usage));
                    }
                    st.out.push_back(Event::default().data("[DONE]"));
                    st.done = true;
                }
                Some(BatchEvent::Failed(e)) => {
                    let error = ApiError::invalid("request", e.to_string());
                    st.out.push_back(st.envelope.event(error.body()));
                    st.out.push_back(Event::default().data("[DONE]"));
                    st.done = true;
                }
                None => {
                    let error = internal("the engine stopped before the request ended");
                    st.out.push_back(st.envelope.event(error.body()));
                    st.out.push_back(Event::default().data("[DONE]"));
                    st.done = true;
                }
            }
        }
    });
    Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response()
}
