//! The sampling flags every generating command shares, flattened into each one's arguments.

use clap::Args;
use kiln::core::SamplingConfig;

/// Temperature, top-k, top-p, repetition penalty and seed.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long, short = 't', default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample only from the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample from the smallest set of tokens whose probability reaches p.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Penalise tokens already in the text (1.0 = off; 1.1 is typical).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Random seed for sampling (one stream for the whole run).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl SamplingArgs {
    /// The sampling pipeline these flags describe.
    pub fn to_config(&self) -> SamplingConfig {
        SamplingConfig::greedy()
            .with_temperature(self.temperature)
            .with_top_k(self.top_k)
            .with_top_p(self.top_p)
            .with_repetition_penalty(self.repetition_penalty)
            .with_seed(self.seed)
    }
}
