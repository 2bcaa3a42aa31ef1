#!/usr/bin/env bash
# The memory architecture's checks, measured from outside the process (cgroup usage with page
# cache, via tools/memlimit.sh) and by edgemoe's own reports:
#   1. a bf16 checkpoint (builtin:mixtral-bench exported as bf16) runs with peak RSS near its
#      file size, and decodes about twice as fast as the same model in f32;
#   2. an .emoe (builtin:smol-moe, W8A8) holds only its non-expert bytes after loading;
#   3. under a cgroup limit of 60% of the .emoe's size, generate completes with the same greedy
#      text as without a limit (the OS pages the mapped experts).
#
# usage: tools/memory_checks.sh [EDGEMOE_BINARY]     (default: target/release/edgemoe)
# Writes its models under target/exports/ (ignored by git); needs root for the cgroup.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/edgemoe}
out=target/exports
mkdir -p "$out"
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

echo "== 1. bf16 checkpoint in place"
bf16=$out/mixtral-bench-bf16
[ -f "$bf16/model.safetensors" ] || "$bin" export --model builtin:mixtral-bench --out "$bf16" --dtype bf16
file_bytes=$(stat -c %s "$bf16/model.safetensors")
echo "model.safetensors: $file_bytes bytes"
/usr/bin/time -v "$bin" generate --model "$bf16" --prompt "Once" -n 32 --threads 2 --json \
  2>"$out/time-bf16.txt" | json '"decode %.1f tok/s, VmHWM %d B" % (d["decode_tokens_per_s"], d["peak_rss_bytes"])'
rss_kb=$(awk -F: '/Maximum resident/ {gsub(/ /,"",$2); print $2}' "$out/time-bf16.txt")
python3 -c "print(f'peak RSS (time -v) {$rss_kb*1024} B = {$rss_kb*1024/$file_bytes:.3f} x the file')"
"$bin" bench --model "$bf16" -p 64 -n 64 -b 1 --threads 2 -r 5 2>/dev/null | tail -2
"$bin" bench --model builtin:mixtral-bench -p 64 -n 64 -b 1 --threads 2 -r 5 2>/dev/null | tail -2

echo "== 2. .emoe after loading"
emoe=$out/smol-moe-rtn.emoe
[ -f "$emoe" ] || "$bin" quantize --model builtin:smol-moe --method rtn --out "$emoe" >/dev/null
emoe_bytes=$(stat -c %s "$emoe")
data=$("$bin" inspect "$emoe" --json | json 'd["data_region"]["len"]')
"$bin" generate --model "$emoe" --prompt "Once" -n 32 --threads 2 --json >"$out/free.json" 2>/dev/null
m='d["memory_at_load"]'
json "'non-expert bytes $data; RSS after loading %d B = %.3f x (peak so far %d B)' % ($m['rss_bytes'], $m['rss_bytes'] / $data, $m['peak_rss_bytes'])" <"$out/free.json"

echo "== 3. generate under a cgroup limit of 60% of the .emoe ($emoe_bytes bytes)"
limit=$((emoe_bytes * 6 / 10))
tools/memlimit.sh --drop-caches --json "$out/limit.json" "$limit" -- \
  "$bin" generate --model "$emoe" --prompt "Once" -n 32 --threads 2 --json >"$out/limited.json" 2>/dev/null
cat "$out/limit.json"
python3 - "$out/free.json" "$out/limited.json" <<'EOF'
import json, sys
free, limited = (json.load(open(p)) for p in sys.argv[1:])
same = free["text"] == limited["text"] and free["completion_tokens"] == limited["completion_tokens"]
print(f"same greedy text: {same} ({free['completion_tokens']} tokens); decode "
      f"{free['decode_tokens_per_s']:.1f} tok/s unlimited, {limited['decode_tokens_per_s']:.1f} limited")
sys.exit(0 if same else 1)
EOF
