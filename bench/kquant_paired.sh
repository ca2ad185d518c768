#!/bin/bash
# Usage (after cargo build --release --example bench --example requantize_gguf --example
# random_checkpoint): bash bench/kquant_paired.sh A.gguf B.gguf [bench options...]
# Alternating paired runs (A, B, A, B), two rounds, 2 kernel threads: one JSON line per run
# (decode tok/s beside the probed bandwidth limit). bench/README.md, "K-quants kept packed".
K=${K:-${CARGO_TARGET_DIR:-./target}/release/examples/bench}
A=$1
B=$2
shift 2
for round in 1 2; do
  for f in "$A" "$B"; do
    echo "== round $round: $f"
    KILN_NUM_THREADS=2 "$K" --model "$f" "$@" 2>/dev/null | grep '^{'
  done
done
