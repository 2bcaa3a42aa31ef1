#!/usr/bin/env bash
# The quantizer's benchmarks (issue "W8A8 that holds on real pretrained models"), measured from
# outside the process with /usr/bin/time -v:
#   1. SmolLM2-135M (its GGUF, tools/fetch_smollm2.sh): every method quantized on 16 384 tokens at
#      most of the trained fixture's calib.txt; wall time, peak RSS against the f32 weights' size;
#      then `edgemoe ppl` of the held-out text at ctx 256 and 1024 against the f32 model's.
#   2. a Mixtral-shaped model of more than 2 GB (builtin:mixtral-1g exported as bf16): haq's peak
#      RSS against the model's f32 size (the quantizer holds one layer in f32 at a time).
#
# usage: tools/quant_checks.sh [smollm2|mixtral|all] [EDGEMOE_BINARY]
# Writes under target/exports/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
bin=${2:-target/release/edgemoe}
out=target/exports
mkdir -p "$out"
calib=tests/fixtures/trained-moe/calib.txt
held=tests/fixtures/trained-moe/heldout.txt
peak_kb() { awk -F: '/Maximum resident/ {gsub(/ /,"",$2); print $2}' "$1"; }
wall() { awk '/Elapsed \(wall clock\)/ {print $NF}' "$1"; }
cpu() { awk -F: '/User time|System time/ {s += $2} END {printf "%.0f", s}' "$1"; }
ppl() { "$bin" ppl --model "$1" --text "$held" --ctx "$2" --threads 2 --json "${@:3}" 2>/dev/null |
  python3 -c "import json,sys; print('%.4f' % json.load(sys.stdin)['ppl'])"; }

if [ "$what" = smollm2 ] || [ "$what" = all ]; then
  gguf=target/models/SmolLM2-135M-Instruct.Q4_1.gguf
  [ -f "$gguf" ] || bash tools/fetch_smollm2.sh
  f32_bytes=$((134515008 * 4)) # SmolLM2-135M's parameters (tied head counted once) in f32
  echo "== SmolLM2-135M: f32 weights $f32_bytes B"
  f256=$(ppl "$gguf" 256 --gguf-f32); f1024=$(ppl "$gguf" 1024 --gguf-f32)
  echo "method | ppl ctx 256 | vs f32 | ppl ctx 1024 | vs f32 | quantize wall (CPU s) | peak RSS / f32 size"
  echo "f32 | $f256 | | $f1024 | | |"
  # An entry is a method, or METHOD:FLAG for a variant (haq:--no-rotate).
  for entry in ${METHODS:-rtn smooth gptq haq haq:--no-rotate}; do
    m=${entry%%:*}
    flag=""
    [ "$entry" = "$m" ] || flag=${entry#*:}
    tag=$m$flag
    emoe=$out/smollm2-$tag.emoe
    # shellcheck disable=SC2086 # $flag is one flag or none
    /usr/bin/time -v "$bin" quantize --model "$gguf" --calib "$calib" --method "$m" $flag --threads 2 \
      --out "$emoe" >"$out/quant-$tag.txt" 2>"$out/time-$tag.txt"
    p256=$(ppl "$emoe" 256); p1024=$(ppl "$emoe" 1024)
    python3 -c "
kb=$(peak_kb "$out/time-$tag.txt")
print('$m $flag | $p256 | %+.2f%% | $p1024 | %+.2f%% | $(wall "$out/time-$tag.txt") ($(cpu "$out/time-$tag.txt")) | %.2f' % (
  ($p256/$f256-1)*100, ($p1024/$f1024-1)*100, kb*1024/$f32_bytes))"
    grep "time:" "$out/quant-$tag.txt" || true
  done
fi

if [ "$what" = mixtral ] || [ "$what" = all ]; then
  dir=$out/mixtral-1g-bf16
  [ -f "$dir/model.safetensors.index.json" ] || [ -f "$dir/model.safetensors" ] ||
    "$bin" export --model builtin:mixtral-1g --out "$dir" --dtype bf16 >/dev/null
  params=$("$bin" inspect "$dir" --json 2>/dev/null | python3 -c "import json,sys; print(json.load(sys.stdin)['params'])" 2>/dev/null || true)
  bytes=$(du -cb "$dir"/*.safetensors | tail -1 | cut -f1)
  f32_bytes=$((bytes * 2))
  echo "== builtin:mixtral-1g as bf16: $bytes B on disk, $f32_bytes B in f32"
  /usr/bin/time -v "$bin" quantize --model "$dir" --calib "$calib" --calib-tokens "${MIX_TOKENS:-4096}" \
    --threads 2 --out "$out/mixtral-1g.emoe" >"$out/quant-mixtral.txt" 2>"$out/time-mixtral.txt"
  cat "$out/quant-mixtral.txt"
  kb=$(peak_kb "$out/time-mixtral.txt")
  python3 -c "print('peak RSS %d B = %.3f x the f32 size, wall $(wall "$out/time-mixtral.txt"), CPU $(cpu "$out/time-mixtral.txt") s' % ($kb*1024, $kb*1024/$f32_bytes))"
fi
