//! Continual pre-training with the AnSAN (or plain causal) mask.
//!
//! The loop is written here rather than with burn-train's `Learner`: the `Learner` of 0.21 is
//! epoch-oriented and owns data loading, checkpointing and metrics through its own
//! `TrainStep`/`ValidStep` and `DataLoader` traits. A masked LM step needs per-batch masks built
//! from the token rows, and exact resume needs the batch order to be a pure function of the
//! step; a ~100-line loop over burn-optim's `AdamW` and `GradientsAccumulator` and burn's
//! recorders does both with nothing hidden.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::ElementConversion;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use kiln_llama::Llama;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::{AnchorError, AnchorSet, Result, Segments};

/// Which attention mask training uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MaskKind {
    /// Plain causal attention.
    Causal,
    /// The AnSAN mask.
    Ansan,
}

/// Tokenized training texts, one row each (anchors already in place for AC mode).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Corpus {
    /// Token rows; rows longer than `max_len` are cut, rows shorter than 2 tokens are dropped.
    pub rows: Vec<Vec<u32>>,
}

impl Corpus {
    /// A corpus of `rows` cut to `max_len` tokens.
    pub fn new(rows: Vec<Vec<u32>>, max_len: usize) -> Self {
        Self {
            rows: rows
                .into_iter()
                .map(|mut r| {
                    r.truncate(max_len);
                    r
                })
                .filter(|r| r.len() >= 2)
                .collect(),
        }
    }
}

/// Learning rate after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum LrSchedule {
    /// Cosine decay to `min_lr_ratio` of the peak at the last step.
    #[default]
    Cosine,
    /// The peak until the end (the AnLLM reference's `constant_with_warmup`).
    Constant,
}

/// Optimisation settings (builder style). [`Default`] suits a small model trained from
/// scratch; [`TrainConfig::pretrained`] is the AnLLM reference's recipe for continuing a
/// pretrained model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Schedule after the warm-up.
    #[serde(default)]
    pub schedule: LrSchedule,
    /// Final learning rate as a fraction of the peak (cosine decay after warm-up).
    pub min_lr_ratio: f64,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// Optimizer steps in total.
    pub steps: usize,
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// AdamW weight decay.
    pub weight_decay: f32,
    /// Clip the gradients to this global L2 norm over all parameters (`None` = off).
    #[serde(default)]
    pub grad_clip: Option<f32>,
    /// Seed of the data order.
    pub seed: u64,
    /// Report the loss every this many steps.
    pub log_every: usize,
    /// Save a checkpoint every this many steps (and at the end) when a folder is given.
    pub save_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            schedule: LrSchedule::Cosine,
            min_lr_ratio: 0.1,
            warmup_steps: 20,
            steps: 200,
            batch_size: 8,
            grad_accum: 1,
            weight_decay: 0.01,
            grad_clip: None,
            seed: 0,
            log_every: 10,
            save_every: 100,
        }
    }
}

macro_rules! setter {
    ($name:ident, $field:ident, $ty:ty) => {
        /// Sets the field of the same name.
        pub fn $name(mut self, v: $ty) -> Self {
            self.$field = v;
            self
        }
    };
}

impl TrainConfig {
    /// The reference's settings for continuing a pretrained model (pangjh3/AnLLM's training
    /// script): lr 2e-5, constant after 20 warm-up steps, weight decay 0, gradients clipped to
    /// global norm 1.0. A from-scratch lr such as 1e-3 would wreck a pretrained model.
    pub fn pretrained() -> Self {
        Self {
            lr: 2e-5,
            schedule: LrSchedule::Constant,
            warmup_steps: 20,
            weight_decay: 0.0,
            grad_clip: Some(1.0),
            ..Self::default()
        }
    }

    setter!(with_lr, lr, f64);
    setter!(with_schedule, schedule, LrSchedule);
    setter!(with_grad_clip, grad_clip, Option<f32>);
    setter!(with_min_lr_ratio, min_lr_ratio, f64);
    setter!(with_warmup_steps, warmup_steps, usize);
    setter!(with_steps, steps, usize);
    setter!(with_batch_size, batch_size, usize);
    setter!(with_grad_accum, grad_accum, usize);
    setter!(with_weight_decay, weight_decay, f32);
    setter!(with_seed, seed, u64);
    setter!(with_log_every, log_every, usize);
    setter!(with_save_every, save_every, usize);

    /// Learning rate of optimizer step `step` (0-based): linear warm-up, then the schedule.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if self.schedule == LrSchedule::Constant {
            return self.lr;
        }
        let span = (self.steps - self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let min = self.lr * self.min_lr_ratio;
        min + (self.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }

    fn check(&self) -> Result<()> {
        if self.batch_size == 0 || self.grad_accum == 0 || self.steps == 0 {
            return Err(AnchorError::arg(
                "train config",
                "batch size, gradient accumulation and steps must be positive",
            ));
        }
        if self.lr.is_nan() || self.lr <= 0.0 {
            return Err(AnchorError::arg(
                "learning_rate",
                "the learning rate must be positive",
            ));
        }
        Ok(())
    }
}

/// What training did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// `(step, mean loss of that step)` for every optimizer step run, resumed ones included.
    pub losses: Vec<(usize, f32)>,
    /// Steps done.
    pub step: usize,
}

type Adam<B> = OptimizerAdaptor<AdamW, Llama<B>, B>;

fn recorder() -> NamedMpkFileRecorder<FullPrecisionSettings> {
    NamedMpkFileRecorder::new()
}

struct Paths {
    model: PathBuf,
    optim: PathBuf,
    state: PathBuf,
}

fn paths(dir: &Path) -> Paths {
    Paths {
        model: dir.join("train_model"),
        optim: dir.join("train_optim"),
        state: dir.join("train_state.json"),
    }
}

/// Mean next-token cross-entropy of a batch of rows (padding and the first token excluded),
/// under the AnSAN mask when `anchors` is given, else causal. Works on any backend; under
/// `Autodiff` it is the training loss.
pub fn batch_loss<B: Backend>(
    model: &Llama<B>,
    rows: &[Vec<u32>],
    anchors: Option<&AnchorSet>,
    device: &B::Device,
) -> Result<Tensor<B, 1>> {
    let seg = Segments::from_rows(rows, anchors, 0);
    let (batch, len) = (seg.batch, seg.len);
    if batch == 0 || len < 2 {
        return Err(AnchorError::arg(
            "batch",
            "a batch needs rows of at least 2 tokens",
        ));
    }
    let mut ids = Vec::with_capacity(batch * len);
    for row in rows {
        ids.extend(row.iter().map(|&t| t as i64));
        ids.extend(std::iter::repeat_n(0i64, len - row.len()));
    }
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, len]), device);
    let positions = Tensor::<B, 1, Int>::arange(0..len as i64, device)
        .reshape([1, len])
        .repeat_dim(0, batch);
    let logits = model.forward_masked(tokens.clone(), positions, Some(seg.mask(device)), None)?;
    let vocab = logits.dims()[2];
    let logp = log_softmax(logits.narrow(1, 0, len - 1), 2);
    let targets = tokens.narrow(1, 1, len - 1).reshape([batch, len - 1, 1]);
    let picked = logp.gather(2, targets).reshape([batch, len - 1]);
    let weights: Vec<f32> = (0..batch)
        .flat_map(|r| (1..len).map(move |t| (r, t)))
        .map(|(r, t)| seg.valid[r * len + t] as u8 as f32)
        .collect();
    let count: f32 = weights.iter().sum();
    let weights = Tensor::<B, 2>::from_data(TensorData::new(weights, [batch, len - 1]), device);
    let _ = vocab;
    Ok((picked * weights).sum().neg() / count.max(1.0))
}

/// Trains `model` on `corpus` for `config.steps` optimizer steps (AnSAN mask when `anchors` is
/// given, causal otherwise). With `checkpoint` the model, the optimizer state and the step are
/// saved there every `save_every` steps and at the end; with `resume` training continues from
/// the checkpoint found there, exactly (the batch order depends only on the step and the seed).
/// `on_log(step, loss, lr)` is called every `log_every` steps.
pub fn train<B: AutodiffBackend>(
    model: Llama<B>,
    corpus: &Corpus,
    anchors: Option<&AnchorSet>,
    config: &TrainConfig,
    checkpoint: Option<&Path>,
    resume: bool,
    on_log: impl FnMut(usize, f32, f64),
) -> Result<(Llama<B>, TrainReport)> {
    train_steps(
        model,
        corpus,
        anchors,
        config,
        checkpoint,
        resume,
        config.steps,
        on_log,
    )
}

/// [`train`], but stops (saving a checkpoint when a folder is given) once `stop` steps are
/// done, as an interrupted run would; the schedule is still that of `config.steps`.
#[allow(clippy::too_many_arguments)]
pub fn train_steps<B: AutodiffBackend>(
    model: Llama<B>,
    corpus: &Corpus,
    anchors: Option<&AnchorSet>,
    config: &TrainConfig,
    checkpoint: Option<&Path>,
    resume: bool,
    stop: usize,
    mut on_log: impl FnMut(usize, f32, f64),
) -> Result<(Llama<B>, TrainReport)> {
    config.check()?;
    let stop = stop.min(config.steps);
    if corpus.rows.is_empty() {
        return Err(AnchorError::arg("corpus", "the training corpus is empty"));
    }
    let device = kiln_core::CausalLm::device(&model);
    let mut model = model;
    let mut optim: Adam<B> = AdamWConfig::new()
        .with_weight_decay(config.weight_decay)
        .init();
    let mut report = TrainReport::default();
    if resume {
        let dir = checkpoint
            .ok_or_else(|| AnchorError::arg("checkpoint", "resume needs a checkpoint folder"))?;
        let p = paths(dir);
        let state = std::fs::read_to_string(&p.state).map_err(|e| AnchorError::io(&p.state, e))?;
        report = serde_json::from_str(&state).map_err(|e| AnchorError::io(&p.state, e))?;
        model = model
            .load_file(&p.model, &recorder(), &device)
            .map_err(|e| AnchorError::io(&p.model, e))?;
        let record = recorder()
            .load(p.optim.clone(), &device)
            .map_err(|e| AnchorError::io(&p.optim, e))?;
        optim = optim.load_record(record);
    }

    let n = corpus.rows.len();
    let mut orders: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut example = |global: usize| -> &Vec<u32> {
        let epoch = global / n;
        let order = orders.entry(epoch).or_insert_with(|| {
            let mut order: Vec<usize> = (0..n).collect();
            let mut rng =
                rand::rngs::StdRng::seed_from_u64(config.seed.wrapping_add(epoch as u64 * 7919));
            order.shuffle(&mut rng);
            order
        });
        &corpus.rows[order[global % n]]
    };

    while report.step < stop {
        let step = report.step;
        let mut accum = GradientsAccumulator::<Llama<B>>::new();
        let mut loss_sum = 0.0f32;
        for micro in 0..config.grad_accum {
            let first = (step * config.grad_accum + micro) * config.batch_size;
            let rows: Vec<Vec<u32>> = (first..first + config.batch_size)
                .map(|g| example(g).clone())
                .collect();
            let loss = batch_loss(&model, &rows, anchors, &device)?;
            loss_sum += loss.clone().into_scalar().elem::<f32>();
            let grads = (loss / config.grad_accum as f32).backward();
            accum.accumulate(&model, GradientsParams::from_grads(grads, &model));
        }
        let lr = config.lr_at(step);
        let grads = match config.grad_clip {
            Some(max) => kiln_core::grad_clip::clip_grad_norm(&model, accum.grads(), max as f64).0,
            None => accum.grads(),
        };
        model = optim.step(lr, model, grads);
        let loss = loss_sum / config.grad_accum as f32;
        report.losses.push((step, loss));
        report.step += 1;
        if config.log_every > 0
            && (report.step % config.log_every == 0 || report.step == config.steps)
        {
            on_log(report.step, loss, lr);
        }
        let save = config.save_every > 0 && report.step % config.save_every == 0;
        if let Some(dir) = checkpoint
            && (save || report.step == stop)
        {
            save_state(dir, &model, &optim, &report)?;
        }
    }
    Ok((model, report))
}

fn save_state<B: AutodiffBackend>(
    dir: &Path,
    model: &Llama<B>,
    optim: &Adam<B>,
    report: &TrainReport,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| AnchorError::io(dir, e))?;
    let p = paths(dir);
    model
        .clone()
        .save_file(&p.model, &recorder())
        .map_err(|e| AnchorError::io(&p.model, e))?;
    recorder()
        .record(optim.to_record(), p.optim.clone())
        .map_err(|e| AnchorError::io(&p.optim, e))?;
    let state = serde_json::to_string(report).unwrap_or_default();
    std::fs::write(&p.state, state).map_err(|e| AnchorError::io(&p.state, e))
}

/// The trained model without autodiff.
pub fn inference_model<B: AutodiffBackend>(model: &Llama<B>) -> Llama<B::InnerBackend> {
    model.valid()
}

#[cfg(test)]
mod schedule_tests {
    use super::*;

    /// The reference's `constant_with_warmup`: linear to 2e-5 over 20 steps, then flat.
    #[test]
    fn pretrained_recipe_is_constant_after_warmup() {
        let c = TrainConfig::pretrained().with_steps(1000);
        assert_eq!((c.weight_decay, c.grad_clip), (0.0, Some(1.0)));
        assert!((c.lr_at(0) - 2e-5 / 20.0).abs() < 1e-15);
        assert!((c.lr_at(19) - 2e-5).abs() < 1e-15);
        assert_eq!(c.lr_at(20), 2e-5);
        assert_eq!(c.lr_at(999), 2e-5);
        // The from-scratch default still decays.
        let d = TrainConfig::default().with_steps(1000);
        assert!(d.lr_at(999) < d.lr * 0.2);
    }
}
