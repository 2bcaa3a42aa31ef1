#!/usr/bin/env bash
# The dashboard in a real browser: tests/browser/dashboard.mjs drives Debian's chromium
# (headless, through playwright-core) against target/release/edgemoe, twice: on the built-in
# model as installed (experts in place, the page falls back to /v1/completions as there is no
# chat template), and on the same model quantized to an .emoe and paged under --mem with a chat
# template (RAM and storage tiers, /v1/chat/completions). Installs chromium (apt) and
# playwright-core (npm ci, from package-lock.json) when missing; exits non-zero on any failure.
#
#   tools/browser-test.sh [--screenshot FILE]   (FILE: the paged run's page after a chat)
set -euo pipefail
cd "$(dirname "$0")/.."
screenshot=()
if [[ "${1:-}" == "--screenshot" ]]; then
  screenshot=(--screenshot "$(realpath -m "$2")")
fi
bin="$PWD/target/release/edgemoe"
[[ -x "$bin" ]] || cargo build --release
if ! command -v chromium >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
browser="$(command -v chromium)"
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0
# Runs the browser script with serve arguments "$@" and adds up its final line.
run() {
  local log="$tmp/run.log" rc=0
  node tests/browser/dashboard.mjs --bin "$bin" --chromium "$browser" "$@" | tee "$log" || rc=$?
  local last
  last="$(grep -E '^browser: [0-9]+ passed, [0-9]+ failed$' "$log" | tail -1 || true)"
  if [[ -z "$last" ]]; then
    echo "the browser script ended without its summary (exit $rc)"
    failed=$((failed + 1))
    return
  fi
  passed=$((passed + $(echo "$last" | sed -E 's/^browser: ([0-9]+) passed.*/\1/')))
  failed=$((failed + $(echo "$last" | sed -E 's/.*, ([0-9]+) failed$/\1/')))
  if [[ $rc -ne 0 && "$last" == *", 0 failed" ]]; then failed=$((failed + 1)); fi
}

echo "== built-in model, experts in place"
run
echo "== .emoe paged under --mem, with a chat template"
"$bin" quantize --model tests/fixtures/trained-moe --method rtn --out "$tmp/trained.emoe" \
  >/dev/null 2>&1
# The smallest budget (from the refusal of 1M) plus room for about 8 of the 32 experts, so
# some stay in storage.
least="$("$bin" serve --http 127.0.0.1:0 --model "$tmp/trained.emoe" --max-batch 2 --mem 1M \
  2>&1 | sed -nE 's/.*\(([0-9]+) bytes\).*/\1/p' || true)"
if [[ -z "$least" ]]; then
  echo "cannot find the smallest --mem for the paged run"
  failed=$((failed + 1))
else
  run "${screenshot[@]}" -- --model "$tmp/trained.emoe" --max-batch 2 \
    --mem $((least + 8 * 110 * 1024)) --chat-template tests/fixtures/chat/smollm2.jinja
fi
echo "browser: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
