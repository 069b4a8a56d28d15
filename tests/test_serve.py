"""`t2s serve` (backend 'hf'): a real Ray Serve app on CPU with the tiny Llama and a LoRA adapter on it,
called through the real `openai` client and raw HTTP. Plus the 'vllm' backend's config (pure: vLLM
cannot be installed here, see test_vllm_*).
"""

from __future__ import annotations

import contextlib
import io
import json
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
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_gets_400_with_an_openai_error_body(app, case):
    body, message = MALFORMED[case]
    r = post(app, body, raw=isinstance(body, str))
    assert r.status_code == 400
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error" and err["code"] == 400


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
# Pure parts: request parsing, config, the vLLM backend's arguments
# --------------------------------------------------------------------------------------------------


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
