#!/usr/bin/env bash
# KV eviction policies × budgets on SmolLM2-135M (issue 19): ppl and fact recall on the recall
# text, ppl on ordinary prose, one JSON line per run on stdout. Usage:
#   tools/kv_eval.sh [MODEL] [CTX] [THREADS] > results.jsonl
# Prose = the first 40 000 bytes of tests/fixtures/trained-moe/heldout.txt (KJV).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-target/models/SmolLM2-135M-Instruct.Q4_1.gguf}
CTX=${2:-2048}
THREADS=${3:-1}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/edgemoe}
PROSE=$(mktemp)
trap 'rm -f "$PROSE"' EXIT
head -c 40000 tests/fixtures/trained-moe/heldout.txt > "$PROSE"
run() { # label text extra-args...
  local label=$1 text=$2; shift 2
  local facts=()
  [ "$label" = recall ] && facts=(--facts tools/data/recall_facts.txt)
  "$BIN" ppl --model "$MODEL" --text "$text" --ctx "$CTX" --threads "$THREADS" --json "${facts[@]}" "$@" 2>/dev/null \
    | sed "s/^{/{\"text\":\"$label\",/"
}
for text in recall prose; do
  file=tools/data/recall.txt; [ $text = prose ] && file=$PROSE
  run $text "$file"
  for budget in 50% 25%; do
    for policy in window h2o lazy; do
      run $text "$file" --kv-budget $budget --kv-policy $policy
    done
  done
done
