#!/usr/bin/env bash
# llama.cpp beside edgemoe, for side-by-side benchmarks. llama.cpp's source comes from the
# llama-cpp-python sdist on PyPI (it vendors llama.cpp); it is unpacked and built under
# target/ (ignored by git): none of its code is ever committed here.
#
# usage:
#   tools/llama_cpp.sh build
#       Download the sdist (pip download --no-deps --no-binary :all: llama-cpp-python), unpack
#       its vendor/llama.cpp into target/llama.cpp, build llama-bench, llama-quantize,
#       llama-perplexity, llama-simple and llama-completion (llama-cli in older versions) into
#       target/llama.cpp/build/bin (cmake, Release, CPU only, GGML_NATIVE=ON, AMX off: its AMX
#       path faults in these VMs), and make a Python venv for the converter in
#       target/llama.cpp-venv. Installs cmake/build-essential with apt-get when missing.
#       A tarball already in target/llama.cpp-sdist is reused (delete it to fetch anew).
#   tools/llama_cpp.sh build-avx2
#       The same source built again for AVX2 + FMA + F16C only (no AVX-512, no VNNI) into
#       target/llama.cpp/build-avx2/bin (llama-bench, llama-quantize, llama-perplexity): the
#       stand-in for a CPU without AVX-512 (LLAMA_CPP_BIN=... tools/w4_vs_llama.sh).
#   tools/llama_cpp.sh gguf HF_DIR OUT.gguf [q8_0|f16|bf16|f32]     (default q8_0)
#       Convert a Hugging Face checkpoint directory (e.g. from `edgemoe export`) with the
#       sdist's convert_hf_to_gguf.py; q8_0 converts to bf16 first, then runs llama-quantize.
#   tools/llama_cpp.sh bench MODEL.gguf [llama-bench args...]
#       llama-bench --repack 0 -t 2 -p 64 -n 128 -r 5 -o md; an option given in the extra
#       arguments replaces its default here (llama-bench itself would sweep both values).
#       --repack 0 keeps the weights in the file's layout (no runtime repacking to the
#       interleaved CPU formats), as edgemoe does.
#   tools/llama_cpp.sh run MODEL.gguf [PROMPT] [N]
#       llama-simple: N tokens (default 16) after PROMPT, to check the model and its
#       tokenizer really load.
#
# environment: LLAMA_CPP_DIR (default: <repo>/target/llama.cpp), LLAMA_CPP_VENV (default:
# <repo>/target/llama.cpp-venv), LLAMA_CPP_PYTHON_VERSION (an sdist version; default: the
# newest on PyPI), JOBS (parallel build jobs; default: nproc).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src=${LLAMA_CPP_DIR:-$repo/target/llama.cpp}
venv=${LLAMA_CPP_VENV:-$repo/target/llama.cpp-venv}
bin=$src/build/bin
jobs=${JOBS:-$(nproc)}

die() { echo "llama_cpp.sh: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

need_tools() {
    local missing=()
    command -v cmake >/dev/null || missing+=(cmake)
    command -v g++ >/dev/null || missing+=(build-essential)
    command -v make >/dev/null || missing+=(build-essential)
    if ((${#missing[@]})); then
        echo "installing ${missing[*]} with apt-get" >&2
        apt-get update -qq && apt-get install -y -qq "${missing[@]}" >&2
    fi
}

fetch_source() {
    if [[ -f $src/.sdist-version && -f $src/CMakeLists.txt ]]; then
        echo "llama.cpp source: $src (from llama-cpp-python $(cat "$src/.sdist-version"))" >&2
        return
    fi
    local dl spec tarball version
    dl=$repo/target/llama.cpp-sdist
    mkdir -p "$dl"
    tarball=$(ls -t "$dl"/llama_cpp_python-"${LLAMA_CPP_PYTHON_VERSION:-}"*.tar.gz 2>/dev/null | head -n1 || true)
    if [[ -z $tarball ]]; then
        spec=llama-cpp-python${LLAMA_CPP_PYTHON_VERSION:+==$LLAMA_CPP_PYTHON_VERSION}
        echo "downloading the $spec sdist from PyPI" >&2
        pip download --no-deps --no-binary :all: -d "$dl" "$spec" >&2
        tarball=$(ls -t "$dl"/llama_cpp_python-*.tar.gz | head -n1)
    fi
    version=$(basename "$tarball" .tar.gz)
    version=${version#llama_cpp_python-}
    rm -rf "$src"
    mkdir -p "$src"
    tar -xzf "$tarball" -C "$src" --strip-components=3 \
        "llama_cpp_python-$version/vendor/llama.cpp"
    [[ -f $src/CMakeLists.txt ]] || die "$tarball has no vendor/llama.cpp"
    # A submodule pointer into the sdist's own .git, which is not unpacked.
    [[ -f $src/.git ]] && rm -f "$src/.git"
    echo "$version" >"$src/.sdist-version"
}

build() {
    need_tools
    fetch_source
    # GGML_NATIVE compiles for this CPU with -march=native; the AMX options are off and
    # -mno-amx-* keeps -march=native from turning AMX on where the CPU reports it.
    local noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
        -DCMAKE_C_FLAGS="$noamx" -DCMAKE_CXX_FLAGS="$noamx" \
        -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF >&2
    # The classic prompt-in, text-out CLI is llama-completion in newer llama.cpp, where
    # llama-cli became a chat client built with the server; older ones call it llama-cli.
    local cli=llama-cli
    [[ -d $src/tools/completion ]] && cli=llama-completion
    cmake --build "$src/build" --config Release -j "$jobs" \
        --target llama-bench llama-quantize llama-perplexity llama-simple "$cli" >&2
    make_venv
    echo "built: $(ls "$bin" | tr '\n' ' ')" >&2
}

# A second build for the AVX2 stand-in (issue 28): the same source compiled for AVX2 + FMA +
# F16C only (no AVX-512, no AVX-VNNI), as llama.cpp runs on a CPU without AVX-512, into
# build-avx2/bin; compare it with edgemoe under EDGEMOE_INT8_TIER=avx2 EDGEMOE_HALF_TIER=avx2.
build_avx2() {
    need_tools
    fetch_source
    cmake -S "$src" -B "$src/build-avx2" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
        -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF \
        -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
        -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF >&2
    cmake --build "$src/build-avx2" --config Release -j "$jobs" \
        --target llama-bench llama-quantize llama-perplexity >&2
    echo "built: $(ls "$src/build-avx2/bin" | tr '\n' ' ')" >&2
}

# The converter's Python packages, in a venv of its own. torch comes from PyPI (the converter
# imports it; the CPU-only index it names is out of reach here), gguf from the sdist's gguf-py
# so it matches convert_hf_to_gguf.py, transformers at the version the converter pins.
make_venv() {
    if [[ -x $venv/bin/python && -f $venv/.ready ]]; then
        return
    fi
    python3 -m venv "$venv"
    local pin
    pin=$(grep -ho '^transformers[=<>~!].*' "$src"/requirements/requirements-convert_legacy_llama.txt \
        2>/dev/null | head -n1 || true)
    "$venv/bin/pip" install -q --upgrade pip >&2
    "$venv/bin/pip" install -q torch "${pin:-transformers}" sentencepiece 'protobuf<5' \
        safetensors "$src/gguf-py" >&2
    touch "$venv/.ready"
}

need_built() {
    [[ -x $bin/$1 ]] || die "$bin/$1 is missing: run tools/llama_cpp.sh build first"
}

gguf() {
    (($# >= 2)) || usage
    local hf=$1 out=$2 type=${3:-q8_0}
    [[ -f $hf/config.json ]] || die "$hf has no config.json"
    [[ -x $venv/bin/python ]] || die "no converter venv at $venv: run tools/llama_cpp.sh build first"
    case $type in
    f16 | bf16 | f32)
        "$venv/bin/python" "$src/convert_hf_to_gguf.py" "$hf" --outfile "$out" --outtype "$type" >&2
        ;;
    q8_0)
        need_built llama-quantize
        local tmp=$out.bf16.tmp
        "$venv/bin/python" "$src/convert_hf_to_gguf.py" "$hf" --outfile "$tmp" --outtype bf16 >&2
        "$bin/llama-quantize" "$tmp" "$out" Q8_0 >&2
        rm -f "$tmp"
        ;;
    *) die "unknown type $type (q8_0, f16, bf16, f32)" ;;
    esac
    echo "$out: $(stat -c %s "$out") bytes ($(($(stat -c %s "$out") / 1048576)) MiB)"
}

bench() {
    (($# >= 1)) || usage
    need_built llama-bench
    local model=$1
    shift
    local -A given=()
    local a
    for a in "$@"; do given[$a]=1; done
    local defaults=()
    [[ -n ${given[--repack]:-} ]] || defaults+=(--repack 0)
    [[ -n ${given[-t]:-}${given[--threads]:-} ]] || defaults+=(-t 2)
    [[ -n ${given[-p]:-}${given[--n-prompt]:-} ]] || defaults+=(-p 64)
    [[ -n ${given[-n]:-}${given[--n-gen]:-} ]] || defaults+=(-n 128)
    [[ -n ${given[-r]:-}${given[--repetitions]:-} ]] || defaults+=(-r 5)
    [[ -n ${given[-o]:-}${given[--output]:-} ]] || defaults+=(-o md)
    "$bin/llama-bench" -m "$model" "${defaults[@]}" "$@"
}

run_prompt() {
    (($# >= 1)) || usage
    need_built llama-simple
    "$bin/llama-simple" -m "$1" -n "${3:-16}" "${2:-Once upon a time}"
}

case ${1:-} in
build) build ;;
build-avx2) build_avx2 ;;
gguf) shift; gguf "$@" ;;
bench) shift; bench "$@" ;;
run) shift; run_prompt "$@" ;;
*) usage ;;
esac
