#!/bin/bash
# Usage (after cargo build --release --example translate_bench, pip install torch transformers
# ctranslate2, and the checkpoint commands of bench/README.md): bash bench/nllb_paired.sh
# Paired NLLB-600M runs: kiln and CTranslate2 alternating, f32 then 8-bit (kiln's q8_0 weights
# with f32, then 8-bit activations), two rounds.
K=./target/release/examples/translate_bench
CT=../shared/bench/nllb-ctranslate2.py
ct() { python3 -c 'import sys,json; [print(sys.argv[1], "batch", d["batch"], round(d["seconds"],2), d["seconds_runs"]) for d in map(json.loads, sys.stdin)]' "$1"; }
for round in 1 2; do
  echo "== round $round"
  $K --model /tmp/nllb600m-random --batch 1,8 --repeats 3 2>&1 | grep '^kiln' | sed 's/^/f32 /'
  python3 $CT bench /tmp/nllb600m-ct2 --compute float32 --batch 1,8 --threads 2 2>&1 | grep '^{' | ct "ct2 f32"
  $K --model /tmp/nllb600m-random --batch 1,8 --repeats 3 --quant q8_0 --no-probe 2>&1 | grep '^kiln' | sed 's/^/q8_0 /'
  $K --model /tmp/nllb600m-random --batch 1,8 --repeats 3 --quant q8_0 --activations q8 --no-probe 2>&1 | grep '^kiln' | sed 's/^/q8_0 act-q8 /'
  python3 $CT bench /tmp/nllb600m-ct2 --compute int8 --batch 1,8 --threads 2 2>&1 | grep '^{' | ct "ct2 int8"
done
