#!/usr/bin/env bash
# Makes target/models/SmolLM2-135M-Instruct.Q4_K_M.gguf (git-ignored) with llama.cpp's
# llama-quantize from the Q4_1 GGUF of tools/fetch_smollm2.sh, requantized
# (`--allow-requantize`: the Q4_1 values are the source; no F16 SmolLM2 is at hand).
# tests/gguf.rs uses it when present. llama-quantize comes from `tools/llama_cpp.sh build`
# (LLAMA_CPP_DIR, default target/llama.cpp).
#
# usage: tools/make_smollm2_q4km.sh [OUT]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
src=$root/target/models/SmolLM2-135M-Instruct.Q4_1.gguf
out=${1:-$root/target/models/SmolLM2-135M-Instruct.Q4_K_M.gguf}
quantize=${LLAMA_CPP_DIR:-$root/target/llama.cpp}/build/bin/llama-quantize
[ -s "$src" ] || bash "$root/tools/fetch_smollm2.sh"
[ -x "$quantize" ] || { echo "no $quantize: run tools/llama_cpp.sh build" >&2; exit 1; }
"$quantize" --allow-requantize "$src" "$out" Q4_K_M 2
ls -l "$out"
