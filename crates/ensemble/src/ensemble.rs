//! The ensemble: members, weights and method, and the generation loop that keeps every member's
//! token stream in step with the chosen text.

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::activation::softmax;
use kiln_core::generate::partial_stop_len;
use kiln_core::{FinishReason, GenerationConfig, Sampler, StreamControl, TokenEvent};

use crate::error::{EnsembleError, Result};
use crate::member::Member;
use crate::relative::{RelativeConfig, RelativeMatrix, host_softmax, keep_consistent_anchors};
use crate::search::{HostStart, SearchConfig, inverse_search_from};
use crate::vocab::{AnchorConfig, Anchors, Vocab, find_anchors};

/// How the members' distributions are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// DeePEn: average in the relative space, map back to the main model by gradient search.
    Deepen,
    /// GaC: average probabilities over the union of the vocabularies (by the tokens' bytes).
    Gac,
    /// UniTE: average over the union of each member's top-k tokens only.
    Unite,
}

impl std::str::FromStr for Method {
    type Err = EnsembleError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "deepen" => Ok(Method::Deepen),
            "gac" => Ok(Method::Gac),
            "unite" => Ok(Method::Unite),
            other => Err(EnsembleError::arg(
                "method",
                format!("`{other}`; use deepen, gac or unite"),
            )),
        }
    }
}

/// How an ensemble is built.
#[derive(Debug, Clone, PartialEq)]
pub struct EnsembleConfig {
    /// The combination rule.
    pub method: Method,
    /// One weight per member (main first), summing to 1; `None`: equal weights (DeePEn-Avg).
    /// See [`weights_from_scores`] for DeePEn-Adapt.
    pub weights: Option<Vec<f32>>,
    /// Anchor selection (DeePEn).
    pub anchors: AnchorConfig,
    /// Relative matrices (DeePEn).
    pub relative: RelativeConfig,
    /// The inverse search (DeePEn).
    pub search: SearchConfig,
    /// Tokens per member in UniTE's union (the UniTE paper uses 10).
    pub unite_k: usize,
    /// Where relative matrices are cached (`None`: computed every time).
    pub cache_dir: Option<PathBuf>,
    /// DeePEn: when the main model's own argmax is its EOS, take the main model's scores for
    /// that step (the reference's rule; default on).
    pub main_eos_fallback: bool,
}

impl Default for EnsembleConfig {
    fn default() -> Self {
        Self {
            method: Method::Deepen,
            weights: None,
            anchors: AnchorConfig::default(),
            relative: RelativeConfig::default(),
            search: SearchConfig::default(),
            unite_k: 10,
            cache_dir: None,
            main_eos_fallback: true,
        }
    }
}

impl EnsembleConfig {
    /// Sets the method.
    pub fn with_method(mut self, method: Method) -> Self {
        self.method = method;
        self
    }
    /// Sets the weights.
    pub fn with_weights(mut self, weights: Option<Vec<f32>>) -> Self {
        self.weights = weights;
        self
    }
    /// Sets the anchor config.
    pub fn with_anchors(mut self, anchors: AnchorConfig) -> Self {
        self.anchors = anchors;
        self
    }
    /// Sets the relative-matrix config.
    pub fn with_relative(mut self, relative: RelativeConfig) -> Self {
        self.relative = relative;
        self
    }
    /// Sets the search config.
    pub fn with_search(mut self, search: SearchConfig) -> Self {
        self.search = search;
        self
    }
    /// Sets UniTE's k.
    pub fn with_unite_k(mut self, k: usize) -> Self {
        self.unite_k = k;
        self
    }
    /// Sets the matrix cache folder.
    pub fn with_cache_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.cache_dir = dir;
        self
    }
    /// Sets [`main_eos_fallback`](Self::main_eos_fallback).
    pub fn with_main_eos_fallback(mut self, on: bool) -> Self {
        self.main_eos_fallback = on;
        self
    }
}

/// DeePEn-Adapt: weights proportional to each member's dev-set score.
pub fn weights_from_scores(scores: &[f32]) -> Result<Vec<f32>> {
    let sum: f32 = scores.iter().sum();
    if scores.is_empty() || scores.iter().any(|s| !s.is_finite() || *s < 0.0) || sum <= 0.0 {
        return Err(EnsembleError::BadWeights {
            weights: scores.to_vec(),
            message: "scores must be finite, non-negative and not all zero".into(),
        });
    }
    Ok(scores.iter().map(|s| s / sum).collect())
}

/// Checks `weights` has one finite, non-negative entry per member and sums to 1.
pub fn check_weights(weights: &[f32], members: usize) -> Result<()> {
    let bad = |message: String| EnsembleError::BadWeights {
        weights: weights.to_vec(),
        message,
    };
    if weights.len() != members {
        return Err(bad(format!(
            "{} weights for {members} members",
            weights.len()
        )));
    }
    if weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
        return Err(bad("weights must be finite and non-negative".into()));
    }
    let sum: f32 = weights.iter().sum();
    if (sum - 1.0).abs() > 1e-3 {
        return Err(bad(format!(
            "weights sum to {sum}, not 1 (use kiln_ensemble::weights_from_scores to normalise scores)"
        )));
    }
    Ok(())
}

/// Length of `bytes` without an incomplete UTF-8 character at its end; invalid sequences count
/// as complete (they read as U+FFFD).
fn complete_utf8_len(bytes: &[u8]) -> usize {
    let mut start = 0;
    loop {
        match std::str::from_utf8(&bytes[start..]) {
            Ok(_) => return bytes.len(),
            Err(e) => match e.error_len() {
                Some(bad) => start += e.valid_up_to() + bad,
                None => return start + e.valid_up_to(),
            },
        }
    }
}

/// The ids of `choices` in `vocab` (each must be one token there).
fn choice_ids(vocab: &Vocab, choices: &[String], member: &str) -> Result<Vec<u32>> {
    choices
        .iter()
        .map(|c| {
            vocab.id_of(c.as_bytes()).ok_or_else(|| {
                EnsembleError::arg(
                    "choices",
                    format!("{c:?} is not one token of `{member}`'s vocabulary"),
                )
            })
        })
        .collect()
}

/// The id among `ids` with the highest score.
fn best_choice(logits: &[f32], ids: &[u32]) -> u32 {
    let mut best = ids[0];
    for &id in &ids[1..] {
        if logits[id as usize] > logits[best as usize] {
            best = id;
        }
    }
    best
}

/// What an ensemble (or one member alone) generated.
#[derive(Debug, Clone, PartialEq)]
pub struct EnsembleOutput {
    /// The generated text (raw bytes of the chosen tokens, lossily decoded; a SentencePiece
    /// leading space is kept, as it continues the prompt).
    pub text: String,
    /// The generated text's raw bytes (may end inside a character).
    pub bytes: Vec<u8>,
    /// The main model's generated tokens (for DeePEn: the chosen tokens).
    pub tokens: Vec<u32>,
    /// Each member's own generated token stream.
    pub member_tokens: Vec<Vec<u32>>,
    /// Why it stopped.
    pub finish: FinishReason,
}

/// The token chosen at one step.
enum Choice {
    /// An id in the main model's vocabulary.
    Main(u32),
    /// A union token: its bytes, its id in the main vocabulary if any, whether it is EOS.
    Union {
        bytes: Vec<u8>,
        main: Option<u32>,
        eos: bool,
    },
}

/// A member's position in the shared text.
struct Track<B: Backend> {
    /// Generated tokens before `stable` are final.
    stable: usize,
    /// Bytes of the generated text they cover.
    stable_bytes: usize,
    /// Bytes covered by everything fed (stable + tail).
    covered: usize,
    /// Logits after the last token fed.
    logits: Tensor<B, 1>,
}

impl<B: Backend> Track<B> {
    fn new(logits: Tensor<B, 1>) -> Self {
        Self {
            stable: 0,
            stable_bytes: 0,
            covered: 0,
            logits,
        }
    }
}

/// Longest uncommitted tail (tokens) before the ensemble commits all but its last few even
/// without a word boundary (long numbers, scripts without spaces).
const MAX_TAIL: usize = 16;
const KEEP_TAIL: usize = 4;

/// Member `m` re-tokenises texts in the middle of a sequence after this string, so that a
/// SentencePiece dummy prefix lands on it and not on the text.
const TAIL_PREFIX: &str = "\n";

/// Models combined into one generator.
pub struct Ensemble<B: Backend> {
    members: Vec<Box<dyn Member<B>>>,
    vocabs: Vec<Vocab>,
    same_as_main: Vec<bool>,
    tail_base: Vec<Vec<u32>>,
    weights: Vec<f32>,
    config: EnsembleConfig,
    anchors: Option<Anchors>,
    relative: Vec<RelativeMatrix<B>>,
}

impl<B: Backend> Ensemble<B> {
    /// Builds the ensemble: `members[0]` is the main model. For DeePEn this finds the anchors
    /// and builds (or reads from the cache) every member's relative matrix.
    pub fn new(members: Vec<Box<dyn Member<B>>>, config: EnsembleConfig) -> Result<Self> {
        if members.is_empty() {
            return Err(EnsembleError::arg(
                "members",
                "an ensemble needs at least one member",
            ));
        }
        let weights = match &config.weights {
            Some(w) => w.clone(),
            None => vec![1.0 / members.len() as f32; members.len()],
        };
        check_weights(&weights, members.len())?;
        if config.method == Method::Unite && config.unite_k == 0 {
            return Err(EnsembleError::arg("unite_k", "must be at least 1"));
        }
        config.search.validate()?;
        let device = members[0].device();
        for m in &members[1..] {
            if m.device() != device {
                return Err(EnsembleError::DeviceMismatch {
                    member: m.name().to_string(),
                    found: format!("{:?}", m.device()),
                    expected: format!("{device:?}"),
                });
            }
        }
        let vocabs: Vec<Vocab> = members
            .iter()
            .map(|m| Vocab::from_tokenizer(m.tokenizer(), m.vocab_size()))
            .collect();
        let same_as_main = vocabs.iter().map(|v| v.same_as(&vocabs[0])).collect();
        let tail_base = members
            .iter()
            .map(|m| m.tokenizer().encode(TAIL_PREFIX, false))
            .collect::<kiln_core::Result<_>>()?;
        let mut ensemble = Self {
            members,
            vocabs,
            same_as_main,
            tail_base,
            weights,
            config,
            anchors: None,
            relative: Vec::new(),
        };
        if ensemble.config.method == Method::Deepen {
            ensemble.build_relative()?;
        }
        Ok(ensemble)
    }

    fn build_relative(&mut self) -> Result<()> {
        let names: Vec<String> = self.members.iter().map(|m| m.name().to_string()).collect();
        let vocabs: Vec<&Vocab> = self.vocabs.iter().collect();
        let mut anchors = find_anchors(&vocabs, &names, &self.config.anchors)?;
        let mut embeddings = Vec::with_capacity(self.members.len());
        for member in &self.members {
            let emb = member.embeddings();
            let rows = emb.dims()[0];
            if rows < member.vocab_size() {
                return Err(EnsembleError::arg(
                    "embeddings",
                    format!(
                        "`{}` has {rows} embedding rows for a vocabulary of {}",
                        member.name(),
                        member.vocab_size()
                    ),
                ));
            }
            embeddings.push(emb.narrow(0, 0, member.vocab_size()));
        }
        if let Some(keep) = self.config.anchors.consistent_anchors
            && self.members.len() > 1
        {
            anchors = keep_consistent_anchors(&anchors, &embeddings, keep)?;
        }
        let mut relative = Vec::with_capacity(self.members.len());
        for (m, emb) in embeddings.into_iter().enumerate() {
            let matrix = match &self.config.cache_dir {
                Some(dir) => {
                    RelativeMatrix::build_cached(emb, &anchors.ids[m], &self.config.relative, dir)?
                }
                None => RelativeMatrix::build(emb, &anchors.ids[m], &self.config.relative)?,
            };
            relative.push(matrix);
        }
        self.anchors = Some(anchors);
        self.relative = relative;
        Ok(())
    }

    /// The members (main first).
    pub fn members(&self) -> &[Box<dyn Member<B>>] {
        &self.members
    }

    /// The anchors (DeePEn).
    pub fn anchors(&self) -> Option<&Anchors> {
        self.anchors.as_ref()
    }

    /// The relative matrices (DeePEn), one per member.
    pub fn relative(&self) -> &[RelativeMatrix<B>] {
        &self.relative
    }

    /// The members' weights.
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }

    /// Each member's vocabulary in raw bytes.
    pub fn vocabs(&self) -> &[Vocab] {
        &self.vocabs
    }

    /// DeePEn's combined logits over the main vocabulary for members' `logits`: each
    /// distribution mapped to the relative space, averaged with the weights, mapped back by
    /// the gradient search from the main model's logits.
    pub fn deepen_logits(&self, logits: &[Tensor<B, 1>]) -> Result<Tensor<B, 1>> {
        if self.relative.len() != self.members.len() {
            return Err(EnsembleError::arg(
                "method",
                "relative matrices are built only for DeePEn",
            ));
        }
        if self.members.len() == 1 {
            return Ok(logits[0].clone());
        }
        deepen_combine(logits, &self.relative, &self.weights, &self.config.search)
    }

    /// Generates from `prompts`: one per member (main first), or one shared by all. `config`
    /// is kiln-core's [`GenerationConfig`]: EOS ids left `None` are the main model's; beams, the
    /// n-gram ban and a forced first token are not implemented here (an error).
    pub fn generate(
        &mut self,
        prompts: &[&str],
        config: &GenerationConfig,
    ) -> Result<EnsembleOutput> {
        self.generate_streaming(prompts, config, |_| ())
    }

    /// [`generate`](Self::generate), reporting each step as kiln-core's `generate_tokens`
    /// does: a [`TokenEvent`] (row 0) with the main model's id of the chosen token (`None` for
    /// a GaC/UniTE token outside its vocabulary and for the final held-back text) and the text
    /// it makes final (whole characters; a possible stop string held back until it cannot
    /// match). The callback returns `()` or a `ControlFlow`; `Break` ends the generation after
    /// that step ([`FinishReason::Cancelled`]).
    pub fn generate_streaming<R: StreamControl>(
        &mut self,
        prompts: &[&str],
        config: &GenerationConfig,
        mut on_token: impl FnMut(TokenEvent<'_>) -> R,
    ) -> Result<EnsembleOutput> {
        let tracks = self.start(prompts)?;
        self.decode(tracks, config, None, &mut |event| on_token(event).proceed())
    }

    /// Multiple choice, as the reference's processor for MMLU/ARC/PIQA: from `prompts` (as in
    /// [`generate`](Self::generate)), the one of `choices` (e.g. `" A"`, `" B"`, ...; each one
    /// token of the main vocabulary) whose token scores highest in the step's DeePEn logits
    /// (the searched ones, with no EOS fallback). DeePEn only; [`Self::choose_member`] runs
    /// one member alone.
    pub fn choose(&mut self, prompts: &[&str], choices: &[String]) -> Result<EnsembleOutput> {
        let tracks = self.start(prompts)?;
        let config = GenerationConfig::default().with_max_new_tokens(1);
        self.decode(tracks, &config, Some(choices), &mut |_| true)
    }

    /// Each member's logits after its prompt: one prompt per member, or one shared by all.
    fn start(&mut self, prompts: &[&str]) -> Result<Vec<Track<B>>> {
        let n = self.members.len();
        let prompts: Vec<&str> = match prompts.len() {
            1 => vec![prompts[0]; n],
            k if k == n => prompts.to_vec(),
            k => {
                return Err(EnsembleError::arg(
                    "prompts",
                    format!(
                        "{k} prompts for {n} members; give one shared prompt or one per member"
                    ),
                ));
            }
        };
        let mut tracks = Vec::with_capacity(n);
        for (member, prompt) in self.members.iter_mut().zip(&prompts) {
            tracks.push(Track::new(member.start(prompt)?));
        }
        Ok(tracks)
    }

    /// [`generate`](Self::generate) from the main model's prompt token ids (as `kiln generate
    /// --prompt-ids`): the main model starts from the ids as given; the other members from
    /// their text (decoded by the main tokenizer, special tokens skipped).
    pub fn generate_from_ids(
        &mut self,
        main_ids: &[u32],
        config: &GenerationConfig,
    ) -> Result<EnsembleOutput> {
        let text = self.members[0]
            .tokenizer()
            .decode(main_ids, true)
            .map_err(EnsembleError::from)?;
        let mut tracks = Vec::with_capacity(self.members.len());
        for (m, member) in self.members.iter_mut().enumerate() {
            let logits = if m == 0 {
                member.start_ids(main_ids)?
            } else {
                member.start(&text)?
            };
            tracks.push(Track::new(logits));
        }
        self.decode(tracks, config, None, &mut |_| true)
    }

    /// The generation loop shared by the text and the id entry points.
    fn decode(
        &mut self,
        mut tracks: Vec<Track<B>>,
        config: &GenerationConfig,
        choices: Option<&[String]>,
        on_token: &mut dyn FnMut(TokenEvent<'_>) -> bool,
    ) -> Result<EnsembleOutput> {
        config.check_supported("ensemble generation", false)?;
        // Streamed so far: bytes of `text_bytes`, and the length of that text as streamed (an
        // invalid byte goes out as U+FFFD, as in the final text).
        let (mut streamed_bytes, mut streamed) = (0, 0);
        let mut sampler = Sampler::new(config.sampling.clone())?;
        let eos = config
            .eos_token_ids
            .clone()
            .unwrap_or_else(|| self.members[0].eos_token_ids());
        let mut text_bytes: Vec<u8> = Vec::new();
        let mut chosen: Vec<u32> = Vec::new();
        let mut finish = FinishReason::Length;
        if choices.is_some() && self.config.method != Method::Deepen {
            return Err(EnsembleError::arg(
                "choices",
                "multiple choice is DeePEn's protocol (and single members'); not GaC or UniTE",
            ));
        }
        let choices = choices
            .map(|c| choice_ids(&self.vocabs[0], c, self.members[0].name()))
            .transpose()?;
        let steps = if choices.is_some() {
            1
        } else {
            config.max_new_tokens
        };
        for _ in 0..steps {
            if self
                .members
                .iter()
                .any(|m| m.prompt_len() + m.generated().len() + KEEP_TAIL + 2 > m.max_context())
            {
                break;
            }
            let choice = match self.config.method {
                Method::Deepen => {
                    // As the reference: when the main model's own argmax is its EOS, that step
                    // takes the main model's scores, not the searched ones, so the ensemble
                    // stops where the main model would.
                    // The argmax is taken on the device (one scalar per step); the logits
                    // reach the host only on the step that ends.
                    let main_argmax = || -> u32 {
                        tracks[0]
                            .logits
                            .clone()
                            .argmax(0)
                            .into_scalar()
                            .elem::<i64>() as u32
                    };
                    if let Some(ids) = &choices {
                        let logits: Vec<Tensor<B, 1>> =
                            tracks.iter().map(|t| t.logits.clone()).collect();
                        let combined = host_vec(self.deepen_logits(&logits)?, "logits")?;
                        Choice::Main(best_choice(&combined, ids))
                    } else if self.config.main_eos_fallback && eos.contains(&main_argmax()) {
                        let mut main = host_vec(tracks[0].logits.clone(), "logits")?;
                        Choice::Main(sampler.sample(&mut main, &chosen))
                    } else {
                        let logits: Vec<Tensor<B, 1>> =
                            tracks.iter().map(|t| t.logits.clone()).collect();
                        let combined = self.deepen_logits(&logits)?;
                        let mut host = host_vec(combined, "logits")?;
                        Choice::Main(sampler.sample(&mut host, &chosen))
                    }
                }
                Method::Gac => self.choose_gac(&tracks, &mut sampler, &chosen)?,
                Method::Unite => self.choose_unite(&tracks, &mut sampler, &chosen)?,
            };
            let (bytes, main_id, is_eos) = match choice {
                Choice::Main(id) => (
                    self.vocabs[0].token_bytes(id).to_vec(),
                    Some(id),
                    eos.contains(&id),
                ),
                Choice::Union { bytes, main, eos } => (bytes, main, eos),
            };
            if let Some(id) = main_id {
                chosen.push(id);
            }
            if is_eos {
                finish = FinishReason::Eos;
                break;
            }
            let before = text_bytes.len();
            text_bytes.extend_from_slice(&bytes);
            if choices.is_some() {
                // The one multiple-choice token: no member needs to read it.
                break;
            }
            for (m, track) in tracks.iter_mut().enumerate() {
                if let Some(id) = main_id
                    && self.same_as_main[m]
                    && track.covered == before
                {
                    track.logits = self.members[m].feed(&[id])?;
                    track.stable = self.members[m].generated().len();
                    track.stable_bytes = text_bytes.len();
                    track.covered = text_bytes.len();
                    self.members[m].commit(track.stable);
                } else {
                    self.retokenize(m, track, &text_bytes)?;
                }
            }
            if !config.stop_strings.is_empty() {
                let text = String::from_utf8_lossy(&text_bytes);
                if let Some(cut) = config
                    .stop_strings
                    .iter()
                    .filter(|s| !s.is_empty())
                    .filter_map(|s| text.find(s.as_str()))
                    .min()
                {
                    text_bytes = text[..cut].as_bytes().to_vec();
                    finish = FinishReason::Stop;
                    break;
                }
            }
            // Stream whole characters (an incomplete one at the end waits; invalid bytes go out
            // as U+FFFD), holding back what may still become a stop string.
            let fresh = &text_bytes[streamed_bytes..];
            let piece = String::from_utf8_lossy(&fresh[..complete_utf8_len(fresh)]);
            let safe = piece.len() - partial_stop_len(&piece, &config.stop_strings);
            let go_on = on_token(TokenEvent {
                row: 0,
                id: main_id,
                text: &piece[..safe],
            });
            // What is held back is whole valid characters, the same bytes in `fresh`.
            streamed_bytes += complete_utf8_len(fresh) - (piece.len() - safe);
            streamed += safe;
            if !go_on {
                finish = FinishReason::Cancelled;
                break;
            }
        }
        if finish != FinishReason::Cancelled {
            let text = String::from_utf8_lossy(&text_bytes);
            if text.len() > streamed {
                on_token(TokenEvent {
                    row: 0,
                    id: None,
                    text: &text[streamed..],
                });
            }
        }
        let tokens = match self.config.method {
            Method::Deepen => chosen,
            _ => self.members[0].generated().to_vec(),
        };
        Ok(EnsembleOutput {
            text: String::from_utf8_lossy(&text_bytes).into_owned(),
            bytes: text_bytes,
            tokens,
            member_tokens: self
                .members
                .iter()
                .map(|m| m.generated().to_vec())
                .collect(),
            finish,
        })
    }

    /// Runs member `index` alone (its own greedy/sampled choice and, unless `config` names
    /// others, its own EOS ids), for comparisons.
    pub fn generate_member(
        &mut self,
        index: usize,
        prompt: &str,
        config: &GenerationConfig,
    ) -> Result<EnsembleOutput> {
        self.run_member(index, prompt, config, None)
    }

    /// [`choose`](Self::choose) with member `index` alone: the one of `choices` whose token
    /// scores highest in its own logits.
    pub fn choose_member(
        &mut self,
        index: usize,
        prompt: &str,
        choices: &[String],
    ) -> Result<EnsembleOutput> {
        let config = GenerationConfig::default().with_max_new_tokens(1);
        self.run_member(index, prompt, &config, Some(choices))
    }

    fn run_member(
        &mut self,
        index: usize,
        prompt: &str,
        config: &GenerationConfig,
        choices: Option<&[String]>,
    ) -> Result<EnsembleOutput> {
        config.check_supported("ensemble generation", false)?;
        let member = self
            .members
            .get_mut(index)
            .ok_or_else(|| EnsembleError::arg("index", format!("no member {index}")))?;
        let vocab = &self.vocabs[index];
        let mut sampler = Sampler::new(config.sampling.clone())?;
        let eos = config
            .eos_token_ids
            .clone()
            .unwrap_or_else(|| member.eos_token_ids());
        let choices = choices
            .map(|c| choice_ids(vocab, c, member.name()))
            .transpose()?;
        let steps = if choices.is_some() {
            1
        } else {
            config.max_new_tokens
        };
        let mut logits = member.start(prompt)?;
        let mut text_bytes = Vec::new();
        let mut tokens = Vec::new();
        let mut finish = FinishReason::Length;
        for _ in 0..steps {
            if member.prompt_len() + tokens.len() + 1 > member.max_context() {
                break;
            }
            let mut host = host_vec(logits, "logits")?;
            let id = match &choices {
                Some(ids) => best_choice(&host, ids),
                None => sampler.sample(&mut host, &tokens),
            };
            tokens.push(id);
            if eos.contains(&id) {
                finish = FinishReason::Eos;
                break;
            }
            text_bytes.extend_from_slice(vocab.token_bytes(id));
            let text = String::from_utf8_lossy(&text_bytes);
            if let Some(cut) = config
                .stop_strings
                .iter()
                .filter(|s| !s.is_empty())
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                text_bytes = text[..cut].as_bytes().to_vec();
                finish = FinishReason::Stop;
                break;
            }
            if choices.is_some() {
                break;
            }
            logits = member.feed(&[id])?;
            member.commit(tokens.len());
        }
        Ok(EnsembleOutput {
            text: String::from_utf8_lossy(&text_bytes).into_owned(),
            bytes: text_bytes,
            member_tokens: vec![tokens.clone()],
            tokens,
            finish,
        })
    }

    /// Member `m`'s tokens for `text` in the middle of a sequence.
    fn encode_tail(&self, m: usize, text: &str) -> Result<Vec<u32>> {
        let tokenizer = self.members[m].tokenizer();
        let base = &self.tail_base[m];
        let full = tokenizer.encode(&format!("{TAIL_PREFIX}{text}"), false)?;
        if full.starts_with(base) {
            Ok(full[base.len()..].to_vec())
        } else {
            Ok(tokenizer.encode(text, false)?)
        }
    }

    /// Member `m`'s tokens for the raw bytes `bytes` in the middle of a sequence, and how many
    /// bytes they cover. Valid UTF-8 goes through the tokenizer; a byte that is not valid
    /// UTF-8 (random or byte-level models can emit lone bytes) becomes the member's one-byte
    /// token when it has one (byte-level, byte fallback) and is dropped otherwise; an
    /// incomplete character at the end waits for its next bytes.
    fn encode_bytes(&self, m: usize, bytes: &[u8]) -> Result<(Vec<u32>, usize)> {
        let mut ids = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let (valid, bad) = match std::str::from_utf8(&bytes[at..]) {
                Ok(s) => (s.len(), None),
                Err(e) => (e.valid_up_to(), e.error_len()),
            };
            if valid > 0 {
                let text = std::str::from_utf8(&bytes[at..at + valid]).expect("valid prefix");
                ids.extend(self.encode_tail(m, text)?);
                at += valid;
            }
            match bad {
                Some(n) => {
                    for &b in &bytes[at..at + n] {
                        ids.extend(self.vocabs[m].id_of(&[b]));
                    }
                    at += n;
                }
                None if at < bytes.len() => break,
                None => {}
            }
        }
        Ok((ids, at))
    }

    /// Brings member `m` up to the text `text_bytes`: re-tokenises only the text after its last
    /// committed token, keeps the tokens that did not change, rewinds the rest.
    fn retokenize(&mut self, m: usize, track: &mut Track<B>, text_bytes: &[u8]) -> Result<()> {
        let pending = &text_bytes[track.stable_bytes..];
        let (tail, covered) = self.encode_bytes(m, pending)?;
        if track.stable_bytes + covered == track.covered {
            return Ok(()); // Only an incomplete character arrived.
        }
        let member = &mut self.members[m];
        let old = &member.generated()[track.stable..];
        let same = old.iter().zip(&tail).take_while(|(a, b)| a == b).count();
        if same < old.len() {
            track.logits = member.rewind(track.stable + same)?;
        }
        if same < tail.len() {
            track.logits = member.feed(&tail[same..])?;
        }
        track.covered = track.stable_bytes + covered;
        // Commit up to the last token that starts a word (its bytes begin with whitespace):
        // text before a word boundary no longer changes its tokens.
        let vocab = &self.vocabs[m];
        let starts_word = |id: u32| {
            vocab
                .token_bytes(id)
                .first()
                .is_some_and(|b| b.is_ascii_whitespace())
        };
        let mut cut = (1..tail.len())
            .rev()
            .find(|&i| starts_word(tail[i]))
            .unwrap_or(0);
        if tail.len() - cut > MAX_TAIL {
            cut = tail.len() - KEEP_TAIL;
        }
        if cut > 0 {
            let bytes: Vec<u8> = tail[..cut]
                .iter()
                .flat_map(|&id| vocab.token_bytes(id).to_vec())
                .collect();
            if pending.starts_with(&bytes) {
                track.stable += cut;
                track.stable_bytes += bytes.len();
                member.commit(track.stable);
            }
        }
        Ok(())
    }

    fn host_probs(&self, tracks: &[Track<B>]) -> Result<Vec<Vec<f32>>> {
        tracks
            .iter()
            .map(|t| {
                host_vec(
                    softmax(t.logits.clone().unsqueeze::<2>(), 1).reshape([t.logits.dims()[0]]),
                    "logits",
                )
            })
            .collect()
    }

    /// The union token `bytes` (or EOS) as a [`Choice`].
    fn union_choice(&self, key: &UnionKey) -> Choice {
        match key {
            UnionKey::Eos => Choice::Union {
                bytes: Vec::new(),
                main: self.members[0].eos_token_ids().first().copied(),
                eos: true,
            },
            UnionKey::Bytes(bytes) => Choice::Union {
                main: self.vocabs[0].id_of(bytes),
                bytes: bytes.clone(),
                eos: false,
            },
        }
    }

    /// GaC: probabilities summed per union token, weighted.
    fn choose_gac(
        &self,
        tracks: &[Track<B>],
        sampler: &mut Sampler,
        context: &[u32],
    ) -> Result<Choice> {
        let probs = self.host_probs(tracks)?;
        let mut union: std::collections::HashMap<UnionKey, f32> = std::collections::HashMap::new();
        for (m, p) in probs.iter().enumerate() {
            let eos = self.members[m].eos_token_ids();
            let vocab = &self.vocabs[m];
            for (id, &pr) in p.iter().enumerate() {
                let id = id as u32;
                let key = if eos.contains(&id) {
                    UnionKey::Eos
                } else {
                    let b = vocab.token_bytes(id);
                    if b.is_empty() {
                        continue;
                    }
                    UnionKey::Bytes(b.to_vec())
                };
                *union.entry(key).or_default() += self.weights[m] * pr;
            }
        }
        self.pick(union, sampler, context)
    }

    /// UniTE: each member's top-k tokens; a member scores a token it lacks by the first token
    /// of its own spelling of it; each member's scores are renormalised over the union.
    fn choose_unite(
        &self,
        tracks: &[Track<B>],
        sampler: &mut Sampler,
        context: &[u32],
    ) -> Result<Choice> {
        let probs = self.host_probs(tracks)?;
        let k = self.config.unite_k;
        let mut keys: Vec<UnionKey> = Vec::new();
        for (m, p) in probs.iter().enumerate() {
            let eos = self.members[m].eos_token_ids();
            let mut order: Vec<usize> = (0..p.len()).collect();
            let k = k.min(p.len());
            order.select_nth_unstable_by(k - 1, |a, b| p[*b].total_cmp(&p[*a]));
            for &id in &order[..k] {
                let key = if eos.contains(&(id as u32)) {
                    UnionKey::Eos
                } else {
                    let b = self.vocabs[m].token_bytes(id as u32);
                    if b.is_empty() {
                        continue;
                    }
                    UnionKey::Bytes(b.to_vec())
                };
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
        }
        let mut union: std::collections::HashMap<UnionKey, f32> = std::collections::HashMap::new();
        for (m, p) in probs.iter().enumerate() {
            let eos = self.members[m].eos_token_ids();
            let mut scores = Vec::with_capacity(keys.len());
            for key in &keys {
                let score = match key {
                    UnionKey::Eos => eos
                        .iter()
                        .map(|&e| p.get(e as usize).copied().unwrap_or(0.0))
                        .sum(),
                    UnionKey::Bytes(b) => match self.vocabs[m].id_of(b) {
                        Some(id) => p[id as usize],
                        None => {
                            let text = String::from_utf8_lossy(b);
                            self.encode_tail(m, &text)?
                                .first()
                                .map_or(0.0, |&id| p.get(id as usize).copied().unwrap_or(0.0))
                        }
                    },
                };
                scores.push(score);
            }
            let total: f32 = scores.iter().sum::<f32>().max(1e-30);
            for (key, s) in keys.iter().zip(scores) {
                *union.entry(key.clone()).or_default() += self.weights[m] * s / total;
            }
        }
        self.pick(union, sampler, context)
    }

    /// Samples a union token from its (unnormalised) probabilities.
    fn pick(
        &self,
        union: std::collections::HashMap<UnionKey, f32>,
        sampler: &mut Sampler,
        context: &[u32],
    ) -> Result<Choice> {
        let mut entries: Vec<(UnionKey, f32)> = union.into_iter().collect();
        // A fixed order, so that greedy ties and seeded sampling are reproducible.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut scores: Vec<f32> = entries.iter().map(|(_, p)| p.max(1e-30).ln()).collect();
        // The repetition penalty would read union indices as main-vocabulary ids; not applied.
        let _ = context;
        let index = sampler.sample(&mut scores, &[]) as usize;
        Ok(self.union_choice(&entries[index].0))
    }
}

/// A token of the union vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum UnionKey {
    /// Any member's end of sequence.
    Eos,
    /// A text token, by its bytes.
    Bytes(Vec<u8>),
}

/// DeePEn's target in the relative space: `Σ_i w_i · softmax(logits_i) · R_i`, over anchors
/// (the reference's `average_probs`, main member first). Each member's logits are over its own
/// vocabulary; the relative matrices must share one anchor set.
pub fn relative_average<B: Backend>(
    logits: &[Tensor<B, 1>],
    relative: &[RelativeMatrix<B>],
    weights: &[f32],
) -> Result<Tensor<B, 1>> {
    let (aggregate, _) = average_and_main(logits, relative, weights)?;
    Ok(Tensor::from_data(
        TensorData::new(aggregate, [relative[0].anchors()]),
        &logits[0].device(),
    ))
}

/// [`relative_average`] on the host, with the main member's logits, softmax and map: where
/// the search starts from.
fn average_and_main<B: Backend>(
    logits: &[Tensor<B, 1>],
    relative: &[RelativeMatrix<B>],
    weights: &[f32],
) -> Result<(Vec<f32>, HostStart)> {
    if logits.is_empty() || logits.len() != relative.len() || logits.len() != weights.len() {
        return Err(EnsembleError::arg(
            "logits",
            format!(
                "{} logit vectors, {} relative matrices and {} weights: one of each per member",
                logits.len(),
                relative.len(),
                weights.len()
            ),
        ));
    }
    let anchors = relative[0].anchors();
    let device = logits[0].device();
    // The average lives on the host: a sparse matrix maps there, and it is |A| floats.
    let mut aggregate = vec![0f32; anchors];
    let mut main = None;
    for (i, ((l, r), &w)) in logits.iter().zip(relative).zip(weights).enumerate() {
        if r.anchors() != anchors || r.vocab() != l.dims()[0] {
            return Err(EnsembleError::arg(
                "relative",
                format!(
                    "member {i}: {} logits for a {} × {} relative matrix (anchors must be {anchors})",
                    l.dims()[0],
                    r.vocab(),
                    r.anchors()
                ),
            ));
        }
        let z = host_vec(l.clone(), "logits")?;
        let (p, max, sum) = host_softmax(&z);
        let q = r.map_host(&p, &device)?;
        for (a, x) in aggregate.iter_mut().zip(&q) {
            *a += w * x;
        }
        if i == 0 {
            main = Some(HostStart::new(z, max, sum, q));
        }
    }
    let main = main.expect("checked: at least one member");
    Ok((aggregate, main))
}

/// One DeePEn step: [`relative_average`] of the members' distributions, mapped back to the main
/// (first) member's vocabulary by [`inverse_search`](crate::inverse_search) from its logits. What
/// [`Ensemble::deepen_logits`] runs with the ensemble's own matrices and weights.
pub fn deepen_combine<B: Backend>(
    logits: &[Tensor<B, 1>],
    relative: &[RelativeMatrix<B>],
    weights: &[f32],
    search: &SearchConfig,
) -> Result<Tensor<B, 1>> {
    let (target, main) = average_and_main(logits, relative, weights)?;
    let target = Tensor::from_data(
        TensorData::new(target, [relative[0].anchors()]),
        &logits[0].device(),
    );
    inverse_search_from(logits[0].clone(), Some(main), target, &relative[0], search)
}

/// A tensor's values read back to the host as f32; `what` names it in the error.
pub(crate) fn host_vec<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    what: &'static str,
) -> Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .into_vec()
        .map_err(|e| EnsembleError::arg(what, format!("{e:?}")))
}
