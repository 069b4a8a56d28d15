"""`t2s train --method dpo`: preference pairs from synthesize's verdicts, and the DPO loss (plain functions).

train.py runs DPO in its own Ray Train loop (the same checkpoints, resume, output dir and steps.jsonl as SFT;
`train_loop_per_worker` branches where the loss is computed); this module holds what only DPO needs:

1. `build_pairs`: per question of the synthesize input, chosen = a sample whose result matched the gold
   result (status `verified`; `canonical_match` only when `dpo_chosen` says so), rejected = one whose result
   was wrong, whose SQL failed (not when the gold SQL itself failed: then nothing is known), or that has no
   SQL (`dpo_rejected`). Answers are normalised as the SFT targets are (`synthesize.sft_answer`: the chain,
   ending with exactly one ```sql block), chosen and rejected alike, so a pair differs in content, not in
   format. Identical answers of one question count once (`dpo_dedup`); a rejected answer identical to a
   chosen one is never paired. Chosen in SFT's default order (shortest answer first), rejected in sample
   order (ties: lowest sample_index); up to `dpo_pairs_per_question` pairs, pairs of samples not used yet
   first (`pair_order`). With `dpo_max_length_gap` > 0 a chosen and a rejected answer are paired only when
   their lengths differ by at most that fraction of the longer one, the closest lengths first
   (`length_matched_order`): DPO learns whatever separates the two sides, and a length gap is the easiest
   thing to learn (verified chains are shorter than wrong ones). Every question is counted (no samples /
   no usable sample / only chosen / only rejected / length gap / paired) and every sample is in a pair or
   listed with its reason (`UNUSED_REASONS`). A question without a pair is not an error, only counted.
2. `read_input`: a synthesize output dir (its samples.parquet, and the convert rows its manifest names for
   the prompts) or a pairs Parquet (columns prompt, chosen, rejected, optional question_id; train writes
   one, `pairs.parquet`, into every DPO output).
3. `dpo_sums`: the sigmoid DPO loss with conservative-DPO label smoothing, optionally plus an NLL term on
   the chosen answer (`dpo_sft_weight`, RPO), from per-sequence summed log-probs of the assistant tokens
   (train.py computes them chunk by chunk: the [tokens x vocab] logits never exist in full).

The reference model is the starting checkpoint, and it is the policy with its adapter disabled: DPO is
LoRA only. A base model: policy = base + a new LoRA, reference = base. A LoRA `t2s train` output (the
usual case: the CoT SFT run): its adapter is merged into its base first (`train.starting_model`: its
``merged/`` when it has one, else written once to ``<out>/base``), a new LoRA goes on top, and
disabling it gives exactly the SFT model. The DPO adapter's ``base_model_name_or_path`` is that merged
model, so the output loads, serves and evaluates like any LoRA output. The reference is thus never a
second copy of the weights in memory, and it cannot drift: only LoRA weights train.

Why not TRL's DPOTrainer: it is a transformers Trainer (its own loop, data collator and checkpoints), while
train.py runs its own Ray Train loop with exact resume and the chunked lm_head; TRL is not installed here
either. The loss itself is a few lines (`dpo_sums`), checked against a by-hand computation in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

QUESTION_OUTCOMES = ("no_samples", "no_usable_samples", "only_chosen", "only_rejected", "length_gap", "paired")
"""What became of a question: no sample at all; samples, none usable as chosen or rejected; only chosen
ones; only rejected ones; both, but every (chosen, rejected) pair differs in length by more than
dpo_max_length_gap; at least one pair."""
UNUSED_REASONS = ("status_not_used", "gold_failed", "empty_answer", "mentions_hint", "duplicate_text",
                  "same_as_chosen", "no_counterpart", "length_gap", "over_pairs_per_question")
"""Why a sample is in no pair: its status is neither chosen nor rejected in the config (e.g. gen_error,
unverified); an exec_error of a question whose gold SQL failed (not known to be wrong); no answer text; a
hinted chain that talks about the hint (never a target, as in SFT); an answer identical to an earlier one;
a rejected answer identical to a chosen one; the question has no sample of the other side; no answer of the
other side is within dpo_max_length_gap of its length; the question already has dpo_pairs_per_question pairs."""
STAT_NAMES = ("loss", "margin", "accuracy", "chosen_reward", "rejected_reward", "chosen_nll")
"""The sums `dpo_sums` returns, in order (train divides them by the step's pairs). chosen_nll: the chosen
answer's mean negative log-likelihood per token under the policy (plain DPO can raise it while the margin grows:
both answers lose probability, and the model drifts to text neither pair member holds)."""


def statuses(spec: str) -> tuple[str, ...]:
    """'wrong, exec_error' -> ('wrong', 'exec_error')."""
    return tuple(x.strip() for x in spec.split(",") if x.strip())


def pair_order(n_chosen: int, n_rejected: int, limit: int) -> list[tuple[int, int]]:
    """(chosen index, rejected index) of the pairs of one question: at most `limit`, every combination at
    most once, and pairs of samples not used yet first: (0, 0), (1, 1), ... then the mixed ones."""
    combos = [(i, j) for i in range(n_chosen) for j in range(n_rejected)]
    combos.sort(key=lambda p: (max(p), abs(p[0] - p[1]), p[0]))
    return combos[:limit]


def length_gap(a: str, b: str) -> float:
    """How much two answers differ in length: |len(a) - len(b)| / the longer length (characters; 0 for two
    empty texts)."""
    longer = max(len(a), len(b))
    return abs(len(a) - len(b)) / longer if longer else 0.0


def length_matched_order(chosen: list[str], rejected: list[str], limit: int, max_gap: float) -> list[tuple[int, int]]:
    """(chosen index, rejected index) of one question's pairs under dpo_max_length_gap: only combinations whose
    `length_gap` is at most max_gap, at most `limit`, each at most once; the closest lengths first (ties: lower
    indices), and pairs of samples not used yet before the others, as in `pair_order`.

    >>> length_matched_order(["x" * 100, "x" * 60], ["x" * 95, "x" * 200, "x" * 62, "x" * 90], 3, 0.2)
    [(1, 2), (0, 0), (0, 3)]
    """
    combos = sorted((length_gap(c, r), i, j) for i, c in enumerate(chosen) for j, r in enumerate(rejected))
    combos = [(i, j) for gap, i, j in combos if gap <= max_gap]
    first, used_c, used_r = [], set(), set()
    for i, j in combos:
        if i not in used_c and j not in used_r:
            first.append((i, j))
            used_c.add(i)
            used_r.add(j)
    return (first + [p for p in combos if p not in first])[:limit]


@dataclass
class Pairs:
    """Pair building's result: the pairs, the samples in none (with reason), and per-question outcomes."""

    pairs: list[dict]
    unused: list[dict]
    questions: dict[str, int]
    samples: int = 0
    unused_by_reason: dict[str, int] = field(default_factory=dict)


def build_pairs(samples: list[dict], conv_by_qid: dict[int, dict], pairs_per_question: int,
                chosen_statuses: tuple[str, ...], rejected_statuses: tuple[str, ...], dedup: bool = True,
                hinted: bool = False, max_length_gap: float = 0.0) -> Pairs:
    """Pairs (sorted by question, then `pair_order` or `length_matched_order`) from synthesize's sample rows; see the
    module docstring.

    A pair: question_id, prompt (the convert row's system and user turns: what the student sees), chosen and
    rejected (assistant texts), chosen_sample_index, rejected_sample_index, rejected_status.
    """
    from .prompts import prompt_turns
    from .synthesize import mentions_hint, sft_answer

    by_q: dict[int, list[dict]] = {}
    for s in samples:
        by_q.setdefault(int(s["question_id"]), []).append(s)
    strays = sorted(set(by_q) - set(conv_by_qid))
    if strays:
        raise ValueError(
            f"samples of question(s) {strays[:5]} have no row in the synthesize input; it changed after synthesize. "
            "Run synthesize again on the current convert output, or point its manifest's input at the original."
        )
    outcomes = dict.fromkeys(QUESTION_OUTCOMES, 0)
    pairs: list[dict] = []
    unused: list[dict] = []

    def drop(s: dict, reason: str, detail: str = "") -> None:
        unused.append({"question_id": int(s["question_id"]), "sample_index": int(s["sample_index"]),
                       "status": s["status"], "reason": reason, "detail": detail})

    for qid in sorted(conv_by_qid):
        rows = sorted(by_q.get(qid, []), key=lambda s: s["sample_index"])
        if not rows:
            outcomes["no_samples"] += 1
            continue
        chosen: list[tuple[dict, str]] = []
        rejected: list[tuple[dict, str]] = []
        for s in rows:
            side = chosen if s["status"] in chosen_statuses else rejected if s["status"] in rejected_statuses else None
            if side is None:
                drop(s, "status_not_used", s["status"])
                continue
            if s["status"] == "exec_error" and s.get("gold_error"):
                drop(s, "gold_failed", str(s["gold_error"])[:200])
                continue
            answer = sft_answer(s["text"], s["sql"]) if s["sql"] else (s["text"] or "").strip()
            if not answer.strip():
                drop(s, "empty_answer")
                continue
            if side is chosen and hinted and mentions_hint(s["text"]):
                drop(s, "mentions_hint")
                continue
            side.append((s, answer))
        chosen.sort(key=lambda c: (len(c[1]), c[0]["sample_index"]))
        if dedup:
            chosen, rejected = distinct(chosen, drop), distinct(rejected, drop)
        chosen_text = {a: int(s["sample_index"]) for s, a in chosen}
        for s, answer in rejected:
            if answer in chosen_text:
                drop(s, "same_as_chosen", f"same answer as chosen sample {chosen_text[answer]}")
        rejected = [(s, a) for s, a in rejected if a not in chosen_text]
        if not (chosen and rejected):
            key = "only_chosen" if chosen else "only_rejected" if rejected else "no_usable_samples"
            outcomes[key] += 1
            for s, _ in chosen + rejected:
                drop(s, "no_counterpart", key)
            continue
        # the combinations allowed (all, or those close enough in length) and the pairs taken from them
        close = [(i, j) for i, (_, c) in enumerate(chosen) for j, (_, r) in enumerate(rejected)
                 if not max_length_gap or length_gap(c, r) <= max_length_gap]
        order = (length_matched_order([a for _, a in chosen], [a for _, a in rejected], pairs_per_question,
                                      max_length_gap) if max_length_gap
                 else pair_order(len(chosen), len(rejected), pairs_per_question))
        outcomes["paired" if order else "length_gap"] += 1
        partnered_c, partnered_r = {i for i, _ in close}, {j for _, j in close}
        prompt = prompt_turns(conv_by_qid[qid]["messages"])
        used_c, used_r = set(), set()
        for i, j in order:
            (c, c_text), (r, r_text) = chosen[i], rejected[j]
            used_c.add(i)
            used_r.add(j)
            pairs.append({"question_id": qid, "prompt": prompt, "chosen": c_text, "rejected": r_text,
                          "chosen_sample_index": int(c["sample_index"]), "rejected_sample_index": int(r["sample_index"]),
                          "rejected_status": r["status"]})
        for side, used, partnered in ((chosen, used_c, partnered_c), (rejected, used_r, partnered_r)):
            for k, (s, _) in enumerate(side):
                if k in used:
                    continue
                if k in partnered:
                    drop(s, "over_pairs_per_question", f"{pairs_per_question} pair(s) already")
                else:
                    drop(s, "length_gap", f"no answer of the other side within {max_length_gap:g} of its length")
    outcomes["total"] = len(conv_by_qid)
    unused.sort(key=lambda u: (u["question_id"], u["sample_index"]))
    return Pairs(pairs, unused, outcomes, samples=len(samples),
                 unused_by_reason={k: sum(1 for u in unused if u["reason"] == k) for k in UNUSED_REASONS})


def distinct(side: list[tuple[dict, str]], drop) -> list[tuple[dict, str]]:
    """(sample, answer) in order, an answer seen before dropped as duplicate_text."""
    seen: dict[str, int] = {}
    kept = []
    for s, answer in side:
        if answer in seen:
            drop(s, "duplicate_text", f"same answer as sample {seen[answer]}")
        else:
            seen[answer] = int(s["sample_index"])
            kept.append((s, answer))
    return kept


PAIR_COLUMNS = ("prompt", "chosen", "rejected")
"""Columns a pairs Parquet must have (question_id and the sample columns are optional)."""


def find_input(input_path: str) -> list[Path]:
    """The files DPO reads: [samples.parquet, the convert rows] of a synthesize output dir, or [a pairs Parquet]."""
    if not input_path:
        raise ValueError("train.input is empty: method 'dpo' needs --input <a `t2s synthesize` output dir, or a pairs "
                         "Parquet with columns prompt, chosen, rejected>.")
    p = Path(input_path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"train input {p} does not exist.")
    if (p / "samples.parquet").is_file():
        from .common import read_manifest

        source = (read_manifest(p) or {}).get("input")
        if not source:
            raise ValueError(f"{p} has samples.parquet but no synthesize manifest.json naming its input (the prompts); "
                             "point --input at a complete `t2s synthesize` output dir.")
        if not Path(source).is_file():
            raise FileNotFoundError(f"{p}/manifest.json names the synthesize input {source}, which does not exist; "
                                    "the prompts of the samples come from it: restore it or run synthesize again.")
        return [p / "samples.parquet", Path(source)]
    if (p / "pairs.parquet").is_file():
        return [p / "pairs.parquet"]
    raise FileNotFoundError(f"{p} holds neither samples.parquet (a `t2s synthesize` output) nor pairs.parquet; "
                            "point --input at one of them.")


def read_input(files: list[Path], cfg) -> Pairs:
    """The pairs of a DPO input (see `find_input`); from a synthesize output through `build_pairs`."""
    import pyarrow.parquet as pq

    if len(files) == 2:
        from . import synthesize
        from .common import read_manifest

        samples = pq.read_table(files[0], schema=synthesize.samples_schema()).to_pylist()
        conv_by_qid = {int(r["question_id"]): r for r in synthesize.read_input(files[1])}
        mode = ((read_manifest(files[0].parent) or {}).get("config") or {}).get("mode")
        return build_pairs(samples, conv_by_qid, cfg.dpo_pairs_per_question, statuses(cfg.dpo_chosen),
                           statuses(cfg.dpo_rejected), cfg.dpo_dedup, hinted=mode == "hinted",
                           max_length_gap=cfg.dpo_max_length_gap)
    names = pq.read_schema(files[0]).names
    missing = [c for c in PAIR_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{files[0]} lacks column(s) {', '.join(missing)} (has {', '.join(names)}); a pairs file has "
                         "prompt (messages without the answer), chosen and rejected (assistant texts).")
    rows = pq.read_table(files[0]).to_pylist()
    for i, r in enumerate(rows):
        if not (isinstance(r["chosen"], str) and isinstance(r["rejected"], str)):
            raise ValueError(f"{files[0]} row {i}: chosen and rejected must be strings (the assistant's answers).")  # noqa: TRY004 (a bad input row)
    return Pairs([{**r, "question_id": r.get("question_id")} for r in rows], [], {}, samples=0)


def manifest_section(built: Pairs, trained: int, cfg, from_samples: bool) -> dict:
    """The `data.dpo` section of the train manifest: pairs, and (from synthesize samples) questions and samples."""
    section: dict = {"pairs_file": "pairs.parquet", "pairs": len(built.pairs), "pairs_trained": trained,
                     "source": "synthesize samples" if from_samples else "pairs file",
                     "answer_chars": answer_lengths(built.pairs)}
    if from_samples:
        section.update(
            questions=built.questions, samples=built.samples, samples_in_pairs=built.samples - len(built.unused),
            samples_unused=len(built.unused), samples_unused_by_reason=built.unused_by_reason,
            policy=(f"chosen {cfg.dpo_chosen}; rejected {cfg.dpo_rejected} (not an exec_error whose gold SQL failed); "
                    f"at most {cfg.dpo_pairs_per_question} pair(s) per question"
                    + (f", answer lengths at most {cfg.dpo_max_length_gap:g} apart (closest first)"
                       if cfg.dpo_max_length_gap else "") + "; identical answers "
                    f"{'count once' if cfg.dpo_dedup else 'all kept'}; a question without a pair is counted, not an error"),
        )
    return section


def answer_lengths(pairs: list[dict]) -> dict:
    """Mean length (characters) of the chosen and of the rejected answers, and how often the chosen one is the
    shorter: DPO learns whatever separates the two sides, and a length gap is the easiest thing to learn (on an
    H200 plain DPO halved the student's chains). {} without pairs."""
    if not pairs:
        return {}
    c, r = [len(p["chosen"]) for p in pairs], [len(p["rejected"]) for p in pairs]
    return {"chosen_mean": round(sum(c) / len(c), 1), "rejected_mean": round(sum(r) / len(r), 1),
            "chosen_shorter_fraction": round(sum(a < b for a, b in zip(c, r)) / len(c), 4)}


def member_rows(pairs: list[dict]) -> dict[str, list]:
    """Two conversations per pair for tokenisation: example_id 2p (chosen) and 2p + 1 (rejected) of pair p."""
    out: dict[str, list] = {"messages": [], "example_id": []}
    for p, pair in enumerate(pairs):
        prompt = list(pair["prompt"] or [])
        for k, answer in enumerate((pair["chosen"], pair["rejected"])):
            out["messages"].append(prompt + [{"role": "assistant", "content": answer}])
            out["example_id"].append(2 * p + k)
    return out


def pair_sequences(pair_indices: list[int]) -> list[int]:
    """The sequence indices of these pairs' chosen members, then of their rejected members (layout 2p, 2p + 1)."""
    return [2 * p for p in pair_indices] + [2 * p + 1 for p in pair_indices]


def dpo_sums(policy, reference, beta: float, label_smoothing: float, sft_weight: float = 0.0, *, n_tokens):
    """Sums over the pairs of the DPO loss and its statistics (`STAT_NAMES`), as a [6] tensor.

    `policy` and `reference`: [2m] summed log-probs of each sequence's assistant tokens, the m chosen first,
    then the m rejected; `n_tokens`: [2m] their assistant token counts. Rewards r = beta * (policy - reference);
    margin z = r_chosen - r_rejected; loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z) (sigmoid DPO,
    Rafailov et al. 2023; eps > 0 is conservative DPO) + sft_weight * the chosen answer's mean NLL per token
    (sft_weight > 0: RPO, Pang et al. 2024, "Iterative Reasoning Preference Optimization"; TRL's rpo_alpha).
    Only the loss carries a gradient.
    """
    import torch
    import torch.nn.functional as F

    m = policy.shape[0] // 2
    chosen_r = beta * (policy[:m] - reference[:m])
    rejected_r = beta * (policy[m:] - reference[m:])
    z = chosen_r - rejected_r
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    chosen_nll = -policy[:m] / n_tokens[:m].clamp(min=1).to(policy.dtype)
    if sft_weight:
        losses = losses + sft_weight * chosen_nll
    zd = z.detach()
    return torch.stack([losses.sum(), zd.sum(), (zd > 0).float().sum(), chosen_r.detach().sum(),
                        rejected_r.detach().sum(), chosen_nll.detach().sum()])


def whole_pairs(kept: list[tuple], rejected: list[dict], pairs: list[dict]) -> tuple[list[tuple], list[dict]]:
    """Tokenised pair members -> pairs. `kept`: (example_id, input_ids, labels) of the members kept, `rejected`:
    the others with their reason (key 'pair' = example id, sorted). Returns (kept, rejected) by pair: the
    (pair, input_ids, labels) of the chosen then the rejected member of every pair whose two members were both
    kept, in pair order; one row per other pair, with the reason of its first failing member."""
    by_id = {int(e[0]): e for e in kept}
    bad: dict[int, dict] = {}
    for r in rejected:
        bad.setdefault(int(r["pair"]) // 2, r)
    out_kept: list[tuple] = []
    out_rejected: list[dict] = []
    for p, pair in enumerate(pairs):
        r = bad.get(p)
        if r is None:
            for k in (2 * p, 2 * p + 1):
                out_kept.append((p, by_id[k][1], by_id[k][2]))
            continue
        out_rejected.append({
            "pair": p, "question_id": pair.get("question_id"), "chosen_sample_index": pair.get("chosen_sample_index"),
            "rejected_sample_index": pair.get("rejected_sample_index"),
            "member": "chosen" if int(r["pair"]) % 2 == 0 else "rejected",
            **{k: r[k] for k in ("reason", "detail", "n_tokens", "prompt_tokens")},
        })
    return out_kept, out_rejected
