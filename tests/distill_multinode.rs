//! `kiln distill train --nodes 2`: two node processes and an orchestrator on 127.0.0.1 train
//! the same tiny fresh T5 as one process with the same global batch, and must match it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use burn::module::Module;
use burn::prelude::*;
use kiln::backend::{Backend as B, device};
use kiln::distill::train::load_checkpoint;

/// Everything a process may take; a hung all-reduce must fail the test, not stall it.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Children killed when the test ends, whatever happened.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn kiln(args: &[String], log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn kiln")
}

/// Waits for `child` until `deadline`; on timeout the caller's `Procs` kills it.
fn wait(child: &mut Child, deadline: Instant, log: &Path) {
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            assert!(
                status.success(),
                "{} failed: {status}\n{text}",
                log.display()
            );
            return;
        }
        if Instant::now() > deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{} still running after {TIMEOUT:?}\n{text}", log.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `loss` of each training step in `<out>/metrics.jsonl`.
fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["split"] == "train")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

/// Every float parameter of a checkpoint, in module order.
fn weights(out: &Path) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl burn::module::ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<B, D>>) {
            self.0
                .extend(p.val().into_data().to_vec::<f32>().expect("f32 weights"));
        }
    }
    let (model, _) = load_checkpoint::<B>(&out.join("checkpoint"), &device()).unwrap();
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn two_nodes_match_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data: String = (0..8)
        .map(|i| {
            let (a, b) = (3 + i, 2 * i + 1);
            format!(
                "{{\"input\": \"What is {a} plus {b}?\", \"label\": \"{}\", \
                 \"rationale\": \"{a} plus {b} makes {}.\"}}\n",
                a + b,
                a + b
            )
        })
        .collect();
    std::fs::write(dir.join("data.jsonl"), data).unwrap();
    let tokenizer = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tokenizers/t5");
    // 4 micro-batches of 2 per step: one process takes all four, each node two of them.
    // Without dropout, so both runs do the same arithmetic up to the order of the sums.
    let common = |out: &Path| -> Vec<String> {
        let s = |x: &str| x.to_string();
        vec![
            s("distill"),
            s("train"),
            s("--data"),
            dir.join("data.jsonl").display().to_string(),
            s("--fresh"),
            s("tiny"),
            s("--dropout"),
            s("0"),
            s("--tokenizer"),
            tokenizer.display().to_string(),
            s("--steps"),
            s("3"),
            s("--batch-size"),
            s("2"),
            s("--grad-accum"),
            s("4"),
            s("--lr"),
            s("1e-3"),
            s("--valid-fraction"),
            s("0"),
            s("--eval-split"),
            s("valid"),
            s("--save-every"),
            s("0"),
            s("--max-input-len"),
            s("32"),
            s("--max-target-len"),
            s("16"),
            s("--out"),
            out.display().to_string(),
        ]
    };
    let (single, n0, n1) = (dir.join("single"), dir.join("n0"), dir.join("n1"));
    let mut procs = Procs(Vec::new());
    let deadline = Instant::now() + TIMEOUT;

    procs
        .0
        .push(kiln(&common(&single), &dir.join("single.log")));
    wait(&mut procs.0[0], deadline, &dir.join("single.log"));

    let (orch, p0, p1) = (free_port(), free_port(), free_port());
    procs.0.push(kiln(
        &[
            "distill".into(),
            "orchestrator".into(),
            "--port".into(),
            orch.to_string(),
        ],
        &dir.join("orchestrator.log"),
    ));
    for (rank, (out, port)) in [(&n0, p0), (&n1, p1)].into_iter().enumerate() {
        let mut args = common(out);
        args.extend([
            "--nodes".into(),
            "2".into(),
            "--node-rank".into(),
            rank.to_string(),
            "--node-address".into(),
            format!("127.0.0.1:{port}"),
            "--orchestrator".into(),
            format!("127.0.0.1:{orch}"),
            "--join-timeout".into(),
            "30".into(),
        ]);
        procs.0.push(kiln(&args, &dir.join(format!("n{rank}.log"))));
    }
    let deadline = Instant::now() + TIMEOUT;
    wait(&mut procs.0[2], deadline, &dir.join("n0.log"));
    wait(&mut procs.0[3], deadline, &dir.join("n1.log"));
    drop(procs);

    let (l, l0, l1) = (losses(&single), losses(&n0), losses(&n1));
    assert_eq!(l.len(), 3);
    assert!(l[2] < l[0], "training did not lower the loss: {l:?}");
    // Every node reports the global mean loss, and the nodes agree exactly.
    assert_eq!(l0, l1);
    for (step, (a, b)) in l.iter().zip(&l0).enumerate() {
        assert!(
            (a - b).abs() <= 1e-6 * a.abs(),
            "step {}: one process {a}, two nodes {b}",
            step + 1
        );
    }
    let (w, w0, w1) = (weights(&single), weights(&n0), weights(&n1));
    // The replicas step on the same all-reduced gradients: bit-identical.
    assert_eq!(w0, w1, "the two nodes' weights differ");
    let diff = max_abs_diff(&w, &w0);
    eprintln!("losses {l:?} vs {l0:?}; max |one process - two nodes| weight = {diff:e}");
    assert!(diff <= 1e-6, "max weight difference {diff}");
}
