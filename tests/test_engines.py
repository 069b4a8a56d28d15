"""engines.py: the hf backend on the tiny Llama through real Ray Data, the openai backend against a real
local HTTP server, and the vllm backend's config, pre/postprocessing and GPU guard.

vLLM cannot exist here (it is not installed and there is no GPU), so the vllm tests build the real
`ray.data.llm` processor config and processor without running them, and stand in for the vLLM
engine stage with a Ray Data map that produces the engine's output columns (a mock, for that reason).
The prompt token ids the engine would get are real: our tokenization stage runs on the real
tokenizers, and is compared with training's ids and with Ray's own (real) template + tokenize stages.
tests/test_vllm_gpu.py (`pytest -m gpu`) runs the real engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter

import pytest
from fastapi import Request  # module level: handlers' string annotations (PEP 563) must resolve here
from local_http import LocalServer

from text2sql_ray.config import ConfigError, EngineConfig
from text2sql_ray.engines import (
    GREEDY_COLUMNS,
    OUTPUT_COLUMNS,
    GenerationError,
    HFGenerator,
    OpenAIGenerator,
    Sampling,
    VLLMPromptTokens,
    _repeat_generations,
    _vllm_pipeline,
    build_vllm_processor,
    chat_prompt,
    generate,
    generate_messages,
    normalize_messages,
    prefix_groups,
    prompt_token_ids,
    sample_seed,
    split_total,
    vllm_finish_row,
    vllm_preprocess_row,
    vllm_processor_kwargs,
    vllm_prompt_tokens,
)


def chat(text: str) -> list[dict]:
    return [{"role": "system", "content": "You write SQL."}, {"role": "user", "content": text}]


ROWS = [
    {"question_id": 0, "db_id": "a", "messages": chat("How many heroes?")},
    {"question_id": 1, "db_id": "b", "messages": chat("List every member.")},
    {"question_id": 2, "db_id": "c", "messages": [{"role": "user"}]},  # broken: no content
    {"question_id": 3, "db_id": "d", "messages": chat("Average budget per event in 2020?")},
    {"question_id": 4, "db_id": "e", "messages": chat("x")},
]
BROKEN = 2


def by_qid(rows: list[dict]) -> dict[int, dict]:
    return {r["question_id"]: r for r in rows}


# --------------------------------------------------------------------------------------------------
# Pure row logic
# --------------------------------------------------------------------------------------------------


def test_normalize_messages_rejects_unusable_chats_with_a_reason():
    assert normalize_messages(chat("q")) == chat("q")
    assert normalize_messages([{"role": "user", "content": "q", "name": "x"}]) == [
        {"role": "user", "content": "q"}
    ]
    for bad, reason in [
        ("text", "non-empty list"),
        ([], "non-empty list"),
        ([{"role": "user"}], "no text content"),
        (["hi"], "not a"),
    ]:
        with pytest.raises(ValueError, match=reason):
            normalize_messages(bad)


def test_sample_seeds_are_stable_and_distinct_per_row_and_sample():
    assert sample_seed(0, "7", 0) == sample_seed(0, "7", 0)
    seeds = {sample_seed(s, k, j) for s in (0, 1) for k in ("7", "8") for j in range(3)}
    assert len(seeds) == 12 and all(0 <= x < 2**31 for x in seeds)
    assert split_total(10, 3) == [4, 3, 3] and sum(split_total(7, 4)) == 7


def test_engine_config_rejects_contradictions():
    for kwargs in [{"top_p": 0.0}, {"num_cpus": 0}, {"tensor_parallel_size": 0}, {"backend": "openai"}]:
        with pytest.raises(ConfigError):
            EngineConfig(**kwargs)


# --------------------------------------------------------------------------------------------------
# hf: in process (what Serve reuses)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_sampler(tiny_llama_dir):
    return HFGenerator(
        EngineConfig(
            model=str(tiny_llama_dir), temperature=1.0, top_p=0.9, max_new_tokens=6, batch_size=4, seed=5
        )
    )


def test_hf_sampled_row_does_not_depend_on_its_batch_mates(hf_sampler):
    msgs = [r["messages"] for r in ROWS if r["question_id"] != BROKEN]
    together = hf_sampler.generate(msgs, n=3, keys=[0, 1, 3, 4])
    alone = hf_sampler.generate([msgs[2]], n=3, keys=[3])
    assert together[2].texts == alone[0].texts
    assert len(set(together[2].texts)) == 3  # the 3 samples differ from each other
    assert all(1 <= t <= 6 for g in together for t in g.tokens)


def test_prefix_groups_share_long_prefixes_and_keep_every_row():
    schema_a, schema_b = list(range(100, 200)), list(range(300, 390))
    ids = [schema_a + [1, 2], [7, 8, 9], schema_b + [5], schema_a + [3], schema_b + [6, 6], schema_a[:50] + [4]]
    groups = prefix_groups(ids)
    assert sorted(i for members, _ in groups for i in members) == list(range(len(ids)))  # each row once
    assert ([0, 3], 100) in groups and ([2, 4], 90) in groups
    assert groups[-1] == ([1, 5], 0)  # nothing long shared (row 5 has 50 ids of schema a): a plain batch
    # a prefix never swallows a whole prompt: one token is left to continue from
    assert prefix_groups([schema_a, schema_a + [1]]) == [([0, 1], 99)]
    assert prefix_groups([[1] * 10, [1] * 10]) == [([0, 1], 0)]  # shorter than MIN_SHARED_PREFIX


def test_hf_prefix_cache_gives_the_same_generations_as_whole_prompts(tiny_llama_dir):
    """Prompts sharing a schema run it once (a KV cache every row continues from): the same texts and token
    counts as prefilling each prompt whole, greedy and sampled, batch mates of another schema included."""
    schema = "Tables: " + " ".join(f"t{i}(a{i}, b{i}, c{i})" for i in range(40))
    msgs = [chat(f"{schema}\nQuestion {q}: how many rows in t{q}?") for q in range(4)] + [chat("Short, unrelated.")]
    keys = list(range(len(msgs)))
    for temperature, n in ((0.0, 1), (1.0, 3)):
        out = {}
        for on in (False, True):
            g = HFGenerator(EngineConfig(model=str(tiny_llama_dir), temperature=temperature, max_new_tokens=8,
                                         batch_size=8, seed=5, prefix_cache=on))
            out[on] = [(r.texts, r.tokens, r.error) for r in g.generate(msgs, n=n, keys=keys)]
        assert out[True] == out[False], temperature
        assert all(len(texts) == n and not err for texts, _, err in out[True])


def test_hf_per_call_sampling_equals_a_generator_configured_with_it(hf_sampler, tiny_llama_dir):
    msgs = [chat("q"), chat("r")]
    greedy = HFGenerator(EngineConfig(model=str(tiny_llama_dir), temperature=0.0, max_new_tokens=4, seed=5))
    per_call = hf_sampler.generate(msgs, n=2, keys=[1, 2], sampling=Sampling(0.0, 1.0, 4))
    assert [(g.texts, g.tokens) for g in per_call] == [(g.texts, g.tokens) for g in greedy.generate(msgs, n=2, keys=[1, 2])]
    assert all(t <= 4 for g in per_call for t in g.tokens)
    # the call's settings do not stick: the next call without them samples with the config's again
    assert hf_sampler.cfg.temperature == 1.0
    sampled = hf_sampler.generate(msgs, n=2, keys=[1, 2])
    assert sampled[0].texts == hf_sampler.generate(msgs, n=2, keys=[1, 2], sampling=Sampling(1.0, 0.9, 6))[0].texts


def test_hf_stream_deltas_join_to_the_generated_texts_with_their_seeds(hf_sampler):
    import threading

    events: list = []
    stop = threading.Event()
    tokens = hf_sampler.stream(chat("q"), 3, "k", lambda kind, i, payload: events.append((kind, i, payload)), stop)
    whole = hf_sampler.generate([chat("q")], n=3, keys=["k"])[0]
    texts = ["".join(p for kind, i, p in events if kind == "delta" and i == j) for j in range(3)]
    assert texts == whole.texts and tokens == sum(whole.tokens)
    assert sorted(i for kind, i, _ in events if kind == "finish") == [0, 1, 2]
    greedy_events: list = []
    n_tokens = hf_sampler.stream(chat("q"), 2, "k", lambda *e: greedy_events.append(e), stop, Sampling(0.0, 1.0, 5))
    one = hf_sampler.generate([chat("q")], n=2, keys=["k"], sampling=Sampling(0.0, 1.0, 5))[0]
    assert "".join(p for kind, i, p in greedy_events if kind == "delta") == one.texts[0]  # one sequence, index 0
    assert {i for _, i, _ in greedy_events} == {0} and n_tokens == sum(one.tokens)


def test_hf_in_process_records_bad_chats_and_generates_the_rest(hf_sampler):
    out = hf_sampler.generate(["not a list", chat("q")], n=2)
    assert out[0].texts == [] and "non-empty list" in out[0].error
    assert len(out[1].texts) == 2 and out[1].error == ""
    with pytest.raises(GenerationError, match="generation 0 failed"):
        hf_sampler.generate_messages(["not a list", chat("q")])
    texts = hf_sampler.generate_messages([chat("q"), chat("r")], n=2)
    assert [len(t) for t in texts] == [2, 2]


def test_generate_messages_helper_greedy_repeats_one_text(tiny_llama_dir):
    cfg = EngineConfig(model=str(tiny_llama_dir), temperature=0.0, max_new_tokens=5)
    texts = generate_messages([chat("q"), chat("another question")], cfg, n=3)
    assert len(texts) == 2 and all(len(t) == 3 and len(set(t)) == 1 for t in texts)


# --------------------------------------------------------------------------------------------------
# hf: through Ray Data
# --------------------------------------------------------------------------------------------------


def run_hf(ray_local, tiny_llama_dir, n: int, **overrides) -> list[dict]:
    cfg = EngineConfig(
        **{"model": str(tiny_llama_dir), "max_new_tokens": 6, "batch_size": 2, "num_cpus": 0.5, **overrides}
    )
    ds = ray_local.data.from_items(ROWS, override_num_blocks=2)
    return generate(ds, cfg, n=n).take_all()


@pytest.fixture(scope="module")
def hf_greedy_rows(ray_local, tiny_llama_dir):
    return run_hf(ray_local, tiny_llama_dir, 3, temperature=0.0)


def test_hf_every_row_gets_n_generations_and_keeps_its_columns(hf_greedy_rows):
    assert len(hf_greedy_rows) == len(ROWS)
    rows = by_qid(hf_greedy_rows)
    for src in ROWS:
        row = rows[src["question_id"]]
        assert row["db_id"] == src["db_id"] and set(OUTPUT_COLUMNS) <= set(row)
        if src["question_id"] == BROKEN:
            continue
        assert row["gen_error"] == ""
        assert len(row["generations"]) == 3 and all(isinstance(t, str) for t in row["generations"])
        assert len(row["gen_tokens"]) == 3 and all(1 <= t <= 6 for t in row["gen_tokens"])


def test_hf_broken_row_gets_gen_error_and_others_still_generate(hf_greedy_rows):
    rows = by_qid(hf_greedy_rows)
    assert "no text content" in rows[BROKEN]["gen_error"]
    assert list(rows[BROKEN]["generations"]) == [] and list(rows[BROKEN]["messages"]) == [
        {"role": "user", "content": None}
    ]
    assert sum(1 for r in hf_greedy_rows if r["gen_error"] == "") == len(ROWS) - 1


def test_hf_greedy_is_deterministic_across_runs(ray_local, tiny_llama_dir, hf_greedy_rows):
    again = by_qid(run_hf(ray_local, tiny_llama_dir, 3, temperature=0.0))
    for qid, row in by_qid(hf_greedy_rows).items():
        assert list(again[qid]["generations"]) == list(row["generations"])


def test_hf_seeded_sampling_is_reproducible_across_runs_and_batch_sizes(ray_local, tiny_llama_dir):
    first = by_qid(run_hf(ray_local, tiny_llama_dir, 2, temperature=1.0, seed=11))
    second = by_qid(run_hf(ray_local, tiny_llama_dir, 2, temperature=1.0, seed=11, batch_size=1))
    ok = [q for q in first if q != BROKEN]
    assert all(len(first[q]["generations"]) == 2 for q in ok)
    assert all(list(first[q]["generations"]) == list(second[q]["generations"]) for q in ok)


def test_hf_sampling_depends_on_the_seed(hf_sampler):
    msgs = [chat("q"), chat("r")]
    before = hf_sampler.generate(msgs, n=2, keys=[1, 2])
    hf_sampler.cfg = dataclasses.replace(hf_sampler.cfg, seed=hf_sampler.cfg.seed + 1)
    try:
        after = hf_sampler.generate(msgs, n=2, keys=[1, 2])
    finally:
        hf_sampler.cfg = dataclasses.replace(hf_sampler.cfg, seed=hf_sampler.cfg.seed - 1)
    assert all(a.texts != b.texts for a, b in zip(before, after))
    assert [g.texts for g in hf_sampler.generate(msgs, n=2, keys=[1, 2])] == [g.texts for g in before]


def test_hf_without_gpus_refuses_num_gpus_at_once(ray_local, tiny_llama_dir):
    ds = ray_local.data.from_items(ROWS[:1])
    start = time.time()
    with pytest.raises(RuntimeError, match="needs 1 GPU"):
        generate(ds, EngineConfig(model=str(tiny_llama_dir), num_gpus=1))
    assert time.time() - start < 10


# --------------------------------------------------------------------------------------------------
# openai: a real local HTTP server
# --------------------------------------------------------------------------------------------------


class FakeOpenAIServer(LocalServer):
    """A tiny OpenAI-compatible app: /v1 honours `n`, /non/v1 ignores it (returns one choice).

    The text is "<user content>|s<seed>|<choice index>". A prompt starting with "flaky" fails its first
    request with a 500, "broken" always fails with a 500, "slow" sleeps 2 s.
    """

    def __init__(self):
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        self.requests: Counter = Counter()
        app = FastAPI()

        async def completions(request: Request, honour_n: bool):
            body = await request.json()
            prompt = body["messages"][-1]["content"]
            self.requests[prompt] += 1
            if prompt.startswith("broken") or (prompt.startswith("flaky") and self.requests[prompt] == 1):
                return JSONResponse(
                    status_code=500, content={"error": {"message": "boom", "type": "server_error"}}
                )
            if prompt.startswith("slow"):
                await asyncio.sleep(2)
            n = body.get("n", 1) if honour_n else 1
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": f"{prompt}|s{body.get('seed')}|{i}"},
                    "finish_reason": "stop",
                }
                for i in range(n)
            ]
            return {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": choices,
                "usage": {"prompt_tokens": 1, "completion_tokens": 5 * n, "total_tokens": 1 + 5 * n},
            }

        @app.post("/v1/chat/completions")
        async def chat_n(request: Request):
            return await completions(request, honour_n=True)

        @app.post("/non/v1/chat/completions")
        async def chat_no_n(request: Request):
            return await completions(request, honour_n=False)

        @app.get("/v1/models")
        async def models():
            return {
                "object": "list",
                "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "t"}],
            }

        super().__init__(app)



@pytest.fixture(scope="module")
def fake_server():
    with FakeOpenAIServer() as server:
        yield server


def openai_cfg(server, path="/v1", **overrides) -> EngineConfig:
    base = {
        "backend": "openai",
        "endpoint": f"http://127.0.0.1:{server.port}{path}",
        "temperature": 0.7,
        "concurrency": 4,
        "max_retries": 2,
        "request_timeout_s": 10,
    }
    return EngineConfig(**{**base, **overrides})


def test_openai_through_ray_data_retries_then_records_failures_per_row(ray_local, fake_server):
    rows = [
        {"question_id": 10, "messages": chat("ok ten")},
        {"question_id": 11, "messages": chat("flaky eleven")},
        {"question_id": 12, "messages": chat("broken twelve")},
        {"question_id": 13, "messages": [{"role": "user"}]},
    ]
    ds = ray_local.data.from_items(rows, override_num_blocks=2)
    out = by_qid(generate(ds, openai_cfg(fake_server), n=2).take_all())  # model from GET /v1/models
    assert len(out) == 4
    s10 = sample_seed(0, "10", 0)
    assert list(out[10]["generations"]) == [f"ok ten|s{s10}|0", f"ok ten|s{s10}|1"]
    assert list(out[10]["gen_tokens"]) == [5, 5] and out[10]["gen_error"] == ""
    assert fake_server.requests["flaky eleven"] == 2  # failed once with a 500, retried
    assert out[11]["gen_error"] == "" and len(out[11]["generations"]) == 2
    assert fake_server.requests["broken twelve"] == 3  # 1 + max_retries
    assert "InternalServerError" in out[12]["gen_error"] and list(out[12]["generations"]) == []
    assert "no text content" in out[13]["gen_error"]


def test_openai_tops_up_when_the_server_ignores_n(fake_server):
    gen = OpenAIGenerator(openai_cfg(fake_server, path="/non/v1", model="fake-model"))
    [result] = gen.generate([chat("no n here")], n=3, keys=["k"])
    seeds = [sample_seed(0, "k", j) for j in range(3)]
    assert result.texts == [
        f"no n here|s{seeds[0]}|0",
        f"no n here|s{seeds[1]}|0",
        f"no n here|s{seeds[2]}|0",
    ]
    assert result.tokens == [5, 5, 5] and result.error == ""


def test_openai_without_send_n_sends_n_requests_and_greedy_sends_one(fake_server):
    gen = OpenAIGenerator(openai_cfg(fake_server, model="fake-model", send_n=False))
    [result] = gen.generate([chat("one each")], n=3)
    assert fake_server.requests["one each"] == 3 and len(set(result.texts)) == 3
    greedy = OpenAIGenerator(openai_cfg(fake_server, model="fake-model", temperature=0.0))
    assert greedy.generate_messages([chat("greedy once")], n=3) == [["greedy once|sNone|0"] * 3]
    assert fake_server.requests["greedy once"] == 1


def test_openai_request_timeout_becomes_the_row_error(fake_server):
    gen = OpenAIGenerator(openai_cfg(fake_server, model="fake-model", request_timeout_s=0.5, max_retries=0))
    [slow, fast] = gen.generate([chat("slow one"), chat("fast one")])  # the server answers "slow" after 2 s
    assert "Timeout" in slow.error and slow.texts == []
    assert fast.error == "" and fast.texts[0].startswith("fast one|")


# --------------------------------------------------------------------------------------------------
# vllm (cannot run here: no vLLM, no GPU)
# --------------------------------------------------------------------------------------------------


def vllm_cfg(**overrides) -> EngineConfig:
    base = {
        "backend": "vllm",
        "model": "meta-llama/Llama-3.3-70B-Instruct",
        "tensor_parallel_size": 8,
        "concurrency": 2,
        "batch_size": 64,
        "max_model_len": 16384,
        "temperature": 0.8,
        "top_p": 0.95,
        "max_new_tokens": 2048,
    }
    return EngineConfig(**{**base, **overrides})


def test_vllm_processor_config_carries_parallelism_batching_and_error_tolerance():
    from ray.data.llm import vLLMEngineProcessorConfig  # importable without vllm

    kwargs = vllm_processor_kwargs(vllm_cfg(accelerator_type="H100"))
    assert kwargs["model_source"] == "meta-llama/Llama-3.3-70B-Instruct"
    # dtype 'auto' is bf16 on a GPU, as for the hf engine
    assert kwargs["engine_kwargs"] == {"tensor_parallel_size": 8, "max_model_len": 16384, "dtype": "bfloat16"}
    assert (kwargs["concurrency"], kwargs["batch_size"], kwargs["should_continue_on_error"]) == (2, 64, True)
    # our token ids reach the engine: Ray's chat-template and tokenize stages are off
    assert (kwargs["chat_template_stage"], kwargs["tokenize_stage"], kwargs["detokenize_stage"]) == (False, False, True)
    config = vLLMEngineProcessorConfig(**kwargs)
    assert config.engine_kwargs["tensor_parallel_size"] == 8 and config.accelerator_type == "H100"
    assert config.get_concurrency() == {"min_size": 1, "max_size": 2} and config.batch_size == 64
    assert vllm_processor_kwargs(vllm_cfg(dtype="float16"))["engine_kwargs"]["dtype"] == "float16"
    assert vllm_processor_kwargs(vllm_cfg(max_num_seqs=512))["engine_kwargs"]["max_num_seqs"] == 512
    assert vLLMEngineProcessorConfig(**vllm_processor_kwargs(vllm_cfg(max_num_seqs=512))).engine_kwargs["max_num_seqs"] == 512
    # sharing one GPU with another process: a memory fraction and a fixed KV cache (no profiling)
    shared = vllm_processor_kwargs(vllm_cfg(gpu_memory_utilization=0.3, kv_cache_gb=16))["engine_kwargs"]
    assert (shared["gpu_memory_utilization"], shared["kv_cache_memory_bytes"]) == (0.3, 16 * 2**30)
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        vllm_cfg(gpu_memory_utilization=1.5)


def test_vllm_lora_adapter_becomes_base_model_plus_per_row_model(tmp_path, tiny_llama_dir):
    import json

    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(tiny_llama_dir), "r": 12})
    )
    cfg = vllm_cfg(model=str(tmp_path))
    kwargs = vllm_processor_kwargs(cfg)
    assert kwargs["model_source"] == str(tiny_llama_dir)
    assert kwargs["engine_kwargs"]["enable_lora"] is True and kwargs["engine_kwargs"]["max_lora_rank"] == 16
    row = vllm_preprocess_row({"question_id": 1, "messages": chat("q"), "__t2s_prompt_ids": [5, 6]}, cfg,
                              lora=str(tmp_path))
    assert row["model"] == str(tmp_path) and row["tokenized_prompt"] == [5, 6]


def test_vllm_preprocess_sets_token_ids_per_row_sampling_params_and_keeps_the_row():
    cfg = vllm_cfg(seed=3)
    src = {"question_id": 7, "messages": chat("q"), "db_id": "x"}
    tokens = {"__t2s_prompt_ids": [11, 12, 13], "__t2s_input_error": ""}
    row = vllm_preprocess_row({**src, **tokens, "__t2s_sample": 2, "__t2s_uid": "u"}, cfg)
    assert row["tokenized_prompt"] == [11, 12, 13] and "messages" not in row and "prompt" not in row
    assert row["__t2s_row"] == src and row["__t2s_input_error"] == ""
    greedy_row = vllm_preprocess_row({**src, **tokens, "__t2s_sample": -1, "__t2s_uid": "u"}, cfg)
    assert greedy_row["sampling_params"]["temperature"] == 0.0  # generate(..., greedy=True)'s extra row
    assert row["sampling_params"] == {
        "n": 1,
        "temperature": 0.8,
        "top_p": 0.95,
        "max_tokens": 2048,
        "seed": sample_seed(3, "7", 2),
        "detokenize": False,
    }
    bad = vllm_preprocess_row(
        {"question_id": 8, "messages": [], "__t2s_prompt_ids": [], "__t2s_input_error": "ValueError: empty"}, cfg
    )
    assert bad["__t2s_input_error"] == "ValueError: empty" and bad["sampling_params"]["max_tokens"] == 1
    assert bad["tokenized_prompt"] == [0]  # a one-token placeholder: the row still comes back
    untokenized = vllm_preprocess_row({"question_id": 9, "messages": chat("q")}, cfg)
    assert "VLLMPromptTokens" in untokenized["__t2s_input_error"]
    ok = vllm_finish_row({**row, "generated_text": "SELECT 1", "num_generated_tokens": 3}, grouped=False)
    assert ok == {**src, "generations": ["SELECT 1"], "gen_tokens": [3], "gen_error": ""}
    assert _repeat_generations(ok, n=2)["generations"] == ["SELECT 1", "SELECT 1"]
    done = vllm_finish_row(
        {**bad, "generated_text": ".", "num_generated_tokens": 1, "__inference_error__": ""}, grouped=False
    )
    assert done == {
        "question_id": 8,
        "messages": [],
        "generations": [],
        "gen_tokens": [],
        "gen_error": "ValueError: empty",
    }


def test_vllm_backend_without_gpus_raises_clearly_and_quickly(ray_local):
    ds = ray_local.data.from_items(ROWS)
    start = time.time()
    with pytest.raises(RuntimeError, match=r"needs 8 GPU\(s\) but the Ray cluster has 0"):
        generate(ds, vllm_cfg())
    assert time.time() - start < 10


def test_vllm_processor_builds_with_our_stages_and_settings(ray_local, tiny_llama_dir):
    proc = build_vllm_processor(
        vllm_cfg(model=str(tiny_llama_dir), tensor_parallel_size=1), n=2, require_gpu=False
    )
    assert proc.list_stage_names() == ["vLLMEngineStage", "DetokenizeStage"]
    engine = proc.get_stage_by_name("vLLMEngineStage")
    assert engine.fn_constructor_kwargs["engine_kwargs"]["tensor_parallel_size"] == 1
    assert engine.fn_constructor_kwargs["should_continue_on_error"] is True
    assert engine.fn_constructor_kwargs["batch_size"] == 64


# --------------------------------------------------------------------------------------------------
# One BOS: the ids vLLM gets are the ids training and the hf engine use (issue 10, item 9)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama3_tok_dir(tmp_path_factory, smol_dir):
    from chat_tokenizers import llama3_style_tokenizer

    out = tmp_path_factory.mktemp("llama3_style_tok")
    llama3_style_tokenizer(smol_dir, out)
    return out


def ray_stage_ids(model_dir, messages) -> list[int]:
    """The ids Ray 2.60's own ray.data.llm stages would send vLLM: its real ChatTemplateUDF + TokenizeUDF."""
    from ray.llm._internal.batch.stages.chat_template_stage import ChatTemplateUDF
    from ray.llm._internal.batch.stages.tokenize_stage import TokenizeUDF

    async def run():
        template = ChatTemplateUDF("__data", ["messages"], model=str(model_dir))
        (templated,) = [r async for r in template.udf([{"messages": messages, "__idx_in_batch": 0}])]
        tokenize = TokenizeUDF("__data", ["prompt"], model=str(model_dir))
        (tokenized,) = [r async for r in tokenize.udf([{"prompt": templated["prompt"], "__idx_in_batch": 0}])]
        return tokenized["tokenized_prompt"]

    return list(asyncio.run(run()))


@pytest.mark.parametrize("template", ["llama3", "chatml"])
def test_vllm_prompt_ids_equal_training_and_hf_ids_with_one_bos(template, llama3_tok_dir, smol_dir):
    from transformers import AutoTokenizer

    from text2sql_ray.train import IGNORE, tokenize_conversation

    model_dir = llama3_tok_dir if template == "llama3" else smol_dir
    tok = AutoTokenizer.from_pretrained(model_dir)
    msgs = chat("How many members joined in 2019?")
    ours, error = VLLMPromptTokens(str(model_dir)).ids(msgs)
    assert error == "" and ours == prompt_token_ids(tok, msgs)

    # training: the ids before the answer, unlabelled, are exactly ours
    answer = {"role": "assistant", "content": "SELECT COUNT(*) FROM member"}
    trained = tokenize_conversation([*msgs, answer], tok)
    assert trained.input_ids[: len(ours)] == ours
    assert set(trained.labels[: len(ours)]) == {IGNORE} and trained.labels[len(ours)] != IGNORE

    # the hf engine's batch encoding (left padding removed) is the same ids
    hf = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    hf.pad_token = hf.pad_token or hf.eos_token
    enc = hf([chat_prompt(hf, msgs), chat_prompt(hf, chat("x"))], add_special_tokens=False, padding=True)
    row0 = [t for t, m in zip(enc["input_ids"][0], enc["attention_mask"][0]) if m]
    assert row0 == ours

    ray_ids = ray_stage_ids(model_dir, msgs)
    if template == "llama3":
        bos = tok.bos_token_id
        assert ours.count(bos) == 1 and ours[0] == bos
        assert ray_ids == [bos, *ours]  # what Ray's own stages would send: a second BOS in front
    else:
        assert ray_ids == ours  # ChatML adds no BOS: both paths agree


def test_vllm_prompt_tokens_stage_on_ray_data_records_bad_rows(ray_local, llama3_tok_dir):
    tok_ids = VLLMPromptTokens(str(llama3_tok_dir))
    ds = ray_local.data.from_items(ROWS, override_num_blocks=2)
    out = by_qid(vllm_prompt_tokens(ds, vllm_cfg(model=str(llama3_tok_dir))).take_all())
    assert sorted(out) == [r["question_id"] for r in ROWS]
    for r in ROWS:
        row = out[r["question_id"]]
        if r["question_id"] == BROKEN:
            assert "no text content" in row["__t2s_input_error"] and list(row["__t2s_prompt_ids"]) == []
        else:
            assert row["__t2s_input_error"] == ""
            assert list(row["__t2s_prompt_ids"]) == tok_ids.ids(r["messages"])[0]
            assert row["db_id"] == r["db_id"]


def fake_vllm_processor(ds):
    """Stands in for the vLLM processor (vLLM cannot run here): runs our preprocess, answers like the
    engine (generated_text/num_generated_tokens), and fails one row as should_continue_on_error does.
    Its text names the prompt's length and first id, so tests see which ids the engine got."""
    from functools import partial

    cfg = vllm_cfg()

    def engine(row):
        if row["__t2s_row"]["question_id"] == 3 and row["__t2s_sample"] == 1:
            return {**row, "__inference_error__": "CUDA out of memory", "generated_text": ""}
        p, ids = row["sampling_params"], list(row["tokenized_prompt"])
        text = f"{len(ids)}:{ids[0]}|seed={p['seed']}" + ("|greedy" if p["temperature"] == 0 else "")
        return {
            **row,
            "prompt": "",
            "generated_text": text,
            "num_generated_tokens": 4,
            "__inference_error__": "",
        }

    return ds.map(partial(vllm_preprocess_row, cfg=cfg)).map(engine)


def test_vllm_pipeline_expands_samples_and_regroups_rows(ray_local, llama3_tok_dir):
    ds = ray_local.data.from_items(ROWS, override_num_blocks=2)
    ds = vllm_prompt_tokens(ds, vllm_cfg(model=str(llama3_tok_dir)))
    out = by_qid(_vllm_pipeline(ds, fake_vllm_processor, n=2, num_partitions=2).take_all())
    assert len(out) == len(ROWS)
    row0 = out[0]
    assert set(row0) == {"question_id", "db_id", "messages", *OUTPUT_COLUMNS}
    seeds = [sample_seed(0, "0", j) for j in range(2)]
    ids = VLLMPromptTokens(str(llama3_tok_dir)).ids(ROWS[0]["messages"])[0]
    assert list(row0["generations"]) == [f"{len(ids)}:{ids[0]}|seed={s}" for s in seeds]
    assert list(row0["gen_tokens"]) == [4, 4] and row0["gen_error"] == ""
    assert "no text content" in out[BROKEN]["gen_error"] and list(out[BROKEN]["generations"]) == []
    assert out[3]["gen_error"] == "CUDA out of memory" and len(out[3]["generations"]) == 1


def test_vllm_pipeline_greedy_rides_along_with_the_samples(ray_local, llama3_tok_dir):
    """generate(..., greedy=True): one execution gives each row its k samples and, in its own columns, one
    temperature-0 generation (a sampled row's failure stays with the samples)."""
    ds = ray_local.data.from_items(ROWS, override_num_blocks=2)
    ds = vllm_prompt_tokens(ds, vllm_cfg(model=str(llama3_tok_dir)))
    out = by_qid(_vllm_pipeline(ds, fake_vllm_processor, n=2, num_partitions=2, greedy=True).take_all())
    assert len(out) == len(ROWS)
    assert set(out[0]) == {"question_id", "db_id", "messages", *OUTPUT_COLUMNS, *GREEDY_COLUMNS}
    ids = VLLMPromptTokens(str(llama3_tok_dir)).ids(ROWS[0]["messages"])[0]
    assert list(out[0]["generations"]) == [f"{len(ids)}:{ids[0]}|seed={sample_seed(0, '0', j)}" for j in range(2)]
    assert list(out[0]["greedy_generations"]) == [f"{len(ids)}:{ids[0]}|seed={sample_seed(0, '0', -1)}|greedy"]
    assert list(out[0]["greedy_tokens"]) == [4] and out[0]["greedy_error"] == ""
    # question 3's sample 1 failed in the engine: its samples say so, its greedy answer is there
    assert out[3]["gen_error"] == "CUDA out of memory" and len(out[3]["generations"]) == 1
    assert out[3]["greedy_error"] == "" and next(iter(out[3]["greedy_generations"])).endswith("|greedy")
    # a row with unusable messages: neither samples nor a greedy answer, both with the reason
    assert "no text content" in out[BROKEN]["gen_error"] and "no text content" in out[BROKEN]["greedy_error"]
    assert list(out[BROKEN]["greedy_generations"]) == []
    # n=1 with greedy=True: still grouped, one sample and one greedy text per row
    ds1 = vllm_prompt_tokens(ray_local.data.from_items(ROWS[:2]), vllm_cfg(model=str(llama3_tok_dir)))
    one = by_qid(_vllm_pipeline(ds1, fake_vllm_processor, n=1, greedy=True).take_all())
    assert [len(one[q]["generations"]) for q in (0, 1)] == [1, 1]
    assert all(next(iter(one[q]["greedy_generations"])).endswith("|greedy") for q in (0, 1))


def test_greedy_with_the_samples_is_refused_off_vllm(ray_local):
    with pytest.raises(ValueError, match="vllm backend"):
        generate(ray_local.data.from_items(ROWS), vllm_cfg(backend="hf"), n=2, greedy=True)
