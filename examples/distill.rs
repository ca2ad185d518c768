//! Distilling step-by-step in a few lines: train a T5 on SVAMP labels and PaLM rationales as
//! two tasks (`predict:` / `explain:`), then score greedy `predict:` answers on the test set.
//!
//! ```sh
//! cargo run --release --example distill                                   # the tiny T5 fixture, offline
//! cargo run --release --example distill -- google/t5-v1_1-small 200       # a real student, 200 steps
//! ```
//!
//! Arguments: the student (folder or hub id; default the random tiny fixture, which learns
//! nothing in a few steps: this shows the API, not the paper's result) and the steps. The data
//! is the SVAMP copy committed under tests/data. `kiln distill train` is the full program.

use burn::backend::Autodiff;
use kiln::backend::{Backend, device};
use kiln::core::Tokenizer;
use kiln::distill::data::load_svamp;
use kiln::distill::eval::{EvalOptions, evaluate};
use kiln::distill::train::{TrainConfig, Trainer, encode_examples};
use kiln::t5::T5;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let spec = args
        .next()
        .unwrap_or_else(|| "tests/fixtures/t5v11-gated-untied".into());
    let steps: usize = args.next().map_or(Ok(20), |s| s.parse())?;

    let root = std::path::Path::new("tests/data/datasets/step-by-step");
    let (train, test) = (load_svamp(root, "train")?, load_svamp(root, "test")?);
    let files = kiln::core::loading::resolve_model(&spec)?;
    let student = T5::<Autodiff<Backend>>::from_pretrained(&files.dir, &device())?;
    let tokenizer = Tokenizer::from_dir(&files.dir)?;

    // The reference's recipe (TrainConfig::default()), shortened to run in seconds.
    let config = TrainConfig::default()
        .steps(steps)
        .batch_size(8)
        .lr(1e-3)
        .max_input_len(64)
        .max_target_len(48);
    let eos = student.config().eos_token_ids[0];
    let (data, dropped) = encode_examples(&tokenizer, &train.examples, &config, eos)?;
    println!(
        "{} training examples ({dropped} without a usable rationale)",
        data.len()
    );
    let mut trainer = Trainer::new(student, config.clone(), data)?;
    for _ in 0..steps {
        let m = trainer.train_step()?;
        if m.step % 5 == 0 || m.step == steps {
            println!(
                "step {}: loss {:.3} (label {:.3}, rationale {:.3})",
                m.step,
                m.loss,
                m.label_loss,
                m.rationale_loss.unwrap_or(f64::NAN)
            );
        }
    }

    let options = EvalOptions {
        mode: config.mode,
        batch_size: 16,
        max_new_tokens: 32,
        max_input_len: config.max_input_len,
    };
    let sample = &test.examples[..20];
    let result = evaluate(
        &trainer.inference_model(),
        &tokenizer,
        sample,
        test.task,
        &options,
        |_| {},
    )?;
    println!(
        "test accuracy on {} examples: {:.1}% (e.g. {:?} for {:?})",
        result.total,
        100.0 * result.accuracy,
        result.predictions[0],
        sample[0].label
    );
    Ok(())
}
