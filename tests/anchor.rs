//! AnLLM: the AnSAN mask, anchor-cache inference equals the masked full forward, training.

mod common;

use burn::backend::Autodiff;
use burn::module::Module;
use burn::prelude::*;
use common::{B, Reference, device, fixture, max_abs_diff};
use kiln::anchor::{
    AcInit, AcPlacement, AnchorBatchSession, AnchorCheckpoint, AnchorExport, AnchorMode,
    AnchorSession, AnchorSet, Corpus, PositionMode, Segments, TrainConfig, add_ac_token, encode_ac,
    grow_vocab, save_checkpoint, train,
};
use kiln::core::{CausalLm, GenerationConfig, Tokenizer, generate};
use kiln::llama::{Llama, LlamaConfig};

/// The rule of the paper, written out slot by slot: true = hidden.
fn reference_mask(rows: &[Vec<u32>], anchors: &AnchorSet) -> Vec<bool> {
    let len = rows.iter().map(Vec::len).max().unwrap();
    let mut out = Vec::new();
    for row in rows {
        // sentence of each token: anchors close their sentence
        let mut sent = Vec::new();
        let mut s = 0;
        for &t in row {
            sent.push(s);
            if anchors.contains(t) {
                s += 1;
            }
        }
        for q in 0..len {
            for k in 0..len {
                let visible = if q >= row.len() || k >= row.len() {
                    q == k
                } else if k > q {
                    false
                } else if anchors.contains(row[q]) {
                    sent[k] == sent[q]
                } else {
                    sent[k] == sent[q] || anchors.contains(row[k])
                };
                out.push(!visible);
            }
        }
    }
    out
}

fn mask_values(seg: &Segments) -> Vec<bool> {
    seg.mask::<B>(&device())
        .into_data()
        .into_vec::<bool>()
        .unwrap()
}

#[test]
fn mask_hand_written_ep() {
    // Anchor id 9 (say "."): sentences [5 6 9] [7 9] [8 8], second row shorter (padding).
    let anchors = AnchorSet::new(AnchorMode::Ep, [9]).unwrap();
    let rows = vec![vec![5, 6, 9, 7, 9, 8, 8], vec![5, 9, 6, 6]];
    let seg = Segments::from_rows(&rows, Some(&anchors), 0);
    assert_eq!(seg.seg[..7], [0, 0, 0, 1, 1, 2, 2]);
    let got = mask_values(&seg);
    // Row 0 written by hand ('.' visible, 'x' hidden); query rows top to bottom.
    let hand = [
        ".xxxxxx", // 5: itself
        "..xxxxx", // 6: its sentence
        "...xxxx", // 9 (anchor): its own sentence, itself included
        "xx..xxx", // 7: earlier anchor 9@2, then itself
        "xxx..xx", // 9 (anchor): only its sentence [7 9]
        "xx.x..x", // 8: anchors 9@2 and 9@4, itself
        "xx.x...", // 8: anchors, its sentence
    ];
    let hand: Vec<bool> = hand.concat().chars().map(|c| c == 'x').collect();
    assert_eq!(got[..49], hand[..]);
    assert_eq!(got, reference_mask(&rows, &anchors));
    // Padding: slots 4..7 of row 1 see only themselves, and no valid query sees them.
    let row1 = &got[49..];
    for q in 0..7 {
        for k in 4..7 {
            assert_eq!(row1[q * 7 + k], q != k, "q {q} k {k}");
        }
    }
}

#[test]
fn mask_ac_mode_from_text() {
    let tokenizer = Tokenizer::from_dir(&fixture("llama2-mha")).unwrap();
    let (tokenizer, ac) = add_ac_token(&tokenizer).unwrap();
    assert_eq!(ac as usize, tokenizer.vocab_size() - 1);
    let anchors = AnchorSet::new(AnchorMode::Ac, [ac]).unwrap();
    let texts = [
        "The sun is hot. Ice is cold! Is water wet? yes",
        "One sentence only.",
    ];
    let rows: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| encode_ac(&tokenizer, t, ac, Some(1), AcPlacement::Prompt).unwrap())
        .collect();
    assert_eq!(rows[0].iter().filter(|&&t| t == ac).count(), 3);
    assert_eq!(*rows[1].last().unwrap(), ac);
    let decoded = tokenizer.decode(&rows[0], false).unwrap();
    assert!(decoded.contains("hot.<AC>"), "{decoded}");
    let seg = Segments::from_rows(&rows, Some(&anchors), 0);
    assert_eq!(mask_values(&seg), reference_mask(&rows, &anchors));
    // Also EP mode on the same tokens with '.' as anchor.
    let ep = kiln::anchor::ep_anchor_ids(&tokenizer, &["."]).unwrap();
    let seg = Segments::from_rows(&rows, Some(&ep), 0);
    assert_eq!(mask_values(&seg), reference_mask(&rows, &ep));
}

fn logits_full(
    model: &Llama<B>,
    tokens: &[u32],
    positions: &[i64],
    anchors: &AnchorSet,
) -> Vec<f32> {
    let dev = device();
    let n = tokens.len();
    let seg = Segments::from_rows(&[tokens.to_vec()], Some(anchors), 0);
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    let t = Tensor::from_data(TensorData::new(ids, [1, n]), &dev);
    let p = Tensor::from_data(TensorData::new(positions.to_vec(), [1, n]), &dev);
    model
        .forward_masked(t, p, Some(seg.mask(&dev)), None)
        .unwrap()
        .into_data()
        .into_vec::<f32>()
        .unwrap()
}

#[test]
fn anchor_cache_equals_masked_full_forward() {
    let model = Llama::<B>::from_pretrained(&fixture("llama2-mha"), &device()).unwrap();
    // Token 29 plays the anchor (and 31, to have two anchor ids).
    let anchors = AnchorSet::new(AnchorMode::Ep, [29, 31]).unwrap();
    let tokens: Vec<u32> = vec![
        1, 40, 41, 42, 29, 50, 51, 31, 60, 61, 62, 63, 29, 70, 71, 72, 29, 80, 81, 82, 83, 84, 29,
        90, 91,
    ];
    // Prefill of 9 (two anchors inside), then single steps, then a chunk of 5 with an anchor.
    let chunks: Vec<std::ops::Range<usize>> =
        vec![0..9, 9..10, 10..11, 11..12, 12..13, 13..18, 18..25];
    for mode in [PositionMode::True, PositionMode::Compacted] {
        let mut session = AnchorSession::new(&model, anchors.clone(), mode);
        let mut got = Vec::new();
        let mut compacted = false;
        for c in &chunks {
            let logits = session.feed(&tokens[c.clone()]).unwrap();
            got.extend(logits.into_data().into_vec::<f32>().unwrap());
            compacted |= session.cache_len() < session.seen();
        }
        assert!(compacted, "the cache was never compacted");
        // Compacted cache: the 5 anchors + the 2 tokens after the last one.
        assert_eq!(session.cache_len(), 5 + 2);
        let positions = session.positions().to_vec();
        if mode == PositionMode::True {
            assert_eq!(positions, (0..tokens.len() as i64).collect::<Vec<_>>());
        } else {
            assert!(positions.last().unwrap() < &(tokens.len() as i64 - 1));
        }
        let want = logits_full(&model, &tokens, &positions, &anchors);
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "{mode:?}: max diff {diff}");
    }
}

/// The rule, counted from the token ids alone: after `tokens` an anchor cache holds every
/// anchor and the tokens after the last one (everything while there is no anchor).
fn rule_cache_len(tokens: &[u32], anchors: &AnchorSet) -> usize {
    match tokens.iter().rposition(|&t| anchors.contains(t)) {
        Some(last) => {
            tokens[..last]
                .iter()
                .filter(|&&t| anchors.contains(t))
                .count()
                + tokens.len()
                - last
        }
        None => tokens.len(),
    }
}

/// Three rows of different lengths for the batched tests: anchors (29 and 31) in different
/// places, the last row without any; and per feed the chunk length of each row (0 = the row
/// only gets padding in that feed).
fn batch_rows() -> (Vec<Vec<u32>>, Vec<[usize; 3]>) {
    let rows = vec![
        vec![
            1, 40, 41, 42, 29, 50, 51, 31, 60, 61, 62, 63, 29, 70, 71, 72, 29, 80, 81, 82, 83, 84,
            29, 90, 91,
        ],
        vec![1, 29, 44, 45, 46, 47, 31, 48, 49, 50, 29, 52, 53],
        (0..18).map(|i| if i == 0 { 1 } else { 99 + i }).collect(),
    ];
    let schedule = vec![
        [9, 3, 6],
        [1, 0, 2],
        [1, 4, 0],
        [1, 1, 1],
        [1, 1, 5],
        [5, 4, 3],
        [7, 0, 1],
    ];
    for (r, row) in rows.iter().enumerate() {
        assert_eq!(schedule.iter().map(|s| s[r]).sum::<usize>(), row.len());
    }
    (rows, schedule)
}

/// Per row of one batched run: the logits of its real tokens, its positions, and its cache
/// length after every feed.
struct BatchRun {
    logits: Vec<Vec<f32>>,
    positions: Vec<Vec<i64>>,
    cache_lens: Vec<Vec<usize>>,
}

fn run_batch(
    model: &Llama<B>,
    anchors: &AnchorSet,
    mode: PositionMode,
    pad_id: u32,
    rows: &[Vec<u32>],
    schedule: &[[usize; 3]],
) -> BatchRun {
    let vocab = model.config().vocab_size;
    let mut session =
        AnchorBatchSession::new(model, anchors.clone(), mode, rows.len()).with_pad_id(pad_id);
    let mut start = vec![0; rows.len()];
    let mut logits = vec![Vec::new(); rows.len()];
    let mut cache_lens = vec![Vec::new(); rows.len()];
    for lens in schedule {
        let chunks: Vec<&[u32]> = (0..rows.len())
            .map(|r| &rows[r][start[r]..start[r] + lens[r]])
            .collect();
        let out = session.feed(&chunks).unwrap();
        let [batch, n, v] = out.dims();
        assert_eq!(
            (batch, n, v),
            (rows.len(), *lens.iter().max().unwrap(), vocab)
        );
        let values = out.into_data().into_vec::<f32>().unwrap();
        for r in 0..rows.len() {
            logits[r].extend(&values[r * n * vocab..(r * n + lens[r]) * vocab]);
            start[r] += lens[r];
            cache_lens[r].push(session.cache_len(r));
        }
        assert_eq!(
            session.width(),
            *session.cache_lens().iter().max().unwrap(),
            "the padded cache is wider than its longest row"
        );
    }
    BatchRun {
        logits,
        positions: (0..rows.len())
            .map(|r| session.positions(r).to_vec())
            .collect(),
        cache_lens,
    }
}

/// A batch of three rows of different lengths, fed in chunks of different lengths per row
/// (some rows padding-only in some feeds), gives every row the logits of its own batch-1
/// masked full forward (the oracle `anchor_cache_equals_masked_full_forward` ties to the
/// batch-1 session), in both position modes; each row's cache after every feed holds what the
/// rule counted from its token ids says, and its compacted positions are that count + offset.
#[test]
fn batched_anchor_cache_equals_per_row_masked_forward() {
    let model = Llama::<B>::from_pretrained(&fixture("llama2-mha"), &device()).unwrap();
    let anchors = AnchorSet::new(AnchorMode::Ep, [29, 31]).unwrap();
    let (rows, schedule) = batch_rows();
    let mut worst: f32 = 0.0;
    for mode in [PositionMode::True, PositionMode::Compacted] {
        let run = run_batch(&model, &anchors, mode, 0, &rows, &schedule);
        for (r, tokens) in rows.iter().enumerate() {
            // Positions and cache lengths from the ids and the schedule alone.
            let mut want_positions = Vec::new();
            let mut start = 0;
            for (f, lens) in schedule.iter().enumerate() {
                let cached = rule_cache_len(&tokens[..start], &anchors);
                for j in 0..lens[r] {
                    want_positions.push(match mode {
                        PositionMode::True => (start + j) as i64,
                        PositionMode::Compacted => (cached + j) as i64,
                    });
                }
                start += lens[r];
                assert_eq!(
                    run.cache_lens[r][f],
                    rule_cache_len(&tokens[..start], &anchors),
                    "{mode:?} row {r} feed {f}"
                );
            }
            assert_eq!(run.positions[r], want_positions, "{mode:?} row {r}");
            let want = logits_full(&model, tokens, &want_positions, &anchors);
            let diff = max_abs_diff(&run.logits[r], &want);
            worst = worst.max(diff);
            assert!(diff < 1e-4, "{mode:?} row {r}: max diff {diff}");
        }
        if mode == PositionMode::Compacted {
            // The anchored rows really ran on compacted positions.
            assert!(run.positions[0].last().unwrap() < &(rows[0].len() as i64 - 1));
            assert!(run.positions[1].last().unwrap() < &(rows[1].len() as i64 - 1));
        }
    }
    // The rule on the final rows, written out: 5 anchors + 2; 3 anchors + 2; no anchor, all 18.
    let finals: Vec<usize> = rows.iter().map(|t| rule_cache_len(t, &anchors)).collect();
    assert_eq!(finals, [7, 5, 18]);
    eprintln!("batched anchor cache vs per-row masked forward: max |diff| {worst:e}");
}

/// Padding never leaks: the same batch with the pad id 0, an anchor id (29) or another token
/// gives every row bit-identical logits, positions and cache lengths.
#[test]
fn batched_padding_never_leaks() {
    let model = Llama::<B>::from_pretrained(&fixture("llama2-mha"), &device()).unwrap();
    let anchors = AnchorSet::new(AnchorMode::Ep, [29, 31]).unwrap();
    let (rows, schedule) = batch_rows();
    for mode in [PositionMode::True, PositionMode::Compacted] {
        let base = run_batch(&model, &anchors, mode, 0, &rows, &schedule);
        for pad in [29, 31, 500] {
            let other = run_batch(&model, &anchors, mode, pad, &rows, &schedule);
            assert_eq!(other.cache_lens, base.cache_lens, "{mode:?} pad {pad}");
            assert_eq!(other.positions, base.positions, "{mode:?} pad {pad}");
            for r in 0..rows.len() {
                assert!(
                    other.logits[r] == base.logits[r],
                    "{mode:?} pad {pad} row {r}: max diff {}",
                    max_abs_diff(&other.logits[r], &base.logits[r])
                );
            }
        }
    }
}

/// Batched anchor generation gives every row what it gives alone (tokens, cache length, peak,
/// tokens seen), with rows ending at different steps (a `Break` after 8 tokens for HF's batch
/// prompts and 5 for the anchored row, 20 for the fixture prompt): greedy, both position
/// modes, and with the pad id an anchor or not. The rows without anchors also give HF's greedy
/// ids (`batch_greedy_ids`, `greedy_ids`).
#[test]
fn batched_anchor_generation_equals_rows_alone() {
    use common::Reference;
    use kiln::anchor::{anchor_generate, anchor_generate_batch};
    use kiln::core::GenerationConfig;
    use std::ops::ControlFlow;
    let name = "llama2-mha";
    let model = Llama::<B>::from_pretrained(&fixture(name), &device()).unwrap();
    let reference = Reference::load(name);
    let (_, prompt) = reference.ids("prompt_ids");
    let (_, greedy) = reference.ids("greedy_ids");
    let (shape, input) = reference.ids("batch_input_ids");
    let (_, attention) = reference.ids("batch_attention_mask");
    let (gshape, batch_greedy) = reference.ids("batch_greedy_ids");
    let width = shape[1];
    let mut prompts: Vec<Vec<u32>> = (0..shape[0])
        .map(|r| {
            (0..width)
                .filter(|&t| attention[r * width + t] == 1)
                .map(|t| input[r * width + t])
                .collect()
        })
        .collect();
    let mut want_hf: Vec<Vec<u32>> = batch_greedy
        .chunks(gshape[1])
        .map(<[u32]>::to_vec)
        .collect();
    prompts.push(prompt.clone());
    want_hf.push(greedy.clone());
    // An anchor id that none of HF's prompts or greedy continuations holds, so those rows run
    // with a plain causal cache; a fifth row holds it twice.
    let hf_ids: Vec<u32> = prompts.iter().chain(&want_hf).flatten().copied().collect();
    let a = (20..500).find(|id| !hf_ids.contains(id)).unwrap();
    prompts.push(vec![1, 40, 41, a, 50, 51, 52, 53, a, 60, 61]);
    let limits = [8, 8, 8, 20, 5];
    let anchors = AnchorSet::new(AnchorMode::Ep, [a]).unwrap();
    let config = GenerationConfig::default()
        .with_max_new_tokens(20)
        .with_eos_token_ids(vec![]);
    for mode in [PositionMode::True, PositionMode::Compacted] {
        let alone: Vec<_> = prompts
            .iter()
            .zip(limits)
            .map(|(p, limit)| {
                let mut seen = 0;
                anchor_generate(&model, p, &anchors, mode, &config, None, |_| {
                    seen += 1;
                    if seen == limit {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                })
                .unwrap()
            })
            .collect();
        for pad in [0, a] {
            let mut counts = [0; 5];
            let batch = anchor_generate_batch(
                &model,
                &prompts,
                &anchors,
                mode,
                &config.clone().with_pad_token_id(pad),
                None,
                |event| {
                    counts[event.row] += 1;
                    assert!(
                        counts[event.row] <= limits[event.row],
                        "a token after the break"
                    );
                    if counts[event.row] == limits[event.row] {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                },
            )
            .unwrap();
            assert_eq!(batch, alone, "{mode:?} pad {pad}");
        }
        for (r, want) in want_hf.iter().enumerate() {
            assert_eq!(alone[r].tokens, *want, "{mode:?} row {r} vs HF");
        }
        let anchored = &alone[4];
        assert_eq!(anchored.tokens.len(), 5);
        assert!(
            anchored.cache_len < anchored.seen,
            "the anchored row was never compacted"
        );
    }
}

#[test]
fn training_lowers_loss_and_resumes_exactly() {
    type A = Autodiff<B>;
    let dev = device();
    let json = kiln::anchor::tiny_config(40, 32, 2, 2, 64, 64);
    let config = LlamaConfig::from_json(json, std::path::Path::new("tiny")).unwrap();
    A::seed(&dev, 7);
    // `init` is lazy: materialise the weights once so that clones share them.
    let model: Llama<A> = config.init(&dev);
    let model = config.init(&dev).load_record(model.into_record());
    let anchors = AnchorSet::new(AnchorMode::Ac, [39]).unwrap();
    // A tiny repetitive corpus with anchors: easy to fit.
    let rows: Vec<Vec<u32>> = (0..12)
        .map(|i| {
            let a = 2 + (i % 5) as u32;
            vec![1, a, a + 5, a + 10, 39, a + 1, a + 6, 39]
        })
        .collect();
    let corpus = Corpus::new(rows, 32);
    let cfg = TrainConfig::default()
        .with_steps(8)
        .with_warmup_steps(2)
        .with_batch_size(3)
        .with_grad_accum(2)
        .with_lr(1e-2)
        .with_save_every(4)
        .with_log_every(0);
    let dir = tempfile::tempdir().unwrap();
    let (full, report) = train(
        model.clone(),
        &corpus,
        Some(&anchors),
        &cfg,
        None,
        false,
        |_, _, _| {},
    )
    .unwrap();
    let losses: Vec<f32> = report.losses.iter().map(|l| l.1).collect();
    assert!(losses[7] < losses[0] * 0.8, "loss did not fall: {losses:?}");

    // An interrupted run: 4 steps of the same 8-step schedule, checkpointed; then resume
    // into a differently initialised model.
    let (_, r4) = train_until(model.clone(), &corpus, &anchors, &cfg, dir.path(), 4);
    assert_eq!(r4.step, 4);
    A::seed(&dev, 99);
    let other: Llama<A> = config.init(&dev);
    let (resumed, r) = train(
        other,
        &corpus,
        Some(&anchors),
        &cfg,
        Some(dir.path()),
        true,
        |_, _, _| {},
    )
    .unwrap();
    assert_eq!(r.step, 8);
    let resumed_losses: Vec<f32> = r.losses.iter().map(|l| l.1).collect();
    assert_eq!(resumed_losses, losses, "resumed losses differ");
    let a = full
        .model
        .embed_tokens
        .weight
        .val()
        .into_data()
        .into_vec::<f32>()
        .unwrap();
    let b = resumed
        .model
        .embed_tokens
        .weight
        .val()
        .into_data()
        .into_vec::<f32>()
        .unwrap();
    assert_eq!(a, b, "resumed weights differ");
}

/// Trains with `config` but stops (with a checkpoint) after `stop` steps: emulates an
/// interrupted run by running `stop` steps with save_every = stop.
fn train_until(
    model: Llama<Autodiff<B>>,
    corpus: &Corpus,
    anchors: &AnchorSet,
    config: &TrainConfig,
    dir: &std::path::Path,
    stop: usize,
) -> (Llama<Autodiff<B>>, kiln::anchor::TrainReport) {
    kiln::anchor::train_steps(
        model,
        corpus,
        Some(anchors),
        config,
        Some(dir),
        false,
        stop,
        |_, _, _| {},
    )
    .unwrap()
}

/// EP anchors are the exact `.` token by default, as the reference's `--anchor_symbols "."`;
/// the word-start spellings (`Ġ.`) only when asked for.
#[test]
fn ep_anchors_are_the_exact_tokens() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tokenizers/smollm2-135m-instruct");
    let tokenizer = kiln::core::Tokenizer::from_dir(&dir).unwrap();
    let dot = tokenizer.token_to_id(".").unwrap();
    let exact = kiln::anchor::ep_anchor_ids(&tokenizer, &["."]).unwrap();
    assert_eq!(exact.ids.iter().copied().collect::<Vec<_>>(), vec![dot]);
    let with = kiln::anchor::ep_anchor_ids_with_variants(&tokenizer, &["."]).unwrap();
    assert!(with.ids.contains(&tokenizer.token_to_id("Ġ.").unwrap()));
    assert!(with.ids.len() > exact.ids.len());
}

/// `<AC>` starts as the copy of a row (the reference code) or the mean of all rows (the paper),
/// checked against the rows read on the host.
#[test]
fn ac_row_initialisation() {
    use kiln::anchor::{AcInit, grow_vocab};
    let model = Llama::<B>::from_pretrained(&fixture("llama2-mha"), &device()).unwrap();
    let rows: Vec<f32> = model
        .model
        .embed_tokens
        .dense_weight()
        .into_data()
        .into_vec()
        .unwrap();
    let (vocab, hidden) = (model.config().vocab_size, model.config().hidden_size);
    let mean: Vec<f32> = (0..hidden)
        .map(|j| (0..vocab).map(|i| rows[i * hidden + j] as f64).sum::<f64>() as f32 / vocab as f32)
        .collect();
    for (init, expected) in [
        (AcInit::Copy(5), rows[5 * hidden..6 * hidden].to_vec()),
        (AcInit::Mean, mean),
    ] {
        let grown = grow_vocab(model.clone(), init).unwrap();
        assert_eq!(grown.config().vocab_size, vocab + 1);
        let new: Vec<f32> = grown
            .model
            .embed_tokens
            .dense_weight()
            .narrow(0, vocab, 1)
            .into_data()
            .into_vec()
            .unwrap();
        assert!(max_abs_diff(&new, &expected) < 1e-5, "{init:?}");
    }
}

/// `anchor_generate`'s callback stops generation with `ControlFlow::Break` right after the
/// token it saw (the same contract as kiln-core's `generate`): greedy on the llama2-mha fixture
/// with token 29 as anchor, broken at the fourth token, gives the first four tokens of HF's
/// greedy continuation (`greedy_ids`, which the anchor-free cache also gives, as no anchor
/// occurs in it).
#[test]
fn anchor_generate_stops_on_break() {
    use common::Reference;
    use kiln::anchor::anchor_generate;
    use kiln::core::GenerationConfig;
    use std::ops::ControlFlow;
    let name = "llama2-mha";
    let model = Llama::<B>::from_pretrained(&fixture(name), &device()).unwrap();
    let reference = Reference::load(name);
    let (_, prompt) = reference.ids("prompt_ids");
    let (_, greedy) = reference.ids("greedy_ids");
    let anchors = AnchorSet::new(AnchorMode::Ep, [29]).unwrap();
    assert!(!greedy[..4].contains(&29) && !prompt.contains(&29));
    let mut seen = 0;
    let out = anchor_generate(
        &model,
        &prompt,
        &anchors,
        PositionMode::Compacted,
        &GenerationConfig::default()
            .with_max_new_tokens(16)
            .with_eos_token_ids(vec![]),
        None,
        |_| {
            seen += 1;
            assert!(seen <= 4, "a token after the break");
            if seen == 4 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    )
    .unwrap();
    assert_eq!(out.tokens, greedy[..4]);
}

fn host(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

fn id_tensor(ids: &[u32]) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(data, [1, ids.len()]), &device())
}

/// `kiln anchor export` of an AC model trained by `kiln anchor train`, loaded by transformers
/// (`tools/make_fixtures.py --only anchor-export`): kiln's normal loader reads the same folder
/// and gives HF's full-attention logits and greedy ids, and its tokenizer has `<AC>` at HF's id.
#[test]
fn anchor_export_matches_transformers() {
    let dir = fixture("anchor-export");
    let reference = Reference::load("anchor-export");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let loaded = kiln::auto::load::<B>(dir.to_str().unwrap(), &device()).unwrap();
    let model = loaded.model;
    let tokenizer = loaded.tokenizer.expect("the export has a tokenizer");
    let ac = meta["ac_id"].as_u64().unwrap() as u32;
    assert_eq!(tokenizer.token_to_id("<AC>"), Some(ac));
    assert_eq!(model.config().vocab_size, ac as usize + 1);
    assert!(model.lm_head.is_none(), "the fixture's head is tied");

    // kiln encodes the text with a literal <AC> as HF did, and its own AC placement of the plain
    // text gives the same ids: the exported tokenizer is the one the model was trained with.
    let (_, prompt) = reference.ids("prompt_ids");
    let text = meta["prompt"].as_str().unwrap();
    assert_eq!(tokenizer.encode(text, true).unwrap(), prompt);
    let plain = text.replace("<AC>", "");
    let bos = model.config().bos_token_id;
    assert_eq!(
        encode_ac(&tokenizer, &plain, ac, bos, AcPlacement::Prompt).unwrap(),
        prompt
    );

    let (_, prefill) = reference.f32("prefill_logits");
    let (step_shape, steps) = reference.f32("step_logits");
    let (_, greedy) = reference.ids("greedy_ids");
    let mut cache = model.new_cache(vec![0]);
    let all = host(model.forward(id_tensor(&prompt), &mut cache, true));
    let diff = max_abs_diff(&all, &prefill);
    assert!(diff < 1e-4, "prefill logits differ by {diff}");
    let mut cache = model.new_cache(vec![0]);
    let mut logits = host(model.forward(id_tensor(&prompt), &mut cache, false));
    let mut worst = diff;
    for (i, expected) in steps.chunks_exact(step_shape[1]).enumerate() {
        let diff = max_abs_diff(&logits, expected);
        assert!(diff < 1e-4, "decode step {i} logits differ by {diff}");
        worst = worst.max(diff);
        if i + 1 < greedy.len() {
            logits = host(model.forward(id_tensor(&greedy[i..i + 1]), &mut cache, false));
        }
    }
    eprintln!("anchor-export: max |logit - HF| {worst:.2e}");
    let config = GenerationConfig::default().with_max_new_tokens(greedy.len());
    let out = generate(&model, &[prompt], &config, None, |_, _| {}).unwrap();
    assert_eq!(out[0].tokens, greedy, "greedy ids");

    let anchors = AnchorExport::read(&dir).unwrap();
    assert_eq!(
        anchors.anchors,
        Some(AnchorSet::new(AnchorMode::Ac, [ac]).unwrap())
    );
    assert_eq!(anchors.ac_token.as_deref(), Some("<AC>"));
    assert_eq!(anchors.bos, bos);
    assert_eq!(anchors.position_mode, PositionMode::Compacted);
}

/// A checkpoint with a grown vocabulary and an untied head (the llama2-mha fixture plus `<AC>`)
/// exported and read back by `Llama::from_pretrained` gives the in-memory model's logits; the
/// folder's tokenizer keeps `<AC>` special at the same id.
#[test]
fn anchor_export_round_trips() {
    let dev = device();
    let source = fixture("llama2-mha");
    let model = Llama::<B>::from_pretrained(&source, &dev).unwrap();
    let tokenizer = Tokenizer::from_dir(&source).unwrap();
    let (tokenizer, ac) = add_ac_token(&tokenizer).unwrap();
    let model = grow_vocab(model, AcInit::Mean).unwrap();
    let config_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap())
            .unwrap();
    let meta = AnchorCheckpoint {
        anchors: Some(AnchorSet::new(AnchorMode::Ac, [ac]).unwrap()),
        bos: Some(1),
    };
    let tmp = tempfile::tempdir().unwrap();
    let (ckpt, out) = (tmp.path().join("ckpt"), tmp.path().join("hf"));
    save_checkpoint(&ckpt, &model, &config_json, Some(&tokenizer), &meta).unwrap();
    kiln::anchor::export::<B>(&ckpt, &out, PositionMode::True, &dev).unwrap();

    let back = Llama::<B>::from_pretrained(&out, &dev).unwrap();
    assert_eq!(back.config().vocab_size, 510);
    assert!(back.lm_head.is_some(), "the untied head is kept");
    let text = "The sky is blue.<AC> Grass is";
    let back_tok = Tokenizer::from_dir(&out).unwrap();
    assert_eq!(back_tok.token_to_id("<AC>"), Some(ac));
    let ids = tokenizer.encode(text, true).unwrap();
    assert_eq!(back_tok.encode(text, true).unwrap(), ids);
    assert!(ids.contains(&ac));
    assert!(!back_tok.decode(&ids, true).unwrap().contains("<AC>"));
    let logits = |m: &Llama<B>| host(m.forward(id_tensor(&ids), &mut m.new_cache(vec![0]), true));
    let diff = max_abs_diff(&logits(&back), &logits(&model));
    assert!(diff < 1e-5, "exported logits differ by {diff}");

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["additional_special_tokens"],
        serde_json::json!(["<AC>"])
    );
    assert_eq!(
        config["added_tokens_decoder"][ac.to_string()]["special"],
        true
    );
    let anchors = AnchorExport::read(&out).unwrap();
    assert_eq!(anchors.anchors, meta.anchors);
    assert_eq!(anchors.position_mode, PositionMode::True);

    // Errors name the folder: exporting over the checkpoint, or a folder that is none.
    let err = kiln::anchor::export::<B>(&ckpt, &ckpt, PositionMode::Compacted, &dev).unwrap_err();
    assert!(err.to_string().contains("checkpoint itself"), "{err}");
    let err = kiln::anchor::export::<B>(&out, &tmp.path().join("x"), PositionMode::Compacted, &dev)
        .unwrap_err();
    assert!(err.to_string().contains("anchor train"), "{err}");
}
