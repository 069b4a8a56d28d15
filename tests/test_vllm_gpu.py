"""The vllm backend on a real GPU through ray.data.llm (opt-in: `pytest -m gpu`; needs vllm and a CUDA GPU).

    T2S_GPU_TEST_MODEL=/path/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf python -m pytest -m gpu tests/test_vllm_gpu.py

The model (a .gguf, dir or hub name; exported once to $T2S_CACHE) supplies the tokenizer of a tiny random
Llama with a Llama-3-style template (one-BOS test) and is itself generated from (Ray Data test).
"""

from __future__ import annotations

import os
from functools import partial

import pytest

pytestmark = pytest.mark.gpu

MODEL = os.environ.get("T2S_GPU_TEST_MODEL", "")


def chat(text: str) -> list[dict]:
    return [{"role": "system", "content": "You write SQLite SQL."}, {"role": "user", "content": text}]


@pytest.fixture(scope="module")
def gpu_ray():
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    if not MODEL:
        pytest.skip("set T2S_GPU_TEST_MODEL to a .gguf, model dir or hub name")
    import ray

    from text2sql_ray.common import ensure_ray

    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


@pytest.fixture(scope="module")
def tiny_llama3_dir(tmp_path_factory, gpu_ray):
    """A 2-layer random Llama (head size 64, bf16) with a Llama-3-style tokenizer made from MODEL's."""
    import torch
    from chat_tokenizers import llama3_style_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from text2sql_ray.models import resolve_model

    out = tmp_path_factory.mktemp("tiny_llama3")
    tok = llama3_style_tokenizer(resolve_model(MODEL), out)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    return out


def test_vllm_engine_receives_our_prompt_ids_with_one_bos(gpu_ray, tiny_llama3_dir):
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    from transformers import AutoTokenizer

    from text2sql_ray.config import EngineConfig
    from text2sql_ray.engines import (
        prompt_token_ids,
        vllm_preprocess_row,
        vllm_processor_kwargs,
        vllm_prompt_tokens,
    )

    cfg = EngineConfig(backend="vllm", model=str(tiny_llama3_dir), max_new_tokens=4, max_model_len=2048, batch_size=8)
    kwargs = vllm_processor_kwargs(cfg)
    kwargs["engine_kwargs"].update(enforce_eager=True, gpu_memory_utilization=0.3)  # a tiny model: start fast
    processor = build_processor(vLLMEngineProcessorConfig(**kwargs), preprocess=partial(vllm_preprocess_row, cfg=cfg))
    rows = [{"question_id": i, "messages": chat(q)} for i, q in enumerate(["How many schools?", "List names."])]
    ds = vllm_prompt_tokens(gpu_ray.data.from_items(rows), cfg)
    out = {r["__t2s_row"]["question_id"]: r for r in processor(ds).take_all()}
    tok = AutoTokenizer.from_pretrained(tiny_llama3_dir)
    for r in rows:
        got = [int(t) for t in out[r["question_id"]]["prompt_token_ids"]]  # the ids the engine reports it ran
        assert got == prompt_token_ids(tok, r["messages"])
        assert got.count(tok.bos_token_id) == 1 and got[0] == tok.bos_token_id
        assert out[r["question_id"]]["__inference_error__"] == ""
        assert 1 <= int(out[r["question_id"]]["num_generated_tokens"]) <= 4


def test_vllm_generate_through_ray_data_llm_keeps_every_row(gpu_ray):
    from text2sql_ray.config import EngineConfig
    from text2sql_ray.engines import generate, sample_seed

    rows = [
        {"question_id": 0, "db_id": "a", "messages": chat("How many heroes are there? Table hero(id, name).")},
        {"question_id": 1, "db_id": "b", "messages": [{"role": "user"}]},  # broken: no content
        {"question_id": 2, "db_id": "c", "messages": chat("Name of the oldest member? Table member(name, age).")},
    ]
    cfg = EngineConfig(backend="vllm", model=MODEL, temperature=0.8, max_new_tokens=48, max_model_len=4096,
                       batch_size=8, seed=5)
    out = {r["question_id"]: r for r in generate(gpu_ray.data.from_items(rows), cfg, n=3).take_all()}
    assert sorted(out) == [0, 1, 2]
    assert "no text content" in out[1]["gen_error"] and list(out[1]["generations"]) == []
    for qid in (0, 2):
        r = out[qid]
        assert r["gen_error"] == "" and r["db_id"] == rows[qid]["db_id"]
        assert len(r["generations"]) == 3 and all(1 <= int(t) <= 48 for t in r["gen_tokens"])
        assert all(isinstance(t, str) and t for t in r["generations"])
    # three seeds per question (sample_seed), so the samples differ
    assert len({sample_seed(5, "0", j) for j in range(3)}) == 3
    assert len(set(out[0]["generations"]) | set(out[2]["generations"])) >= 4


def test_vllm_greedy_and_samples_in_one_execution(gpu_ray):
    """generate(..., greedy=True): one engine execution gives every row its samples and its temperature-0 text
    (evaluate's maj@k path), and a broken row neither."""
    from text2sql_ray.config import EngineConfig
    from text2sql_ray.engines import generate

    rows = [{"question_id": 0, "messages": chat("How many heroes are there? Table hero(id, name).")},
            {"question_id": 1, "messages": [{"role": "user"}]}]
    cfg = EngineConfig(backend="vllm", model=MODEL, temperature=0.8, max_new_tokens=32, max_model_len=4096,
                       batch_size=8, seed=5)
    out = {r["question_id"]: r for r in generate(gpu_ray.data.from_items(rows), cfg, n=2, greedy=True).take_all()}
    assert len(out[0]["generations"]) == 2 and len(out[0]["greedy_generations"]) == 1
    assert out[0]["greedy_error"] == "" and 1 <= int(out[0]["greedy_tokens"][0]) <= 32
    assert "no text content" in out[1]["greedy_error"] and list(out[1]["greedy_generations"]) == []
