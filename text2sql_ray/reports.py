"""Evaluation reports: per-question rows -> report.json figures, report.md, the EX plot, and ``--compare``.

    t2s evaluate --compare <run dir A> <run dir B> --out <dir>

`build_report` aggregates `evaluate`'s per-question rows (EX overall and per difficulty, error kinds,
skips); `report_markdown` / `generation_markdown` / `plot_ex_by_difficulty` write what a run shows.
``--compare A B`` (`run_compare`): a side-by-side report of two evaluation runs (`compare_runs`): EX
overall and per difficulty on the questions both scored, the questions B fixed (wrong in A, right in B)
and broke, by id; ``compare.md``, ``compare.json``, ``compare.png`` and ``manifest.json`` in ``--out``.
Plots draw on an Agg canvas (no global matplotlib backend change).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from .common import atomic_path, log, pct, read_jsonl, write_json, write_manifest, write_text
from .config import EvaluateConfig
from .sqlexec import error_kind

DIFFICULTIES = ("simple", "moderate", "challenging")
UNLABELLED = "unlabelled"


def ex_percent(n_correct: int, n_scored: int) -> float | None:
    """EX in percent, 2 decimals (None when nothing was scored)."""
    return round(100.0 * n_correct / n_scored, 2) if n_scored else None


def difficulty_order(names) -> list[str]:
    """BIRD's difficulties in their order, then any others alphabetically."""
    names = set(names)
    return [d for d in DIFFICULTIES if d in names] + sorted(names - set(DIFFICULTIES))


def labelled_difficulties(names) -> list[str]:
    """difficulty_order of the names, or [] when every question is UNLABELLED (a dataset without difficulty)."""
    order = difficulty_order(names)
    return [] if order == [UNLABELLED] else order


def dataset_title(report: dict) -> str:
    return "Spider" if report.get("dataset") == "spider" else "BIRD"


def build_report(rows: list[dict], missing: dict[str, int], unreadable: dict[str, str] | None = None) -> dict:
    """Counts and EX (percent of scored questions) overall and per difficulty, error kinds, skips.

    by_difficulty is empty when no question has a difficulty (Spider): the overall EX is the only figure.
    """
    unreadable = unreadable or {}
    scored = [r for r in rows if not r["skipped"]]
    n_correct = sum(1 for r in scored if r["correct"])
    by_diff = {}
    for d in labelled_difficulties(r["difficulty"] for r in rows):
        asked = [r for r in rows if r["difficulty"] == d]
        sc = [r for r in asked if not r["skipped"]]
        c = sum(1 for r in sc if r["correct"])
        by_diff[d] = {"n_questions": len(asked), "n_scored": len(sc), "n_correct": c, "ex": ex_percent(c, len(sc))}
    pred_kinds = Counter(r["error_kind"] for r in scored if r["pred_error"])
    gold_kinds = Counter(error_kind(r["gold_error"]) for r in scored if r["gold_error"])
    return {
        "n_questions": len(rows),
        "n_skipped_missing_db": sum(1 for r in rows if r["skipped"] and r["db_id"] not in unreadable),
        "skipped_db_ids": dict(missing),
        "n_skipped_unreadable_db": sum(1 for r in rows if r["skipped"] and r["db_id"] in unreadable),
        "unreadable_db_ids": dict(unreadable),
        "n_scored": len(scored),
        "n_correct": n_correct,
        "ex": ex_percent(n_correct, len(scored)),
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

    lines = [
        f"# {dataset_title(report)} execution accuracy",
        "",
        f"Data: `{report.get('data', '')}`",
        "",
    ]
    if not report["by_difficulty"]:
        lines += ["No question has a difficulty label (Spider has none): EX is over all scored questions.", ""]
    lines += [
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
            (f"**Skipped {report['n_skipped_missing_db']} question(s): database file missing** for "
             f"{len(report['skipped_db_ids'])} db_id(s): {skipped}."),
            "",
        ]
    if report.get("n_skipped_unreadable_db"):
        lines += [
            (f"**Skipped {report['n_skipped_unreadable_db']} question(s): database file unreadable**: "
             + "; ".join(report["unreadable_db_ids"].values()) + "."),
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
        f"{dataset_title(report)} EX by difficulty ({report['n_scored']} scored, "
        f"{report['n_skipped_missing_db'] + report.get('n_skipped_unreadable_db', 0)} skipped)"
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def generation_markdown(report: dict) -> str:
    """The report.md section of a --model / --endpoint run: generation facts and maj@k beside greedy."""
    g = report.get("generation")
    if not g:
        return ""

    lines = [
        "",
        "## Generation",
        "",
        f"{g['mode']} `{g['source']}` (backend {g['backend']}"
        + (f", served model `{g['served_model']}`" if g.get("served_model") else "") + f"); greedy: {g['greedy']}.",
        (f"Generated {g['n_generated']} question(s); {g['n_generation_errors']} failed (scored 0); "
         f"{g['n_no_sql']} answer(s) held no SQL. Tokens: {g['tokens']}."),
        "",
    ]
    maj = report.get("maj_at_k")
    if maj:
        lines += [
            f"## Self-consistency (maj@{maj['k']}, execution-result vote, temperature {maj['temperature']})",
            "",
            "| difficulty | greedy EX % | maj@k EX % |",
            "|---|---:|---:|",
        ]
        for d, v in report["by_difficulty"].items():
            lines.append(f"| {d} | {pct(v['ex'])} | {pct(maj['by_difficulty'].get(d))} |")
        lines += [
            f"| **all** | **{pct(report['ex'])}** | **{pct(maj['ex'])}** |",
            "",
            (f"Any of the {maj['k']} samples correct: {pct(maj['any_sample_correct_ex'])} %; mean sample EX: "
             f"{pct(maj['mean_sample_ex'])} %; questions where no sample executed (sample 0 stands): "
             f"{maj['n_no_sample_executed']}. Per-question results: `{maj['dir']}/results.jsonl`."),
            "",
        ]
    return "\n".join(lines)


COMPARE_FILES = ("compare.md", "compare.json", "compare.png")


def _load_run(run_dir: str | Path) -> tuple[dict, list[dict]]:
    d = Path(run_dir)
    for name in ("report.json", "results.jsonl"):
        if not (d / name).is_file():
            raise FileNotFoundError(
                f"{d / name} does not exist: --compare takes two `t2s evaluate` output dirs (with report.json and results.jsonl)."
            )
    return json.loads((d / "report.json").read_text()), read_jsonl(d / "results.jsonl")


def compare_runs(dir_a: str | Path, dir_b: str | Path) -> dict:
    """Side-by-side comparison of two evaluation runs (A = before, B = after), on the questions both scored.

    fixed: wrong in A, right in B; broken: right in A, wrong in B (question ids, ascending).
    """
    report_a, rows_a = _load_run(dir_a)
    report_b, rows_b = _load_run(dir_b)
    a = {r["question_id"]: r for r in rows_a}
    b = {r["question_id"]: r for r in rows_b}
    common = sorted(set(a) & set(b))
    both = [q for q in common if not a[q]["skipped"] and not b[q]["skipped"]]
    fixed = [q for q in both if not a[q]["correct"] and b[q]["correct"]]
    broken = [q for q in both if a[q]["correct"] and not b[q]["correct"]]

    def stats(qids):
        ca = sum(1 for q in qids if a[q]["correct"])
        cb = sum(1 for q in qids if b[q]["correct"])
        ex_a, ex_b = ex_percent(ca, len(qids)), ex_percent(cb, len(qids))
        delta = round(ex_b - ex_a, 2) if ex_a is not None and ex_b is not None else None
        return {"n_scored": len(qids), "a_correct": ca, "b_correct": cb, "a_ex": ex_a, "b_ex": ex_b, "delta": delta}

    by_diff = {
        d: stats([q for q in both if a[q]["difficulty"] == d])
        for d in labelled_difficulties(a[q]["difficulty"] for q in both)
    }

    def detail(q):
        return {"question_id": q, "db_id": a[q]["db_id"], "difficulty": a[q]["difficulty"],
                "a_sql": a[q].get("pred_sql"), "b_sql": b[q].get("pred_sql"),
                "a_error": a[q].get("pred_error"), "b_error": b[q].get("pred_error")}

    result = {
        "a": {"dir": str(dir_a), "ex": report_a.get("ex"), "n_scored": report_a.get("n_scored"),
              "maj_at_k_ex": (report_a.get("maj_at_k") or {}).get("ex"), "source": (report_a.get("generation") or {}).get("source")},
        "b": {"dir": str(dir_b), "ex": report_b.get("ex"), "n_scored": report_b.get("n_scored"),
              "maj_at_k_ex": (report_b.get("maj_at_k") or {}).get("ex"), "source": (report_b.get("generation") or {}).get("source")},
        "n_common": len(common),
        "only_in_a": sorted(set(a) - set(b)),
        "only_in_b": sorted(set(b) - set(a)),
        "overall": stats(both),
        "by_difficulty": by_diff,
        "fixed": fixed,
        "broken": broken,
        "n_fixed": len(fixed),
        "n_broken": len(broken),
        "n_both_correct": sum(1 for q in both if a[q]["correct"] and b[q]["correct"]),
        "n_both_wrong": sum(1 for q in both if not a[q]["correct"] and not b[q]["correct"]),
        "fixed_detail": [detail(q) for q in fixed],
        "broken_detail": [detail(q) for q in broken],
    }
    return result


def compare_markdown(c: dict) -> str:
    def signed(x):
        return "-" if x is None else f"{x:+.2f}"

    lines = [
        "# Evaluation runs compared",
        "",
        f"A: `{c['a']['dir']}`" + (f" ({c['a']['source']})" if c["a"]["source"] else ""),
        f"B: `{c['b']['dir']}`" + (f" ({c['b']['source']})" if c["b"]["source"] else ""),
        "",
        f"On the {c['overall']['n_scored']} questions both runs scored:",
        "",
        "| difficulty | scored | A correct | B correct | A EX % | B EX % | delta |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for d, v in c["by_difficulty"].items():
        lines.append(f"| {d} | {v['n_scored']} | {v['a_correct']} | {v['b_correct']} | {pct(v['a_ex'])} | "
                     f"{pct(v['b_ex'])} | {signed(v['delta'])} |")
    o = c["overall"]
    lines += [
        (f"| **all** | {o['n_scored']} | {o['a_correct']} | {o['b_correct']} | **{pct(o['a_ex'])}** | "
         f"**{pct(o['b_ex'])}** | **{signed(o['delta'])}** |"),
        "",
        f"Each run's own report: A EX {pct(c['a']['ex'])} % of {c['a']['n_scored']} scored, "
        f"B EX {pct(c['b']['ex'])} % of {c['b']['n_scored']} scored."
        + (f" maj@k: A {pct(c['a']['maj_at_k_ex'])} %, B {pct(c['b']['maj_at_k_ex'])} %."
           if c["a"]["maj_at_k_ex"] is not None or c["b"]["maj_at_k_ex"] is not None else ""),
        "",
        f"Fixed by B ({c['n_fixed']}): {', '.join(map(str, c['fixed'])) or 'none'}",
        "",
        f"Broken by B ({c['n_broken']}): {', '.join(map(str, c['broken'])) or 'none'}",
        "",
        f"Both right: {c['n_both_correct']}; both wrong: {c['n_both_wrong']}.",
    ]
    if c["only_in_a"] or c["only_in_b"]:
        lines += ["", f"Questions in only one run (not compared): A {len(c['only_in_a'])}, B {len(c['only_in_b'])}."]
    return "\n".join(lines) + "\n"


def plot_compare(c: dict, path: str | Path) -> Path:
    """Grouped bars: EX of A and B per difficulty and overall, on the questions both scored."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(c["by_difficulty"]) + ["all"]
    stats = list(c["by_difficulty"].values()) + [c["overall"]]
    xs = list(range(len(names)))
    fig = Figure(figsize=(7, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    w = 0.38
    for offset, key, label, color in ((-w / 2, "a_ex", "A", "#4c72b0"), (w / 2, "b_ex", "B", "#dd8452")):
        bars = ax.bar([x + offset for x in xs], [s[key] or 0.0 for s in stats], w, label=label, color=color)
        for bar, s in zip(bars, stats):
            ax.annotate("n/a" if s[key] is None else f"{s[key]:.1f}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs)
    ax.set_xticklabels(names)
    ax.set_ylim(0, 115)
    ax.set_ylabel("execution accuracy (%)")
    ax.set_title(f"A vs B on {c['overall']['n_scored']} questions: {c['n_fixed']} fixed, {c['n_broken']} broken")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def run_compare(cfg: EvaluateConfig, started: float | None = None) -> Path:
    """--compare A B: compare.md, compare.json, compare.png and manifest.json in --out."""
    started = started or time.time()
    dir_a, dir_b = cfg.compare
    c = compare_runs(dir_a, dir_b)
    out = Path(cfg.out)
    write_json(out / "compare.json", c)
    write_text(out / "compare.md", compare_markdown(c))
    plot_compare(c, out / "compare.png")
    write_manifest(
        out, "evaluate", cfg, started,
        inputs={"compare": [str(dir_a), str(dir_b)]},
        counts={"n_common": c["n_common"], "n_scored_both": c["overall"]["n_scored"], "n_fixed": c["n_fixed"],
                "n_broken": c["n_broken"]},
        metrics={"a_ex": c["overall"]["a_ex"], "b_ex": c["overall"]["b_ex"], "delta": c["overall"]["delta"]},
        outputs=list(COMPARE_FILES),
    )
    log.info("evaluate --compare: A %s%% -> B %s%% on %d questions (%d fixed, %d broken) -> %s",
             c["overall"]["a_ex"], c["overall"]["b_ex"], c["overall"]["n_scored"], c["n_fixed"], c["n_broken"], out)
    return out


