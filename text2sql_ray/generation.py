"""Evaluate's model and endpoint modes up to the answers: the engine, the training prompts, generation.

`engine_config` turns ``--model`` / ``--endpoint`` into an `EngineConfig` (an endpoint is the engines'
'openai' backend; ``normalize_endpoint`` adds ``/v1``). `resolve_prompt` takes the prompt config and
schema-budget tokenizer that a `t2s train` output records (or an endpoint's model card, `endpoint_prompt`,
as `t2s serve` shows it), so `question_prompts` builds each question's chat messages exactly as
`t2s convert` built the training prompt; an option given in the YAML or on the command line that
differs from the record wins, with a warning. `generate_rows` runs `engines.generate` on Ray Data;
`greedy_and_samples` gets maj@k's greedy answer and samples (one execution with vllm).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from urllib.parse import urlparse

from . import bird
from .common import ensure_ray, log
from .config import EngineConfig, EvaluateConfig


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


def generate_rows(rows: list[dict], engine: EngineConfig, n: int, greedy: bool = False) -> dict[int, dict]:
    """{question_id: {texts, tokens, error}} for the rows, through `engines.generate` on Ray Data; with
    greedy=True (vllm) each value also holds "greedy": the row's temperature-0 {texts, tokens, error} from
    the same execution."""
    import ray

    from .engines import GREEDY_COLUMNS, generate

    if not rows:
        return {}
    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    columns = ["question_id", "generations", "gen_tokens", "gen_error"] + (list(GREEDY_COLUMNS) if greedy else [])
    try:
        blocks = max(1, min(len(rows), math.ceil(len(rows) / engine.batch_size)))
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        got = generate(ds, engine, n=n, greedy=greedy).select_columns(columns).take_all()
    finally:
        ctx.enable_progress_bars = bars
    def one(texts, tokens, error) -> dict:
        return {"texts": [str(t) for t in texts], "tokens": [int(t) for t in tokens], "error": error or ""}

    out = {}
    for r in got:
        out[int(r["question_id"])] = one(r["generations"], r["gen_tokens"], r["gen_error"])
        if greedy:
            out[int(r["question_id"])]["greedy"] = one(r["greedy_generations"], r["greedy_tokens"], r["greedy_error"])
    return out


def greedy_and_samples(rows: list[dict], engine: EngineConfig, k: int) -> tuple[dict[int, dict], dict[int, dict], dict]:
    """Self-consistency's inputs: each row's temperature-0 answer and its k samples at `engine.temperature`, as
    two `generate_rows` results, and the wall seconds. vllm: one Ray Data execution (each row's greedy
    generation is one more sample row with its own sampling params: one engine start, not two); hf and openai:
    a greedy pass, then a sampled pass."""
    import time

    t0 = time.time()
    if engine.backend == "vllm":
        both = generate_rows(rows, engine, k, greedy=True)
        greedy = {qid: v.pop("greedy") for qid, v in both.items()}
        return greedy, both, {"greedy_and_sampling": round(time.time() - t0, 3)}
    greedy = generate_rows(rows, dataclasses.replace(engine, temperature=0.0), 1)
    t1 = time.time()
    sampled = generate_rows(rows, engine, k)
    return greedy, sampled, {"greedy": round(t1 - t0, 3), "sampling": round(time.time() - t1, 3)}


def token_stats(counts: list[int]) -> dict:
    counts = [c for c in counts if c >= 0]
    if not counts:
        return {"n": 0}
    return {"n": len(counts), "total": sum(counts), "mean": round(sum(counts) / len(counts), 1), "max": max(counts)}
