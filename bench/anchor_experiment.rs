//! AnLLM on CPU: train a small Llama twice (plain causal vs AnSAN with `<AC>` anchors) on the
//! step-by-step CQA rationales, then compare held-out perplexity with full attention and with
//! anchor-based inference, the KV-cache size and the speed on a long few-shot prompt.
//!
//! ```text
//! cargo run --example anchor_experiment -- [steps] [hidden] [layers]
//! ```
//! Needs `../shared/datasets/step-by-step` (skips otherwise). Tokenizer: the 509-token
//! byte-fallback BPE of the `llama2-mha` test fixture plus `<AC>` (a 49k vocabulary would make
//! the embedding dominate a ~1M-parameter model).

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module};
use burn::prelude::*;
use kiln::anchor::score::{Choice, nll_masked, nll_streamed, score_choices};
use kiln::anchor::{
    AnchorMode, AnchorSession, AnchorSet, Corpus, FewShotFormat, FullSession, McQuestion,
    PositionMode, PromptAnchors, Segments, TrainConfig, add_ac_token, ep_anchor_ids,
    few_shot_choices, init_model, kv_bytes, read_questions, read_texts, tiny_config, tokenize,
    train,
};
use kiln::backend::{Backend as B, NAME, device};
use kiln::core::Tokenizer;
use kiln::llama::{Llama, LlamaConfig};

type A = Autodiff<B>;

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let steps = args.first().copied().unwrap_or(300);
    let hidden = args.get(1).copied().unwrap_or(128);
    let layers = args.get(2).copied().unwrap_or(4);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let data = root.join("../shared/datasets/step-by-step/cqa");
    if !data.is_dir() {
        eprintln!("skipping: {} is absent", data.display());
        return Ok(());
    }
    let dev = device();
    let tokenizer = Tokenizer::from_dir(&root.join("tests/fixtures/llama2-mha"))?;
    let (tokenizer, ac) = add_ac_token(&tokenizer)?;
    let ac_set = AnchorSet::new(AnchorMode::Ac, [ac])?;
    let ep_set = ep_anchor_ids(&tokenizer, &["."])?;
    let bos = Some(1);

    let mut train_texts = Vec::new();
    for i in 0..4 {
        train_texts.extend(read_texts(
            &data.join(format!("llm/train_CoT_{i}.json")),
            None,
        )?);
    }
    let test_texts: Vec<String> = read_texts(&data.join("llm/test_CoT_0.json"), None)?
        .into_iter()
        .take(120)
        .collect();
    let ac_rows = tokenize(&tokenizer, &train_texts, Some(&ac_set), bos)?;
    let strip = |rows: &[Vec<u32>]| -> Vec<Vec<u32>> {
        rows.iter()
            .map(|r| r.iter().copied().filter(|&t| t != ac).collect())
            .collect()
    };
    let plain_rows = strip(&ac_rows);
    let test_ac = tokenize(&tokenizer, &test_texts, Some(&ac_set), bos)?;
    let test_plain = strip(&test_ac);
    let max_len = 128;
    let tokens: usize = ac_rows.iter().map(|r| r.len().min(max_len)).sum();
    println!(
        "corpus: {} train rationales ({tokens} tokens with <AC>), {} held-out; vocab {}",
        ac_rows.len(),
        test_ac.len(),
        tokenizer.vocab_size()
    );

    let json = tiny_config(
        tokenizer.vocab_size(),
        hidden,
        layers,
        4,
        hidden * 8 / 3,
        4096,
    );
    let config = LlamaConfig::from_json(json.clone(), Path::new("tiny"))?;
    A::seed(&dev, 42);
    let init: Llama<A> = init_model(&config, &dev);
    println!(
        "model: {} parameters, {layers} layers, hidden {hidden}; backend {NAME}",
        init.num_params()
    );
    let cfg = TrainConfig::default()
        .with_steps(steps)
        .with_warmup_steps(steps / 10)
        .with_batch_size(16)
        .with_lr(3e-3)
        .with_log_every(steps / 5);
    let mut trained = Vec::new();
    for (name, rows, anchors) in [
        ("causal", &plain_rows, None),
        ("ansan-ac", &ac_rows, Some(&ac_set)),
    ] {
        let start = Instant::now();
        let (model, report) = train(
            init.clone(),
            &Corpus::new(rows.clone(), max_len),
            anchors,
            &cfg,
            None,
            false,
            |s, l, lr| println!("  {name} step {s}: loss {l:.3} (lr {lr:.2e})"),
        )?;
        println!(
            "{name}: {steps} steps in {:.0}s, final loss {:.3}",
            start.elapsed().as_secs_f64(),
            report.losses.last().map_or(0.0, |l| l.1)
        );
        trained.push(model.valid());
    }
    let (causal, ansan) = (&trained[0], &trained[1]);
    let skip_ac = move |t: u32| t == ac;

    // Long rows: 4 held-out rationales joined (longer than anything seen in training).
    let long = |rows: &[Vec<u32>]| -> Vec<Vec<u32>> {
        rows.chunks(4)
            .map(|c| {
                c.iter()
                    .enumerate()
                    .flat_map(|(i, r)| r[(i > 0) as usize..].to_vec())
                    .collect()
            })
            .collect()
    };
    let (long_ac, long_plain) = (long(&test_ac), long(&test_plain));
    println!("\n| model | inference | ppl (1 rationale) | ppl (4 joined) |");
    println!("|---|---|---|---|");
    let row = |m: &str, how: &str, a: f64, b: f64| println!("| {m} | {how} | {a:.2} | {b:.2} |");
    let t = Instant::now();
    row(
        "causal",
        "full attention",
        nll_masked(causal, &test_plain, None, &skip_ac)?.perplexity(),
        nll_masked(causal, &long_plain, None, &skip_ac)?.perplexity(),
    );
    for (label, mode) in [
        ("compacted", PositionMode::Compacted),
        ("true", PositionMode::True),
    ] {
        let s = || AnchorSession::new(causal, ep_set.clone(), mode);
        row(
            "causal",
            &format!("EP anchor cache ('.'), {label} positions"),
            nll_streamed(&test_plain, s, &skip_ac)?.perplexity(),
            nll_streamed(&long_plain, s, &skip_ac)?.perplexity(),
        );
    }
    row(
        "ansan-ac",
        "full attention (causal mask)",
        nll_masked(ansan, &test_ac, None, &skip_ac)?.perplexity(),
        nll_masked(ansan, &long_ac, None, &skip_ac)?.perplexity(),
    );
    row(
        "ansan-ac",
        "AnSAN mask, no compaction",
        nll_masked(ansan, &test_ac, Some(&ac_set), &skip_ac)?.perplexity(),
        nll_masked(ansan, &long_ac, Some(&ac_set), &skip_ac)?.perplexity(),
    );
    for (label, mode) in [
        ("compacted", PositionMode::Compacted),
        ("true", PositionMode::True),
    ] {
        let s = || AnchorSession::new(ansan, ac_set.clone(), mode);
        row(
            "ansan-ac",
            &format!("anchor cache, {label} positions"),
            nll_streamed(&test_ac, s, &skip_ac)?.perplexity(),
            nll_streamed(&long_ac, s, &skip_ac)?.perplexity(),
        );
    }
    println!(
        "(perplexity over the text tokens, `<AC>` targets not counted; eval {:.0}s)",
        t.elapsed().as_secs_f64()
    );

    // Long few-shot prompt: 16 held-out rationales, then greedy decoding of 64 tokens.
    let prompt: Vec<u32> = test_ac[..16]
        .iter()
        .enumerate()
        .flat_map(|(i, r)| r[(i > 0) as usize..].to_vec())
        .collect();
    let new = 64;
    println!(
        "\nlong prompt: {} tokens, {new} new tokens (greedy), ansan-ac model",
        prompt.len()
    );
    println!("| inference | KV positions at end | KV bytes | time (s) |");
    println!("|---|---|---|---|");
    let greedy = |l: &[f32]| {
        l.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |x| x.0 as u32)
    };
    let last = |t: Tensor<B, 2>| -> Vec<f32> {
        let n = t.dims()[0];
        t.narrow(0, n - 1, 1).into_data().into_vec::<f32>().unwrap()
    };
    let (cfg_ref, bytes) = (ansan.config().clone(), |len| kv_bytes(ansan.config(), len));
    let _ = cfg_ref;
    let start = Instant::now();
    let mut s = FullSession::new(ansan);
    let mut next = greedy(&last(s.feed(&prompt)?));
    for _ in 1..new {
        next = greedy(&last(s.feed(&[next])?));
    }
    let full_t = start.elapsed().as_secs_f64();
    println!(
        "| full KV cache (causal) | {} | {} | {full_t:.2} |",
        s.cache_len(),
        bytes(s.cache_len())
    );
    for (label, mode) in [
        ("compacted", PositionMode::Compacted),
        ("true", PositionMode::True),
    ] {
        let start = Instant::now();
        let mut s = AnchorSession::new(ansan, ac_set.clone(), mode);
        let mut next = greedy(&last(s.feed(&prompt)?));
        for _ in 1..new {
            next = greedy(&last(s.feed(&[next])?));
        }
        println!(
            "| anchor KV cache, {label} positions | {} | {} | {:.2} |",
            s.cache_len(),
            bytes(s.cache_len()),
            start.elapsed().as_secs_f64()
        );
    }
    // No cache: the whole sequence re-run under the AnSAN mask for every new token.
    let start = Instant::now();
    let mut seq = prompt.clone();
    for _ in 0..new {
        let n = seq.len();
        let seg = Segments::from_rows(std::slice::from_ref(&seq), Some(&ac_set), 0);
        let ids: Vec<i64> = seq.iter().map(|&t| t as i64).collect();
        let logits = ansan.forward_masked(
            Tensor::from_data(TensorData::new(ids, [1, n]), &dev),
            Tensor::arange(0..n as i64, &dev).reshape([1, n]),
            Some(seg.mask(&dev)),
            None,
        )?;
        let v = logits.dims()[2];
        seq.push(greedy(&last(logits.reshape([n, v]))));
    }
    println!(
        "| no cache (AnSAN mask, recomputed) | 0 | 0 | {:.2} |",
        start.elapsed().as_secs_f64()
    );

    // Multiple choice (CQA validation), 3-shot with rationales, log-likelihood of each option.
    let items = read_choices(&data, &tokenizer, &ac_set, 60)?;
    println!(
        "\nCQA 3-shot multiple choice, {} questions (chance 20%)",
        items.0.len()
    );
    println!("| model | inference | accuracy | mean KV positions after prompt | time (s) |");
    println!("|---|---|---|---|---|");
    for (name, model, items) in [("causal", causal, &items.1), ("ansan-ac", ansan, &items.0)] {
        let r = score_choices(items, || FullSession::new(model))?;
        println!(
            "| {name} | full cache | {:.1}% | {:.0} | {:.1} |",
            100.0 * r.accuracy(),
            r.mean_cache_len,
            r.seconds
        );
        let set = if name == "causal" {
            ep_set.clone()
        } else {
            ac_set.clone()
        };
        let r = score_choices(items, || {
            AnchorSession::new(model, set.clone(), PositionMode::Compacted)
        })?;
        println!(
            "| {name} | anchor cache ({}) | {:.1}% | {:.0} | {:.1} |",
            if name == "causal" { "EP '.'" } else { "AC" },
            100.0 * r.accuracy(),
            r.mean_cache_len,
            r.seconds
        );
    }
    Ok(())
}

/// CQA questions after a 3-shot prompt of train questions with their rationales, as the paper
/// evaluates (`<AC>` after each demonstration, the question fully visible): (with `<AC>`,
/// plain).
fn read_choices(
    data: &Path,
    tok: &Tokenizer,
    ac: &AnchorSet,
    n: usize,
) -> anyhow::Result<(Vec<Choice>, Vec<Choice>)> {
    let train = read_questions(&data.join("cqa_train.json"))?;
    let rationales = read_texts(&data.join("llm/train_CoT_0.json"), None)?;
    let test = read_questions(&data.join("cqa_test.json"))?;
    let shots: Vec<(McQuestion, Option<String>)> = train
        .iter()
        .zip(&rationales)
        .take(3)
        .map(|(q, r)| {
            // The LLM's rationale without its own "So the answer is (x) ..." ending.
            let r = r.split("So the answer is").next().unwrap_or(r).trim_end();
            (q.clone(), Some(r.to_string()))
        })
        .collect();
    let test = &test[..n.min(test.len())];
    let format = |ac| FewShotFormat {
        ac,
        anchors: PromptAnchors::Demonstrations,
        bos: Some(1),
    };
    let with_ac = few_shot_choices(tok, &shots, test, format(ac.ids.first().copied()))?;
    let plain = few_shot_choices(tok, &shots, test, format(None))?;
    Ok((with_ac, plain))
}
