#!/usr/bin/env bash
# Issue 29: which linears haq W8A8's loss on SmolLM2-135M comes from, on the quantization
# TUNING texts only (tools/data/tune/{code,docs}.txt and the first 9 600 bytes of the trained
# fixture's KJV heldout.txt, cut as tools/heldout_eval.sh cuts them), never the held-out ones.
#
# Each VARIANT is one `quantize` (haq, calib tools/data/calib/mix.txt, the defaults) plus extra
# arguments, e.g. `base:` (none), `q_proj:--keep-f32=q_proj`, `head:--head=f32`,
# `l0-2:--keep-f32=layers.0.,--keep-f32=layers.1.`; every variant is scored at ctx 256 on the
# three tuning texts with `ppl --kl-ref` (the GGUF's f32 weights): mean KL from f32 in
# millinats (stable where Δppl is chance), Δppl, and the .emoe's size against the baseline's.
#
# usage: VARIANTS="base: q_proj:--keep-f32=q_proj" tools/quant_sensitivity.sh
# env: MODEL, BIN, THREADS (2), CTX (256), CALIB, NICE (19), OUT (target/exports/sens),
#      REQUANT=1 to quantize a variant again when its .emoe exists.
# Raw results: $OUT/results.jsonl (one line per variant and text, appended; a variant run
# again replaces its lines); the table of every variant there on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-target/models/SmolLM2-135M-Instruct.Q4_1.gguf}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/edgemoe}
THREADS=${THREADS:-2}
CTX=${CTX:-256}
out=${OUT:-target/exports/sens}
[ -f "$MODEL" ] || bash tools/fetch_smollm2.sh
[ -x "$BIN" ] || { echo "no $BIN: cargo build --release first" >&2; exit 1; }
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
head -c 9600 tests/fixtures/trained-moe/heldout.txt >"$tmp/tune-kjv.txt"
cp tools/data/tune/code.txt "$tmp/tune-code.txt"
cp tools/data/tune/docs.txt "$tmp/tune-docs.txt"
res=$out/results.jsonl
touch "$res"
nice=(nice -n "${NICE:-19}")
for entry in ${VARIANTS:-base:}; do
  v=${entry%%:*} args=()
  [ -z "${entry#*:}" ] || IFS=, read -ra args <<<"${entry#*:}"
  emoe=$out/$v.emoe
  if [ "${REQUANT:-0}" = 1 ] || [ ! -s "$emoe" ]; then
    echo "  quantize $v: ${args[*]}" >&2
    /usr/bin/time -v "${nice[@]}" "$BIN" quantize --model "$MODEL" \
      --calib "${CALIB:-tools/data/calib/mix.txt}" --method haq --threads "$THREADS" \
      --out "$emoe" "${args[@]}" >"$out/quant-$v.txt" 2>"$out/time-$v.txt" ||
      { tail "$out/time-$v.txt" >&2; exit 1; }
  fi
  grep -v "\"variant\":\"$v\"," "$res" >"$tmp/keep" || true
  cp "$tmp/keep" "$res"
  for t in tune-kjv tune-code tune-docs; do
    "${nice[@]}" "$BIN" ppl --model "$emoe" --text "$tmp/$t.txt" --ctx "$CTX" \
      --threads "$THREADS" --json --kl-ref "$MODEL" 2>"$tmp/err" |
      sed "s/^{/{\"variant\":\"$v\",\"text\":\"$t\",\"bytes\":$(stat -c %s "$emoe"),/" >>"$res" ||
      { cat "$tmp/err" >&2; exit 1; }
    echo "  $v $t done" >&2
  done
done

python3 - "$res" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
variants = list(dict.fromkeys(r["variant"] for r in rows))
texts = ["tune-kjv", "tune-code", "tune-docs"]
by = {(r["variant"], r["text"]): r for r in rows}
base = "base" if any(r["variant"] == "base" for r in rows) else variants[0]
print("| variant | " + " | ".join(f"{t} KL" for t in texts)
      + " | KL mean (millinats) | KL vs base | Δppl mean | bytes vs base |")
print("|" + " --- |" * (len(texts) + 5))
def mean_kl(v):
    return sum(by[(v, t)]["against_reference"]["kl_mean"] * 1000 for t in texts) / len(texts)
have_base = all((base, t) in by for t in texts)
for v in variants:
    got = [by[(v, t)] for t in texts if (v, t) in by]
    if len(got) < len(texts):
        continue
    kl = [g["against_reference"]["kl_mean"] * 1000 for g in got]
    dp = [(g["ppl"] / g["against_reference"]["reference_ppl"] - 1) * 100 for g in got]
    extra = (got[0]["bytes"] - by[(base, texts[0])]["bytes"]) / 2**20 if have_base else 0
    rel = (mean_kl(v) / mean_kl(base) - 1) * 100 if have_base else 0
    print(f"| {v} | " + " | ".join(f"{k:.2f}" for k in kl)
          + f" | {sum(kl) / len(kl):.2f} | {rel:+.0f}% | {sum(dp) / len(dp):+.2f}% | {extra:+.1f} MiB |")
PY
