"""`t2s train`: assistant-only labels, packing, the fused loss, LoRA and DeepSpeed ZeRO-2/3 on Ray Train
(2 CPU workers, gloo), rows too long for max_length rejected and listed (never cut), exact resume after a
failure, the output directory, the CLI, the embedded default input.

Real parts only: the tiny 2-layer Llama with SmolLM2's tokenizer and chat template (`tiny_llama_dir`),
an SFT Parquet built here from real BIRD dev questions with their gold SQL as the answer, real Ray.
Three Ray runs are shared between tests through module fixtures (each asserts one property of them).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from pathlib import Path

import pytest

from text2sql_ray import train as T
from text2sql_ray.config import ConfigError, TrainConfig

MAX_LENGTH = 192
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
RUN_FILES = {"manifest.json", "loss_curve.png", "ray_train", "rejected.jsonl", "steps.jsonl", "tensorboard"}
LORA_ARGS = ["--max-steps", "4", "--checkpoint-every", "2", "--max-length", str(MAX_LENGTH), "--packing",
             "--micro-batch-size", "3", "--cpus-per-worker", "0.5", "--lr", "1e-2", "--warmup-ratio", "0",
             "--max-rejected-fraction", "0.9"]


def _conversation(q: dict) -> list[dict]:
    return [
        {"role": "system", "content": "You are a SQLite expert. Answer with one SQL query."},
        {"role": "user", "content": f"Question: {q['question']}\nEvidence: {q['evidence']}"},
        {"role": "assistant", "content": q["SQL"]},
    ]


@pytest.fixture(scope="module")
def sft_rows(bird_dev) -> list[dict]:
    qs = json.loads((bird_dev / "dev.json").read_text())[:24]
    return [{"question_id": q["question_id"], "messages": _conversation(q)} for q in qs]


@pytest.fixture(scope="module")
def sft_parquet(tmp_path_factory, sft_rows) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("sft") / "sft.parquet"
    pq.write_table(pa.Table.from_pylist(sft_rows), path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _cfg(tmp: Path, model: Path, data: Path, **kw) -> TrainConfig:
    base = dict(input=str(data), model=str(model), out=str(tmp), max_steps=4, checkpoint_every=2,
                max_length=MAX_LENGTH, micro_batch_size=2, num_workers=2, cpus_per_worker=0.5, lr=1e-2,
                warmup_ratio=0.0, log_every=1, max_rejected_fraction=0.9)
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------------------------------
# Pure functions (no Ray)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_system", [True, False])
def test_labels_are_ignore_exactly_on_non_assistant_tokens(tokenizer, with_system):
    messages = [
        {"role": "user", "content": "How many schools are in Alameda?"},
        {"role": "assistant", "content": "SELECT COUNT(*) FROM schools WHERE County = 'Alameda'"},
        {"role": "user", "content": "And charter schools?"},
        {"role": "assistant", "content": "SELECT COUNT(*) FROM schools WHERE Charter = 1"},
    ]
    if with_system:
        messages = [{"role": "system", "content": "You write SQLite."}] + messages
    ex = T.tokenize_conversation(messages, tokenizer)
    eos = tokenizer.eos_token
    trained = [i for i, lab in enumerate(ex.labels) if lab != T.IGNORE]
    # labels equal the ids where trained; the trained tokens are the two answers with their <|im_end|>
    assert all(ex.labels[i] == ex.input_ids[i] for i in trained)
    assert tokenizer.decode([ex.input_ids[i] for i in trained]) == (
        messages[-3]["content"] + eos + messages[-1]["content"] + eos
    )
    # everything else (system prompt - SmolLM2's default one when none is given -, user turns,
    # "<|im_start|>assistant\n" headers, the newline after <|im_end|>) is IGNORE
    prompt_text = tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab == T.IGNORE])
    assert ("You write SQLite." in prompt_text) == with_system
    assert ("named SmolLM" in prompt_text) == (not with_system)
    assert prompt_text.count("<|im_start|>assistant\n") == 2 and "SELECT" not in prompt_text
    # same ids as tokenising the whole rendered conversation
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ex.input_ids == tokenizer(full, add_special_tokens=False)["input_ids"]
    assert T.rejection(ex, 4096) == ("", "")


def test_conversation_without_assistant_turn_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="no assistant turn"):
        T.tokenize_conversation([{"role": "user", "content": "hi"}], tokenizer)


def test_an_example_longer_than_max_length_is_rejected_whole_never_cut(tokenizer, sft_rows):
    ex = T.tokenize_conversation(sft_rows[0]["messages"], tokenizer)
    n, p = len(ex.input_ids), ex.n_prompt_tokens
    assert 0 < p < n and ex.labels[p] != T.IGNORE and all(x == T.IGNORE for x in ex.labels[:p])
    assert T.rejection(ex, n) == ("", "")  # fits exactly: trained whole, its end-of-turn included
    reason, detail = T.rejection(ex, n - 1)  # one token too long: the answer would lose its end-of-turn
    assert reason == "too_long" and detail == f"{n} tokens (prompt {p}, answer {n - p}) > max_length {n - 1}"
    assert T.rejection(T.TokenizedExample(ex.input_ids, [T.IGNORE] * n), n)[0] == "no_assistant_tokens"


def test_step_order_depends_only_on_seed_and_step_and_reshuffles_every_epoch():
    n_seq, per_step, spe = 10, 3, 3  # 3 steps per epoch, 1 sequence left over each epoch
    steps = [T.step_sequences(s, n_seq, per_step, spe, seed=7) for s in range(1, 10)]
    assert steps == [T.step_sequences(s, n_seq, per_step, spe, seed=7) for s in range(1, 10)]
    epochs = [list(itertools.chain(*steps[e * spe : (e + 1) * spe])) for e in range(3)]
    assert all(len(set(e)) == per_step * spe for e in epochs)  # no sequence twice within an epoch
    assert len({tuple(e) for e in epochs}) == 3  # a new order every epoch
    assert steps != [T.step_sequences(s, n_seq, per_step, spe, seed=8) for s in range(1, 10)]


def test_packed_layout_keeps_every_example_once_within_max_length():
    lengths = [50, 120, 30, 80, 190, 10, 60]
    seqs = T.layout_sequences(lengths, packing=True, max_length=200, seed=0)
    assert sorted(i for s in seqs for i in s) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in s) <= 200 for s in seqs) and len(seqs) < len(lengths)
    assert seqs == T.layout_sequences(lengths, packing=True, max_length=200, seed=0)
    assert T.layout_sequences(lengths, packing=False, max_length=200, seed=0) == [[i] for i in range(len(lengths))]


def test_packing_keeps_examples_separate(tiny_llama_dir, tokenizer, sft_rows):
    import torch
    from transformers import AutoModelForCausalLM

    examples = []
    for row in sft_rows[:5]:
        ex = T.tokenize_conversation(row["messages"], tokenizer)
        examples.append((ex.input_ids, ex.labels))
    limit = max(len(e[0]) for e in examples) * 2
    packed = T.pack_examples(examples, limit)
    assert sum(p["n_examples"] for p in packed) == 5 and len(packed) < 5  # some sequences hold several
    assert all(len(p["input_ids"]) <= limit for p in packed)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        alone = {tuple(ids): model(torch.tensor([ids])).logits[0] for ids, _ in examples}
    batch = T.collate({k: [p[k] for p in packed] for k in ("input_ids", "labels", "position_ids")},
                      pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        # use_cache=False as in training: with a KV cache transformers does not look for packed sequences
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    seen = 0
    for row, p in enumerate(packed):
        starts = [i for i, pos in enumerate(p["position_ids"]) if pos == 0] + [len(p["input_ids"])]
        assert len(starts) - 1 == p["n_examples"]
        for a, b in itertools.pairwise(starts):
            ids = tuple(p["input_ids"][a:b])
            # the packed example's logits are those it gets alone: no attention across the boundary
            torch.testing.assert_close(logits[row, a:b], alone[ids], atol=2e-4, rtol=1e-4)
            assert p["labels"][a] == T.IGNORE  # nothing learned across a boundary
            seen += 1
    assert seen == 5


def test_frozen_prefix_cache_gives_the_same_loss_and_gradients_without_rerunning_the_frozen_layers(
        tiny_llama_dir, tokenizer, sft_rows, tmp_path):
    """LoRA on the last of 2 layers: with train.frozen_prefix_cache a packed batch's second pass reads layer 0's output
    from the cache (layer 0 does not run) and gives the loss and every LoRA gradient of the plain model; another
    worker reads it from the shared dir instead of running layer 0."""
    import torch

    examples = [T.tokenize_conversation(r["messages"], tokenizer) for r in sft_rows[:4]]
    packed = T.pack_examples([(e.input_ids, e.labels) for e in examples], max(len(e.input_ids) for e in examples) * 2)
    assert len(packed) < 4  # some sequence holds two examples: the packed-sequence mask is exercised
    batch = T.collate({k: [p[k] for p in packed] for k in ("input_ids", "labels", "position_ids")},
                      pad_id=tokenizer.pad_token_id)
    base = {"model": str(tiny_llama_dir), "lora_layers": 1, "lora_targets": "q_proj,v_proj,down_proj", "lora_dropout": 0.0}

    def loss_and_grads(model):
        model.zero_grad(set_to_none=True)
        loss = model(batch["input_ids"], batch["position_ids"], batch["labels"])
        loss.backward()
        return loss.detach(), {n: w.grad.clone() for n, w in model.named_parameters() if w.requires_grad}

    plain, _ = T.build_training_model(TrainConfig(**base), str(tiny_llama_dir), torch.float32, "cpu")
    cached, _ = T.build_training_model(TrainConfig(**base, frozen_prefix_cache=True), str(tiny_llama_dir),
                                       torch.float32, "cpu")
    assert (plain.frozen_prefix, cached.frozen_prefix) == (0, 1)
    plain.train(), cached.train()
    with torch.no_grad():  # LoRA B starts at zero: move it so that every gradient is non-trivial
        for model in (plain, cached):
            torch.manual_seed(1)
            for n, w in model.named_parameters():
                if "lora_B" in n:
                    w.normal_(0, 0.02)
    want_loss, want_grads = loss_and_grads(plain)
    assert want_grads and all(g.abs().sum() > 0 for g in want_grads.values())
    runs = []
    cached.hf_model().get_decoder().layers[0].register_forward_hook(lambda *a: runs.append(1))
    cached.prefix_cache_dir = tmp_path / "shared"
    for n_pass in (1, 2):
        loss, grads = loss_and_grads(cached)
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
        assert grads.keys() == want_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], want_grads[n], rtol=1e-5, atol=1e-7)
        assert (len(runs), cached.prefix_hits, len(cached.prefix_cache)) == (1, n_pass - 1, 1)
    assert len(list((tmp_path / "shared").glob("*.pt"))) == 1 and not list((tmp_path / "shared").glob(".*"))
    # a second worker (its own model and memory) on the same dir: layer 0 never runs there, the loss is the same
    worker2, _ = T.build_training_model(TrainConfig(**base, frozen_prefix_cache=True), str(tiny_llama_dir),
                                        torch.float32, "cpu")
    worker2.load_state_dict(cached.state_dict())
    worker2.train()
    worker2.prefix_cache_dir = tmp_path / "shared"
    runs2 = []
    worker2.hf_model().get_decoder().layers[0].register_forward_hook(lambda *a: runs2.append(1))
    loss2, _ = loss_and_grads(worker2)
    torch.testing.assert_close(loss2, want_loss, rtol=1e-6, atol=1e-6)
    assert (len(runs2), worker2.prefix_hits) == (0, 1) and len(worker2.prefix_cache) == 1
    # the cache key is the sequence: another batch misses and runs layer 0
    other = T.collate({k: [p[k] for p in packed[:1]] for k in ("input_ids", "labels", "position_ids")},
                      pad_id=tokenizer.pad_token_id)
    cached(other["input_ids"], other["position_ids"], other["labels"])
    assert (len(runs), len(cached.prefix_cache)) == (2, 2)


@pytest.fixture(scope="module")
def frozen_prefix_runs(ray_local, tmp_path_factory, tiny_llama_dir, sft_parquet):
    """Two 2-worker LoRA runs, 3 epochs of 5 steps, LoRA on the last of 2 layers: "plain", then "cached" (the frozen
    prefix cache on). Both get NaN gradients injected at steps 8 and 15 (T.NAN_ENV: the stand-in for the poisoned
    batches that the recipe's no-CoT SFT met on the H200, which a tiny CPU model does not produce) and keep a
    checkpoint after step 14, the weights before the last bad step. (One pair of runs serves both tests below.)"""
    from text2sql_ray.cli import main

    tmp = tmp_path_factory.mktemp("frozen")
    args = ["--max-length", str(MAX_LENGTH), "--packing", "--micro-batch-size", "2", "--max-rejected-fraction", "0.9",
            "--lr", "1e-2", "--lora-layers", "1", "--lora-targets", "q_proj,v_proj", "--epochs", "3",
            "--checkpoint-every", "14", "--lora-dropout", "0", "--num-workers", "2", "--cpus-per-worker", "0.5"]
    os.environ[T.NAN_ENV] = "8,15"
    try:
        for name, extra in (("plain", []), ("cached", ["--frozen-prefix-cache", "true"])):
            assert main(["train", "--input", str(sft_parquet), "--model", str(tiny_llama_dir), "--out",
                         str(tmp / name), *args, *extra]) == 0
    finally:
        os.environ.pop(T.NAN_ENV, None)
    return tmp / "plain", tmp / "cached"


@pytest.mark.timeout(900)  # the fixture's two runs happen in whichever of its tests comes first
def test_training_with_frozen_prefix_cache_logs_the_plain_run_s_losses_and_leaves_no_cache(frozen_prefix_runs):
    """The same examples and losses at every step as without the cache (workers trade sequences between epochs
    through the shared dir; both runs skip the same NaN steps), and the cache is gone afterwards."""
    plain_dir, cached_dir = frozen_prefix_runs
    plain, cached = _read_jsonl(plain_dir / "steps.jsonl"), _read_jsonl(cached_dir / "steps.jsonl")
    assert len(plain) == len(cached) == 15 and len({s["epoch"] for s in plain}) == 3
    assert [s["example_ids"] for s in plain] == [s["example_ids"] for s in cached]
    assert [s["loss"] for s in cached] == pytest.approx([s["loss"] for s in plain], rel=1e-6, abs=1e-7)
    assert not (cached_dir / ".frozen_prefix_cache").exists()
    assert json.loads((cached_dir / "manifest.json").read_text())["config"]["frozen_prefix_cache"] is True
    assert json.loads((plain_dir / "manifest.json").read_text())["config"]["frozen_prefix_cache"] is False


def test_frozen_prefix_cache_needs_lora_on_the_last_layers_only():
    with pytest.raises(ConfigError, match="train.lora_layers"):
        TrainConfig(frozen_prefix_cache=True, lora_targets="q_proj,v_proj")
    with pytest.raises(ConfigError, match="method lora or dpo"):
        TrainConfig(frozen_prefix_cache=True, method="full", lora_layers=2, lora_targets="q_proj")


def test_fused_loss_matches_full_logits_loss_and_gradients():
    import torch

    torch.manual_seed(0)
    head = torch.nn.Linear(32, 500, bias=False)
    hidden = torch.randn(45, 32, requires_grad=True)
    target = torch.randint(0, 500, (45,))
    fused = T.linear_cross_entropy_sum(hidden, head, target, "fused", chunk=8)
    fused.backward()
    g_hidden, g_weight = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    plain = T.linear_cross_entropy_sum(hidden, head, target, "logits")
    plain.backward()
    torch.testing.assert_close(fused.detach(), plain.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_hidden, hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_weight, head.weight.grad, rtol=1e-4, atol=1e-6)


def test_deepspeed_presets_get_batch_sizes_from_the_config():
    cfg = TrainConfig(method="full", deepspeed="zero3", micro_batch_size=3, grad_accum=5, max_grad_norm=0.5)
    for name, stage in (("zero2", 2), ("zero3", 3), ("zero3_offload", 3)):
        ds = T.deepspeed_config(T.load_deepspeed_preset(name), cfg, bf16=True)
        assert ds["zero_optimization"]["stage"] == stage
        assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (3, 5)
        assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    with pytest.raises(ValueError, match="'auto'"):
        T.deepspeed_config({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, cfg, bf16=False)
    with pytest.raises(ConfigError, match="method='full'"):
        TrainConfig(method="lora", deepspeed="zero2")


def test_lr_schedule_warms_up_then_decays():
    lrs = [T.lr_multiplier(s, 10, 2, "cosine") for s in range(1, 11)]
    assert lrs[:2] == [0.5, 1.0] and all(a > b for a, b in itertools.pairwise(lrs[1:])) and lrs[-1] > 0
    assert [T.lr_multiplier(s, 10, 2, "constant") for s in (1, 5, 10)] == [0.5, 1.0, 1.0]


# --------------------------------------------------------------------------------------------------
# Ray Train runs (shared by the tests below)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(ray_local, tmp_path_factory, tiny_llama_dir, sft_parquet):
    """`t2s train` through the CLI: LoRA, packing, 4 steps of 6 sequences (an epoch is 3 steps), a checkpoint
    every 2, rows longer than MAX_LENGTH rejected (allowed here up to 90%), and a worker failure injected
    after step 3 that Ray Train recovers from (max_failures=1) by restarting from step 2."""
    from text2sql_ray.cli import main

    out = tmp_path_factory.mktemp("lora") / "out"
    os.environ[T.FAIL_ENV] = "3"
    try:
        rc = main(["train", "--input", str(sft_parquet), "--model", str(tiny_llama_dir), "--out", str(out),
                   *LORA_ARGS, "--max-failures", "1"])
    finally:
        os.environ.pop(T.FAIL_ENV, None)
    return rc, out


@pytest.fixture(scope="module")
def lora_uninterrupted(ray_local, tmp_path_factory, tiny_llama_dir, sft_parquet):
    """The same run as lora_run without the failure."""
    from text2sql_ray.cli import main

    out = tmp_path_factory.mktemp("lora_plain") / "out"
    assert main(["train", "--input", str(sft_parquet), "--model", str(tiny_llama_dir), "--out", str(out), *LORA_ARGS]) == 0
    return out


@pytest.fixture(scope="module")
def zero3_run(ray_local, tmp_path_factory, tiny_llama_dir, sft_parquet):
    """DeepSpeed ZeRO-3 full fine-tuning that crashes after step 3 (checkpoint at 2), then is rerun with
    the same --out and resumes from the checkpoint."""
    out = tmp_path_factory.mktemp("zero3") / "out"
    cfg = _cfg(out, tiny_llama_dir, sft_parquet, method="full", deepspeed="zero3", lr=1e-3)
    os.environ[T.FAIL_ENV] = "3"
    try:
        with pytest.raises(Exception, match="injected failure"):
            T.run(cfg)
    finally:
        os.environ.pop(T.FAIL_ENV, None)
    return T.run(cfg)


@pytest.mark.timeout(900)
def test_cli_train_writes_adapter_dir(lora_run):
    rc, out = lora_run
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "train" and manifest["config"]["method"] == "lora"
    assert manifest["config"]["packing"] is True
    assert manifest["training"]["total_steps"] == 4


@pytest.mark.timeout(900)
def test_lora_output_dir_holds_exactly_the_expected_files_and_reloads(lora_run, tiny_llama_dir):
    from text2sql_ray.models import load_causal_lm

    _, out = lora_run
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"} | TOKENIZER_FILES | RUN_FILES
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_llama_dir)
    model = load_causal_lm(str(out))
    assert type(model).__name__ == "PeftModelForCausalLM"
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(900)
def test_lora_changes_only_adapter_weights(lora_run, tiny_llama_dir):
    import torch

    from text2sql_ray.models import load_causal_lm

    _, out = lora_run
    adapter = _safetensors(out / "adapter_model.safetensors")
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)
    cfg = TrainConfig(model=str(tiny_llama_dir), lora_dropout=0.05)
    init, _ = T.build_training_model(cfg, str(tiny_llama_dir), torch.float32, "cpu")
    init_lora = {k: v for k, v in init.lm.state_dict().items() if "lora_" in k}
    assert len(init_lora) == len(adapter) == 2 * 7 * 2  # A and B, 7 linear layers, 2 decoder layers
    for name, trained in adapter.items():
        before = next(v for k, v in init_lora.items() if k.replace(".default", "") == name)
        assert not torch.equal(before, trained), f"{name} did not change"
    # the base weights under the adapter are byte-identical to the base model's
    base = _safetensors(tiny_llama_dir / "model.safetensors")
    loaded = load_causal_lm(str(out)).get_base_model().state_dict()
    for name, tensor in base.items():
        key = name.replace("proj.weight", "proj.base_layer.weight") if "_proj" in name else name
        assert torch.equal(loaded[key], tensor), name


@pytest.mark.timeout(900)
def test_failed_worker_restarts_at_the_step_after_the_checkpoint(lora_run):
    _, out = lora_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["resumed_from_step"] == [2]
    assert [h["step"] for h in manifest["loss_history"]] == [1, 2, 3, 4]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.timeout(900)
def test_every_row_is_trained_or_listed_as_rejected_with_its_reason(lora_run, tokenizer, sft_rows):
    _, out = lora_run
    data = json.loads((out / "manifest.json").read_text())["data"]
    too_long = {r["question_id"] for r in sft_rows
                if T.rejection(T.tokenize_conversation(r["messages"], tokenizer), MAX_LENGTH)[0] == "too_long"}
    assert 0 < len(too_long) < len(sft_rows)
    rejected = _read_jsonl(out / "rejected.jsonl")
    assert {r["question_id"] for r in rejected} == too_long and {r["reason"] for r in rejected} == {"too_long"}
    assert all(r["n_tokens"] > MAX_LENGTH for r in rejected)
    assert data["rows"] == len(sft_rows) == data["trained"] + data["rejected"]
    assert data["rejected_by_reason"] == {"too_long": len(too_long), "no_assistant_tokens": 0, "bad_conversation": 0}
    trained_ids = {i for s in _read_jsonl(out / "steps.jsonl") for i in s["example_ids"]}
    assert trained_ids and not trained_ids & too_long  # only whole examples are trained on
    assert data["sequences"] < data["trained"]  # packed


@pytest.mark.timeout(900)
def test_resumed_run_sees_exactly_the_examples_and_losses_of_an_uninterrupted_run(lora_run, lora_uninterrupted):
    _, resumed = lora_run
    a, b = _read_jsonl(lora_uninterrupted / "steps.jsonl"), _read_jsonl(resumed / "steps.jsonl")
    assert [s["step"] for s in b] == [1, 2, 3, 4]
    assert [s["example_ids"] for s in b] == [s["example_ids"] for s in a]
    assert [s["loss"] for s in b] == pytest.approx([s["loss"] for s in a], rel=1e-6)
    spe = json.loads((resumed / "manifest.json").read_text())["training"]["steps_per_epoch"]
    assert spe < 4  # the run crosses an epoch boundary, where the order is drawn anew
    assert {tuple(s["example_ids"]) for s in b[:spe]} != {tuple(s["example_ids"]) for s in b[spe : 2 * spe]}


@pytest.mark.timeout(900)
def test_train_writes_tensorboard_events_from_rank_0_only(lora_uninterrupted):
    """TensorBoard is on by default: two workers, one writer (rank 0), every step's loss as the manifest has it."""
    from test_tracking import read_scalars

    events = list((lora_uninterrupted / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    scalars = read_scalars(lora_uninterrupted / "tensorboard")
    manifest = json.loads((lora_uninterrupted / "manifest.json").read_text())
    assert manifest["config"]["num_workers"] == 2 and manifest["config"]["report_to"] == "tensorboard"
    history = manifest["loss_history"]
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([h["loss"] for h in history], rel=1e-6)
    assert {"train/lr", "train/tokens_per_s", "train/grad_norm", "train/label_tokens"} <= set(scalars)


def test_too_many_rejected_rows_fail_the_run_with_a_clear_message(ray_local, tmp_path, tiny_llama_dir, sft_parquet):
    with pytest.raises(ValueError, match=r"would be rejected, more than train.max_rejected_fraction=1.0%.*--max-length"):
        T.run(_cfg(tmp_path / "out", tiny_llama_dir, sft_parquet, max_length=64, max_rejected_fraction=0.01))
    rejected = _read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert len(rejected) > 0 and all(r["reason"] == "too_long" for r in rejected)


def test_schema_budget_that_leaves_no_room_in_max_length_is_an_error(tmp_path, tiny_llama_dir, sft_parquet):
    import shutil

    from text2sql_ray.common import write_manifest
    from text2sql_ray.config import ConvertConfig, PipelineConfig, PromptConfig, check_schema_budget
    from text2sql_ray.prompts import prompt_record

    conv = tmp_path / "convert"
    conv.mkdir()
    shutil.copy(sft_parquet, conv / "train.parquet")
    cc = ConvertConfig(prompt=PromptConfig(max_schema_tokens=6000))
    write_manifest(conv, "convert", cc, 0.0, prompt=prompt_record(cc.prompt, ""))
    with pytest.raises(ConfigError, match=r"max_schema_tokens=6000 leaves -1904 of train.max_length=4096.*"
                                          r"max-schema-tokens to <= 3840.*--max-length to >= 6256"):
        T.run(_cfg(tmp_path / "out", tiny_llama_dir, conv, max_length=4096))
    check_schema_budget(PromptConfig(max_schema_tokens=3840), 4096)  # 256 left: allowed
    with pytest.raises(ConfigError, match="pipeline: prompt.max_schema_tokens=3841"):
        PipelineConfig(convert=ConvertConfig(prompt=PromptConfig(max_schema_tokens=3841)), train=TrainConfig(max_length=4096))


@pytest.mark.timeout(900)
def test_train_without_input_runs_on_the_converted_demo_and_records_its_prompt(ray_local, tmp_path, tiny_llama_dir):
    import dataclasses

    from text2sql_ray.cli import main
    from text2sql_ray.config import PromptConfig

    out = tmp_path / "out"
    assert main(["train", "--model", str(tiny_llama_dir), "--out", str(out), "--max-steps", "3",
                 "--cpus-per-worker", "0.5", "--checkpoint-every", "0"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    conv = json.loads((out / "convert" / "manifest.json").read_text())
    assert manifest["data"]["input"] == str(out / "convert") and manifest["training"]["steps_run"] == 3
    assert manifest["data"]["rows"] == conv["counts"]["train"] == manifest["data"]["trained"] + manifest["data"]["rejected"]
    assert manifest["prompt"]["config"] == dataclasses.asdict(PromptConfig()) == conv["prompt"]["config"]
    assert manifest["prompt"]["tokenizer"] == "" and manifest["prompt"]["manifest"] == str(out / "convert" / "manifest.json")


@pytest.mark.timeout(900)
def test_rerun_with_same_out_resumes_from_latest_checkpoint(zero3_run):
    manifest = json.loads((zero3_run / "manifest.json").read_text())
    assert manifest["training"]["resumed_from_step"] == [2]
    assert manifest["training"]["steps_run"] == 2  # steps 3 and 4; 1 and 2 were not repeated
    assert [h["step"] for h in manifest["loss_history"]] == [1, 2, 3, 4]


def _assert_every_weight_changed(out: Path, base_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    trained, base = _safetensors(out / "model.safetensors"), _safetensors(base_dir / "model.safetensors")
    assert set(trained) == set(base)
    unchanged = [k for k in base if torch.equal(trained[k], base[k])]
    assert unchanged == []
    assert {p.name for p in out.iterdir()} == {"config.json", "generation_config.json", "model.safetensors"} | TOKENIZER_FILES | RUN_FILES
    model = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(model.state_dict()["model.norm.weight"], trained["model.norm.weight"])


@pytest.mark.timeout(900)
def test_deepspeed_zero3_changes_every_weight(zero3_run, tiny_llama_dir):
    _assert_every_weight_changed(zero3_run, tiny_llama_dir)


@pytest.mark.timeout(900)
def test_a_step_with_nan_gradients_makes_no_update_and_too_many_stop_the_run(frozen_prefix_runs):
    """NaN gradients at steps 8 and 15 of the plain frozen_prefix_runs run (two data-parallel workers: both skip the
    same steps): a bad step makes no update, the run goes on and lists it; more than
    max(3, max_nonfinite_fraction x steps) of them stop the run."""
    import torch
    from safetensors.torch import load_file

    out = frozen_prefix_runs[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["nonfinite_steps"] == [8, 15] and manifest["training"]["total_steps"] == 15
    steps = _read_jsonl(out / "steps.jsonl")
    assert [s["step"] for s in steps] == list(range(1, 16))  # the run went on after step 8
    assert all(math.isfinite(s["loss"]) for s in steps)  # the NaN is in the gradients, not the losses
    (ckpt,) = [d for d in (out / "ray_train" / "train").glob("checkpoint_*")  # the other one: the final save
               if d.is_dir() and json.loads((d / "state.json").read_text())["step"] == 14]
    before = load_file(ckpt / "hf" / "adapter_model.safetensors")
    final = load_file(out / "adapter_model.safetensors")
    lora_b = [k for k in before if "lora_B" in k]
    assert before.keys() == final.keys() and all(torch.isfinite(t).all() for t in final.values())
    assert lora_b and any(before[k].abs().sum() > 0 for k in lora_b)  # the good steps did move the adapter
    # step 15 skipped: the very same weights as after step 14
    assert all(torch.equal(before[k], final[k]) for k in before)
    # the stop rule: more than max(3, fraction x total) bad steps
    assert T.nonfinite_error([1, 2, 3], 3, 10, 0.05, [7]) is None
    assert "4 of 4 steps had a NaN/inf" in T.nonfinite_error([1, 2, 3, 4], 4, 10, 0.05, [7])
    assert T.nonfinite_error(list(range(1, 6)), 100, 100, 0.05, [7]) is None
    assert "steps [1, 2, 3, 4, 5, 6]" in T.nonfinite_error(list(range(1, 7)), 100, 100, 0.05, [7])


def test_checkpoints_of_a_run_with_other_options_or_data_are_refused(tmp_path, tiny_llama_dir, sft_parquet):
    """A rerun with the same --out resumes its checkpoints only if they are of the same run: a changed lr (or
    input data) is named in the error instead of being silently continued; bookkeeping options may change."""
    cfg = _cfg(tmp_path / "out", tiny_llama_dir, sft_parquet)
    sha = {str(sft_parquet): T._sha256(sft_parquet)}
    ckpt = tmp_path / "out" / "ray_train" / "train" / "checkpoint_000001"
    ckpt.mkdir(parents=True)
    old = T.trajectory(dataclasses.replace(cfg, lr=0.5), sha)
    (ckpt / "state.json").write_text(json.dumps({"step": 2, "method": cfg.method, "model": cfg.model, "run_id": old}))
    with pytest.raises(ValueError, match=r"other options or data \(lr: 0.5 -> 0.01\).*new --out"):
        T.run(cfg)
    now = T.trajectory(cfg, sha)
    assert T.trajectory_changes({"run_id": now}, T.trajectory(dataclasses.replace(
        cfg, log_every=5, checkpoint_every=9, max_failures=3, merge=False), sha)) == []
    assert [k for k, *_ in T.trajectory_changes({"run_id": now}, T.trajectory(cfg, {"x": "other"}))] == ["input_sha256"]
    # a checkpoint from before run ids: method and model only
    assert T.trajectory_changes({"method": cfg.method, "model": cfg.model}, now) == []
    assert T.trajectory_changes({"method": "full", "model": cfg.model}, now) == [("method", "full", "lora")]


def test_training_on_a_gpu_keeps_sdpa_off_cudnn_and_leaves_the_other_kernels_on():
    """cuDNN's SDPA backward gives NaN query gradients on masked widths of 64 mod 128 (pytorch/pytorch#196678: the
    step-15 NaN of the H200 runs); train_loop_per_worker calls this on a GPU. Only that backend is switched off."""
    import torch

    from text2sql_ray.train import avoid_cudnn_attention

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        avoid_cudnn_attention(torch)
        assert torch.backends.cuda.cudnn_sdp_enabled() is False
        assert torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
