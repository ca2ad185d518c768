//! A short deterministic fuzzing run of every loader of untrusted files (`tests/fuzzing`):
//! 200 mutated inputs per target from fixed seeds, each of which must load or fail with an
//! error, never panic, within 5 s and 256 MiB. `cargo run --release --example fuzz` runs the
//! same targets for minutes each.

use std::time::Duration;

#[test]
fn every_loader_survives_mutated_inputs() {
    let scratch = std::env::temp_dir().join(format!("kiln-fuzz-{}", std::process::id()));
    let mut failures = Vec::new();
    for (name, target) in crate::fuzzing::TARGETS {
        let report = crate::fuzzing::run(
            name,
            *target,
            0x5EED_0000 + name.len() as u64,
            crate::fuzzing::Limits {
                iterations: 200,
                budget: Duration::from_secs(120),
                per_input: Duration::from_secs(5),
                memory: 256 << 20,
            },
            &scratch,
        );
        eprintln!(
            "{name}: {} inputs, {} loaded, peak {:.1} MiB, slowest {:.0} ms",
            report.execs,
            report.loaded,
            report.max_peak as f64 / (1 << 20) as f64,
            report.max_time.as_secs_f64() * 1e3
        );
        for (i, msg, path) in &report.panics {
            failures.push(format!("{name} #{i} panicked: {msg} ({})", path.display()));
        }
        for (i, took, path) in &report.slow {
            failures.push(format!("{name} #{i} took {took:?} ({})", path.display()));
        }
        for (i, peak, path) in &report.heavy {
            failures.push(format!(
                "{name} #{i} allocated {peak} B ({})",
                path.display()
            ));
        }
        // Mutations must leave some inputs loadable, or the target tests only the first check.
        assert!(report.loaded > 0, "{name}: no mutated input loaded");
    }
    if failures.is_empty() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
