"""Training metrics where users look for them: TensorBoard event files, MLflow, Weights & Biases.

``--train.report-to`` is a comma-separated list (default ``tensorboard``; ``none`` turns logging off):

* ``tensorboard``: event files under ``<train out>/tensorboard/`` (``tensorboard --logdir <out>/tensorboard``),
  written with ``torch.utils.tensorboard`` (needs the ``tensorboard`` package, pinned in requirements-ci.txt);
* ``mlflow``: ``mlflow.log_metrics`` into the run configured the usual way (``MLFLOW_TRACKING_URI``,
  ``MLFLOW_EXPERIMENT_NAME``; default ./mlruns);
* ``wandb``: ``wandb.log`` into a run configured the usual way (``WANDB_PROJECT``, ``WANDB_API_KEY`` or
  ``WANDB_MODE=offline``).

`check_report_to` runs on the driver before training: a backend asked for but not installed is an error
there, not a crash in a worker. Only rank 0 opens a `MetricsLogger` (train.py); every optimizer step's
numeric metrics (loss, lr, tokens/s, grad norm, ...) are logged under ``train/<name>`` at that step.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPORT_TO = ("tensorboard", "mlflow", "wandb", "none")
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def parse_report_to(spec: str) -> list[str]:
    """'tensorboard,mlflow' -> ['tensorboard', 'mlflow']; 'none' or '' -> []; unknown names raise ValueError."""
    names = [s.strip().lower() for s in (spec or "").split(",") if s.strip()]
    bad = [n for n in names if n not in REPORT_TO]
    if bad:
        raise ValueError(f"train.report_to: {', '.join(bad)} is not one of {', '.join(REPORT_TO)} (comma-separated).")
    return [n for n in dict.fromkeys(names) if n != "none"]


def check_report_to(spec: str) -> list[str]:
    """The backends of `spec`, each importable here; a missing package is a ValueError saying what to install."""
    names = parse_report_to(spec)
    for n in names:
        if importlib.util.find_spec(_PACKAGES[n]) is None:
            raise ValueError(f"--train.report-to {n} needs the {_PACKAGES[n]} package: pip install {_PACKAGES[n]} "
                             f"(or drop {n} from --train.report-to).")
    return names


class MetricsLogger:
    """Rank 0's metric sinks for one training run."""

    def __init__(self, report_to: list[str], log_dir: str | Path, run_name: str = "train", params: dict | None = None):
        self.names = list(report_to)
        self.tb = self.mlflow = self.wandb = None
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(log_dir))
        if "mlflow" in self.names:
            import mlflow

            self.mlflow = mlflow
            if mlflow.active_run() is None:
                mlflow.start_run(run_name=run_name)
            if params:
                mlflow.log_params({k: str(v)[:250] for k, v in params.items()})
        if "wandb" in self.names:
            import wandb

            self.wandb = wandb
            if wandb.run is None:
                wandb.init(name=run_name, config=params or {}, dir=str(log_dir))

    def log(self, metrics: dict, step: int) -> None:
        scalars = {f"train/{k}": float(v) for k, v in metrics.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(scalars, step=step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()
        if self.wandb is not None:
            self.wandb.finish()


def open_logger(spec: str, log_dir: str | Path, run_name: str = "train", params: dict | None = None) -> MetricsLogger | None:
    """A MetricsLogger for `spec` (None when it names no backend)."""
    names = parse_report_to(spec)
    return MetricsLogger(names, log_dir, run_name, params) if names else None
