#!/bin/bash
# Usage (after cargo build --release and bash ../shared/bench/build-llama-cpp.sh): bash bench/serve_paired.sh
# Paired serve benchmark: kiln serve and llama-server alternating, same session.
G=~/.cache/kiln/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; B=~/.cache/llama.cpp/bin
for round in 1 2; do
  ./target/release/kiln serve --model $G --port 8131 > /dev/null 2>&1 & P=$!; sleep 3
  python3 bench/serve_load.py --url http://127.0.0.1:8131 --concurrency 1 4 16 --requests 16 --max-tokens 64 --label "kiln r$round"  | head -3 || true
  kill $P; wait $P 2>/dev/null
  $B/llama-server -m $G --port 8132 -t 2 -np 16 -c 32768 > /dev/null 2>&1 & P=$!
  for i in $(seq 30); do curl -sf localhost:8132/health >/dev/null && break; sleep 1; done
  python3 bench/serve_load.py --url http://127.0.0.1:8132 --concurrency 1 4 16 --requests 16 --max-tokens 64 --label "llama.cpp r$round"  | head -3 || true
  kill $P; wait $P 2>/dev/null
done
