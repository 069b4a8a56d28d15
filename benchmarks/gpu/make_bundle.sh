#!/usr/bin/env bash
# Build what a bare GPU machine needs for benchmarks/gpu/h200.sh, cut into chunks that fit one call.
#   benchmarks/gpu/make_bundle.sh CHUNK_DIR GGUF BIRD_DEV_DIR        (on a machine that reaches PyPI)
# 1. downloads the wheels of benchmarks/gpu/wheels-vllm-0.26.0-cp312.txt (cp312 manylinux, no deps: the list
#    is the resolved set minus what the GPU image already has, see its header);
# 2. slims the two big ones with `zip -d` (files stay compressed, run bits kept): vllm without its FA2
#    kernels (Hopper runs FA3), the Blackwell fmha sources, the vllm-rs binary and the cp313/cp314
#    deep_gemm builds (304 -> 153 MB); ray without its Java jars, RLlib, C++ API and dashboard build;
# 3. tars wheels + model + BIRD dev (with SHA256SUMS) and splits it into CHUNK_BYTES chunks bundle.tar.NN (default 40 MB:
#    one chunk and the checkout, 16 MB on 2026-12-04, stay under a call's 64 MiB carry limit).
set -euo pipefail
chunks=${1:?usage: make_bundle.sh CHUNK_DIR GGUF BIRD_DEV_DIR}; gguf=${2:?}; dev=${3:?}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bundle/whl" "$work/bundle/models" "$chunks"
plat=(--platform any --platform linux_x86_64 --platform manylinux1_x86_64 --platform manylinux2010_x86_64
      --platform manylinux2014_x86_64)
for n in $(seq 5 39); do plat+=(--platform "manylinux_2_${n}_x86_64"); done
grep -v '^\s*#' "$here/wheels-vllm-0.26.0-cp312.txt" | grep -v '^\s*$' > "$work/reqs.txt"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  "${plat[@]}" -d "$work/bundle/whl" -r "$work/reqs.txt"
(cd "$work/bundle/whl"
 zip -q -d vllm-*.whl 'vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so' 'vllm/vllm-rs' 'vllm/third_party/fmha_sm100/*' \
   'vllm/third_party/deep_gemm/_C.cpython-313-x86_64-linux-gnu.so' 'vllm/third_party/deep_gemm/_C.cpython-314-x86_64-linux-gnu.so'
 zip -q -d ray-*.whl 'ray/jars/*' 'ray/rllib/*' 'ray/cpp/*' 'ray/dashboard/client/build/*' || true)
cp "$gguf" "$work/bundle/models/"
cp -r "$dev" "$work/bundle/bird_dev"
(cd "$work/bundle" && find . -type f ! -name SHA256SUMS -print0 | xargs -0 sha256sum > SHA256SUMS)
du -sh "$work/bundle"/*
rm -f "$chunks"/bundle.tar.??
(cd "$work" && tar -cf - bundle) | split -b "${CHUNK_BYTES:-40000000}" -d -a 2 - "$chunks/bundle.tar."
ls -la "$chunks"
