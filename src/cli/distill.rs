//! `kiln distill`: Distilling step-by-step (train and evaluate a T5 on labels and rationales).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::backend::Autodiff;
use clap::{Args, Subcommand, ValueEnum};
use kiln::backend::{Backend, NAME, device};
use kiln::core::Tokenizer;
use kiln::core::loading::resolve_model;
use kiln::distill::data::{DataSource, Split, Task};
use kiln::distill::eval::{EvalOptions, evaluate};
use kiln::distill::fit::{FitOptions, checkpoint_dir, fit};
use kiln::distill::nodes::NodeConfig;
use kiln::distill::train::{
    DataParallel, LabelSource, Mode, TrainConfig, Trainer, encode_examples, fresh_config,
    load_checkpoint,
};
use kiln::t5::T5;

pub const LONG_ABOUT: &str = "\
Distilling step-by-step (Hsieh et al. 2023, arXiv 2305.02301): train a small T5 on a task's labels
and on a teacher LLM's rationales as two tasks, `predict: <input>` -> label and
`explain: <input>` -> rationale, with loss alpha*CE(label) + (1-alpha)*CE(rationale). At test time
only `predict:` runs. Baselines: `--mode standard --label-source gold` (standard fine-tuning) and
`--mode standard --label-source llm` (standard distillation).

Data: `svamp` and `cqa` read the paper's files (with PaLM-540B rationales) under --data-root
(default ../shared/datasets/step-by-step); any other value is a JSONL file of
{\"input\", \"label\", \"rationale\", \"llm_label\"?} objects (your own data and teacher; give the test
file with --test-data and --task equation for arithmetic answers).

Examples:
  # the CPU experiment's step-by-step run (fresh 'mini' T5, T5 tokenizer)
  kiln distill train --data svamp --fresh mini --mode step-by-step --label-source llm \\
      --steps 300 --batch-size 16 --lr 1e-3 --out runs/sbs
  # standard fine-tuning on gold labels, same budget
  kiln distill train --data svamp --fresh mini --mode standard --label-source gold \\
      --steps 300 --batch-size 16 --lr 1e-3 --out runs/ft
  # start from a pretrained T5 folder or hub id instead
  kiln distill train --data cqa --model google/flan-t5-small --out runs/cqa --lr 5e-5
  # continue an interrupted run exactly where its last checkpoint left it
  kiln distill train --out runs/sbs --resume
  # test accuracy of a checkpoint
  kiln distill eval --checkpoint runs/sbs/checkpoint
  # two machines (10.0.0.1 and 10.0.0.2), 4 GPUs each: an orchestrator, then one train per node
  kiln distill orchestrator --port 29400                                # on 10.0.0.1
  kiln distill train ... --devices 4 --grad-accum 8 --nodes 2 --node-rank 0 \\
      --node-address 10.0.0.1:29401 --orchestrator 10.0.0.1:29400 --out runs/n0   # on 10.0.0.1
  kiln distill train ... --devices 4 --grad-accum 8 --nodes 2 --node-rank 1 \\
      --node-address 10.0.0.2:29401 --orchestrator 10.0.0.1:29400 --out runs/n1   # on 10.0.0.2";

/// `kiln distill` arguments.
#[derive(Args, Debug)]
pub struct DistillArgs {
    #[command(subcommand)]
    command: DistillCommand,
}

#[derive(Subcommand, Debug)]
enum DistillCommand {
    /// Train (or resume) a student T5; writes <out>/checkpoint and <out>/metrics.jsonl.
    Train(Box<TrainArgs>),
    /// Test accuracy of a checkpoint (greedy `predict:` decoding).
    Eval(EvalArgs),
    /// Run the global orchestrator of a multi-node `train --nodes N` until Ctrl-C: the nodes
    /// register with it and learn each other's addresses (gradients then go node to node).
    /// One per run; start it first, anywhere every node can reach.
    Orchestrator(OrchestratorArgs),
    /// Write a checkpoint's student as an HF T5 folder (model.safetensors, config.json,
    /// generation_config.json, tokenizer) that transformers and `kiln generate` load.
    Export(ExportArgs),
}

#[derive(Args, Debug)]
struct ExportArgs {
    /// A checkpoint folder written by `kiln distill train` (<out>/checkpoint).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The HF folder to write.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct OrchestratorArgs {
    /// Port to listen on (all interfaces); the nodes' --orchestrator names it.
    #[arg(long)]
    port: u16,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    StepByStep,
    Standard,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LabelArg {
    Gold,
    Llm,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TaskArg {
    Text,
    Equation,
}

#[derive(Args, Debug)]
struct TrainArgs {
    /// `svamp`, `cqa`, `esnli`, `anli1` (the reference's JSON files under --data-root), or a
    /// JSONL training file.
    #[arg(long, default_value = "svamp")]
    data: String,
    /// JSONL test file (with a JSONL --data).
    #[arg(long)]
    test_data: Option<PathBuf>,
    /// Answer comparison for JSONL data.
    #[arg(long, value_enum, default_value = "text")]
    task: TaskArg,
    /// Folder holding the paper's `svamp/` and `cqa/` data.
    #[arg(long, default_value = "../shared/datasets/step-by-step")]
    data_root: PathBuf,
    /// Pretrained T5: a folder (config.json, safetensors, tokenizer.json) or a hub id.
    #[arg(long, conflicts_with = "fresh")]
    model: Option<String>,
    /// Train a freshly initialised T5 of this size instead: tiny, mini, small, t5-small.
    #[arg(long)]
    fresh: Option<String>,
    /// Folder with tokenizer.json (default: the model's, else ../shared/tokenizers/t5).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Multi-task with rationales, or label-only.
    #[arg(long, value_enum, default_value = "step-by-step")]
    mode: ModeArg,
    /// Train on gold labels (the reference's `--label_type gt`) or the teacher LLM's labels.
    #[arg(long, value_enum, default_value = "gold")]
    label_source: LabelArg,
    /// Label-loss weight.
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// Optimizer steps.
    #[arg(long, default_value_t = 10_000)]
    steps: usize,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate (AdamW; linear warmup then linear decay to 0).
    #[arg(long, default_value_t = 5e-5)]
    lr: f64,
    /// Warmup steps.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// AdamW epsilon.
    #[arg(long, default_value_t = 1e-8)]
    adam_eps: f32,
    /// Clip gradients to this global L2 norm over all parameters, as PyTorch's
    /// clip_grad_norm_ (0 = off).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f32,
    /// Max input tokens.
    #[arg(long, default_value_t = 1024)]
    max_input_len: usize,
    /// Max target tokens (labels and rationales).
    #[arg(long, default_value_t = 256)]
    max_target_len: usize,
    /// Keep this fraction of the training set (seeded).
    #[arg(long, default_value_t = 1.0)]
    subsample: f64,
    /// Fraction of the training set held out (default: 10% as the reference does for SVAMP,
    /// CQA and JSONL data, which never uses that part: it scores the test set every 250 steps;
    /// 0 for e-SNLI and ANLI, which have their own validation split).
    #[arg(long)]
    valid_fraction: Option<f64>,
    /// What the periodic evaluation scores: `test` (the reference scores the test set every
    /// --eval-every steps) or `valid` (the held-out part of the training data).
    #[arg(long, value_parser = ["test", "valid"], default_value = "test")]
    eval_split: String,
    /// Seed of subsampling, validation split, data order and fresh weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Evaluate every N steps (0 = only at the end).
    #[arg(long, default_value_t = 250)]
    eval_every: usize,
    /// Validation examples per evaluation (0 = all).
    #[arg(long, default_value_t = 0)]
    eval_samples: usize,
    /// Checkpoint every N steps (0 = only at the end).
    #[arg(long, default_value_t = 100)]
    save_every: usize,
    /// Max generated tokens at evaluation.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// After training, evaluate on the test split and print its accuracy.
    #[arg(long)]
    test: bool,
    /// Run folder.
    #[arg(long)]
    out: PathBuf,
    /// Data-parallel training over this many devices of the backend (GPU builds: devices
    /// 0..N); the micro-batches of a step (--grad-accum, use a multiple of N) are spread over
    /// them and their gradients summed on device 0.
    #[arg(long, default_value_t = 1)]
    devices: u16,
    /// With --devices N: distributed data parallel through burn-collective instead. Every
    /// device keeps its own replica and optimizer, and gradients are all-reduced between
    /// them, so no weights move after the start (--grad-accum must be a multiple of N).
    #[arg(long)]
    collective: bool,
    /// Resume from <out>/checkpoint (its saved settings win over the flags above).
    #[arg(long)]
    resume: bool,
    /// Dropout rate of a --fresh model (default: T5's 0.1). 0 makes runs repeatable, e.g. to
    /// compare a multi-node run with a single process.
    #[arg(long)]
    dropout: Option<f64>,
    /// Multi-node training: the number of nodes (processes, one per machine) in the run.
    /// Each runs this command with the same flags but its own --node-rank, --node-address and
    /// --out, over its --devices (default 1); gradients are all-reduced across all of them
    /// through burn-collective, as --collective does locally. --grad-accum must be a multiple
    /// of nodes × devices; rank 0's starting weights are copied to every node. Start
    /// `kiln distill orchestrator` first.
    #[arg(long, requires_all = ["node_rank", "node_address", "orchestrator"], help_heading = "Multi-node")]
    nodes: Option<usize>,
    /// This node's rank, 0..N (decides which micro-batches it trains on).
    #[arg(long, requires = "nodes", help_heading = "Multi-node")]
    node_rank: Option<usize>,
    /// host:port where the other nodes reach this one (ws://host:port also accepted); the
    /// port is this node's tensor data service and must be free and reachable.
    #[arg(long, requires = "nodes", help_heading = "Multi-node")]
    node_address: Option<String>,
    /// host:port of the `kiln distill orchestrator` of this run.
    #[arg(long, requires = "nodes", help_heading = "Multi-node")]
    orchestrator: Option<String>,
    /// Port the data service listens on when it differs from --node-address's (port
    /// forwarding, containers).
    #[arg(long, requires = "nodes", help_heading = "Multi-node")]
    data_service_port: Option<u16>,
    /// Seconds to wait for the orchestrator and all nodes to join.
    #[arg(long, default_value_t = 300, help_heading = "Multi-node")]
    join_timeout: u64,
}

#[derive(Args, Debug)]
struct EvalArgs {
    /// A checkpoint folder written by `kiln distill train` (<out>/checkpoint).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Data to evaluate (default: the data the checkpoint was trained on).
    #[arg(long)]
    data: Option<String>,
    /// Answer comparison for JSONL data.
    #[arg(long, value_enum, default_value = "text")]
    task: TaskArg,
    /// Folder holding the paper's data.
    #[arg(long, default_value = "../shared/datasets/step-by-step")]
    data_root: PathBuf,
    /// Split of the paper's data.
    #[arg(long, default_value = "test")]
    split: String,
    /// Evaluate only the first N examples (0 = all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Generation batch size.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Max generated tokens.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Print every prediction.
    #[arg(long)]
    show: bool,
    /// Also print the gold labels' teacher-forced cross-entropy (nats per token), which still
    /// ranks checkpoints whose greedy answers are all wrong.
    #[arg(long)]
    label_loss: bool,
}

type TrainB = Autodiff<Backend>;

pub fn run(args: DistillArgs) -> anyhow::Result<()> {
    match args.command {
        DistillCommand::Train(a) => train(*a),
        DistillCommand::Export(a) => {
            kiln::distill::export::export::<Backend>(&a.checkpoint, &a.out, &device())?;
            println!("{}", a.out.display());
            Ok(())
        }
        DistillCommand::Eval(a) => eval(a),
        DistillCommand::Orchestrator(a) => {
            eprintln!("orchestrator listening on port {} (Ctrl-C to stop)", a.port);
            kiln::distill::nodes::serve_orchestrator(a.port)?;
            Ok(())
        }
    }
}

fn task_of(t: TaskArg) -> Task {
    match t {
        TaskArg::Text => Task::Text,
        TaskArg::Equation => Task::Equation,
    }
}

fn data_source(
    data: &str,
    root: &Path,
    test: Option<PathBuf>,
    task: TaskArg,
) -> anyhow::Result<DataSource> {
    Ok(match data {
        "svamp" => DataSource::Svamp(root.to_path_buf()),
        "cqa" => DataSource::Cqa(root.to_path_buf()),
        "esnli" => DataSource::Esnli(root.to_path_buf()),
        "anli1" => DataSource::Anli1(root.to_path_buf()),
        path => {
            let p = PathBuf::from(path);
            if !p.is_file() {
                bail!("--data {path}: expected `svamp`, `cqa` or a JSONL file");
            }
            DataSource::Jsonl {
                train: p,
                test,
                task: task_of(task),
            }
        }
    })
}

fn report_split(name: &str, s: &Split) {
    eprintln!(
        "{name}: {} examples ({} without a parseable rationale, {} without a parseable LLM label)",
        s.examples.len(),
        s.unparsed_rationales,
        s.unparsed_llm_labels
    );
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    let device = device();
    let ck = checkpoint_dir(&a.out);
    // On resume, the checkpoint's own settings and data description decide.
    let (source, config, valid_fraction, subsample) = if a.resume {
        let state: kiln::distill::train::TrainState = serde_json::from_str(
            &std::fs::read_to_string(ck.join("state.json")).with_context(|| {
                format!("--resume: reading {}", ck.join("state.json").display())
            })?,
        )?;
        let source: DataSource = serde_json::from_value(state.data["source"].clone())?;
        let vf = state.data["valid_fraction"].as_f64().unwrap_or(0.1);
        let sub = state.data["subsample"].as_f64().unwrap_or(1.0);
        (source, state.config, vf, sub)
    } else {
        let config = TrainConfig::default()
            .mode(match a.mode {
                ModeArg::StepByStep => Mode::StepByStep,
                ModeArg::Standard => Mode::Standard,
            })
            .label_source(match a.label_source {
                LabelArg::Gold => LabelSource::Gold,
                LabelArg::Llm => LabelSource::Llm,
            })
            .alpha(a.alpha)
            .steps(a.steps)
            .batch_size(a.batch_size)
            .grad_accum(a.grad_accum)
            .lr(a.lr)
            .warmup_steps(a.warmup)
            .weight_decay(a.weight_decay)
            .adam_eps(a.adam_eps)
            .grad_clip((a.grad_clip > 0.0).then_some(a.grad_clip))
            .max_input_len(a.max_input_len)
            .max_target_len(a.max_target_len)
            .seed(a.seed);
        config.validate()?;
        let source = data_source(&a.data, &a.data_root, a.test_data.clone(), a.task)?;
        let own_valid = matches!(source, DataSource::Esnli(_) | DataSource::Anli1(_));
        let vf = a
            .valid_fraction
            .unwrap_or(if own_valid { 0.0 } else { 0.1 });
        (source, config, vf, a.subsample)
    };

    let full = source.load("train").context("loading the training data")?;
    report_split("train file", &full);
    let (train_split, valid_split) = full
        .subsample(subsample, config.seed)?
        .split_off_valid(valid_fraction, config.seed);
    report_split("train", &train_split);
    report_split("valid", &valid_split);
    let task = source.task();

    let tokenizer_dir = |model_dir: Option<&Path>| -> PathBuf {
        a.tokenizer.clone().unwrap_or_else(|| match model_dir {
            Some(d) if d.join("tokenizer.json").is_file() => d.to_path_buf(),
            _ => PathBuf::from("../shared/tokenizers/t5"),
        })
    };

    let (model, tokenizer) = if a.resume {
        (None, Tokenizer::from_dir(&ck)?)
    } else if let Some(spec) = &a.model {
        let files = resolve_model(spec)?;
        let model = T5::<TrainB>::from_pretrained(&files.dir, &device)
            .with_context(|| format!("loading T5 {spec}"))?;
        let tok = Tokenizer::from_dir(&tokenizer_dir(Some(&files.dir)))?;
        (Some(model), tok)
    } else {
        let preset = a.fresh.as_deref().unwrap_or("mini");
        let tok = Tokenizer::from_dir(&tokenizer_dir(None))
            .context("the T5 tokenizer (give --tokenizer <folder with tokenizer.json>)")?;
        // T5's padded vocabulary: 32100 pieces rounded up to 32128 as in the released models.
        let vocab = tok.vocab_size().div_ceil(128) * 128;
        let mut cfg = fresh_config(preset, vocab)?;
        if let Some(p) = a.dropout {
            if !(0.0..1.0).contains(&p) {
                bail!("--dropout {p}: must be in [0, 1)");
            }
            cfg.dropout_rate = p;
        }
        <Backend as burn::tensor::backend::Backend>::seed(&device, config.seed);
        (Some(cfg.init::<TrainB>(&device)), tok)
    };

    let eos = 1; // T5's `</s>`; checked against the model below.
    let (encoded, dropped) = encode_examples(&tokenizer, &train_split.examples, &config, eos)?;
    eprintln!(
        "training on {} examples ({dropped} dropped: missing what {:?}/{:?} needs), backend {NAME}",
        encoded.len(),
        config.mode,
        config.label_source
    );
    let mut trainer = match model {
        Some(model) => {
            use kiln::core::seq2seq::Seq2SeqLm;
            if model.eos_token_ids().first() != Some(&eos) {
                bail!("kiln distill expects a T5 with EOS id 1");
            }
            let n: usize = burn::module::Module::num_params(&model);
            eprintln!(
                "model: T5 d_model {} ff {} layers {}+{} heads {} vocab {}: {:.1}M parameters",
                model.config().d_model,
                model.config().d_ff,
                model.config().num_layers,
                model.config().num_decoder_layers,
                model.config().num_heads,
                model.config().vocab_size,
                n as f64 / 1e6
            );
            Trainer::new(model, config, encoded)?
        }
        None => {
            let (t, state) = Trainer::<TrainB>::resume(&ck, encoded, &device)?;
            eprintln!("resumed at step {} of {}", state.step, t.config.steps);
            t
        }
    };

    if a.dropout.is_some() && a.fresh.is_none() && (a.model.is_some() || a.resume) {
        bail!("--dropout applies to a --fresh model");
    }
    if a.collective && a.devices < 2 && a.nodes.is_none() {
        bail!("--collective shares training between devices: give --devices N with N >= 2");
    }
    let devices = || -> Vec<burn::tensor::Device<TrainB>> {
        use burn::tensor::backend::Device as _;
        #[allow(clippy::clone_on_copy)] // Copy on CPU backends, Clone only on GPU ones.
        let main = device.clone();
        (0..a.devices)
            .map(|i| {
                let mut id = main.to_id();
                id.index_id = i;
                burn::tensor::Device::<TrainB>::from_id(id)
            })
            .collect()
    };
    if let Some(n) = a.nodes {
        let nodes = NodeConfig::default()
            .nodes(n)
            .node_rank(a.node_rank.unwrap_or_default())
            .node_address(a.node_address.clone().unwrap_or_default())
            .orchestrator(a.orchestrator.clone().unwrap_or_default())
            .data_service_port(a.data_service_port)
            .devices_per_node(a.devices.into())
            .join_timeout(std::time::Duration::from_secs(a.join_timeout));
        eprintln!(
            "node {} of {n}: joining through {} ...",
            nodes.node_rank, nodes.orchestrator
        );
        trainer = trainer.with_nodes(devices(), nodes)?;
        eprintln!(
            "joined: data parallel over {n} nodes × {} devices",
            a.devices
        );
    } else if a.devices > 1 {
        let devices = devices();
        let parallel = if a.collective {
            DataParallel::Collective
        } else {
            DataParallel::MainDevice
        };
        trainer = trainer.with_parallel(devices, parallel)?;
        eprintln!("data-parallel ({parallel:?}) over {} devices", a.devices);
    }
    let data = serde_json::json!({
        "source": source,
        "subsample": subsample,
        "valid_fraction": valid_fraction,
        "task": task,
        "train_examples": train_split.examples.len(),
        "dropped": dropped,
    });
    let opts = FitOptions {
        out_dir: a.out.clone(),
        eval_every: a.eval_every,
        eval_split: a.eval_split.clone(),
        eval_samples: a.eval_samples,
        save_every: a.save_every,
        max_new_tokens: a.max_new_tokens,
        eval_batch_size: 32,
        data,
        progress: true,
    };
    let eval_examples = match a.eval_split.as_str() {
        "test" => {
            source
                .load("test")
                .context("loading the test data")?
                .examples
        }
        _ if matches!(source, DataSource::Esnli(_) | DataSource::Anli1(_)) => {
            source
                .load("valid")
                .context("loading the validation data")?
                .examples
        }
        _ => valid_split.examples.clone(),
    };
    let acc = fit(&mut trainer, &tokenizer, &eval_examples, task, &opts)?;
    if let Err(e) = trainer.leave() {
        eprintln!("warning: {e}");
    }
    if let Some(acc) = acc {
        println!("{} accuracy: {acc:.4}", a.eval_split);
    }
    println!("checkpoint: {}", ck.display());
    if a.test {
        let test = source.load("test")?;
        let r = evaluate(
            &trainer.inference_model(),
            &tokenizer,
            &test.examples,
            task,
            &EvalOptions {
                mode: trainer.config.mode,
                batch_size: 32,
                max_new_tokens: a.max_new_tokens,
                max_input_len: trainer.config.max_input_len,
            },
            |_| {},
        )?;
        kiln::distill::train::MetricsLog::new(a.out.join("metrics.jsonl")).log(
            &serde_json::json!({"step": trainer.step, "split": "test", "accuracy": r.accuracy,
                                "correct": r.correct, "total": r.total}),
        )?;
        println!(
            "test accuracy: {:.4} ({}/{})",
            r.accuracy, r.correct, r.total
        );
    }
    Ok(())
}

fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let device = device();
    let (model, state) = load_checkpoint::<Backend>(&a.checkpoint, &device)?;
    let tokenizer = Tokenizer::from_dir(&a.checkpoint)?;
    let source = match &a.data {
        Some(d) => data_source(d, &a.data_root, None, a.task)?,
        None => serde_json::from_value(state.data["source"].clone())
            .context("the checkpoint names no data; pass --data")?,
    };
    // A JSONL file given here is the file to evaluate.
    let mut split = match (&a.data, &source) {
        (Some(_), DataSource::Jsonl { train, task, .. }) => {
            kiln::distill::data::load_jsonl(train, *task)?
        }
        _ => source.load(&a.split)?,
    };
    if a.limit > 0 {
        split.examples.truncate(a.limit);
    }
    let bar = indicatif_bar(split.examples.len());
    let options = EvalOptions {
        mode: state.config.mode,
        batch_size: a.batch_size,
        max_new_tokens: a.max_new_tokens,
        max_input_len: state.config.max_input_len,
    };
    let r = evaluate(
        &model,
        &tokenizer,
        &split.examples,
        split.task,
        &options,
        bar,
    )?;
    if a.show {
        for (e, p) in split.examples.iter().zip(&r.predictions) {
            println!("gold {:?}\tpred {:?}", e.label, p);
        }
    }
    println!(
        "accuracy: {:.4} ({}/{}) [{:?}, step {}, {:?} / {:?}]",
        r.accuracy,
        r.correct,
        r.total,
        a.split,
        state.step,
        state.config.mode,
        state.config.label_source
    );
    if a.label_loss {
        let ce = kiln::distill::eval::label_cross_entropy(
            &model,
            &tokenizer,
            &split.examples,
            &options,
            state.config.max_target_len,
        )?;
        println!("gold-label cross-entropy: {ce:.4} nats/token");
    }
    Ok(())
}

fn indicatif_bar(n: usize) -> impl Fn(usize) {
    let done = std::cell::Cell::new(0usize);
    move |k| {
        done.set(done.get() + k);
        eprint!("\revaluated {}/{n}", done.get());
        if done.get() >= n {
            eprintln!();
        }
    }
}
