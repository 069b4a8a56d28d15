"""Training metrics: TensorBoard event files, read back by tensorboard itself. The event files of a real (tiny) Ray
Train run are checked in tests/test_train.py, on the LoRA run it shares (test_train_writes_tensorboard_events_...)."""

from __future__ import annotations

import pytest

from text2sql_ray import tracking
from text2sql_ray.config import ConfigError, TrainConfig


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in log_dir, through tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


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
