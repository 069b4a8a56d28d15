"""Training metrics: TensorBoard event files after a real (tiny) Ray Train run, read back by tensorboard itself."""

from __future__ import annotations

import json

import pytest

from text2sql_ray import tracking
from text2sql_ray.config import ConfigError, TrainConfig


def _conversation(q: dict) -> list[dict]:
    return [{"role": "system", "content": "Write SQLite."},
            {"role": "user", "content": q["question"]},
            {"role": "assistant", "content": q["SQL"]}]


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in log_dir, through tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.timeout(900)
def test_train_writes_tensorboard_events_from_rank_0_only(ray_local, tmp_path, tiny_llama_dir, bird_dev):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from text2sql_ray.cli import main

    qs = json.loads((bird_dev / "dev.json").read_text())[:12]
    data = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": _conversation(q)} for q in qs]), data)
    out = tmp_path / "out"
    rc = main(["train", "--input", str(data), "--model", str(tiny_llama_dir), "--out", str(out), "--max-steps", "3",
               "--checkpoint-every", "0", "--max-length", "256", "--num-workers", "2", "--cpus-per-worker", "0.5",
               "--warmup-ratio", "0"])
    assert rc == 0
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1  # two workers, one writer: rank 0
    scalars = read_scalars(out / "tensorboard")
    history = json.loads((out / "manifest.json").read_text())["loss_history"]
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([h["loss"] for h in history], rel=1e-6)
    assert {"train/lr", "train/tokens_per_s", "train/grad_norm", "train/label_tokens"} <= set(scalars)


def test_report_to_is_validated_when_the_config_is_built():
    assert tracking.parse_report_to("tensorboard, mlflow,tensorboard") == ["tensorboard", "mlflow"]
    assert tracking.parse_report_to("none") == []
    with pytest.raises(ConfigError, match="tensorbored is not one of"):
        TrainConfig(report_to="tensorbored")


def test_a_backend_that_is_not_installed_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match="pip install wandb"):
        tracking.check_report_to("tensorboard,wandb")
    assert tracking.check_report_to("tensorboard") == ["tensorboard"]


def test_logger_writes_only_numeric_metrics(tmp_path):
    log = tracking.open_logger("tensorboard", tmp_path)
    log.log({"step": 1, "loss": 2.5, "grad_norm": None, "epoch": 0, "name": "x"}, 1)
    log.close()
    assert read_scalars(tmp_path) == {"train/loss": [(1, 2.5)], "train/epoch": [(1, 0.0)]}
    assert tracking.open_logger("none", tmp_path) is None
