"""`t2s pipeline`: convert -> synthesize -> train -> evaluate (base and fine-tuned) -> comparison report.

Every stage writes under one run directory (``<out>/convert``, ``synthesize``, ``train``,
``eval_base``, ``eval_finetuned``, ``report``) with its own manifest. ``pipeline_state.json`` records,
per stage, a fingerprint of the stage's resolved config chained with the fingerprints of the stages
before it. A rerun skips a stage whose fingerprint matches and whose manifest exists, so a finished run
redoes nothing, a changed option reruns that stage and everything after it, and a run killed mid-stage
reruns that stage, which resumes from what it left (synthesize keeps finished parts, train restarts
from its latest checkpoint).

With no arguments it runs the embedded default on a laptop CPU: the bundled demo dataset, SmolLM2-135M-
Instruct as teacher and student, LoRA, evaluation on the demo dev split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

from .common import log, read_manifest, write_json, write_manifest
from .config import ConfigError, EvaluateConfig, PipelineConfig, ServeConfig

STAGES = ("convert", "synthesize", "train", "eval_base", "eval_finetuned", "report")


def fingerprint(stage_cfg, previous: str) -> str:
    """A stage's identity: its resolved config chained with the stage before it."""
    blob = json.dumps(dataclasses.asdict(stage_cfg), sort_keys=True, default=str) + previous
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_configs(cfg: PipelineConfig) -> dict:
    """Each stage's config with its inputs and outputs placed under the run directory."""
    from .models import resolve_model

    run_dir = Path(cfg.out)
    rep = dataclasses.replace
    convert = rep(cfg.convert, out=str(run_dir / "convert"))
    synthesize = rep(cfg.synthesize, input=str(run_dir / "convert"), out=str(run_dir / "synthesize"))
    sft_dir = run_dir / ("synthesize" if cfg.sft_source == "synthesize" else "convert")
    train = rep(cfg.train, input=str(sft_dir), out=str(run_dir / "train"))
    # The base model is evaluated exactly as the student starts; "" (embedded default) resolves to its
    # exported directory so that --model is set.
    base_model = cfg.train.model or resolve_model("")
    # Evaluation uses the prompt template the student was trained with (the convert stage's).
    common_eval = dict(predictions="", endpoint="", compare=[], prompt=convert.prompt, tokenizer=convert.tokenizer)
    eval_base = rep(cfg.evaluate, model=base_model, out=str(run_dir / "eval_base"), **common_eval)
    eval_ft = rep(cfg.evaluate, model=str(run_dir / "train"), out=str(run_dir / "eval_finetuned"), **common_eval)
    report = EvaluateConfig(
        compare=[str(run_dir / "eval_base"), str(run_dir / "eval_finetuned")], out=str(run_dir / "report")
    )
    return {
        "convert": convert,
        "synthesize": synthesize,
        "train": train,
        "eval_base": eval_base,
        "eval_finetuned": eval_ft,
        "report": report,
    }


def _stage_module(stage: str):
    from . import convert, evaluate, synthesize, train

    return {
        "convert": convert,
        "synthesize": synthesize,
        "train": train,
        "eval_base": evaluate,
        "eval_finetuned": evaluate,
        "report": evaluate,
    }[stage]


def _check_sft_rows(sft_dir: Path, source: str) -> None:
    """Stop with advice when synthesis verified nothing (a small teacher may verify very few chains)."""
    import pyarrow.parquet as pq

    path = sft_dir / ("sft.parquet" if source == "synthesize" else "train.parquet")
    n = pq.read_metadata(path).num_rows if path.is_file() else 0
    if n == 0:
        raise ValueError(
            f"{path} has no training rows: the teacher verified no chain of thought. Use a stronger teacher "
            "(--synthesize.engine.model), more samples (--synthesize.samples), hinted mode "
            "(--synthesize.mode hinted), or train on gold SQL without CoT (--sft-source convert)."
        )


def run(cfg: PipelineConfig) -> Path:
    started = time.time()
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "pipeline_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    cfgs = stage_configs(cfg)

    previous = ""
    timings: dict[str, float] = {}
    ran: list[str] = []
    for stage in STAGES:
        stage_cfg = cfgs[stage]
        fp = fingerprint(stage_cfg, previous)
        previous = fp
        out_dir = Path(stage_cfg.out)
        if state.get(stage) == fp and read_manifest(out_dir) is not None:
            log.info("pipeline: %s is up to date (%s); skipping", stage, out_dir)
            continue
        if stage == "train":
            _check_sft_rows(Path(stage_cfg.input), cfg.sft_source)
        log.info("pipeline: running %s -> %s", stage, out_dir)
        t0 = time.time()
        _stage_module(stage).run(stage_cfg)
        timings[stage] = round(time.time() - t0, 1)
        ran.append(stage)
        state[stage] = fp
        write_json(state_path, state)

    base = json.loads((run_dir / "eval_base" / "report.json").read_text())
    tuned = json.loads((run_dir / "eval_finetuned" / "report.json").read_text())
    summary = {
        "ex_base": base.get("ex"),
        "ex_finetuned": tuned.get("ex"),
        "n_scored": tuned.get("n_scored"),
        "report": str(run_dir / "report" / "compare.md"),
    }
    write_manifest(run_dir, "pipeline", cfg, started, ran=ran, stage_seconds=timings, metrics=summary)
    log.info(
        "pipeline: EX base %s%% -> fine-tuned %s%% on %s scored questions; report: %s",
        summary["ex_base"], summary["ex_finetuned"], summary["n_scored"], summary["report"],
    )
    print(f"pipeline report: {summary['report']}")
    if cfg.serve:
        from . import serve

        serve.run(ServeConfig(model=str(run_dir / "train"), blocking=True))
    return run_dir


__all__ = ["run", "stage_configs", "fingerprint", "STAGES", "ConfigError"]
