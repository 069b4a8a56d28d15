#!/usr/bin/env bash
# The vLLM runs of benchmarks/README.md on a bare GPU machine (no registry; Python 3.12, torch 2.11 cu130).
#   bash benchmarks/gpu/h200.sh STEP...      STEP: setup gputest eval speed synth serve recipe eval15
# Expects /tmp/carry/bundle.tar.NN (benchmarks/gpu/make_bundle.sh: the wheels of wheels-vllm-0.26.0-cp312.txt,
# the Qwen2.5-Coder-0.5B-Instruct GGUF, BIRD dev), and for `recipe`/`eval15` /tmp/carry/extras.tar.NN (a tar of
# extras/: the 1.5B GGUF, ../shared/data/spider as spider/, BIRD train as bird_train/, SHA256SUMS), moved there
# beforehand in chunks. Each step logs to
# $OUT/<step>.log and keeps going when another step failed; run outputs are tarred into $OUT/runs.tgz (not with
# NO_RUNS_TGZ=1).
set -uo pipefail
SRC=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-/tmp/t2s_out}
mkdir -p "$OUT" /tmp/runs
cd "$SRC" || exit 1  # the checkout to test: python -m puts the working dir first on sys.path
B=/tmp/bundle
MODEL=${MODEL:-$B/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf}
DEV=$B/bird_dev
X=/tmp/extras
TEACHER=${TEACHER:-$X/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf}
export T2S_CACHE=/tmp/t2s_cache HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 RAY_DATA_DISABLE_PROGRESS_BARS=1 VLLM_NO_USAGE_STATS=1 RAY_USAGE_STATS_ENABLED=0
# flashinfer is not carried (see wheels-vllm-0.26.0-cp312.txt): vLLM samples top-p with its PyTorch/Triton path.
export VLLM_USE_FLASHINFER_SAMPLER=0
export PYTHONPATH=/tmp/site:$SRC PATH=/tmp/site/bin:$PATH
t2s() { python3 -m text2sql_ray "$@"; }

step_setup() {
  if [ ! -f /tmp/site/.t2s_ok ]; then
    cat /tmp/carry/bundle.tar.?? | tar -xf - -C /tmp || return 1
    (cd $B && sha256sum -c --quiet SHA256SUMS) || return 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $B/whl/*.whl || return 1
    touch /tmp/site/.t2s_ok
  fi
  if [ ! -f $X/.ok ] && ls /tmp/carry/extras.tar.?? > /dev/null 2>&1; then
    cat /tmp/carry/extras.tar.?? | tar -xf - -C /tmp && (cd $X && sha256sum -c --quiet SHA256SUMS) && touch $X/.ok || return 1
  fi
  python3 - <<'EOF'
import importlib.metadata as md, torch, vllm, ray
print("vllm", vllm.__version__, "ray", ray.__version__, "torch", torch.__version__, torch.cuda.get_device_name(0))
print("transformers", md.version("transformers"), "openai", md.version("openai"), "xgrammar", md.version("xgrammar"))
EOF
  t2s --help > /dev/null && echo "t2s imports"
}

step_gputest() {
  T2S_GPU_TEST_MODEL=$MODEL python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" "$SRC/tests/test_vllm_gpu.py"
}

# Greedy EX of the same model with both engines on the 432 executable BIRD dev questions (rich prompt,
# no CoT, 256 new tokens: the setting of shared/device/README.md's 15.97), then the per-question diff.
step_eval() {
  local common=(evaluate --data "$DEV" --model "$MODEL" --prompt.cot false --engine.max_new_tokens 256
                --engine.max_model_len 8192 --engine.batch_size 64)
  t2s "${common[@]}" --engine.backend vllm --out /tmp/runs/eval_vllm_05b
  t2s "${common[@]}" --engine.backend hf --engine.num_gpus 1 --out /tmp/runs/eval_hf_05b
  t2s evaluate --compare /tmp/runs/eval_hf_05b /tmp/runs/eval_vllm_05b --out /tmp/runs/compare_hf_vllm_05b
}

step_speed() {
  python3 "$SRC/benchmarks/generate_speed.py" --model "$MODEL" --data "$DEV" --limit "${SPEED_LIMIT:-128}" \
    --samples "${SPEED_K:-8}" --max-new-tokens 512 --hf-batch-size "${SPEED_HF_BATCH:-32}" \
    --vllm-batch-size 128 --max-num-seqs "${SPEED_SEQS:-512}" --startup-probe "${SPEED_PROBES:-2}" --json /tmp/runs/generate_speed.json
}

# Teacher synthesis with vLLM: k=4 blind CoT samples per question, each executed against its database.
step_synth() {
  t2s synthesize --data "$DEV" --db-ids student_club,superhero,toxicology --samples 4 \
    --engine.backend vllm --engine.model "$MODEL" \
    --engine.max_new_tokens 512 --engine.batch_size 128 --engine.max_model_len 8192 --out /tmp/runs/synth_vllm_05b
}

# The recipe table (jobs/recipe_small_gpu.yaml): 0.5B student, 1.5B teacher; rows in priority order (a killed
# call resumes from /tmp/runs/recipe/recipe_state.json); vLLM for synthesis and the CoT rows, hf for the
# SQL-only rows (their short answers finish before a fresh vLLM engine has started).
# RECIPE_SYNTHESIS=$SRC/benchmarks/results/recipe_small_gpu_synthesis reuses the committed teacher chains
# (1500 Spider train questions x 4 from the 1.5B teacher; ~7 GPU minutes saved, the 1.5B GGUF need not travel).
# RECIPE_RUN_TGZ=<tar.gz of a run dir's finished steps> is unpacked into /tmp/runs/recipe first: e.g. the conversions
# made on a CPU machine with the same paths and settings (their fingerprints in its recipe_state.json), ~2.5 GPU
# minutes saved. RECIPE_SET="--earlier $SRC/benchmarks/results/recipe_small_gpu.json" keeps the committed table's
# rows that this run does not redo (with their predictions).
# RECIPE_LANES (default: the CoT rows, the SQL-only rows, the mixed row) runs groups of rows at once, each its own process
# and Ray instance on the one GPU: vLLM's ~100 s start and the hf rows' CPU-bound parts overlap the other lane's
# GPU work. vLLM then takes a fixed share (30% of the memory, a 24 GiB KV cache, 12 GiB on a card under 100 GB: no
# profiling, which another process freeing memory would break), in evaluations and on-policy samplings alike.
# RECIPE_LANES= (empty) runs RECIPE_ROWS one after another.
# nvidia-smi logs the GPU's memory and use every 5 s to $OUT/gpu_mem.csv.
# Another student: MODEL=<its .gguf> RECIPE_NAME=<stem> (run dir /tmp/runs/<stem>, table /tmp/runs/recipe_results/<stem>),
# e.g. (benchmarks/results/recipe_15b_gpu.md, 1039 s on an H200; prepare_carry.sh STUDENT=qwen-1.5b puts the 1.5B GGUF in
# the bundle) MODEL=TEACHER=$B/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf RECIPE_NAME=recipe_15b_gpu
# RECIPE_LANES='sft_nocot;base_ours,base_seed' RECIPE_SET='--nocot-engine vllm' (the committed 1.5B-teacher chains
# would still serve the CoT rows).
step_recipe() {
  local lanes=${RECIPE_LANES-sft_cot,sft_cot_dpo;sft_nocot,base_ours,base_seed;sft_mix} rows=()
  local name=${RECIPE_NAME:-recipe_small_gpu} run=/tmp/runs/${RECIPE_NAME:-recipe}
  if [ -n "${RECIPE_RUN_TGZ:-}" ]; then
    mkdir -p "$run" && tar -xzf "$RECIPE_RUN_TGZ" -C "$run" || return 1
  fi
  if [ -n "$lanes" ]; then
    # every vLLM engine of a lane (evaluations and on-policy samplings alike) takes a fixed share; on an 80 GB card a
    # 12 GiB KV cache (~1M tokens of the 0.5B's KV), so that a vLLM lane fits beside a training lane (~35 GB for SFT,
    # ~47 GB for DPO on an H200)
    local kv=24 mem
    mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
    [ -n "$mem" ] && [ "$mem" -lt 100000 ] && kv=12
    rows=(--lanes "$lanes")
    for stage in evaluate synthesize; do
      rows+=(--set $stage.engine.gpu_memory_utilization=0.3 --set $stage.engine.kv_cache_gb=$kv)
    done
  else
    rows=(--rows "${RECIPE_ROWS:-sft_cot,sft_cot_dpo,sft_nocot,sft_mix,base_ours,base_seed}")
  fi
  nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 5 > "$OUT/gpu_mem.csv" 2>&1 &
  local smi=$!
  python3 "$SRC/benchmarks/recipe_table.py" --config "$SRC/jobs/recipe_small_gpu.yaml" --student "$MODEL" \
    --teacher "$TEACHER" --bird-train $X/bird_train --bird-dev "$DEV" --spider $X/spider --engine vllm --nocot-engine hf \
    "${rows[@]}" --out "$run" \
    --results "/tmp/runs/recipe_results/$name" --set synthesize.limit="${RECIPE_SYNTH_LIMIT:-2000}" \
    --set synthesize.engine.max_num_seqs=512 --set evaluate.engine.max_num_seqs=512 \
    --set convert.tokenizer="$MODEL" --set evaluate.tokenizer="$MODEL" \
    ${RECIPE_SYNTHESIS:+--synthesis "$RECIPE_SYNTHESIS"} ${RECIPE_SET:-}
  local rc=$?
  kill $smi 2>/dev/null
  return $rc
}

# The 1.5B teacher's own baseline with vLLM (rich prompt, no CoT), as step_eval's setting.
step_eval15() {
  t2s evaluate --data "$DEV" --model "$TEACHER" --prompt.cot false --engine.max_new_tokens 256 \
    --engine.max_model_len 8192 --engine.batch_size 64 --engine.max_num_seqs 512 --engine.backend vllm \
    --out /tmp/runs/eval_vllm_15b
}

step_serve() {
  python3 - "$MODEL" <<'EOF'
import sys, time
from openai import OpenAI
from text2sql_ray import serve
from text2sql_ray.config import ServeConfig
cfg = ServeConfig(model=sys.argv[1], model_id="qwen-0.5b", backend="vllm", blocking=False, port=8000, max_model_len=4096)
t0 = time.time()
served = serve.start(cfg)
print("serve start", round(time.time() - t0, 1), "s", served.url, served.model_ids, flush=True)
client = OpenAI(base_url=served.url, api_key="none")
print("models", [m.id for m in client.models.list().data])
msgs = [{"role": "system", "content": "You write SQLite SQL."},
        {"role": "user", "content": "Table hero(id, name, power). How many heroes have the power 'flight'?"}]
r = client.chat.completions.create(model="qwen-0.5b", messages=msgs, max_tokens=64, temperature=0)
print("answer:", repr(r.choices[0].message.content), r.usage)
chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
    model="qwen-0.5b", messages=msgs, max_tokens=64, temperature=0, stream=True) if c.choices]
print("streamed equals:", "".join(chunks) == r.choices[0].message.content, len(chunks), "chunks")
card = client.models.retrieve("qwen-0.5b")
print("model card:", card.model_dump())
# a burst of concurrent requests (vLLM batches them): wall time and completion tokens/s through HTTP
from concurrent.futures import ThreadPoolExecutor
qs = [f"Table hero(id, name, power, age). Write a query that counts heroes older than {i}." for i in range(128)]
def ask(q):
    return client.chat.completions.create(model="qwen-0.5b", max_tokens=128, temperature=0,
        messages=[{"role": "user", "content": q}]).usage.completion_tokens
t0 = time.time()
with ThreadPoolExecutor(64) as ex:
    toks = list(ex.map(ask, qs))
dt = time.time() - t0
print(f"burst: {len(qs)} requests, 64 at a time, {dt:.1f} s, {sum(toks)} completion tokens, {sum(toks) / dt:.0f} tokens/s")
serve.stop(cfg.name)
EOF
}

for step in "$@"; do
  echo "=== $step $(date -u +%T)"
  t0=$SECONDS
  "step_$step" 2>&1 | tee "$OUT/$step.log"
  echo "=== $step rc=${PIPESTATUS[0]} $((SECONDS - t0)) s" | tee -a "$OUT/$step.log"
done
# NO_RUNS_TGZ=1: not this tar (the recipe's run dir holds GBs of merged models: a minute of GPU time to gzip them;
# benchmarks/gpu/collect.sh takes what matters, bounded to what a device call brings back)
[ -n "${NO_RUNS_TGZ:-}" ] || (cd /tmp/runs && tar -czf "$OUT/runs.tgz" --exclude='convert' . 2>/dev/null) || true
