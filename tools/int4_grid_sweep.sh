#!/usr/bin/env bash
# Perplexity of the trained fixture (tests/fixtures/trained-moe, held-out text) with its routed
# experts at 4 bits on every grid `quantize --bits 4` offers, beside W8A8 and f32: the
# measurement behind the default group size and symmetry (docs/quantization.md).
# Usage: tools/int4_grid_sweep.sh [METHOD...]   (default: rtn haq); CTX=256 by default.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/edgemoe}
FIX=tests/fixtures/trained-moe
CTX=${CTX:-256}
OUT=${OUT:-$(mktemp -d)}
methods=("${@:-rtn haq}")
ppl() { "$BIN" ppl --model "$1" --text "$FIX/heldout.txt" --ctx "$CTX" 2>/dev/null | awk '/^ppl/ {print $2}'; }
printf '| weights | method | group | grid | expert bytes/param | ppl (ctx %s) |\n| --- | --- | --- | --- | --- | --- |\n' "$CTX"
printf '| f32 | - | - | - | - | %s |\n' "$(ppl "$FIX")"
for m in ${methods[*]}; do
  calib=(); [ "$m" = rtn ] || calib=(--calib "$FIX/calib.txt")
  "$BIN" quantize --model "$FIX" "${calib[@]}" --method "$m" --out "$OUT/q8.emoe" >/dev/null
  bpp=$("$BIN" inspect --json "$OUT/q8.emoe" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(round([c for c in d["classes"] if c["class"]=="experts"][0]["bytes_per_quantized_param"],4))')
  printf '| W8A8 | %s | - | - | %s | %s |\n' "$m" "$bpp" "$(ppl "$OUT/q8.emoe")"
  for g in 32 64 128; do
    for grid in symmetric asymmetric; do
      flag=(); [ $grid = asymmetric ] && flag=(--asymmetric)
      "$BIN" quantize --model "$FIX" "${calib[@]}" --method "$m" --bits 4 --group-size $g "${flag[@]}" --out "$OUT/q4.emoe" >/dev/null
      bpp=$("$BIN" inspect --json "$OUT/q4.emoe" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(round([c for c in d["classes"] if c["class"]=="experts"][0]["bytes_per_quantized_param"],4))')
      printf '| W4A8 | %s | %s | %s | %s | %s |\n' "$m" $g $grid "$bpp" "$(ppl "$OUT/q4.emoe")"
    done
  done
done
