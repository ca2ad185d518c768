//! Turning next-token logits into a token: repetition penalty, temperature, top-k, top-p, in the
//! order HF transformers applies them, then greedy argmax or a seeded draw.
//!
//! Works on host `f32` logits: one vocabulary-sized vector per step is cheap to move, and the
//! sort-based filters are simplest and fastest there.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{Error, Result};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Softmax temperature; `0` means greedy.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p`.
    pub top_p: Option<f32>,
    /// HF's repetition penalty (`1.0` is none): logits of tokens already in the sequence are
    /// divided by it when positive and multiplied when negative.
    pub repetition_penalty: f32,
    /// Seed of the random draw.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingConfig {
    /// Always the most likely token.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 42,
        }
    }

    /// Sets the temperature (`0` = greedy).
    pub fn with_temperature(mut self, temperature: f32) -> Self {
        self.temperature = temperature;
        self
    }

    /// Sets top-k.
    pub fn with_top_k(mut self, k: Option<usize>) -> Self {
        self.top_k = k;
        self
    }

    /// Sets top-p.
    pub fn with_top_p(mut self, p: Option<f32>) -> Self {
        self.top_p = p;
        self
    }

    /// Sets the repetition penalty.
    pub fn with_repetition_penalty(mut self, penalty: f32) -> Self {
        self.repetition_penalty = penalty;
        self
    }

    /// Sets the seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Checks every field is in range.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::arg(
                "temperature",
                format!("{} is not a finite number >= 0", self.temperature),
            ));
        }
        if self.top_k == Some(0) {
            return Err(Error::arg("top_k", "must be at least 1"));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(Error::arg("top_p", format!("{p} is not in (0, 1]")));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(Error::arg(
                "repetition_penalty",
                format!("{} is not > 0", self.repetition_penalty),
            ));
        }
        Ok(())
    }
}

/// Picks tokens according to a [`SamplingConfig`]; owns the random state.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    /// A sampler; errors if the config is out of range.
    pub fn new(config: SamplingConfig) -> Result<Self> {
        config.validate()?;
        let rng = StdRng::seed_from_u64(config.seed);
        Ok(Self { config, rng })
    }

    /// The config.
    pub fn config(&self) -> &SamplingConfig {
        &self.config
    }

    /// Chooses the next token from `logits` given the sequence so far (`context`: prompt and
    /// generated tokens, for the repetition penalty). `logits` is modified in place.
    pub fn sample(&mut self, logits: &mut [f32], context: &[u32]) -> u32 {
        apply_repetition_penalty(logits, context, self.config.repetition_penalty);
        if self.config.temperature == 0.0 {
            return argmax(logits);
        }
        let t = self.config.temperature;
        logits.iter_mut().for_each(|l| *l /= t);
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
        if let Some(k) = self.config.top_k {
            candidates.truncate(k.max(1));
        }
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = self.config.top_p {
            // As HF's TopPLogitsWarper: keep tokens until the cumulative mass reaches top_p,
            // always at least one.
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cumulative += p;
                if cumulative >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            candidates.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut draw = self.rng.random::<f32>() * total;
        for (i, p) in probs.iter().enumerate() {
            draw -= p;
            if draw <= 0.0 {
                return candidates[i].0;
            }
        }
        candidates[probs.len() - 1].0
    }
}

/// The index of the largest value; the first on ties, as `torch.argmax`.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// HF's `RepetitionPenaltyLogitsProcessor`.
pub fn apply_repetition_penalty(logits: &mut [f32], context: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &t in context {
        let t = t as usize;
        if t < logits.len() && !seen[t] {
            seen[t] = true;
            let l = &mut logits[t];
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// OpenAI's `frequency_penalty` and `presence_penalty`: the logit of a token generated `c > 0`
/// times so far loses `c * frequency + presence` (`counts` holds `(token, c)`).
pub fn apply_frequency_presence_penalties(
    logits: &mut [f32],
    counts: &[(u32, u32)],
    frequency: f32,
    presence: f32,
) {
    if frequency == 0.0 && presence == 0.0 {
        return;
    }
    for &(token, count) in counts {
        if let Some(l) = logits.get_mut(token as usize) {
            *l -= count as f32 * frequency + presence;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_max() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn repetition_penalty_matches_hf() {
        let mut logits = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut logits, &[0, 1, 1], 2.0);
        assert_eq!(logits, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn frequency_and_presence_penalties_as_openai_documents() {
        // mu[j] - c[j] * alpha_frequency - (c[j] > 0) * alpha_presence
        let mut logits = vec![1.0, 2.0, 3.0, 4.0];
        apply_frequency_presence_penalties(&mut logits, &[(1, 3), (3, 1)], 0.5, 0.25);
        assert_eq!(logits, vec![1.0, 2.0 - 1.5 - 0.25, 3.0, 4.0 - 0.5 - 0.25]);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(
            SamplingConfig::greedy()
                .with_temperature(1.0)
                .with_top_k(Some(1)),
        )
        .unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 5.0, 4.9, 1.0], &[]), 1);
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // probs ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.8 keeps the first two.
        let mut s = Sampler::new(
            SamplingConfig::greedy()
                .with_temperature(1.0)
                .with_top_p(Some(0.8)),
        )
        .unwrap();
        for _ in 0..200 {
            let t = s.sample(&mut [3.0, 2.0, 1.0, 0.0], &[]);
            assert!(t == 0 || t == 1, "{t}");
        }
    }

    #[test]
    fn seeded_draws_repeat() {
        let config = SamplingConfig::greedy().with_temperature(1.0).with_seed(7);
        let draw = |c: &SamplingConfig| {
            let mut s = Sampler::new(c.clone()).unwrap();
            (0..30)
                .map(|_| s.sample(&mut [1.0, 1.1, 0.9, 1.2], &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(&config), draw(&config));
        assert!(draw(&config).iter().any(|&t| t != draw(&config)[0]));
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(Sampler::new(SamplingConfig::greedy().with_temperature(-1.0)).is_err());
        assert!(Sampler::new(SamplingConfig::greedy().with_top_p(Some(0.0))).is_err());
        assert!(Sampler::new(SamplingConfig::greedy().with_top_k(Some(0))).is_err());
    }
}
