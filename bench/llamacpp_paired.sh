#!/bin/bash
# Usage (after cargo build --release --example bench and bash ../shared/bench/build-llama-cpp.sh):
#   bash bench/llamacpp_paired.sh FILE.gguf
# Paired runs on any GGUF file: kiln (blocks as stored, f32 activations; then 8-bit activations as
# llama.cpp computes) and llama-bench alternating, two rounds, 2 threads, prompt 128, 32 tokens.
# bench/smollm2_paired.sh is the same on the SmolLM2 Q4_1 file, plus its f32 weights.
G=$1
K=${K:-${CARGO_TARGET_DIR:-./target}/release/examples/bench}
for round in 1 2; do
  echo "== round $round"
  $K --model "$G" --repeats 3 2>&1 | grep '^kiln'
  $K --model "$G" --repeats 3 --activations q8 2>&1 | grep '^kiln'
  ~/.cache/llama.cpp/bin/llama-bench -m "$G" -t 2 -p 128 -n 32 -r 3 2>&1 | grep -E "pp128|tg32"
done
