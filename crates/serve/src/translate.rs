//! `POST /v1/translations` for encoder-decoder models (NLLB-200, T5): kiln's own endpoint, as
//! the OpenAI API has none for text translation. Requests run one at a time on the model's
//! thread, in arrival order (no continuous batching for encoder-decoders).
//!
//! Request: `{"text": "...", "source_lang": "eng_Latn", "target_lang": "fra_Latn",
//! "max_tokens": 200, "num_beams": 4, "temperature": 0, "top_p": 1, "seed": 42}`, all but `text`
//! optional (NLLB needs both languages as FLORES-200 codes; T5 takes language names for its
//! `translate X to Y:` prefix, or neither). Response: `{"id", "object": "translation",
//! "created", "model", "text", "finish_reason": "stop"|"length", "usage"}`.

use serde::Deserialize;
use std::sync::mpsc;
use tokio::sync::oneshot;

use burn::prelude::Backend;
use kiln_auto::LoadedSeq2Seq;
use kiln_core::FinishReason;

/// One translation request (the JSON body of `/v1/translations`).
#[derive(Debug, Clone, Deserialize)]
pub struct TranslationRequest {
    /// The text to translate.
    pub text: String,
    /// Source language: an NLLB code (`eng_Latn`) or, for T5, a name (`English`).
    #[serde(default)]
    pub source_lang: Option<String>,
    /// Target language: an NLLB code (`fra_Latn`) or, for T5, a name (`French`).
    #[serde(default)]
    pub target_lang: Option<String>,
    /// Most tokens to generate (default: generation_config.json's, else 200).
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Beam width (default: generation_config.json's, else 1).
    #[serde(default)]
    pub num_beams: Option<usize>,
    /// Sampling temperature (0: greedy or beams).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Sampler seed (default 42, as `kiln translate`).
    #[serde(default)]
    pub seed: Option<u64>,
}

/// What a [`Translator`] returns.
#[derive(Debug, Clone)]
pub struct Translation {
    /// The translated text.
    pub text: String,
    /// Encoder input tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Why generation ended.
    pub finish: FinishReason,
}

/// An encoder-decoder model that `/v1/translations` runs (the `kiln` crate implements it for
/// its loaded NLLB and T5 models).
pub trait Translator: Send + 'static {
    /// Translates one request; errors are the request's fault (a 400 naming the argument).
    fn translate(&mut self, request: &TranslationRequest) -> kiln_core::Result<Translation>;
}

/// Why a translation failed: the request's fault (400) or the model's (500).
#[derive(Debug)]
pub enum Failure {
    /// A bad argument (unknown language code, ...).
    Request(String),
    /// The model panicked.
    Internal(String),
}

type Reply = oneshot::Sender<Result<Translation, Failure>>;

/// The handlers' side of the translation thread.
#[derive(Clone)]
pub struct TranslatorHandle {
    jobs: mpsc::Sender<(TranslationRequest, Reply)>,
}

impl TranslatorHandle {
    /// Queues `request`; `None` when the thread has stopped.
    pub fn submit(
        &self,
        request: TranslationRequest,
    ) -> Option<oneshot::Receiver<Result<Translation, Failure>>> {
        let (tx, rx) = oneshot::channel();
        self.jobs.send((request, tx)).ok()?;
        Some(rx)
    }
}

/// Starts the thread that owns `translator`; it ends when every handle is dropped.
pub fn start<T: Translator>(mut translator: T) -> (TranslatorHandle, std::thread::JoinHandle<()>) {
    let (jobs, rx) = mpsc::channel::<(TranslationRequest, Reply)>();
    let thread = std::thread::Builder::new()
        .name("kiln-translator".into())
        .spawn(move || {
            for (request, reply) in rx {
                if reply.is_closed() {
                    continue;
                }
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    translator.translate(&request)
                }));
                let _ = reply.send(match result {
                    Ok(r) => r.map_err(|e| Failure::Request(e.to_string())),
                    Err(_) => Err(Failure::Internal("the model failed on this request".into())),
                });
            }
        })
        .expect("spawning the translation thread");
    (TranslatorHandle { jobs }, thread)
}

/// A translation model behind `kiln serve`'s `/v1/translations`: one request at a time, as
/// `kiln translate` runs it.
impl<B: Backend> Translator for LoadedSeq2Seq<B>
where
    LoadedSeq2Seq<B>: Send + 'static,
{
    fn translate(&mut self, request: &TranslationRequest) -> kiln_core::Result<Translation> {
        let overrides = kiln_core::loading::SamplingOverrides {
            temperature: request.temperature,
            top_p: request.top_p,
            ..Default::default()
        };
        let mut config = self.generation_config(&overrides);
        config.sampling = config.sampling.with_seed(request.seed.unwrap_or(42));
        if let Some(n) = request.num_beams {
            config = config.with_num_beams(n);
        }
        if let Some(n) = request.max_tokens {
            config = config.with_max_new_tokens(n);
        }
        let (src, tgt) = (
            request.source_lang.as_deref(),
            request.target_lang.as_deref(),
        );
        config = config.with_forced_bos_token_id(self.forced_target(tgt)?);
        let input = self.encode_input(&request.text, src, tgt)?;
        let out = self
            .generate(std::slice::from_ref(&input), &config)?
            .pop()
            .ok_or_else(|| kiln_core::Error::arg("text", "no output"))?;
        let text = self.text_tokenizer()?.decode(&out.tokens, true)?;
        Ok(Translation {
            text,
            prompt_tokens: input.len(),
            completion_tokens: out.tokens.len(),
            finish: out.finish,
        })
    }
}
