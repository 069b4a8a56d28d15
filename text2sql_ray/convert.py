"""`t2s convert`: a BIRD split -> conversation rows (Parquet), split into train/validation by database.

    t2s convert --data <BIRD split dir> --out <dir> [--limit N] [--tokenizer DIR] [--jsonl]

Reads the split's questions into Ray Data, builds each question's chat messages (the one template of
`prompts.py`, schema text from `schema.py`) in `map_batches` on actors that hold a per-database
schema cache, and writes, sorted by question_id (byte-identical for the same input):

* ``train.parquet`` / ``validation.parquet`` (a training split, train.json): ``question_id, db_id, question,
  evidence, gold_sql, difficulty, messages, prompt_tokens``. ``messages`` is a list of ``{role, content}``:
  system, user, and the assistant turn holding the gold SQL (the synthesize stage replaces it with a
  verified chain of thought when ``prompt.cot`` is on). Validation holds ``val_fraction`` of the
  databases (seeded).
* ``<split>.parquet`` instead (an evaluation split: dev.json -> ``dev.parquet``, test.json ->
  ``test.parquet``): every usable question in one file, the same columns; an evaluation split is never
  cut into train/validation unless ``split_eval`` asks for it.
* ``rejected.parquet``: rows that cannot be used, each with its ``reason`` (gold SQL that sqlglot cannot
  parse as one SQLite query; a db_id with no schema in the SQLite file or tables.json).
* ``manifest.json``: ``prompt`` (the prompt config and the schema-budget tokenizer: train carries it into
  its output for evaluate and serve), counts per split (every input row is in exactly one file), prompt-token stats,
  schema trimming counts, wall time split into Ray start-up and conversion.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from pathlib import Path

from . import bird
from .common import ensure_ray, log, write_jsonl, write_manifest, write_parquet
from .config import ConvertConfig, PromptConfig
from .prompts import build_messages, prompt_record
from .schema import NoSchemaError, SchemaCache, count_tokens

SPLITS = ("train", "validation", "rejected")


def is_evaluation_split(name: str) -> bool:
    """dev.json / test.json (also dev_*, *_dev, test_*, *_test): questions to evaluate on, never cut into
    train/validation by default. Any other split (train.json, ...) is training data."""
    return name in ("dev", "test") or name.startswith(("dev_", "test_")) or name.endswith(("_dev", "_test"))


def output_schema():
    """Arrow schema of train/validation.parquet."""
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.schema([
        ("question_id", pa.int64()), ("db_id", pa.string()), ("question", pa.string()), ("evidence", pa.string()),
        ("gold_sql", pa.string()), ("difficulty", pa.string()), ("messages", pa.list_(message)),
        ("prompt_tokens", pa.int64()),
    ])


def rejected_schema():
    """Arrow schema of rejected.parquet."""
    import pyarrow as pa

    return pa.schema([
        ("question_id", pa.int64()), ("db_id", pa.string()), ("question", pa.string()), ("evidence", pa.string()),
        ("gold_sql", pa.string()), ("difficulty", pa.string()), ("reason", pa.string()),
    ])


def _work_schema():
    """What the map stage returns: output columns plus the split, the reason and schema facts for the manifest."""
    import pyarrow as pa

    extra = [("split", pa.string()), ("reason", pa.string()), ("schema_source", pa.string()),
             ("schema_tokens", pa.int64()), ("schema_trimmed", pa.list_(pa.string()))]
    return pa.schema(list(output_schema()) + [pa.field(n, t) for n, t in extra])


# --------------------------------------------------------------------------------------------------
# Row logic (pure, tested without Ray)
# --------------------------------------------------------------------------------------------------


def gold_sql_problem(sql: str) -> str:
    """'' when `sql` parses with sqlglot as exactly one SQLite query, else why not."""
    import sqlglot
    from sqlglot import expressions as exp
    from sqlglot.errors import ParseError, TokenError

    if not (sql or "").strip():
        return "gold SQL is empty"
    try:
        statements = [s for s in sqlglot.parse(sql, read="sqlite") if s is not None]
    except (ParseError, TokenError) as e:
        return "sqlglot cannot parse it as SQLite: " + " ".join(str(e).split())[:300]
    if len(statements) != 1:
        return f"it holds {len(statements)} statements, not one"
    if not isinstance(statements[0], exp.Query):
        return f"it is not a query (sqlglot reads it as {type(statements[0]).__name__})"
    return ""


def validation_dbs(db_ids: list[str], val_fraction: float, seed: int) -> list[str]:
    """The databases held out for validation: round(val_fraction * n) of them (at least 1 when
    val_fraction > 0 and there are >= 2 databases, never all), drawn with `seed`; sorted."""
    dbs = sorted(set(db_ids))
    if val_fraction <= 0 or len(dbs) < 2:
        return []
    k = min(max(1, round(val_fraction * len(dbs))), len(dbs) - 1)
    return sorted(random.Random(seed).sample(dbs, k))


def convert_row(q: dict, cache: SchemaCache, cfg: PromptConfig, val_dbs: set[str]) -> dict:
    """One question -> an output row with `split` ('train', 'validation' or 'rejected') and `reason`."""
    sql = str(q.get("SQL") or "")
    row = {
        "question_id": int(q["question_id"]),
        "db_id": str(q["db_id"]),
        "question": str(q.get("question") or ""),
        "evidence": str(q.get("evidence") or ""),
        "gold_sql": sql,
        "difficulty": q.get("difficulty") or None,
        "messages": None,
        "prompt_tokens": None,
        "split": "rejected",
        "reason": "",
        "schema_source": None,
        "schema_tokens": None,
        "schema_trimmed": None,
    }
    reasons = []
    schema = None
    try:
        schema = cache.get(row["db_id"])
    except NoSchemaError as e:
        reasons.append(f"no_schema: {e}")
    problem = gold_sql_problem(sql)
    if problem:
        reasons.append(f"gold_sql: {problem}")
    if reasons:
        row["reason"] = "; ".join(reasons)
        return row
    row["messages"] = build_messages(schema, row["question"], row["evidence"], cfg, answer=sql)
    row["split"] = "validation" if row["db_id"] in val_dbs else "train"
    row["schema_source"] = schema.source
    row["schema_tokens"] = schema.n_tokens
    row["schema_trimmed"] = list(schema.trimmed)
    return row


def prompt_token_counts(conversations: list[list[dict]], tokenizer=None) -> list[int]:
    """Tokens of each prompt (system + user, with the generation prompt): chat template + tokenizer, else chars/4."""
    prompts = [[m for m in conv if m["role"] != "assistant"] for conv in conversations]
    if tokenizer is None:
        return [count_tokens("\n\n".join(m["content"] for m in p)) for p in prompts]
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
        enc = tokenizer(texts, add_special_tokens=False)
    else:
        enc = tokenizer(["\n\n".join(m["content"] for m in p) for p in prompts])
    return [len(ids) for ids in enc["input_ids"]]


class Converter:
    """The map_batches worker: a schema cache (one build per database) and, optionally, a tokenizer."""

    def __init__(self, data_dir: str, prompt: PromptConfig, tokenizer: str, val_dbs: list[str]):
        self.tokenizer = None
        if tokenizer:
            from .models import load_tokenizer

            self.tokenizer = load_tokenizer(tokenizer)
        self.cfg = prompt
        # Only the path travels to the worker (small constructor arguments); it reads tables.json itself.
        self.cache = SchemaCache.from_split(bird.load_split(data_dir), prompt, self.tokenizer)
        self.val_dbs = set(val_dbs)

    def __call__(self, batch):
        import pyarrow as pa

        rows = [convert_row(q, self.cache, self.cfg, self.val_dbs) for q in batch.to_pylist()]
        ok = [r for r in rows if r["messages"] is not None]
        for r, n in zip(ok, prompt_token_counts([r["messages"] for r in ok], self.tokenizer)):
            r["prompt_tokens"] = n
        return pa.Table.from_pylist(rows, schema=_work_schema())


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def _stats(values: list[int]) -> dict:
    if not values:
        return {"n": 0}
    s = sorted(values)
    return {
        "n": len(s),
        "median": round(float(statistics.median(s)), 1),
        "p95": s[min(len(s) - 1, math.ceil(0.95 * len(s)) - 1)],
        "max": s[-1],
        "mean": round(sum(s) / len(s), 1),
    }


def _input_rows(questions: list[dict]) -> list[dict]:
    keep = ("question_id", "db_id", "question", "evidence", "SQL", "difficulty")
    return [{k: (q.get(k) if k == "question_id" else str(q.get(k) or "")) for k in keep} for q in questions]


def write_splits(out: Path, rows: list[dict], jsonl: bool = False,
                 kept: tuple[str, ...] = ("train", "validation")) -> dict[str, str]:
    """<kept>.parquet + rejected.parquet (+ .jsonl) from converted rows, sorted by question_id; file names by split.

    `kept` names the files of usable rows: ("train", "validation"), or (<split name>,) for an evaluation split."""
    import pyarrow as pa

    out = Path(out)
    rows = sorted(rows, key=lambda r: r["question_id"])
    names = (*kept, "rejected")
    by_split = {s: [r for r in rows if r["split"] == s] for s in names}
    files = {}
    columns, rejected_columns = output_schema().names, rejected_schema().names
    for name in kept:
        table = pa.Table.from_pylist([{c: r[c] for c in columns} for r in by_split[name]], schema=output_schema())
        files[name] = write_parquet(out / f"{name}.parquet", table).name
    rejected = [{c: r[c] for c in rejected_columns} for r in by_split["rejected"]]
    files["rejected"] = write_parquet(out / "rejected.parquet", pa.Table.from_pylist(rejected, schema=rejected_schema())).name
    if jsonl:
        for name in kept:
            write_jsonl(out / f"{name}.jsonl", ({c: r[c] for c in columns} for r in by_split[name]))
        write_jsonl(out / "rejected.jsonl", rejected)
        files.update({f"{n}_jsonl": f"{n}.jsonl" for n in names})
    return files


def remove_stale_outputs(out: Path, files: dict[str, str]) -> list[str]:
    """Delete the files an earlier convert into `out` listed in its manifest that this run did not write
    (a train.parquet left beside a new dev.parquet would be read by synthesize); returns their names."""
    from .common import read_manifest

    before = (read_manifest(out) or {}).get("files") or {}
    stale = sorted({name for name in before.values() if isinstance(name, str)} - set(files.values()))
    for name in stale:
        if "/" not in name and (out / name).is_file():
            (out / name).unlink()
    return stale


def run(cfg: ConvertConfig) -> Path:
    import ray
    from tqdm import tqdm

    started = time.time()
    data_dir = Path(bird.resolve_data(cfg.data, "train")).resolve()
    split = bird.load_split(data_dir, "train")  # a Spider dir holds train and dev: convert reads train
    questions = split.questions[: cfg.limit] if cfg.limit else split.questions
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    db_ids = sorted({q["db_id"] for q in questions})
    with_schema = [d for d in db_ids if split.db_path(d) is not None or d in split.tables]
    # An evaluation split stays whole (one file to evaluate on); only training data is cut by database.
    whole = is_evaluation_split(split.name) and not cfg.split_eval
    kept = (split.name,) if whole else ("train", "validation")
    val = [] if whole else validation_dbs(with_schema, cfg.val_fraction, cfg.seed)
    if whole:
        log.info("convert: %s is an evaluation split: all its questions go to %s.parquet (no train/validation "
                 "split; --split-eval true asks for one)", split.name, split.name)
    in_tables = [d for d in db_ids if d in split.tables]
    without_sqlite = [d for d in db_ids if split.db_path(d) is None]
    tables_file = "tables.json" if split.dataset == "spider" else f"{split.name}_tables.json"
    log.info("convert: %d %s questions over %d databases from %s (%d with a SQLite file, %d in %s); "
             "validation databases: %s", len(questions), split.dataset, len(db_ids), data_dir,
             len(db_ids) - len(without_sqlite), len(in_tables), tables_file, ", ".join(val) or "none")
    if without_sqlite:
        log.info("convert: no SQLite file for %d database(s) (their schema comes from %s, without sample values): %s",
                 len(without_sqlite), tables_file, ", ".join(without_sqlite))

    t_ray = time.time()
    ensure_ray()
    ray_start_s = time.time() - t_ray

    t_conv = time.time()
    rows: list[dict] = []
    if questions:
        workers = cfg.workers or max(1, _cpu_count())
        n_blocks = max(1, math.ceil(len(questions) / cfg.batch_size))
        workers = min(workers, n_blocks)
        # Our bar below counts questions; Ray Data's own progress output is off for this dataset (the
        # context is captured when the dataset is created, so it is switched before and restored after).
        ctx = ray.data.DataContext.get_current()
        ray_bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False
        try:
            ds = ray.data.from_items(_input_rows(questions), override_num_blocks=n_blocks)
            ds = ds.map_batches(
                Converter,
                fn_constructor_kwargs={"data_dir": str(data_dir), "prompt": cfg.prompt, "tokenizer": cfg.tokenizer,
                                       "val_dbs": val},
                batch_size=cfg.batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=cfg.num_cpus,
            )
            with tqdm(total=len(questions), desc="convert", unit="q", mininterval=1.0) as bar:
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    rows.extend(batch.to_pylist())
                    bar.update(batch.num_rows)
        finally:
            ctx.enable_progress_bars = ray_bars
    convert_s = time.time() - t_conv

    t_write = time.time()
    rows.sort(key=lambda r: r["question_id"])
    if len(rows) != len(questions) or {r["question_id"] for r in rows} != {q["question_id"] for q in questions}:
        raise RuntimeError(f"convert lost rows: {len(questions)} in, {len(rows)} out; this is a bug, please report it.")
    if whole:
        for r in rows:
            if r["split"] == "train":
                r["split"] = split.name
    names = (*kept, "rejected")
    by_split = {s: [r for r in rows if r["split"] == s] for s in names}
    files = write_splits(out, rows, cfg.jsonl, kept)
    stale = remove_stale_outputs(out, files)
    if stale:
        log.info("convert: removed %s left in %s by an earlier convert", ", ".join(stale), out)
    write_s = time.time() - t_write

    usable = [r for name in kept for r in by_split[name]]
    reason_counts: dict[str, int] = {}
    for r in by_split["rejected"]:
        for part in r["reason"].split("; "):
            kind = part.split(":", 1)[0]
            if kind in ("no_schema", "gold_sql"):
                reason_counts[kind] = reason_counts.get(kind, 0) + 1
    schema_by_db = {r["db_id"]: r for r in usable}
    trimmed_dbs: dict[str, int] = {}
    trimmed_rows: dict[str, int] = {}
    for r in usable:
        for kind in r["schema_trimmed"] or []:
            trimmed_rows[kind] = trimmed_rows.get(kind, 0) + 1
    for r in schema_by_db.values():
        for kind in r["schema_trimmed"] or []:
            trimmed_dbs[kind] = trimmed_dbs.get(kind, 0) + 1
    sources: dict[str, int] = {}
    for r in schema_by_db.values():
        sources[r["schema_source"]] = sources.get(r["schema_source"], 0) + 1
    counts = {"input": len(questions), **{s: len(by_split[s]) for s in names}}
    manifest_path = write_manifest(
        out, "convert", cfg, started,
        data_dir=str(data_dir),
        dataset=split.dataset,
        split_name=split.name,
        prompt=prompt_record(cfg.prompt, cfg.tokenizer),
        counts=counts,
        rejected_reasons=reason_counts,
        databases={
            "input": len(db_ids),
            **{name: len({r["db_id"] for r in by_split[name]}) for name in kept},
            "validation_db_ids": val,
            "without_sqlite": without_sqlite,
            "no_schema": sorted({r["db_id"] for r in by_split["rejected"] if r["reason"].startswith("no_schema")}),
        },
        schema={
            "sources_dbs": dict(sorted(sources.items())),
            "trimmed_dbs": dict(sorted(trimmed_dbs.items())),
            "trimmed_rows": dict(sorted(trimmed_rows.items())),
            "tokens": _stats([r["schema_tokens"] for r in schema_by_db.values()]),
            "budget": cfg.prompt.max_schema_tokens,
        },
        prompt_tokens={
            "counted_with": f"tokenizer {cfg.tokenizer}" if cfg.tokenizer else "chars/4",
            "all": _stats([r["prompt_tokens"] for r in usable]),
            **{name: _stats([r["prompt_tokens"] for r in by_split[name]]) for name in kept},
        },
        evaluation_split=whole,
        files=files,
        timing={"ray_start_s": round(ray_start_s, 3), "convert_s": round(convert_s, 3), "write_s": round(write_s, 3),
                "workers": workers if questions else 0},
    )
    log.info("convert: %s -> %s (%s; Ray start %.1f s, conversion %.1f s)", counts["input"], out,
             ", ".join(f"{name} {counts[name]}" for name in names), ray_start_s, convert_s)
    log.info("convert: manifest %s", manifest_path)
    return out


def _cpu_count() -> int:
    from .common import available_cpus

    return available_cpus()
