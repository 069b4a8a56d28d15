"""`t2s evaluate`: BIRD execution accuracy (EX) of predictions, a model or an endpoint, on a pool of SQLite executor actors.

    t2s evaluate --data <BIRD split dir> --predictions <file> --out <dir> [--limit N] [--strict]
    t2s evaluate --data <dir> --model <dir or name> --out <dir> [--samples K --engine.temperature T]
    t2s evaluate --data <dir> --endpoint http://host:8000/v1 --out <dir> [--engine.concurrency C] [--samples K ...]
    t2s evaluate --compare <run dir A> <run dir B> --out <dir>          (reports.run_compare)

Every mode reads: questions -> (generate) -> extract SQL -> verify -> aggregate.

``--data`` is a BIRD split or a Spider directory (its ``dev.json``; Spider has no difficulty: the report
gives the overall EX only). Predictions: the official ``predict_dev.json`` or JSONL rows
``{"question_id": N, "sql": "..."}`` (`bird.read_predictions`). `score` verifies them with the official
BIRD rule under one budget per pred+gold pair (`verify.verify`, ``pair_budget=True``) and aggregates
(`reports.build_report`). The denominator is every question asked whose database is on disk: a missing
prediction scores 0. Questions whose database file is missing or unreadable (``bird.sqlite_file_problem``)
are skipped, counted and named in a loud warning (``--strict`` makes that an error; when no question
is left to score the run fails). Outputs in ``--out``: ``results.jsonl`` (one row per question, in
question order, `result_row`), ``report.json``, ``report.md``, ``ex_by_difficulty.png``,
``predict_dev.json`` (official format, SQL verbatim: it re-scores to the same results), ``manifest.json``.

``--model`` (``engines.generate`` on Ray Data, backend 'hf' or 'vllm') and ``--endpoint`` (the 'openai'
backend against any OpenAI-compatible server; ``engine.model`` names the served model, empty = the first
it lists) build each question's prompt exactly as ``t2s convert`` built the training prompt, from the
prompt config a ``t2s train`` output records (generation.py), take ``prompts.extract_sql`` of each answer
(`extract_answers`) and score it. A failed generation is a missing prediction (0). Extra output:
``generations.jsonl`` (question_id, db_id, text, sql, tokens, error, samples, vote), which
``t2s evaluate --predictions`` re-scores.

``--samples k`` (k > 1, ``engine.temperature`` > 0): self-consistency (`majority_at_k`). Greedy EX comes
from a temperature-0 generation (with vllm one more row per question in the samples' execution: one engine
start), so it equals a plain run's EX; the k samples per question are
verified with ``pair_budget=False`` (each distinct SQL once with its own budget, the gold once with its
own: a slow gold never removes a vote); the most frequent execution result wins (`majority_vote`); the
winners are scored like predictions into ``<out>/maj_at_k/`` and reported beside greedy EX.
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from . import bird, generation, reports
from .common import ensure_ray, log, write_json, write_jsonl, write_manifest, write_text
from .config import ConfigError, EvaluateConfig
from .sqlexec import PairResult, error_kind
from .verify import Candidates, verify

OUTPUT_FILES = ("results.jsonl", "report.json", "report.md", "ex_by_difficulty.png", "predict_dev.json")
GENERATION_FILES = ("generations.jsonl",)
MAJ_DIR = "maj_at_k"
COUNT_KEYS = ("n_questions", "n_skipped_missing_db", "n_skipped_unreadable_db", "n_scored", "n_correct")


def run(cfg: EvaluateConfig) -> Path:
    """Evaluate predictions, a model or an endpoint against a BIRD split (or compare two runs); returns --out."""
    started = time.time()
    if cfg.compare:
        return reports.run_compare(cfg, started)
    if cfg.model or cfg.endpoint:
        return run_generation(cfg, started)
    if not cfg.predictions:
        raise ConfigError("evaluate needs --predictions FILE (official predict_dev.json or JSONL rows "
                          '{"question_id", "sql"}), --model M or --endpoint URL.')
    if cfg.samples != 1:
        raise ConfigError("evaluate --samples > 1 (maj@k) needs --model or --endpoint; drop it with --predictions.")
    split = bird.load_split(bird.resolve_data(cfg.data, "dev"), "dev")
    sql_by_qid = bird.read_predictions(cfg.predictions, split.questions)
    out = Path(cfg.out)
    report = score(split, sql_by_qid, cfg, out)
    write_manifest(
        out, "evaluate", cfg, started,
        inputs={"data": str(split.root), "split": split.name, "predictions": str(cfg.predictions)},
        counts={k: report[k] for k in COUNT_KEYS},
        metrics={"ex": report["ex"], "by_difficulty": {d: v["ex"] for d, v in report["by_difficulty"].items()}},
        outputs=list(OUTPUT_FILES),
    )
    log.info("evaluate: EX %s%% (%d/%d scored) -> %s", report["ex"], report["n_correct"], report["n_scored"], out)
    return out


# --------------------------------------------------------------------------------------------------
# Scoring (shared by every mode): questions -> verify -> aggregate
# --------------------------------------------------------------------------------------------------


def select_questions(split: bird.BirdSplit, limit: int) -> list[dict]:
    """The questions asked: the first `limit` of the split (0 = all), in file order."""
    return split.questions[:limit] if limit else list(split.questions)


def skipped_databases(split: bird.BirdSplit, questions: list[dict], strict: bool) -> tuple[dict[str, int], dict[str, str]]:
    """(missing {db_id: questions}, unreadable {db_id: problem}): warned about, or an error with --strict or
    when no question is left to score."""
    missing = bird.missing_db_counts(split, questions)
    if missing:
        listing = ", ".join(f"{d} ({n})" for d, n in missing.items())
        detail = (
            f"database file missing for {len(missing)} db_id(s) under {split.db_root}: {listing}. "
            "Put <db_id>/<db_id>.sqlite there to score them."
        )
        n_missing = sum(missing.values())
        if strict:
            raise FileNotFoundError(f"{n_missing} of {len(questions)} questions cannot be scored: {detail} "
                                    "(--strict is on; drop it to skip these questions.)")
        log.warning("SKIPPING %d of %d questions: %s They are counted in report.json (n_skipped_missing_db), "
                    "not scored.", n_missing, len(questions), detail)
    broken = bird.unreadable_dbs(split, questions)
    if broken:
        n_broken = sum(1 for q in questions if q["db_id"] in broken)
        detail = "; ".join(broken.values())
        if strict:
            raise ValueError(f"{n_broken} of {len(questions)} questions cannot be scored: {detail} "
                             "(--strict is on; replace the file(s) with intact copies.)")
        log.warning("SKIPPING %d of %d questions: unreadable database file(s): %s. Replace them with intact "
                    "copies to score these questions; they are counted in report.json (n_skipped_unreadable_db).",
                    n_broken, len(questions), detail)
    n_usable = sum(1 for q in questions if q["db_id"] not in missing and q["db_id"] not in broken)
    if questions and not n_usable:
        raise FileNotFoundError(f"none of the {len(questions)} questions can be scored: every one is on a missing "
                                f"or unreadable database under {split.db_root}; nothing to evaluate.")
    return missing, broken


def result_row(q: dict, db_path: Path | None, sql_by_qid: dict[int, str], broken: dict[str, str]) -> dict:
    """A question's results.jsonl row before verification: skipped, missing prediction, or still to verify."""
    sql = sql_by_qid.get(q["question_id"])
    row = {
        "question_id": q["question_id"], "db_id": q["db_id"], "difficulty": q.get("difficulty") or reports.UNLABELLED,
        "correct": False, "pred_error": None, "gold_error": None, "timed_out": False, "seconds": 0.0,
        "skipped": None, "missing_prediction": q["question_id"] not in sql_by_qid, "error_kind": "", "pred_rows": None, "gold_rows": None,
        "attempts": 0, "pred_sql": sql,
    }
    if db_path is None:
        row["skipped"] = f"missing database {q['db_id']}"
    elif q["db_id"] in broken:
        row["skipped"] = f"unreadable database {q['db_id']}"
    elif row["missing_prediction"]:
        row["pred_error"] = row["error_kind"] = "missing prediction"
    return row


def score(
    split: bird.BirdSplit, sql_by_qid: dict[int, str], cfg: EvaluateConfig, out_dir: str | Path
) -> dict:
    """Verify predictions ({question_id: sql}) for the split's questions (one budget per pred+gold pair,
    the official rule) and aggregate; write every file of OUTPUT_FILES. Returns the report (report.json)."""
    t_start = time.time()
    out_dir = Path(out_dir)
    questions = select_questions(split, cfg.limit)
    missing, broken = skipped_databases(split, questions, cfg.strict)
    rows = [result_row(q, split.db_path(q["db_id"]), sql_by_qid, broken) for q in questions]
    todo = [i for i, r in enumerate(rows) if not r["skipped"] and not r["missing_prediction"]]
    n_missing_pred = sum(1 for r in rows if r["missing_prediction"] and not r["skipped"])
    if n_missing_pred:
        log.warning("%d scored question(s) have no prediction; each counts as wrong.", n_missing_pred)

    ray_startup = execution = 0.0
    if todo:
        t0 = time.time()
        ensure_ray()
        ray_startup = time.time() - t0
        t0 = time.time()
        results = verify(
            [Candidates(str(split.db_path(questions[i]["db_id"])), [rows[i]["pred_sql"]], questions[i]["SQL"])
             for i in todo],
            pair_budget=True, num_actors=cfg.num_actors, timeout_s=cfg.timeout_s, max_rows=cfg.max_rows,
        )
        execution = time.time() - t0
        for i, (r,) in zip(todo, results):
            rows[i].update(
                correct=r.correct, pred_error=r.pred_error, gold_error=r.gold_error, timed_out=r.timed_out,
                seconds=round(r.seconds, 6),
                error_kind=error_kind(r.pred_error) or ("gold error" if r.gold_error else ""),
                pred_rows=r.pred_rows, gold_rows=r.gold_rows, attempts=r.attempts,
            )

    n_gold_errors = sum(1 for r in rows if r["gold_error"])
    if n_gold_errors:
        log.warning("%d gold SQL(s) failed to execute (each question scores 0); see gold_error in results.jsonl. "
                    "Check the database files and the question file.", n_gold_errors)
    report = reports.build_report(rows, missing, broken)
    report.update(
        dataset=split.dataset, data=str(split.root), num_actors=cfg.num_actors, timeout_s=cfg.timeout_s,
        max_rows=cfg.max_rows,
        wall_time_s={"ray_startup": round(ray_startup, 3), "execution": round(execution, 3),
                     "total": round(time.time() - t_start, 3)},
    )
    if cfg.engine_db:  # the same predictions and gold SQL on DuckDB / PostgreSQL (otherdb.py)
        from .otherdb import score_on_engine

        report["engine_db"] = score_on_engine(split, questions, sql_by_qid, cfg, out_dir)
    write_jsonl(out_dir / "results.jsonl", rows)
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", reports.report_markdown(report))
    reports.plot_ex_by_difficulty(report, out_dir / "ex_by_difficulty.png")
    bird.write_official(out_dir / "predict_dev.json", questions, sql_by_qid)
    return report


# --------------------------------------------------------------------------------------------------
# Model and endpoint modes: questions -> generate -> extract SQL -> verify -> aggregate (and maj@k)
# --------------------------------------------------------------------------------------------------


def majority_vote(digests: Sequence[str | None]) -> int | None:
    """Index of the maj@k winner among k samples, given each sample's execution-result digest (None = failed).

    The most frequent result wins; failed executions do not vote; a tie between results goes to the
    one whose first sample came earliest. Returns the index of that result's first sample, or None
    when no sample executed.

    >>> majority_vote(["a", "b", "b", None])
    1
    >>> majority_vote(["a", "b", "a", "b"])
    0
    >>> majority_vote([None, None]) is None
    True
    """
    counts = Counter(d for d in digests if d is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(i for i, d in enumerate(digests) if d is not None and counts[d] == best)


def vote(sqls: Sequence[str], results: Sequence[PairResult]) -> dict:
    """maj@k over one question's samples and their ``pair_budget=False`` results: {winner (sample index or
    None), sql (the winner's, sample 0 when nothing executed), votes, executed, distinct, correct: [per sample]}.
    A sample votes with its result digest when it executed (not failed, not timed out)."""
    digests = [r.pred_digest if not r.pred_error and not r.timed_out else None for r in results]
    winner = majority_vote(digests)
    pick = 0 if winner is None else winner
    votes = Counter(d for d in digests if d is not None)
    return {
        "winner": winner,
        "sql": sqls[pick],
        "votes": votes[digests[pick]] if winner is not None else 0,
        "executed": sum(1 for d in digests if d is not None),
        "distinct": len(votes),
        "correct": [bool(r.correct) for r in results],
    }


def vote_questions(
    split: bird.BirdSplit, questions: list[dict], samples_sql: dict[int, list[str]], cfg: EvaluateConfig
) -> dict[int, dict]:
    """Verify the samples' SQL (``pair_budget=False``: each distinct SQL once with its own budget, the gold
    once with its own, so a slow gold never removes a vote) and `vote`.

    Returns {question_id: {winner, sql, votes, executed, distinct, correct: [per sample]}} for the
    questions with samples and a database on disk.
    """
    todo = [q for q in questions if split.db_path(q["db_id"]) is not None and samples_sql.get(q["question_id"])]
    results = verify([Candidates(str(split.db_path(q["db_id"])), samples_sql[q["question_id"]], q["SQL"]) for q in todo],
                     pair_budget=False, num_actors=cfg.num_actors, timeout_s=cfg.timeout_s, max_rows=cfg.max_rows)
    return {q["question_id"]: vote(samples_sql[q["question_id"]], rs) for q, rs in zip(todo, results)}


def extract_answers(split: bird.BirdSplit, questions: list[dict], greedy: dict[int, dict], sampled: dict[int, dict],
                    schema_errors: dict[int, str]) -> tuple[list[dict], dict[int, str], dict[int, list[str]]]:
    """generations.jsonl rows (question order), the greedy SQL {question_id: sql} and the samples' SQL
    {question_id: [sql, ...]}: `prompts.extract_sql` of every generated text."""
    from .prompts import extract_sql

    gen_rows, sql_by_qid, samples_sql = [], {}, {}
    for q in questions:
        qid = q["question_id"]
        g = greedy.get(qid)
        row = {"question_id": qid, "db_id": q["db_id"], "text": None, "sql": None, "tokens": None, "error": "",
               "samples": []}
        if qid in schema_errors:
            row["error"] = schema_errors[qid]
        elif g is None:
            row["error"] = "not generated: database file missing" if split.db_path(q["db_id"]) is None else "no output"
        elif g["error"] or not g["texts"]:
            row["error"] = g["error"] or "no text generated"
        else:
            row.update(text=g["texts"][0], sql=extract_sql(g["texts"][0]), tokens=g["tokens"][0])
            sql_by_qid[qid] = row["sql"]
        s = sampled.get(qid)
        if s is not None:
            if s["error"] and not s["texts"]:
                row["samples_error"] = s["error"]
            row["samples"] = [{"text": t, "sql": extract_sql(t), "tokens": c} for t, c in zip(s["texts"], s["tokens"])]
            if row["samples"]:
                samples_sql[qid] = [x["sql"] for x in row["samples"]]
        gen_rows.append(row)
    return gen_rows, sql_by_qid, samples_sql


def majority_at_k(split: bird.BirdSplit, questions: list[dict], samples_sql: dict[int, list[str]],
                  gen_rows: list[dict], cfg: EvaluateConfig, temperature: float, out: Path) -> dict:
    """maj@k: vote, record each question's vote on its generations row, score the winners into <out>/maj_at_k/;
    returns report.json's ``maj_at_k``."""
    votes = vote_questions(split, questions, samples_sql, cfg)
    for row in gen_rows:
        v = votes.get(row["question_id"])
        row["vote"] = None if v is None else {key: v[key] for key in ("winner", "votes", "executed", "distinct")}
        if v is not None:
            row["maj_sql"] = v["sql"]
    maj_report = score(split, {qid: v["sql"] for qid, v in votes.items()}, cfg, out / MAJ_DIR)
    scored_ids = {q["question_id"] for q in questions if split.db_path(q["db_id"]) is not None}
    any_correct = sum(1 for qid, v in votes.items() if qid in scored_ids and any(v["correct"]))
    sample_hits = [c for qid, v in votes.items() if qid in scored_ids for c in v["correct"]]
    return {
        "k": cfg.samples,
        "temperature": temperature,
        "ex": maj_report["ex"],
        "n_correct": maj_report["n_correct"],
        "n_scored": maj_report["n_scored"],
        "by_difficulty": {d: v["ex"] for d, v in maj_report["by_difficulty"].items()},
        "any_sample_correct_ex": reports.ex_percent(any_correct, maj_report["n_scored"]),
        "mean_sample_ex": reports.ex_percent(sum(sample_hits), len(sample_hits)) if sample_hits else None,
        "n_no_sample_executed": sum(1 for v in votes.values() if v["winner"] is None),
        "dir": MAJ_DIR,
    }


def run_generation(cfg: EvaluateConfig, started: float | None = None) -> Path:
    """--model / --endpoint: generate (greedy, plus k samples with --samples k), extract SQL, verify, aggregate."""
    started = started or time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    split = bird.load_split(bird.resolve_data(cfg.data, "dev"), "dev")
    questions = select_questions(split, cfg.limit)
    engine = generation.engine_config(cfg)
    served_model = ""
    if engine.backend == "openai":
        from .engines import resolve_openai_model

        served_model = resolve_openai_model(engine)  # fails fast when the endpoint is down
        engine = dataclasses.replace(engine, model=served_model)
    cfg, prompt_source = generation.resolve_prompt(cfg, generation.endpoint_prompt(engine.endpoint, served_model) if served_model else None)
    k = cfg.samples

    t0 = time.time()
    rows, schema_errors = generation.question_prompts(split, questions, cfg)
    prompt_s = time.time() - t0
    log.info(
        "evaluate: generating for %d of %d questions with %s (%s)%s",
        len(rows), len(questions), cfg.endpoint or cfg.model, engine.backend,
        f", then {k} samples each at temperature {engine.temperature}" if k > 1 else "",
    )
    t0 = time.time()
    if k > 1:
        greedy, sampled, gen_s = generation.greedy_and_samples(rows, engine, k)
    else:
        greedy, sampled = generation.generate_rows(rows, engine, 1), {}
        gen_s = {"greedy": round(time.time() - t0, 3), "sampling": 0.0}

    gen_rows, sql_by_qid, samples_sql = extract_answers(split, questions, greedy, sampled, schema_errors)
    n_gen_errors = sum(1 for r in gen_rows if r["error"] and not r["error"].startswith("not generated"))
    if n_gen_errors:
        log.warning("evaluate: %d question(s) failed to generate (scored 0); see generations.jsonl.", n_gen_errors)
    write_jsonl(out / "generations.jsonl", gen_rows)  # before scoring: a run that fails later can be re-scored

    t0 = time.time()
    report = score(split, sql_by_qid, cfg, out)
    maj = majority_at_k(split, questions, samples_sql, gen_rows, cfg, engine.temperature, out) if k > 1 else None
    scoring_s = time.time() - t0
    if maj is not None:
        write_jsonl(out / "generations.jsonl", gen_rows)  # now with each question's vote

    facts = {
        "mode": "endpoint" if cfg.endpoint else "model",
        "source": cfg.endpoint or cfg.model,
        "backend": engine.backend,
        "served_model": served_model or None,
        "prompt_from": prompt_source,
        "greedy": (("a temperature-0 generation in the same engine execution as the samples" if engine.backend == "vllm"
                    else "a separate temperature-0 generation") if k > 1 else f"temperature {engine.temperature}"),
        "samples": k,
        "n_generated": len(greedy),
        "n_generation_errors": n_gen_errors,
        "n_no_sql": sum(1 for r in gen_rows if r["text"] is not None and not r["sql"]),
        "tokens": generation.token_stats([r["tokens"] for r in gen_rows if r["tokens"] is not None]),
        "wall_time_s": {"prompts": round(prompt_s, 3), **gen_s, "scoring": round(scoring_s, 3)},
    }
    report["generation"] = facts
    if maj is not None:
        report["maj_at_k"] = maj
    write_json(out / "report.json", report)
    write_text(out / "report.md", reports.report_markdown(report) + reports.generation_markdown(report))
    write_manifest(
        out, "evaluate", cfg, started,
        inputs={"data": str(split.root), "split": split.name, facts["mode"]: facts["source"],
                "served_model": served_model or None},
        counts={**{key: report[key] for key in COUNT_KEYS},
                "n_generated": facts["n_generated"], "n_generation_errors": n_gen_errors},
        metrics={"ex": report["ex"], "by_difficulty": {d: v["ex"] for d, v in report["by_difficulty"].items()},
                 **({"maj_at_k_ex": maj["ex"], "k": k} if maj else {})},
        generation=facts,
        outputs=list(OUTPUT_FILES) + list(GENERATION_FILES) + ([f"{MAJ_DIR}/"] if maj else []),
    )
    log.info("evaluate: EX %s%% (%d/%d scored)%s -> %s", report["ex"], report["n_correct"], report["n_scored"],
             f", maj@{k} {maj['ex']}%" if maj else "", out)
    return out
