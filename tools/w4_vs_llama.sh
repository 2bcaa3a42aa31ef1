#!/usr/bin/env bash
# edgemoe W4A8 and W8A8 beside llama.cpp Q8_0, Q4_K_M and Q4_0 on the same models (issue 28): file
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
#   up_proj (int8; W4_ARGS overrides; the tied embedding / head stays int8 weight-only) with the
#   haq method on tools/data/calib/mix3.txt. The text is the held-out set (tools/data/heldout/:
#   prose, docs, play, code, recall, concatenated; never calibrated on).
#   Protocols: llama-perplexity cuts the text into chunks of ctx tokens and scores only the
#   second half of each chunk (tokens ctx/2+1 .. ctx-1); edgemoe ppl scores every token of
#   non-overlapping windows of ctx (tokens 1 .. ctx-1). Neither adds a BOS here (SmolLM2's GGUF
#   has add_bos_token = false). The two cannot be matched exactly, so each side's quantized
#   perplexity is compared with its own f32 perplexity under its own protocol: the "loss" column,
#   ppl_quantized / ppl_f32 - 1.
# speed: builtin:mixtral-bench and builtin:smol-moe. llama.cpp's files: `edgemoe export --dtype
#   bf16`, `tools/llama_cpp.sh gguf ... bf16`, `llama-quantize` to Q8_0, Q4_K_M and Q4_0.
#   edgemoe's: `quantize --method rtn --bits 4` of the builtin (routed experts 4-bit, attention
#   and head int8: the W4A8 default), `quantize --method rtn` (W8A8) and `export --dtype f32`
#   (the f32 model, for W8A8's decode against it). PAIRS (default 3)
#   alternated rounds of llama-bench (--repack 0 -t 2 -p 64 -n 64 -r 3) on each GGUF and `edgemoe
#   bench -p 64 -n 64 -b 1 --threads 2 -r 3` on each .emoe; the table gives the median of each
#   run's mean tok/s, and a second table issue 28's ratios (W8A8 against Q8_0, W4A8 against
#   Q4_K_M and against W8A8).
#
# Files go to target/w4_vs_llama/ (ignored by git); converted and quantized models already there
# are reused (delete the directory to redo them). Needs llama.cpp built by `tools/llama_cpp.sh
# build` (llama-bench, llama-quantize, llama-perplexity and the converter's venv); honours
# LLAMA_CPP_DIR and LLAMA_CPP_VENV as that script does, and LLAMA_CPP_BIN (the directory of its
# binaries: target/llama.cpp/build-avx2/bin after `tools/llama_cpp.sh build-avx2` for the AVX2
# stand-in, with EDGEMOE_INT8_TIER=avx2 EDGEMOE_HALF_TIER=avx2 for edgemoe). Environment:
# PAIRS, CTXS (default "256 1024"), METHOD (SmolLM2's edgemoe method, default haq), W4_ARGS and
# W4_CALIB (SmolLM2's W4A8 linears and calibration text, below).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
what=${1:-all}
edgemoe=$(realpath "${2:-target/release/edgemoe}")
llama=${LLAMA_CPP_BIN:-${LLAMA_CPP_DIR:-$repo/target/llama.cpp}/build/bin}
pairs=${PAIRS:-3}
ctxs=${CTXS:-256 1024}
method=${METHOD:-haq}
# SmolLM2's linears at 4 bits: all but v_proj and up_proj, which stay int8, in groups of 32,
# calibrated on mix3.txt (three times mix.txt's text) — each chosen by mean KL from f32 on the
# quantization tuning texts (tools/data/tune/ and the KJV heldout.txt's first 9 600 bytes,
# tools/quant_sensitivity.sh) within Q4_K_M's file size: docs/quantization.md, fifth, sixth and
# seventh rounds (v_proj and down_proj int8 on mix.txt, the sixth round's recipe: 48.88
# millinats; up_proj instead of down_proj 46.15; and on mix3.txt 45.09). The first recipe, every
# linear at 4 bits in groups of 64, is W4_ARGS="--int4 self_attn --int4 mlp --group-size 64";
# the sixth round's, W4_ARGS="--int4 q_proj --int4 k_proj --int4 o_proj --int4 gate_proj
# --int4 up_proj --group-size 32" with W4_CALIB=tools/data/calib/mix.txt.
# shellcheck disable=SC2206 # a list of arguments
w4_args=(${W4_ARGS:---int4 q_proj --int4 k_proj --int4 o_proj --int4 gate_proj --int4 down_proj --group-size 32})
w4_calib=${W4_CALIB:-tools/data/calib/mix3.txt}
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

# Bytes of weights a llama.cpp decode step reads: every tensor but the embedding table (one row a
# token; it is the head when there is no output.weight) and, of the routed experts' stacked
# tensors, top-k of n experts. Its KV cache (f16, a few hundred KiB at 128 tokens) is left out.
gguf_token_bytes() { # MODEL.gguf -> bytes
  "${LLAMA_CPP_VENV:-$repo/target/llama.cpp-venv}/bin/python" - "$1" <<'PY'
import sys
import gguf

r = gguf.GGUFReader(sys.argv[1])
arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
used = int(r.fields[f"{arch}.expert_used_count"].parts[-1][0]) if f"{arch}.expert_used_count" in r.fields else 0
names = {t.name for t in r.tensors}
total = 0.0
for t in r.tensors:
    if t.name == "token_embd.weight" and "output.weight" in names:
        continue
    share = used / int(t.shape[-1]) if "_exps." in t.name else 1.0
    total += int(t.n_bytes) * share
print(int(total))
PY
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
  once "$s-w4a8.emoe" "$edgemoe" quantize --model "$gguf" --calib "$w4_calib" \
    --calib-tokens 60000 --method "$method" --bits 4 "${w4_args[@]}" --threads 2 \
    --out "$s-w4a8.emoe"
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
    once "$b-q8_0.gguf" "$llama/llama-quantize" "$b-bf16.gguf" "$b-q8_0.gguf" Q8_0
    once "$b-w4a8.emoe" "$edgemoe" quantize --model "builtin:$m" --method rtn --bits 4 \
      --threads 2 --out "$b-w4a8.emoe"
    once "$b-w8a8.emoe" "$edgemoe" quantize --model "builtin:$m" --method rtn \
      --threads 2 --out "$b-w8a8.emoe"
    once "$b-f32/config.json" "$edgemoe" export --model "builtin:$m" --out "$b-f32" --dtype f32
    for f in q8_0 q4_k_m q4_0; do
      row size "$m" "llama.cpp ${f^^}" bytes "$(size "$b-$f.gguf")"
      row decode "$m" "llama.cpp ${f^^}" bytes "$(gguf_token_bytes "$b-$f.gguf")"
    done
    for side in w8a8 w4a8; do row size "$m" "edgemoe ${side^^}" bytes "$(size "$b-$side.emoe")"; done
    for i in $(seq 1 "$pairs"); do
      for f in q8_0 q4_k_m q4_0; do
        "$llama/llama-bench" -m "$b-$f.gguf" --repack 0 -t 2 -p 64 -n 64 -r 3 -o json 2>/dev/null |
          python3 -c "
import json, sys
for r in json.load(sys.stdin):
    print('speed\t$m\tllama.cpp ${f^^}\t%s\t%s' % ('tg' if r['n_gen'] else 'pp', r['avg_ts']))" >>"$rows"
      done
      for side in w8a8 w4a8 f32; do
        file=$b-$side.emoe
        [[ $side == f32 ]] && file=$b-f32
        "$edgemoe" bench --model "$file" -p 64 -n 64 -b 1 --threads 2 -r 3 --json \
          --membw 2>/dev/null |
          python3 -c "
import json, sys
d = json.load(sys.stdin)
for r in d['results']:
    print('speed\t$m\tedgemoe ${side^^}\t%s\t%s' % (r['test'][:2], r['tokens_per_s']['mean']))
    if r['test'].startswith('tg'):
        b = r['decode_bytes_per_token']
        print('decode\t$m\tedgemoe ${side^^}\tbytes\t%s' % (b['weights'] + b['kv_cache']))
print('bandwidth\t$m\tmachine\tgbs\t%s' % d['read_bandwidth']['gb_per_s'])" >>"$rows"
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
    if (model, weights) not in order and kind != "bandwidth":
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

# Decode against the memory roofline: bytes a token reads, the GB/s the measured tok/s mean,
# and their share of the read bandwidth edgemoe bench --membw measured in the same run.
if any(k[2] == "decode" for k in vals):
    print()
    print("| model | weights | MB/token | tg64 tok/s | GB/s read | of the bandwidth |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for model, weights in order:
        b, tg = get(model, weights, "decode", "bytes"), get(model, weights, "speed", "tg")
        bw = get(model, "machine", "bandwidth", "gbs")
        if b and tg:
            share = f"{b * tg / 1e9 / bw * 100:.0f}% of {bw:.1f}" if bw else ""
            print(f"| {model} | {weights} | {b / 1e6:.1f} | {tg:.1f} | {b * tg / 1e9:.1f} | {share} |")

# Issue 28's speed ratios, per model: each edgemoe side against llama.cpp at its bits, and W4A8
# against W8A8 (all medians of the alternated runs above).
ratios = [("W8A8 pp64 / Q8_0", "edgemoe W8A8", "llama.cpp Q8_0", "pp", 2.0),
          ("W8A8 tg64 / Q8_0", "edgemoe W8A8", "llama.cpp Q8_0", "tg", 1.3),
          ("W4A8 tg64 / Q4_K_M", "edgemoe W4A8", "llama.cpp Q4_K_M", "tg", 1.3),
          ("W4A8 tg64 / W8A8", "edgemoe W4A8", "edgemoe W8A8", "tg", 1.6),
          ("W8A8 tg64 / f32", "edgemoe W8A8", "edgemoe F32", "tg", 3.0)]
if any(k[2] == "speed" for k in vals):
    print()
    print("| model | ratio | value | issue 28's bound |")
    print("| --- | --- | ---: | ---: |")
    for model in models:
        for name, a, b, key, bound in ratios:
            x, y = get(model, a, "speed", key), get(model, b, "speed", key)
            if x and y:
                print(f"| {model} | {name} | {x / y:.2f}× | ≥ {bound}× |")
PY
