//! Loss, training and checkpoint tests on a tiny fresh T5 (synthetic token ids, no files).

use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Module};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use kiln_core::seq2seq::Seq2SeqLm;
use kiln_distill::train::{
    DataParallel, Encoded, LabelSource, Mode, TrainConfig, Trainer, fresh_config, make_batch,
    multitask_loss,
};

type AB = Autodiff<Flex>;
type IB = Flex;

const VOCAB: usize = 40;

fn tiny_model<B: Backend>() -> kiln_t5::T5<B> {
    // The backend RNG is global and tests run in parallel: seed and initialise under a lock so
    // every call gives the same weights. Burn initialises parameters lazily, on first use, so
    // touch every one before the lock is released.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    B::seed(&Default::default(), 7);
    // Without dropout: these tests check the training mechanics (loss weights, exact resume,
    // data-parallel sums), which random masks would blur. tests/t5_parity.rs checks dropout.
    let mut config = fresh_config("tiny", VOCAB).unwrap();
    config.dropout_rate = 0.0;
    let model = config.init::<B>(&Default::default());
    model.visit(&mut Touch);
    model
}

/// Reads every float parameter, which runs its lazy initialiser.
struct Touch;
impl<B: Backend> burn::module::ModuleVisitor<B> for Touch {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
        let _ = param.val();
    }
}

/// Synthetic data: label = first input token + 2 (then EOS), rationale = the input reversed.
fn data() -> Vec<Encoded> {
    (0..12u32)
        .map(|i| {
            let a = 3 + i % 9;
            let b = 3 + (i * 5) % 11;
            let input = vec![2, a, b, 1];
            Encoded {
                pred_input: input.clone(),
                label: vec![a + 2, 1],
                expl_input: vec![30, a, b, 1],
                rationale: vec![b, a, b + 1, 1],
            }
        })
        .collect()
}

/// Reference CE from logits read back as plain floats, mean over real target tokens.
fn reference_ce(model: &kiln_t5::T5<IB>, pairs: &[(&[u32], &[u32])]) -> f64 {
    let device = Default::default();
    let batch = make_batch::<IB>(pairs, 0, 0, &device);
    let logits = kiln_distill::train::forward_logits(model, &batch);
    let [b, t, v] = logits.dims();
    let flat: Vec<f32> = logits.into_data().convert::<f32>().into_vec().unwrap();
    let (mut sum, mut n) = (0.0f64, 0usize);
    for (row, (_, target)) in pairs.iter().enumerate().take(b) {
        for (pos, &tok) in target.iter().enumerate().take(t) {
            let l = &flat[(row * t + pos) * v..(row * t + pos + 1) * v];
            let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max + l.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            sum += lse - l[tok as usize] as f64;
            n += 1;
        }
    }
    sum / n as f64
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_scalar().elem::<f64>()
}

#[test]
fn multitask_loss_is_weighted_sum_of_single_task_losses() {
    let model = tiny_model::<AB>();
    let d = data();
    let device = Default::default();
    // Rows of different lengths, so padding and the target mask matter.
    let mut d2 = d[..3].to_vec();
    d2[1].label = vec![5, 6, 7, 1];
    d2[2].rationale = vec![4, 1];
    let pred: Vec<(&[u32], &[u32])> = d2
        .iter()
        .map(|e| (&e.pred_input[..2 + (e.label.len() % 2)], &e.label[..]))
        .collect();
    let expl: Vec<(&[u32], &[u32])> = d2
        .iter()
        .map(|e| (&e.expl_input[..], &e.rationale[..]))
        .collect();
    let pb = make_batch::<AB>(&pred, 0, 0, &device);
    let eb = make_batch::<AB>(&expl, 0, 0, &device);
    for alpha in [0.5, 0.2, 1.0] {
        let loss = multitask_loss(&model, &pb, Some(&eb), alpha);
        let inner = model.valid();
        let want =
            alpha * reference_ce(&inner, &pred) + (1.0 - alpha) * reference_ce(&inner, &expl);
        let got = scalar(loss.total);
        assert!((got - want).abs() < 1e-4, "alpha {alpha}: {got} vs {want}");
        assert!((scalar(loss.label) - reference_ce(&inner, &pred)).abs() < 1e-4);
    }
    // Label-only is the label CE alone.
    let only = multitask_loss(&model, &pb, None, 0.5);
    assert!((scalar(only.total) - reference_ce(&model.valid(), &pred)).abs() < 1e-4);
}

fn config(mode: Mode) -> TrainConfig {
    TrainConfig::default()
        .mode(mode)
        .label_source(LabelSource::Gold)
        .steps(30)
        .batch_size(4)
        .grad_accum(2)
        .lr(3e-3)
        .warmup_steps(3)
        .seed(11)
}

#[test]
fn few_steps_lower_the_loss() {
    for mode in [Mode::StepByStep, Mode::Standard] {
        let mut t = Trainer::new(tiny_model::<AB>(), config(mode).steps(25), data()).unwrap();
        let first = t.train_step().unwrap();
        let mut last = first;
        for _ in 1..25 {
            last = t.train_step().unwrap();
        }
        assert_eq!(last.step, 25);
        assert!(
            last.loss < first.loss * 0.8,
            "{mode:?}: loss {} -> {}",
            first.loss,
            last.loss
        );
        assert_eq!(first.rationale_loss.is_some(), mode == Mode::StepByStep);
    }
}

fn params<B: AutodiffBackend>(m: &kiln_t5::T5<B>) -> Vec<f32> {
    let mut out = Vec::new();
    m.valid().visit(&mut ParamCollector(&mut out));
    assert!(out.len() > 1000);
    out
}

struct ParamCollector<'a>(&'a mut Vec<f32>);
impl<B: Backend> burn::module::ModuleVisitor<B> for ParamCollector<'_> {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
        self.0.extend(
            param
                .val()
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .unwrap(),
        );
    }
}

#[test]
fn save_and_resume_continue_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let cfg = config(Mode::StepByStep).steps(6);

    // Uninterrupted: 5 steps (batches of 4 from 12 examples: the resume lands mid-epoch).
    let mut a = Trainer::new(tiny_model::<AB>(), cfg.clone(), data()).unwrap();
    let mut a_metrics = Vec::new();
    for _ in 0..5 {
        a_metrics.push(a.train_step().unwrap());
    }

    // Interrupted after 2 steps, saved, restored from disk, 3 more.
    let mut b = Trainer::new(tiny_model::<AB>(), cfg, data()).unwrap();
    b.train_step().unwrap();
    b.train_step().unwrap();
    b.save(&ck, serde_json::json!({"test": true}), None)
        .unwrap();
    drop(b);
    let (mut c, state) = Trainer::<AB>::resume(&ck, data(), &Default::default()).unwrap();
    assert_eq!(state.step, 2);
    assert_eq!(c.step, 2);
    let mut c_metrics = Vec::new();
    for _ in 0..3 {
        c_metrics.push(c.train_step().unwrap());
    }
    assert_eq!(&a_metrics[2..], &c_metrics[..]);
    assert_eq!(params(&a.model), params(&c.model));
    assert_eq!(c.model.pad_token_id(), 0);
}

#[test]
fn bad_config_is_an_error() {
    assert!(
        Trainer::new(
            tiny_model::<AB>(),
            config(Mode::Standard).alpha(1.5),
            data()
        )
        .is_err()
    );
    assert!(Trainer::new(tiny_model::<AB>(), config(Mode::Standard), Vec::new()).is_err());
    let mut no_rationale = data();
    no_rationale[0].rationale.clear();
    assert!(Trainer::new(tiny_model::<AB>(), config(Mode::StepByStep), no_rationale).is_err());
    let missing = Trainer::<AB>::resume(
        std::path::Path::new("/nonexistent/ck"),
        data(),
        &Default::default(),
    );
    assert!(missing.is_err());
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

#[test]
fn two_device_data_parallel_matches_one_device() {
    // The CPU backend has one device; listing it twice still runs the threaded multi-device path
    // (two model copies, gradients summed on the main device).
    let cfg = config(Mode::StepByStep).steps(3).grad_accum(2);
    let base = tiny_model::<AB>();
    assert_eq!(params(&base), params(&base.clone()));
    let mut one = Trainer::new(base.clone(), cfg.clone(), data()).unwrap();
    let mut two = Trainer::new(base, cfg, data())
        .unwrap()
        .with_devices(vec![Default::default(), Default::default()])
        .unwrap();
    // Gradients are accumulated in micro-batch order whatever thread computed them, so the two
    // runs do the same arithmetic. (Before every extra thread got its own fork, two threads
    // shared autodiff leaves and about one run in eight drifted by ~1e-2 from step 3.)
    for step in 0..3 {
        let (a, b) = (one.train_step().unwrap(), two.train_step().unwrap());
        assert!(
            (a.loss - b.loss).abs() < 1e-6,
            "step {step}: {a:?} vs {b:?}"
        );
    }
    let (pa, pb) = (params(&one.model), params(&two.model));
    let max = max_abs_diff(&pa, &pb);
    assert!(max < 1e-6, "max parameter difference {max}");
}

#[test]
fn collective_data_parallel_matches_one_device() {
    // Two replicas on the CPU device (burn-collective's own tests do the same), each with its
    // own AdamW; gradients all-reduced between them. Device 0 sums micro-batches 0 and 2,
    // device 1 sums 1 and 3, so the float order differs from one device's 0+1+2+3.
    let cfg = config(Mode::StepByStep).steps(3).grad_accum(4);
    let base = tiny_model::<AB>();
    let mut one = Trainer::new(base.clone(), cfg.clone(), data()).unwrap();
    let mut two = Trainer::new(base, cfg, data())
        .unwrap()
        .with_parallel(
            vec![Default::default(), Default::default()],
            DataParallel::Collective,
        )
        .unwrap();
    let start = params(&one.model);
    for step in 0..3 {
        let (a, b) = (one.train_step().unwrap(), two.train_step().unwrap());
        assert!(
            (a.loss - b.loss).abs() < 1e-5 * a.loss.abs(),
            "step {step}: {a:?} vs {b:?}"
        );
    }
    let (pa, pb) = (params(&one.model), params(&two.model));
    let moved = max_abs_diff(&pa, &start);
    let max = max_abs_diff(&pa, &pb);
    assert!(moved > 1e-3, "training did not move the weights: {moved}");
    assert!(max < 1e-5, "max parameter difference {max} (moved {moved})");
}

#[test]
fn collective_needs_a_multiple_of_the_devices() {
    let cfg = config(Mode::Standard).grad_accum(3);
    let err = Trainer::new(tiny_model::<AB>(), cfg, data())
        .unwrap()
        .with_parallel(
            vec![Default::default(), Default::default()],
            DataParallel::Collective,
        )
        .err()
        .expect("3 micro-batches cannot be shared by 2 peers");
    assert!(err.to_string().contains("multiple"), "{err}");
}
