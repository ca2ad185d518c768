//! Fuzzing on stable Rust for every loader of untrusted model files: a seeded mutation loop
//! (no nightly, no libFuzzer), structure-aware for JSON and byte-level for binary files.
//! Used by `tests/untrusted/fuzz.rs` (a short deterministic run in CI) and `tests/fuzzing/fuzz.rs` (a
//! time-bounded run per target, reported in `tests/fuzzing/README.md`).
//!
//! Each target writes a mutated input where the loader expects it, runs the loader and then
//! what an app would do with the result, under `catch_unwind`. A finding is a panic, an input
//! that took longer than the per-input limit, or one whose peak allocation passed the memory
//! limit (measured by [`CountingAlloc`], which the binary installs as its global allocator).
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kiln::backend::{Backend as B, device};
use serde_json::Value;

/// The system allocator, counting live and peak bytes.
pub struct CountingAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size > layout.size() {
                let live = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed)
                    + (new_size - layout.size());
                PEAK.fetch_max(live, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

/// Runs `f` and returns its result with the most bytes it had allocated at once beyond what
/// was live before (0 when [`CountingAlloc`] is not the global allocator). The counters are
/// process-wide, so measurements take turns (tests run on several threads).
pub fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

/// Deterministic xorshift, so every finding reproduces from its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values that break parsers: zero, negative, huge, non-integral, wrong types.
fn hostile_value(rng: &mut Rng) -> Value {
    match rng.below(14) {
        0 => Value::from(0),
        1 => Value::from(-1),
        2 => Value::from(u32::MAX),
        3 => Value::from(u64::MAX),
        4 => Value::from(1u64 << 40),
        5 => Value::from(1e308),
        6 => Value::from(0.5),
        7 => Value::Null,
        8 => Value::from(""),
        9 => Value::from("x".repeat(rng.below(300))),
        10 => Value::from(true),
        11 => Value::Array(vec![]),
        12 => Value::Object(Default::default()),
        _ => Value::Array(vec![Value::from(1 << 30); 1 + rng.below(4)]),
    }
}

/// One structure-aware mutation of a JSON document: a random node replaced by a hostile
/// value, scaled, deleted or duplicated.
pub fn mutate_json(value: &mut Value, rng: &mut Rng) {
    let depth = 1 + rng.below(6);
    mutate_at(value, depth, rng);
}

fn mutate_at(node: &mut Value, depth: usize, rng: &mut Rng) {
    if depth > 0 {
        match node {
            Value::Object(map) if !map.is_empty() => {
                let key = map.keys().nth(rng.below(map.len())).cloned().unwrap();
                if rng.below(8) == 0 {
                    map.remove(&key);
                } else {
                    mutate_at(map.get_mut(&key).unwrap(), depth - 1, rng);
                }
                return;
            }
            Value::Array(items) if !items.is_empty() => {
                let i = rng.below(items.len());
                if rng.below(8) == 0 {
                    let copy = items[i].clone();
                    items.insert(i, copy);
                } else {
                    mutate_at(&mut items[i], depth - 1, rng);
                }
                return;
            }
            _ => {}
        }
    }
    *node = match (&*node, rng.below(3)) {
        (Value::Number(n), 0) => {
            let x = n.as_f64().unwrap_or(1.0);
            Value::from(x * [1e3, 1e6, -1.0, 0.001][rng.below(4)])
        }
        _ => hostile_value(rng),
    };
}

/// One byte-level mutation, mostly within the first `hot` bytes (headers, metadata).
pub fn mutate_bytes(bytes: &mut Vec<u8>, hot: usize, rng: &mut Rng) {
    if bytes.is_empty() {
        bytes.push(rng.next() as u8);
        return;
    }
    let span = if rng.below(4) == 0 {
        bytes.len()
    } else {
        hot.min(bytes.len())
    };
    let pos = rng.below(span);
    match rng.below(7) {
        0 => bytes[pos] ^= 1 << rng.below(8),
        1 => bytes[pos] = [0, 0xFF, 0x7F, 0x80][rng.below(4)],
        2 => bytes[pos] = rng.next() as u8,
        3 => {
            // An 8-byte little-endian integer set to an extreme (counts, lengths, offsets).
            let end = (pos + 8).min(bytes.len());
            let v = [u64::MAX, 1 << 62, 1 << 40, u32::MAX as u64, 0][rng.below(5)];
            bytes[pos..end].copy_from_slice(&v.to_le_bytes()[..end - pos]);
        }
        4 => bytes.truncate(pos),
        5 => {
            let len = rng.below(64).min(bytes.len() - pos);
            let chunk = bytes[pos..pos + len].to_vec();
            let at = rng.below(bytes.len());
            bytes.splice(at..at, chunk);
        }
        _ => {
            let len = rng.below(64).min(bytes.len() - pos);
            bytes.drain(pos..pos + len);
        }
    }
}

/// A mutated JSON file: structure-aware most of the time, raw bytes otherwise.
fn mutated_json_text(seed: &str, rng: &mut Rng) -> Vec<u8> {
    let mut value: Value = serde_json::from_str(seed).unwrap();
    for _ in 0..1 + rng.below(3) {
        mutate_json(&mut value, rng);
    }
    let mut bytes = value.to_string().into_bytes();
    if rng.below(5) == 0 {
        mutate_bytes(&mut bytes, 4096, rng);
    }
    bytes
}

fn repo(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(repo(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// A fresh copy of a fixture folder to mutate in.
fn scratch_copy(fixture: &str, scratch: &Path) -> PathBuf {
    let dir = scratch.join(fixture);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(repo(&format!("tests/fixtures/{fixture}"))).unwrap() {
        let entry = entry.unwrap();
        if !entry.file_name().to_string_lossy().starts_with("reference") {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    dir
}

/// A fuzz target: makes one mutated input from `rng` (returned, for saving a finding) and
/// runs the loaders on it; `Ok(true)` when the input loaded, `Ok(false)` on a clean error.
pub type Target = fn(&mut Rng, &Path) -> (Vec<u8>, Box<dyn FnOnce() -> bool>);

/// Every target, by name.
pub const TARGETS: &[(&str, Target)] = &[
    ("gguf", gguf),
    ("safetensors", safetensors),
    ("safetensors-index", safetensors_index),
    ("config", config),
    ("tokenizer", tokenizer),
    ("chat-template", chat_template),
    ("generation-config", generation_config),
];

/// The GGUF reader on llama.cpp's Llama-2 vocab file: metadata, tensors, the embedded
/// tokenizer and chat template.
fn gguf(rng: &mut Rng, _: &Path) -> (Vec<u8>, Box<dyn FnOnce() -> bool>) {
    thread_local!(static SEED: Vec<u8> = read("tests/data/tokenizers/llama-vocab-tests/ggml-vocab-llama-spm.gguf"));
    let mut bytes = SEED.with(|s| s.clone());
    for _ in 0..1 + rng.below(4) {
        mutate_bytes(&mut bytes, 65536, rng);
    }
    let input = bytes.clone();
    (
        input,
        Box::new(
            move || match kiln_gguf::GgufFile::from_bytes("fuzz.gguf", bytes) {
                Err(e) => {
                    let _ = e.to_string();
                    false
                }
                Ok(f) => {
                    for t in f.tensors() {
                        let _ = f.tensor_f32(t.name());
                    }
                    let _ = f.llama_metadata();
                    let _ = f.chat_template();
                    if let Ok(t) = f.tokenizer() {
                        let _ = t.encode("Hello world 😀", true);
                    }
                    true
                }
            },
        ),
    )
}

/// A safetensors checkpoint (header and data) loaded as a model: `auto::load` reads the
/// config, checks every tensor's dtype, shape and offsets, and runs a forward pass.
fn safetensors(rng: &mut Rng, scratch: &Path) -> (Vec<u8>, Box<dyn FnOnce() -> bool>) {
    thread_local!(static SEED: Vec<u8> = read("tests/fixtures/llama2-mha/model.safetensors"));
    let dir = scratch_copy("llama2-mha", scratch);
    let mut bytes = SEED.with(|s| s.clone());
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for _ in 0..1 + rng.below(3) {
        mutate_bytes(&mut bytes, header, rng);
    }
    std::fs::write(dir.join("model.safetensors"), &bytes).unwrap();
    (bytes, Box::new(move || load_and_run(&dir)))
}

/// The sharded index of a three-shard checkpoint.
fn safetensors_index(rng: &mut Rng, scratch: &Path) -> (Vec<u8>, Box<dyn FnOnce() -> bool>) {
    let dir = scratch_copy("llama3-sharded", scratch);
    let seed = String::from_utf8(read(
        "tests/fixtures/llama3-sharded/model.safetensors.index.json",
    ))
    .unwrap();
    let bytes = mutated_json_text(&seed, rng);
    std::fs::write(dir.join("model.safetensors.index.json"), &bytes).unwrap();
    (bytes, Box::new(move || load_and_run(&dir)))
}

/// config.json of every architecture (Llama, Mistral, Yi, T5, M2M100), loaded with its real
/// weights: a config claiming huge sizes must fail on the weights, not allocate them.
fn config(rng: &mut Rng, scratch: &Path) -> (Vec<u8>, Box<dyn FnOnce() -> bool>) {
    let fixtures = [
        "llama2-mha",
        "llama3-gqa",
        "mistral-sw",
        "yi",
        "t5-relu-tied",
        "nllb-tiny",
    ];
    let fixture = fixtures[rng.below(fixtures.len())];
    let dir = scratch_copy(fixture, scratch);
    let seed = String::from_utf8(read(&format!("tests/fixtures/{fixture}/config.json"))).unwrap();
    let bytes = mutated_json_text(&seed, rng);
    std::fs::write(dir.join("config.json"), &bytes).unwrap();
    (bytes, Box::new(move || load_and_run(&dir)))
}

/// tokenizer.json and tokenizer_config.json of three tokenizer kinds (SentencePiece BPE,
/// byte-level BPE, Unigram): load, encode, decode, render the chat template.
fn tokenizer(rng: &mut Rng, scratch: &Path) -> (Vec<u8>, Box<dyn FnOnce() -> bool>) {
    let fixtures = ["llama2-mha", "llama3-gqa", "t5-relu-tied"];
    let fixture = fixtures[rng.below(fixtures.len())];
    let dir = scratch_copy(fixture, scratch);
    let file = if rng.below(4) == 0 {
        "tokenizer_config.json"
    } else {
        "tokenizer.json"
    };
    let seed = String::from_utf8(read(&format!("tests/fixtures/{fixture}/{file}"))).unwrap();
    let bytes = mutated_json_text(&seed, rng);
    std::fs::write(dir.join(file), &bytes).unwrap();
    (
        bytes,
        Box::new(move || match kiln::core::Tokenizer::from_dir(&dir) {
            Err(e) => {
                let _ = e.to_string();
                false
            }
            Ok(t) => {
                if let Ok(ids) = t.encode("Hello world, <s> 😀 日本", true) {
                    let _ = t.decode(&ids, false);
                }
                let _ = t.decode(&[0, 1, 2, 3], true);
                let _ = t.apply_chat_template(&[kiln::core::Message::new("user", "hi")], true);
                true
            }
        }),
    )
}

/// Real chat templates (tests/fixtures/chat-templates) with their source mutated: bytes
/// changed, tags cut and spliced; rendered under the default limits.
fn chat_template(rng: &mut Rng, _: &Path) -> (Vec<u8>, Box<dyn FnOnce() -> bool>) {
    thread_local!(static SEEDS: Vec<String> = {
        let v: Value = serde_json::from_slice(&read("tests/fixtures/chat-templates/templates.json")).unwrap();
        v["templates"].as_array().unwrap().iter().map(|t| t["template"].as_str().unwrap().to_string()).collect()
    });
    let mut bytes = SEEDS.with(|s| s[rng.below(s.len())].clone().into_bytes());
    for _ in 0..1 + rng.below(4) {
        match rng.below(3) {
            0 => {
                // Splice in a loop or a recursion from the hostile examples.
                let snippets: [&[u8]; 4] = [
                    b"{% for i in range(10000) %}{% for j in range(10000) %}",
                    b"{% endfor %}{% endfor %}",
                    b"{{ 'x' * 99999999 }}",
                    b"{% macro m(n) %}{{ m(n) }}{% endmacro %}{{ m(1) }}",
                ];
                let s = snippets[rng.below(snippets.len())];
                let at = rng.below(bytes.len() + 1);
                bytes.splice(at..at, s.iter().copied());
            }
            _ => mutate_bytes(&mut bytes, usize::MAX, rng),
        }
    }
    let input = bytes.clone();
    (
        input,
        Box::new(move || {
            let source = String::from_utf8_lossy(&bytes).into_owned();
            let template = kiln::core::ChatTemplate::new(source, "fuzz");
            let messages = [
                kiln::core::Message::new("system", "s"),
                kiln::core::Message::new("user", "hi"),
                kiln::core::Message::new("assistant", "yo"),
            ];
            let inputs =
                kiln::core::ChatTemplateInputs::new(&messages).with_generation_prompt(true);
            template
                .render(&inputs, &[("bos_token", "<s>"), ("eos_token", "</s>")])
                .is_ok()
        }),
    )
}

/// generation_config.json (with config.json's token ids under it).
fn generation_config(rng: &mut Rng, scratch: &Path) -> (Vec<u8>, Box<dyn FnOnce() -> bool>) {
    let dir = scratch_copy("llama3-gqa", scratch);
    let seed = String::from_utf8(read("tests/fixtures/llama3-gqa/generation_config.json")).unwrap();
    let bytes = mutated_json_text(&seed, rng);
    std::fs::write(dir.join("generation_config.json"), &bytes).unwrap();
    (
        bytes,
        Box::new(
            move || match kiln::core::loading::GenerationDefaults::from_dir(&dir) {
                Ok(d) => {
                    let config = d.generation_config(&Default::default());
                    let _ = kiln::core::Sampler::new(config.sampling);
                    true
                }
                Err(e) => {
                    let _ = e.to_string();
                    false
                }
            },
        ),
    )
}

/// Loads a decoder-only or seq2seq folder and runs one step, as `kiln generate` would.
fn load_and_run(dir: &Path) -> bool {
    let spec = dir.to_str().unwrap();
    let device = device();
    match kiln::auto::model_type(spec).as_deref() {
        Ok("t5") | Ok("m2m_100") => match kiln::auto::load_seq2seq::<B>(spec, &device) {
            Ok(_) => true,
            Err(e) => {
                let _ = e.to_string();
                false
            }
        },
        _ => match kiln::auto::load::<B>(spec, &device) {
            Ok(loaded) => {
                let config = kiln::core::GenerationConfig::default().with_max_new_tokens(2);
                let _ =
                    kiln::core::generate(&loaded.model, &[vec![1, 2, 3]], &config, None, |_, _| {});
                true
            }
            Err(e) => {
                let _ = e.to_string();
                false
            }
        },
    }
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub execs: usize,
    pub loaded: usize,
    pub panics: Vec<(usize, String, PathBuf)>,
    pub slow: Vec<(usize, Duration, PathBuf)>,
    pub heavy: Vec<(usize, usize, PathBuf)>,
    pub max_peak: usize,
    pub max_time: Duration,
}

/// How long a run lasts and what counts as a finding.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most inputs.
    pub iterations: usize,
    /// Most wall time for the whole run.
    pub budget: Duration,
    /// An input slower than this is a finding.
    pub per_input: Duration,
    /// An input allocating more than this many bytes at once is a finding.
    pub memory: usize,
}

/// Runs `target` from `seed` within `limits`. Findings are saved under `scratch/findings/`.
pub fn run(name: &str, target: Target, seed: u64, limits: Limits, scratch: &Path) -> Report {
    let mut rng = Rng(seed | 1);
    let mut report = Report::default();
    let findings = scratch.join("findings");
    let start = Instant::now();
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    while report.execs < limits.iterations && start.elapsed() < limits.budget {
        let (input, job) = target(&mut rng, scratch);
        let t = Instant::now();
        let (outcome, peak) = peak_during(|| std::panic::catch_unwind(AssertUnwindSafe(job)));
        let took = t.elapsed();
        let i = report.execs;
        report.execs += 1;
        report.max_peak = report.max_peak.max(peak);
        report.max_time = report.max_time.max(took);
        let save = |kind: &str| {
            std::fs::create_dir_all(&findings).unwrap();
            let path = findings.join(format!("{name}-{seed}-{i}.{kind}"));
            std::fs::write(&path, &input).unwrap();
            path
        };
        match outcome {
            Ok(loaded) => report.loaded += loaded as usize,
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                report.panics.push((i, msg, save("panic")));
            }
        }
        if took > limits.per_input {
            report.slow.push((i, took, save("slow")));
        }
        if peak > limits.memory {
            report.heavy.push((i, peak, save("heavy")));
        }
    }
    std::panic::set_hook(quiet);
    report
}
