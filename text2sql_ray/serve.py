"""`t2s serve`: an OpenAI-compatible API for a model on Ray Serve.

    t2s serve [--model <dir or name>] [--port P] [--backend hf|vllm] [--extra-models DIR,...]

Routes (under ``route_prefix``): ``POST /v1/chat/completions`` (JSON, or server-sent events with
``"stream": true``: ``data: {chunk}`` lines ending with ``data: [DONE]``), ``GET /v1/models``,
``GET /v1/models/{id}`` and ``GET /health``. (Serve's own proxy also answers ``/-/healthz``.)

Backend 'hf' (CPU or GPU, no extra packages), two kinds of deployment per application:

* ``OpenAIIngress`` (FastAPI): parses and checks each request (`parse_chat_request`, pure), picks the
  model deployment by the request's ``model``, and turns every failure into an OpenAI-style error
  body ``{"error": {"message", "type", "param", "code"}}`` (``code`` is the HTTP status).
* one ``ChatModel`` deployment per served model (``model`` plus ``extra_models``, e.g. a base model and
  a LoRA adapter dir beside it): an ``engines.HFGenerator`` (the same generation code as
  ``t2s evaluate --model``, so a served greedy answer equals the batch one). Non-streaming requests
  are batched dynamically (``@serve.batch``, ``max_batch_size`` / ``batch_wait_timeout_s``); a batch
  is split into groups of equal (n, temperature, top_p, max_tokens), each one ``generate`` call.
  Streaming requests are generated one at a time with a token streamer (not batched). The model runs
  one generate call at a time per replica.

Request rules: the body is at most ``max_request_bytes`` (HTTP 413 beyond, refused before it is read
when Content-Length says so) of UTF-8 JSON nested at most ``MAX_JSON_DEPTH`` levels (checked before
parsing). ``messages`` (required; role ``system``, ``developer`` (treated as system), ``user`` or
``assistant``; string content or a list of text parts), ``model`` (optional:
the first served model), ``max_tokens`` / ``max_completion_tokens`` (default ``default_max_tokens``;
more than ``max_tokens_limit`` is an HTTP 400, never silently clamped, so a caller that asked for
more learns it cannot have it), ``temperature`` (default 1.0, as OpenAI's; 0 = greedy), ``top_p``,
``n`` (1..16), ``seed`` (a request with the same seed, messages and parameters gets the same
samples; without it, samples are random), ``stream``, ``stream_options.include_usage``. Parameters
that would change the answer but are not implemented (``stop``, ``logprobs``, ``tools``,
``response_format``, ...) are an HTTP 400 rather than ignored; others (``user``, ...) are ignored.
``finish_reason`` is "length" when a sample used all of max_tokens (without streaming this includes
the rare sample whose stop token was exactly its last allowed token), else "stop". Usage counts the
prompt as the chat template renders it, and completion tokens including the stop token.

With ``api_key_env`` (``t2s serve --api-key-env VAR``, as ``vllm serve --api-key``), every route but
``/health`` needs ``Authorization: Bearer <the value of $VAR>``; only a SHA-256 digest of the key
leaves the process that starts the app.

Status codes: 400 malformed request (bad JSON, nesting too deep, missing messages, unknown role, wrong
types, max_tokens over the limit, prompt + max_tokens over the model's context), 401 missing or wrong
API key, 404 unknown model or route, 413 body too large, 503 (with
``Retry-After``) when a model's queue is full: each model deployment takes ``max_ongoing_requests``
per replica and queues ``max_queued_requests`` more; beyond that a request is refused at once
instead of waiting without bound. 500 only for a failed generation or a server bug, with the same
JSON error body as every other error.

Backend 'vllm' (GPU only): ``ray.serve.llm`` (``LLMConfig`` + ``build_openai_app``), imported only
when used. `vllm_plan(cfg)` is the pure part: the LLMConfig arguments and served ids. A LoRA adapter
dir is served either from ``lora_path`` (Ray 2.60 loads adapters only from s3://, gs://, abfss://:
upload the dir there; request it as ``<model_id>:<dir name>``) or, without ``lora_path``, as the
merged model ``<dir>/merged`` that ``t2s train --merge`` writes.

``run(cfg)`` starts Ray (``common.ensure_ray``), deploys the app (``serve.run(..., blocking=False)``),
prints the URL and model ids, and with ``blocking`` waits until Ctrl-C / SIGTERM, then deletes the
app (and shuts Serve down when no other app runs). `start(cfg)` does the same without waiting and
returns a `Served` (for scripts and tests).
"""

# No `from __future__ import annotations`: FastAPI (through @serve.ingress) must see `Request` itself.
import asyncio
import copy
import dataclasses
import hashlib
import hmac
import itertools
import json
import logging
import os
import re
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from .common import ensure_ray, log
from .config import EngineConfig, ServeConfig

MAX_N = 16
"""Most samples one request may ask for."""
UNSUPPORTED_PARAMS = (
    "stop",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "logit_bias",
    "response_format",
    "best_of",
)
"""Request parameters that would change the answer and are not implemented: HTTP 400 when set."""
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
"""Message roles accepted, and the role the chat template gets (OpenAI's 'developer' is its new 'system')."""
MAX_JSON_DEPTH = 32
"""Deepest nesting of JSON arrays/objects a request body may have (a chat request needs 4)."""
OWNED_BY = "text2sql_ray"
_replica_log = logging.getLogger("ray.serve")


# --------------------------------------------------------------------------------------------------
# Pure helpers: model ids, request parsing, response bodies (tested without Ray)
# --------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def body(self) -> dict:
        return error_body(self.message, self.type, self.status, self.param)

    def to_dict(self) -> dict:
        return {"status": self.status, "message": self.message, "type": self.type, "param": self.param}


def error_body(message: str, type_: str, code: int, param: str | None = None) -> dict:
    """``{"error": {"message", "type", "param", "code"}}`` (code = the HTTP status, as vLLM sends)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, status, param), status_code=status, headers=headers)


# A JSON string: quote, then escapes or other characters, then the closing quote (or the end of an
# unterminated one). Possessive and always matching once started, so stripping strings is linear.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = [0] * 256
_DEPTH_STEP[ord("[")] = _DEPTH_STEP[ord("{")] = 1
_DEPTH_STEP[ord("]")] = _DEPTH_STEP[ord("}")] = -1


def json_depth(raw: bytes) -> int:
    """Deepest nesting of arrays and objects in a UTF-8 JSON text, without parsing it (linear time; brackets
    inside strings do not count, and in UTF-8 no byte of a multi-byte character is a bracket or a quote)."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    return max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def parse_json_body(raw: bytes) -> Any:
    """The JSON value of a request body; raises `APIError` 400 for non-UTF-8, too deep or invalid JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not UTF-8: {e}") from None
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise APIError(400, f"the request body nests JSON {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with `APIError` 413 as soon as it is known to exceed `limit` bytes
    (from Content-Length before reading anything, else while it streams in)."""
    too_large = (f"the request body is larger than this server accepts ({limit} bytes, serve.max_request_bytes); "
                 "send a shorter prompt.")
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise APIError(413, too_large)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


def api_key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_api_key(authorization: str | None, digest: str) -> None:
    """Raise `APIError` 401 unless `authorization` is ``Bearer <key>`` with sha256(key) == digest ('' = no key needed)."""
    if not digest:
        return
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "You didn't provide an API key: send it as 'Authorization: Bearer <key>'.",
                       param="authorization")
    if not hmac.compare_digest(api_key_digest(key.strip()), digest):
        raise APIError(401, "Incorrect API key provided.", param="authorization")


def model_id_for(model: str) -> str:
    """The id clients pass as `model`: the embedded model's name, a dir's name, a .gguf's stem, or the hub name."""
    from .models import EMBEDDED_NAME

    if not model:
        return EMBEDDED_NAME
    p = Path(model)
    if model.endswith(".gguf"):
        return p.stem
    if p.exists():
        return p.resolve().name
    return model  # a hub name such as org/name


@dataclass
class ServedModel:
    """One model the app serves: its public id and what `models.load_causal_lm` loads."""

    model_id: str
    source: str
    prompt: dict | None = None
    """The prompt record of a `t2s train` output (prompt config, schema-budget tokenizer), shown on its model card."""


def _prompt_of(source: str) -> dict | None:
    from .prompts import recorded_prompt

    p = Path(source) if source else None
    if p is None or not p.is_dir():
        return None
    return recorded_prompt(p) or (recorded_prompt(p.parent) if p.name == "merged" else None)


def served_models(cfg: ServeConfig) -> list[ServedModel]:
    """`model` (as `model_id`, or its derived id) then each of `extra_models` (ids: their names); ids are unique."""
    out = [ServedModel(cfg.model_id or model_id_for(cfg.model), cfg.model, _prompt_of(cfg.model))]
    for extra in cfg.extra_models:
        out.append(ServedModel(model_id_for(extra), extra, _prompt_of(extra)))
    ids = [m.model_id for m in out]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(
            f"serve: two served models would have the same id {', '.join(dupes)}; rename a directory "
            "or set model_id for the main model."
        )
    return out


@dataclass
class ChatRequest:
    """A checked chat completion request."""

    model: str
    messages: list[dict]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _content_text(content: Any, k: int) -> str:
    """A message's content as text: a string, or a list of {"type": "text", "text"} parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"messages[{k}].content: only text parts ({{'type': 'text', 'text': ...}}) are supported.",
                               param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"messages[{k}].content must be a string or a list of text parts, got {type(content).__name__}.",
                   param="messages")


def parse_chat_request(body: Any, model_ids: list[str], cfg: ServeConfig) -> ChatRequest:
    """Check a /v1/chat/completions body; raises `APIError` (400, or 404 for an unknown model)."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}.")
    model = body.get("model")
    if model is None:
        model = model_ids[0]
    if not isinstance(model, str):
        raise APIError(400, f"model must be a string, got {type(model).__name__}.", param="model")
    if model not in model_ids:
        raise APIError(404, f"The model `{model}` does not exist; served models: {', '.join(model_ids)}.",
                       param="model")

    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "messages is required: a non-empty list of {'role', 'content'} objects.", param="messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {'role', 'content'} objects.", param="messages")
    msgs = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{k}] must be an object with role and content.", param="messages")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise APIError(400, f"messages[{k}].role must be one of {', '.join(ROLES)}, got {role!r}.",
                           param="messages")
        msgs.append({"role": ROLES[role], "content": _content_text(m.get("content"), k)})

    max_tokens = body.get("max_completion_tokens")
    param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = body.get("max_tokens"), "max_tokens"
    if max_tokens is None:
        max_tokens = cfg.default_max_tokens
    if not _is_int(max_tokens) or max_tokens < 1:
        raise APIError(400, f"{param} must be a positive integer, got {max_tokens!r}.", param=param)
    if max_tokens > cfg.max_tokens_limit:
        raise APIError(
            400,
            f"{param}={max_tokens} is more than this server allows ({cfg.max_tokens_limit}, serve.max_tokens_limit); "
            f"ask for at most {cfg.max_tokens_limit}.",
            param=param,
        )

    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else temperature
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be a number in [0, 2], got {temperature!r}.", param="temperature")
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be a number in (0, 1], got {top_p!r}.", param="top_p")
    n = body.get("n")
    n = 1 if n is None else n
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise APIError(400, f"n must be an integer in [1, {MAX_N}], got {n!r}.", param="n")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise APIError(400, f"seed must be an integer, got {seed!r}.", param="seed")
    stream = body.get("stream")
    stream = False if stream is None else stream
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}.", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object.", param="stream_options")
    for name in UNSUPPORTED_PARAMS:
        value = body.get(name)
        if value not in (None, False, [], {}) and not (name == "response_format" and value == {"type": "text"}):
            raise APIError(400, f"{name} is not supported by this server; drop it.", param=name)
    return ChatRequest(
        model=model,
        messages=msgs,
        max_tokens=int(max_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        n=int(n),
        seed=seed,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
    )


def finish_reason(tokens: int, max_tokens: int) -> str:
    """'length' when a sample used all of max_tokens, else 'stop' (it ended with the stop token)."""
    return "length" if tokens >= max_tokens else "stop"


def completion_body(request_id: str, created: int, model: str, texts: list[str], finish_reasons: list[str],
                    prompt_tokens: int, completion_tokens: int) -> dict:
    """An OpenAI ``chat.completion`` object."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": f}
            for i, (t, f) in enumerate(zip(texts, finish_reasons))
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def chunk_body(request_id: str, created: int, model: str, choices: list[dict], usage: dict | None = None) -> dict:
    """An OpenAI ``chat.completion.chunk`` object (choices: [{index, delta, finish_reason}])."""
    body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def sse(obj: Any) -> str:
    """One server-sent event line: ``data: <json>`` and a blank line."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def models_body(models: list[ServedModel], created: int) -> dict:
    return {"object": "list", "data": [model_card(m, created) for m in models]}


def model_card(m: ServedModel, created: int) -> dict:
    """An OpenAI model object; a `t2s train` output's card also carries `t2s_prompt`, the prompt it was trained on
    (`t2s evaluate --endpoint` builds its prompts with it)."""
    card = {"id": m.model_id, "object": "model", "created": created, "owned_by": OWNED_BY, "root": m.source or m.model_id}
    if m.prompt:
        card["t2s_prompt"] = m.prompt
    return card


def request_key(req: ChatRequest) -> str:
    """The seed key of a request's samples (engines.sample_seed): its seed, or a random one."""
    return f"seed={req.seed}" if req.seed is not None else f"random={uuid.uuid4().hex}"


# --------------------------------------------------------------------------------------------------
# Backend 'vllm': ray.serve.llm arguments (pure)
# --------------------------------------------------------------------------------------------------


@dataclass
class VllmPlan:
    """What `build_openai_app` gets: one LLMConfig argument dict per served base model, and the ids clients use."""

    llm_configs: list[dict]
    model_ids: list[str]
    notes: list[str] = field(default_factory=list)


def _lora_rank(adapter_dir: str) -> int:
    from .engines import _LORA_RANKS

    rank = int(json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("r", 16))
    return next((r for r in _LORA_RANKS if r >= rank), rank)


def vllm_plan(cfg: ServeConfig) -> VllmPlan:
    """LLMConfig keyword arguments for `ray.serve.llm` (pure: no vllm, no Ray).

    A plain model (dir, hub name, .gguf export) -> one LLMConfig. A LoRA adapter dir -> its base model
    with LoRA on, the adapter loaded from ``cfg.lora_path`` by its dir name (id ``<base id>:<name>``),
    or, without lora_path, the adapter's merged model ``<dir>/merged`` under the adapter's id.
    """
    from .models import is_adapter_dir, resolve_model

    plan = VllmPlan([], [])
    deployment: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
    }
    if cfg.max_replicas > cfg.num_replicas:
        deployment["autoscaling_config"] = {
            "min_replicas": cfg.num_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": max(1, cfg.max_ongoing_requests // 2),
        }
    else:
        deployment["num_replicas"] = cfg.num_replicas

    sources = [(cfg.model, cfg.model_id)] + [(m, "") for m in cfg.extra_models]
    for source, given_id in sources:
        model_id = given_id or model_id_for(source)
        path = resolve_model(source)
        engine_kwargs: dict[str, Any] = {
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "max_model_len": cfg.max_model_len,
            "dtype": cfg.dtype,
        }
        llm: dict[str, Any] = {}
        served = [model_id]
        if is_adapter_dir(path):
            name = Path(path).resolve().name
            if cfg.lora_path:
                base_ref = json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
                base_id = given_id or model_id_for(base_ref)
                path = resolve_model(base_ref)
                engine_kwargs.update(enable_lora=True, max_loras=cfg.max_loras, max_lora_rank=_lora_rank(source))
                llm["lora_config"] = {
                    "dynamic_lora_loading_path": cfg.lora_path.rstrip("/"),
                    "max_num_adapters_per_replica": cfg.max_loras,
                }
                model_id, served = base_id, [base_id, f"{base_id}:{name}"]
                plan.notes.append(
                    f"LoRA adapter {source} is requested as model '{base_id}:{name}'; it must be uploaded to "
                    f"{cfg.lora_path.rstrip('/')}/{name}."
                )
            elif (Path(path) / "merged" / "config.json").is_file():
                path = str(Path(path) / "merged")
                plan.notes.append(f"serving the merged model {path} for the adapter dir {source}.")
            else:
                raise ValueError(
                    f"serve --backend vllm: {source} is a LoRA adapter dir. Ray 2.60's ray.serve.llm loads adapters only "
                    "from cloud storage: upload it and set serve.lora_path (s3://, gs://, abfss://), or merge it "
                    "(t2s train --merge writes <dir>/merged) and serve that, or use --backend hf."
                )
        elif cfg.lora_path:
            engine_kwargs.update(enable_lora=True, max_loras=cfg.max_loras)
            llm["lora_config"] = {
                "dynamic_lora_loading_path": cfg.lora_path.rstrip("/"),
                "max_num_adapters_per_replica": cfg.max_loras,
            }
        llm.update(
            model_loading_config={"model_id": model_id, "model_source": path},
            engine_kwargs=engine_kwargs,
            deployment_config=json.loads(json.dumps(deployment)),
        )
        if cfg.accelerator_type:
            llm["accelerator_type"] = cfg.accelerator_type
        plan.llm_configs.append(llm)
        plan.model_ids += served
    return plan


def build_vllm_app(cfg: ServeConfig):
    """The ray.serve.llm OpenAI app for `cfg` (needs vllm: GPU machines only)."""
    plan = vllm_plan(cfg)
    try:
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError as e:
        raise RuntimeError(
            f"serve --backend vllm needs vLLM (pip install 'ray[llm]' on a GPU machine): {e}. "
            "Without a GPU use --backend hf."
        ) from None
    return build_openai_app({"llm_configs": [LLMConfig(**c) for c in plan.llm_configs]}), plan


# --------------------------------------------------------------------------------------------------
# Backend 'hf': the model deployment
# --------------------------------------------------------------------------------------------------


@serve.deployment
class ChatModel:
    """One served model: an `engines.HFGenerator`, batched non-streaming requests, streamed ones one at a time."""

    def __init__(self, model_id: str, source: str, cfg: ServeConfig):
        from .engines import HFGenerator

        _replica_grpc_on_loopback()
        self.model_id = model_id
        self.base_cfg = EngineConfig(
            backend="hf",
            model=source,
            dtype=cfg.dtype,
            num_gpus=cfg.num_gpus,
            batch_size=cfg.max_batch_size,
            max_new_tokens=cfg.default_max_tokens,
            seed=0,
        )
        self.gen = HFGenerator(self.base_cfg)
        # Streamed requests count their prompt tokens while another thread generates: a tokenizer of their
        # own (a Rust tokenizer used from two threads at once can fail with "Already borrowed").
        self.count_tokenizer = copy.deepcopy(self.gen.tokenizer)
        self.lock = threading.Lock()  # one generation at a time on the model (batched and streamed alike)
        config = getattr(self.gen.model, "config", None)
        self.max_context = getattr(config, "max_position_embeddings", None)
        self._batched.set_max_batch_size(cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    # ---- helpers (run in the replica) ----

    def _prompt_tokens(self, req: ChatRequest, tokenizer=None) -> int:
        """Prompt tokens as HFGenerator feeds them; raises APIError when prompt + max_tokens exceed the context."""
        tokenizer = tokenizer or self.count_tokenizer
        try:
            prompt = tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - a template that rejects the roles/order
            raise APIError(400, f"the chat template rejects these messages: {e}", param="messages") from None
        n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if self.max_context and n + req.max_tokens > self.max_context:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_context} tokens; the messages take {n} and "
                f"max_tokens asks for {req.max_tokens} more. Shorten the messages or lower max_tokens.",
                param="messages",
            )
        return n

    @staticmethod
    def _sampling(req: ChatRequest):
        from .engines import Sampling

        return Sampling(temperature=req.temperature, top_p=req.top_p, max_new_tokens=req.max_tokens)

    def _generate_items(self, items: list[tuple[ChatRequest, str]]) -> list[dict]:
        """Blocking: prompt checks, then one HFGenerator.generate call per group of requests with equal
        sampling parameters. (Prompts are checked here, in the batch, rather than per request before it in a
        thread of their own: measured on 2 busy cores, 32 requests reached the replica within 0.2 s, yet
        the batches that followed held 3, 3, 11 and 15 of them.)"""
        results: list[dict | None] = [None] * len(items)
        prompt_tokens: dict[int, int] = {}
        groups: dict[tuple, list[int]] = {}
        with self.lock:
            for i, (req, _) in enumerate(items):
                try:
                    prompt_tokens[i] = self._prompt_tokens(req, self.gen.tokenizer)
                except APIError as e:
                    results[i] = {"error": e.to_dict()}
                    continue
                groups.setdefault((req.n, req.temperature, req.top_p, req.max_tokens), []).append(i)
            for (n, _, _, _), idx in groups.items():
                try:
                    outs = self.gen.generate([items[i][0].messages for i in idx], n=n, keys=[items[i][1] for i in idx],
                                             sampling=self._sampling(items[idx[0]][0]))
                except Exception as e:  # noqa: BLE001 - reported per request, the replica lives on
                    outs = [None] * len(idx)
                    for i in idx:
                        results[i] = {"error": APIError(500, f"generation failed: {e}", "server_error").to_dict()}
                    continue
                for i, g in zip(idx, outs):
                    req = items[i][0]
                    if g.error or len(g.texts) != req.n:
                        results[i] = {"error": APIError(500, f"generation failed: {g.error or 'no text'}",
                                                        "server_error").to_dict()}
                    else:
                        results[i] = {
                            "texts": list(g.texts),
                            "tokens": list(g.tokens),
                            "finish_reasons": [finish_reason(t, req.max_tokens) for t in g.tokens],
                            "prompt_tokens": prompt_tokens[i],
                        }
        return results  # type: ignore[return-value]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _batched(self, items: list[tuple[ChatRequest, str]]) -> list[dict]:
        t0 = time.perf_counter()
        out = await asyncio.to_thread(self._generate_items, items)
        # In the replica's Serve log (logs/serve/replica_*.log): how full the batches are.
        _replica_log.info("%s: batch of %d request(s) generated in %.2f s", self.model_id, len(items),
                          time.perf_counter() - t0)
        return out

    # ---- called by the ingress ----

    async def generate(self, req: ChatRequest) -> dict:
        """A whole completion: {texts, tokens, finish_reasons, prompt_tokens} or {error}."""
        return await self._batched((req, request_key(req)))

    def _stream_sync(self, req: ChatRequest, key: str, emit, stop: threading.Event) -> None:
        """`HFGenerator.stream` with the request's sampling settings, then ("usage", -1, completion tokens)."""
        with self.lock:
            tokens = self.gen.stream(req.messages, req.n, key, emit, stop, self._sampling(req))
            emit("usage", -1, tokens)

    async def stream(self, req: ChatRequest):
        """Yields {"prompt_tokens"} first (or {"error"}), then {"index", "delta"} / {"index", "finish_reason"}
        items, and last {"completion_tokens"}. Greedy n > 1 generates once and sends it under every index."""
        try:
            prompt_tokens = await asyncio.to_thread(self._prompt_tokens, req)
        except APIError as e:
            yield {"error": e.to_dict()}
            return
        yield {"prompt_tokens": prompt_tokens}
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        copies = req.n if req.temperature == 0 else 1

        def emit(kind: str, index: int, payload: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, index, payload))

        def work() -> None:
            try:
                self._stream_sync(req, request_key(req), emit, stop)
            except Exception as e:  # noqa: BLE001 - reported in the stream
                emit("error", -1, f"generation failed: {type(e).__name__}: {e}")
            finally:
                emit("end", -1, None)

        worker = loop.run_in_executor(None, work)
        try:
            while True:
                kind, index, payload = await queue.get()
                if kind == "end":
                    break
                if kind == "error":
                    yield {"error": APIError(500, payload, "server_error").to_dict()}
                elif kind == "usage":
                    yield {"completion_tokens": payload}
                else:
                    for c in range(copies):
                        i = index * copies + c if copies > 1 else index
                        yield {"index": i, "delta": payload} if kind == "delta" else {"index": i, "finish_reason": payload}
        finally:
            stop.set()  # the client went away (or we are done): the generation thread stops at its next token
            del worker

    def check_health(self) -> None:
        if self.gen is None:  # pragma: no cover
            raise RuntimeError("model not loaded")


# --------------------------------------------------------------------------------------------------
# Backend 'hf': the ingress (FastAPI)
# --------------------------------------------------------------------------------------------------

api = FastAPI(title="text2sql_ray", docs_url=None, redoc_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@api.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception):
    log.error("serve: %s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return error_response(500, f"internal server error: {type(exc).__name__}", "server_error")


def _replica_grpc_on_loopback() -> None:
    """Bind this Serve replica's inter-deployment gRPC server to 127.0.0.1 when its node is loopback-only.

    Ray 2.60 starts that server on "[::]:0", every interface, with no option (ray/serve/_private/replica.py,
    `_on_initialized`). On a local instance that `common.ensure_ray` started (node IP 127.0.0.1, every other
    Ray process on loopback) it would be the one listener reachable from the network. Serve builds the
    deployment (this class's constructor) before it starts that server, so replacing the helper it calls
    here is in time. A replica on a cluster node (a routable IP) keeps Ray's behaviour.
    """
    import ray
    from ray._common.network_utils import is_localhost
    from ray.serve._private import replica

    add_port = replica.add_port_to_grpc_server
    if getattr(add_port, "loopback_only", False) or not is_localhost(ray.util.get_node_ip_address()):
        return

    def add_port_on_loopback(server, address: str):
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address[len("[::]:"):]
        return add_port(server, address)

    add_port_on_loopback.loopback_only = True
    replica.add_port_to_grpc_server = add_port_on_loopback


def _backpressure(e: Exception) -> JSONResponse:
    status = getattr(e, "status_code", 503)
    return error_response(
        status if status in (429, 503) else 503,
        "The server is overloaded (the model's request queue is full); retry later.",
        "service_unavailable_error",
        headers={"Retry-After": "1"},
    )


@serve.deployment
@serve.ingress(api)
class OpenAIIngress:
    """OpenAI-compatible routes over one or more `ChatModel` deployments (by `model`)."""

    def __init__(self, handles: dict, models: list[dict], cfg: ServeConfig, key_digest: str = ""):
        _replica_grpc_on_loopback()
        self.handles = handles
        self.models = [ServedModel(**m) for m in models]
        self.model_ids = [m.model_id for m in self.models]
        self.cfg = cfg
        self.key_digest = key_digest
        self.created = int(time.time())

    @api.get("/health")
    async def health(self):  # open without the API key, as vLLM's
        return {"status": "ok", "models": self.model_ids}

    @api.get("/v1/models")
    async def list_models(self, request: Request):
        check_api_key(request.headers.get("authorization"), self.key_digest)
        return models_body(self.models, self.created)

    @api.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request):
        check_api_key(request.headers.get("authorization"), self.key_digest)
        for m in self.models:
            if m.model_id == model_id:
                return model_card(m, self.created)
        return error_response(404, f"The model `{model_id}` does not exist.", param="model")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        check_api_key(request.headers.get("authorization"), self.key_digest)  # before reading the body
        body = parse_json_body(await read_body(request, self.cfg.max_request_bytes))
        req = parse_chat_request(body, self.model_ids, self.cfg)
        handle = self.handles[req.model]
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        try:
            if not req.stream:
                out = await handle.generate.remote(req)
            else:
                items = handle.options(stream=True).stream.remote(req)
                out = await items.__anext__()
        except (BackPressureError, DeploymentUnavailableError) as e:
            return _backpressure(e)
        except Exception as e:  # noqa: BLE001 - a dead replica etc.: a 500 with a body, never a crash
            if "BackPressureError" in type(e).__name__ or "BackPressureError" in str(e)[:2000]:
                return _backpressure(e)
            log.exception("chat completion failed")
            return error_response(500, f"the model deployment failed: {type(e).__name__}: {str(e)[:500]}", "server_error")
        if "error" in out:
            err = out["error"]
            return error_response(err["status"], err["message"], err["type"], err["param"])
        if not req.stream:
            return JSONResponse(
                completion_body(request_id, created, req.model, out["texts"], out["finish_reasons"],
                                out["prompt_tokens"], sum(out["tokens"]))
            )
        return StreamingResponse(
            self._events(items, req, request_id, created, out["prompt_tokens"]), media_type="text/event-stream"
        )

    async def _events(self, items, req: ChatRequest, request_id: str, created: int, prompt_tokens: int):
        yield sse(chunk_body(request_id, created, req.model, [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for i in range(req.n)
        ]))
        completion_tokens = 0
        try:
            async for item in items:
                if "error" in item:
                    yield sse(error_body(item["error"]["message"], item["error"]["type"], item["error"]["status"]))
                    break
                if "completion_tokens" in item:
                    completion_tokens = item["completion_tokens"]
                    continue
                if "delta" in item:
                    choice = {"index": item["index"], "delta": {"content": item["delta"]}, "logprobs": None,
                              "finish_reason": None}
                else:
                    choice = {"index": item["index"], "delta": {}, "logprobs": None,
                              "finish_reason": item["finish_reason"]}
                yield sse(chunk_body(request_id, created, req.model, [choice]))
        except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
            yield sse(error_body(f"generation failed: {type(e).__name__}: {e}", "server_error", 500))
        if req.include_usage:
            yield sse(chunk_body(request_id, created, req.model, [], usage={
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }))
        yield "data: [DONE]\n\n"


def build_hf_app(cfg: ServeConfig, key_digest: str = ""):
    """The 'hf' application: an ingress over one ChatModel deployment per served model (`key_digest`:
    `api_key_digest` of the API key requests must carry, '' = none)."""
    models = served_models(cfg)
    model_opts: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        "health_check_timeout_s": 60,
    }
    if cfg.max_replicas > cfg.num_replicas:
        model_opts["autoscaling_config"] = {
            "min_replicas": cfg.num_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.max_batch_size,
        }
    else:
        model_opts["num_replicas"] = cfg.num_replicas
    handles = {
        m.model_id: ChatModel.options(name=f"model_{i}", **model_opts).bind(m.model_id, m.source, cfg)
        for i, m in enumerate(models)
    }
    # The ingress only parses and forwards (async): it takes many requests, so the model queues decide.
    per_model = cfg.max_ongoing_requests * max(cfg.num_replicas, cfg.max_replicas) + max(cfg.max_queued_requests, 0)
    ingress = OpenAIIngress.options(
        name="ingress",
        num_replicas=1,
        max_ongoing_requests=max(256, 2 * per_model * len(models)),
        ray_actor_options={"num_cpus": 0.1},
    )
    return ingress.bind(handles, [dataclasses.asdict(m) for m in models], cfg, key_digest), models


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


@dataclass
class Served:
    """A running app: where it listens and what it serves."""

    url: str
    """Base URL of the API, e.g. http://127.0.0.1:8000/v1 (what OpenAI clients take as base_url)."""
    model_ids: list[str]
    app_name: str
    backend: str


def _proxy_address(cfg: ServeConfig) -> tuple[str, int]:
    """Host and port the Serve proxy really listens on (Serve ignores http_options when it already runs)."""
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        host, port = http.host or cfg.host, int(http.port)
    except Exception:  # noqa: BLE001  # pragma: no cover - fall back to what we asked for
        return cfg.host, cfg.port
    if (host, port) != (cfg.host, cfg.port):
        log.warning("serve: Serve already runs on this cluster at %s:%s; ignoring host/port %s:%s.",
                    host, port, cfg.host, cfg.port)
    return host, port


def start(cfg: ServeConfig) -> Served:
    """Deploy the app and return once it is healthy (does not block)."""
    key_digest = ""
    if cfg.api_key_env:  # read here, before Ray starts: only its digest goes into the app
        key = os.environ.get(cfg.api_key_env, "").strip()
        if not key:
            raise ValueError(
                f"serve: --api-key-env {cfg.api_key_env}: that environment variable is not set or empty; "
                f"export {cfg.api_key_env}=<key> before `t2s serve`, or drop --api-key-env."
            )
        key_digest = api_key_digest(key)
    ensure_ray()
    if cfg.backend == "vllm":
        app, plan = build_vllm_app(cfg)
        model_ids = plan.model_ids
        for note in plan.notes:
            log.info("serve: %s", note)
    else:
        app, models = build_hf_app(cfg, key_digest)
        model_ids = [m.model_id for m in models]
    for m in served_models(cfg):
        if m.prompt:
            log.info("serve: %s was trained on prompts built with %s (tokenizer %r); GET /v1/models/%s shows it as "
                     "t2s_prompt, and `t2s evaluate --endpoint` uses it", m.model_id, m.prompt["config"],
                     m.prompt.get("tokenizer", ""), m.model_id)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    t0 = time.time()
    serve.run(app, name=cfg.name, route_prefix=cfg.route_prefix, blocking=False)
    host, port = _proxy_address(cfg)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    prefix = cfg.route_prefix.rstrip("/")
    url = f"http://{shown}:{port}{prefix}/v1"
    served = Served(url=url, model_ids=model_ids, app_name=cfg.name, backend=cfg.backend)
    log.info("serve: app %r ready in %.1f s", cfg.name, time.time() - t0)
    print(f"t2s serve: {', '.join(model_ids)} at {url} (OpenAI-compatible: POST {url}/chat/completions, "
          f"GET {url}/models)", flush=True)
    return served


def stop(app_name: str = "t2s") -> None:
    """Delete the app; shut Serve down when no other app is left."""
    try:
        serve.delete(app_name)
        if not serve.status().applications:
            serve.shutdown()
    except Exception as e:  # noqa: BLE001 - stopping must not raise
        log.warning("serve: stopping %s: %s", app_name, e)


def run(cfg: ServeConfig) -> Path | None:
    """`t2s serve`: start the app; with `cfg.blocking`, serve until Ctrl-C / SIGTERM, then stop cleanly."""
    served = start(cfg)
    if not cfg.blocking:
        return None

    def _terminate(signum, frame):  # `ray job stop` sends SIGTERM: stop like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    print("t2s serve: serving; press Ctrl-C to stop.", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print(f"t2s serve: stopping {served.app_name} (a few seconds) ...", flush=True)
    finally:
        # A second Ctrl-C (or the SIGINT a wrapper forwards) must not cut the clean-up short.
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            stop(served.app_name)
        finally:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous)
    print("t2s serve: stopped.", flush=True)
    return None
