#!/usr/bin/env bash
# edgemoe W4A8 beside llama.cpp Q4_K_M and Q4_0 on the same models (issue 28, point 3): file
# size, perplexity loss against the same f32 weights, and prefill / decode speed. Prints one
# table (markdown).
#
# usage: tools/w4_vs_llama.sh [ppl|speed|all] [EDGEMOE_BINARY]
#
# ppl: SmolLM2-135M-Instruct, the Q4_1 GGUF of tools/fetch_smollm2.sh. Its values are "the f32
#   weights" on both sides: llama.cpp's F32 GGUF is `llama-quantize --allow-requantize` of it to
#   F32 (the Q4_1 blocks dequantized), and Q4_K_M / Q4_0 are quantized from that F32 file (no
#   imatrix); edgemoe's f32 is `ppl --gguf-f32` of the same GGUF, and its W4A8 is `quantize
#   --bits 4` with every attention and MLP linear at 4 bits, in groups of 32, but v_proj and
#   down_proj (int8, as llama.cpp's Q4_K_M gives those more bits too; W4_ARGS overrides; the
#   tied embedding / head stays int8 weight-only) with the haq method on tools/data/calib/mix.txt. The text is the held-out set (tools/data/heldout/:
#   prose, docs, play, code, recall, concatenated; never calibrated on).
#   Protocols: llama-perplexity cuts the text into chunks of ctx tokens and scores only the
#   second half of each chunk (tokens ctx/2+1 .. ctx-1); edgemoe ppl scores every token of
#   non-overlapping windows of ctx (tokens 1 .. ctx-1). Neither adds a BOS here (SmolLM2's GGUF
#   has add_bos_token = false). The two cannot be matched exactly, so each side's quantized
#   perplexity is compared with its own f32 perplexity under its own protocol: the "loss" column,
#   ppl_quantized / ppl_f32 - 1.
# speed: builtin:mixtral-bench and builtin:smol-moe. llama.cpp's files: `edgemoe export --dtype
#   bf16`, `tools/llama_cpp.sh gguf ... bf16`, `llama-quantize` to Q4_K_M and Q4_0. edgemoe's:
#   `quantize --method rtn --bits 4` of the builtin (routed experts 4-bit, attention and head
#   int8: the W4A8 default) and W8A8 as `bench --quant rtn`. PAIRS (default 3) alternated rounds
#   of llama-bench (--repack 0 -t 2 -p 64 -n 64 -r 3) on each GGUF and `edgemoe bench -p 64 -n 64
#   -b 1 --threads 2 -r 3` on each; the table gives the median of each run's mean tok/s.
#
# Files go to target/w4_vs_llama/ (ignored by git); converted and quantized models already there
# are reused (delete the directory to redo them). Needs llama.cpp built by `tools/llama_cpp.sh
# build` (llama-bench, llama-quantize, llama-perplexity and the converter's venv); honours
# LLAMA_CPP_DIR and LLAMA_CPP_VENV as that script does. Environment: PAIRS, CTXS (default
# "256 1024"), METHOD (SmolLM2's edgemoe method, default haq).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
what=${1:-all}
edgemoe=$(realpath "${2:-target/release/edgemoe}")
llama=${LLAMA_CPP_DIR:-$repo/target/llama.cpp}/build/bin
pairs=${PAIRS:-3}
ctxs=${CTXS:-256 1024}
method=${METHOD:-haq}
# SmolLM2's linears at 4 bits: all but v_proj and down_proj, which stay int8, in groups of 32
# (both chosen by KL on the quantization tuning texts within Q4_K_M's file size:
# docs/quantization.md, fifth and sixth rounds). The first recipe, every linear at 4 bits in
# groups of 64, is W4_ARGS="--int4 self_attn --int4 mlp --group-size 64".
# shellcheck disable=SC2206 # a list of arguments
w4_args=(${W4_ARGS:---int4 q_proj --int4 k_proj --int4 o_proj --int4 gate_proj --int4 up_proj --group-size 32})
out=target/w4_vs_llama
mkdir -p "$out"
load0=$(cut -d' ' -f1-3 /proc/loadavg) # other tenants of a shared machine move every timing
rows=$out/rows.tsv # kind model weights key value, one measurement a line
: >"$rows"

die() { echo "w4_vs_llama.sh: $*" >&2; exit 1; }
row() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$rows"; }
size() { stat -c %s "$1"; }
for tool in llama-bench llama-quantize llama-perplexity; do
  [[ -x $llama/$tool ]] || die "$llama/$tool is missing: run tools/llama_cpp.sh build"
done

# FILE made by COMMAND... unless it is already there (removed again when COMMAND fails, so a
# broken file is never reused); COMMAND's output goes to FILE.log.
once() {
  local file=$1
  shift
  [[ -s $file ]] && return
  echo "making $file" >&2
  mkdir -p "$(dirname "$file")"
  "$@" >"$file.log" 2>&1 || { tail -n 20 "$file.log" >&2; rm -f "$file"; die "making $file failed"; }
}

llama_ppl() { # MODEL CTX -> perplexity
  "$llama/llama-perplexity" -m "$1" -f "$text" -c "$2" -b "$2" -t 2 >"$out/ppl.log" 2>&1 ||
    { tail -n 20 "$out/ppl.log" >&2; die "llama-perplexity failed on $1"; }
  sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p' "$out/ppl.log"
}
edgemoe_ppl() { # MODEL CTX [FLAGS] -> perplexity
  "$edgemoe" ppl --model "$1" --text "$text" --ctx "$2" --threads 2 --json "${@:3}" 2>/dev/null |
    python3 -c "import json, sys; print(json.load(sys.stdin)['ppl'])"
}

if [[ $what == ppl || $what == all ]]; then
  gguf=target/models/SmolLM2-135M-Instruct.Q4_1.gguf
  [[ -f $gguf ]] || bash tools/fetch_smollm2.sh
  text=$out/heldout.txt
  cat tools/data/heldout/{prose,docs,play,code,recall}.txt >"$text"
  s=$out/smollm2
  once "$s-f32.gguf" "$llama/llama-quantize" --allow-requantize "$gguf" "$s-f32.gguf" F32
  once "$s-q4_k_m.gguf" "$llama/llama-quantize" "$s-f32.gguf" "$s-q4_k_m.gguf" Q4_K_M
  once "$s-q4_0.gguf" "$llama/llama-quantize" "$s-f32.gguf" "$s-q4_0.gguf" Q4_0
  once "$s-w4a8.emoe" "$edgemoe" quantize --model "$gguf" --calib tools/data/calib/mix.txt \
    --method "$method" --bits 4 "${w4_args[@]}" --threads 2 --out "$s-w4a8.emoe"
  grep -h "quantized linears" "$s-w4a8.emoe.log" >&2 || true
  m=SmolLM2-135M
  for f in f32 q4_k_m q4_0; do row size $m "llama.cpp ${f^^}" bytes "$(size "$s-$f.gguf")"; done
  row size $m "edgemoe W4A8" bytes "$(size "$s-w4a8.emoe")"
  for c in $ctxs; do
    for f in f32 q4_k_m q4_0; do row ppl $m "llama.cpp ${f^^}" "ctx$c" "$(llama_ppl "$s-$f.gguf" "$c")"; done
    row ppl $m "edgemoe F32" "ctx$c" "$(edgemoe_ppl "$gguf" "$c" --gguf-f32)"
    row ppl $m "edgemoe W4A8" "ctx$c" "$(edgemoe_ppl "$s-w4a8.emoe" "$c")"
  done
fi

if [[ $what == speed || $what == all ]]; then
  for m in mixtral-bench smol-moe; do
    b=$out/$m
    once "$b-hf/config.json" "$edgemoe" export --model "builtin:$m" --out "$b-hf" --dtype bf16
    once "$b-bf16.gguf" bash tools/llama_cpp.sh gguf "$b-hf" "$b-bf16.gguf" bf16
    once "$b-q4_k_m.gguf" "$llama/llama-quantize" "$b-bf16.gguf" "$b-q4_k_m.gguf" Q4_K_M
    once "$b-q4_0.gguf" "$llama/llama-quantize" "$b-bf16.gguf" "$b-q4_0.gguf" Q4_0
    once "$b-w4a8.emoe" "$edgemoe" quantize --model "builtin:$m" --method rtn --bits 4 \
      --threads 2 --out "$b-w4a8.emoe"
    for f in q4_k_m q4_0; do row size "$m" "llama.cpp ${f^^}" bytes "$(size "$b-$f.gguf")"; done
    row size "$m" "edgemoe W4A8" bytes "$(size "$b-w4a8.emoe")"
    for i in $(seq 1 "$pairs"); do
      for f in q4_k_m q4_0; do
        "$llama/llama-bench" -m "$b-$f.gguf" --repack 0 -t 2 -p 64 -n 64 -r 3 -o json 2>/dev/null |
          python3 -c "
import json, sys
for r in json.load(sys.stdin):
    print('speed\t$m\tllama.cpp ${f^^}\t%s\t%s' % ('tg' if r['n_gen'] else 'pp', r['avg_ts']))" >>"$rows"
      done
      for side in w4a8 w8a8; do
        model=(--model "$b-w4a8.emoe")
        [[ $side == w8a8 ]] && model=(--model "builtin:$m" --quant rtn)
        "$edgemoe" bench "${model[@]}" -p 64 -n 64 -b 1 --threads 2 -r 3 --json 2>/dev/null |
          python3 -c "
import json, sys
for r in json.load(sys.stdin)['results']:
    print('speed\t$m\tedgemoe ${side^^}\t%s\t%s' % (r['test'][:2], r['tokens_per_s']['mean']))" >>"$rows"
      done
    done
  done
fi

commit=$(git rev-parse --short HEAD)
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit, $(nproc) cores, load average at the start" \
  "$load0, at the end $(cut -d' ' -f1-3 /proc/loadavg), $pairs pairs"
python3 - "$rows" <<'PY'
import collections, statistics, sys

vals = collections.defaultdict(list)
order = []
for line in open(sys.argv[1]):
    kind, model, weights, key, value = line.rstrip("\n").split("\t")
    if (model, weights) not in order:
        order.append((model, weights))
    vals[(model, weights, kind, key)].append(float(value))

def get(model, weights, kind, key):
    v = vals.get((model, weights, kind, key))
    return statistics.median(v) if v else None

# Per model: llama.cpp rows, then edgemoe's; each side's F32 reference first.
models = list(dict.fromkeys(m for m, _ in order))
order.sort(key=lambda mw: (models.index(mw[0]), mw[1].split()[0] != "llama.cpp", not mw[1].endswith("F32")))
ctxs = sorted({k[3] for k in vals if k[2] == "ppl"}, key=lambda c: int(c[3:]))
head = ["model", "weights", "file MiB"] + [f"ppl {c} (loss vs own f32)" for c in ctxs]
head += ["pp64 tok/s", "tg64 tok/s", "tg64 / llama.cpp Q4_K_M"]
print("| " + " | ".join(head) + " |")
print("| --- | --- |" + " ---: |" * (len(head) - 2))
for model, weights in order:
    side = weights.split()[0]
    ref = f"{side} F32"
    size = get(model, weights, "size", "bytes")
    cells = [model, weights, f"{size / 2**20:.1f}" if size else ""]
    for c in ctxs:
        p, p0 = get(model, weights, "ppl", c), get(model, ref, "ppl", c)
        cells.append("" if p is None else f"{p:.4f}" if weights == ref else f"{p:.4f} ({(p / p0 - 1) * 100:+.2f}%)")
    pp, tg = get(model, weights, "speed", "pp"), get(model, weights, "speed", "tg")
    base = get(model, "llama.cpp Q4_K_M", "speed", "tg")
    cells += [f"{pp:.1f}" if pp else "", f"{tg:.1f}" if tg else "",
              f"{tg / base:.2f}×" if tg and base else ""]
    print("| " + " | ".join(cells) + " |")
PY
