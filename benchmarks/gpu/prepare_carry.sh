#!/usr/bin/env bash
# Everything `benchmarks/gpu/h200.sh recipe` needs, made on a CPU machine that reaches PyPI, as files under .carry/
# that one device call each moves to the GPU machine's /tmp/carry (the checkout travels beside one, < 64 MiB):
#   benchmarks/gpu/prepare_carry.sh                 # 0.5B student (the committed table's setting)
#   STUDENT=qwen-1.5b RECIPE_NAME=recipe_15b_gpu benchmarks/gpu/prepare_carry.sh   # the 1.5B as the student
#   WITH_TEACHER=1 benchmarks/gpu/prepare_carry.sh    # + the 1.5B teacher's GGUF in extras (~20 more chunks), for a
#                                                     # row whose synthesis is not reused: the hinted row (sft_cot_hinted)
# 1. the student's GGUF via ../shared/models/fetch.sh (sha256-checked) into $MODELS (default ~/.cache/t2s-models);
# 2. bundle.tar.NN: make_bundle.sh (vLLM 0.26.0 wheel set, the student's GGUF, BIRD dev), 40 MB chunks;
# 3. extras.tar.NN: extras/ = spider/, bird_train/, SHA256SUMS (one chunk; + the teacher's GGUF with WITH_TEACHER);
# 4. convert.tgz: the recipe's four conversions made HERE with the GPU machine's paths (/tmp/bundle, /tmp/extras,
#    /tmp/src: the same strings, so the same fingerprints there; h200.sh RECIPE_RUN_TGZ unpacks it and skips them,
#    ~2.5 GPU minutes saved). This uses (and replaces) /tmp/bundle, /tmp/extras, /tmp/src and /tmp/runs/<run> here.
# No teacher file travels: h200.sh RECIPE_SYNTHESIS reuses the committed chains (the 1.5B teacher's); with the 1.5B
# as the student, the printed calls pass TEACHER=MODEL (the same file) for a synthesis that is not reused.
# Then it prints the device calls in order. Needs the project's venv (VENV, default .venv) for step 4.
# 0. First the recipe script's end-to-end CPU test (opt-in, not in CI: `pytest -m recipe tests/test_recipe_table.py`,
#    ~7 min on 2 cores): no GPU time goes to a script that fails on CPU. SKIP_RECIPE_TEST=1 skips it (only for a
#    checkout whose recipe test passed already).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
if [ -z "${SKIP_RECIPE_TEST:-}" ]; then
  "${VENV:-$root/.venv}/bin/python" -m pytest -q -p no:cacheprovider -m recipe tests/test_recipe_table.py \
    || { echo "prepare_carry: the recipe test failed (above); fix it before spending GPU time" >&2; exit 1; }
fi
shared=${SHARED:-$root/../shared}
models=${MODELS:-$HOME/.cache/t2s-models}
student=${STUDENT:-qwen-0.5b}
name=${RECIPE_NAME:-recipe_small_gpu}
run=/tmp/runs/${RECIPE_NAME:-recipe}
py=${VENV:-$root/.venv}/bin/python
carry=$root/.carry
mkdir -p "$carry"
rm -f "$carry"/bundle.tar.?? "$carry"/extras.tar.?? "$carry"/convert.tgz

# the bundle carries the student's GGUF (the 1.5B student is also the teacher of the committed chains: one file)
gs=$(bash "$shared/models/fetch.sh" "$student" "$models" | tail -1)
bash "$root/benchmarks/gpu/make_bundle.sh" "$carry" "$gs" "$shared/data/bird/dev"

rm -rf /tmp/extras && mkdir -p /tmp/extras
cp -rL "$shared/data/spider" /tmp/extras/spider
cp -rL "$shared/data/bird/train" /tmp/extras/bird_train
if [ -n "${WITH_TEACHER:-}" ] && [ "$student" != qwen-1.5b ]; then  # h200.sh's default TEACHER path
  cp -L "$(bash "$shared/models/fetch.sh" qwen-1.5b "$models" | tail -1)" /tmp/extras/
fi
model=/tmp/bundle/models/$(basename "$gs")
(cd /tmp/extras && find . -type f ! -name SHA256SUMS -print0 | xargs -0 sha256sum > SHA256SUMS)
(cd /tmp && tar -cf - extras) | split -b "${CHUNK_BYTES:-40000000}" -d -a 2 - "$carry/extras.tar."

# the conversions with the device's paths: the data under /tmp/extras is a real directory there and here (convert
# records resolved paths), the checkout a copy at /tmp/src, the 0.5B GGUF a link at /tmp/bundle/models. Only what a
# conversion's fingerprint reads is passed (the job file, the data paths, --out, the convert.* settings): keep those
# in step with h200.sh's step_recipe; `--rows ""` runs the conversions and no row.
rm -rf /tmp/bundle /tmp/src "$run"
mkdir -p /tmp/bundle/models /tmp/src
ln -s "$gs" /tmp/bundle/models/
ln -s "$shared/data/bird/dev" /tmp/bundle/bird_dev
tar -cf - --exclude=./.carry --exclude=./.venv . | tar -xf - -C /tmp/src
(cd /tmp/src && T2S_CACHE=${T2S_CACHE:-/tmp/t2s_cache} HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled PYTHONPATH=/tmp/src \
  "$py" benchmarks/recipe_table.py --config /tmp/src/jobs/recipe_small_gpu.yaml --student "$model" \
    --teacher /tmp/extras/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --bird-train /tmp/extras/bird_train \
    --bird-dev /tmp/bundle/bird_dev --spider /tmp/extras/spider --rows "" \
    --out "$run" --results /tmp/runs/prepare_carry_table --set convert.tokenizer="$model" \
    --synthesis /tmp/src/benchmarks/results/recipe_small_gpu_synthesis)
(cd "$run" && tar -czf "$carry/convert.tgz" convert recipe_state.json)

echo
echo "Fingerprints of the conversions (the GPU machine's recipe_state.json must show the same):"
grep '"convert_' "$run/recipe_state.json" | grep -v ': [0-9.]*,\?$' || true
echo
echo "Device calls, in order (each: carry the one file; the first starts the machine). Send the FIRST call alone: when"
echo "no machine can start, every call of a batch is refused and each still costs device time (2026-12-07: a batch of 24"
echo "calls sent while none could start cost 601 of the session's 1800 s; later that day seven lone first calls that"
echo "found no machine cost ~90 s each: stop trying once what is left is under the run's need, benchmarks/README.md)."
echo "Once it has answered, the machine is given"
echo "back 30 s after a call ends: send every other call below, the launch and the watch calls in ONE batch of calls (a"
echo "pause between batches, or a cut-off reply, lost the machine five times on 2026-12-02); each call does mkdir -p."
first="[ -f /tmp/t0 ] || date +%s > /tmp/t0; "  # the first call marks the hold's start: the watch calls' deadline
for f in "$carry"/bundle.tar.?? "$carry"/extras.tar.?? "$carry"/convert.tgz; do
  rel=.carry/$(basename "$f")
  echo "  carry [\"$rel\"]: ${first}mkdir -p /tmp/carry && cp $rel /tmp/carry/ && ls /tmp/carry | wc -l"
  first=""
done
echo "  (small files may share a call: the last bundle chunk + extras + convert.tgz came to 46 MB, under 64 MiB with the"
echo "  16 MB checkout)"
extra=""
[ "$student" = qwen-1.5b ] && extra="MODEL=$model TEACHER=$model "
[ -n "${RECIPE_NAME:-}" ] && extra+="RECIPE_NAME=$RECIPE_NAME "
echo "  then: mkdir -p /tmp/src /tmp/bg && tar -cf - --exclude=./.carry . | tar -xf - -C /tmp/src && cd /tmp/src &&"
echo "        OUT=/tmp/bg bash benchmarks/gpu/h200.sh setup && (${extra}RECIPE_RUN_TGZ=/tmp/carry/convert.tgz"
echo "        RECIPE_SYNTHESIS=/tmp/src/benchmarks/results/recipe_small_gpu_synthesis RECIPE_LANES='...' OUT=/tmp/bg NO_RUNS_TGZ=1"
echo "        setsid nohup bash -c 'bash benchmarks/gpu/h200.sh recipe; touch /tmp/bg/done' > /tmp/bg/driver.log 2>&1"
echo "        < /dev/null &)"
[ -n "${WITH_TEACHER:-}" ] && echo "        (the hinted row alone, the other rows from the committed table: RECIPE_LANES= RECIPE_ROWS=sft_cot_hinted
        RECIPE_SET=\"--earlier /tmp/src/benchmarks/results/recipe_small_gpu.json\")"
echo "        (the mixed hinted rows from the committed hinted chains, no teacher: RECIPE_SYNTH_LIMIT=1000 RECIPE_LANES=
        RECIPE_ROWS=sft_mix_hinted,sft_mix_hinted_dpo RECIPE_SET=\"--earlier /tmp/src/benchmarks/results/recipe_small_gpu.json
        --hinted-synthesis /tmp/src/benchmarks/results/recipe_small_gpu_hinted_synthesis --no-maj sft_mix_hinted\")"
echo "        (the same with RPO, a table of its own: RECIPE_NAME=recipe_small_gpu_rpo for this script and the launch, and"
echo "        --dpo-sft-weight 1 added to that RECIPE_SET)"
echo "        (the hinted CoT SFT row + its on-policy DPO on Spider and BIRD train pairs, RPO, a table of its own:"
echo "        RECIPE_NAME=recipe_small_gpu_dpo_bird for this script and the launch, RECIPE_SYNTH_LIMIT=1000 RECIPE_LANES="
echo "        RECIPE_ROWS=sft_cot_hinted_dpo,sft_cot_hinted RECIPE_SET=\"--earlier /tmp/src/benchmarks/results/recipe_small_gpu.json"
echo "        --hinted-synthesis /tmp/src/benchmarks/results/recipe_small_gpu_hinted_synthesis --no-maj sft_cot_hinted"
echo "        --dpo-sft-weight 1\")"
echo "        (the two pending rows in one hold, two lanes: the gold-chain CoT SFT row beside the hinted CoT SFT row's"
echo "        on-policy DPO with RPO and length-matched pairs, a table of its own: RECIPE_NAME=recipe_small_gpu_gold_dpo for"
echo "        this script and the launch, RECIPE_SYNTH_LIMIT=1000 RECIPE_LANES='sft_cot_gold;sft_cot_hinted_dpo'"
echo "        RECIPE_SET=\"--earlier /tmp/src/benchmarks/results/recipe_small_gpu.json --hinted-synthesis"
echo "        /tmp/src/benchmarks/results/recipe_small_gpu_hinted_synthesis --dpo-sft-weight 1 --dpo-max-length-gap 0.2\")"
echo "  and three watch calls in the same batch, each returning when the run is done, after 560 s, or at 1620 s after the"
echo "  first call (so that the last one lands inside the 1800 s of device time), results first and bounded to what"
echo "  comes back (one file < 16 MiB):"
echo "        d=\$(( \$(cat /tmp/t0) + 1620 )); e=\$(( \$(date +%s) + 560 )); while [ ! -f /tmp/bg/done ] &&"
echo "        [ \$(date +%s) -lt \$d ] && [ \$(date +%s) -lt \$e ]; do sleep 10; done; grep -h -E '^=== |recipe: '"
echo "        /tmp/bg/*.log | tail -30; bash benchmarks/gpu/collect.sh $run /tmp/bg \$OUT/res.tgz"
echo "  (2026-12-04 the run ended 20 s after that deadline: a fourth, short call waiting <= 50 s for /tmp/bg/done and"
echo "  collecting again took 9 s; then give the machine back)"
