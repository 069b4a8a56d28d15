"""benchmarks/gpu/collect.sh: what a GPU watch call brings back (one tar under a size limit, results first).

2026-12-04 a tar of every run-dir file under 5 MB was 128 MB, over the 16 MiB a device call returns, and a whole
run's predictions were lost; this checks the bounded replacement on a run dir laid out like the recipe's.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu" / "collect.sh"


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _layout(tmp: Path) -> tuple[Path, Path, Path, set[str]]:
    """A recipe run dir, its results dir and a log dir; returns them and the files that must come back."""
    run, results, logs = tmp / "runs" / "recipe", tmp / "runs" / "recipe_results", tmp / "bg"
    wanted = {
        _write(results / "recipe_small_gpu.md", b"| row |"),
        _write(results / "recipe_small_gpu" / "sft_bird_predict_dev.json", b'{"0": "SELECT 1"}'),
        _write(run / "recipe_state.json", b"{}"),
        _write(run / "eval" / "sft_bird" / "report.json", b'{"ex": 1.0}'),
        _write(run / "train" / "sft" / "steps.jsonl", b'{"step": 1}\n'),
        _write(run / "train" / "sft" / "loss_curve.png", b"png"),
        _write(logs / "driver.log", b"=== recipe rc=0"),
        _write(logs / "gpu_mem.csv", b"timestamp"),
        _write(run / "lanes" / "lane1.log", b"recipe: train_sft_cot_gold ->"),  # a lane's own log
        _write(run / "dpo" / "pairs.parquet", os.urandom(2000)),
    }
    # what must stay behind: weights, merged models, checkpoints, conversions, tokenizers, big files
    _write(run / "train" / "sft" / "merged" / "config.json", b"{}")
    _write(run / "train" / "sft" / "checkpoint_000001" / "state.json", b"{}")
    _write(run / "train" / "sft" / "adapter_model.safetensors", os.urandom(1000))
    _write(run / "convert" / "bird_train" / "manifest.json", b"{}")
    _write(run / "train" / "sft" / "tokenizer.json", b"{}")
    _write(run / "eval" / "sft_bird" / "huge.json", os.urandom(3_200_000))
    return run, results, logs, {str(p) for p in wanted}


def _collect(run: Path, results: Path, logs: Path, dest: Path, limit: int) -> str:
    out = subprocess.run(["bash", str(SCRIPT), str(run), str(logs), str(dest)], check=True, capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin", "RESULTS_DIR": str(results),
                                         "LIMIT_BYTES": str(limit)}, timeout=60)
    return out.stdout


def _members(dest: Path) -> set[str]:
    with tarfile.open(dest) as t:
        return {"/" + m.name.lstrip("/") for m in t.getmembers() if m.isfile()}


def test_collect_brings_back_results_evidence_logs_and_pairs_and_no_weights(tmp_path):
    run, results, logs, wanted = _layout(tmp_path)
    said = _collect(run, results, logs, tmp_path / "res.tgz", 15_000_000)
    assert _members(tmp_path / "res.tgz") == wanted
    assert "left out" not in said and f"{len(wanted)} files" in said


def test_a_group_over_the_limit_is_left_out_by_name_and_the_results_still_come(tmp_path):
    run, results, logs, wanted = _layout(tmp_path)
    (run / "dpo" / "pairs.parquet").write_bytes(os.urandom(50_000))  # the parquet group: ~50 KB
    said = _collect(run, results, logs, tmp_path / "res.tgz", 20_000)
    got = _members(tmp_path / "res.tgz")
    assert "collect: - parquet left out" in said
    assert got == wanted - {str(run / "dpo" / "pairs.parquet")}
    assert (tmp_path / "res.tgz").stat().st_size <= 20_000
