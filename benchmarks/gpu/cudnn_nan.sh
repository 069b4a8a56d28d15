#!/usr/bin/env bash
# The step-15 NaN of the no-CoT SFT runs, both ways in one run: the same 16 LoRA steps (jobs/recipe_small_gpu.yaml's
# train section) with torch's cuDNN SDPA kernel off (the default) and on (train.cudnn_attention true); prints each
# run's non-finite steps and median step time, and the ratio. Step 15 packs the one micro-batch of the 257 whose width
# (6080) is 64 mod 128, where cuDNN's attention backward returns NaN (pytorch/pytorch#196678).
#   bash benchmarks/gpu/cudnn_nan.sh <no-CoT SFT set dir (recipe_table's <out>/sft/nocot)> <student .gguf> [OUT]
# Measured on an H200 (2026-12-04, with the off-switch patched out of train.py instead of this flag; evidence in
# benchmarks/results/h200_cudnn_nan/): off [] 1.62 s, on [15] 1.24 s.
set -euo pipefail
input=$1 model=$2 out=${3:-/tmp/runs/cudnn_nan}
for on in false true; do
  python3 -m text2sql_ray train --config jobs/recipe_small_gpu.yaml --input "$input" --model "$model" \
    --out "$out/cudnn_$on" --max-steps 16 --merge false --cudnn-attention "$on"
done
python3 - "$out" <<'PY'
import json, sys
m = {on: json.load(open(f"{sys.argv[1]}/cudnn_{on}/manifest.json")) for on in ("false", "true")}
for on, x in m.items():
    print(f"cudnn_attention {on}: nonfinite_steps {x['data']['nonfinite_steps']}, median step {x['metrics']['median_step_time_s']} s")
print(f"median step, cuDNN off / on: {m['false']['metrics']['median_step_time_s'] / m['true']['metrics']['median_step_time_s']:.2f}")
PY
