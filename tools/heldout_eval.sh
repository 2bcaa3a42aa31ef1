#!/usr/bin/env bash
# Issue 29: KV eviction and W8A8 quantization on texts the project never tuned on, one table.
#
# HELD-OUT texts: tools/data/heldout/{prose,play,docs,code,recall}.txt (tools/make_heldout.py;
# sources in tools/data/heldout/MANIFEST.md). TUNING texts, shown beside them but never in the
# mean or the worst: tools/data/recall.txt (KV, tune-recall: facts recur 700-1250 tokens
# apart), tools/data/recall_mixed.txt (KV, tune-mixed, tools/make_recall_mixed.py: facts recur
# 150-420 and 560-1150 tokens apart, both sides of a 25% budget) and the trained fixture's KJV heldout.txt
# (quantization; its calib.txt is the calibration text). Each text is cut to its first ~9 KB
# (one 2048-token window; eight of 256 and two of 1024), so the whole run fits a shared 2-core
# machine: fewer windows per text than the README's protocol, the same protocol per window.
#
#   KV: full, window (StreamingLLM, 4 sinks), h2o and lazy at 50% and 25% of a 2048-token
#       window: ppl change against the full cache; on the recall texts also the top-1 rate of
#       restated fact tokens (`--facts`).
#   quant: f32 (the GGUF's weights dequantized), then rtn, smooth, gptq, haq quantized on
#       CALIB (default tools/data/calib/mix.txt, tools/make_calib_mix.py: none of it is a
#       tuning or held-out text): ppl change against f32 at ctx 256 and 1024, each run with
#       `--kl-ref` (the f32 model), so also the KL divergence from f32 and the chance spread of
#       each text's ppl ratio; quantize wall time and peak RSS against the f32 weights' size.
#       Quantization TUNING texts: tune-kjv, tune-code, tune-docs (tools/data/tune/).
#
# usage: tools/heldout_eval.sh [--kv-only | --quant-only | --table-only] [--texts "prose play ..."]
#   --table-only prints the table of the results already there.
# env: MODEL (SmolLM2 GGUF), BIN (release edgemoe), THREADS (2), REQUANT=1 to quantize again
#      when target/exports/heldout/smollm2-METHOD.emoe exists already, QUANT_BYTES (20000:
#      every text whole), CALIB, QUANT_ARGS (more `quantize` arguments),
#      KV_POLICIES ("window h2o lazy"; an entry POLICY:FLAG=VALUE[,FLAG=VALUE…] adds flags,
#      e.g. lazy:--kv-threshold=16 or lazy:--kv-granularity=head,--kv-threshold=16), KV_TEXTS (the two tuning recall texts and the held-out ones),
#      KV_BUDGETS ("50 25"), KV_FULL=0 to skip the full-cache runs, KV_OUT (results-kv): the file name of this run's
#      KV results, so runs of parts can go side by side.
# Raw results: target/exports/heldout/results-*.jsonl (one JSON line per run; a run rewrites
# only its own file); the table, of every results-*.jsonl there, on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-target/models/SmolLM2-135M-Instruct.Q4_1.gguf}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/edgemoe}
THREADS=${THREADS:-2}
do_kv=1 do_quant=1
held="prose play docs code recall"
while [ $# -gt 0 ]; do
  case $1 in
  --kv-only) do_quant=0 ;;
  --quant-only) do_kv=0 ;;
  --table-only) do_kv=0 do_quant=0 ;;
  --texts) held=$2; shift ;;
  *) echo "unknown argument $1 (--kv-only, --quant-only, --texts LIST)" >&2; exit 2 ;;
  esac
  shift
done
[ -f "$MODEL" ] || bash tools/fetch_smollm2.sh
[ -x "$BIN" ] || { echo "no $BIN: cargo build --release first" >&2; exit 1; }
out=target/exports/heldout
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The tuning texts, cut like the held-out ones (recall.txt: its first block).
head -c 9000 tools/data/recall.txt >"$tmp/tune-recall.txt"
head -c 9600 tests/fixtures/trained-moe/heldout.txt >"$tmp/tune-kjv.txt"
cp tools/data/recall_mixed.txt "$tmp/tune-mixed.txt"
cp tools/data/tune/code.txt "$tmp/tune-code.txt"
cp tools/data/tune/docs.txt "$tmp/tune-docs.txt"
path() { case $1 in tune-*) echo "$tmp/$1.txt" ;; *) echo "tools/data/heldout/$1.txt" ;; esac; }
# The quantization runs score the first QUANT_BYTES of each text (default: all of it, ~2 300
# tokens: 8-10 windows of 256, 2 of 1024).
qpath() { head -c "${QUANT_BYTES:-20000}" "$(path "$1")" >"$tmp/q-$1.txt" && echo "$tmp/q-$1.txt"; }
facts() {
  case $1 in
  tune-recall) echo tools/data/recall_facts.txt ;;
  tune-mixed) echo tools/data/recall_mixed_facts.txt ;;
  recall) echo tools/data/heldout/recall_facts.txt ;;
  esac
}
# run TEXT MODEL CONFIG CTX EXTRA-ARGS...: one `edgemoe ppl`, its JSON tagged and appended.
run() {
  local text=$1 model=$2 config=$3 ctx=$4 f
  shift 4
  local fa=()
  f=$(facts "$text") && [ -n "$f" ] && fa=(--facts "$f")
  local file
  file=$(path "$text")
  [ "$ctx" = 2048 ] || file=$(qpath "$text")
  # A GGUF runs decoded to f32 (its exact values), not converted to int8 rows at load.
  case $model in *.gguf) fa+=(--gguf-f32) ;; esac
  "$BIN" ppl --model "$model" --text "$file" --ctx "$ctx" --threads "$THREADS" --json \
    "${fa[@]}" "$@" 2>"$tmp/err" | sed "s/^{/{\"text\":\"$text\",\"config\":\"$config\",/" >>"$res" ||
    { cat "$tmp/err" >&2; exit 1; }
  echo "  $text $config ctx $ctx done" >&2
}

if [ $do_kv = 1 ]; then
  res=$out/${KV_OUT:-results-kv}.jsonl
  : >"$res"
  echo "== KV policies, ctx 2048" >&2
  for text in ${KV_TEXTS:-tune-recall tune-mixed $held}; do
    [ "${KV_FULL:-1}" = 0 ] || run "$text" "$MODEL" full 2048
    for b in ${KV_BUDGETS:-50 25}; do
      for entry in ${KV_POLICIES:-window h2o lazy}; do
        p=${entry%%:*} flag=()
        [ "$entry" = "$p" ] || IFS=, read -ra flag <<<"${entry#*:}"
        run "$text" "$MODEL" "$entry $b%" 2048 --kv-budget $b% --kv-policy "$p" "${flag[@]}"
      done
    done
  done
fi

if [ $do_quant = 1 ]; then
  res=$out/${QUANT_OUT:-results-quant}.jsonl
  : >"$res"
  echo "== quantization" >&2
  tag=${QUANT_TAG:-} # a label suffix for runs of other QUANT_BYTES
  for m in ${QUANT_METHODS:-rtn smooth gptq haq}; do
    emoe=$out/smollm2-$m.emoe
    if [ "${REQUANT:-0}" = 1 ] || [ ! -s "$emoe" ] || [ ! -s "$out/time-$m.txt" ]; then
      echo "  quantize $m" >&2
      # shellcheck disable=SC2086 # QUANT_ARGS is a list of arguments
      /usr/bin/time -v "$BIN" quantize --model "$MODEL" --calib "${CALIB:-tools/data/calib/mix.txt}" \
        --method $m --threads "$THREADS" --out "$emoe" ${QUANT_ARGS:-} >"$out/quant-$m.txt" 2>"$out/time-$m.txt"
    fi
  done
  for text in tune-kjv tune-code tune-docs $held; do
    [ "$text" = recall ] && continue # generated facts between report prose: a KV text
    for ctx in 256 1024; do
      # f32's ppl comes with each run against it (--kl-ref scores the reference too).
      for m in ${QUANT_METHODS:-rtn smooth gptq haq}; do
        run "$text" "$out/smollm2-$m.emoe" "$m$tag" $ctx --kl-ref "$MODEL"
      done
    done
  done
fi

python3 - "$out" "$held" <<'PY'
import json, os, re, sys
out, held = sys.argv[1], sys.argv[2].split()
rows = [json.loads(l) for f in sorted(os.listdir(out))
        if f.startswith("results-") and f.endswith(".jsonl") for l in open(os.path.join(out, f))]
by = {(r["text"], r["config"], r["ctx"]): r for r in rows}
for r in rows:  # the f32 reference's ppl, as each quantized run scored it beside itself
    m = re.fullmatch(r"(rtn|smooth|gptq|haq)(.*)", r["config"])
    if m and "against_reference" in r:
        by.setdefault((r["text"], "f32" + m.group(2), r["ctx"]),
                      {"text": r["text"], "config": "f32" + m.group(2), "ctx": r["ctx"],
                       "ppl": r["against_reference"]["reference_ppl"],
                       "tokens": r["tokens"], "windows": r["windows"]})
rows += [v for k, v in by.items() if v not in rows]
texts = [t for t in ["tune-recall", "tune-mixed", "tune-kjv", "tune-code", "tune-docs"]
         if any(r["text"] == t for r in rows)] + held
head = texts + ["held-out mean", "worst held-out"]
print("| method | " + " | ".join(head) + " |")
print("|" + " --- |" * (len(head) + 1))

def line(label, values, worst=max, fmt="{:+.2f}%"):
    cells = [fmt.format(values[t]) if t in values else "" for t in texts]
    h = [values[t] for t in held if t in values]
    agg = [fmt.format(sum(h) / len(h)), fmt.format(worst(h))] if h else ["", ""]
    print(f"| {label} | " + " | ".join(cells + agg) + " |")

def delta(config, base, ctx):
    return {t: (by[(t, config, ctx)]["ppl"] / by[(t, base, ctx)]["ppl"] - 1) * 100
            for t in texts if (t, config, ctx) in by and (t, base, ctx) in by}

if any(r["config"] == "full" for r in rows):
    line("KV full: ppl (ctx 2048)", {t: by[(t, "full", 2048)]["ppl"] for t in texts
                                    if (t, "full", 2048) in by}, fmt="{:.3f}")
    kv = []  # every evicting configuration, in the order first run
    for r in rows:
        if r["ctx"] == 2048 and r["config"] != "full" and r["config"] not in kv:
            kv.append(r["config"])
    kv.sort(key=lambda c: -int(c.split()[-1].rstrip("%")))  # 50% first, stable otherwise
    for c in kv:
        line(f"KV {c}: Δppl", delta(c, "full", 2048))
    for c in ["full"] + kv:
        v = {t: by[(t, c, 2048)]["recall"]["repeat_top1"] * 100 for t in texts
             if (t, c, 2048) in by and "recall" in by[(t, c, 2048)]}
        line(f"facts top-1 on repeats, {c}", v, worst=min, fmt="{:.1f}")
    for c in ["full"] + kv:  # whole repeats greedy generation writes out (engine/recall.rs)
        v = {t: by[(t, c, 2048)]["recall"]["repeat_reproduced"] * 100 for t in texts
             if (t, c, 2048) in by and "repeat_reproduced" in by[(t, c, 2048)].get("recall", {})}
        if v:
            line(f"facts reproduced by greedy generation, repeats, {c}", v, worst=min,
                 fmt="{:.1f}")
    v = {t: by[(t, "lazy 50%", 2048)]["seconds"] / by[(t, "full", 2048)]["seconds"]
         for t in texts if (t, "lazy 50%", 2048) in by and (t, "full", 2048) in by}
    line("scoring time lazy 50% / full", v, fmt="{:.2f}")
tags = []
for r in rows:
    if r["config"].startswith("f32"):
        t = r["config"][3:]
        if t not in tags:
            tags.append(t)
for tag in tags:
    for ctx in [256, 1024]:
        line(f"f32{tag}: ppl (ctx {ctx})", {t: by[(t, "f32" + tag, ctx)]["ppl"] for t in texts
                                           if (t, "f32" + tag, ctx) in by}, fmt="{:.3f}")
        for m in ["rtn", "smooth", "gptq", "haq"]:
            if any(r["config"] == m + tag for r in rows):
                line(f"{m}{tag} ctx {ctx}: Δppl", delta(m + tag, "f32" + tag, ctx))
                kl = {t: by[(t, m + tag, ctx)]["against_reference"] for t in texts
                      if "against_reference" in by.get((t, m + tag, ctx), {})}
                if kl:
                    line(f"{m}{tag} ctx {ctx}: ± by chance (1 s.e.)",
                         {t: d["delta_nll_se"] * 100 for t, d in kl.items()}, fmt="{:.2f}%")
                    line(f"{m}{tag} ctx {ctx}: KL from f32 (millinats)",
                         {t: d["kl_mean"] * 1000 for t, d in kl.items()}, fmt="{:.2f}")
if tags:
    f32_bytes = 134515008 * 4  # SmolLM2-135M's parameters (tied head once) in f32
    print()
    for m in ["rtn", "smooth", "gptq", "haq"]:
        try:
            t = open(os.path.join(out, f"time-{m}.txt")).read()
        except OSError:
            continue
        wall = re.search(r"Elapsed \(wall clock\).*: (\S+)", t).group(1)
        kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1))
        cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): (\S+)", t))
        print(f"quantize {m}: wall {wall}, CPU {cpu:.0f} s, peak RSS {kb / 1024:.0f} MiB = "
              f"{kb * 1024 / f32_bytes:.2f}× the f32 weights")
runs = {(r["text"], r["ctx"]): (r["tokens"], r["windows"]) for r in rows}
print("\nwindows per text: " + ", ".join(f"{t} ctx {c}: {w} ({n} tokens)"
                                         for (t, c), (n, w) in sorted(runs.items())))
PY
