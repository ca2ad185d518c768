//! Multi-task training (`predict:` → label, `explain:` → rationale) and the label-only
//! baselines, on Burn autodiff.
//!
//! The loop is written out here rather than run through burn-train's `Learner`: the Learner
//! validates and checkpoints per epoch and resumes at epoch boundaries, while this method needs
//! evaluation every N *steps* (generation-based accuracy, not only a loss) and a resume that
//! continues bit-for-bit mid-epoch. Everything else is Burn's: `AdamW` (`burn::optim`),
//! `GradientsAccumulator`, gradient clipping, and the file recorders for model and optimizer
//! state.

use std::io::Write;
use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::record::{DefaultRecorder, Recorder};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use kiln_core::Tokenizer;
use kiln_core::seq2seq::Seq2SeqLm;
use kiln_t5::{T5, T5Activation, T5Config};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::DistillError;
use crate::data::Example;
use crate::nodes::NodeConfig;

/// What the student learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Labels and rationales, told apart by the `predict: ` / `explain: ` prefixes.
    StepByStep,
    /// Labels only, input without prefix (standard fine-tuning or standard distillation).
    Standard,
}

/// Which labels the student is trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LabelSource {
    /// The dataset's human labels (standard fine-tuning).
    Gold,
    /// The teacher LLM's labels (standard distillation; the paper's step-by-step runs on LLM
    /// labels when no gold labels are assumed).
    Llm,
}

/// The input the model sees for the label task.
pub fn predict_input(mode: Mode, input: &str) -> String {
    match mode {
        Mode::StepByStep => format!("predict: {input}"),
        Mode::Standard => input.to_string(),
    }
}

/// The input the model sees for the rationale task.
pub fn explain_input(input: &str) -> String {
    format!("explain: {input}")
}

/// Training hyper-parameters (builder style; saved in checkpoints).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Multi-task or label-only.
    pub mode: Mode,
    /// Gold or LLM labels.
    pub label_source: LabelSource,
    /// Weight of the label loss: `α·CE(label) + (1−α)·CE(rationale)`.
    pub alpha: f64,
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per micro-batch (each gives two sequences in step-by-step mode).
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps, then linear decay to 0 at `steps`.
    pub warmup_steps: usize,
    /// AdamW decoupled weight decay.
    pub weight_decay: f32,
    /// AdamW epsilon.
    #[serde(default = "default_adam_eps")]
    pub adam_eps: f32,
    /// Clip the gradients to this global L2 norm, over all parameters together as PyTorch's
    /// `clip_grad_norm_` (`None` = off).
    pub grad_clip: Option<f32>,
    /// Input tokens kept (EOS included).
    pub max_input_len: usize,
    /// Target tokens kept (EOS included).
    pub max_target_len: usize,
    /// Seed of the data order.
    pub seed: u64,
}

fn default_adam_eps() -> f32 {
    1e-8
}

/// The reference's recipe (google-research/distilling-step-by-step `run.py` and its HF
/// `Seq2SeqTrainingArguments`): AdamW lr 5e-5, weight decay 0, eps 1e-8, no warm-up, linear
/// decay, global-norm clip 1.0, batch 64, 10,000 steps, gold labels, α = 0.5, inputs up to 1024
/// tokens and targets up to 256.
impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            mode: Mode::StepByStep,
            label_source: LabelSource::Gold,
            alpha: 0.5,
            steps: 10_000,
            batch_size: 64,
            grad_accum: 1,
            lr: 5e-5,
            warmup_steps: 0,
            weight_decay: 0.0,
            adam_eps: 1e-8,
            grad_clip: Some(1.0),
            max_input_len: 1024,
            max_target_len: 256,
            seed: 0,
        }
    }
}

impl TrainConfig {
    with!(mode: Mode, label_source: LabelSource, alpha: f64, steps: usize, batch_size: usize,
          grad_accum: usize, lr: f64, warmup_steps: usize, weight_decay: f32, adam_eps: f32,
          grad_clip: Option<f32>, max_input_len: usize, max_target_len: usize, seed: u64);

    /// Checks the values.
    pub fn validate(&self) -> Result<(), DistillError> {
        let bad = |m: &str| Err(DistillError::arg("train config", m));
        if !(0.0..=1.0).contains(&self.alpha) {
            return bad("alpha must be in [0, 1]");
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad("batch size and gradient accumulation must be positive");
        }
        if self.max_input_len < 2 || self.max_target_len < 2 {
            return bad("max input/target lengths must be at least 2");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("learning rate must be positive");
        }
        Ok(())
    }

    /// Learning rate at optimizer step `step` (0-based): linear warmup to `lr`, then linear
    /// decay to zero at `steps`. A pure function of the step, so resuming needs no scheduler
    /// state.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let left = self.steps.saturating_sub(step) as f64;
        let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
        self.lr * (left / span).clamp(0.0, 1.0)
    }
}

/// One tokenized example: the label task and (in step-by-step mode) the rationale task.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// Label-task input ids.
    pub pred_input: Vec<u32>,
    /// Label ids (EOS-terminated).
    pub label: Vec<u32>,
    /// Rationale-task input ids (empty in standard mode).
    pub expl_input: Vec<u32>,
    /// Rationale ids (empty in standard mode).
    pub rationale: Vec<u32>,
}

pub(crate) fn encode_text(
    tokenizer: &Tokenizer,
    text: &str,
    max: usize,
    eos: u32,
) -> Result<Vec<u32>, DistillError> {
    // As HF `truncation=True`: cut the text, then append EOS.
    let mut ids = tokenizer.encode(text, false)?;
    ids.truncate(max - 1);
    ids.push(eos);
    Ok(ids)
}

/// Tokenizes `examples` for `config`. Examples lacking what the mode needs (an LLM label for
/// `--label-source llm`, a rationale for step-by-step) are dropped; the count is returned.
pub fn encode_examples(
    tokenizer: &Tokenizer,
    examples: &[Example],
    config: &TrainConfig,
    eos: u32,
) -> Result<(Vec<Encoded>, usize), DistillError> {
    let mut out = Vec::with_capacity(examples.len());
    let mut dropped = 0;
    for e in examples {
        let label = match config.label_source {
            LabelSource::Gold => Some(&e.label),
            LabelSource::Llm => e.llm_label.as_ref(),
        };
        let rationale = match config.mode {
            Mode::StepByStep => e.rationale.as_ref().map(Some),
            Mode::Standard => Some(None),
        };
        let (Some(label), Some(rationale)) = (label, rationale) else {
            dropped += 1;
            continue;
        };
        let (expl_input, rationale) = match rationale {
            Some(r) => (
                encode_text(
                    tokenizer,
                    &explain_input(&e.input),
                    config.max_input_len,
                    eos,
                )?,
                encode_text(tokenizer, r, config.max_target_len, eos)?,
            ),
            None => (Vec::new(), Vec::new()),
        };
        out.push(Encoded {
            pred_input: encode_text(
                tokenizer,
                &predict_input(config.mode, &e.input),
                config.max_input_len,
                eos,
            )?,
            label: encode_text(tokenizer, label, config.max_target_len, eos)?,
            expl_input,
            rationale,
        });
    }
    Ok((out, dropped))
}

/// A padded batch of one task: encoder input, teacher-forced decoder input and targets.
#[derive(Debug, Clone)]
pub struct TaskBatch<B: Backend> {
    /// `[batch, src]` input ids, right-padded.
    pub input: Tensor<B, 2, Int>,
    /// `[batch, src]`, `true` on padding (`None` when no row is padded).
    pub padding: Option<Tensor<B, 2, Bool>>,
    /// `[batch, tgt]`: the decoder start token, then the targets shifted right.
    pub decoder_input: Tensor<B, 2, Int>,
    /// `[batch, tgt]` target ids (padding positions hold the pad id).
    pub targets: Tensor<B, 2, Int>,
    /// `[batch, tgt]`, 1.0 on real target tokens and 0.0 on padding.
    pub target_mask: Tensor<B, 2>,
}

/// Pads `(input, target)` pairs into a [`TaskBatch`].
pub fn make_batch<B: Backend>(
    pairs: &[(&[u32], &[u32])],
    pad: u32,
    decoder_start: u32,
    device: &B::Device,
) -> TaskBatch<B> {
    let b = pairs.len();
    let src = pairs.iter().map(|p| p.0.len()).max().unwrap_or(1).max(1);
    let tgt = pairs.iter().map(|p| p.1.len()).max().unwrap_or(1).max(1);
    let mut input = Vec::with_capacity(b * src);
    let mut padding = Vec::with_capacity(b * src);
    let mut dec = Vec::with_capacity(b * tgt);
    let mut targets = Vec::with_capacity(b * tgt);
    let mut mask = Vec::with_capacity(b * tgt);
    for (inp, t) in pairs {
        for i in 0..src {
            input.push(inp.get(i).copied().unwrap_or(pad) as i64);
            padding.push(i >= inp.len());
        }
        for i in 0..tgt {
            dec.push(if i == 0 {
                decoder_start
            } else {
                t.get(i - 1).copied().unwrap_or(pad)
            } as i64);
            targets.push(t.get(i).copied().unwrap_or(pad) as i64);
            mask.push(if i < t.len() { 1.0f32 } else { 0.0 });
        }
    }
    let any_pad = padding.iter().any(|&p| p);
    TaskBatch {
        input: Tensor::from_data(TensorData::new(input, [b, src]), device),
        padding: any_pad.then(|| Tensor::from_data(TensorData::new(padding, [b, src]), device)),
        decoder_input: Tensor::from_data(TensorData::new(dec, [b, tgt]), device),
        targets: Tensor::from_data(TensorData::new(targets, [b, tgt]), device),
        target_mask: Tensor::from_data(TensorData::new(mask, [b, tgt]), device),
    }
}

/// Teacher-forced logits `[batch, tgt, vocab]`: the encoder over the padded input, then the
/// whole decoder input in one causal pass (kiln-t5's `decode_step` on a fresh cache).
pub fn forward_logits<B: Backend>(model: &T5<B>, batch: &TaskBatch<B>) -> Tensor<B, 3> {
    let encoder = model.encode(batch.input.clone(), batch.padding.clone());
    let mut cache = model.new_decoder_cache(&encoder);
    model.decode_step(batch.decoder_input.clone(), &mut cache)
}

/// Token-level cross-entropy averaged over the real target tokens (HF's loss with `-100`
/// labels on padding).
pub fn sequence_cross_entropy<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let logp = log_softmax(logits, 2);
    let picked: Tensor<B, 2> = logp.gather(2, targets.unsqueeze_dim(2)).squeeze_dim(2);
    let total = (picked * mask.clone()).sum();
    total.neg() / mask.sum().clamp_min(1.0)
}

/// Cross-entropy of one task batch.
pub fn task_loss<B: Backend>(model: &T5<B>, batch: &TaskBatch<B>) -> Tensor<B, 1> {
    sequence_cross_entropy(
        forward_logits(model, batch),
        batch.targets.clone(),
        batch.target_mask.clone(),
    )
}

/// Losses of one step.
#[derive(Debug, Clone)]
pub struct StepLoss<B: Backend> {
    /// The optimised loss: `α·label + (1−α)·rationale`, or `label` when label-only.
    pub total: Tensor<B, 1>,
    /// CE on the labels.
    pub label: Tensor<B, 1>,
    /// CE on the rationales (step-by-step only).
    pub rationale: Option<Tensor<B, 1>>,
}

/// The paper's multi-task loss (`TaskPrefixTrainer.compute_loss`): two separate forward passes,
/// `α·CE(label) + (1−α)·CE(rationale)`; label-only when `expl` is `None`.
pub fn multitask_loss<B: Backend>(
    model: &T5<B>,
    pred: &TaskBatch<B>,
    expl: Option<&TaskBatch<B>>,
    alpha: f64,
) -> StepLoss<B> {
    let label = task_loss(model, pred);
    match expl {
        Some(expl) => {
            let rationale = task_loss(model, expl);
            StepLoss {
                total: label.clone() * alpha + rationale.clone() * (1.0 - alpha),
                label,
                rationale: Some(rationale),
            }
        }
        None => StepLoss {
            total: label.clone(),
            label,
            rationale: None,
        },
    }
}

/// Metrics of one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// The step just taken (1-based count of steps done).
    pub step: usize,
    /// Learning rate used.
    pub lr: f64,
    /// Mean total loss over the micro-batches.
    pub loss: f64,
    /// Mean label CE.
    pub label_loss: f64,
    /// Mean rationale CE (step-by-step only).
    pub rationale_loss: Option<f64>,
}

/// What a checkpoint's `state.json` holds besides weights and optimizer moments.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// The hyper-parameters.
    pub config: TrainConfig,
    /// Free-form description of the data (for `eval` defaults and reports).
    pub data: serde_json::Value,
}

/// How [`Trainer::with_parallel`] shares each step out over several devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataParallel {
    /// One model and optimizer on the main device. Each round of micro-batches forks the model
    /// to the other devices, and their gradients are moved back and summed before one AdamW
    /// step: burn-train's multi-device strategy (`MultiDeviceOptim::OptimMainDevice`).
    #[default]
    MainDevice,
    /// Distributed data parallel through burn-collective: one replica and one optimizer per
    /// device, each device's gradients summed over all devices by `GradientsParams::all_reduce`
    /// and every replica stepping itself. No weights move between devices after the start.
    /// Needs `grad_accum` to be a multiple of the device count (every peer takes part in each
    /// all-reduce).
    Collective,
}

type Adam<B> = OptimizerAdaptor<AdamW, T5<B>, B>;

/// What one device's thread of a collective step hands back: its stepped replica, its optimizer
/// and its summed losses, or why it failed.
type PeerResult<B> = Result<(T5<B>, Adam<B>, [f64; 3]), String>;

/// The T5 model, its AdamW state and the position in the data: everything a resume needs.
pub struct Trainer<B: AutodiffBackend> {
    /// The model being trained (device 0's replica under [`DataParallel::Collective`]).
    pub model: T5<B>,
    optim: Adam<B>,
    /// Optimizer steps done.
    pub step: usize,
    /// Hyper-parameters.
    pub config: TrainConfig,
    data: Vec<Encoded>,
    order: Option<(usize, Vec<usize>)>,
    devices: Vec<B::Device>,
    parallel: DataParallel,
    /// Devices 1.. under [`DataParallel::Collective`]: their replicas and optimizers.
    replicas: Vec<(T5<B>, Adam<B>)>,
    /// Set by [`Trainer::with_nodes`]: this node's part in a multi-node run, joined (its local
    /// peers registered with burn-collective) until [`Trainer::leave`].
    nodes: Option<Joined<B::InnerBackend>>,
}

impl<B: AutodiffBackend> Trainer<B> {
    /// A trainer at step 0.
    pub fn new(
        model: T5<B>,
        config: TrainConfig,
        data: Vec<Encoded>,
    ) -> Result<Self, DistillError> {
        config.validate()?;
        if data.is_empty() {
            return Err(DistillError::arg("train data", "no training examples left"));
        }
        if config.mode == Mode::StepByStep && data.iter().any(|e| e.rationale.is_empty()) {
            return Err(DistillError::arg(
                "train data",
                "step-by-step training needs a rationale for every example",
            ));
        }
        let optim = Self::optimizer_config(&config).init();
        let devices = vec![model.device()];
        Ok(Self {
            model,
            optim,
            step: 0,
            config,
            data,
            order: None,
            devices,
            parallel: DataParallel::MainDevice,
            replicas: Vec::new(),
            nodes: None,
        })
    }

    /// Data-parallel training over `devices` (the first is the main device, where the model and
    /// optimizer live): the `grad_accum` micro-batches of each step are dealt round-robin to the
    /// devices, each runs forward/backward on its own fork of the model in its own thread, and
    /// the gradients are moved to the main device and summed before one AdamW step, as
    /// burn-train's multi-device strategy does (`Module::fork`, `GradientsParams::to_device`).
    /// The result equals single-device training with the same `grad_accum` up to float
    /// summation order. Set `grad_accum` to a multiple of the device count to keep all busy.
    pub fn with_devices(self, devices: Vec<B::Device>) -> Result<Self, DistillError> {
        self.with_parallel(devices, DataParallel::MainDevice)
    }

    /// Data-parallel training over `devices` with the given scheme; see [`DataParallel`]. Call
    /// it after [`resume`](Self::resume), not before: replicas start from the current model
    /// and optimizer state.
    pub fn with_parallel(
        mut self,
        devices: Vec<B::Device>,
        parallel: DataParallel,
    ) -> Result<Self, DistillError> {
        if devices.is_empty() {
            return Err(DistillError::arg("devices", "no devices given"));
        }
        if parallel == DataParallel::Collective
            && !self.config.grad_accum.is_multiple_of(devices.len())
        {
            return Err(DistillError::arg(
                "grad_accum",
                format!(
                    "collective data parallel needs grad_accum ({}) to be a multiple of the {} devices",
                    self.config.grad_accum,
                    devices.len()
                ),
            ));
        }
        self.model = self.model.fork(&devices[0]);
        self.replicas = match parallel {
            DataParallel::MainDevice => Vec::new(),
            // The optimizer moves its state to each gradient's device on the first step.
            DataParallel::Collective => devices[1..]
                .iter()
                .map(|d| (self.model.clone().fork(d), self.optim.clone()))
                .collect(),
        };
        self.devices = devices;
        self.parallel = parallel;
        Ok(self)
    }

    /// Distributed data parallel over several nodes (machines), each running this on its own
    /// `devices`: burn-collective's [`DataParallel::Collective`] with its global level (see
    /// [`crate::nodes`]). Blocks until every node has joined through the orchestrator (or
    /// `nodes.join_timeout` passes), then copies rank 0's weights to every replica, as DDP
    /// broadcasts rank 0's at the start. Every node must run the same configuration and data;
    /// `grad_accum` must be a multiple of `nodes × devices_per_node`. Call it after
    /// [`resume`](Self::resume) (every node resumes its own checkpoint of the same step).
    ///
    /// A timed-out join leaves its registering threads blocked: end the process.
    pub fn with_nodes(
        mut self,
        devices: Vec<B::Device>,
        nodes: NodeConfig,
    ) -> Result<Self, DistillError> {
        nodes.validate()?;
        if devices.len() != nodes.devices_per_node {
            return Err(DistillError::arg(
                "devices",
                format!(
                    "{} devices given for devices_per_node = {}",
                    devices.len(),
                    nodes.devices_per_node
                ),
            ));
        }
        let global = nodes.global_devices();
        if !self.config.grad_accum.is_multiple_of(global) {
            return Err(DistillError::arg(
                "grad_accum",
                format!(
                    "multi-node training needs grad_accum ({}) to be a multiple of the {global} \
                     devices of all nodes ({} nodes × {})",
                    self.config.grad_accum, nodes.nodes, nodes.devices_per_node
                ),
            ));
        }
        let config = nodes.collective_config()?;
        self = self.with_parallel(devices, DataParallel::Collective)?;
        join::<B>(&self.devices, &nodes, config)?;
        self.nodes = Some(Joined {
            nodes,
            left: false,
            _backend: std::marker::PhantomData,
        });
        self.broadcast_rank0_weights()?;
        Ok(self)
    }

    /// Leaves a multi-node run (unregisters this node's peers; the last one closes the
    /// connection to the orchestrator). Dropping the trainer does it too; a no-op otherwise.
    pub fn leave(&mut self) -> Result<(), DistillError> {
        match self.nodes.take() {
            Some(mut joined) => joined.leave(),
            None => Ok(()),
        }
    }

    /// Sets every replica on every node to rank 0's device-0 weights: one all-reduce in which
    /// every other peer adds zeros, so the sum is exactly rank 0's values.
    fn broadcast_rank0_weights(&mut self) -> Result<(), DistillError> {
        let nodes = self
            .nodes
            .as_ref()
            .expect("called after joining")
            .nodes
            .clone();
        let mut replicas = vec![self.model.clone()];
        replicas.extend(self.replicas.iter().map(|(m, _)| m.clone()));
        let results: Vec<Result<T5<B>, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = replicas
                .into_iter()
                .zip(&self.devices)
                .enumerate()
                .map(|(d, (model, device))| {
                    let peer = nodes.global_peer(d);
                    s.spawn(move || {
                        let mut flat = Flatten::<B>::new();
                        model.visit(&mut flat);
                        let values = flat.cat(device);
                        let mine = if peer == 0 {
                            values
                        } else {
                            values.zeros_like()
                        };
                        let sum = all_reduce_sum::<B>(peer, mine)
                            .map_err(|e| format!("weights of device {d}: {e}"))?;
                        Ok(model.map(&mut Unflatten::<B>::weights(sum)))
                    })
                })
                .collect();
            join_all(handles)
        });
        let mut models = Vec::with_capacity(results.len());
        for r in results {
            models.push(r.map_err(|e| DistillError::Training(format!("joining: {e}")))?);
        }
        let mut models = models.into_iter();
        self.model = models.next().expect("device 0");
        for ((m, _), new) in self.replicas.iter_mut().zip(models) {
            *m = new;
        }
        Ok(())
    }

    /// AdamW without Burn's per-tensor clipping: [`clip`] clips globally before each step.
    fn optimizer_config(config: &TrainConfig) -> AdamWConfig {
        AdamWConfig::new()
            .with_weight_decay(config.weight_decay)
            .with_epsilon(config.adam_eps)
    }

    fn batches_per_epoch(&self) -> usize {
        self.data.len().div_ceil(self.config.batch_size)
    }

    /// The example indices of global micro-batch `m`: epochs are seeded permutations of the
    /// data, so the order depends only on `(seed, m)` and a resume sees the same batches.
    pub fn micro_batch(&mut self, m: usize) -> Vec<usize> {
        let per = self.batches_per_epoch();
        let (epoch, k) = (m / per, m % per);
        if self.order.as_ref().is_none_or(|o| o.0 != epoch) {
            let mut idx: Vec<usize> = (0..self.data.len()).collect();
            let seed = self
                .config
                .seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(epoch as u64);
            idx.shuffle(&mut StdRng::seed_from_u64(seed));
            self.order = Some((epoch, idx));
        }
        let order = &self.order.as_ref().expect("set above").1;
        let bs = self.config.batch_size;
        order[k * bs..((k + 1) * bs).min(order.len())].to_vec()
    }

    /// One optimizer step over `grad_accum` micro-batches (gradients summed, each loss scaled
    /// by `1/grad_accum`, so the step sees the mean).
    pub fn train_step(&mut self) -> Result<StepMetrics, DistillError> {
        let lr = self.config.lr_at(self.step);
        let accum_n = self.config.grad_accum;
        let micro: Vec<Vec<usize>> = (0..accum_n)
            .map(|a| self.micro_batch(self.step * accum_n + a))
            .collect();
        let [loss_sum, label_sum, rat_sum] = match self.parallel {
            DataParallel::MainDevice => self.main_device_step(&micro, lr),
            DataParallel::Collective => self.collective_step(&micro, lr)?,
        };
        self.step += 1;
        let n = accum_n as f64;
        Ok(StepMetrics {
            step: self.step,
            lr,
            loss: loss_sum / n,
            label_loss: label_sum / n,
            rationale_loss: (self.config.mode == Mode::StepByStep).then_some(rat_sum / n),
        })
    }

    /// [`DataParallel::MainDevice`]: returns the summed total, label and rationale losses.
    fn main_device_step(&mut self, micro: &[Vec<usize>], lr: f64) -> [f64; 3] {
        let accum_n = self.config.grad_accum;
        let mut accumulator = GradientsAccumulator::<T5<B>>::new();
        let (mut loss_sum, mut label_sum, mut rat_sum) = (0.0, 0.0, 0.0);
        let main = self.devices[0].clone();
        // Micro-batches in rounds of one per device; gradients are accumulated in micro-batch
        // order so one device reproduces the plain loop exactly.
        for round in micro.chunks(self.devices.len()) {
            let (data, mode, alpha) = (&self.data[..], self.config.mode, self.config.alpha);
            let results: Vec<(GradientsParams, [f64; 3])> = if round.len() == 1 {
                let model = self.model.clone();
                vec![micro_step(
                    model, data, &round[0], &main, mode, alpha, accum_n,
                )]
            } else {
                std::thread::scope(|s| {
                    let handles: Vec<_> = round
                        .iter()
                        .zip(&self.devices)
                        .enumerate()
                        .map(|(i, (idx, dev))| {
                            // Every thread but the first gets a fork, even on the main device:
                            // clones share their parameters' autodiff leaves, and two backward
                            // passes over shared leaves at once made gradients nondeterministic.
                            let model = if i == 0 {
                                self.model.clone()
                            } else {
                                self.model.clone().fork(dev)
                            };
                            s.spawn(move || micro_step(model, data, idx, dev, mode, alpha, accum_n))
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().expect("training thread panicked"))
                        .collect()
                })
            };
            for (grads, [l, lab, rat]) in results {
                loss_sum += l;
                label_sum += lab;
                rat_sum += rat;
                accumulator.accumulate(&self.model, grads.to_device(&main, &self.model));
            }
        }
        let model = self.model.clone();
        let grads = clip(&model, accumulator.grads(), self.config.grad_clip);
        self.model = self.optim.step(lr, model, grads);
        [loss_sum, label_sum, rat_sum]
    }

    /// [`DataParallel::Collective`]: global peer `g` of `G` (the devices of all nodes) takes
    /// micro-batches `g, g + G, …`, accumulates their gradients, sums them and its losses with
    /// every other peer through burn-collective in one all-reduce, and steps its own replica.
    /// Returns the losses summed over all peers.
    fn collective_step(&mut self, micro: &[Vec<usize>], lr: f64) -> Result<[f64; 3], DistillError> {
        use burn::collective::{
            CollectiveConfig, PeerId, finish_collective, register, reset_collective,
        };
        // The collective server is one per backend type and process: one step at a time.
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.devices.len();
        if self.replicas.len() + 1 != n {
            return Err(DistillError::Training(
                "an earlier collective step failed and took the other devices' replicas with it; \
                 resume from the last checkpoint"
                    .into(),
            ));
        }
        // Multi-node peers stay registered for the whole run (registering is a rendezvous of
        // all nodes); a single node registers for each step.
        let per_step = self.nodes.is_none();
        let (global, peer_of) = match self.nodes.as_ref().map(|j| &j.nodes) {
            Some(nodes) => (nodes.global_devices(), nodes.node_rank * n),
            None => (n, 0),
        };
        let (data, mode, alpha) = (&self.data[..], self.config.mode, self.config.alpha);
        let accum_n = self.config.grad_accum;
        let grad_clip = self.config.grad_clip;
        let mut replicas = vec![(self.model.clone(), self.optim.clone())];
        replicas.append(&mut self.replicas);
        let config = CollectiveConfig::default().with_num_devices(n);
        let results: Vec<PeerResult<B>> = std::thread::scope(|s| {
            let handles: Vec<_> = replicas
                .into_iter()
                .zip(&self.devices)
                .enumerate()
                .map(|(d, ((model, mut optim), device))| {
                    let config = config.clone();
                    let g = peer_of + d;
                    s.spawn(move || {
                        let peer = PeerId(g as u32);
                        if per_step {
                            register::<B::InnerBackend>(peer, device.clone(), config)
                                .map_err(|e| format!("registering device {d}: {e:?}"))?;
                        }
                        let mut accumulator = GradientsAccumulator::<T5<B>>::new();
                        let mut sums = [0.0; 3];
                        for idx in micro.iter().skip(g).step_by(global) {
                            let (grads, values) =
                                micro_step(model.clone(), data, idx, device, mode, alpha, accum_n);
                            accumulator.accumulate(&model, grads);
                            for (s, v) in sums.iter_mut().zip(values) {
                                *s += v;
                            }
                        }
                        let (grads, sums) =
                            all_reduce_grads(&model, accumulator.grads(), sums, g, device)
                                .map_err(|e| format!("all-reduce on device {d}: {e}"))?;
                        // After the all-reduce, so every replica clips the same summed
                        // gradients by the same factor (as DDP + clip_grad_norm_).
                        let grads = clip(&model, grads, grad_clip);
                        let model = optim.step(lr, model, grads);
                        if per_step {
                            finish_collective::<B::InnerBackend>(peer).map_err(|e| {
                                format!("leaving the collective on device {d}: {e:?}")
                            })?;
                        }
                        Ok((model, optim, sums))
                    })
                })
                .collect();
            join_all(handles)
        });
        let mut totals = None;
        let mut replicas = Vec::with_capacity(n);
        for result in results {
            match result {
                Ok((model, optim, sums)) => {
                    // Every peer holds the same all-reduced sums.
                    totals.get_or_insert(sums);
                    replicas.push((model, optim));
                }
                Err(message) => {
                    if per_step {
                        // Peers still registered would block the next step's registration.
                        reset_collective::<B::InnerBackend>();
                    }
                    return Err(DistillError::Training(format!(
                        "collective training: {message}"
                    )));
                }
            }
        }
        let mut replicas = replicas.into_iter();
        (self.model, self.optim) = replicas.next().expect("device 0");
        self.replicas = replicas.collect();
        Ok(totals.expect("at least one device"))
    }

    /// Writes a checkpoint into `dir` (created; existing files replaced): `config.json`
    /// (HF-style, readable by [`T5Config::from_file`]), `model.mpk`, `optim.mpk`, `state.json`,
    /// and `tokenizer.json` when given.
    pub fn save(
        &self,
        dir: &Path,
        data: serde_json::Value,
        tokenizer: Option<&Tokenizer>,
    ) -> Result<(), DistillError> {
        let ck = |e: String| DistillError::Checkpoint(dir.to_path_buf(), e);
        // Write next to the target, then swap, so an interrupted save leaves the old one.
        let tmp = dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| DistillError::Io(tmp.clone(), e))?;
        write_json(&tmp.join("config.json"), &config_json(self.model.config()))?;
        let recorder = DefaultRecorder::new();
        self.model
            .clone()
            .save_file(tmp.join("model"), &recorder)
            .map_err(|e| ck(e.to_string()))?;
        Recorder::<B>::record(&recorder, self.optim.to_record(), tmp.join("optim"))
            .map_err(|e| ck(e.to_string()))?;
        let state = TrainState {
            step: self.step,
            config: self.config.clone(),
            data,
        };
        write_json(
            &tmp.join("state.json"),
            &serde_json::to_value(&state).map_err(|e| ck(e.to_string()))?,
        )?;
        if let Some(t) = tokenizer {
            t.inner()
                .save(tmp.join("tokenizer.json"), false)
                .map_err(|e| ck(format!("tokenizer.json: {e}")))?;
        }
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| DistillError::Io(dir.to_path_buf(), e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| DistillError::Io(dir.to_path_buf(), e))?;
        Ok(())
    }

    /// Restores a trainer saved by [`Trainer::save`] over the same `data`: model, AdamW moments,
    /// step and data position, so training continues exactly as if uninterrupted.
    pub fn resume(
        dir: &Path,
        data: Vec<Encoded>,
        device: &B::Device,
    ) -> Result<(Self, TrainState), DistillError> {
        let ck = |e: String| DistillError::Checkpoint(dir.to_path_buf(), e);
        let (model, state) = load_checkpoint::<B>(dir, device)?;
        let mut trainer = Self::new(model, state.config.clone(), data)?;
        let record = Recorder::<B>::load(&DefaultRecorder::new(), dir.join("optim"), device)
            .map_err(|e| ck(e.to_string()))?;
        trainer.optim = trainer.optim.load_record(record);
        trainer.step = state.step;
        Ok((trainer, state))
    }

    /// The model without autodiff, for evaluation.
    pub fn inference_model(&self) -> T5<B::InnerBackend> {
        self.model.valid()
    }
}

/// The padded label-task batch and (step-by-step) rationale-task batch of examples `idx`.
fn batches<B: Backend>(
    data: &[Encoded],
    idx: &[usize],
    mode: Mode,
    pad: u32,
    start: u32,
    device: &B::Device,
) -> (TaskBatch<B>, Option<TaskBatch<B>>) {
    let pred: Vec<(&[u32], &[u32])> = idx
        .iter()
        .map(|&i| (&data[i].pred_input[..], &data[i].label[..]))
        .collect();
    let expl = (mode == Mode::StepByStep).then(|| {
        let pairs: Vec<(&[u32], &[u32])> = idx
            .iter()
            .map(|&i| (&data[i].expl_input[..], &data[i].rationale[..]))
            .collect();
        make_batch(&pairs, pad, start, device)
    });
    (make_batch(&pred, pad, start, device), expl)
}

/// Forward and backward of one micro-batch with `model` (already on `device`): gradients of
/// `loss / accum_n` and the unscaled total, label and rationale losses.
fn micro_step<B: AutodiffBackend>(
    model: T5<B>,
    data: &[Encoded],
    idx: &[usize],
    device: &B::Device,
    mode: Mode,
    alpha: f64,
    accum_n: usize,
) -> (GradientsParams, [f64; 3]) {
    let (pred, expl) = batches(
        data,
        idx,
        mode,
        model.pad_token_id(),
        model.decoder_start_token_id(),
        device,
    );
    let loss = multitask_loss(&model, &pred, expl.as_ref(), alpha);
    let values = [
        scalar(&loss.total),
        scalar(&loss.label),
        loss.rationale.as_ref().map_or(0.0, scalar),
    ];
    let grads = (loss.total / accum_n as f64).backward();
    (GradientsParams::from_grads(grads, &model), values)
}

/// Membership of a multi-node run: this node's local peers stay registered with
/// burn-collective until [`Joined::leave`] or drop.
struct Joined<IB: Backend> {
    nodes: NodeConfig,
    left: bool,
    _backend: std::marker::PhantomData<fn() -> IB>,
}

impl<IB: Backend> Joined<IB> {
    fn leave(&mut self) -> Result<(), DistillError> {
        use burn::collective::{PeerId, finish_collective};
        if std::mem::replace(&mut self.left, true) {
            return Ok(());
        }
        let nodes = self.nodes.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        // In a thread: finishing talks to the orchestrator, which may be gone.
        std::thread::spawn(move || {
            let result = (0..nodes.devices_per_node).try_for_each(|d| {
                finish_collective::<IB>(PeerId(nodes.global_peer(d) as u32))
                    .map_err(|e| format!("{e:?}"))
            });
            let _ = tx.send(result);
        });
        match rx.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(DistillError::Training(format!("leaving the run: {e}"))),
            Err(_) => Err(DistillError::Training(
                "leaving the run: no answer within 30 s".into(),
            )),
        }
    }
}

impl<IB: Backend> Drop for Joined<IB> {
    fn drop(&mut self) {
        // Nothing to report to at this point.
        let _ = self.leave();
    }
}

/// Each scoped thread's result, in spawn order; a thread that panicked gives an error.
fn join_all<T>(
    handles: Vec<std::thread::ScopedJoinHandle<'_, std::result::Result<T, String>>>,
) -> Vec<std::result::Result<T, String>> {
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| Err("training thread panicked".into()))
        })
        .collect()
}

/// Registers this node's local peers with burn-collective's global level: returns once every
/// node has registered with the orchestrator, or fails after `nodes.join_timeout`.
fn join<B: AutodiffBackend>(
    devices: &[B::Device],
    nodes: &NodeConfig,
    config: burn::collective::CollectiveConfig,
) -> Result<(), DistillError> {
    use burn::collective::{PeerId, register};
    let (tx, rx) = std::sync::mpsc::channel();
    // Plain threads, not scoped: a node that never comes would block a scope forever.
    for (d, device) in devices.iter().enumerate() {
        let (tx, device, config) = (tx.clone(), device.clone(), config.clone());
        let peer = PeerId(nodes.global_peer(d) as u32);
        std::thread::spawn(move || {
            let _ = tx.send(register::<B::InnerBackend>(peer, device, config));
        });
    }
    let deadline = std::time::Instant::now() + nodes.join_timeout;
    for _ in devices {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(DistillError::Training(format!(
                    "node {} could not join the run through {}: {e:?}",
                    nodes.node_rank, nodes.orchestrator
                )));
            }
            Err(_) => {
                return Err(DistillError::Training(format!(
                    "node {}: the {} nodes did not all join within {} s; is the orchestrator \
                     running at {}, and were all nodes started with --nodes {} and distinct \
                     --node-rank and --node-address?",
                    nodes.node_rank,
                    nodes.nodes,
                    nodes.join_timeout.as_secs(),
                    nodes.orchestrator,
                    nodes.nodes
                )));
            }
        }
    }
    Ok(())
}

/// Sums `grads` and the loss `sums` over every peer in one all-reduce of one flat vector (the
/// parameters in module order, then the three losses): one network round per step instead of
/// one per parameter, and an order that does not depend on `ParamId`s, which differ between
/// processes. A parameter without a gradient here counts as zeros.
fn all_reduce_grads<B: AutodiffBackend>(
    model: &T5<B>,
    grads: GradientsParams,
    sums: [f64; 3],
    peer: usize,
    device: &B::Device,
) -> Result<(GradientsParams, [f64; 3]), String> {
    let mut flat = Flatten::<B>::gradients(grads);
    model.visit(&mut flat);
    let losses = Tensor::<B::InnerBackend, 1>::from_floats(sums.map(|v| v as f32), device);
    flat.pieces.push(losses);
    let grads = flat.grads.take().expect("set by gradients()");
    let sum = all_reduce_sum::<B>(peer, flat.cat(device))?;
    let n = sum.dims()[0];
    let losses = sum
        .clone()
        .slice(n - 3..n)
        .into_data()
        .to_vec::<f32>()
        .map_err(|e| format!("{e:?}"))?;
    let mut unflatten = Unflatten::<B>::gradients(sum, grads);
    model.visit(&mut unflatten);
    let grads = unflatten.grads.take().expect("set by gradients()");
    Ok((grads, [0, 1, 2].map(|i| losses[i] as f64)))
}

/// burn-collective's all-reduce (sum over all peers, local then global) of one vector.
fn all_reduce_sum<B: AutodiffBackend>(
    peer: usize,
    values: Tensor<B::InnerBackend, 1>,
) -> Result<Tensor<B::InnerBackend, 1>, String> {
    use burn::collective::{PeerId, ReduceOperation, all_reduce};
    use burn::tensor::TensorPrimitive;
    let sum = all_reduce::<B::InnerBackend>(
        PeerId(peer as u32),
        values.into_primitive().tensor(),
        ReduceOperation::Sum,
    )
    .map_err(|e| format!("{e:?}"))?;
    Ok(Tensor::from_primitive(TensorPrimitive::Float(sum)))
}

/// Collects a model's float parameters (or their gradients) in module order as flat pieces.
struct Flatten<B: AutodiffBackend> {
    /// `Some`: take gradients out of these instead of the parameter values.
    grads: Option<GradientsParams>,
    pieces: Vec<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> Flatten<B> {
    fn new() -> Self {
        Self {
            grads: None,
            pieces: Vec::new(),
        }
    }

    fn gradients(grads: GradientsParams) -> Self {
        Self {
            grads: Some(grads),
            pieces: Vec::new(),
        }
    }

    fn cat(&mut self, device: &B::Device) -> Tensor<B::InnerBackend, 1> {
        match self.pieces.len() {
            0 => Tensor::zeros([0], device),
            _ => Tensor::cat(std::mem::take(&mut self.pieces), 0),
        }
    }
}

impl<B: AutodiffBackend> burn::module::ModuleVisitor<B> for Flatten<B> {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
        let value = param.val().inner();
        let n = value.shape().num_elements();
        let piece = match &mut self.grads {
            Some(grads) => grads
                .remove::<B::InnerBackend, D>(param.id)
                .unwrap_or_else(|| value.zeros_like()),
            None => value,
        };
        self.pieces.push(piece.reshape([n]));
    }
}

/// Writes a flat vector from [`Flatten`] back: as gradients, or as the parameter values.
struct Unflatten<B: AutodiffBackend> {
    flat: Tensor<B::InnerBackend, 1>,
    offset: usize,
    /// `Some`: register gradients here; `None`: replace the parameter values.
    grads: Option<GradientsParams>,
}

impl<B: AutodiffBackend> Unflatten<B> {
    fn weights(flat: Tensor<B::InnerBackend, 1>) -> Self {
        Self {
            flat,
            offset: 0,
            grads: None,
        }
    }

    fn gradients(flat: Tensor<B::InnerBackend, 1>, grads: GradientsParams) -> Self {
        Self {
            flat,
            offset: 0,
            grads: Some(grads),
        }
    }

    fn next<const D: usize>(&mut self, shape: burn::tensor::Shape) -> Tensor<B::InnerBackend, D> {
        let n = shape.num_elements();
        let piece = self.flat.clone().slice(self.offset..self.offset + n);
        self.offset += n;
        piece.reshape(shape)
    }
}

impl<B: AutodiffBackend> burn::module::ModuleVisitor<B> for Unflatten<B> {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
        let value = self.next::<D>(param.val().shape());
        if let Some(grads) = &mut self.grads {
            grads.register::<B::InnerBackend, D>(param.id, value);
        }
    }
}

impl<B: AutodiffBackend> burn::module::ModuleMapper<B> for Unflatten<B> {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<Tensor<B, D>>,
    ) -> burn::module::Param<Tensor<B, D>> {
        let value = self.next::<D>(param.val().shape());
        param.map(|old| {
            let new = Tensor::from_inner(value);
            if old.is_require_grad() {
                new.require_grad()
            } else {
                new
            }
        })
    }
}

/// Loads the model and state of a checkpoint written by [`Trainer::save`].
pub fn load_checkpoint<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(T5<B>, TrainState), DistillError> {
    let ck = |e: String| DistillError::Checkpoint(dir.to_path_buf(), e);
    if !dir.join("state.json").is_file() {
        return Err(ck(
            "no state.json here; not a kiln distill checkpoint".into()
        ));
    }
    let config = T5Config::from_file(&dir.join("config.json"))?;
    let state: TrainState = serde_json::from_str(
        &std::fs::read_to_string(dir.join("state.json"))
            .map_err(|e| DistillError::Io(dir.join("state.json"), e))?,
    )
    .map_err(|e| ck(format!("state.json: {e}")))?;
    let model = config
        .init::<B>(device)
        .load_file(dir.join("model"), &DefaultRecorder::new(), device)
        .map_err(|e| ck(e.to_string()))?;
    Ok((model, state))
}

fn scalar<B: Backend>(t: &Tensor<B, 1>) -> f64 {
    t.clone().into_scalar().elem::<f64>()
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), DistillError> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    std::fs::write(path, text).map_err(|e| DistillError::Io(path.to_path_buf(), e))
}

/// An HF `config.json` for `config`, so checkpoints read back with [`T5Config::from_file`].
pub fn config_json(c: &T5Config) -> serde_json::Value {
    c.to_hf_json()
}

/// A freshly initialised T5 shape: `tiny` (tests), `small` (~ the CPU experiment) or `base`-like
/// widths for `t5-small` (60M with the 32k vocabulary).
pub fn fresh_config(preset: &str, vocab_size: usize) -> Result<T5Config, DistillError> {
    let (d_model, d_kv, d_ff, layers, heads) = match preset {
        "tiny" => (32, 8, 64, 1, 4),
        "mini" => (128, 32, 512, 2, 4),
        "small" => (256, 32, 1024, 4, 8),
        "t5-small" => (512, 64, 2048, 6, 8),
        other => {
            return Err(DistillError::arg(
                "preset",
                format!("unknown fresh model preset `{other}` (tiny, mini, small, t5-small)"),
            ));
        }
    };
    Ok(T5Config {
        vocab_size,
        d_model,
        d_kv,
        d_ff,
        num_layers: layers,
        num_decoder_layers: layers,
        num_heads: heads,
        relative_attention_num_buckets: 32,
        relative_attention_max_distance: 128,
        layer_norm_epsilon: 1e-6,
        activation: T5Activation::Relu,
        gated: false,
        tie_word_embeddings: true,
        scale_decoder_outputs: true,
        dropout_rate: 0.1,
        decoder_start_token_id: 0,
        eos_token_ids: vec![1],
        pad_token_id: 0,
    })
}

/// Clips `grads` to the global norm `max` when set.
fn clip<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: GradientsParams,
    max: Option<f32>,
) -> GradientsParams {
    match max {
        Some(max) => kiln_core::grad_clip::clip_grad_norm(model, grads, max as f64).0,
        None => grads,
    }
}

/// Appends one JSON object per line to a metrics log.
pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    /// Logs to `path` (appending).
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// Appends `value`.
    pub fn log(&self, value: &serde_json::Value) -> Result<(), DistillError> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| DistillError::Io(self.path.clone(), e))?;
        writeln!(f, "{value}").map_err(|e| DistillError::Io(self.path.clone(), e))
    }
}
