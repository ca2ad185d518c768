//! The training driver: steps with a progress bar, a JSONL metrics log, evaluation every N
//! steps and checkpoints every M steps.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_core::Tokenizer;

use crate::DistillError;
use crate::data::{Example, Task};
use crate::eval::{EvalOptions, evaluate};
use crate::train::{MetricsLog, Trainer};

/// Options of [`fit`].
#[derive(Debug, Clone)]
pub struct FitOptions {
    /// Run folder: `checkpoint/` and `metrics.jsonl` go here.
    pub out_dir: PathBuf,
    /// Evaluate every this many steps (0 = only at the end).
    pub eval_every: usize,
    /// Name of the evaluated split in logs (`test`, as the reference scores, or `valid`).
    pub eval_split: String,
    /// Validation examples used per evaluation (0 = all).
    pub eval_samples: usize,
    /// Save a checkpoint every this many steps (0 = only at the end).
    pub save_every: usize,
    /// Generation length at evaluation.
    pub max_new_tokens: usize,
    /// Generation batch size.
    pub eval_batch_size: usize,
    /// Stored in the checkpoint's `state.json` (what data this is).
    pub data: serde_json::Value,
    /// Show a progress bar.
    pub progress: bool,
}

/// The path of a run's checkpoint.
pub fn checkpoint_dir(out_dir: &std::path::Path) -> PathBuf {
    out_dir.join("checkpoint")
}

/// Trains until `trainer.config.steps`, evaluating `valid` (accuracy of `predict:` greedy
/// decoding; the reference scores its test set here) and saving as configured; ends with a
/// checkpoint and a final evaluation. Returns the last accuracy, if any evaluation ran.
pub fn fit<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    tokenizer: &Tokenizer,
    valid: &[Example],
    task: Task,
    opts: &FitOptions,
) -> Result<Option<f64>, DistillError> {
    std::fs::create_dir_all(&opts.out_dir)
        .map_err(|e| DistillError::Io(opts.out_dir.clone(), e))?;
    let log = MetricsLog::new(opts.out_dir.join("metrics.jsonl"));
    let total = trainer.config.steps;
    let bar = if opts.progress {
        ProgressBar::new(total as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(trainer.step as u64);
    let valid = if opts.eval_samples > 0 && valid.len() > opts.eval_samples {
        &valid[..opts.eval_samples]
    } else {
        valid
    };
    let eval_opts = EvalOptions {
        mode: trainer.config.mode,
        batch_size: opts.eval_batch_size,
        max_new_tokens: opts.max_new_tokens,
        max_input_len: trainer.config.max_input_len,
    };
    let mut last_acc = None;
    let started = Instant::now();
    let evaluate_now = |trainer: &Trainer<B>, bar: &ProgressBar| -> Result<f64, DistillError> {
        let r = evaluate(
            &trainer.inference_model(),
            tokenizer,
            valid,
            task,
            &eval_opts,
            |_| {},
        )?;
        log.log(&serde_json::json!({
            "step": trainer.step, "split": opts.eval_split, "accuracy": r.accuracy,
            "correct": r.correct, "total": r.total,
            "example_prediction": r.predictions.first(),
            "elapsed_s": started.elapsed().as_secs_f64(),
        }))?;
        bar.println(format!(
            "step {}: {} accuracy {:.4} ({}/{}), e.g. {:?}",
            trainer.step,
            opts.eval_split,
            r.accuracy,
            r.correct,
            r.total,
            r.predictions.first().map(String::as_str).unwrap_or("")
        ));
        Ok(r.accuracy)
    };
    while trainer.step < total {
        let m = trainer.train_step()?;
        if !m.loss.is_finite() {
            return Err(DistillError::Training(format!(
                "loss became {} at step {}; lower the learning rate",
                m.loss, m.step
            )));
        }
        let mut entry = serde_json::to_value(m).expect("metrics serialise");
        entry["split"] = "train".into();
        entry["elapsed_s"] = started.elapsed().as_secs_f64().into();
        log.log(&entry)?;
        bar.set_position(m.step as u64);
        bar.set_message(match m.rationale_loss {
            Some(r) => format!(
                "loss {:.4} (label {:.4}, rationale {:.4})",
                m.loss, m.label_loss, r
            ),
            None => format!("loss {:.4}", m.loss),
        });
        let last = trainer.step == total;
        if !valid.is_empty()
            && !last
            && opts.eval_every > 0
            && trainer.step.is_multiple_of(opts.eval_every)
        {
            last_acc = Some(evaluate_now(trainer, &bar)?);
        }
        if !last && opts.save_every > 0 && trainer.step.is_multiple_of(opts.save_every) {
            trainer.save(
                &checkpoint_dir(&opts.out_dir),
                opts.data.clone(),
                Some(tokenizer),
            )?;
        }
    }
    trainer.save(
        &checkpoint_dir(&opts.out_dir),
        opts.data.clone(),
        Some(tokenizer),
    )?;
    if !valid.is_empty() {
        last_acc = Some(evaluate_now(trainer, &bar)?);
    }
    bar.finish();
    Ok(last_acc)
}
