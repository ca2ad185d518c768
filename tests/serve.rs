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

/// A Llama-3-style chat template for the tiny fixture (whose tokenizer has the header and
/// end-of-turn tokens but no template).
const TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}<|start_header_id|>\
{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}\
{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";

/// A running `kiln serve`, stopped with SIGTERM on drop.
struct Server {
    child: std::process::Child,
    url: String,
}

impl Server {
    fn start(model: &std::path::Path, extra: &[&str]) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["serve", "--port", "0", "--model"])
            .arg(model)
            .args(extra)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                eprintln!("[server] {line}");
                if let Some(url) = line.split("listening on ").nth(1) {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let url = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("kiln serve did not start listening within 60 s");
        Self { child, url }
    }

    /// Sends SIGTERM and returns whether it exited cleanly within `secs`.
    fn terminate(mut self, secs: u64) -> bool {
        let pid = self.child.id().to_string();
        // The shell's builtin, so no procps is needed.
        let _ = std::process::Command::new("sh")
            .args(["-c", &format!("kill -TERM {pid}")])
            .status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `python3` can import `openai` (tools/test.sh installs it); without it the test fails
/// under KILN_REQUIRE_DATA and is skipped, saying so, elsewhere.
fn have_openai() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let reason = "python3 cannot import openai; run `pip install openai`";
        if std::env::var_os("KILN_REQUIRE_DATA").is_some_and(|v| !v.is_empty() && v != "0") {
            panic!("KILN_REQUIRE_DATA is set and {reason}");
        }
        eprintln!("SKIP: {reason}");
    }
    ok
}

/// `kiln serve` driven by the official `openai` client (tests/serve/openai_client.py): greedy
/// outputs equal `kiln generate`'s, streaming, stop strings, 16 concurrent clients equal to
/// their one-at-a-time outputs, 400s for bad requests, the API key, 503 past the bound and a
/// place freed by a client that disconnects; /v1/translations on the NLLB fixture equal to
/// `kiln translate`; then SIGTERM stops every server cleanly.
#[test]
fn openai_client_against_kiln_serve() {
    if !have_openai() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("llama-tied")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    std::fs::write(dir.path().join("chat_template.jinja"), TEMPLATE).unwrap();
    let main = Server::start(
        dir.path(),
        &["--api-key", "sekrit", "--max-concurrent", "16"],
    );
    // The bound test holds a stream open while it sends a second request: the tiny fixture
    // decodes its 64 tokens in a few milliseconds, which raced that request (the place was
    // free again when it came), so the real SmolLM2 (~0.5 s for 64 tokens) serves it.
    let slow = smollm2_gguf();
    let small = Server::start(
        slow.as_deref().unwrap_or(dir.path()),
        &["--max-concurrent", "1", "--queue", "0"],
    );
    let nllb = fixture("nllb-tiny");
    let translate = Server::start(&nllb, &[]);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve/openai_client.py");
    let mut client = std::process::Command::new("python3")
        .arg(&script)
        .args(["--base-url", &main.url, "--small-url", &small.url])
        .args([
            "--api-key",
            "sekrit",
            "--kiln",
            env!("CARGO_BIN_EXE_kiln"),
            "--model",
        ])
        .arg(dir.path())
        .args(["--translate-url", &translate.url, "--nllb"])
        .arg(&nllb)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    let status = loop {
        if let Some(status) = client.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = client.kill();
            panic!("the openai client script ran past 600 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "the openai client script failed: {status}"
    );
    assert!(
        main.terminate(20),
        "kiln serve did not exit cleanly on SIGTERM"
    );
    assert!(
        small.terminate(20),
        "kiln serve did not exit cleanly on SIGTERM"
    );
}

/// `finish_all` (a server's shutdown) ends every sequence at once with a `Done` holding the
/// tokens so far: a prefix of HF's greedy continuation.
#[test]
fn batcher_finish_all_ends_every_row() {
    let name = "llama3-gqa";
    let reference = Reference::load(name);
    let model = Llama::<B>::from_pretrained(&fixture(name), &device()).unwrap();
    let (_, prompt) = reference.ids("prompt_ids");
    let (_, greedy) = reference.ids("greedy_ids");
    let mut batcher = Batcher::new(&model, None);
    let sinks: Vec<Collect> = (0..2).map(|_| Collect::default()).collect();
    for sink in &sinks {
        batcher.add(request(&prompt, greedy.len(), sink));
    }
    for _ in 0..4 {
        batcher.step();
    }
    batcher.finish_all();
    assert!(batcher.is_empty());
    for sink in &sinks {
        // One token from the prefill, one per step.
        assert_eq!(sink.tokens().unwrap(), greedy[..5]);
    }
}
