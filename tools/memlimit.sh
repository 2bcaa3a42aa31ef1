#!/usr/bin/env bash
# Runs a command under a memory limit in a fresh cgroup (v1 memory controller) and reports
# what it used, measured from outside the process.
#
# usage: tools/memlimit.sh [--drop-caches] [--json FILE] LIMIT -- COMMAND [ARG...]
#
#   LIMIT          bytes, or a number with a binary suffix: 300M, 1.2G, 512K, 2GiB (K/M/G/T,
#                  optionally followed by i/iB/B; 1M = 1048576 bytes)
#   --drop-caches  sync; echo 3 > /proc/sys/vm/drop_caches first, so the command starts with
#                  a cold page cache (what it reads from files then counts against its limit)
#   --json FILE    append the JSON line to FILE instead of printing it on stderr
#
# The group is created under the caller's own memory cgroup (so limits above it still hold),
# with memory.limit_in_bytes = LIMIT (and memory.memsw.limit_in_bytes where present, so swap
# cannot stretch it). Page cache the command causes counts against the limit, as the kernel
# charges it. After the command exits one JSON line is written:
#   {"limit_bytes":…, "peak_bytes":…, "oom_killed":true|false, "exit_code":…, "wall_s":…,
#    "failcnt":…, "oom_kill":…, "command":"…"}
# peak_bytes is memory.max_usage_in_bytes (process memory + page cache), failcnt the times
# the limit was hit (reclaim ran), oom_kill the kernel's OOM-kill counter for the group;
# oom_killed is true when that counter moved, or when the command died of SIGKILL after
# hitting the limit. Processes left in the group are killed, the group is removed, and the
# script exits with the command's status (128 + signal when a signal ended it).
#
# example: tools/memlimit.sh --drop-caches 600M -- target/release/edgemoe bench --model m.emoe
set -euo pipefail

die() { echo "memlimit.sh: $*" >&2; exit 125; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 125; }

drop_caches=0
json_file=
while (($#)); do
    case $1 in
    --drop-caches) drop_caches=1; shift ;;
    --json) (($# >= 2)) || usage; json_file=$2; shift 2 ;;
    -h | --help) usage ;;
    --) usage ;;
    *) break ;;
    esac
done
(($# >= 3)) && [[ $2 == -- ]] || usage
limit_arg=$1
shift 2
cmd=("$@")

# Bytes of a LIMIT such as 300M, 1.2G, 4096.
parse_limit() {
    local s=$1 num unit mult
    [[ $s =~ ^([0-9]+(\.[0-9]+)?)([KkMmGgTt]?)(i?B?)$ ]] || die "bad LIMIT '$s' (e.g. 300M, 1.2G, 4096)"
    num=${BASH_REMATCH[1]}
    unit=${BASH_REMATCH[3]^^}
    case $unit in
    '') mult=1 ;;
    K) mult=1024 ;;
    M) mult=$((1024 ** 2)) ;;
    G) mult=$((1024 ** 3)) ;;
    T) mult=$((1024 ** 4)) ;;
    esac
    awk -v n="$num" -v m="$mult" 'BEGIN { printf "%.0f\n", n * m }'
}
limit=$(parse_limit "$limit_arg")
((limit > 0)) || die "LIMIT must be positive"

# The memory controller's mount and this process's group in it.
root=$(awk '$3 == "cgroup" && $4 ~ /(^|,)memory(,|$)/ { print $2; exit }' /proc/mounts)
[[ -n $root && -f $root/memory.limit_in_bytes ]] || die "no cgroup v1 memory controller mounted"
self=$(awk -F: '$2 ~ /(^|,)memory(,|$)/ { print $3; exit }' /proc/self/cgroup)
parent=$root${self%/}
[[ -d $parent ]] || parent=$root
cg=$parent/memlimit.$$.$RANDOM
mkdir "$cg" || die "cannot create $cg (root needed)"

cleanup() {
    local pid tries
    if [[ -d $cg ]]; then
        # Whatever the command left behind in the group is its own; end it so the group can go.
        for tries in 1 2 3 4 5 6 7 8 9 10; do
            [[ -s $cg/cgroup.procs ]] || break
            while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done <"$cg/cgroup.procs"
            sleep 0.1
        done
        for tries in 1 2 3 4 5 6 7 8 9 10; do
            rmdir "$cg" 2>/dev/null && break
            sleep 0.2
        done
        [[ ! -d $cg ]] || echo "memlimit.sh: could not remove $cg" >&2
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "$limit" >"$cg/memory.limit_in_bytes" || die "cannot set memory.limit_in_bytes to $limit"
if [[ -f $cg/memory.memsw.limit_in_bytes ]]; then
    echo "$limit" >"$cg/memory.memsw.limit_in_bytes" 2>/dev/null || true
fi
# OOM-kill (not pause) the group's processes when reclaim cannot keep it under the limit.
echo 0 >"$cg/memory.oom_control" 2>/dev/null || true

if ((drop_caches)); then
    sync
    echo 3 >/proc/sys/vm/drop_caches || echo "memlimit.sh: could not drop caches" >&2
fi

start=$(date +%s.%N)
set +e
# The child joins the group before exec'ing, so everything the command maps or reads is
# charged there; this script stays outside it.
bash -c 'echo $$ >"$1/cgroup.procs" || exit 125; shift; exec "$@"' memlimit "$cg" "${cmd[@]}" &
child=$!
trap 'kill -INT $child 2>/dev/null' INT
trap 'kill -TERM $child 2>/dev/null' TERM
# (stderr of wait: bash's own "Killed" notice for a job that died of a signal)
{ wait "$child"; } 2>/dev/null
status=$?
# A trapped signal interrupts wait; wait again for the real status.
while kill -0 "$child" 2>/dev/null; do
    { wait "$child"; } 2>/dev/null
    status=$?
done
set -e
end=$(date +%s.%N)

peak=$(cat "$cg/memory.max_usage_in_bytes")
failcnt=$(cat "$cg/memory.failcnt")
oom_kill=$(awk '$1 == "oom_kill" { print $2 }' "$cg/memory.oom_control")
oom_kill=${oom_kill:-0}
oom_killed=false
if ((oom_kill > 0)) || { ((status == 137)) && ((failcnt > 0)); }; then
    oom_killed=true
fi

json_escape() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\t'/\\t}
    s=${s//$'\n'/\\n}
    printf '%s' "$s"
}
line=$(printf '{"limit_bytes":%s,"peak_bytes":%s,"oom_killed":%s,"exit_code":%s,"wall_s":%s,"failcnt":%s,"oom_kill":%s,"command":"%s"}' \
    "$limit" "$peak" "$oom_killed" "$status" \
    "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }')" \
    "$failcnt" "$oom_kill" "$(json_escape "${cmd[*]}")")
if [[ -n $json_file ]]; then
    echo "$line" >>"$json_file"
else
    echo "$line" >&2
fi
exit "$status"
