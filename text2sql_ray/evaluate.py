"""`t2s evaluate`: BIRD execution accuracy (EX) of predictions, on a pool of SQLite executor actors.

    t2s evaluate --data <BIRD split dir> --predictions <file> --out <dir> [--limit N] [--strict]

Predictions: the official ``predict_dev.json`` (``{"0": "SQL\\t----- bird -----\\tdb_id"}``) or JSONL
rows ``{"question_id": N, "sql": "..."}``. Scoring follows the official BIRD rule (see sqlexec.py):
a question is correct iff its predicted and gold results are equal as sets of row tuples, under one
budget for the pair. The denominator is every question asked whose database is on disk: a missing
prediction scores 0. Questions whose database file is missing are skipped, counted and named in a
loud warning (``--strict`` makes that an error).

Outputs in ``--out``: ``results.jsonl`` (one row per question, in question order: question_id, db_id,
difficulty, correct, pred_error, gold_error, timed_out, seconds, skipped, missing_prediction,
error_kind, pred_rows, gold_rows, attempts, pred_sql), ``report.json``,
``report.md``, ``ex_by_difficulty.png``, ``predict_dev.json`` (official format) and ``manifest.json``.

Scoring is ``score(split, sql_by_qid, cfg, out_dir)``; the ``--model``/``--endpoint`` modes generate
predictions first and then call it.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from . import bird
from .common import atomic_path, ensure_ray, log, write_json, write_jsonl, write_manifest, write_text
from .config import ConfigError, EvaluateConfig
from .sqlexec import PairResult, error_kind, run_pairs

DIFFICULTIES = ("simple", "moderate", "challenging")
UNLABELLED = "unlabelled"
OUTPUT_FILES = ("results.jsonl", "report.json", "report.md", "ex_by_difficulty.png", "predict_dev.json")


def run(cfg: EvaluateConfig) -> Path:
    """Evaluate a predictions file against a BIRD split; returns the output directory."""
    started = time.time()
    if cfg.compare:
        raise ConfigError(
            "evaluate --compare is not available yet; evaluate each run and read their report.json."
        )
    if cfg.model or cfg.endpoint:
        mode = "--model" if cfg.model else "--endpoint"
        raise ConfigError(
            f"evaluate {mode} is not available yet; generate predictions elsewhere and pass them with "
            '--predictions FILE (official predict_dev.json or JSONL {"question_id", "sql"}).'
        )
    if not cfg.predictions:
        raise ConfigError(
            "evaluate needs --predictions FILE "
            '(official predict_dev.json or JSONL rows {"question_id", "sql"}).'
        )
    if cfg.samples != 1:
        raise ConfigError(
            "evaluate --samples > 1 (maj@k) needs --model or --endpoint; drop it with --predictions."
        )
    split = bird.load_split(bird.resolve_data(cfg.data, "dev"))
    sql_by_qid = bird.read_predictions(cfg.predictions, split.questions)
    out = Path(cfg.out)
    report = score(split, sql_by_qid, cfg, out)
    write_manifest(
        out,
        "evaluate",
        cfg,
        started,
        inputs={"data": str(split.root), "split": split.name, "predictions": str(cfg.predictions)},
        counts={k: report[k] for k in ("n_questions", "n_skipped_missing_db", "n_scored", "n_correct")},
        metrics={
            "ex": report["ex"],
            "by_difficulty": {d: v["ex"] for d, v in report["by_difficulty"].items()},
        },
        outputs=list(OUTPUT_FILES),
    )
    log.info(
        "evaluate: EX %s%% (%d/%d scored) -> %s", report["ex"], report["n_correct"], report["n_scored"], out
    )
    return out


# --------------------------------------------------------------------------------------------------
# Scoring (shared by every mode)
# --------------------------------------------------------------------------------------------------


def select_questions(split: bird.BirdSplit, limit: int) -> list[dict]:
    """The questions asked: the first `limit` of the split (0 = all), in file order."""
    return split.questions[:limit] if limit else list(split.questions)


def missing_db_counts(split: bird.BirdSplit, questions: list[dict]) -> dict[str, int]:
    """{db_id: questions} for the questions whose database file is not on disk (sorted by db_id)."""
    c = Counter(q["db_id"] for q in questions if split.db_path(q["db_id"]) is None)
    return dict(sorted(c.items()))


def score(
    split: bird.BirdSplit, sql_by_qid: dict[int, str], cfg: EvaluateConfig, out_dir: str | Path
) -> dict:
    """Execute and score predictions ({question_id: sql}) for the split's questions; write the outputs.

    Returns the report (also written as report.json). Writes every file of OUTPUT_FILES.
    """
    t_start = time.time()
    out_dir = Path(out_dir)
    questions = select_questions(split, cfg.limit)
    missing = missing_db_counts(split, questions)
    if missing:
        listing = ", ".join(f"{d} ({n})" for d, n in missing.items())
        detail = (
            f"database file missing for {len(missing)} db_id(s) under {split.db_root}: {listing}. "
            "Put <db_id>/<db_id>.sqlite there to score them."
        )
        n_missing = sum(missing.values())
        if cfg.strict:
            raise FileNotFoundError(
                f"{n_missing} of {len(questions)} questions cannot be scored: {detail} "
                "(--strict is on; drop it to skip these questions.)"
            )
        log.warning(
            "SKIPPING %d of %d questions: %s "
            "They are counted in report.json (n_skipped_missing_db), not scored.",
            n_missing,
            len(questions),
            detail,
        )

    rows: list[dict] = []
    jobs: list[tuple[int, tuple]] = []
    for q in questions:
        qid = q["question_id"]
        db_path = split.db_path(q["db_id"])
        has_pred = qid in sql_by_qid
        row = {
            "question_id": qid,
            "db_id": q["db_id"],
            "difficulty": q.get("difficulty") or UNLABELLED,
            "correct": False,
            "pred_error": None,
            "gold_error": None,
            "timed_out": False,
            "seconds": 0.0,
            "skipped": None,
            "missing_prediction": not has_pred,
            "error_kind": "",
            "pred_rows": None,
            "gold_rows": None,
            "attempts": 0,
            "pred_sql": sql_by_qid.get(qid),
        }
        if db_path is None:
            row["skipped"] = f"missing database {q['db_id']}"
        elif not has_pred:
            row["pred_error"] = "missing prediction"
            row["error_kind"] = "missing prediction"
        else:
            jobs.append((len(rows), (str(db_path), sql_by_qid[qid], q["SQL"])))
        rows.append(row)
    n_missing_pred = sum(1 for r in rows if r["missing_prediction"] and not r["skipped"])
    if n_missing_pred:
        log.warning("%d scored question(s) have no prediction; each counts as wrong.", n_missing_pred)

    ray_startup = execution = 0.0
    if jobs:
        t0 = time.time()
        ensure_ray()
        ray_startup = time.time() - t0
        t0 = time.time()
        results: list[PairResult] = run_pairs(
            [item for _, item in jobs],
            num_actors=cfg.num_actors,
            timeout_s=cfg.timeout_s,
            max_rows=cfg.max_rows,
        )
        execution = time.time() - t0
        for (i, _), r in zip(jobs, results):
            rows[i].update(
                correct=r.correct,
                pred_error=r.pred_error,
                gold_error=r.gold_error,
                timed_out=r.timed_out,
                seconds=round(r.seconds, 6),
                error_kind=error_kind(r.pred_error) or ("gold error" if r.gold_error else ""),
                pred_rows=r.pred_rows,
                gold_rows=r.gold_rows,
                attempts=r.attempts,
            )

    report = build_report(rows, missing)
    report.update(
        data=str(split.root),
        num_actors=cfg.num_actors,
        timeout_s=cfg.timeout_s,
        max_rows=cfg.max_rows,
        wall_time_s={
            "ray_startup": round(ray_startup, 3),
            "execution": round(execution, 3),
            "total": round(time.time() - t_start, 3),
        },
    )
    write_jsonl(out_dir / "results.jsonl", rows)
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", report_markdown(report))
    plot_ex_by_difficulty(report, out_dir / "ex_by_difficulty.png")
    bird.write_official(out_dir / "predict_dev.json", questions, sql_by_qid)
    return report


def _ex(n_correct: int, n_scored: int) -> float | None:
    return round(100.0 * n_correct / n_scored, 2) if n_scored else None


def difficulty_order(names) -> list[str]:
    """BIRD's difficulties in their order, then any others alphabetically."""
    names = set(names)
    return [d for d in DIFFICULTIES if d in names] + sorted(names - set(DIFFICULTIES))


def build_report(rows: list[dict], missing: dict[str, int]) -> dict:
    """Counts and EX (percent of scored questions) overall and per difficulty, error kinds, skips."""
    scored = [r for r in rows if not r["skipped"]]
    n_correct = sum(1 for r in scored if r["correct"])
    by_diff = {}
    for d in difficulty_order(r["difficulty"] for r in rows):
        asked = [r for r in rows if r["difficulty"] == d]
        sc = [r for r in asked if not r["skipped"]]
        c = sum(1 for r in sc if r["correct"])
        by_diff[d] = {"n_questions": len(asked), "n_scored": len(sc), "n_correct": c, "ex": _ex(c, len(sc))}
    pred_kinds = Counter(r["error_kind"] for r in scored if r["pred_error"])
    gold_kinds = Counter(error_kind(r["gold_error"]) for r in scored if r["gold_error"])
    return {
        "n_questions": len(rows),
        "n_skipped_missing_db": sum(1 for r in rows if r["skipped"]),
        "skipped_db_ids": dict(missing),
        "n_scored": len(scored),
        "n_correct": n_correct,
        "ex": _ex(n_correct, len(scored)),
        "by_difficulty": by_diff,
        "n_missing_prediction": sum(1 for r in scored if r["missing_prediction"]),
        "n_timeouts": sum(1 for r in scored if r["timed_out"]),
        "n_pred_errors": sum(1 for r in scored if r["pred_error"]),
        "n_gold_errors": sum(1 for r in scored if r["gold_error"]),
        "n_wrong_result": sum(
            1 for r in scored if not r["correct"] and not r["pred_error"] and not r["gold_error"]
        ),
        "pred_error_kinds": dict(pred_kinds.most_common()),
        "gold_error_kinds": dict(gold_kinds.most_common()),
    }


def report_markdown(report: dict) -> str:
    """A readable report.md: EX table per difficulty, skips, error kinds, wall time."""

    def pct(x):
        return "-" if x is None else f"{x:.2f}"

    lines = [
        "# BIRD execution accuracy",
        "",
        f"Data: `{report.get('data', '')}`",
        "",
        "| difficulty | asked | scored | correct | EX % |",
        "|---|---:|---:|---:|---:|",
    ]
    for d, v in report["by_difficulty"].items():
        lines.append(f"| {d} | {v['n_questions']} | {v['n_scored']} | {v['n_correct']} | {pct(v['ex'])} |")
    lines.append(
        f"| **all** | {report['n_questions']} | {report['n_scored']} | {report['n_correct']} "
        f"| **{pct(report['ex'])}** |"
    )
    lines += ["", "EX is over scored questions; a missing prediction counts as wrong.", ""]
    if report["n_skipped_missing_db"]:
        skipped = ", ".join(f"{d} ({n})" for d, n in report["skipped_db_ids"].items())
        lines += [
            f"**Skipped {report['n_skipped_missing_db']} question(s): database file missing** for "
            f"{len(report['skipped_db_ids'])} db_id(s): {skipped}.",
            "",
        ]
    lines += [
        "| outcome | count |",
        "|---|---:|",
        f"| wrong result (both ran) | {report['n_wrong_result']} |",
        f"| prediction error | {report['n_pred_errors']} |",
        f"| gold error | {report['n_gold_errors']} |",
        f"| timeout | {report['n_timeouts']} |",
        f"| missing prediction | {report['n_missing_prediction']} |",
        "",
    ]
    if report["pred_error_kinds"]:
        lines += ["| prediction error kind | count |", "|---|---:|"]
        lines += [f"| {k} | {n} |" for k, n in report["pred_error_kinds"].items()]
        lines.append("")
    if report["gold_error_kinds"]:
        lines += ["| gold error kind | count |", "|---|---:|"]
        lines += [f"| {k} | {n} |" for k, n in report["gold_error_kinds"].items()]
        lines.append("")
    wt = report.get("wall_time_s")
    if wt:
        lines.append(
            f"Wall time: {wt['total']:.2f} s "
            f"(Ray start-up {wt['ray_startup']:.2f} s, execution {wt['execution']:.2f} s)."
        )
    return "\n".join(lines) + "\n"


def plot_ex_by_difficulty(report: dict, path: str | Path) -> Path:
    """Bar chart of EX per difficulty and overall (Agg canvas, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(report["by_difficulty"]) + ["all"]
    stats = list(report["by_difficulty"].values()) + [
        {"ex": report["ex"], "n_correct": report["n_correct"], "n_scored": report["n_scored"]}
    ]
    values = [s["ex"] or 0.0 for s in stats]
    fig = Figure(figsize=(6, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(names, values, color=["#4c72b0"] * (len(names) - 1) + ["#dd8452"])
    for bar, s in zip(bars, stats):
        label = "n/a" if s["ex"] is None else f"{s['ex']:.1f}%\n{s['n_correct']}/{s['n_scored']}"
        ax.annotate(
            label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
        )
    ax.set_ylim(0, 115)
    ax.set_ylabel("execution accuracy (%)")
    ax.set_title(
        f"BIRD EX by difficulty ({report['n_scored']} scored, {report['n_skipped_missing_db']} skipped)"
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
