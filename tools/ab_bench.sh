#!/usr/bin/env bash
# Two edgemoe binaries side by side: `edgemoe bench` run alternately with each, PAIRS times, and
# the median of each binary's per-run means printed per test (pp, tg). For "this change is not
# slower" checks on a shared machine, where the same command moves between minutes.
#
#   tools/ab_bench.sh OLD_BINARY NEW_BINARY [PAIRS] [-- BENCH ARGS...]
#
# With AB_MODELS="OLD_MODEL NEW_MODEL" the two sides run their own --model (one binary may be
# given twice): e.g. a W8A8 and a W4A8 .emoe of the same checkpoint. Leave --model out of the
# bench arguments then.
#
# Default bench arguments: --model builtin:mixtral-bench --quant rtn -p 64 -n 64 -b 1
# --threads 2 -r 3. Needs python3 (for the medians) and nothing else.
set -euo pipefail
old="$1"; new="$2"; shift 2
pairs=7
if [ $# -gt 0 ] && [ "$1" != "--" ]; then pairs="$1"; shift; fi
[ "${1:-}" = "--" ] && shift
args=("$@")
models=(${AB_MODELS:-})
if [ ${#args[@]} -eq 0 ]; then
  args=(-p 64 -n 64 -b 1 --threads 2 -r 3)
  [ ${#models[@]} -eq 0 ] && args=(--model builtin:mixtral-bench --quant rtn "${args[@]}")
fi
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
for i in $(seq 1 "$pairs"); do
  for side in old new; do
    bin="$old"; [ "$side" = new ] && bin="$new"
    model=()
    if [ ${#models[@]} -eq 2 ]; then
      model=(--model "${models[0]}"); [ "$side" = new ] && model=(--model "${models[1]}")
    fi
    "$bin" bench "${model[@]}" "${args[@]}" --json > "$dir/$side.$i.json"
  done
done
python3 - "$dir" "$old" "$new" "$pairs" <<'PY'
import glob, json, os, statistics, sys
dir, old, new, pairs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
runs = {}
# Sorted by pair number, so each side's runs line up pair by pair.
for path in sorted(glob.glob(os.path.join(dir, "*.json")), key=lambda p: int(p.split(".")[-2])):
    side = os.path.basename(path).split(".")[0]
    for row in json.load(open(path))["results"]:
        runs.setdefault(row["test"], {}).setdefault(side, []).append(row["tokens_per_s"]["mean"])
print(f"{pairs} alternated pairs; medians of each run's mean, tok/s")
print("| test | old | new | new/old | median of pair ratios | old runs | new runs |")
print("| --- | ---: | ---: | ---: | ---: | --- | --- |")
for test, sides in runs.items():
    olds, news = sides.get("old", []), sides.get("new", [])
    o, n = statistics.median(olds or [0]), statistics.median(news or [0])
    ratios = [b / a for a, b in zip(olds, news) if a]
    pair = statistics.median(ratios) if ratios else 0
    fmt = lambda v: " ".join(f"{x:.1f}" for x in v)
    print(f"| {test} | {o:.1f} | {n:.1f} | {n / o if o else 0:.3f} | {pair:.3f} | {fmt(olds)} | {fmt(news)} |")
print(f"old = {old}\nnew = {new}")
if os.environ.get("AB_MODELS"):
    print("models (old, new) = " + os.environ["AB_MODELS"])
PY
