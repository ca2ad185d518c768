#!/bin/bash
# Usage (after cargo build --release --example bench, bash tools/fetch_smollm2.sh and
# bash ../shared/bench/build-llama-cpp.sh): bash bench/smollm2_paired.sh
# Paired SmolLM2 Q4_1 runs: kiln (as stored with f32 activations, with 8-bit activations as
# llama.cpp, then f32 weights) and llama-bench alternating, two rounds.
G=~/.cache/kiln/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
K=./target/release/examples/bench
for round in 1 2; do
  echo "== round $round"
  $K --model $G --repeats 3 2>&1 | grep '^kiln'
  $K --model $G --repeats 3 --activations q8 2>&1 | grep '^kiln'
  ~/.cache/llama.cpp/bin/llama-bench -m $G -t 2 -p 128 -n 32 -r 3 2>&1 | grep -E "pp128|tg32"
  $K --model $G --repeats 3 --dtype f32 2>&1 | grep '^kiln'
done
