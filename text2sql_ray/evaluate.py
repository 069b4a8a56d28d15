"""`t2s evaluate`: BIRD execution accuracy (EX) of predictions, a model or an endpoint, on a pool of SQLite executor actors.

    t2s evaluate --data <BIRD split dir> --predictions <file> --out <dir> [--limit N] [--strict]
    t2s evaluate --data <dir> --model <dir or name> --out <dir> [--samples K --engine.temperature T]
    t2s evaluate --data <dir> --endpoint http://host:8000/v1 --out <dir> [--engine.concurrency C] [--samples K ...]
    t2s evaluate --compare <run dir A> <run dir B> --out <dir>

``--data`` is a BIRD split or a Spider directory (its ``dev.json``; Spider has no difficulty, so the
report gives the overall EX only). Predictions: the official ``predict_dev.json`` (``{"0": "SQL\\t----- bird -----\\tdb_id"}``) or JSONL
rows ``{"question_id": N, "sql": "..."}``. Scoring follows the official BIRD rule (see sqlexec.py):
a question is correct iff its predicted and gold results are equal as sets of row tuples, under one
budget for the pair. The denominator is every question asked whose database is on disk: a missing
prediction scores 0. Questions whose database file is missing or unreadable (garbage, truncated:
``bird.sqlite_file_problem``) are skipped, counted and named in a loud warning (``--strict`` makes
that an error; when no question is left to score the run fails).

Outputs in ``--out``: ``results.jsonl`` (one row per question, in question order: question_id, db_id,
difficulty, correct, pred_error, gold_error, timed_out, seconds, skipped, missing_prediction,
error_kind, pred_rows, gold_rows, attempts, pred_sql), ``report.json``,
``report.md``, ``ex_by_difficulty.png``, ``predict_dev.json`` (official format, SQL verbatim: it re-scores
to the same results) and ``manifest.json``.

Scoring is ``score(split, sql_by_qid, cfg, out_dir)``; every mode ends in it.

Model mode (``--model``: ``engines.generate`` on Ray Data with ``cfg.engine``, backend 'hf' or 'vllm')
and endpoint mode (``--endpoint``: the engines' 'openai' backend against any OpenAI-compatible
server, e.g. ``t2s serve``; ``engine.model`` names the served model, empty = the first it lists)
build each question's prompt exactly as ``t2s convert`` builds the training prompt
(``prompts.build_messages`` with the ``schema.SchemaCache`` text for ``cfg.prompt`` and
``cfg.tokenizer``). A ``t2s train`` output records the convert run's prompt config and tokenizer
(``t2s serve`` shows it on the model card as ``t2s_prompt``); `resolve_prompt` uses that record by
default, and an option given in the YAML or on the command line that differs from it wins with a
warning (``generation.prompt_from`` in report.json names the record and the overrides). Take ``prompts.extract_sql``
of each answer and score it. Questions whose database file is missing are not generated (they are
skipped in scoring anyway). A failed generation is a missing prediction (0). Extra output:
``generations.jsonl`` (question order: question_id, db_id, text, sql, tokens, error, samples, vote):
``t2s evaluate --predictions <out>/generations.jsonl`` re-scores the greedy answers (a failed
generation then reads as an empty prediction: 0 either way).

``--samples k`` (k > 1, ``engine.temperature`` > 0): self-consistency. Greedy EX comes from a
separate temperature-0 generation, so it equals a plain run's EX; then k samples per question at
``engine.temperature``, each distinct sample SQL executed once on the question's database with its own
budget (``sqlexec.run_checks``, the gold once with its own: a slow gold never removes a vote), and the answer whose
execution result (``sqlexec.result_digest``) is most frequent wins (`majority_vote`: failed
executions do not vote; a tie goes to the result whose first sample came earliest; when no sample
executes, sample 0 stands). The winners are scored like predictions into ``<out>/maj_at_k/`` and
reported beside greedy EX in report.json/report.md (``maj_at_k``: EX, per difficulty, and the
share of questions where any sample was correct).

``--compare A B``: a side-by-side report of two evaluation runs (`reports.run_compare`). The report
figures, report.md, the plots and the comparison live in reports.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from . import bird, reports
from .common import ensure_ray, log, write_json, write_jsonl, write_manifest, write_text
from .config import ConfigError, EngineConfig, EvaluateConfig
from .sqlexec import PairResult, error_kind, run_checks, run_pairs

OUTPUT_FILES = ("results.jsonl", "report.json", "report.md", "ex_by_difficulty.png", "predict_dev.json")


def run(cfg: EvaluateConfig) -> Path:
    """Evaluate predictions, a model or an endpoint against a BIRD split (or compare two runs); returns --out."""
    started = time.time()
    if cfg.compare:
        return reports.run_compare(cfg, started)
    if cfg.model or cfg.endpoint:
        return run_generation(cfg, started)
    if not cfg.predictions:
        raise ConfigError(
            "evaluate needs --predictions FILE "
            '(official predict_dev.json or JSONL rows {"question_id", "sql"}), --model M or --endpoint URL.'
        )
    if cfg.samples != 1:
        raise ConfigError(
            "evaluate --samples > 1 (maj@k) needs --model or --endpoint; drop it with --predictions."
        )
    split = bird.load_split(bird.resolve_data(cfg.data, "dev"), "dev")
    sql_by_qid = bird.read_predictions(cfg.predictions, split.questions)
    out = Path(cfg.out)
    report = score(split, sql_by_qid, cfg, out)
    write_manifest(
        out,
        "evaluate",
        cfg,
        started,
        inputs={"data": str(split.root), "split": split.name, "predictions": str(cfg.predictions)},
        counts={k: report[k] for k in ("n_questions", "n_skipped_missing_db", "n_skipped_unreadable_db", "n_scored", "n_correct")},
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


def unreadable_dbs(split: bird.BirdSplit, questions: list[dict]) -> dict[str, str]:
    """{db_id: what is wrong} for the databases of `questions` whose file is on disk but is not a readable
    SQLite database (garbage, truncated): without this check every gold SQL on it fails and each of its
    questions scores 0 as a "gold error"."""
    out = {}
    for db_id in sorted({q["db_id"] for q in questions}):
        path = split.db_path(db_id)
        problem = bird.sqlite_file_problem(path) if path is not None else ""
        if problem:
            out[db_id] = problem
    return out


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
    broken = unreadable_dbs(split, questions)
    if broken:
        n_broken = sum(1 for q in questions if q["db_id"] in broken)
        detail = "; ".join(broken.values())
        if cfg.strict:
            raise ValueError(f"{n_broken} of {len(questions)} questions cannot be scored: {detail} "
                             "(--strict is on; replace the file(s) with intact copies.)")
        log.warning("SKIPPING %d of %d questions: unreadable database file(s): %s. Replace them with intact "
                    "copies to score these questions; they are counted in report.json (n_skipped_unreadable_db).",
                    n_broken, len(questions), detail)
    n_usable = sum(1 for q in questions if q["db_id"] not in missing and q["db_id"] not in broken)
    if questions and not n_usable:
        raise FileNotFoundError(
            f"none of the {len(questions)} questions can be scored: every one is on a missing or unreadable "
            f"database under {split.db_root}; nothing to evaluate."
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
            "difficulty": q.get("difficulty") or reports.UNLABELLED,
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
        elif q["db_id"] in broken:
            row["skipped"] = f"unreadable database {q['db_id']}"
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

    n_gold_errors = sum(1 for r in rows if r["gold_error"])
    if n_gold_errors:
        log.warning("%d gold SQL(s) failed to execute (each question scores 0); see gold_error in results.jsonl. "
                    "Check the database files and the question file.", n_gold_errors)
    report = reports.build_report(rows, missing, broken)
    report.update(
        dataset=split.dataset,
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
# Model and endpoint modes: prompts -> generations -> SQL -> score (and maj@k)
# --------------------------------------------------------------------------------------------------

GENERATION_FILES = ("generations.jsonl",)
MAJ_DIR = "maj_at_k"


def normalize_endpoint(url: str) -> str:
    """The OpenAI base URL: trailing '/' dropped, '/v1' added when the URL has no path."""
    url = url.strip().rstrip("/")
    if urlparse(url).path in ("", "/"):
        url += "/v1"
    return url


def engine_config(cfg: EvaluateConfig) -> EngineConfig:
    """The engine of a --model / --endpoint run: --model as engine.model ('hf' unless 'vllm' was asked for),
    or --endpoint as an 'openai' engine."""
    if cfg.endpoint:
        return dataclasses.replace(cfg.engine, backend="openai", endpoint=normalize_endpoint(cfg.endpoint))
    backend = cfg.engine.backend if cfg.engine.backend in ("hf", "vllm") else "hf"
    return dataclasses.replace(cfg.engine, backend=backend, model=cfg.model)


def endpoint_prompt(endpoint: str, model_id: str) -> dict | None:
    """The `t2s_prompt` on an endpoint's model card (GET <endpoint>/models/<id>; `t2s serve` puts it there), or None."""
    import urllib.parse
    import urllib.request

    try:
        with urllib.request.urlopen(f"{endpoint}/models/{urllib.parse.quote(model_id, safe='')}", timeout=10) as r:
            card = json.loads(r.read())
    except (OSError, ValueError):
        return None
    record = card.get("t2s_prompt") if isinstance(card, dict) else None
    return record if isinstance(record, dict) and isinstance(record.get("config"), dict) else None


def resolve_prompt(cfg: EvaluateConfig, record: dict | None = None) -> tuple[EvaluateConfig, dict | None]:
    """--model <a `t2s train` output> (or its merged/), or an endpoint whose model card has one (`record`): the
    prompt config and schema-budget tokenizer recorded there, so evaluation builds the prompts training saw.
    An option set in the YAML or on the command line (`--prompt.cot false`, `--tokenizer T`) still wins,
    with a warning when it differs from the record. Returns (the config to use, {manifest, overrides} or
    None when the model records no prompt)."""
    from .config import PromptConfig, given_options
    from .prompts import recorded_prompt

    model = Path(cfg.model) if cfg.model else None
    if record is None and model is not None and model.is_dir():
        record = recorded_prompt(model) or (recorded_prompt(model.parent) if model.name == "merged" else None)
    if record is None:
        return cfg, None
    given = given_options(cfg)
    recorded = PromptConfig(**record["config"])
    prompt_kw, overrides = {}, {}
    for f in dataclasses.fields(PromptConfig):
        mine, theirs = getattr(cfg.prompt, f.name), getattr(recorded, f.name)
        prompt_kw[f.name] = mine if f"prompt.{f.name}" in given else theirs
        if prompt_kw[f.name] != theirs:
            overrides[f"prompt.{f.name}"] = {"given": mine, "recorded": theirs}
    tokenizer = cfg.tokenizer if "tokenizer" in given else record.get("tokenizer", "")
    if tokenizer != record.get("tokenizer", ""):
        overrides["tokenizer"] = {"given": tokenizer, "recorded": record.get("tokenizer", "")}
    log.info("evaluate: prompt config and tokenizer %r recorded in %s (the prompts the model was trained on)",
             record.get("tokenizer", ""), record["manifest"])
    for key, v in overrides.items():
        log.warning("evaluate: --%s %r overrides %r recorded in %s: these prompts differ from the training prompts",
                    key, v["given"], v["recorded"], record["manifest"])
    resolved = dataclasses.replace(cfg, prompt=PromptConfig(**prompt_kw), tokenizer=tokenizer)
    return resolved, {"manifest": record["manifest"], "overrides": overrides}


def question_prompts(split: bird.BirdSplit, questions: list[dict], cfg: EvaluateConfig) -> tuple[list[dict], dict[int, str]]:
    """Chat messages of each question whose database is on disk, exactly as `t2s convert` builds the
    training prompt (without the assistant turn). Returns (rows {question_id, messages}, {question_id: error}
    for questions whose schema cannot be read)."""
    from .prompts import build_messages
    from .schema import NoSchemaError, SchemaCache

    tokenizer = None
    if cfg.tokenizer:
        from .models import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
    cache = SchemaCache.from_split(split, cfg.prompt, tokenizer)
    rows, errors = [], {}
    for q in questions:
        if split.db_path(q["db_id"]) is None:
            continue
        try:
            schema = cache.get(str(q["db_id"]))
        except NoSchemaError as e:
            errors[q["question_id"]] = f"no schema: {e}"
            continue
        messages = build_messages(schema, str(q.get("question") or ""), str(q.get("evidence") or ""), cfg.prompt)
        rows.append({"question_id": int(q["question_id"]), "messages": messages})
    return rows, errors


def generate_rows(rows: list[dict], engine: EngineConfig, n: int) -> dict[int, dict]:
    """{question_id: {texts, tokens, error}} for the rows, through `engines.generate` on Ray Data."""
    import ray

    from .engines import generate

    if not rows:
        return {}
    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    try:
        blocks = max(1, min(len(rows), math.ceil(len(rows) / engine.batch_size)))
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        out = generate(ds, engine, n=n).select_columns(["question_id", "generations", "gen_tokens", "gen_error"])
        got = out.take_all()
    finally:
        ctx.enable_progress_bars = bars
    return {
        int(r["question_id"]): {
            "texts": [str(t) for t in r["generations"]],
            "tokens": [int(t) for t in r["gen_tokens"]],
            "error": r["gen_error"] or "",
        }
        for r in got
    }


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


def vote_questions(
    split: bird.BirdSplit, questions: list[dict], samples_sql: dict[int, list[str]], cfg: EvaluateConfig
) -> dict[int, dict]:
    """Execute the samples' SQL on its question's database and vote (`sqlexec.run_checks`: each distinct
    SQL once with its own budget, the gold once with its own, so a slow gold never removes a vote).

    Returns {question_id: {winner, sql, votes, executed, distinct, correct: [per sample]}} for the
    questions with samples and a database on disk.
    """
    items, owners = [], []
    for q in questions:
        qid = q["question_id"]
        db = split.db_path(q["db_id"])
        if db is None or not samples_sql.get(qid):
            continue
        items.append((str(db), samples_sql[qid], q["SQL"]))
        owners.append(qid)
    results = run_checks(items, num_actors=cfg.num_actors, timeout_s=cfg.timeout_s, max_rows=cfg.max_rows) if items else []
    out = {}
    for qid, rs in zip(owners, results):
        digests = [r.pred_digest if not r.pred_error and not r.timed_out else None for r in rs]
        winner = majority_vote(digests)
        pick = 0 if winner is None else winner
        votes = Counter(d for d in digests if d is not None)
        out[qid] = {
            "winner": winner,
            "sql": samples_sql[qid][pick],
            "votes": votes[digests[pick]] if winner is not None else 0,
            "executed": sum(1 for d in digests if d is not None),
            "distinct": len(votes),
            "correct": [bool(r.correct) for r in rs],
        }
    return out


def _token_stats(counts: list[int]) -> dict:
    counts = [c for c in counts if c >= 0]
    if not counts:
        return {"n": 0}
    return {"n": len(counts), "total": sum(counts), "mean": round(sum(counts) / len(counts), 1), "max": max(counts)}


def run_generation(cfg: EvaluateConfig, started: float | None = None) -> Path:
    """--model / --endpoint: generate (greedy, plus k samples with --samples k), extract SQL, score, vote."""
    from .prompts import extract_sql

    started = started or time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    split = bird.load_split(bird.resolve_data(cfg.data, "dev"), "dev")
    questions = select_questions(split, cfg.limit)
    engine = engine_config(cfg)
    served_model = ""
    if engine.backend == "openai":
        from .engines import resolve_openai_model

        served_model = resolve_openai_model(engine)  # fails fast when the endpoint is down
        engine = dataclasses.replace(engine, model=served_model)
    cfg, prompt_source = resolve_prompt(cfg, endpoint_prompt(engine.endpoint, served_model) if served_model else None)
    k = cfg.samples
    greedy_engine = dataclasses.replace(engine, temperature=0.0) if k > 1 else engine

    t0 = time.time()
    rows, schema_errors = question_prompts(split, questions, cfg)
    prompt_s = time.time() - t0
    log.info(
        "evaluate: generating for %d of %d questions with %s (%s)%s",
        len(rows), len(questions), cfg.endpoint or cfg.model, engine.backend,
        f", then {k} samples each at temperature {engine.temperature}" if k > 1 else "",
    )
    t0 = time.time()
    greedy = generate_rows(rows, greedy_engine, 1)
    greedy_s = time.time() - t0
    t0 = time.time()
    sampled = generate_rows(rows, engine, k) if k > 1 else {}
    sampling_s = time.time() - t0

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
            row["samples"] = [
                {"text": t, "sql": extract_sql(t), "tokens": c} for t, c in zip(s["texts"], s["tokens"])
            ]
            if row["samples"]:
                samples_sql[qid] = [x["sql"] for x in row["samples"]]
        gen_rows.append(row)
    n_gen_errors = sum(1 for r in gen_rows if r["error"] and not r["error"].startswith("not generated"))
    if n_gen_errors:
        log.warning("evaluate: %d question(s) failed to generate (scored 0); see generations.jsonl.", n_gen_errors)

    write_jsonl(out / "generations.jsonl", gen_rows)  # before scoring: a run that fails later can be re-scored
    t0 = time.time()
    report = score(split, sql_by_qid, cfg, out)
    maj = None
    if k > 1:
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
        maj = {
            "k": k,
            "temperature": engine.temperature,
            "ex": maj_report["ex"],
            "n_correct": maj_report["n_correct"],
            "n_scored": maj_report["n_scored"],
            "by_difficulty": {d: v["ex"] for d, v in maj_report["by_difficulty"].items()},
            "any_sample_correct_ex": reports.ex_percent(any_correct, maj_report["n_scored"]),
            "mean_sample_ex": reports.ex_percent(sum(sample_hits), len(sample_hits)) if sample_hits else None,
            "n_no_sample_executed": sum(1 for v in votes.values() if v["winner"] is None),
            "dir": MAJ_DIR,
        }
    scoring_s = time.time() - t0
    if maj is not None:
        write_jsonl(out / "generations.jsonl", gen_rows)  # now with each question's vote

    generation = {
        "mode": "endpoint" if cfg.endpoint else "model",
        "source": cfg.endpoint or cfg.model,
        "backend": engine.backend,
        "served_model": served_model or None,
        "prompt_from": prompt_source,
        "greedy": "a separate temperature-0 generation" if k > 1 else f"temperature {engine.temperature}",
        "samples": k,
        "n_generated": len(greedy),
        "n_generation_errors": n_gen_errors,
        "n_no_sql": sum(1 for r in gen_rows if r["text"] is not None and not r["sql"]),
        "tokens": _token_stats([r["tokens"] for r in gen_rows if r["tokens"] is not None]),
        "wall_time_s": {"prompts": round(prompt_s, 3), "greedy": round(greedy_s, 3),
                        "sampling": round(sampling_s, 3), "scoring": round(scoring_s, 3)},
    }
    report["generation"] = generation
    if maj is not None:
        report["maj_at_k"] = maj
    write_json(out / "report.json", report)
    write_text(out / "report.md", reports.report_markdown(report) + reports.generation_markdown(report))
    outputs = list(OUTPUT_FILES) + list(GENERATION_FILES) + ([f"{MAJ_DIR}/"] if maj else [])
    write_manifest(
        out,
        "evaluate",
        cfg,
        started,
        inputs={"data": str(split.root), "split": split.name, generation["mode"]: generation["source"],
                "served_model": served_model or None},
        counts={**{key: report[key] for key in ("n_questions", "n_skipped_missing_db", "n_skipped_unreadable_db", "n_scored", "n_correct")},
                "n_generated": generation["n_generated"], "n_generation_errors": n_gen_errors},
        metrics={
            "ex": report["ex"],
            "by_difficulty": {d: v["ex"] for d, v in report["by_difficulty"].items()},
            **({"maj_at_k_ex": maj["ex"], "k": k} if maj else {}),
        },
        generation=generation,
        outputs=outputs,
    )
    log.info("evaluate: EX %s%% (%d/%d scored)%s -> %s", report["ex"], report["n_correct"], report["n_scored"],
             f", maj@{k} {maj['ex']}%" if maj else "", out)
    return out


# --------------------------------------------------------------------------------------------------
# --compare A B
# --------------------------------------------------------------------------------------------------


