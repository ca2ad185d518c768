//! Continuous batching and `kiln serve`.
//!
//! - The batcher: requests that join a running batch at different steps, and leave it at
//!   different steps, each get HF's greedy tokens for their prompt alone (fixtures' references).
//! - The server: `tests/serve/openai_client.py` drives `kiln serve` with the official `openai`
//!   package (see that file for what it checks).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use kiln::core::GenerationConfig;
use kiln::core::batching::{BatchEvent, BatchRequest, BatchSink, Batcher};
use kiln::llama::Llama;

/// Collects a request's events until `closed` is set (a client that went away).
#[derive(Clone, Default)]
struct Collect {
    events: Arc<Mutex<Vec<BatchEvent>>>,
    closed: Arc<AtomicBool>,
}

impl BatchSink for Collect {
    fn send(&mut self, event: BatchEvent) -> bool {
        self.events.lock().unwrap().push(event);
        !self.is_closed()
    }
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

impl Collect {
    fn tokens(&self) -> Option<Vec<u32>> {
        self.events.lock().unwrap().iter().find_map(|e| match e {
            BatchEvent::Done { generation, .. } => Some(generation.tokens.clone()),
            BatchEvent::Failed(e) => panic!("failed: {e}"),
            BatchEvent::Text(_) => None,
        })
    }
}

fn request(prompt: &[u32], max_new: usize, sink: &Collect) -> BatchRequest {
    BatchRequest {
        prompt: prompt.to_vec(),
        // No EOS: HF's references were made with min_new_tokens = max_new_tokens.
        config: GenerationConfig::default().with_max_new_tokens(max_new),
        frequency_penalty: 0.0,
        presence_penalty: 0.0,
        sink: Box::new(sink.clone()),
    }
}

/// Four prompts of different lengths join a running batch at steps 0, 3, 4 and 4 (one while a
/// longer one runs, so rows are padded both ways); a fifth leaves mid-way by closing its sink.
/// Every finished row must equal HF's greedy continuation of its prompt alone.
fn joins_and_leaves(name: &str) {
    let reference = Reference::load(name);
    let model = Llama::<B>::from_pretrained(&fixture(name), &device()).unwrap();
    let (_, prompt) = reference.ids("prompt_ids");
    let (_, greedy) = reference.ids("greedy_ids");
    let (shape, ids) = reference.ids("batch_input_ids");
    let (_, mask) = reference.ids("batch_attention_mask");
    let (gshape, batch_greedy) = reference.ids("batch_greedy_ids");
    let width = shape[1];
    let batch_prompts: Vec<Vec<u32>> = ids
        .chunks_exact(width)
        .zip(mask.chunks_exact(width))
        .map(|(row, m)| row[m.iter().filter(|&&x| x == 0).count()..].to_vec())
        .collect();
    let expected_batch: Vec<&[u32]> = batch_greedy.chunks_exact(gshape[1]).collect();

    let mut batcher = Batcher::new(&model, None);
    let single = Collect::default();
    let rows: Vec<Collect> = (0..batch_prompts.len())
        .map(|_| Collect::default())
        .collect();
    let leaver = Collect::default();
    batcher.add(request(&prompt, greedy.len(), &single));
    batcher.add(request(&batch_prompts[2], 30, &leaver));
    let mut peak = batcher.len();
    for step in 0.. {
        if step == 2 {
            leaver.closed.store(true, Ordering::Relaxed);
        }
        if step == 3 {
            batcher.add(request(&batch_prompts[0], gshape[1], &rows[0]));
        }
        if step == 4 {
            batcher.add(request(&batch_prompts[1], gshape[1], &rows[1]));
            batcher.add(request(&batch_prompts[2], gshape[1], &rows[2]));
        }
        peak = peak.max(batcher.len());
        if batcher.is_empty() && step > 4 {
            break;
        }
        batcher.step();
    }
    assert!(peak >= 4, "{name}: at most {peak} rows ran together");
    assert_eq!(single.tokens().unwrap(), greedy, "{name}: the long prompt");
    for (row, sink) in rows.iter().enumerate() {
        assert_eq!(
            sink.tokens().unwrap(),
            expected_batch[row],
            "{name}: batch prompt {row}"
        );
    }
    // The leaver was dropped when it stopped listening: no Done was sent.
    assert!(
        leaver.tokens().is_none(),
        "{name}: the closed request finished"
    );
}

#[test]
fn batcher_llama3_gqa() {
    joins_and_leaves("llama3-gqa");
}

#[test]
fn batcher_llama2_mha() {
    joins_and_leaves("llama2-mha");
}

/// Sliding window 6: rows whose caches already dropped keys join rows that have not.
#[test]
fn batcher_mistral_sliding_window() {
    joins_and_leaves("mistral-sw");
}
