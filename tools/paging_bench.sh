#!/usr/bin/env bash
# Expert paging: decode tokens/s, hit rate and stall per token per memory budget × policy, each
# configuration a fresh process started with the page cache dropped, under a cgroup whose limit
# is the budget + 10% (tools/memlimit.sh), so the peak it reports (process + page cache) is
# measured from outside.
#
# usage: tools/paging_bench.sh MODEL.emoe OUT_DIR BUDGET[,BUDGET…] [POLICY/PREFETCH …]
#   BUDGET          bytes with a binary suffix (1130M, 1.5G), as --mem takes them
#   POLICY/PREFETCH e.g. stats/on lru/off (default: stats/on lfu/on lru/on lru/off)
# environment: PROMPT (8), GEN (24), REPS (1), THREADS (2), EDGEMOE (target/release/edgemoe),
#              PROFILE (a STATS.json from `edgemoe profile` the runs start from; none by default)
#
# Writes OUT_DIR/runs.jsonl (one line per run: bench's row + the cgroup's peak) and prints a
# markdown table. Needs root (drop_caches, cgroup v1 memory controller).
set -euo pipefail
model=$1 out=$2 budgets=$3
shift 3
configs=("$@")
((${#configs[@]})) || configs=(stats/on lfu/on lru/on lru/off)
bin=${EDGEMOE:-target/release/edgemoe}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$out"
: >"$out/runs.jsonl"
IFS=, read -ra mems <<<"$budgets"
for mem in "${mems[@]}"; do
    bytes=$(python3 -c "import re,sys; m=re.fullmatch(r'([0-9.]+)([KMGT]?)', sys.argv[1].upper()); print(int(float(m[1]) * 1024 ** ' KMGT'.index(m[2] or ' ')))" "$mem")
    limit=$((bytes + bytes / 10))
    for c in "${configs[@]}"; do
        policy=${c%/*} prefetch=${c#*/}
        tag="$mem-$policy-$prefetch"
        echo "== --mem $mem --expert-policy $policy --prefetch $prefetch (cgroup limit $limit)" >&2
        "$here/memlimit.sh" --drop-caches --json "$out/$tag.cgroup.json" "$limit" -- \
            "$bin" bench --model "$model" --mem "$mem" --expert-policy "$policy" --prefetch "$prefetch" \
            -p "${PROMPT:-8}" -n "${GEN:-24}" -r "${REPS:-1}" --threads "${THREADS:-2}" --json \
            ${PROFILE:+--profile "$PROFILE"} \
            >"$out/$tag.json" 2>"$out/$tag.log" || { echo "failed: see $out/$tag.log" >&2; continue; }
        python3 - "$out/$tag.json" "$out/$tag.cgroup.json" >>"$out/runs.jsonl" <<'PY'
import json, sys
row = json.load(open(sys.argv[1]))[0]
cg = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
row["cgroup_peak_bytes"] = cg["peak_bytes"]
row["cgroup_limit_bytes"] = cg["limit_bytes"]
row["oom_killed"] = cg["oom_killed"]
print(json.dumps(row))
PY
    done
done
python3 - "$out/runs.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| --mem | of expert bytes | policy | prefetch | slots | hit rate | stall ms/token | read GB/s | decode tok/s | cgroup peak / budget |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    c = r["cache"]
    print(f"| {r['budget_bytes']/2**20:.0f} MiB | {100*r['budget_of_experts']:.0f}% | {r['policy']} | {'on' if r['prefetch'] else 'off'} | {c['slots']} "
          f"| {100*c['hit_rate']:.1f}% | {c['stall_ms_per_token']:.0f} | {c['read_gb_per_s']:.2f} "
          f"| {statistics.median(r['tg_tokens_per_s']):.2f} | {r['cgroup_peak_bytes']/r['budget_bytes']:.2f} |")
PY
