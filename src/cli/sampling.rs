//! The sampling flags every generating command shares, flattened into each one's arguments.

use clap::Args;
use kiln::core::SamplingConfig;
use kiln::core::loading::{GenerationDefaults, SamplingOverrides};

/// Temperature, top-k, top-p, repetition penalty and seed. Unset flags keep what the model's
/// generation_config.json says, as HF's `generate` does.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy, above 0 samples. Default: the model's
    /// generation_config.json (greedy unless it sets `do_sample`).
    #[arg(long, short = 't')]
    pub temperature: Option<f32>,
    /// Sample only from the k most likely tokens (0: off). Default when sampling: the model's,
    /// else 50 (HF's).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample from the smallest set of tokens whose probability reaches p (1.0: off).
    /// Default: the model's, else off.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Penalise tokens already in the text (1.0 = off; 1.1 is typical). Default: the model's,
    /// else 1.0.
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Random seed for sampling (one stream for the whole run).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl SamplingArgs {
    /// These flags over the model's generation defaults.
    pub fn overrides(&self) -> SamplingOverrides {
        SamplingOverrides {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
        }
    }

    /// The sampling pipeline these flags describe over the model's `defaults`.
    pub fn to_config(&self, defaults: &GenerationDefaults) -> SamplingConfig {
        defaults.sampling(&self.overrides()).with_seed(self.seed)
    }
}
