"""`t2s pipeline`: convert -> synthesize -> train -> evaluate (base and fine-tuned) -> comparison report.

Every stage writes under one run directory (``<out>/convert``, ``synthesize``, ``train``,
``eval_base``, ``eval_finetuned``, ``report``) with its own manifest. ``pipeline_state.json`` records,
per stage, a fingerprint of the stage's resolved config chained with the fingerprints of the stages
it reads (``UPSTREAM``; else the one before it). A rerun skips a stage whose fingerprint matches and
whose manifest exists, so a finished run redoes nothing, a changed option reruns that stage and everything
that reads it, and a run killed mid-stage reruns that stage, which resumes from what it left (synthesize
keeps finished parts, train restarts from its latest checkpoint; a train run of other options leaves no
checkpoint to resume: they are removed).

The training set (``sft_source``): the verified chains of thought of synthesize ('synthesize'), the gold
SQL of every convert row without a chain of thought ('convert'), or both ('mix'): every convert row as a
no-CoT example beside every verified chain, written to ``<out>/sft/sft.parquet`` (column ``target``:
'sql' or 'cot'; each kind keeps its own system turn, so the student learns both ways of answering and
evaluation asks for the one ``convert.prompt.cot`` names).

The base model's evaluation depends on convert only (a changed train option never reruns it). The run
ends with ``<out>/report.md``: one row per evaluated model (base, fine-tuned) saying its prompt (CoT or
not), what it was trained on (counts of no-CoT and CoT rows) and its EX, then every stage's wall time.

With no arguments it runs the embedded default on a laptop CPU: the bundled demo dataset, SmolLM2-135M-
Instruct as teacher and student, LoRA on the mix, evaluation on the demo dev split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

from .common import log, read_manifest, write_json, write_manifest, write_parquet, write_text
from .config import ConfigError, EvaluateConfig, PipelineConfig, ServeConfig

STAGES = ("convert", "synthesize", "train", "eval_base", "eval_finetuned", "report")
UPSTREAM = {"eval_base": ("convert",), "eval_finetuned": ("train",), "report": ("eval_base", "eval_finetuned")}
"""The stages whose outputs a stage reads, where they are not just the one before it in STAGES."""


def fingerprint(stage_cfg, previous: str) -> str:
    """A stage's identity: its resolved config chained with the stage before it."""
    blob = json.dumps(dataclasses.asdict(stage_cfg), sort_keys=True, default=str) + previous
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprints(cfgs: dict) -> dict[str, str]:
    """Every stage's fingerprint, chained from the stages it reads (UPSTREAM, else the one before it)."""
    fps: dict[str, str] = {}
    for i, stage in enumerate(STAGES):
        fps[stage] = fingerprint(cfgs[stage], "".join(fps[s] for s in UPSTREAM.get(stage, STAGES[i - 1 : i])))
    return fps


def stage_configs(cfg: PipelineConfig) -> dict:
    """Each stage's config with its inputs and outputs placed under the run directory."""
    from .models import resolve_model

    run_dir = Path(cfg.out)
    rep = dataclasses.replace
    convert = rep(cfg.convert, out=str(run_dir / "convert"))
    synthesize = rep(cfg.synthesize, input=str(run_dir / "convert"), out=str(run_dir / "synthesize"))
    sft_dir = run_dir / {"synthesize": "synthesize", "convert": "convert", "mix": "sft"}[cfg.sft_source]
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


def write_mix(out: Path, sources: list[tuple[str, Path, str]], prompt_from: Path) -> dict:
    """<out>/sft.parquet: the rows of every (name, Parquet file, target) source in order (convert's columns, plus
    `target`), each with the system turn of its target ('sql': answer with the SQL, 'cot': reason first) in the
    prompt config of the convert run `prompt_from`, whose prompt record the manifest carries (so that train and
    `t2s evaluate --model <train out>` build the prompts trained on); returns the counts (rows, no_cot, cot, and
    rows per source). The pipeline's mix: convert's rows as 'sql' beside synthesize's verified chains as 'cot';
    benchmarks/recipe_table.py: BIRD + Spider gold rows, the chains, and both at once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .config import PromptConfig
    from .convert import output_schema
    from .prompts import recorded_prompt, system_prompt

    started = time.time()
    record = recorded_prompt(prompt_from)
    if record is None:
        raise ValueError(f"{prompt_from}: no prompt record (a `t2s convert` output's manifest.json); the SFT mix "
                         "needs the prompt config its rows were built with")
    record = {k: v for k, v in record.items() if k != "manifest"}
    prompt = PromptConfig(**record["config"])
    systems = {t: system_prompt(dataclasses.replace(prompt, cot=t == "cot")) for t in ("sql", "cot")}
    rows, per_source = [], {}
    for name, path, target in sources:
        if target not in systems:
            raise ValueError(f"SFT mix source {name}: target {target!r} is not 'sql' or 'cot'")
        n = 0
        for r in pq.read_table(path, columns=output_schema().names).to_pylist():
            r["messages"] = [{"role": "system", "content": systems[target]}] + [
                m for m in r["messages"] if m["role"] != "system"]
            rows.append({**r, "target": target})
            n += 1
        per_source[name] = {"file": str(path), "rows": n, "target": target}
    counts = {"rows": len(rows), "no_cot": sum(r["target"] == "sql" for r in rows),
              "cot": sum(r["target"] == "cot" for r in rows)}
    schema = output_schema().append(pa.field("target", pa.string()))
    write_parquet(Path(out) / "sft.parquet", pa.Table.from_pylist(rows, schema=schema))
    write_manifest(out, "sft_mix", {"sources": {k: v["file"] for k, v in per_source.items()}}, started,
                   prompt=record, counts={**counts, **{k: v["rows"] for k, v in per_source.items()}},
                   files={"sft": "sft.parquet"})
    log.info("SFT mix %s: %d no-CoT rows (gold SQL) + %d CoT rows", out, counts["no_cot"], counts["cot"])
    return {**counts, "sources": per_source}


def clear_stale_checkpoints(train_cfg, started: str | None, fp: str) -> None:
    """Remove <train out>/ray_train when it was started with another config fingerprint than `fp` (`t2s train`
    refuses a checkpoint of other options or data; an orchestrator that changed them on purpose starts over)."""
    stale = Path(train_cfg.out) / "ray_train"
    if started not in (None, fp) and not train_cfg.storage_path and stale.is_dir():
        log.info("train's options changed; removing the old run's checkpoints %s", stale)
        shutil.rmtree(stale)


def _check_sft_rows(sft_dir: Path, source: str) -> None:
    """Stop with advice when synthesis verified nothing (a small teacher may verify very few chains)."""
    import pyarrow.parquet as pq

    path = sft_dir / ("train.parquet" if source == "convert" else "sft.parquet")
    n = pq.read_metadata(path).num_rows if path.is_file() else 0
    if n == 0:
        raise ValueError(
            f"{path} has no training rows: the teacher verified no chain of thought. Use a stronger teacher "
            "(--synthesize.engine.model), more samples (--synthesize.samples), hinted mode "
            "(--synthesize.mode hinted), or train on gold SQL without CoT (--sft-source convert, or mix: both)."
        )


def run(cfg: PipelineConfig) -> Path:
    started = time.time()
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "pipeline_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    cfgs = stage_configs(cfg)

    fps = fingerprints(cfgs)
    timings: dict[str, float] = {}
    ran: list[str] = []
    for stage in STAGES:
        stage_cfg = cfgs[stage]
        fp = fps[stage]
        out_dir = Path(stage_cfg.out)
        if state.get(stage) == fp and read_manifest(out_dir) is not None:
            log.info("pipeline: %s is up to date (%s); skipping", stage, out_dir)
            continue
        log.info("pipeline: running %s -> %s", stage, out_dir)
        t0 = time.time()
        if stage == "train":
            if cfg.sft_source == "mix":
                write_mix(run_dir / "sft", [("convert_train", run_dir / "convert" / "train.parquet", "sql"),
                                            ("verified_chains", run_dir / "synthesize" / "sft.parquet", "cot")],
                          run_dir / "convert")
            _check_sft_rows(Path(stage_cfg.input), cfg.sft_source)
            clear_stale_checkpoints(stage_cfg, state.get("train_started"), fp)
            state["train_started"] = fp
            write_json(state_path, state)
        _stage_module(stage).run(stage_cfg)
        timings[stage] = round(time.time() - t0, 1)
        ran.append(stage)
        state[stage] = fp
        write_json(state_path, state)

    rows = report_rows(run_dir, cfg)
    summary = {
        "ex_base": rows[0]["ex"],
        "ex_finetuned": rows[1]["ex"],
        "n_scored": rows[1]["n_scored"],
        "rows": rows,
        "report": str(run_dir / "report.md"),
        "compare": str(run_dir / "report" / "compare.md"),
    }
    manifest = write_manifest(run_dir, "pipeline", cfg, started, ran=ran, stage_seconds=timings, metrics=summary)
    write_text(run_dir / "report.md", report_markdown(rows, json.loads(manifest.read_text()), stage_times(run_dir)))
    log.info(
        "pipeline: EX base %s%% -> fine-tuned %s%% on %s scored questions; report: %s",
        summary["ex_base"], summary["ex_finetuned"], summary["n_scored"], summary["report"],
    )
    print(f"pipeline report: {summary['report']}")
    if cfg.serve:
        from . import serve

        serve.run(ServeConfig(model=str(run_dir / "train"), blocking=True))
    return run_dir


def report_rows(run_dir: Path, cfg: PipelineConfig) -> list[dict]:
    """The report's rows, base then fine-tuned: model, prompt, what it was trained on (with counts), EX."""
    train = read_manifest(run_dir / "train") or {}
    mix = read_manifest(run_dir / "sft") if cfg.sft_source == "mix" else None
    n_trained = (train.get("data") or {}).get("trained")
    if mix:
        counts = {"no_cot": mix["counts"]["no_cot"], "cot": mix["counts"]["cot"]}
    elif cfg.sft_source == "convert":
        counts = {"no_cot": n_trained, "cot": 0}
    else:
        counts = {"no_cot": 0, "cot": n_trained}
    rows = []
    for name in ("eval_base", "eval_finetuned"):
        rep = json.loads((run_dir / name / "report.json").read_text())
        ev = read_manifest(run_dir / name) or {}
        prompt = (ev.get("prompt") or {}).get("config") or dataclasses.asdict(cfg.convert.prompt)
        tuned = name == "eval_finetuned"
        rows.append({
            "row": "fine-tuned" if tuned else "base",
            "model": str(run_dir / "train") if tuned else (cfg.train.model or "SmolLM2-135M-Instruct (embedded default)"),
            "prompt": "CoT" if prompt.get("cot") else "no-CoT",
            "train_rows": ({**counts, "trained": n_trained, "rejected": (train.get("data") or {}).get("rejected"),
                            "steps": (train.get("training") or {}).get("total_steps"), "method": cfg.train.method}
                           if tuned else None),
            "ex": rep.get("ex"), "n_correct": rep.get("n_correct"), "n_scored": rep.get("n_scored"),
            "n_questions": rep.get("n_questions"), "eval_dir": str(run_dir / name),
        })
    return rows


def stage_times(run_dir: Path) -> dict[str, float | None]:
    """Each stage's wall time from its own manifest (so a skipped stage still shows what it took)."""
    out = {}
    for stage in STAGES:
        m = read_manifest(run_dir / stage)
        out[stage] = None if m is None else m.get("wall_time_s")
    return out


def report_markdown(rows: list[dict], manifest: dict, times: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{x:.2f}"

    def trained_on(r):
        t = r["train_rows"]
        if t is None:
            return "nothing (the model as shipped)"
        return (f"{t['method']} on {t['no_cot']} no-CoT rows (gold SQL) + {t['cot']} CoT rows (execution-verified "
                f"teacher chains); {t['trained']} trained, {t['rejected']} rejected; {t['steps']} steps")

    lines = [
        "# Pipeline report", "",
        (f"Run directory `{Path(manifest['config']['out'])}`; evaluation data: "
         f"`{manifest['config']['evaluate']['data'] or 'the bundled demo dev split'}`."), "",
        "| row | model | prompt at evaluation | trained on | correct / scored | EX % |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['row']} | `{r['model']}` | {r['prompt']} | {trained_on(r)} | "
                     f"{r['n_correct']} / {r['n_scored']} | **{pct(r['ex'])}** |")
    delta = None if None in (rows[0]["ex"], rows[1]["ex"]) else rows[1]["ex"] - rows[0]["ex"]
    lines += [
        "",
        (f"Fine-tuned minus base: {'-' if delta is None else f'{delta:+.2f}'} EX points. No-CoT rows: a training "
         "question's gold SQL as the whole answer, under the no-CoT system turn; CoT rows: a teacher's chain of "
         "thought whose final SQL executed to the gold result, under the CoT system turn. Per difficulty, with the "
         "questions fixed and broken: `report/compare.md`."),
        "",
        "| stage | wall time (s) |", "|---|---:|",
    ]
    lines += [f"| {s} | {'-' if t is None else f'{t:.1f}'} |" for s, t in times.items()]
    lines.append(f"| **pipeline (this invocation)** | **{manifest['wall_time_s']:.1f}** |")
    ran = manifest.get("ran") or []
    lines += ["", f"Stages run by this invocation: {', '.join(ran) or 'none (all up to date)'}."]
    return "\n".join(lines) + "\n"


__all__ = ["STAGES", "UPSTREAM", "ConfigError", "fingerprint", "fingerprints", "report_rows", "run", "clear_stale_checkpoints", "stage_configs", "write_mix"]
