"""Generation engines: batches of chat messages -> text, with one of three backends chosen by `EngineConfig`.

    generate(ds, cfg, n=1, messages_column="messages", key_column="question_id") -> ray.data.Dataset
        adds to every row, keeping all other columns and the row count:
          generations  list[str]  the n sampled texts (fewer only if gen_error is set)
          gen_tokens   list[int]  tokens generated per sample (stop token included; see OpenAIGenerator)
          gen_error    str        "" if the row generated, else what went wrong (the row is kept)
        Row order is not preserved (as for any Ray Data map); carry a key column.
        With greedy=True (vllm backend) also, from the same execution (one engine start, one batch stream):
          greedy_generations / greedy_tokens / greedy_error   one temperature-0 text per row, as n=1 greedy gives

    generate_messages(messages_list, cfg, n=1) -> list[list[str]]    one process, no Ray (benchmarks, baselines)
    HFGenerator(cfg) / OpenAIGenerator(cfg)                          the per-worker objects; Serve reuses them
        .generate(messages_list, n, keys) -> list[Generation]; .generate_messages(messages_list, n)

Backends:
- 'hf': transformers `generate` in a Ray Data actor pool (`cfg.concurrency` actors, `cfg.num_cpus` /
  `cfg.num_gpus` each), batches of `cfg.batch_size` prompts; with `cfg.prefix_cache` prompts of a batch sharing a long prefix
  (one database's schema, a question's k samples) prefill it once into a KV cache (`prefix_groups`,
  `cfg.prefix_cache`): on 2 CPU cores prefill is nearly all of an evaluation's time.
- 'openai': any OpenAI-compatible endpoint, `cfg.concurrency` requests in flight, retries, timeouts.
- 'vllm': `ray.data.llm` (`vLLMEngineProcessorConfig` + `build_processor`), GPU only; vllm itself is
  imported by Ray's engine actors, never by this module. The engine gets our prompt token ids
  (`prompt_token_ids`), not Ray's chat-template + tokenize stages.

All three share the row logic: `normalize_messages` (the input check: a bad row becomes a `gen_error`,
never a crash), `sample_seed` (per-sample seeds) and `Generation` (the per-row outcome); 'hf' and
'vllm' share `chat_prompt` / `prompt_token_ids` (the ids training uses: one BOS, whatever the
template). Prompts are built upstream; engines do not parse SQL.

Seeds: sample j of a row uses `sample_seed(cfg.seed, key, j)`, where key is the row's `key_column`
value (or, if the column is absent, the row's messages). 'hf' samples every sequence from its own
torch generator (see `_PerRowSampler`), so a row's samples do not depend on which rows share its batch
(up to float differences from padding); 'openai' sends the seed as the request's `seed`; 'vllm' puts it
in the row's `SamplingParams.seed`. Temperature 0 is greedy: one sequence per row, repeated n times.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from .config import EngineConfig

OUTPUT_COLUMNS = ("generations", "gen_tokens", "gen_error")
GREEDY_COLUMNS = ("greedy_generations", "greedy_tokens", "greedy_error")
_GREEDY_SAMPLE = -1
"""The sample index of the extra temperature-0 row of `generate(..., greedy=True)` (samples are 0..n-1)."""


@dataclass
class Generation:
    """One row's outcome: its texts and token counts, or the error that stopped it."""

    texts: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    error: str = ""


@dataclass(frozen=True)
class Sampling:
    """The sampling settings of one `HFGenerator.generate` / `stream` call (Serve sets them per request);
    a call without one uses the generator's `EngineConfig`."""

    temperature: float
    """0 = greedy."""
    top_p: float
    max_new_tokens: int


class GenerationError(RuntimeError):
    """A generation failed in `generate_messages` (which returns texts only, so it raises)."""


# --------------------------------------------------------------------------------------------------
# Row logic shared by all backends (pure)
# --------------------------------------------------------------------------------------------------


def normalize_messages(messages: Any) -> list[dict[str, str]]:
    """A chat as a list of {'role', 'content'} dicts of strings; ValueError saying what is wrong otherwise.

    Accepts what Ray Data hands over (numpy arrays of dicts, extra keys, which are dropped).
    """
    if hasattr(messages, "tolist") and not isinstance(messages, (str, bytes)):
        messages = messages.tolist()
    if not isinstance(messages, (list, tuple)) or not messages:
        shown = repr(messages)[:80]
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {shown}")
    out = []
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"message {k} is a {type(msg).__name__}, not a {{'role', 'content'}} dict")  # noqa: TRY004
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {k} has no role")
        if not isinstance(content, str):
            raise ValueError(f"message {k} ({role}) has no text content (got {type(content).__name__})")  # noqa: TRY004
        out.append({"role": role, "content": content})
    return out


def row_key(key: Any, messages: Any) -> str:
    """The string a row's seeds derive from: its key column value, else its messages."""
    if key is not None:
        return str(key)
    try:
        return json.dumps(normalize_messages(messages), sort_keys=True, ensure_ascii=False)
    except ValueError:
        return repr(messages)


def sample_seed(seed: int, key: str, j: int) -> int:
    """Seed of sample j of the row with this key (31 bits: every server and engine accepts it)."""
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{j}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**31 - 1)


def split_total(total: int, k: int) -> list[int]:
    """`total` spread over k samples (sums to total): per-sample counts when a server reports only a sum."""
    if k <= 0:
        return []
    base, extra = divmod(int(total), k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The chat-templated text a generation continues (the template's generation prompt included)."""
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def prompt_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The token ids every engine feeds the model for a chat: `chat_prompt` tokenized with add_special_tokens=False.

    The chat template already writes the special tokens it wants (Llama 3's `<|begin_of_text|>`), so
    tokenizing its text with add_special_tokens=True would add a second BOS. These are the ids
    `train.tokenize_conversation` puts before an answer, the ids the hf engine generates from, and the
    ids the vllm backend sends (`tokenized_prompt`; Ray 2.60's own ray.data.llm TokenizeStage calls
    the tokenizer with its default add_special_tokens=True, so it is switched off).
    """
    return list(tokenizer(chat_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"])


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:2000]


def _generations_table(table, results: list[Generation]):
    """`table` (pyarrow) with the three output columns set from `results` (row-aligned)."""
    import pyarrow as pa

    for name in OUTPUT_COLUMNS:
        if name in table.column_names:
            table = table.drop_columns([name])
    table = table.append_column(
        "generations", pa.array([r.texts for r in results], type=pa.list_(pa.string()))
    )
    table = table.append_column(
        "gen_tokens", pa.array([r.tokens for r in results], type=pa.list_(pa.int64()))
    )
    return table.append_column("gen_error", pa.array([r.error for r in results], type=pa.string()))


def _table_inputs(table, messages_column: str, key_column: str | None) -> tuple[list, list]:
    if messages_column not in table.column_names:
        raise ValueError(
            f"generation input has no column {messages_column!r} (columns: {table.column_names}); "
            "pass messages_column= naming the chat messages column."
        )
    messages = table.column(messages_column).to_pylist()
    if key_column and key_column in table.column_names:
        keys = table.column(key_column).to_pylist()
    else:
        keys = [None] * len(messages)
    return messages, keys


def _texts_or_raise(results: list[Generation]) -> list[list[str]]:
    for i, r in enumerate(results):
        if r.error:
            raise GenerationError(f"generation {i} failed: {r.error}")
    return [r.texts for r in results]


# --------------------------------------------------------------------------------------------------
# Backend 'hf': transformers
# --------------------------------------------------------------------------------------------------


MIN_SHARED_PREFIX = 64
"""Tokens two prompts must share before the hf engine computes their common prefix once (`prefix_groups`)."""


def prefix_groups(ids: list[list[int]], min_prefix: int = MIN_SHARED_PREFIX) -> list[tuple[list[int], int]]:
    """Rows of one batch -> [(row indices, shared prefix length)] (pure): rows whose prompts begin with the same
    ids (a database's schema, the same question sampled k times) form a group whose prefix runs once; a group's
    prefix is at most its shortest prompt minus one token, and a row joins a group of two or more only if that
    keeps at least 3/4 of the group's prefix. Rows sharing nothing long go together in one last group with
    prefix 0 (a plain left-padded batch). Every index appears once.

    >>> prefix_groups([[1, 2, 3, 9], [5, 6], [1, 2, 3, 8]], min_prefix=2)
    [([0, 2], 3), ([1], 0)]
    """
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    groups: list[tuple[list[int], int]] = []
    loose: list[int] = []
    for i in order:
        if groups:
            members, prefix = groups[-1]
            first = ids[members[0]]
            shared = next((k for k, (a, b) in enumerate(zip(first, ids[i])) if a != b), min(len(first), len(ids[i])))
            shared = min(shared, prefix, len(ids[i]) - 1)
            if shared >= min_prefix and (len(members) == 1 or 4 * shared >= 3 * prefix):
                groups[-1] = (members + [i], shared)
                continue
        groups.append(([i], len(ids[i]) - 1))
    out = []
    for members, prefix in groups:
        if len(members) > 1:
            out.append((sorted(members), prefix))
        else:
            loose += members
    if loose:
        out.append((sorted(loose), 0))
    return out


class _PerRowSampler:
    """Logits processor that samples each sequence with its own torch generator, then forces that token.

    HF `generate` samples a whole batch from one global RNG, so a row's samples would depend on its
    batch mates. Here each sequence draws one uniform number per step from its own CPU generator
    (seeded from (seed, row key, sample index)) and picks its token by inverse CDF over the
    temperature/top-p distribution; every other logit becomes -inf, so greedy decoding (which runs
    this processor last) emits exactly the sampled token. The per-row loop only draws scalars on
    the CPU; the sampling itself is vectorised on the model's device.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        import torch

        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            from transformers.generation.logits_process import TopPLogitsWarper

            scores = TopPLogitsWarper(self.top_p)(input_ids, scores)
        probs = torch.softmax(scores, dim=-1)
        cdf = probs.cumsum(dim=-1)
        u = torch.tensor([[torch.rand(1, generator=g).item()] for g in self.generators], device=scores.device)
        picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=scores.shape[-1] - 1)
        return scores.fill_(float("-inf")).scatter_(1, picked, 0.0)  # `scores` is our own copy here


class _DeltaStreamer:
    """A transformers streamer over a batch of sequences: text deltas and finish reasons, per sequence.

    `emit(kind, index, payload)` is called from the generation thread: ("delta", i, text) and
    ("finish", i, reason). Text is decoded from all the tokens so far and sent as the new suffix, so
    the deltas join to exactly the final text (a token that ends inside a UTF-8 character waits).
    """

    def __init__(self, tokenizer, eos_ids: set[int], rows: int, max_tokens: int, emit):
        self.tokenizer, self.eos_ids, self.max_tokens, self.emit = tokenizer, eos_ids, max_tokens, emit
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.sent = [""] * rows
        self.counts = [0] * rows
        self.done = [False] * rows
        self.prompt_seen = False

    def _flush(self, i: int, final: bool = False) -> None:
        text = self.tokenizer.decode(self.ids[i], skip_special_tokens=True)
        if (text.endswith("\ufffd") and not final) or not text.startswith(self.sent[i]):
            return
        if len(text) > len(self.sent[i]):
            self.emit("delta", i, text[len(self.sent[i]):])
            self.sent[i] = text

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        for i, tok in enumerate(value.reshape(-1).tolist()):
            if self.done[i]:
                continue
            self.counts[i] += 1
            if tok in self.eos_ids:
                self.done[i] = True
                self._flush(i, final=True)
                self.emit("finish", i, "stop")
                continue
            self.ids[i].append(tok)
            self._flush(i)

    def end(self) -> None:
        for i in range(len(self.ids)):
            if not self.done[i]:
                self.done[i] = True
                self._flush(i, final=True)
                self.emit("finish", i, "length" if self.counts[i] >= self.max_tokens else "stop")


class _StopFlag:
    """A stopping criterion that ends generation when `event` is set (a streaming client went away)."""

    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class HFGenerator:
    """Transformers generation on one worker: a Ray Data callable class, and the code Serve reuses.

    `__call__(pyarrow.Table) -> pyarrow.Table` adds the output columns (Ray Data, batch_format="pyarrow").
    `generate(messages_list, n, keys, sampling)` is the same generation for in-process callers, and
    `stream(messages, n, key, emit, stop, sampling)` the same for one chat, token by token. `sampling`
    (a `Sampling`) sets temperature, top_p and max_new_tokens for that call only (default: the config's);
    sample j of a row is seeded from (cfg.seed, the row's key, j) on both paths. Not thread-safe: one
    call at a time.
    """

    def __init__(
        self,
        cfg: EngineConfig,
        n: int = 1,
        messages_column: str = "messages",
        key_column: str | None = "question_id",
    ):
        import torch

        from .models import load_causal_lm, load_tokenizer

        self.cfg, self.n, self.messages_column, self.key_column = cfg, n, messages_column, key_column
        if cfg.num_gpus > 0 and not torch.cuda.is_available():
            raise RuntimeError(
                f"engine.num_gpus={cfg.num_gpus} but this worker sees no CUDA device; set engine.num_gpus=0 for CPU."
            )
        self.device = "cuda" if cfg.num_gpus > 0 else "cpu"
        if self.device == "cpu":
            # One torch thread per reserved CPU. More threads than cores (several actors, or Serve beside Ray
            # Data, each with torch's default) thrash: a 200-token SmolLM2 forward took 4.6 s with 2 threads
            # beside other work on 2 cores, and 0.5 s with 1 thread (measured).
            torch.set_num_threads(max(1, round(cfg.num_cpus)))
        self.tokenizer = load_tokenizer(cfg.model)
        self.model = load_causal_lm(cfg.model, dtype=cfg.dtype, device=self.device)
        # transformers >= 5.2x names the KV cache argument `cache` (`past_key_values` is deprecated there)
        self._cache_kwarg = "cache" if "cache" in inspect.signature(type(self.model).forward).parameters else "past_key_values"
        gc = self.model.generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])

    def _sampling(self, sampling: Sampling | None) -> Sampling:
        return sampling or Sampling(self.cfg.temperature, self.cfg.top_p, self.cfg.max_new_tokens)

    def _generation_config(self, max_new_tokens: int):
        import copy

        gc = copy.deepcopy(self.model.generation_config)
        # Greedy search; sampling, when wanted, happens in _PerRowSampler (per-row seeds).
        gc.do_sample, gc.num_beams, gc.num_return_sequences = False, 1, 1
        gc.temperature, gc.top_p, gc.top_k = None, None, None
        gc.max_new_tokens, gc.max_length = max_new_tokens, None
        gc.pad_token_id = self.tokenizer.pad_token_id
        return gc

    def _inputs(self, prompts: list[str], keys: list[str], reps: int, s: Sampling):
        """Tokenized prompts (each `reps` times) and the logits processors of sampling `s`."""
        from transformers import LogitsProcessorList

        texts = [p for p in prompts for _ in range(reps)]
        # add_special_tokens=False: the ids of `prompt_token_ids` (left padding aside).
        enc = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(
            self.device
        )
        processors = LogitsProcessorList()
        if s.temperature != 0:
            seeds = [sample_seed(self.cfg.seed, k, j) for k in keys for j in range(reps)]
            processors.append(_PerRowSampler(seeds, s.temperature, s.top_p))
        return enc, processors

    def _generate_batch(self, prompts: list[str], keys: list[str], n: int, s: Sampling) -> list[Generation]:
        from transformers import LogitsProcessorList

        reps = 1 if s.temperature == 0 else n
        # add_special_tokens=False: the ids of `prompt_token_ids`.
        ids = [list(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts for _ in range(reps)]
        seeds = [sample_seed(self.cfg.seed, k, j) for k in keys for j in range(reps)] if s.temperature != 0 else []
        new: list[list[int]] = [[] for _ in ids]
        groups = prefix_groups(ids) if self.cfg.prefix_cache else [(list(range(len(ids))), 0)]
        for members, prefix in groups:
            processors = LogitsProcessorList()
            if seeds:
                processors.append(_PerRowSampler([seeds[i] for i in members], s.temperature, s.top_p))
            for i, out in zip(members, self._generate_ids([ids[i] for i in members], prefix, processors, s)):
                new[i] = out
        results = []
        for i in range(len(prompts)):
            outs, counts = [], []
            for row in new[i * reps : (i + 1) * reps]:
                stop = next((t for t, tok in enumerate(row) if tok in self.eos_ids), None)
                body = row if stop is None else row[:stop]
                outs.append(self.tokenizer.decode(body, skip_special_tokens=True))
                counts.append(len(row) if stop is None else stop + 1)
            results.append(Generation(outs * (n // reps), counts * (n // reps)))
        return results

    def _generate_ids(self, rows: list[list[int]], prefix: int, processors, s: Sampling) -> list[list[int]]:
        """The new token ids of each row's greedy (or `processors`-sampled) continuation. With prefix > 0 the rows
        share their first `prefix` ids: those run once (batch 1) into a KV cache that every row continues from,
        and each row is laid out as prefix + padding + its own suffix (the mask hides the padding; positions
        follow the mask, so each token keeps the position it has in its own prompt). Without, rows are
        left-padded as usual."""
        import torch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(r) for r in rows) - prefix
        input_ids, mask = [], []
        for r in rows:
            gap = width - (len(r) - prefix)
            input_ids.append(r[:prefix] + [pad] * gap + r[prefix:])
            mask.append([1] * prefix + [0] * gap + [1] * (len(r) - prefix))
        input_ids = torch.tensor(input_ids, device=self.device)
        mask = torch.tensor(mask, device=self.device)
        extra = {}
        with torch.inference_mode():
            if prefix:
                from transformers import DynamicCache

                try:
                    cache = DynamicCache(config=self.model.config)
                except TypeError:  # older transformers: no config argument
                    cache = DynamicCache()
                self.model(input_ids=input_ids[:1, :prefix], use_cache=True, **{self._cache_kwarg: cache})
                cache.batch_repeat_interleave(len(rows))
                extra[self._cache_kwarg] = cache
            out = self.model.generate(
                input_ids=input_ids, attention_mask=mask, generation_config=self._generation_config(s.max_new_tokens),
                logits_processor=processors, **extra,
            )
        return out[:, input_ids.shape[1] :].tolist()

    def generate(
        self, messages_list: list, n: int = 1, keys: list | None = None, sampling: Sampling | None = None
    ) -> list[Generation]:
        """One `Generation` per chat, in order; a bad chat or a failed generation is that row's error."""
        s = self._sampling(sampling)
        keys = keys if keys is not None else [None] * len(messages_list)
        results: list[Generation | None] = [None] * len(messages_list)
        todo = []  # (index, prompt text, seed key)
        for i, (messages, key) in enumerate(zip(messages_list, keys)):
            try:
                msgs = normalize_messages(messages)
                todo.append((i, chat_prompt(self.tokenizer, msgs), row_key(key, msgs)))
            except Exception as e:  # noqa: BLE001  (a bad row is recorded, never fatal)
                results[i] = Generation(error=_error_text(e))
        bs = self.cfg.batch_size
        for start in range(0, len(todo), bs):
            chunk = todo[start : start + bs]
            try:
                outs = self._generate_batch([p for _, p, _ in chunk], [k for _, _, k in chunk], n, s)
            except Exception:  # noqa: BLE001  isolate the failing row(s): retry one by one
                if self.device == "cuda":
                    import torch

                    torch.cuda.empty_cache()  # after an out-of-memory batch
                outs = []
                for _, p, k in chunk:
                    try:
                        outs += self._generate_batch([p], [k], n, s)
                    except Exception as e:  # noqa: BLE001
                        outs.append(Generation(error=_error_text(e)))
            for (i, _, _), g in zip(chunk, outs):
                results[i] = g
        return results

    def stream(self, messages: list[dict], n: int, key: str, emit, stop, sampling: Sampling | None = None) -> int:
        """Generate for one chat token by token: `emit(kind, index, payload)` gets ("delta", i, text) and
        ("finish", i, "stop" | "length") per sequence (see `_DeltaStreamer`); generation ends early once the
        `threading.Event` `stop` is set. Greedy generates one sequence (index 0) for any n, sampling n.
        Returns the completion tokens of all n answers. Raises on a bad chat or a failed generation."""
        import torch
        from transformers import StoppingCriteriaList

        s = self._sampling(sampling)
        rows = 1 if s.temperature == 0 else n
        enc, processors = self._inputs([chat_prompt(self.tokenizer, messages)], [key], rows, s)
        streamer = _DeltaStreamer(self.tokenizer, self.eos_ids, rows, s.max_new_tokens, emit)
        with torch.inference_mode():
            self.model.generate(
                **enc,
                generation_config=self._generation_config(s.max_new_tokens),
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([_StopFlag(stop)]),
                streamer=streamer,
            )
        return sum(streamer.counts) * (n // rows)

    def generate_messages(self, messages_list: list, n: int = 1) -> list[list[str]]:
        """n texts per chat; raises GenerationError if any chat fails."""
        return _texts_or_raise(self.generate(messages_list, n))

    def __call__(self, batch):
        messages, keys = _table_inputs(batch, self.messages_column, self.key_column)
        return _generations_table(batch, self.generate(messages, self.n, keys))


# --------------------------------------------------------------------------------------------------
# Backend 'openai': an OpenAI-compatible endpoint
# --------------------------------------------------------------------------------------------------
# Why not ray.data.llm.HttpRequestProcessorConfig (which was measured working on CPU against our Serve
# app)? In Ray 2.60 its HttpRequestUDF retries only 408/429/502/503/504 (a 500 is returned as the
# "response"), raises for the whole job when a row runs out of retries (HTTP processors have no
# should_continue_on_error), sets timeouts only through a custom aiohttp session_factory and knows
# nothing of `n`. The `openai`
# client gives timeouts, exponential-backoff retries on 408/409/429/5xx and connection errors
# (honouring Retry-After), and typed errors we can record per row; a thread pool bounds concurrency.


def resolve_openai_model(cfg: EngineConfig, api_key: str | None = None) -> str:
    """The model name to request: `cfg.model`, else the first model the endpoint lists (GET /models)."""
    if cfg.model:
        return cfg.model
    from openai import OpenAI

    client = OpenAI(
        base_url=cfg.endpoint,
        api_key=api_key or _api_key(cfg),
        timeout=cfg.request_timeout_s,
        max_retries=cfg.max_retries,
    )
    try:
        models = [m.id for m in client.models.list()]
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"engine.model is empty and {cfg.endpoint}/models could not be listed ({_error_text(e)}); "
            "set engine.model to the served model name."
        ) from None
    if not models:
        raise ValueError(f"{cfg.endpoint}/models lists no model; set engine.model to the served model name.")
    return models[0]


def _api_key(cfg: EngineConfig) -> str:
    # Local servers (vLLM, our Serve app) ignore the key, but the client insists on one.
    return os.environ.get(cfg.api_key_env, "") or "EMPTY"


class OpenAIGenerator:
    """Chat completions against an OpenAI-compatible server: a Ray Data callable class and an in-process client.

    Up to `cfg.concurrency` requests are in flight. With `cfg.send_n`, one request asks for all n
    samples; a server that returns fewer choices is topped up with single requests (so servers that
    ignore `n` still give n samples). Temperature 0 sends one request per row and repeats its text.
    `gen_tokens` comes from `usage.completion_tokens`; when one response carries several choices the
    server reports only their sum, which is spread evenly over them (the sum stays exact).
    """

    def __init__(
        self,
        cfg: EngineConfig,
        n: int = 1,
        messages_column: str = "messages",
        key_column: str | None = "question_id",
        model: str = "",
        api_key: str | None = None,
    ):
        from openai import OpenAI

        self.cfg, self.n, self.messages_column, self.key_column = cfg, n, messages_column, key_column
        api_key = api_key or _api_key(cfg)
        self.client = OpenAI(
            base_url=cfg.endpoint, api_key=api_key, timeout=cfg.request_timeout_s, max_retries=cfg.max_retries
        )
        self.model = model or resolve_openai_model(cfg, api_key)
        self.pool = ThreadPoolExecutor(max_workers=cfg.concurrency)

    def _request(
        self, messages: list[dict], key: str, first_sample: int, count: int
    ) -> tuple[list[str], list[int]]:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.cfg.max_new_tokens,
            "temperature": self.cfg.temperature,
            "top_p": self.cfg.top_p,
        }
        if count > 1:
            kwargs["n"] = count
        if self.cfg.temperature > 0:
            kwargs["seed"] = sample_seed(self.cfg.seed, key, first_sample)
        resp = self.client.chat.completions.create(**kwargs)
        choices = sorted(resp.choices, key=lambda c: c.index)[:count]
        texts = [c.message.content or "" for c in choices]
        usage = getattr(resp, "usage", None)
        total = getattr(usage, "completion_tokens", None) if usage is not None else None
        tokens = split_total(total, len(texts)) if total is not None else [-1] * len(texts)
        return texts, tokens

    def generate(self, messages_list: list, n: int = 1, keys: list | None = None) -> list[Generation]:
        """One `Generation` per chat, in order; a bad chat or a request that fails after retries is that row's error."""
        keys = keys if keys is not None else [None] * len(messages_list)
        results = [Generation() for _ in messages_list]
        greedy = self.cfg.temperature == 0
        want = 1 if greedy else n
        plan = []  # (row index, messages, key, first sample index, samples asked)
        for i, (messages, key) in enumerate(zip(messages_list, keys)):
            try:
                msgs = normalize_messages(messages)
            except ValueError as e:
                results[i].error = _error_text(e)
                continue
            k = row_key(key, msgs)
            if self.cfg.send_n or want == 1:
                plan.append((i, msgs, k, 0, want))
            else:
                plan += [(i, msgs, k, j, 1) for j in range(want)]
        while plan:
            futures = [(p, self.pool.submit(self._request, p[1], p[2], p[3], p[4])) for p in plan]
            plan = []
            for (i, msgs, k, first, count), fut in futures:
                try:
                    texts, tokens = fut.result()
                except Exception as e:  # noqa: BLE001  (recorded on the row after the client's retries)
                    results[i].error = results[i].error or _error_text(e)
                    continue
                results[i].texts += texts
                results[i].tokens += tokens
                if 0 < len(texts) < count:  # the server ignored n: top up with single requests
                    got = first + len(texts)
                    plan += [(i, msgs, k, j, 1) for j in range(got, first + count)]
                elif not texts:
                    results[i].error = results[i].error or "the server returned no choices"
        for r in results:
            if greedy and not r.error:
                r.texts, r.tokens = r.texts * n, r.tokens * n
        return results

    def generate_messages(self, messages_list: list, n: int = 1) -> list[list[str]]:
        """n texts per chat; raises GenerationError if any chat fails."""
        return _texts_or_raise(self.generate(messages_list, n))

    def __call__(self, batch):
        messages, keys = _table_inputs(batch, self.messages_column, self.key_column)
        return _generations_table(batch, self.generate(messages, self.n, keys))


# --------------------------------------------------------------------------------------------------
# Backend 'vllm': ray.data.llm (GPU only)
# --------------------------------------------------------------------------------------------------
# Ray 2.60's vLLMEngineStage keeps only outputs[0] of each request, so n samples are n rows: each
# input row is expanded into n sample rows (own seed each) before the processor and regrouped after.
# Prompt token ids are ours: `VLLMPromptTokens` (a Ray Data callable class, once per input row, before
# the expansion) builds them with `prompt_token_ids`, and the processor runs with its chat-template and
# tokenize stages off, so vLLM sees exactly the ids training and the hf engine use (Ray's TokenizeStage
# would tokenize the templated text with add_special_tokens=True: two BOS for Llama 3).
# should_continue_on_error=True turns an engine failure into that row's `__inference_error__`; error
# rows bypass the processor's postprocess, so the processor's postprocess is the identity and one
# `_vllm_finish_row` map afterwards handles both kinds of rows. The input row travels packed in one
# column, so whatever columns the processor adds are dropped and the user's own columns (including a
# column named "messages") come back untouched.

_ROW, _UID, _SAMPLE, _INPUT_ERROR = "__t2s_row", "__t2s_uid", "__t2s_sample", "__t2s_input_error"
_PROMPT_IDS = "__t2s_prompt_ids"
_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_processor_kwargs(cfg: EngineConfig) -> dict:
    """Keyword arguments of `ray.data.llm.vLLMEngineProcessorConfig` for this engine config (pure).

    A LoRA adapter dir becomes its base model with `enable_lora`; rows then name the adapter
    (`vllm_preprocess_row(..., lora=...)`, see `vllm_lora_model`).
    """
    from .models import is_adapter_dir, resolve_model

    source = resolve_model(cfg.model)
    engine_kwargs: dict[str, Any] = {
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "max_model_len": cfg.max_model_len,
        # 'auto' is bf16 on a GPU, as for the hf engine (vLLM's own 'auto' keeps an fp16 config's fp16).
        "dtype": "bfloat16" if cfg.dtype == "auto" else cfg.dtype,
    }
    if cfg.max_num_seqs:
        engine_kwargs["max_num_seqs"] = cfg.max_num_seqs
    if cfg.gpu_memory_utilization:
        engine_kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    if cfg.kv_cache_gb:
        engine_kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gb * 2**30)
    if is_adapter_dir(source):
        adapter = json.loads((Path(source) / "adapter_config.json").read_text())
        rank = int(adapter.get("r", 16))
        engine_kwargs.update(
            enable_lora=True,
            max_loras=1,
            max_lora_rank=next((r for r in _LORA_RANKS if r >= rank), rank),
        )
        source = resolve_model(adapter.get("base_model_name_or_path") or "")
    kwargs: dict[str, Any] = {
        "model_source": source,
        "engine_kwargs": engine_kwargs,
        # An int n is an autoscaling pool of 1..n engine replicas in Ray 2.60 (so a smaller cluster still runs).
        "concurrency": cfg.concurrency,
        "batch_size": cfg.batch_size,
        "should_continue_on_error": True,
        # Rows arrive with `tokenized_prompt` (VLLMPromptTokens); the text comes from the detokenize stage.
        "chat_template_stage": False,
        "tokenize_stage": False,
        "detokenize_stage": True,
    }
    if cfg.accelerator_type:
        kwargs["accelerator_type"] = cfg.accelerator_type
    return kwargs


def vllm_lora_model(cfg: EngineConfig) -> str | None:
    """The adapter dir each row names as its `model` when `cfg.model` is a LoRA adapter, else None."""
    from .models import is_adapter_dir

    return cfg.model if cfg.model and is_adapter_dir(cfg.model) else None


def vllm_sampling_params(
    cfg: EngineConfig, seed: int, max_tokens: int | None = None, temperature: float | None = None
) -> dict:
    """One row's vLLM `SamplingParams` (n=1: samples are rows; text comes from the detokenize stage)."""
    return {
        "n": 1,
        "temperature": float(cfg.temperature if temperature is None else temperature),
        "top_p": float(cfg.top_p),
        "max_tokens": int(cfg.max_new_tokens if max_tokens is None else max_tokens),
        "seed": int(seed),
        "detokenize": False,
    }


class VLLMPromptTokens:
    """Ray Data callable class (batch_format="pyarrow") run before the vLLM processor: adds each row's
    prompt token ids (`prompt_token_ids` with the model's tokenizer) and its input error ("" if usable).

    A row whose messages are unusable gets no ids and the error; it still goes through the engine (a
    one-token placeholder, see `vllm_preprocess_row`) and comes back with `gen_error`.
    """

    def __init__(self, model: str, messages_column: str = "messages"):
        from .models import load_tokenizer

        self.tokenizer = load_tokenizer(model)
        self.messages_column = messages_column

    def ids(self, messages: Any) -> tuple[list[int], str]:
        try:
            return prompt_token_ids(self.tokenizer, normalize_messages(messages)), ""
        except Exception as e:  # noqa: BLE001  (a bad row is recorded, never fatal)
            return [], _error_text(e)

    def __call__(self, batch):
        import pyarrow as pa

        messages, _ = _table_inputs(batch, self.messages_column, None)
        ids, errors = zip(*(self.ids(m) for m in messages)) if messages else ((), ())
        for name in (_PROMPT_IDS, _INPUT_ERROR):
            if name in batch.column_names:
                batch = batch.drop_columns([name])
        batch = batch.append_column(_PROMPT_IDS, pa.array(list(ids), type=pa.list_(pa.int64())))
        return batch.append_column(_INPUT_ERROR, pa.array(list(errors), type=pa.string()))


def vllm_preprocess_row(
    row: dict,
    cfg: EngineConfig,
    key_column: str | None = "question_id",
    lora: str | None = None,
    messages_column: str = "messages",
) -> dict:
    """Row with prompt ids (from `VLLMPromptTokens`) -> processor row: the packed original row,
    `tokenized_prompt`, `sampling_params` (pure).

    An unusable row (its input error set, or no ids) is sent as a one-token placeholder prompt with
    max_tokens=1 and keeps its error, so it comes back with `gen_error` instead of failing the batch.
    The extra greedy row of `generate(..., greedy=True)` (sample index `_GREEDY_SAMPLE`) gets temperature 0.
    """
    row = dict(row)
    uid, j = row.pop(_UID, None), int(row.pop(_SAMPLE, 0))
    ids = row.pop(_PROMPT_IDS, None)
    error = row.pop(_INPUT_ERROR, "") or ""
    ids = [] if ids is None else [int(t) for t in ids]
    if not ids and not error:
        error = "no prompt token ids: run the rows through VLLMPromptTokens before the vLLM processor"
    key = row_key(row.get(key_column) if key_column else None, row.get(messages_column))
    out = {
        _ROW: row,
        _UID: uid or "",
        _SAMPLE: j,
        _INPUT_ERROR: error,
        "tokenized_prompt": [0] if error else ids,
        "sampling_params": vllm_sampling_params(
            cfg, sample_seed(cfg.seed, key, j), max_tokens=1 if error else None,
            temperature=0.0 if j == _GREEDY_SAMPLE else None,
        ),
    }
    if lora:
        out["model"] = lora
    return out


def vllm_finish_row(row: dict, grouped: bool) -> dict:
    """Processor output row -> the original row plus the output columns (pure).

    grouped=True: the row is one of an input row's samples (or its greedy row, `generate(..., greedy=True)`);
    `vllm_collect_samples` merges them. `__inference_error__` is vLLM's per-row failure
    (should_continue_on_error).
    """
    orig = dict(row[_ROW])
    error = row.get(_INPUT_ERROR) or row.get("__inference_error__") or ""
    text = "" if error else str(row.get("generated_text") or "")
    tokens = -1 if error else int(row.get("num_generated_tokens") or 0)
    if not grouped:
        return {
            **orig,
            "generations": [] if error else [text],
            "gen_tokens": [] if error else [tokens],
            "gen_error": error,
        }
    return {
        **orig,
        _UID: row[_UID],
        _SAMPLE: row[_SAMPLE],
        "__t2s_text": text,
        "__t2s_tokens": tokens,
        "__t2s_error": error,
    }


def _samples_generation(errors: list, texts: list, tokens: list) -> Generation:
    ok = [e == "" for e in errors]
    return Generation(
        [t for t, good in zip(texts, ok) if good],
        [c for c, good in zip(tokens, ok) if good],
        next((e for e in errors if e), ""),
    )


def vllm_collect_samples(group, greedy: bool = False):
    """The sample rows of one input row (a pyarrow Table) -> one row with generations in sample order; with
    greedy=True its temperature-0 row (`_GREEDY_SAMPLE`) goes to the `GREEDY_COLUMNS` instead."""
    import pyarrow as pa

    group = group.sort_by(_SAMPLE)
    samples, errors, texts, tokens = (
        group.column(_SAMPLE).to_pylist(),
        group.column("__t2s_error").to_pylist(),
        group.column("__t2s_text").to_pylist(),
        group.column("__t2s_tokens").to_pylist(),
    )
    keep = [j != _GREEDY_SAMPLE for j in samples]
    first = group.slice(0, 1).drop_columns([_UID, _SAMPLE, "__t2s_text", "__t2s_tokens", "__t2s_error"])
    result = _samples_generation(*([v for v, k in zip(col, keep) if k] for col in (errors, texts, tokens)))
    table = _generations_table(first, [result])
    if not greedy:
        return table
    g = _samples_generation(*([v for v, k in zip(col, keep) if not k] for col in (errors, texts, tokens)))
    if not (g.texts or g.error):
        g.error = "no greedy generation came back for this row"
    table = table.append_column(GREEDY_COLUMNS[0], pa.array([g.texts], type=pa.list_(pa.string())))
    table = table.append_column(GREEDY_COLUMNS[1], pa.array([g.tokens], type=pa.list_(pa.int64())))
    return table.append_column(GREEDY_COLUMNS[2], pa.array([g.error], type=pa.string()))


def _repeat_generations(row: dict, n: int) -> dict:
    if row["gen_error"]:
        return row
    return {**row, "generations": list(row["generations"]) * n, "gen_tokens": list(row["gen_tokens"]) * n}


def _expand_samples(row: dict, n: int, greedy: bool = False) -> list[dict]:
    uid = uuid.uuid4().hex
    return [{**row, _UID: uid, _SAMPLE: j} for j in ([_GREEDY_SAMPLE] if greedy else []) + list(range(n))]


def require_gpus(need: float, what: str) -> None:
    """Raise at once if the Ray cluster has fewer than `need` GPUs: GPU actors would otherwise wait forever."""
    import ray

    have = ray.cluster_resources().get("GPU", 0)
    if have < need:
        raise RuntimeError(
            f"{what} needs {need:g} GPU(s) but the Ray cluster has {have:g}: its actors would wait forever for them. "
            "Run on a GPU cluster, or use engine.backend='hf' with engine.num_gpus=0 (CPU) or engine.backend='openai' "
            "against a served model."
        )


def build_vllm_processor(
    cfg: EngineConfig,
    n: int = 1,
    messages_column: str = "messages",
    key_column: str | None = "question_id",
    require_gpu: bool = True,
):
    """The `ray.data.llm` processor for this config (vllm is imported by its engine actors, not here).

    Its input rows are the user's rows after `vllm_prompt_tokens` (or their per-sample expansion); its
    preprocess is `vllm_preprocess_row`, and its output rows still need `vllm_finish_row` (see
    `_vllm_pipeline`).
    """
    from .common import ensure_ray

    ensure_ray()
    if require_gpu:
        require_gpus(
            cfg.tensor_parallel_size,
            f"engine.backend='vllm' (tensor_parallel_size={cfg.tensor_parallel_size})",
        )
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(**vllm_processor_kwargs(cfg))
    preprocess = partial(
        vllm_preprocess_row,
        cfg=cfg,
        key_column=key_column,
        lora=vllm_lora_model(cfg),
        messages_column=messages_column,
    )
    return build_processor(config, preprocess=preprocess, postprocess=None)


def vllm_prompt_tokens(ds, cfg: EngineConfig, messages_column: str = "messages"):
    """`ds` with the prompt-id columns `vllm_preprocess_row` reads (a CPU actor pool of `VLLMPromptTokens`)."""
    import ray

    return ds.map_batches(
        VLLMPromptTokens,
        fn_constructor_kwargs={"model": cfg.model, "messages_column": messages_column},
        batch_size=max(cfg.batch_size, 64),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cfg.concurrency)),
        num_cpus=min(cfg.num_cpus, 1.0),
        udf_modifying_row_count=False,
    )


def _vllm_pipeline(ds, processor, n: int, num_partitions: int | None = None, greedy: bool = False):
    """Expand rows (already holding prompt ids) to samples (+ one greedy row each with greedy=True), run
    `processor` (Dataset -> Dataset), finish and regroup rows.

    `num_partitions` is the regrouping shuffle's width (None: Ray's default, DataContext.min_parallelism).
    """
    grouped = n > 1 or greedy
    if grouped:
        ds = ds.flat_map(partial(_expand_samples, n=n, greedy=greedy))
    ds = processor(ds).map(partial(vllm_finish_row, grouped=grouped))
    if grouped:
        ds = ds.groupby(_UID, num_partitions=num_partitions).map_groups(
            partial(vllm_collect_samples, greedy=greedy), batch_format="pyarrow"
        )
    return ds


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def generate(
    ds,
    cfg: EngineConfig,
    n: int = 1,
    messages_column: str = "messages",
    key_column: str | None = "question_id",
    greedy: bool = False,
):
    """Add `generations` (n texts), `gen_tokens` and `gen_error` to every row of a Ray Dataset (lazily).

    Rows carry chat messages in `messages_column`; `key_column` (if present) names the row for seeds.
    A row that cannot be generated keeps its place with `gen_error` set; the job never fails for a row.
    greedy=True (vllm only): each row's temperature-0 generation too, in the same execution (the
    `GREEDY_COLUMNS`): self-consistency's k samples and the greedy answer for one engine start.
    """
    import ray

    if n < 1:
        raise ValueError(f"n={n}: ask for at least one sample per row.")
    if greedy and cfg.backend != "vllm":
        raise ValueError(f"greedy=True is the vllm backend's (per-row sampling params); with {cfg.backend!r} "
                         "run a temperature-0 generate beside the sampled one.")
    if cfg.backend == "hf":
        if cfg.num_gpus > 0:
            require_gpus(cfg.num_gpus, f"engine.backend='hf' with engine.num_gpus={cfg.num_gpus}")
        gpu_args = {"num_gpus": cfg.num_gpus} if cfg.num_gpus > 0 else {}
        if cfg.num_gpus > 0 and cfg.accelerator_type:
            gpu_args["accelerator_type"] = cfg.accelerator_type
        return ds.map_batches(
            HFGenerator,
            fn_constructor_kwargs={
                "cfg": cfg,
                "n": n,
                "messages_column": messages_column,
                "key_column": key_column,
            },
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
            num_cpus=cfg.num_cpus,
            udf_modifying_row_count=False,
            **gpu_args,
        )
    if cfg.backend == "openai":
        # Resolve the model and key here (fail fast; workers on other nodes may lack the env var).
        api_key = _api_key(cfg)
        model = resolve_openai_model(cfg, api_key)
        return ds.map_batches(
            OpenAIGenerator,
            fn_constructor_kwargs={
                "cfg": cfg,
                "n": n,
                "messages_column": messages_column,
                "key_column": key_column,
                "model": model,
                "api_key": api_key,
            },
            # A batch's requests run in parallel, so a batch must hold at least `concurrency` rows.
            batch_size=max(cfg.batch_size, cfg.concurrency),
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=cfg.num_cpus,
            udf_modifying_row_count=False,
        )
    if cfg.backend == "vllm":
        processor = build_vllm_processor(cfg, n, messages_column, key_column)
        ds = vllm_prompt_tokens(ds, cfg, messages_column)
        if cfg.temperature == 0 and n > 1 and not greedy:  # greedy: one sequence per row, repeated
            return _vllm_pipeline(ds, processor, 1).map(partial(_repeat_generations, n=n))
        return _vllm_pipeline(ds, processor, n, greedy=greedy)
    raise ValueError(f"engine.backend={cfg.backend!r} is not one of 'hf', 'vllm', 'openai'.")


def generate_messages(messages_list: list, cfg: EngineConfig, n: int = 1) -> list[list[str]]:
    """n texts for each chat, in one process without Ray; raises GenerationError if any chat fails.

    Loads the model (or connects) on every call: hold an `HFGenerator` / `OpenAIGenerator` to reuse it.
    """
    if cfg.backend == "hf":
        return HFGenerator(cfg, n=n).generate_messages(messages_list, n)
    if cfg.backend == "openai":
        return OpenAIGenerator(cfg, n=n).generate_messages(messages_list, n)
    raise ValueError(
        "engine.backend='vllm' runs only inside Ray Data (engines.generate) or behind a server; "
        "for one-process use pick 'hf', or 'openai' against a vLLM server."
    )
