"""`t2s train --method dpo`: the DPO loss against a by-hand full-logits computation, the reference model (the
starting checkpoint, never changing), the margin growing under real optimisation, pair building that accounts
for every question and sample, and an end-to-end run through Ray Train that writes SFT's output format and
resumes after a worker failure.

Real parts: the tiny 2-layer Llama with SmolLM2's tokenizer (`tiny_llama_dir`), real BIRD dev questions as the
prompts, real Ray. The synthesize output of the end-to-end run is written here in synthesize's own format
(`synthesize.samples_schema`, its manifest), since a random tiny model never writes a verified query; a real
`t2s synthesize` with a `t2s train` output as its engine.model (the on-policy step) runs once too.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from text2sql_ray import dpo as D
from text2sql_ray import synthesize as S
from text2sql_ray import train as T
from text2sql_ray.common import write_manifest
from text2sql_ray.config import ConfigError, SynthesizeConfig, TrainConfig

MAX_LENGTH = 256
SYSTEM = "You are a SQLite expert. Answer with one SQL query."


def _prompt(q: dict) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Question: {q['question']}\nEvidence: {q['evidence']}"}]


def _cot(sql: str) -> str:
    return f"Find the table, then filter.\n```sql\n{sql}\n```"


@pytest.fixture(scope="module")
def questions(bird_dev) -> list[dict]:
    present = {p.name for p in (bird_dev / "dev_databases").iterdir()}  # 3 of 11 databases are on disk
    qs = json.loads((bird_dev / "dev.json").read_text())
    return [q for q in qs if q["db_id"] in present and len(q["question"]) + len(q["evidence"]) + len(q["SQL"]) < 260][:12]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _batch(tokenizer, pairs: list[tuple[list[dict], str, str]]) -> dict:
    """A DPO micro-batch as the loop builds it: the chosen conversations, then the rejected ones."""
    rows: dict[str, list] = {"input_ids": [], "labels": []}
    for side in (1, 2):
        for p in pairs:
            ex = T.tokenize_conversation(p[0] + [{"role": "assistant", "content": p[side]}], tokenizer)
            rows["input_ids"].append(ex.input_ids)
            rows["labels"].append(ex.labels)
    return T.collate(rows, tokenizer.pad_token_id)


def _hand_logprobs(model, b):
    """Summed log-probs of the labelled tokens from the full [batch x tokens x vocab] logits (no chunks)."""
    logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits.float()
    logp = logits[:, :-1].log_softmax(-1)
    target = b["labels"][:, 1:]
    mask = target != T.IGNORE
    tok = logp.gather(2, target.clamp(min=0)[..., None]).squeeze(-1)
    return (tok * mask).sum(1)


def _inputs(b):
    return {k: b[k] for k in ("input_ids", "position_ids", "labels")}


@pytest.fixture(scope="module")
def hand_pairs(questions):
    return [(_prompt(q), _cot(q["SQL"]), _cot("SELECT 'no such answer'")) for q in questions[:2]] + [
        (_prompt(questions[2]), _cot(questions[2]["SQL"]), "I cannot tell which table holds this.")]


# --------------------------------------------------------------------------------------------------
# (a) the loss equals a by-hand computation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("label_smoothing", "sft_weight"), [(0.0, 0.0), (0.25, 0.0), (0.0, 0.5)])
def test_dpo_loss_and_gradients_equal_a_full_logits_computation(tiny_llama_dir, tokenizer, hand_pairs, label_smoothing,
                                                                sft_weight):
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    beta = 0.5
    cfg = TrainConfig(method="dpo", lora_dropout=0.0, dpo_beta=beta, dpo_label_smoothing=label_smoothing,
                      dpo_sft_weight=sft_weight)
    wrapper, _ = T.build_training_model(cfg, str(tiny_llama_dir), torch.float32, "cpu")
    assert wrapper.loss_impl == "fused"
    wrapper.chunk = 7  # several chunks per sequence
    with torch.no_grad():  # a policy that differs from the reference
        for name, p in wrapper.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    b = _batch(tokenizer, hand_pairs)
    sums = wrapper(**_inputs(b), dpo=(beta, label_smoothing, sft_weight))
    sums[0].backward()
    lora = {n: p for n, p in wrapper.lm.named_parameters() if p.requires_grad}
    ours = {n: p.grad.clone() for n, p in lora.items()}
    for p in lora.values():
        p.grad = None

    policy = _hand_logprobs(wrapper.lm, b)
    reference_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        reference = _hand_logprobs(reference_model, b)
    m = len(hand_pairs)
    z = beta * ((policy[:m] - reference[:m]) - (policy[m:] - reference[m:]))
    # RPO's term: the chosen answer's mean NLL per token, its tokens counted from the labels by hand
    n_chosen = torch.tensor([sum(1 for t in row[1:] if t != T.IGNORE) for row in b["labels"][:m].tolist()])
    chosen_nll = -policy[:m] / n_chosen
    loss = (-(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
            + sft_weight * chosen_nll).sum()
    loss.backward()
    assert abs(float(z.detach().abs().max())) > 0.01  # the case is not trivial (policy != reference)
    # fp32 sums of ~60 token log-probs of ~-11 each: the two summation orders differ by ~1e-4 per sequence
    with torch.no_grad():
        torch.testing.assert_close(wrapper.sequence_logprobs(**_inputs(b)), policy.detach(), rtol=1e-6, atol=0.0)
    torch.testing.assert_close(sums[0].detach(), loss.detach(), rtol=0.0, atol=2e-4)
    torch.testing.assert_close(sums[1], z.detach().sum(), rtol=0.0, atol=2e-4)
    assert float(sums[2].detach()) == float((z.detach() > 0).sum())
    torch.testing.assert_close(sums[3] - sums[4], sums[1], rtol=0.0, atol=1e-5)
    torch.testing.assert_close(sums[5], chosen_nll.detach().sum(), rtol=1e-5, atol=0.0)  # reported at any weight
    for n, p in lora.items():  # the same fp32 noise: within 1e-4 of each tensor's largest gradient
        assert float((ours[n] - p.grad).abs().max()) <= 1e-4 * float(p.grad.abs().max()), n


def test_chunked_token_logprobs_match_log_softmax_and_its_gradient():
    import torch

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False).requires_grad_(False)
    hidden = torch.randn(23, 16, requires_grad=True)
    target = torch.randint(0, 300, (23,))
    weights = torch.randn(23)  # a different upstream gradient per token, as DPO's per-sequence weights give
    ours = T.linear_token_logprobs(hidden, head, target, "fused", chunk=5)
    (ours * weights).sum().backward()
    g = hidden.grad.clone()
    hidden.grad = None
    plain = head(hidden).log_softmax(-1).gather(1, target[:, None]).squeeze(1)
    (plain * weights).sum().backward()
    torch.testing.assert_close(ours.detach(), plain.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, hidden.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="frozen lm_head"):
        T.linear_token_logprobs(hidden, head.requires_grad_(True), target, "fused")


# --------------------------------------------------------------------------------------------------
# (b) the reference is the starting SFT model and never changes; (c) the margin grows
# --------------------------------------------------------------------------------------------------


def _sft_adapter(tiny_llama_dir: Path, out: Path) -> Path:
    """A LoRA `t2s train` output as SFT leaves it: adapter (random, non-zero B) + tokenizer, no merged/."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False, task_type="CAUSAL_LM"))
    peft.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_llama_dir)
    return out


@pytest.fixture(scope="module")
def dpo_steps(tmp_path_factory, tiny_llama_dir, tokenizer, hand_pairs):
    """Six real optimizer steps of DPO from an SFT LoRA output on the hand-made pairs (train's own
    build_training_model / forward_backward), the reference and policy log-probs before and after."""
    import torch

    from text2sql_ray.models import load_causal_lm

    tmp = tmp_path_factory.mktemp("dpo_steps")
    sft = _sft_adapter(tiny_llama_dir, tmp / "sft")
    start = T.starting_model(str(sft), tmp / "out")
    b = _batch(tokenizer, hand_pairs)
    m = len(hand_pairs)

    def build(sft_weight: float):
        """A new LoRA on `start` (B = 0: the policy equals the reference until a step)."""
        cfg = TrainConfig(method="dpo", lora_dropout=0.0, dpo_beta=0.1, dpo_sft_weight=sft_weight)
        return T.build_training_model(cfg, start, torch.float32, "cpu")[0]

    def six_steps(model, sft_weight: float) -> list[float]:
        """Six AdamW steps through train's forward_backward; each step's mean margin."""
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        margins = []
        for _ in range(6):
            sums = T.forward_backward(model, [b], 1.0 / m, None, torch.device("cpu"), dpo=(0.1, 0.0, sft_weight))
            margins.append(float(sums[1]) / m)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return margins

    def reference(model):
        with torch.no_grad(), model.lm.disable_adapter():
            return model.sequence_logprobs(**_inputs(b))

    with torch.no_grad():
        sft_logp = _hand_logprobs(load_causal_lm(str(sft), dtype="float32"), b)
        base_logp = _hand_logprobs(load_causal_lm(str(tiny_llama_dir), dtype="float32"), b)
    wrapper = build(0.0)  # plain DPO
    ref_before = reference(wrapper)
    margins = six_steps(wrapper, 0.0)
    with torch.no_grad():
        policy_after = wrapper.sequence_logprobs(**_inputs(b))
        margins.append(float(D.dpo_sums(policy_after, reference(wrapper), 0.1, 0.0,
                                        n_tokens=torch.ones_like(policy_after))[1]) / m)
    # the same six steps from the same start with RPO's NLL term on the chosen answers (weight 1)
    rpo = build(1.0)
    rpo_margins = six_steps(rpo, 1.0)
    with torch.no_grad():
        rpo_after = rpo.sequence_logprobs(**_inputs(b))
    return {"start": start, "out": tmp / "out", "sft_logp": sft_logp, "base_logp": base_logp,
            "ref_before": ref_before, "ref_after": reference(wrapper), "policy_after": policy_after, "margins": margins,
            "rpo_after": rpo_after, "rpo_margins": rpo_margins, "m": m}


def test_a_lora_starting_checkpoint_is_merged_once_into_out_base(dpo_steps):
    assert dpo_steps["start"] == str(dpo_steps["out"] / "base")
    assert (dpo_steps["out"] / "base" / "config.json").is_file()
    assert not (dpo_steps["out"] / "base" / "adapter_config.json").exists()  # a plain model dir


def test_the_reference_is_the_starting_sft_model(dpo_steps):
    import torch

    torch.testing.assert_close(dpo_steps["ref_before"], dpo_steps["sft_logp"], rtol=1e-5, atol=1e-4)
    assert float((dpo_steps["sft_logp"] - dpo_steps["base_logp"]).abs().max()) > 0.1  # and not the SFT's base


def test_the_reference_never_changes_while_the_policy_does(dpo_steps):
    import torch

    assert torch.equal(dpo_steps["ref_before"], dpo_steps["ref_after"])
    assert float((dpo_steps["policy_after"] - dpo_steps["ref_after"]).abs().max()) > 1e-3


def test_the_chosen_minus_rejected_margin_grows_over_the_steps(dpo_steps):
    margins = dpo_steps["margins"]
    assert margins[0] == 0.0  # a new LoRA (B = 0): the policy is exactly the reference
    assert all(b > a for a, b in itertools.pairwise(margins)), margins
    assert margins[-1] > 0.05


def test_the_nll_term_keeps_the_chosen_answers_likelier_than_plain_dpo_does(dpo_steps):
    """dpo_sft_weight (RPO): the same steps from the same start end with every chosen answer likelier than after
    plain DPO's steps, and the margin still grows (the H200's plain DPO made its chosen chains less likely)."""
    m, ref = dpo_steps["m"], dpo_steps["ref_after"]
    plain, rpo = dpo_steps["policy_after"][:m], dpo_steps["rpo_after"][:m]
    assert all(float(r) > float(p) for r, p in zip(rpo, plain)), (rpo, plain)
    assert float((rpo - ref[:m]).sum()) > float((plain - ref[:m]).sum())
    assert dpo_steps["rpo_margins"][0] == 0.0 and dpo_steps["rpo_margins"][-1] > dpo_steps["rpo_margins"][1] > 0


# --------------------------------------------------------------------------------------------------
# (d) pair building accounts for every question and sample
# --------------------------------------------------------------------------------------------------


def _sample(qid: int, j: int, status: str, text: str = "", sql: str = "", gold_error: str | None = None) -> dict:
    return {"question_id": qid, "db_id": "db", "difficulty": "simple", "sample_index": j, "text": text, "sql": sql,
            "correct": status == "verified", "exec_error": None, "gold_error": gold_error, "timed_out": False,
            "gen_error": "boom" if status == "gen_error" else None, "gen_tokens": 5, "status": status}


def _conv(qid: int) -> dict:
    return {"question_id": qid, "db_id": "db", "gold_sql": "SELECT 1",
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question: q{qid}"},
                         {"role": "assistant", "content": "```sql\nSELECT 1\n```"}]}


def _samples_for_accounting() -> list[dict]:
    good, good2 = _cot("SELECT 1"), _cot("SELECT 1 AS one")
    bad, bad2 = _cot("SELECT 2"), _cot("SELECT 3")
    return [
        # 1: no samples at all (in the input only)
        _sample(2, 0, "verified", good, "SELECT 1"), _sample(2, 1, "verified", good2, "SELECT 1 AS one"),  # only chosen
        _sample(3, 0, "wrong", bad, "SELECT 2"), _sample(3, 1, "no_sql", "no idea"),  # only rejected
        _sample(4, 0, "gen_error"), _sample(4, 1, "unverified", good, "SELECT 1"),  # nothing usable
        _sample(5, 0, "exec_error", bad, "SELECT 2", gold_error="no such table"),  # gold failed: nothing known
        _sample(6, 0, "verified", good2, "SELECT 1 AS one"), _sample(6, 1, "verified", good, "SELECT 1"),
        _sample(6, 2, "verified", good, "SELECT 1"),  # a duplicate answer
        _sample(6, 3, "wrong", bad, "SELECT 2"), _sample(6, 4, "exec_error", bad2, "SELECT 3"),
        _sample(6, 5, "no_sql", "I give up."), _sample(6, 6, "gen_error"),
        _sample(7, 0, "verified", good, "SELECT 1"), _sample(7, 1, "wrong", bad, "SELECT 2"),
    ]


def _assert_every_sample_once(built: D.Pairs, samples: list[dict]) -> None:
    """Every sample is in a pair or listed as unused, never both, none twice in the list."""
    used = {(p["question_id"], p["chosen_sample_index"]) for p in built.pairs} | {
        (p["question_id"], p["rejected_sample_index"]) for p in built.pairs}
    listed = [(u["question_id"], u["sample_index"]) for u in built.unused]
    assert len(listed) == len(set(listed)) and not used & set(listed)
    assert used | set(listed) == {(s["question_id"], s["sample_index"]) for s in samples}
    assert built.samples == len(samples)


def test_pair_building_accounts_for_every_question_and_sample():
    samples = _samples_for_accounting()
    conv = {q: _conv(q) for q in range(1, 8)}
    built = D.build_pairs(samples, conv, 2, ("verified",), ("wrong", "exec_error", "no_sql"))
    assert built.questions == {"no_samples": 1, "only_chosen": 1, "only_rejected": 1, "no_usable_samples": 2,
                               "length_gap": 0, "paired": 2, "total": 7}
    assert sum(v for k, v in built.questions.items() if k != "total") == len(conv)
    _assert_every_sample_once(built, samples)
    reasons = {(u["question_id"], u["sample_index"]): u["reason"] for u in built.unused}
    assert reasons == {(2, 0): "no_counterpart", (2, 1): "no_counterpart", (3, 0): "no_counterpart",
                       (3, 1): "no_counterpart", (4, 0): "status_not_used", (4, 1): "status_not_used",
                       (5, 0): "gold_failed", (6, 2): "duplicate_text", (6, 5): "over_pairs_per_question",
                       (6, 6): "status_not_used"}
    assert built.unused_by_reason["over_pairs_per_question"] == 1
    # question 6: chosen shortest first (sample 1, then 0), rejected in sample order (3, then 4); distinct first
    q6 = [(p["chosen_sample_index"], p["rejected_sample_index"]) for p in built.pairs if p["question_id"] == 6]
    assert q6 == [(1, 3), (0, 4)]
    assert all(p["prompt"] == conv[p["question_id"]]["messages"][:2] for p in built.pairs)
    assert all(p["chosen"].endswith("```") and p["chosen"].count("```sql") == 1 for p in built.pairs)


def test_pair_building_options_change_the_pairs_as_documented():
    samples = _samples_for_accounting()
    conv = {q: _conv(q) for q in range(1, 8)}
    many = D.build_pairs(samples, conv, 10, ("verified",), ("wrong", "exec_error", "no_sql"), dedup=False)
    q6 = [(p["chosen_sample_index"], p["rejected_sample_index"]) for p in many.pairs if p["question_id"] == 6]
    assert len(q6) == len(set(q6)) == 3 * 3  # every chosen x rejected combination once, the duplicate included
    only_wrong = D.build_pairs(samples, conv, 10, ("verified",), ("wrong",))
    assert {p["rejected_status"] for p in only_wrong.pairs} == {"wrong"}
    assert only_wrong.questions["only_chosen"] == 1 and only_wrong.questions["only_rejected"] == 1
    assert D.pair_order(2, 3, 10) == [(0, 0), (1, 1), (0, 1), (1, 0), (1, 2), (0, 2)]
    with pytest.raises(ValueError, match="no row in the synthesize input"):
        D.build_pairs(samples, {q: _conv(q) for q in range(1, 7)}, 2, ("verified",), ("wrong",))
    with pytest.raises(ConfigError, match="dpo_rejected"):
        TrainConfig(method="dpo", dpo_rejected="wrong,gen_error")
    with pytest.raises(ConfigError, match="packing"):
        TrainConfig(method="dpo", packing=True)


def test_without_a_database_canonical_matches_pair_with_schema_errors_under_the_defaults():
    """A question without a database (BIRD train here): its canonical match is chosen only when dpo_chosen allows it,
    its schema_error (SQL that does not compile against the schema) is rejected by default, an unverified sample
    is never either side."""
    conv = {1: _conv(1)}
    samples = [_sample(1, 0, "canonical_match", _cot("SELECT 1"), "SELECT 1"),
               _sample(1, 1, "schema_error", _cot("SELECT nope FROM t"), "SELECT nope FROM t"),
               _sample(1, 2, "unverified", _cot("SELECT 1 + 0"), "SELECT 1 + 0")]
    defaults = TrainConfig(method="dpo")
    assert "schema_error" in D.statuses(defaults.dpo_rejected)
    built = D.build_pairs(samples, conv, 2, ("verified", "canonical_match"), D.statuses(defaults.dpo_rejected))
    assert [(p["chosen_sample_index"], p["rejected_sample_index"], p["rejected_status"]) for p in built.pairs] == [
        (0, 1, "schema_error")]
    assert [(u["sample_index"], u["reason"]) for u in built.unused] == [(2, "status_not_used")]
    strict = D.build_pairs(samples, conv, 2, D.statuses(defaults.dpo_chosen), D.statuses(defaults.dpo_rejected))
    assert strict.pairs == [] and strict.questions["only_rejected"] == 1  # canonical matches: not chosen by default
    TrainConfig(method="dpo", dpo_chosen="verified,canonical_match", dpo_rejected="schema_error")  # accepted


def test_a_length_gap_limit_pairs_answers_of_similar_length_and_accounts_for_the_rest():
    """dpo_max_length_gap: only (chosen, rejected) answers whose lengths differ by at most that fraction of the longer
    are paired, the closest first; a sample with no partner that close is unused as length_gap, a question whose
    every combination is too far apart is counted as length_gap; the pairs' length gap shrinks."""
    def answer(sql: str, words: int) -> str:
        return "Reasoning. " * words + f"\n```sql\n{sql}\n```"

    conv = {q: _conv(q) for q in (1, 2, 3)}
    samples = [
        # 1: a short verified chain, a long one, and two wrong ones: one as long as each chosen, one far longer
        _sample(1, 0, "verified", answer("SELECT 1", 10), "SELECT 1"),
        _sample(1, 1, "verified", answer("SELECT 1 AS a", 40), "SELECT 1 AS a"),
        _sample(1, 2, "wrong", answer("SELECT 2", 200), "SELECT 2"),
        _sample(1, 3, "wrong", answer("SELECT 3", 41), "SELECT 3"),
        _sample(1, 4, "exec_error", answer("SELECT x", 11), "SELECT x"),
        # 2: chosen and rejected, but far apart in length: no pair
        _sample(2, 0, "verified", answer("SELECT 1", 5), "SELECT 1"),
        _sample(2, 1, "wrong", answer("SELECT 2", 80), "SELECT 2"),
        # 3: as long as each other: paired
        _sample(3, 0, "verified", answer("SELECT 1", 20), "SELECT 1"),
        _sample(3, 1, "no_sql", "Reasoning. " * 21),
    ]
    rejected = ("wrong", "exec_error", "no_sql")
    plain = D.build_pairs(samples, conv, 2, ("verified",), rejected)
    near = D.build_pairs(samples, conv, 2, ("verified",), rejected, max_length_gap=0.2)
    by_q = {}
    for p in near.pairs:
        by_q.setdefault(p["question_id"], []).append((p["chosen_sample_index"], p["rejected_sample_index"]))
    assert by_q == {1: [(1, 3), (0, 4)], 3: [(0, 1)]}
    assert all(D.length_gap(p["chosen"], p["rejected"]) <= 0.2 for p in near.pairs)
    assert near.questions == {**plain.questions, "paired": 2, "length_gap": 1}
    assert near.questions["length_gap"] + near.questions["paired"] == plain.questions["paired"] == 3
    _assert_every_sample_once(near, samples)
    assert {(u["question_id"], u["sample_index"]): u["reason"] for u in near.unused} == {
        (1, 2): "length_gap", (2, 0): "length_gap", (2, 1): "length_gap"}
    assert near.unused_by_reason["length_gap"] == 3
    # without the limit question 1 pairs its shortest chosen chain with the first rejected one, 200 words long
    assert [(p["chosen_sample_index"], p["rejected_sample_index"]) for p in plain.pairs if p["question_id"] == 1] == [
        (0, 2), (1, 3)]
    gap = {name: D.answer_lengths(b.pairs) for name, b in (("plain", plain), ("near", near))}
    assert gap["plain"]["rejected_mean"] - gap["plain"]["chosen_mean"] > 300
    assert abs(gap["near"]["rejected_mean"] - gap["near"]["chosen_mean"]) < 20
    # a tighter limit than the closest pair: nothing pairs, every question with both sides counted
    none = D.build_pairs(samples, conv, 2, ("verified",), rejected, max_length_gap=0.001)
    assert none.pairs == [] and none.questions["length_gap"] == 3
    _assert_every_sample_once(none, samples)
    assert "answer lengths at most 0.2 apart" in D.manifest_section(
        near, len(near.pairs), TrainConfig(method="dpo", dpo_max_length_gap=0.2), True)["policy"]
    with pytest.raises(ConfigError, match="dpo_max_length_gap"):
        TrainConfig(method="dpo", dpo_max_length_gap=1.0)
    # the docstring's example: only combinations within 0.2, the closest first, unused samples before reused ones
    assert D.length_matched_order(["x" * 100, "x" * 60], ["x" * 95, "x" * 200, "x" * 62, "x" * 90], 3, 0.2) == [
        (1, 2), (0, 0), (0, 3)]


def test_hinted_chains_that_mention_the_hint_are_never_chosen():
    conv = {1: _conv(1)}
    samples = [_sample(1, 0, "verified", "As the reference query shows:\n```sql\nSELECT 1\n```", "SELECT 1"),
               _sample(1, 1, "wrong", _cot("SELECT 2"), "SELECT 2")]
    built = D.build_pairs(samples, conv, 2, ("verified",), ("wrong",), hinted=True)
    assert built.pairs == [] and [u["reason"] for u in built.unused] == ["mentions_hint", "no_counterpart"]


# --------------------------------------------------------------------------------------------------
# (e) end to end through Ray Train
# --------------------------------------------------------------------------------------------------


def _synthesize_dir(tmp: Path, questions: list[dict]) -> Path:
    """A `t2s synthesize` output dir in synthesize's format: samples.parquet (4 per question), its manifest
    naming the convert rows (train.parquet) the prompts come from."""
    conv_dir, out = tmp / "convert", tmp / "synth"
    conv_dir.mkdir()
    out.mkdir()
    conv = [{"question_id": i, "db_id": q["db_id"], "gold_sql": q["SQL"], "difficulty": q.get("difficulty"),
             "messages": _prompt(q) + [{"role": "assistant", "content": f"```sql\n{q['SQL']}\n```"}]}
            for i, q in enumerate(questions)]
    pq.write_table(pa.Table.from_pylist(conv), conv_dir / "train.parquet")
    rows = []
    for i, q in enumerate(questions):
        plan = (["verified", "wrong", "no_sql", "verified"] if i < 8 else ["verified"] * 4 if i == 8
                else ["wrong", "exec_error", "wrong", "no_sql"] if i == 9 else ["gen_error"] * 4 if i == 10 else [])
        for j, status in enumerate(plan):
            sql = {"verified": q["SQL"], "wrong": f"SELECT {j} AS wrong", "exec_error": "SELEC nothing"}.get(status, "")
            text = (_cot(sql) if j == 0 else f"Step {j}: think again.\n```sql\n{sql}\n```") if sql else (
                "" if status == "gen_error" else "Not sure. " * (150 if i == 7 else 1))  # 7: a pair too long
            rows.append(_sample(i, j, status, text, sql))
    S.write_parquet(out / "samples.parquet", pa.Table.from_pylist(rows, schema=S.samples_schema()))
    write_manifest(out, "synthesize", SynthesizeConfig(samples=4), time.time(), input=str(conv_dir / "train.parquet"))
    return out


DPO_ARGS = ["--method", "dpo", "--max-steps", "4", "--checkpoint-every", "2", "--max-length", str(MAX_LENGTH),
            "--micro-batch-size", "1", "--cpus-per-worker", "0.5", "--lr", "5e-3", "--warmup-ratio", "0",
            "--dpo-pairs-per-question", "2", "--max-rejected-fraction", "0.5"]


@pytest.fixture(scope="module")
def dpo_run(ray_local, tmp_path_factory, tiny_llama_dir, questions):
    """`t2s train --method dpo` through the CLI: 2 workers, 4 steps of 2 pairs, a checkpoint every 2 steps, and a
    worker failure injected after step 3 that Ray Train recovers from (max_failures=1) by restarting at step 2."""
    from text2sql_ray.cli import main

    tmp = tmp_path_factory.mktemp("dpo_e2e")
    synth = _synthesize_dir(tmp, questions)
    out = tmp / "out"
    os.environ[T.FAIL_ENV] = "3"
    try:
        rc = main(["train", "--input", str(synth), "--model", str(tiny_llama_dir), "--out", str(out), *DPO_ARGS,
                   "--max-failures", "1"])
    finally:
        os.environ.pop(T.FAIL_ENV, None)
    assert rc == 0
    return synth, out


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.timeout(900)
def test_dpo_run_writes_the_lora_output_format_and_reloads(dpo_run, tiny_llama_dir):
    from text2sql_ray.models import load_causal_lm

    _, out = dpo_run
    assert {p.name for p in out.iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja", "manifest.json", "loss_curve.png", "ray_train", "rejected.jsonl", "steps.jsonl",
        "tensorboard", "pairs.parquet"}
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_llama_dir)
    assert type(load_causal_lm(str(out))).__name__ == "PeftModelForCausalLM"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["method"] == "dpo" and manifest["training"]["total_steps"] == 4


@pytest.mark.timeout(900)
def test_dpo_run_resumes_after_a_failure_from_the_checkpoint(dpo_run):
    _, out = dpo_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["resumed_from_step"] == [2]
    steps = _read_jsonl(out / "steps.jsonl")
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and steps[0]["dpo_margin"] == 0.0
    # the pairs of every step, the resumed steps 3 and 4 included, are those step_sequences fixes for the run
    too_long = {r["pair"] for r in _read_jsonl(out / "rejected.jsonl") if "pair" in r}
    kept = [p for p in range(manifest["data"]["dpo"]["pairs"]) if p not in too_long]
    spe = manifest["training"]["steps_per_epoch"]
    assert spe == len(kept) // 2
    assert [s["example_ids"] for s in steps] == [
        [kept[u] for u in T.step_sequences(k, len(kept), 2, spe, 0)] for k in (1, 2, 3, 4)]


@pytest.mark.timeout(900)
def test_dpo_run_accounts_for_every_question_sample_and_pair(dpo_run, tokenizer):
    synth, out = dpo_run
    data = json.loads((out / "manifest.json").read_text())["data"]
    acc = data["dpo"]
    assert acc["questions"] == {"no_samples": 1, "no_usable_samples": 1, "only_chosen": 1, "only_rejected": 1,
                                "length_gap": 0, "paired": 8, "total": 12}
    samples = pq.read_table(synth / "samples.parquet").num_rows
    pairs = pq.read_table(out / "pairs.parquet").to_pylist()
    rejected = _read_jsonl(out / "rejected.jsonl")
    unused = [r for r in rejected if "pair" not in r]
    too_long = [r for r in rejected if "pair" in r]
    assert acc["samples"] == samples == acc["samples_in_pairs"] + acc["samples_unused"] and len(unused) == acc["samples_unused"]
    assert len(pairs) == 16 == data["rows"] == acc["pairs"] == data["trained"] + data["rejected"]
    # the length gap DPO could learn instead of correctness, from the pairs file by hand
    c, r = [len(p["chosen"]) for p in pairs], [len(p["rejected"]) for p in pairs]
    assert acc["answer_chars"] == {"chosen_mean": round(sum(c) / 16, 1), "rejected_mean": round(sum(r) / 16, 1),
                                   "chosen_shorter_fraction": round(sum(a < b for a, b in zip(c, r)) / 16, 4)}
    assert len(too_long) == 1 and too_long[0]["question_id"] == 7 and too_long[0]["member"] == "rejected"
    assert all(r["reason"] == "too_long" and r["n_tokens"] > MAX_LENGTH for r in too_long)
    assert {r["pair"] for r in too_long} == {
        p["pair"] for p in pairs
        if max(len(T.tokenize_conversation(p["prompt"] + [{"role": "assistant", "content": p[k]}], tokenizer).input_ids)
               for k in ("chosen", "rejected")) > MAX_LENGTH}
    trained = {i for s in _read_jsonl(out / "steps.jsonl") for i in s["example_ids"]}
    assert trained and not trained & {r["pair"] for r in too_long}


def test_dpo_without_any_pair_fails_with_the_counts(ray_local, tmp_path, tiny_llama_dir, questions):
    synth = _synthesize_dir(tmp_path, questions)
    rows = [r for r in pq.read_table(synth / "samples.parquet").to_pylist() if r["status"] != "verified"]
    S.write_parquet(synth / "samples.parquet", pa.Table.from_pylist(rows, schema=S.samples_schema()))
    cfg = TrainConfig(method="dpo", input=str(synth), model=str(tiny_llama_dir), out=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"no \(chosen, rejected\) pair.*'only_rejected': 9"):
        T.run(cfg)
    assert len(_read_jsonl(tmp_path / "out" / "rejected.jsonl")) == len(rows)


@pytest.mark.timeout(900)
def test_on_policy_synthesize_takes_a_train_output_as_its_model(dpo_run, tmp_path, bird_dev):
    """Step 1 of the on-policy recipe: `t2s synthesize --engine.model <a t2s train output>` samples from the
    student (here the DPO output above: an adapter on the tiny Llama), its SQL executed against the real BIRD
    dev databases; step 2's pair building reads that output and counts every question."""
    from text2sql_ray.config import EngineConfig

    synth, student = dpo_run
    conv = json.loads((synth / "manifest.json").read_text())["input"]
    cfg = SynthesizeConfig(input=conv, out=str(tmp_path / "on_policy"), data=str(bird_dev), samples=2, limit=3,
                           exec_actors=1,
                           engine=EngineConfig(model=str(student), temperature=0.8, max_new_tokens=8, batch_size=3))
    out = S.run(cfg)
    samples = pq.read_table(out / "samples.parquet").to_pylist()
    assert sorted((r["question_id"], r["sample_index"]) for r in samples) == [(q, j) for q in range(3) for j in range(2)]
    assert all(r["gen_error"] is None and r["text"] and r["status"] in S.STATUSES for r in samples)
    built = D.read_input(D.find_input(str(out)), TrainConfig(method="dpo"))
    assert built.questions["total"] == 12 and built.questions["no_samples"] == 9
    assert sum(v for k, v in built.questions.items() if k != "total") == 12
    _assert_every_sample_once(built, samples)


def test_the_pairs_file_a_dpo_run_writes_is_itself_an_input(dpo_run, tmp_path):
    synth, out = dpo_run
    cfg = TrainConfig(method="dpo", dpo_pairs_per_question=2)
    again = D.read_input(D.find_input(str(out / "pairs.parquet")), cfg)
    built = D.read_input(D.find_input(str(synth)), cfg)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in again.pairs] == [
        (p["prompt"], p["chosen"], p["rejected"]) for p in built.pairs]
    assert [p["pair"] for p in again.pairs] == list(range(len(built.pairs)))
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": built.pairs[0]["prompt"], "chosen": "x"}]), bad)
    with pytest.raises(ValueError, match="lacks column.s. rejected"):
        D.read_input(D.find_input(str(bad)), cfg)
