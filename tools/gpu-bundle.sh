#!/usr/bin/env bash
# Builds what tools/gpu-check.sh runs on a GPU machine that has no Rust toolchain: the release
# binary and the CUDA test executable (tests/cuda.rs), both built with `--features cuda` and
# stripped, into target/gpu-bundle (git-ignored). Prints the folder to carry and its size.
#
# usage: tools/gpu-bundle.sh      then, on the GPU machine, from the repository root:
#        tools/gpu-check.sh target/gpu-bundle
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
bundle="$root/target/gpu-bundle"
cargo build --release --features cuda --bin edgemoe
# The test executable's path, from cargo's JSON messages.
tests="$(cargo test --release --features cuda --test cuda --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda":
        print(m["executable"])')"
[ -n "$tests" ] || { echo "error: no tests/cuda.rs executable was built" >&2; exit 1; }
rm -rf "$bundle"
mkdir -p "$bundle"
cp "$target/release/edgemoe" "$bundle/edgemoe"
cp "$tests" "$bundle/cuda-tests"
strip "$bundle/edgemoe" "$bundle/cuda-tests"
git rev-parse HEAD > "$bundle/commit" 2>/dev/null || true
bytes=$(du -cb "$bundle"/* | tail -1 | cut -f1)
echo "carry: target/gpu-bundle ($((bytes / 1024 / 1024)) MiB of the 64 MiB limit)"
[ "$bytes" -lt $((64 * 1024 * 1024)) ] || { echo "error: the bundle exceeds 64 MiB" >&2; exit 1; }
