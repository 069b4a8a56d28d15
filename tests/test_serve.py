"""`t2s serve` (backend 'hf'): a real Ray Serve app on CPU with the tiny Llama and a LoRA adapter on it,
called through the real `openai` client and raw HTTP. Plus the 'vllm' backend's config (pure: vLLM
cannot be installed here, see test_vllm_*).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import threading
from pathlib import Path

import openai
import pytest
import requests  # (a dependency of ray)

from text2sql_ray import cli
from text2sql_ray import serve as serve_mod
from text2sql_ray.config import ConfigError, EngineConfig, ServeConfig
from text2sql_ray.engines import HFGenerator

LIMIT = 64
BODY_LIMIT = 64 * 1024
API_KEY_ENV, API_KEY = "T2S_TEST_SERVE_KEY", "t2s-test-key-0123456789"
MSGS = [{"role": "system", "content": "You are a SQLite expert."}, {"role": "user", "content": "How many rows?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A PEFT LoRA adapter on the tiny Llama, saved with save_pretrained (no tokenizer in the dir).

    init_lora_weights=False gives non-zero B matrices, so the adapter really changes the answers.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    out = tmp_path_factory.mktemp("adapters") / "tiny_lora"
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def app(ray_local, tiny_llama_dir, adapter_dir):
    """The base model ('tiny') and the adapter ('tiny_lora') side by side in one app."""
    cfg = ServeConfig(
        model=str(tiny_llama_dir),
        model_id="tiny",
        extra_models=[str(adapter_dir)],
        port=free_port(),
        name="t2s_test",
        num_cpus=0.25,
        max_batch_size=4,
        max_tokens_limit=LIMIT,
        default_max_tokens=8,
        max_request_bytes=BODY_LIMIT,
        blocking=False,
    )
    served = serve_mod.start(cfg)
    yield served
    serve_mod.stop(served.app_name)


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=app.url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def base_gen(tiny_llama_dir):
    return HFGenerator(EngineConfig(model=str(tiny_llama_dir), max_new_tokens=8))


def post(app, body, raw: bool = False) -> requests.Response:
    data = body if raw else json.dumps(body)
    return requests.post(f"{app.url}/chat/completions", data=data, headers={"content-type": "application/json"},
                         timeout=120)


# --------------------------------------------------------------------------------------------------
# Completions
# --------------------------------------------------------------------------------------------------


def test_completion_has_the_openai_schema_and_exact_usage(client, base_gen):
    resp = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, temperature=0)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == "tiny"
    assert len(resp.choices) == 1 and resp.choices[0].index == 0
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    prompt = base_gen.tokenizer.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False)
    n_prompt = len(base_gen.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert resp.usage.prompt_tokens == n_prompt
    assert 1 <= resp.usage.completion_tokens <= 8
    assert resp.usage.total_tokens == n_prompt + resp.usage.completion_tokens


def test_served_greedy_answer_equals_in_process_generation(client, base_gen):
    resp = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, temperature=0)
    assert resp.choices[0].message.content == base_gen.generate([MSGS])[0].texts[0]


def test_seeded_samples_are_reproducible_distinct_and_match_in_process_sampling(client, tiny_llama_dir):
    kw = {"model": "tiny", "messages": MSGS, "max_tokens": 6, "temperature": 1.0, "n": 3, "seed": 7}
    first = [c.message.content for c in client.chat.completions.create(**kw).choices]
    again = [c.message.content for c in client.chat.completions.create(**kw).choices]
    assert first == again and len(set(first)) == 3
    # The server derives sample j's seed as engines.sample_seed(0, "seed=<seed>", j): the same as in process.
    sampler = HFGenerator(EngineConfig(model=str(tiny_llama_dir), max_new_tokens=6, temperature=1.0))
    assert first == sampler.generate([MSGS], 3, keys=["seed=7"])[0].texts


def test_streaming_sends_sse_chunks_that_join_to_the_non_streamed_answer(client, app):
    whole = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(
        model="tiny", messages=MSGS, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    # On the wire: server-sent events, every one `data: {json}`, the last `data: [DONE]`.
    with requests.post(f"{app.url}/chat/completions", stream=True, timeout=120,
                       json={"model": "tiny", "messages": MSGS, "max_tokens": 4, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


def test_models_route_lists_every_served_model_and_health_answers(client, app, adapter_dir):
    assert [m.id for m in client.models.list()] == ["tiny", adapter_dir.name]
    assert client.models.retrieve("tiny").id == "tiny"
    root = app.url[: -len("/v1")]
    health = requests.get(f"{root}/health", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok", "models": ["tiny", adapter_dir.name]}


def test_lora_adapter_dir_is_served_with_its_adapter_applied(client, adapter_dir, base_gen):
    lora = client.chat.completions.create(model=adapter_dir.name, messages=MSGS, max_tokens=8, temperature=0)
    base = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, temperature=0)
    local = HFGenerator(EngineConfig(model=str(adapter_dir), max_new_tokens=8)).generate([MSGS])[0].texts[0]
    assert lora.model == adapter_dir.name
    assert lora.choices[0].message.content == local
    assert lora.choices[0].message.content != base.choices[0].message.content


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------

MALFORMED = {
    "bad json": ('{"messages": [', "not valid JSON"),
    "not an object": ("[1, 2]", "JSON object"),
    "missing messages": ({"model": "tiny"}, "messages is required"),
    "messages not a list": ({"messages": "hi"}, "non-empty list"),
    "content not text": ({"messages": [{"role": "user", "content": 5}]}, "content must be a string"),
    "temperature wrong type": ({"messages": MSGS, "temperature": "hot"}, "temperature must be a number"),
    "n out of range": ({"messages": MSGS, "n": 0}, "n must be an integer"),
    "unsupported stop": ({"messages": MSGS, "stop": ["x"]}, "stop is not supported"),
    "nested 30000 deep": ('{"messages": ' + "[" * 30_000 + "]" * 30_000 + "}", "nests JSON 30001 levels deep"),
    "nested 33 deep": ({"messages": MSGS, "user": json.loads("[" * 32 + "]" * 32)}, "nests JSON 33 levels deep"),
    "not UTF-8": (b'{"messages": "\xff"}', "not UTF-8"),
    "unknown role": ({"messages": [{"role": "hacker", "content": "hi"}]}, "role must be one of system, developer"),
    "tool role": ({"messages": [{"role": "tool", "content": "42"}]}, "got 'tool'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_gets_400_with_an_openai_error_body(app, case):
    body, message = MALFORMED[case]
    r = post(app, body, raw=isinstance(body, (str, bytes)))
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error" and err["code"] == 400


def test_unknown_role_is_refused_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "hacker", "content": "hi"}], max_tokens=2)
    assert "got 'hacker'" in e.value.response.json()["error"]["message"]


def test_body_over_the_size_limit_gets_413_whether_or_not_its_length_is_declared(app, client):
    big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "a" * BODY_LIMIT}]}).encode()
    declared = post(app, big, raw=True)  # Content-Length: refused before the body is read
    chunked = requests.post(f"{app.url}/chat/completions", data=(big[i:i + 4096] for i in range(0, len(big), 4096)),
                            headers={"content-type": "application/json"}, timeout=120)  # refused while it streams in
    for r in (declared, chunked):
        assert r.status_code == 413 and r.headers["content-type"] == "application/json"
        err = r.json()["error"]
        assert err["code"] == 413 and f"({BODY_LIMIT} bytes, serve.max_request_bytes)" in err["message"]
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a" * BODY_LIMIT}])
    assert e.value.status_code == 413
    # a body just under the limit is served
    ok = post(app, {"model": "tiny", "messages": [{"role": "user", "content": "a b " * 100}], "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None


def test_every_ray_listener_of_the_session_is_on_loopback_while_the_apps_serve(app, small_app):
    from test_network import is_loopback, listening_sockets, session_ray_pids

    sockets = listening_sockets(session_ray_pids())
    assert sum(name.startswith("ray::ServeReplica") for name, _, _ in sockets) >= 4, sockets  # 2 apps' replicas
    assert [s for s in sockets if not is_loopback(s[1])] == []


def test_unknown_model_gets_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=MSGS, max_tokens=4)
    err = e.value.response.json()["error"]
    assert err["code"] == 404 and err["param"] == "model" and "no-such-model" in err["message"]


def test_max_tokens_over_the_limit_gets_400_naming_the_limit(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=LIMIT + 1)
    err = e.value.response.json()["error"]
    assert err["param"] == "max_tokens" and f"({LIMIT}, serve.max_tokens_limit)" in err["message"]


def test_unknown_route_gets_404_with_an_error_body(app):
    r = requests.get(f"{app.url}/nothing-here", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


# --------------------------------------------------------------------------------------------------
# Overload, the command line, stopping: a second app (max_ongoing_requests=1, max_queued_requests=1)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_app(ray_local, tiny_llama_dir, app):
    """Started through `t2s serve` (the CLI) beside the first app, under its own route prefix."""
    port = int(app.url.split(":")[2].split("/")[0])  # Serve's proxy is shared: same port
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = cli.main([
            "serve", "--model", str(tiny_llama_dir), "--model-id", "tiny1", "--name", "t2s_small",
            "--route-prefix", "/small", "--port", str(port), "--num-cpus", "0.25", "--max-batch-size", "1",
            "--max-ongoing-requests", "1", "--max-queued-requests", "1", "--max-tokens-limit", "256",
            "--blocking", "false",
        ])
    assert rc == 0
    yield {"url": f"http://127.0.0.1:{port}/small/v1", "printed": printed.getvalue()}
    serve_mod.stop("t2s_small")


def test_cli_serve_prints_the_url_and_model_id(small_app):
    assert f"tiny1 at {small_app['url']}" in small_app["printed"]


def test_overload_beyond_the_queue_gets_503_not_a_crash(small_app):
    client = openai.OpenAI(base_url=small_app["url"], api_key="unused", max_retries=0, timeout=120)
    statuses, bodies = [], []

    def call():
        try:
            client.chat.completions.create(model="tiny1", messages=MSGS, max_tokens=200, temperature=0)
            statuses.append(200)
        except openai.APIStatusError as e:
            statuses.append(e.status_code)
            bodies.append(e.response.json())

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(statuses) == 8 and set(statuses) <= {200, 503}
    # At least the first is served; Ray's router may refuse more than strictly needed when requests arrive
    # together (ray/serve/_private/router.py: a queued request holds its slot until it is assigned).
    assert statuses.count(503) >= 1 and statuses.count(200) >= 1
    assert all(b["error"]["code"] == 503 and "overloaded" in b["error"]["message"] for b in bodies)
    # the app lives on
    ok = client.chat.completions.create(model="tiny1", messages=MSGS, max_tokens=4, temperature=0)
    assert ok.choices[0].message.content is not None


def test_stop_deletes_that_app_and_leaves_the_other_serving(small_app, client):
    serve_mod.stop("t2s_small")
    assert requests.get(f"{small_app['url']}/models", timeout=30).status_code == 404
    assert next(m.id for m in client.models.list()) == "tiny"


# --------------------------------------------------------------------------------------------------
# API key (`t2s serve --api-key-env VAR`): a third app beside the others, started through the CLI
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_app(ray_local, tiny_llama_dir, app):
    port = int(app.url.split(":")[2].split("/")[0])
    os.environ[API_KEY_ENV] = API_KEY
    try:
        rc = cli.main([
            "serve", "--model", str(tiny_llama_dir), "--model-id", "tiny2", "--name", "t2s_keyed",
            "--route-prefix", "/keyed", "--port", str(port), "--num-cpus", "0.25", "--api-key-env", API_KEY_ENV,
            "--blocking", "false",
        ])
    finally:
        del os.environ[API_KEY_ENV]  # read once, at start: the app holds only its digest
    assert rc == 0
    yield f"http://127.0.0.1:{port}/keyed/v1"
    serve_mod.stop("t2s_keyed")


def test_openai_client_gets_401_without_the_api_key_and_an_answer_with_it(keyed_app):
    wrong = openai.OpenAI(base_url=keyed_app, api_key="not-the-key", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model="tiny2", messages=MSGS, max_tokens=2)
    assert e.value.response.json()["error"] == {
        "message": "Incorrect API key provided.", "type": "invalid_request_error", "param": "authorization", "code": 401,
    }
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(base_url=keyed_app, api_key=API_KEY, max_retries=0, timeout=120)
    resp = right.chat.completions.create(model="tiny2", messages=MSGS, max_tokens=2, temperature=0)
    assert resp.model == "tiny2" and resp.choices[0].message.content is not None
    assert [m.id for m in right.models.list()] == ["tiny2"]


def test_request_without_authorization_gets_401_before_its_body_is_read_and_health_stays_open(keyed_app):
    root = keyed_app[: -len("/v1")]
    for r in (
        requests.post(f"{keyed_app}/chat/completions", json={"messages": MSGS}, timeout=60),
        requests.post(f"{keyed_app}/chat/completions", data=b"[" * 100, timeout=60),  # not even parsed
        requests.get(f"{keyed_app}/models/tiny2", headers={"authorization": "Basic " + API_KEY}, timeout=60),
    ):
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == 401
    assert "didn't provide an API key" in r.json()["error"]["message"]
    health = requests.get(f"{root}/health", timeout=60)
    assert health.status_code == 200 and health.json()["models"] == ["tiny2"]


def test_api_key_env_that_is_unset_fails_before_ray_starts_and_a_key_is_not_a_name(monkeypatch):
    monkeypatch.delenv("T2S_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="T2S_NO_SUCH_KEY: that environment variable is not set or empty"):
        serve_mod.start(ServeConfig(api_key_env="T2S_NO_SUCH_KEY", blocking=False))
    with pytest.raises(ConfigError, match="name of an environment variable"):
        ServeConfig(api_key_env="sk-live-123")
    with pytest.raises(ConfigError, match="backend 'hf' only"):
        ServeConfig(backend="vllm", api_key_env="T2S_KEY")


def test_check_api_key_accepts_only_the_bearer_key():
    digest = serve_mod.api_key_digest("k1")
    serve_mod.check_api_key("Bearer k1", digest)
    serve_mod.check_api_key("bearer  k1 ", digest)
    serve_mod.check_api_key(None, "")  # no key configured: everything passes
    for header in (None, "", "Bearer", "Bearer k2", "Basic k1", "k1"):
        with pytest.raises(serve_mod.APIError) as e:
            serve_mod.check_api_key(header, digest)
        assert e.value.status == 401


# --------------------------------------------------------------------------------------------------
# Pure parts: request parsing, config, the vLLM backend's arguments
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, depth", [
    (b"{}", 1), (b"3", 0), (b'[1, [2, {"a": [3]}]]', 4), (b'"[[[{{"', 0), (b'{"a": "x\\\"[[["}', 1),
    (b'{"a": "\\\\", "b": [[]]}', 3), (b"[" * 50, 50), (b'"unterminated [[[', 0), (b'["\\', 1),
])
def test_json_depth_counts_nesting_outside_strings(raw, depth):
    assert serve_mod.json_depth(raw) == depth


def test_json_depth_is_linear_on_unterminated_escaped_quotes():
    # One unterminated string of escaped quotes: a pattern that retries from every quote is quadratic here
    # (the plain '"(?:[^"\\]|\\.)*"' took 7 s for 8,000 of them; this is 200,000).
    assert serve_mod.json_depth(b'"' + b'\\"' * 200_000 + b"[") == 0


def test_parse_maps_developer_to_system():
    req = serve_mod.parse_chat_request({"messages": [{"role": "developer", "content": "d"}, {"role": "user", "content": "u"}]},
                                       ["m"], ServeConfig())
    assert req.messages == [{"role": "system", "content": "d"}, {"role": "user", "content": "u"}]


def test_parse_defaults_text_parts_and_optional_model():
    req = serve_mod.parse_chat_request(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]},
        ["m1", "m2"], ServeConfig(default_max_tokens=16),
    )
    assert (req.model, req.messages, req.max_tokens, req.temperature, req.n, req.stream) == (
        "m1", [{"role": "user", "content": "ab"}], 16, 1.0, 1, False
    )


def test_serve_config_rejects_contradictions():
    with pytest.raises(ConfigError, match="default_max_tokens=300 must be in"):
        ServeConfig(max_tokens_limit=256, default_max_tokens=300)
    with pytest.raises(ConfigError, match="max_replicas"):
        ServeConfig(num_replicas=2, max_replicas=1)
    with pytest.raises(ConfigError, match="max_queued_requests"):
        ServeConfig(max_queued_requests=0)
    with pytest.raises(ConfigError, match="only from s3://"):
        ServeConfig(backend="vllm", lora_path="/local/adapters")


# vLLM cannot be installed here (CUDA-only wheel; it would replace torch). `ray.serve.llm` and
# `build_openai_app` need it, so these tests check the arguments we build, validated by Ray's own
# LLMConfig pydantic model, which imports without vLLM from its internal module.


def _llm_config(kwargs: dict):
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    return LLMConfig(**kwargs)


def test_vllm_plan_for_a_model_dir(tiny_llama_dir):
    cfg = ServeConfig(backend="vllm", model=str(tiny_llama_dir), model_id="t2s-8b", num_replicas=1, max_replicas=4,
                      tensor_parallel_size=2, max_model_len=4096, accelerator_type="H100", max_ongoing_requests=48,
                      max_queued_requests=100)
    plan = serve_mod.vllm_plan(cfg)
    assert plan.model_ids == ["t2s-8b"] and len(plan.llm_configs) == 1
    kw = plan.llm_configs[0]
    assert kw["model_loading_config"] == {"model_id": "t2s-8b", "model_source": str(tiny_llama_dir)}
    assert kw["engine_kwargs"] == {"tensor_parallel_size": 2, "max_model_len": 4096, "dtype": "auto"}
    assert kw["deployment_config"] == {
        "max_ongoing_requests": 48, "max_queued_requests": 100,
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 24},
    }
    llm = _llm_config(kw)
    assert llm.model_id == "t2s-8b" and llm.accelerator_type == "H100" and llm.lora_config is None


def test_vllm_plan_serves_a_lora_adapter_from_cloud_storage_on_its_base(adapter_dir, tiny_llama_dir):
    cfg = ServeConfig(backend="vllm", model=str(adapter_dir), model_id="tiny", lora_path="s3://bucket/adapters/",
                      max_loras=3)
    plan = serve_mod.vllm_plan(cfg)
    assert plan.model_ids == ["tiny", f"tiny:{adapter_dir.name}"]
    kw = plan.llm_configs[0]
    assert kw["model_loading_config"]["model_source"] == str(tiny_llama_dir)  # the adapter's base
    assert kw["engine_kwargs"]["enable_lora"] is True and kw["engine_kwargs"]["max_loras"] == 3
    assert kw["engine_kwargs"]["max_lora_rank"] == 8  # r=4 rounded up to a rank vLLM accepts
    llm = _llm_config(kw)
    assert llm.lora_config.dynamic_lora_loading_path == "s3://bucket/adapters"
    assert llm.lora_config.max_num_adapters_per_replica == 3 == kw["engine_kwargs"]["max_loras"]


def test_vllm_plan_serves_the_merged_model_of_a_local_adapter_or_says_what_to_do(tmp_path, adapter_dir):
    cfg = ServeConfig(backend="vllm", model=str(adapter_dir))
    with pytest.raises(ValueError, match="upload it and set serve.lora_path .*t2s train --merge"):
        serve_mod.vllm_plan(cfg)
    run_dir = tmp_path / "sft_lora"
    run_dir.mkdir()
    (run_dir / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    (run_dir / "merged").mkdir()
    (run_dir / "merged" / "config.json").write_text("{}")
    plan = serve_mod.vllm_plan(ServeConfig(backend="vllm", model=str(run_dir)))
    assert plan.model_ids == ["sft_lora"]
    assert plan.llm_configs[0]["model_loading_config"]["model_source"] == str(run_dir / "merged")
    assert "enable_lora" not in plan.llm_configs[0]["engine_kwargs"]


def test_vllm_backend_without_vllm_fails_at_once_with_a_clear_error(tiny_llama_dir):
    with pytest.raises(RuntimeError, match="needs vLLM .* use --backend hf"):
        serve_mod.build_vllm_app(ServeConfig(backend="vllm", model=str(tiny_llama_dir)))
