#!/usr/bin/env bash
# A watch call's results as one file that a device call can bring back (< 16 MiB a file; 2026-12-04 a tar of every
# run-dir file under 5 MB was 128 MB and came back as nothing):
#   bash benchmarks/gpu/collect.sh RUN_DIR LOG_DIR DEST.tgz
# Groups, most important first: 1. the results tables and every row's predictions (/tmp/runs/recipe_results);
# 2. the run dir's small evidence (recipe_state.json, manifests, reports, steps.jsonl, loss curves, pair counts,
# predictions; no weights, parquet, samples, merged models, checkpoints or conversions); 3. the logs in LOG_DIR, then
# the lanes' logs (RUN_DIR/lanes/*.log); 4. the DPO pairs and synthesis samples (pairs.parquet, samples.parquet under 8 MB each).
# A group that would take the tar past LIMIT_BYTES (default 15 MB) is left out, and the script says so.
set -uo pipefail
run=${1:?RUN_DIR}; logs=${2:?LOG_DIR}; dest=${3:?DEST.tgz}
limit=${LIMIT_BYTES:-15000000}
results=${RESULTS_DIR:-/tmp/runs/recipe_results}
list=$(mktemp); trial=$(mktemp)
: > "$list"
add_group() {  # $1: group name; stdin: absolute paths
  cat "$list" - | sort -u > "$trial.l"
  tar -czf "$trial" -P -T "$trial.l" 2>/dev/null
  local size; size=$(stat -c %s "$trial")
  if [ "$size" -le "$limit" ]; then
    cp "$trial.l" "$list"; echo "collect: + $1 ($(wc -l < "$trial.l") files, $size bytes so far)"
  else
    echo "collect: - $1 left out: the tar would be $size bytes (limit $limit)"
  fi
}
[ -d "$results" ] && find "$results" -type f -size -8M | add_group results
[ -d "$run" ] && find "$run" -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.png' -o -name '*.md' \) -size -3M \
  -not -path '*/merged/*' -not -path '*/checkpoint*' -not -path "$run/convert/*" -not -name 'tokenizer*' \
  -not -name 'vocab.json' -not -name 'samples*' | add_group evidence
[ -d "$logs" ] && find "$logs" -maxdepth 1 -type f \( -name '*.log' -o -name '*.csv' \) | add_group logs
# each lane's own log (recipe_table.py --lanes: <run>/lanes/lane<i>.log, its stages' output), a group of its own
[ -d "$run/lanes" ] && find "$run/lanes" -maxdepth 1 -type f -name '*.log' | add_group "lane logs"
# 4. the DPO pairs and the synthesis samples (Parquet; the on-policy samples of 2026-12-04 stayed behind)
[ -d "$run" ] && find "$run" -type f \( -name 'pairs.parquet' -o -name 'samples.parquet' \) -size -8M \
  -not -path "$run/convert/*" | add_group parquet
tar -czf "$dest" -P -T "$list" 2>/dev/null
echo "collect: $dest $(stat -c %s "$dest") bytes, $(wc -l < "$list") files"
rm -f "$list" "$trial" "$trial.l"
