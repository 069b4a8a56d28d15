"""`t2s train`: LoRA or full fine-tuning (DeepSpeed ZeRO-2/3), or LoRA DPO, of a causal LM on Ray Train.

The file reads top to bottom:
1. Pure helpers, tested without Ray: a conversation through the model's chat template with labels on
   the assistant tokens only; why a row is rejected; packing; the data order; collation; the
   learning-rate schedule; the DeepSpeed config; an lm_head + cross-entropy (and per-token log-probs, for
   DPO) that never materialises the [tokens x vocab] logits.
2. `train_loop_per_worker`: what every Ray Train worker runs (model, optimizer, loop, checkpoints, resume).
3. `run(cfg)`: the SFT Parquet (or DPO's pairs) tokenised on Ray Data, the `TorchTrainer`, and the output
   directory.

Method ``dpo`` (`dpo.py` builds the pairs and holds the loss): every (chosen, rejected) pair of assistant
answers to one prompt is two sequences, trained with the sigmoid DPO loss against the starting model as
reference (the policy with its LoRA adapter disabled; a LoRA starting checkpoint is merged first,
`starting_model`). Everything else (the data order, checkpoints, exact resume, the output dir) is SFT's;
a "row" is then a pair, ``steps.jsonl`` lists pair ids (rows of ``pairs.parquet``), and
``rejected.jsonl`` also lists every sample that is in no pair, with its reason.

Rows: every input row is trained on whole or written to ``rejected.jsonl`` with its id (question_id, or
the row number when the set has no unique question ids) and reason (`REJECT_REASONS`): an example longer
than ``max_length`` is never cut (cutting its tail would train on a chain of thought without its final SQL
and end-of-turn) and prompts are never rewritten (evaluation builds the same prompt). More than
``max_rejected_fraction`` rejected rows fail the run with what to change; a schema budget recorded by
convert that leaves no room in ``max_length`` fails it before any work (`config.check_schema_budget`).

Order: the kept examples' token ids go to the object store once; optimizer step s trains on
`step_sequences(s, ...)`, a function of (seed, step) alone with a new seeded order every epoch, so a run
resumed from a checkpoint trains on exactly the examples, in exactly the order, of an uninterrupted run.

With no ``--input`` the bundled demo train split is converted into ``<out>/convert`` first.

Output (`cfg.out`): a Hugging Face dir (`lora`: adapter files whose `base_model_name_or_path` loads;
`full`: config + safetensors), the tokenizer, optionally `merged/`, `manifest.json` (row accounting, and
``prompt``: the prompt config and schema-budget tokenizer recorded by the convert run the data comes from,
which `t2s evaluate --model` and `t2s serve` use), `rejected.jsonl`, `steps.jsonl` (every step's example
ids and loss), `loss_curve.png`, and `ray_train/` (Ray Train storage with the checkpoints; rerunning with
the same --out resumes from it when options and data are the same, see `trajectory`; else it stops and says
what changed). A step whose loss or gradient is NaN/inf makes no update and is listed in the manifest
(`data.nonfinite_steps`); too many of them stop the run (`train.max_nonfinite_fraction`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import dpo, models
from .common import atomic_path, log, read_manifest, setup_logging, write_jsonl, write_manifest, write_parquet
from .config import PromptConfig, TrainConfig, check_schema_budget, from_dict, to_dict
from .tracking import check_report_to, open_logger

IGNORE = -100
"""Label of a token that is not trained on (the ignore_index of cross-entropy)."""

PRESETS_DIR = Path(__file__).resolve().parents[1] / "jobs" / "deepspeed"
PACK_BUFFER = 1024
"""Examples considered together when packing (first-fit decreasing inside each such group)."""
TOKENIZE_BLOCK = 1024
"""Rows per Ray Data block when tokenising (blocks are tokenised in parallel)."""
REPORT_EVERY_S = 10.0
"""Metrics-only ray.train.report calls at most this often. Ray Train V2's controller takes reports from a
one-slot queue on its ~2 s poll, so a report per step throttles training to one step per ~2 s (measured on
an H200: 0.08 s steps spaced 2 s apart). Checkpoint steps always report; every step is logged on rank 0."""
FAIL_ENV = "T2S_TRAIN_FAIL_AT_STEP"
NAN_ENV = "T2S_TRAIN_NAN_AT_STEPS"
"""Fault injection for tests: comma-separated steps whose gradients are set to NaN after backward (a poisoned
batch, which no tiny CPU model produces on its own), to exercise the non-finite guard."""
"""Test hook: a worker raises after finishing this step, on a run that did not resume from a checkpoint."""
LORA_METHODS = ("lora", "dpo")
"""Methods that train a LoRA adapter on frozen base weights."""


# --------------------------------------------------------------------------------------------------
# 1. Pure helpers
# --------------------------------------------------------------------------------------------------


@dataclass
class TokenizedExample:
    """One conversation as token ids with labels (IGNORE on every token that is not the assistant's), never cut."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)

    @property
    def n_prompt_tokens(self) -> int:
        """Tokens before the first trained (assistant) token."""
        return next((i for i, x in enumerate(self.labels) if x != IGNORE), len(self.labels))


REJECT_REASONS = ("too_long", "no_assistant_tokens", "bad_conversation")
"""Why a training row is not trained on: prompt + answer longer than max_length (an example is never cut:
cutting its tail trains on a chain of thought without its final SQL and end-of-turn); no assistant token;
a conversation the chat template cannot render or that has no assistant turn."""


def rejection(ex: TokenizedExample, max_length: int) -> tuple[str, str]:
    """('', '') when the example is trained on whole, else (reason, detail) with the reason from REJECT_REASONS."""
    n, p = len(ex.input_ids), ex.n_prompt_tokens
    if ex.n_label_tokens == 0:
        return "no_assistant_tokens", f"{n} tokens, none of them the assistant's"
    if n > max_length:
        return "too_long", f"{n} tokens (prompt {p}, answer {n - p}) > max_length {max_length}"
    return "", ""


def assistant_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant) pieces, in order.

    Every assistant turn's span is found by rendering the conversation up to that turn through the
    chat template twice: the messages before it with the generation prompt (where the assistant's
    text starts) and the messages through it (where it ends). So whatever the template adds (a
    default system prompt such as SmolLM2's, a date line such as Llama 3.1's) lands on the prompt
    side. The span ends with the end-of-turn token (the tokenizer's eos, e.g. <|im_end|>); what the
    template puts after it (a newline) is not trained on.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages is empty or not a list of {role, content}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} has no role system/user/assistant: {str(m)[:80]!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} ({m.get('role')}) has no text content")  # noqa: TRY004 (a bad input row)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant turn to train on")

    def render(msgs, gen_prompt: bool) -> str:
        return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=gen_prompt)

    full = render(messages, False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("the conversation starts with an assistant turn; put a user turn before it")
        prefix, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (full.startswith(prefix) and full.startswith(through) and len(through) >= len(prefix)):
            raise ValueError(
                "the chat template does not render the beginning of a conversation as a prefix of the whole "
                "(e.g. it rewrites earlier turns), so assistant tokens cannot be located; use a model whose "
                "template appends turns"
            )
        start, end = len(prefix), len(through)
        eos = getattr(tokenizer, "eos_token", None)
        if eos:
            k = full.rfind(eos, start, end)
            if k >= 0:
                end = k + len(eos)
        spans.append((start, end))
    pieces, pos = [], 0
    for start, end in spans:
        if start > pos:
            pieces.append((full[pos:start], False))
        pieces.append((full[start:end], True))
        pos = end
    if pos < len(full):
        pieces.append((full[pos:], False))
    return pieces


def tokenize_conversation(messages: list[dict], tokenizer) -> TokenizedExample:
    """Token ids of a whole conversation with labels on the assistant tokens only (never cut; see `rejection`).

    Each piece from `assistant_segments` is tokenised on its own and the ids concatenated. At the
    start of an answer this is exactly what the model sees when it generates (the prompt ending in
    "<|im_start|>assistant\\n" is tokenised alone, then the answer follows), and no token straddles a
    prompt/answer boundary.
    """
    ids: list[int] = []
    labels: list[int] = []
    for text, is_assistant in assistant_segments(messages, tokenizer):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if is_assistant else [IGNORE] * len(piece)
    return TokenizedExample(ids, labels)


def pack_bins(lengths: list[int], max_length: int) -> list[list[int]]:
    """Indices of examples grouped into bins of at most max_length tokens: first-fit decreasing
    (deterministic), members of a bin in their original order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    used: list[int] = []
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens > max_length {max_length}; reject it before packing")
        for b in range(len(bins)):
            if used[b] + n <= max_length:
                bins[b].append(i)
                used[b] += n
                break
        else:
            bins.append([i])
            used.append(n)
    return [sorted(b) for b in bins]


def pack_examples(examples: list[tuple[list[int], list[int]]], max_length: int) -> list[dict]:
    """Pack (input_ids, labels) examples into sequences of at most max_length tokens.

    First-fit decreasing (deterministic). Every sequence carries `position_ids` that restart at 0 for
    each example. Why position ids and no explicit mask: transformers (>= 4.53) turns position ids that
    restart, with `attention_mask=None`, into a block-diagonal causal mask for the sdpa/eager/flex paths
    (`masking_utils.find_packed_sequence_indices`) and into `cu_seqlens` for flash-attention, so no
    token attends across examples on any of them, and RoPE positions are the ones each example would
    have alone. (Only without a KV cache: the training forward passes use_cache=False.) The first label of each example is IGNORE, so nothing is learned across a boundary.
    """
    bins = pack_bins([len(e[0]) for e in examples], max_length)
    out = []
    for members in bins:
        ids, labels, pos = [], [], []
        for i in members:  # pack_bins keeps the original order inside a sequence
            e_ids, e_labels = examples[i]
            ids += e_ids
            labels += [IGNORE] + list(e_labels[1:])
            pos += list(range(len(e_ids)))
        out.append({"input_ids": ids, "labels": labels, "position_ids": pos, "n_examples": len(members)})
    return out


def collate(rows: dict, pad_id: int) -> dict:
    """A micro-batch (dict of columns, one list per row) as right-padded int64 tensors.

    Padding continues the last example's positions, so an unpacked batch has no position restart and
    runs with the plain causal mask (the fastest sdpa path); causal attention keeps real tokens from
    seeing the padding after them, and padding has IGNORE labels.
    """
    import numpy as np
    import torch

    def as_rows(col):
        return [torch.from_numpy(np.array(r, dtype=np.int64)) for r in col]  # a copy: Arrow buffers are read-only

    ids_rows, label_rows = as_rows(rows["input_ids"]), as_rows(rows["labels"])
    pos_rows = as_rows(rows["position_ids"]) if "position_ids" in rows else [torch.arange(len(r)) for r in ids_rows]
    width = max(len(r) for r in ids_rows)
    input_ids = torch.full((len(ids_rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(ids_rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(ids_rows), width), dtype=torch.long)
    for i, (ids, lab, pos) in enumerate(zip(ids_rows, label_rows, pos_rows)):
        n = len(ids)
        input_ids[i, :n], labels[i, :n], position_ids[i, :n] = ids, lab, pos
        last = int(pos[-1]) if n else -1
        position_ids[i, n:] = torch.arange(last + 1, last + 1 + width - n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "n_tokens": int(sum(len(r) for r in ids_rows))}


def nonfinite_error(bad_steps: list[int], step: int, total: int, fraction: float, example_ids: list[int]) -> str | None:
    """The error that stops a run whose NaN/inf steps exceed max(3, fraction x total steps), else None."""
    if len(bad_steps) <= max(3, fraction * total):
        return None
    return (f"{len(bad_steps)} of {step} steps had a NaN/inf loss or gradient (more than train.max_nonfinite_fraction="
            f"{fraction} of {total}; steps {bad_steps[:10]}; examples of the last: {example_ids[:16]}): the run "
            "diverged or its data hold poisoned batches. Lower train.lr, look at those example_ids in the input, or "
            "try train.dtype float32; no model was written.")


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Learning-rate factor for optimizer step `step` (1-based): linear warmup, then cosine to 0 or constant."""
    if warmup_steps > 0 and step <= warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps + 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio) if warmup_ratio > 0 else 0


# --- The data order: fixed by the driver, indexed by every worker -----------------------------------
# Ray Data's streaming split hands blocks to workers as they ask for them: it does not promise which
# rows a worker sees in which order, so a resumed run that skips "the first N micro-batches" of a new
# iterator is exact only as long as that order happens to repeat. Here the token ids of the kept
# examples sit in the object store once, and every optimizer step's sequences are a function of
# (seed, step) alone, with a full reshuffle every epoch.


def layout_sequences(lengths: list[int], packing: bool, max_length: int, seed: int) -> list[list[int]]:
    """Training sequences as lists of example indices. Without packing one example each; with packing the
    examples in a seeded order, first-fit decreasing within each group of PACK_BUFFER of them."""
    import numpy as np

    if not packing:
        return [[i] for i in range(len(lengths))]
    order = np.random.default_rng(seed).permutation(len(lengths)).tolist()
    seqs: list[list[int]] = []
    for s in range(0, len(order), PACK_BUFFER):
        group = order[s : s + PACK_BUFFER]
        seqs += [[group[j] for j in b] for b in pack_bins([lengths[i] for i in group], max_length)]
    return seqs


def step_sequences(step: int, n_seq: int, per_step: int, steps_per_epoch: int, seed: int) -> list[int]:
    """Sequence indices of optimizer step `step` (1-based) for all workers, rank after rank.

    Epoch e = (step - 1) // steps_per_epoch walks its own seeded permutation of the sequences (a new
    order every epoch; the n_seq - steps_per_epoch * per_step sequences left at its end wait for a later
    epoch). A function of its arguments only: a resumed run gets exactly the steps an uninterrupted one gets.
    """
    import numpy as np

    epoch, k = divmod(step - 1, steps_per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_seq)
    return perm[k * per_step : (k + 1) * per_step].tolist()


def pack_train_data(examples: list[tuple[int, list[int], list[int]]], seqs: list[list[int]]) -> dict:
    """(example_id, input_ids, labels) rows and their sequences as flat numpy arrays (one object-store value)."""
    import numpy as np

    lengths = [len(e[1]) for e in examples]
    starts = np.zeros(len(examples) + 1, dtype=np.int64)
    starts[1:] = np.cumsum(lengths)

    def flat(k: int):
        return np.concatenate([np.asarray(e[k], dtype=np.int32) for e in examples]) if examples else np.zeros(0, np.int32)

    seq_starts = np.zeros(len(seqs) + 1, dtype=np.int64)
    seq_starts[1:] = np.cumsum([len(m) for m in seqs])
    return {"ids": flat(1), "labels": flat(2), "starts": starts,
            "example_ids": np.asarray([e[0] for e in examples], dtype=np.int64),
            "seq_members": np.asarray([i for m in seqs for i in m], dtype=np.int64), "seq_starts": seq_starts}


def sequence_members(data: dict, s: int) -> list[int]:
    return data["seq_members"][data["seq_starts"][s] : data["seq_starts"][s + 1]].tolist()


def sequence_rows(data: dict, seq_indices: list[int]) -> dict:
    """collate's input for these sequences: input_ids, labels (the first of each example IGNORE: nothing is
    learned across a packing boundary) and position_ids restarting at every example."""
    import numpy as np

    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    for s in seq_indices:
        ids, labels, pos = [], [], []
        for e in sequence_members(data, s):
            a, b = int(data["starts"][e]), int(data["starts"][e + 1])
            ids.append(data["ids"][a:b])
            lab = np.array(data["labels"][a:b])
            lab[0] = IGNORE
            labels.append(lab)
            pos.append(np.arange(b - a))
        rows["input_ids"].append(np.concatenate(ids))
        rows["labels"].append(np.concatenate(labels))
        rows["position_ids"].append(np.concatenate(pos))
    return rows


def find_sft_files(input_path: str) -> list[Path]:
    """The SFT Parquet file(s): a file, or a dir holding sft.parquet (synthesize) or train.parquet (convert)."""
    if not input_path:
        raise ValueError(
            "train.input is empty: pass --input <SFT Parquet file, or the output dir of `t2s synthesize` "
            "(sft.parquet) or `t2s convert` (train.parquet)>."
        )
    p = Path(input_path)
    if p.is_file():
        return [p]
    if p.is_dir():
        for name in ("sft.parquet", "train.parquet"):
            if (p / name).is_file():
                return [p / name]
            if (p / name).is_dir():  # a Parquet dataset written as a folder of parts
                parts = sorted((p / name).glob("*.parquet"))
                if parts:
                    return parts
        raise FileNotFoundError(f"{p} holds neither sft.parquet nor train.parquet; point --input at the SFT file.")
    raise FileNotFoundError(f"train input {p} does not exist.")


def check_sft_schema(files: list[Path]) -> None:
    """Fail early, naming the file, when the Parquet has no `messages` column."""
    import pyarrow.parquet as pq

    for f in files:
        names = pq.read_schema(f).names
        if "messages" not in names:
            raise ValueError(
                f"{f} has no 'messages' column (columns: {', '.join(names)}); the SFT set needs rows with "
                "messages = [{role, content}, ...], as written by `t2s synthesize` or `t2s convert`."
            )


def load_deepspeed_preset(spec: str) -> dict:
    """A DeepSpeed JSON: a path, or a preset name from jobs/deepspeed (zero2, zero3, zero3_offload)."""
    p = Path(spec)
    if not p.is_file():
        named = PRESETS_DIR / (spec if spec.endswith(".json") else f"{spec}.json")
        if not named.is_file():
            presets = ", ".join(sorted(x.stem for x in PRESETS_DIR.glob("*.json")))
            raise FileNotFoundError(f"DeepSpeed config {spec} does not exist; give a JSON path or a preset ({presets}).")
        p = named
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {p} is not valid JSON: {e}") from None


def deepspeed_config(preset: dict, cfg: TrainConfig, bf16: bool) -> dict:
    """The preset with the batch sizes, clipping and precision filled from the TrainConfig.

    The optimizer and schedule always come from the TrainConfig (a torch AdamW handed to
    deepspeed.initialize, DeepSpeedCPUAdam with optimizer offload), so a preset may not set them.
    """
    ds = json.loads(json.dumps(preset))
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ValueError(f"DeepSpeed config sets '{key}'; remove it: the optimizer and schedule come from train.*")
    ds.pop("train_batch_size", None)
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["gradient_clipping"] = float(cfg.max_grad_norm)
    ds.pop("fp16", None)
    ds["bf16"] = {"enabled": bool(bf16)}
    ds["zero_allow_untested_optimizer"] = True

    def find_auto(node, path):
        if node == "auto":
            raise ValueError(f"DeepSpeed config has 'auto' at {path}; give a concrete value.")
        if isinstance(node, dict):
            for k, v in node.items():
                find_auto(v, f"{path}.{k}" if path else k)

    find_auto(ds, "")
    return ds


def zero_stage(ds_config: dict | None) -> int:
    return int(((ds_config or {}).get("zero_optimization") or {}).get("stage", 0))


def default_loss_chunk(vocab_size: int) -> int:
    """Tokens per chunk of the fused loss: about 512 MiB of fp32 logits per chunk."""
    return int(min(8192, max(64, (1 << 27) // max(1, vocab_size))))


# --- lm_head + cross-entropy without the full logits ----------------------------------------------


def _chunked_linear_ce_cls():
    import torch

    class ChunkedLinearCrossEntropy(torch.autograd.Function):
        """sum_i CE(hidden_i @ W^T, target_i), computed chunk by chunk.

        The gradients with respect to hidden and W are computed in the forward pass (softmax - onehot
        per chunk) and kept, so backward only scales them: peak memory is one chunk of logits instead
        of [tokens x vocab] logits, their fp32 copy and their gradient (for a 128k vocabulary and 8k
        tokens that is ~8 GB). The same idea as liger-kernel's fused linear cross-entropy, in torch.
        """

        @staticmethod
        def forward(ctx, hidden, weight, target, chunk, compute_dtype):
            w = weight.to(compute_dtype)
            need_h, need_w = hidden.requires_grad, weight.requires_grad
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk].to(compute_dtype)
                y = target[s : s + chunk]
                logits = (h @ w.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                loss += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                if need_h or need_w:
                    probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                    probs[torch.arange(y.shape[0], device=y.device), y] -= 1.0  # d loss / d logits
                    g = probs.to(compute_dtype)
                    if need_h:
                        grad_h[s : s + chunk] = (g @ w).to(hidden.dtype)
                    if need_w:
                        grad_w += (g.t() @ h).float()
            ctx.save_for_backward(grad_h, grad_w)
            ctx.weight_dtype = weight.dtype
            return loss

        @staticmethod
        def backward(ctx, grad_loss):
            grad_h, grad_w = ctx.saved_tensors
            gh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
            gw = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
            return gh, gw, None, None, None

    return ChunkedLinearCrossEntropy


_CHUNKED_CE = None


def linear_cross_entropy_sum(hidden, head, target, impl: str = "fused", chunk: int = 0):
    """Sum of token cross-entropies of `head(hidden)` against `target` (rows already filtered to labelled ones).

    impl: 'fused' (chunked, no full logits; needs a bias-free nn.Linear head whose weight is a real
    tensor, i.e. not a ZeRO-3 partition), 'liger' (liger-kernel's Triton version, GPU), or 'logits'
    (head(hidden) then cross-entropy: works everywhere, ZeRO-3 gathers the head in its hook).
    """
    import torch
    import torch.nn.functional as F

    global _CHUNKED_CE
    if impl == "logits" or hidden.shape[0] == 0:
        logits = head(hidden).float()
        return F.cross_entropy(logits, target, reduction="sum")
    weight = head.weight
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, target)
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    if _CHUNKED_CE is None:
        _CHUNKED_CE = _chunked_linear_ce_cls()
    return _CHUNKED_CE.apply(hidden, weight, target, chunk or default_loss_chunk(weight.shape[0]), compute_dtype)


def _chunked_linear_logprob_cls():
    import torch

    class ChunkedLinearLogprob(torch.autograd.Function):
        """log_softmax(hidden_i @ W^T)[target_i] for every row, chunk by chunk: the per-token sibling of
        ChunkedLinearCrossEntropy, for DPO's per-sequence sums.

        The gradient with respect to hidden, (onehot - softmax) @ W per row, is computed in the forward
        pass and scaled row by row in backward (the upstream gradient differs per sequence). The one
        with respect to W would mix rows with those weights, so a trainable head is refused: under LoRA
        (DPO's only method) the head is frozen.
        """

        @staticmethod
        def forward(ctx, hidden, weight, target, chunk, compute_dtype):
            w = weight.to(compute_dtype)
            need_h = hidden.requires_grad
            out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk].to(compute_dtype)
                y = target[s : s + chunk]
                logits = (h @ w.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                out[s : s + chunk] = logits.gather(1, y[:, None]).squeeze(1) - lse
                if need_h:
                    probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                    probs[torch.arange(y.shape[0], device=y.device), y] -= 1.0  # = -(d logp / d logits)
                    grad_h[s : s + chunk] = (probs.to(compute_dtype) @ w).neg_().to(hidden.dtype)
            ctx.save_for_backward(grad_h)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            (grad_h,) = ctx.saved_tensors
            gh = grad_h * grad_out[:, None].to(grad_h.dtype) if grad_h is not None else None
            return gh, None, None, None, None

    return ChunkedLinearLogprob


_CHUNKED_LOGPROB = None


def linear_token_logprobs(hidden, head, target, impl: str = "fused", chunk: int = 0):
    """log p(target_i | hidden_i) under `head` for every row (rows already filtered to labelled ones), [n] fp32.

    impl as in `linear_cross_entropy_sum`; 'liger' uses the 'fused' torch version (liger's fused linear
    cross-entropy sums). 'fused' needs a frozen head (LoRA): its weight gradient is not computed.
    """
    import torch
    import torch.nn.functional as F

    global _CHUNKED_LOGPROB
    if impl == "logits" or hidden.shape[0] == 0:
        return -F.cross_entropy(head(hidden).float(), target, reduction="none")
    weight = head.weight
    if weight.requires_grad:
        raise ValueError("per-token log-probs in chunks need a frozen lm_head (LoRA); use impl='logits' to train it.")
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    if _CHUNKED_LOGPROB is None:
        _CHUNKED_LOGPROB = _chunked_linear_logprob_cls()
    return _CHUNKED_LOGPROB.apply(hidden, weight, target, chunk or default_loss_chunk(weight.shape[0]), compute_dtype)


def choose_loss_impl(head, fused: bool, liger: bool) -> str:
    """'liger' or 'fused' where the head is a plain bias-free Linear with a whole weight, else 'logits'."""
    import torch

    plain = type(head) is torch.nn.Linear and head.bias is None and getattr(head.weight, "ds_id", None) is None
    if not (fused and plain):
        return "logits"
    return "liger" if liger else "fused"


def _lm_with_loss_cls():
    import torch

    class CausalLMWithLoss(torch.nn.Module):
        """Wraps a causal LM (or PeftModel) so forward returns the summed loss over assistant tokens.

        The decoder gives hidden states; only the rows whose next-token label is trained on go
        through lm_head + cross-entropy. With a long schema prompt and a short answer that skips
        most of the lm_head work as well as the logits' memory. DDP and DeepSpeed wrap this module.
        """

        def __init__(self, lm, loss_impl: str, chunk: int = 0, frozen_prefix: int = 0):
            super().__init__()
            self.lm = lm
            self.loss_impl = loss_impl
            self.chunk = chunk
            self.frozen_prefix = frozen_prefix
            """> 0: the decoder's first `frozen_prefix` layers hold no trainable weight; their output for a sequence
            is kept (CPU memory) and reused the next time that sequence comes (`train.frozen_prefix_cache`)."""
            self.prefix_cache: dict[bytes, torch.Tensor] = {}  # plain dicts: not submodules, nothing registered twice
            self._views: dict[str, torch.nn.Module] = {}
            self.prefix_hits = 0
            self.prefix_cache_dir: Path | None = None
            """Also keep each output as a file here (the run's out dir): Ray Train deals a sequence to another worker
            in another epoch, and that worker reads it instead of running the frozen layers again."""

        def hf_model(self):
            return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

        def _decoder_part(self, part: str):
            """The decoder with only its frozen layers (no final norm) or only the layers above them: shallow copies
            sharing every module (and the LoRA weights) with the model, so the two parts run its own forward
            (rotary embeddings, causal or packed-sequence masks) on either side of the cut."""
            if part not in self._views:
                dec = self.hf_model().get_decoder()
                view = copy.copy(dec)
                view._modules = dict(dec._modules)
                layers = list(dec.layers)
                if part == "prefix":
                    view._modules["layers"] = torch.nn.ModuleList(layers[: self.frozen_prefix])
                    view._modules["norm"] = torch.nn.Identity()
                else:
                    view._modules["layers"] = torch.nn.ModuleList(layers[self.frozen_prefix :])
                self._views[part] = view
            return self._views[part]

        def decoder_hidden(self, input_ids, position_ids):
            if not self.frozen_prefix:
                return self.hf_model().get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                                     use_cache=False).last_hidden_state
            key = hashlib.sha1(b"".join(t.detach().cpu().contiguous().numpy().tobytes() + str(tuple(t.shape)).encode()
                                        for t in (input_ids, position_ids))).digest()
            below = self.prefix_cache.get(key)
            path = self.prefix_cache_dir / f"{key.hex()}.pt" if self.prefix_cache_dir is not None else None
            if below is None and path is not None and path.is_file():
                below = self.prefix_cache[key] = torch.load(path)
            if below is None:
                with torch.no_grad():
                    below = self._decoder_part("prefix")(input_ids=input_ids, position_ids=position_ids,
                                                         use_cache=False).last_hidden_state
                self.prefix_cache[key] = below.detach().to("cpu")
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    part = path.with_name(f".{path.name}.{os.getpid()}")
                    torch.save(self.prefix_cache[key], part)
                    os.replace(part, path)
            else:
                self.prefix_hits += 1
                below = below.to(input_ids.device)
            return self._decoder_part("rest")(inputs_embeds=below, position_ids=position_ids,
                                              use_cache=False).last_hidden_state

        def labelled(self, input_ids, position_ids, labels):
            """Hidden states of the positions whose next token is trained on, those tokens, and their rows."""
            hidden = self.decoder_hidden(input_ids, position_ids)
            target = labels[:, 1:]
            keep = target != IGNORE
            return hidden[:, :-1][keep], target[keep], keep.nonzero(as_tuple=True)[0]

        def sequence_logprobs(self, input_ids, position_ids, labels):
            """[batch] summed log-probs of each row's trained (assistant) tokens."""
            hidden, target, rows = self.labelled(input_ids, position_ids, labels)
            tok = linear_token_logprobs(hidden, self.hf_model().get_output_embeddings(), target, self.loss_impl, self.chunk)
            return torch.zeros(input_ids.shape[0], dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)

        def forward(self, input_ids, position_ids, labels, dpo: tuple | None = None):
            """The summed loss of the assistant tokens; with `dpo` = (beta, label_smoothing, sft_weight) the rows
            are m chosen then m rejected answers and the result is `dpo.dpo_sums` (the pairs' summed DPO loss
            first), the reference being this model with its LoRA adapter disabled."""
            if dpo is not None:
                from .dpo import dpo_sums

                with torch.no_grad(), self.lm.disable_adapter():
                    reference = self.sequence_logprobs(input_ids, position_ids, labels)
                return dpo_sums(self.sequence_logprobs(input_ids, position_ids, labels), reference, *dpo,
                                n_tokens=(labels[:, 1:] != IGNORE).sum(1))
            hidden, target, _ = self.labelled(input_ids, position_ids, labels)
            return linear_cross_entropy_sum(hidden, self.hf_model().get_output_embeddings(), target, self.loss_impl,
                                            self.chunk)

    return CausalLMWithLoss


def build_training_model(cfg: TrainConfig, model_path: str, dtype, device_type: str, restore: Path | None = None,
                         ds_config: dict | None = None):
    """Load the base model (LoRA: in `dtype`; full: fp32 master weights) and `prepare_for_training` it."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    use_ds = cfg.method == "full" and ds_config is not None
    load_dtype = dtype if cfg.method in LORA_METHODS else torch.float32
    src = model_path
    if cfg.method == "full" and not use_ds and restore is not None:
        src = str(restore / "hf")  # plain-DDP full fine-tuning resumes from its saved weights
    keep_alive = None
    if use_ds and zero_stage(ds_config) == 3:
        # ZeRO-3: from_pretrained builds the model already partitioned (deepspeed.zero.Init) instead of
        # every worker holding all weights first; the object must stay alive while the model loads.
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=load_dtype)
    del keep_alive
    return prepare_for_training(model, cfg, dtype, device_type, restore, zero_stage(ds_config) if use_ds else None)


def prepare_for_training(model, cfg: TrainConfig, dtype, device_type: str, restore: Path | None = None,
                         deepspeed_stage: int | None = None):
    """The model ready to train: liger, gradient checkpointing, LoRA adapters, precision, loss wrapper.

    Returns (wrapper, autocast_dtype or None). `lora` on GPU: base in bf16, adapters in fp32 (PEFT's
    default) and bf16 autocast with PEFT's input casting off, so LoRA matmuls run in bf16 on the
    activation the base layer already keeps (PEFT's default casts every LoRA input to an fp32 copy
    that backward keeps: 4 bytes x hidden per token per adapted layer). `full` keeps fp32 weights:
    DeepSpeed's bf16 mode or bf16 autocast (plain DDP) computes in bf16.
    """
    import torch

    model.config.use_cache = False
    if cfg.liger:
        _apply_liger(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        set_checkpointed_layers(model, cfg.checkpoint_layers)
    if cfg.method in LORA_METHODS:
        from peft import LoraConfig, PeftModel, get_peft_model

        if restore is not None:
            model = PeftModel.from_pretrained(model, str(restore / "hf"), is_trainable=True)
        else:
            targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else [
                t.strip() for t in cfg.lora_targets.split(",") if t.strip()
            ]
            layers = list(range(model.config.num_hidden_layers))[-cfg.lora_layers:] if cfg.lora_layers else None
            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=targets, bias="none", task_type="CAUSAL_LM", layers_to_transform=layers)
            model = get_peft_model(model, lora)
    autocast = None
    if dtype == torch.bfloat16 and deepspeed_stage is None and device_type == "cuda":
        autocast = torch.bfloat16
        for m in model.modules():  # LoRA layers: keep bf16 inputs, autocast runs the adapter matmuls in bf16
            if hasattr(m, "cast_input_dtype_enabled"):
                m.cast_input_dtype_enabled = False
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    impl = choose_loss_impl(hf.get_output_embeddings(), cfg.fused_loss, cfg.liger)
    if deepspeed_stage == 3:
        impl = "logits"  # the head's weight is a partition outside its module hook
    frozen = 0
    if cfg.frozen_prefix_cache:
        frozen = hf.config.num_hidden_layers - cfg.lora_layers
        below = [n for layer in hf.get_decoder().layers[:frozen] for n, w in layer.named_parameters() if w.requires_grad]
        if below or any(w.requires_grad for w in hf.get_input_embeddings().parameters()):
            raise ValueError(f"train.frozen_prefix_cache: the {frozen} layers below the adapters must be frozen, but "
                             f"{below[:3] or 'the input embeddings'} train; leave train.frozen_prefix_cache off")
        if getattr(hf.config, "attention_dropout", 0.0):
            raise ValueError("train.frozen_prefix_cache needs attention_dropout 0 (the frozen layers must give the "
                             f"same output every time; this model has {hf.config.attention_dropout}); leave it off")
    return _lm_with_loss_cls()(model, impl, frozen_prefix=frozen), autocast


def forward_backward(model, micro: list[dict], scale: float, autocast, device, engine=None, dpo: tuple | None = None):
    """Forward and backward of one optimizer step's micro-batches; returns the summed loss (detached) as a
    [1] tensor, or with `dpo` = (beta, label_smoothing, sft_weight) the summed `dpo.STAT_NAMES` as a [6] tensor.

    `scale` turns the summed loss into the step's mean (1 / assistant tokens of the step, or 1 / pairs of
    the step with DPO, times the number of workers whose gradients DDP/DeepSpeed average). With DDP,
    gradients are synchronised on the last micro-batch only; with DeepSpeed, `engine.step()` acts at the
    accumulation boundary. DPO micro-batches hold their pairs' chosen rows, then their rejected rows.
    """
    import torch

    autocast_ctx = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast else contextlib.nullcontext
    from .dpo import STAT_NAMES

    sums = torch.zeros(1 if dpo is None else len(STAT_NAMES), dtype=torch.float64, device=device)
    for k, b in enumerate(micro):
        inputs = {key: b[key].to(device, non_blocking=True) for key in ("input_ids", "position_ids", "labels")}
        if engine is not None:
            with autocast_ctx():
                loss = engine(**inputs)
            engine.backward(loss * scale, scale_wrt_gas=False)
            engine.step()
            out = loss[None]
        else:
            sync = k == len(micro) - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                with autocast_ctx():
                    out = model(**inputs)[None] if dpo is None else model(**inputs, dpo=dpo)
                (out[0] * scale).backward()
        sums += out.detach().double()
    return sums


def set_checkpointed_layers(model, fraction: float) -> int:
    """Keep gradient checkpointing on the first ceil(fraction * L) decoder layers only; returns that count.

    Recomputing a layer costs one more forward of it (~1/3 of its step time); checkpoint just enough
    layers for the activations to fit.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    keep = math.ceil(fraction * len(layers))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < keep
    return keep


def _apply_liger(model) -> None:
    """liger-kernel's RMSNorm / SwiGLU / RoPE kernels on this model (the loss uses its fused linear CE)."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        raise RuntimeError(
            "train.liger needs the liger-kernel package on the GPU workers (pip install liger-kernel), "
            "or drop --liger (the fused chunked loss works without it)."
        ) from None
    _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False)


# --------------------------------------------------------------------------------------------------
# 2. The Ray Train worker loop
# --------------------------------------------------------------------------------------------------


def _full_state_dict(hf_model, zero3: bool, rank: int, dtype) -> dict:
    """All weights of a full model on CPU (rank 0; empty elsewhere), gathering ZeRO-3 partitions one at a time."""

    sd: dict[str, Any] = {}
    for name, p in hf_model.named_parameters():
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank == 0:
                    sd[name] = p.detach().to("cpu", dtype=dtype, copy=True).contiguous()
        elif rank == 0:  # a copy: ZeRO-2 params are views into one flat buffer
            sd[name] = p.detach().to("cpu", dtype=dtype, copy=True).contiguous()
    if rank == 0:
        keys = set(hf_model.state_dict().keys())
        for name, b in hf_model.named_buffers():
            if name in keys and name not in sd:
                sd[name] = b.detach().to("cpu", copy=True).contiguous()
    return sd if rank == 0 else {}


def _save_full(hf_model, out: Path, sd: dict, dtype) -> None:
    from huggingface_hub import save_torch_state_dict

    out.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(sd, out, max_shard_size="5GB")
    config = copy.deepcopy(hf_model.config)  # the live model keeps its own (use_cache off while training)
    config.dtype = dtype
    config.use_cache = True
    config.save_pretrained(out)
    if getattr(hf_model, "generation_config", None) is not None:
        hf_model.generation_config.save_pretrained(out)


def frozen_prefix_dir(cfg: TrainConfig, model_path: str, dtype) -> Path:
    """Where workers share the frozen layers' outputs (`train.frozen_prefix_cache`): under the run's out dir, one
    folder per base model, cut and dtype (a rerun on another model never reads these); removed when training ends."""
    tag = hashlib.sha1(f"{model_path}|{cfg.lora_layers}|{dtype}".encode()).hexdigest()[:16]
    return Path(cfg.out) / ".frozen_prefix_cache" / tag


def avoid_cudnn_attention(torch) -> None:
    """Keep torch's SDPA off its cuDNN kernel for training. That kernel's backward returns NaN query gradients
    when a mask tensor is passed (ours: the block-diagonal mask of packed sequences), the padded width is 64 mod
    128 and an attention row's log-sum-exp is below about -88.7 (pytorch/pytorch#196678, torch 2.11 on H100/H200;
    Qwen2.5's layer-0 heads have thousands of such rows in every batch). That matches the NaN gradient at step 15
    of every no-CoT SFT run on the H200 (0.5B and 1.5B alike): the only micro-batch of 257 whose width, 6080, is 64
    mod 128. Confirmed on an H200 (benchmarks/results/h200_cudnn_nan): the same 16 steps give a NaN gradient at
    step 15 with this call patched out and none with it. The memory-efficient kernel takes over; it computes the
    same attention, but its median step was 1.62 s against cuDNN's 1.24 s there (0.5B, LoRA r 256, 6144-token
    packs; benchmarks/gpu/cudnn_nan.sh; `train.cudnn_attention` keeps cuDNN): padding the packed width to a
    multiple of 128 instead would keep cuDNN's speed safely (not done yet)."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def train_loop_per_worker(loop: dict) -> None:
    """One Ray Train worker: build the model, restore the latest checkpoint if any, train, checkpoint."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    cfg: TrainConfig = from_dict(TrainConfig, loop["cfg"], "train")
    setup_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(max(1, round(cfg.cpus_per_worker)))
    elif not cfg.cudnn_attention:
        avoid_cudnn_attention(torch)
    dtype = models.torch_dtype(cfg.dtype, device.type)
    ds_config = deepspeed_config(loop["ds_preset"], cfg, bf16=dtype == torch.bfloat16) if loop["ds_preset"] else None
    use_ds = ds_config is not None
    zero3 = use_ds and zero_stage(ds_config) == 3
    save_dtype = dtype  # fp32 on CPU, bf16 on GPU ('auto')

    # Restore ------------------------------------------------------------------------------------
    state = {"step": 0, "epoch": 0, "history": [], "resumed_from": [],
             "method": cfg.method, "model": loop["model_spec"], "run_id": loop["run_id"]}
    ckpt = ray.train.get_checkpoint()
    with contextlib.ExitStack() as stack:
        restore = Path(stack.enter_context(ckpt.as_directory())) if ckpt else None
        if restore is not None:
            state.update(json.loads((restore / "state.json").read_text()))
            state["resumed_from"].append(state["step"])
            if rank == 0:
                log.info("resuming from the checkpoint of step %d (%s)", state["step"], restore)

        # Model and optimizer --------------------------------------------------------------------
        wrapper, autocast = build_training_model(cfg, loop["model_path"], dtype, device.type, restore, ds_config)
        if wrapper.frozen_prefix:
            wrapper.prefix_cache_dir = frozen_prefix_dir(cfg, loop["model_path"], dtype)
        trainable = [p for p in wrapper.parameters() if p.requires_grad]
        if use_ds:
            import deepspeed

            offload = ((ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device")
            if offload in ("cpu", "nvme"):
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                opt = DeepSpeedCPUAdam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, adamw_mode=True)
            else:
                opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
            engine, optimizer, _, _ = deepspeed.initialize(model=wrapper, optimizer=opt, config=ds_config)
            model = engine
            if restore is not None:
                engine.load_checkpoint(str(restore / "ds"), tag="state", load_module_strict=True)
        else:
            engine = None
            model = ray.train.torch.prepare_model(wrapper)
            optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=on_gpu)
            if restore is not None and (restore / "optimizer.pt").is_file():
                optimizer.load_state_dict(torch.load(restore / "optimizer.pt", map_location=device))
    inner = engine.module if use_ds else (model.module if hasattr(model, "module") else model)
    hf_model = inner.hf_model()
    if rank == 0:
        n_train = sum(getattr(p, "ds_numel", p.numel()) for p in trainable)  # ZeRO-3 holds partitions
        log.info("method=%s loss=%s autocast=%s trainable params=%d workers=%d device=%s",
                 cfg.method, inner.loss_impl, autocast, n_train, world, device)

    def save_checkpoint(final: bool, metrics: dict) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="t2s_ckpt_"))
        try:
            hf_dir = tmp / "hf"
            if use_ds:
                engine.save_checkpoint(str(tmp / "ds"), tag="state")  # every rank writes its shard
                if final:
                    sd = _full_state_dict(hf_model, zero3, rank, save_dtype)
                    if rank == 0:
                        _save_full(hf_model, hf_dir, sd, save_dtype)
            elif rank == 0:
                if cfg.method in LORA_METHODS:
                    inner.lm.save_pretrained(str(hf_dir))
                else:  # fp32 while training (exact resume); the final export in the run's dtype
                    dt = save_dtype if final else torch.float32
                    _save_full(hf_model, hf_dir, _full_state_dict(hf_model, False, 0, dt), dt)
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            if rank == 0:
                (tmp / "state.json").write_text(json.dumps({**state, "final": final}))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(tmp)) if (rank == 0 or use_ds) else None)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # Loop -----------------------------------------------------------------------------------------
    data = ray.get(loop["data"])  # the kept examples' token ids (read-only views of the object store)
    dpo_args = (cfg.dpo_beta, cfg.dpo_label_smoothing, cfg.dpo_sft_weight) if cfg.method == "dpo" else None
    # The unit a step draws: a sequence, or with DPO a pair p (sequences 2p chosen and 2p + 1 rejected).
    n_units = (len(data["seq_starts"]) - 1) // (2 if dpo_args else 1)
    total, steps_per_epoch = loop["total_steps"], loop["steps_per_epoch"]
    mine = slice(rank * cfg.micro_batch_size * cfg.grad_accum, (rank + 1) * cfg.micro_batch_size * cfg.grad_accum)
    per_step = world * cfg.micro_batch_size * cfg.grad_accum
    warmup = warmup_steps_for(total, cfg.warmup_ratio)
    pad_id = loop["pad_id"]
    step = state["step"]
    fail_at = int(loop.get("fail_at_step") or 0)
    nan_steps = set(loop.get("nan_steps") or ())
    metrics: dict = {"step": step}
    last_report = time.monotonic()
    tracker = open_logger(cfg.report_to, loop["metrics_dir"], Path(cfg.out).name, loop["cfg"]) if rank == 0 else None
    model.train()
    while step < total:
        t0 = time.perf_counter()
        step += 1
        epoch = (step - 1) // steps_per_epoch
        seqs = step_sequences(step, n_units, per_step, steps_per_epoch, cfg.seed)
        own = seqs[mine]
        micro = [collate(sequence_rows(data, dpo.pair_sequences(units) if dpo_args else units), pad_id)
                 for units in (own[j : j + cfg.micro_batch_size] for j in range(0, len(own), cfg.micro_batch_size))]
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)  # dropout: same stream after a resume
        lr = cfg.lr * lr_multiplier(step, total, warmup, cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Loss = sum over the step's assistant tokens on all workers / their count: every token weighs
        # the same whatever micro-batch or worker it falls in (DPO: the mean over the step's pairs). DDP
        # and DeepSpeed average gradients over workers (hence * world); DeepSpeed's own division by
        # grad_accum is turned off.
        counts = torch.tensor([sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro),
                               sum(b["n_tokens"] for b in micro)], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(counts)
        n_label, n_tokens = max(1.0, float(counts[0])), float(counts[1])
        per_loss = float(per_step) if dpo_args else n_label
        sums = forward_backward(model, micro, world / per_loss, autocast, device, engine, dpo_args)
        if step in nan_steps and not use_ds:  # NAN_ENV: test-only fault injection
            for p in trainable:
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        skipped = False
        if use_ds:
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else None
        else:
            # the total norm either way (an infinite clip norm clips nothing): a NaN gradient shows in it
            grad_norm = float(torch.nn.utils.clip_grad_norm_(
                trainable, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")))
            finite = torch.tensor([float(math.isfinite(grad_norm) and bool(torch.isfinite(sums).all()))], device=device)
            if world > 1:  # every worker skips the same steps
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            skipped = not bool(finite[0] > 0)
            if not skipped:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # Rank 0 decides whether this step reports metrics to Ray Train; the flag rides on the loss
        # all-reduce so every worker calls ray.train.report the same number of times.
        due = rank == 0 and time.monotonic() - last_report >= REPORT_EVERY_S
        reduced = torch.cat([sums, torch.tensor([float(due)], dtype=torch.float64, device=device)])
        if world > 1:
            dist.all_reduce(reduced)
        sums, report_due = reduced[:-1] / per_loss, bool(reduced[-1] > 0)
        if on_gpu:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        entry = {"step": step, "loss": float(sums[0]), "lr": lr, "tokens": int(n_tokens),
                 "label_tokens": int(n_label), "step_time_s": round(dt, 4), "tokens_per_s": round(n_tokens / dt, 1),
                 "grad_norm": grad_norm, "epoch": epoch}
        if dpo_args:  # the step's means of the DPO statistics; example_ids are pair ids
            entry.update({f"dpo_{name}": float(v) for name, v in zip(dpo.STAT_NAMES[1:], sums[1:])})
            entry["example_ids"] = [int(data["example_ids"][2 * p]) for p in seqs]
        else:
            entry["example_ids"] = [int(data["example_ids"][e]) for s in seqs for e in sequence_members(data, s)]
        if skipped or not math.isfinite(entry["loss"]):  # DeepSpeed has stepped already: counted, not skipped
            entry["skipped_nonfinite"] = skipped
            bad = state.setdefault("nonfinite_steps", [])
            bad.append(step)
            if rank == 0:
                log.warning("step %d: loss %s, gradient norm %s: %s; its examples %s", step, entry["loss"], grad_norm,
                            "no update" if skipped else "DeepSpeed updated anyway", entry["example_ids"][:16])
            too_many = nonfinite_error(bad, step, total, cfg.max_nonfinite_fraction, entry["example_ids"])
            if too_many:
                raise FloatingPointError(too_many)
        state["history"].append(entry)
        state.update(step=step, epoch=epoch)
        metrics = {k: v for k, v in entry.items() if k != "example_ids"}
        if tracker is not None:
            tracker.log(metrics, step)
        if rank == 0 and (step % cfg.log_every == 0 or step == total):
            log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s %.3fs/step", step, total, entry["loss"], lr,
                     entry["tokens_per_s"], dt)
        is_ckpt = cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0 and step < total
        if is_ckpt:
            save_checkpoint(False, metrics)
            last_report = time.monotonic()
        elif report_due and step < total:
            ray.train.report(metrics)
            last_report = time.monotonic()
        if fail_at and step == fail_at and not state["resumed_from"]:
            raise RuntimeError(f"injected failure after step {step} ({FAIL_ENV})")
    if tracker is not None:
        tracker.close()
    save_checkpoint(True, metrics)


# --------------------------------------------------------------------------------------------------
# 3. run(): data, trainer, outputs
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def tokenize_batch(batch, model_path: str, max_length: int) -> dict:
    """Ray Data map_batches: messages -> input_ids/labels (assistant only), or the reason the row is rejected.

    A task function rather than an actor class on purpose: the tokenizer loads in 0.1-1 s and is cached
    per worker process, and Ray reuses its pooled task workers across datasets and runs, while an
    actor pool starts (and imports transformers in) a fresh process every time (~10-20 s on 2 cores).
    """
    tokenizer = _cached_tokenizer(model_path)
    out: dict[str, list] = {"example_id": batch.column("example_id").to_pylist(), "input_ids": [], "labels": [],
                            "n_tokens": [], "n_prompt_tokens": [], "reason": [], "detail": []}
    for messages in batch.column("messages").to_pylist():
        try:
            ex = tokenize_conversation(messages, tokenizer)
            reason, detail = rejection(ex, max_length)
        except Exception as e:  # noqa: BLE001 - template errors too; the row is rejected with its error, never dropped silently
            ex, reason, detail = TokenizedExample([], []), "bad_conversation", f"{type(e).__name__}: {e}"
        keep = not reason
        out["input_ids"].append(ex.input_ids if keep else [])
        out["labels"].append(ex.labels if keep else [])
        out["n_tokens"].append(len(ex.input_ids))
        out["n_prompt_tokens"].append(ex.n_prompt_tokens)
        out["reason"].append(reason)
        out["detail"].append(detail)
    return out


def read_sft_table(files: list[Path]):
    """The SFT rows' messages and an `example_id`: the question_id when every row has a distinct one, else the
    row number (in file order). Returns (pyarrow table, the id's name: 'question_id' or 'row')."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for f in files:
        cols = ["messages"] + (["question_id"] if "question_id" in pq.read_schema(f).names else [])
        tables.append(pq.read_table(f, columns=cols))
    if all("question_id" in t.column_names for t in tables):
        qids = [q for t in tables for q in t.column("question_id").to_pylist()]
        if None not in qids and len(set(qids)) == len(qids):
            table = pa.concat_tables([t.select(["messages"]) for t in tables])
            return table.append_column("example_id", pa.array([int(q) for q in qids], pa.int64())), "question_id"
    table = pa.concat_tables([t.select(["messages"]) for t in tables])
    return table.append_column("example_id", pa.array(range(table.num_rows), pa.int64())), "row"


def default_input(out: Path) -> str:
    """No --input: the bundled demo train split converted (default prompt) into <out>/convert, once."""
    conv_dir = out / "convert"
    if not ((conv_dir / "train.parquet").is_file() and read_manifest(conv_dir)):
        from . import convert
        from .config import ConvertConfig

        log.info("train: no --input; converting the bundled demo train split into %s first", conv_dir)
        convert.run(ConvertConfig(out=str(conv_dir)))
    return str(conv_dir)


def prompt_record_for(files: list[Path], input_path: str) -> dict | None:
    """The prompt config and tokenizer recorded by the `t2s convert` run the SFT set comes from (directly, or
    through the `t2s synthesize` manifest's `input`); None when no manifest says."""
    from .prompts import recorded_prompt

    return recorded_prompt(input_path if Path(input_path).is_dir() else files[0].parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


RESUME_NEUTRAL = frozenset({
    "input", "out", "storage_path", "max_rejected_fraction", "max_nonfinite_fraction", "merge", "use_gpu",
    "cpus_per_worker", "checkpoint_every", "keep_checkpoints", "max_failures", "log_every", "report_to",
    "gradient_checkpointing", "checkpoint_layers", "liger", "fused_loss"})
"""Train options a resumed run may change: where things go, bookkeeping, and how (not what) a step computes."""


def trajectory(cfg: TrainConfig, input_sha256: dict[str, str]) -> dict:
    """What a checkpoint's run must share with this one to be resumed by it: every option that changes which
    examples a step sees or what an update does (not RESUME_NEUTRAL), and the input files' contents."""
    ident = {k: v for k, v in to_dict(cfg).items() if k not in RESUME_NEUTRAL}
    ident["input_sha256"] = sorted(input_sha256.values())
    return json.loads(json.dumps(ident, default=str))  # as a checkpoint's state.json holds it


def trajectory_changes(previous: dict, run_id: dict) -> list[tuple[str, object, object]]:
    """(option, checkpoint's value, this run's) for each difference; a checkpoint written before run ids were
    recorded is compared on method and model only."""
    before = previous.get("run_id") or {"method": previous.get("method"), "model": previous.get("model")}
    return [(k, before.get(k), run_id.get(k)) for k in sorted(before) if before.get(k) != run_id.get(k)]


def latest_checkpoint_state(storage: str) -> dict | None:
    """state.json of the newest checkpoint in a local Ray Train storage dir (None when there is none)."""
    run_dir = Path(storage) / "train"
    best = None
    for f in run_dir.glob("checkpoint_*/state.json"):
        try:
            s = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if best is None or s.get("step", 0) > best.get("step", 0):
            best = s
    return best


def plot_loss(history: list[dict], path: Path, ylabel: str = "loss (assistant tokens)") -> None:
    try:
        import matplotlib
    except ImportError:  # a declared dependency, but a bare GPU image may lack it: the manifest has the numbers
        log.warning("matplotlib is not installed: %s not drawn (loss_history in manifest.json)", path.name)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker="." if len(history) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _copy_into(src_dir: Path, out: Path, skip: tuple = ("README.md",)) -> list[str]:
    names = []
    for f in sorted(src_dir.iterdir()):
        if f.name in skip or not f.is_file():
            continue
        with atomic_path(out / f.name) as tmp:
            shutil.copyfile(f, tmp)
        names.append(f.name)
    return names


def run(cfg: TrainConfig) -> Path:
    """Fine-tune cfg.model on the SFT set with Ray Train and write the model dir, manifest and loss curve."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoTokenizer

    from .common import ensure_ray

    started = time.time()
    out = Path(cfg.out).resolve()
    dpo_run = cfg.method == "dpo"
    if dpo_run:  # samples.parquet + the convert rows its synthesize manifest names, or a pairs Parquet
        input_path = cfg.input
        files = dpo.find_input(input_path)
    else:
        input_path = cfg.input or default_input(out)
        files = find_sft_files(input_path)
        check_sft_schema(files)
    prompt_record = prompt_record_for(files, input_path)
    if prompt_record is not None:
        check_schema_budget(PromptConfig(**prompt_record["config"]), cfg.max_length,
                            f"train of {input_path} (prompt recorded in {prompt_record['manifest']})")
    else:
        log.warning("train: no convert/synthesize manifest beside %s records its prompt config; `t2s evaluate --model "
                    "%s` will need the prompt flags given by hand", input_path, out)
    model_path = starting_model(models.resolve_model(cfg.model), out)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of {model_path} has no chat template; train needs one to find assistant turns.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ds_preset = load_deepspeed_preset(cfg.deepspeed) if cfg.method == "full" and cfg.deepspeed else None
    storage = cfg.storage_path or str(out / "ray_train")
    input_sha256 = {str(f): _sha256(f) for f in files}
    run_id = trajectory(cfg, input_sha256)
    previous = latest_checkpoint_state(storage) if "://" not in storage else None
    changed = trajectory_changes(previous, run_id) if previous else []
    if changed:
        raise ValueError(
            f"{storage} holds checkpoints of a run with other options or data ("
            + ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed) + "): resuming them would not be this run. "
            "Use a new --out (or --storage-path), or delete that folder to start over."
        )
    check_report_to(cfg.report_to)
    out.mkdir(parents=True, exist_ok=True)
    ensure_ray()

    # Data: Parquet -> tokens with assistant-only labels (Ray Data) -> kept examples and the rejected ones
    # (listed with their reason) -> sequences; the token ids go to the object store once and every worker
    # indexes them in the order `step_sequences` fixes. DPO: pairs -> two conversations each (example ids
    # 2p and 2p + 1), a pair kept only whole.
    if dpo_run:
        import pyarrow as pa

        built = dpo.read_input(files, cfg)
        write_parquet(out / "pairs.parquet", pa.Table.from_pylist([{**p, "pair": i} for i, p in enumerate(built.pairs)]))
        if not built.pairs:
            write_jsonl(out / "rejected.jsonl", built.unused)
            raise ValueError(
                f"train --method dpo: no (chosen, rejected) pair in {input_path}: questions {built.questions}; samples "
                f"in no pair { {k: v for k, v in built.unused_by_reason.items() if v} } (listed in {out / 'rejected.jsonl'}). Draw more samples per "
                "question (synthesize --samples), at a higher temperature, or widen --dpo-chosen / --dpo-rejected."
            )
        table, id_name = pa.table(dpo.member_rows(built.pairs)), "pair"
    else:
        table, id_name = read_sft_table(files)
    blocks = [table.slice(i, TOKENIZE_BLOCK) for i in range(0, table.num_rows, TOKENIZE_BLOCK)] or [table]
    tokenized = ray.data.from_arrow(blocks).map_batches(
        tokenize_batch, fn_kwargs={"model_path": model_path, "max_length": cfg.max_length},
        batch_format="pyarrow", batch_size=256,
    ).materialize()
    kept: list[tuple[int, Any, Any]] = []  # (example_id, input_ids, labels) as numpy arrays
    rejected: list[dict] = []
    n_rows = 0
    for b in tokenized.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(b["example_id"])):
            n_rows += 1
            if b["reason"][i]:
                rejected.append({id_name: int(b["example_id"][i]), "reason": str(b["reason"][i]),
                                 "detail": str(b["detail"][i]), "n_tokens": int(b["n_tokens"][i]),
                                 "prompt_tokens": int(b["n_prompt_tokens"][i])})
            else:
                kept.append((int(b["example_id"][i]), b["input_ids"][i].astype("int32"), b["labels"][i].astype("int32")))
    if n_rows != table.num_rows:
        raise RuntimeError(f"train lost rows: {table.num_rows} in, {n_rows} tokenized; this is a bug, please report it.")
    kept.sort(key=lambda e: e[0])
    rejected.sort(key=lambda r: r[id_name])
    unit = "rows"
    if dpo_run:  # rows are now pairs: a pair with a rejected member is rejected whole
        kept, rejected = dpo.whole_pairs(kept, rejected, built.pairs)
        n_rows, unit = len(built.pairs), "pairs"
    write_jsonl(out / "rejected.jsonl", (built.unused if dpo_run else []) + rejected)
    by_reason = {k: sum(1 for r in rejected if r["reason"] == k) for k in REJECT_REASONS}
    share = len(rejected) / max(1, n_rows)
    if not kept or share > cfg.max_rejected_fraction:
        longest = max((r["prompt_tokens"] for r in rejected if r["reason"] == "too_long"), default=0)
        raise ValueError(
            f"train: {len(rejected)} of {n_rows} {unit} of {input_path} ({share:.1%}) would be rejected, more than "
            f"train.max_rejected_fraction={cfg.max_rejected_fraction:.1%} "
            f"({', '.join(f'{k} {v}' for k, v in by_reason.items() if v)}; listed in {out / 'rejected.jsonl'}). "
            + (f"Too long: raise --max-length (the longest rejected prompt alone is {longest} tokens) or convert "
               "again with a smaller --prompt.max-schema-tokens. " if by_reason["too_long"] else "")
            + "Or accept the loss with --max-rejected-fraction."
        )
    seqs = layout_sequences([len(e[1]) for e in kept], cfg.packing, cfg.max_length, cfg.seed)
    n_seq = len(seqs)
    n_units = n_seq // 2 if dpo_run else n_seq  # what a step draws: sequences, or DPO pairs (2 sequences each)
    per_step = cfg.num_workers * cfg.micro_batch_size * cfg.grad_accum
    steps_per_epoch = n_units // per_step
    if steps_per_epoch == 0:
        raise ValueError(
            f"{n_units} training {'pairs' if dpo_run else 'sequences'} cannot fill one step of {per_step} (num_workers "
            "x micro_batch_size x grad_accum); lower those or give more data."
        )
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    start_step = previous["step"] if previous else 0
    n_tokens, n_label = sum(len(e[1]) for e in kept), sum(int((e[2] != IGNORE).sum()) for e in kept)
    data_ref = ray.put(pack_train_data(kept, seqs))
    del kept
    log.info("train: %d %s: %d trained on, %d rejected (%s; %s), %d sequences, %d steps/epoch, %d steps "
             "(from step %d)", n_rows, unit, n_rows - len(rejected), len(rejected),
             ", ".join(f"{k} {v}" for k, v in by_reason.items()) or "none", out / "rejected.jsonl", n_seq,
             steps_per_epoch, total_steps, start_step)

    loop = {
        "cfg": to_dict(cfg), "model_path": model_path, "model_spec": cfg.model, "ds_preset": ds_preset, "run_id": run_id,
        "pad_id": int(pad_id), "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
        "fail_at_step": int(os.environ.get(FAIL_ENV, "0") or 0), "data": data_ref,
        "nan_steps": [int(x) for x in os.environ.get(NAN_ENV, "").split(",") if x.strip()],
        "metrics_dir": str(out / "tensorboard"),  # rank 0's TensorBoard event files (tracking.py)
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name="train", storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    result = trainer.fit()

    # Outputs: the final checkpoint's Hugging Face dir, the tokenizer, merged model, manifest, loss curve.
    with result.checkpoint.as_directory() as d:
        ck = Path(d)
        state = json.loads((ck / "state.json").read_text())
        files_written = _copy_into(ck / "hf", out)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files_written += _copy_into(Path(tmp), out)
    if cfg.method in LORA_METHODS:
        adapter_cfg = json.loads((out / "adapter_config.json").read_text())
        adapter_cfg["base_model_name_or_path"] = model_path  # a path or hub name from_pretrained loads
        from .common import write_json

        write_json(out / "adapter_config.json", adapter_cfg)
    if cfg.merge and cfg.method in LORA_METHODS:
        _write_merged(out, model_path, out / "merged")
    history = state["history"]
    shutil.rmtree(out / ".frozen_prefix_cache", ignore_errors=True)  # a cache of this run, not an output
    plot_loss(history, out / "loss_curve.png", "DPO loss (mean over pairs)" if dpo_run else "loss (assistant tokens)")
    run_now = [h for h in history if h["step"] > start_step]
    tok_s = (sum(h["tokens"] for h in run_now) / sum(h["step_time_s"] for h in run_now)) if run_now else None
    step_times = sorted(h["step_time_s"] for h in run_now)
    dpo_keys = tuple(f"dpo_{n}" for n in dpo.STAT_NAMES[1:]) if dpo_run else ()
    write_jsonl(out / "steps.jsonl",
                ({k: h.get(k) for k in ("step", "epoch", "loss", *dpo_keys, "example_ids")} for h in history))
    dpo_data = {"dpo": dpo.manifest_section(built, n_rows - len(rejected), cfg, len(files) == 2)} if dpo_run else {}
    write_manifest(
        out, "train", cfg, started,
        model={"spec": cfg.model, "resolved": model_path, "method": cfg.method,
               "loss": (f"sigmoid DPO (beta {cfg.dpo_beta}, label smoothing {cfg.dpo_label_smoothing}) on the summed "
                        "log-probs of the assistant tokens; reference = the starting model (LoRA disabled)"
                        + (f"; + {cfg.dpo_sft_weight} x the chosen answer's mean NLL per token (RPO)"
                           if cfg.dpo_sft_weight else "")
                        if dpo_run else "assistant tokens only"),
               "deepspeed": ds_preset},
        prompt=prompt_record,
        data={
            "input": str(input_path), "files": [str(f) for f in files], "sha256": input_sha256,
            "rows": n_rows, "trained": n_rows - len(rejected), "rejected": len(rejected),
            "rejected_by_reason": by_reason, "rejected_file": "rejected.jsonl", "id": id_name,
            "max_rejected_fraction": cfg.max_rejected_fraction,
            "policy": "an example longer than max_length is rejected whole, never cut; prompts are trained as converted",
            "max_length": cfg.max_length, "packing": cfg.packing,
            "nonfinite_steps": state.get("nonfinite_steps", []),
            "sequences": int(n_seq), "tokens": int(n_tokens), "label_tokens": int(n_label),
            "order": (f"steps.jsonl: the {'pair' if dpo_run else 'example'} ids of every optimizer step (a new seeded "
                      "order every epoch)"),
            **dpo_data,
        },
        training={
            "total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "steps_run": len(run_now),
            "resumed_from_step": state.get("resumed_from", []),
            "sequences_per_step": per_step * (2 if dpo_run else 1), **({"pairs_per_step": per_step} if dpo_run else {}),
            "num_workers": cfg.num_workers, "use_gpu": cfg.use_gpu,
        },
        metrics={
            "first_loss": history[0]["loss"] if history else None,
            "final_loss": history[-1]["loss"] if history else None,
            "tokens_per_s": round(tok_s, 1) if tok_s else None,
            "median_step_time_s": step_times[len(step_times) // 2] if step_times else None,
        },
        loss_history=[{k: h[k] for k in ("step", "loss", *dpo_keys, "lr", "tokens_per_s", "step_time_s")} for h in history],
        files=sorted(set(files_written) | {"manifest.json", "loss_curve.png", "rejected.jsonl", "steps.jsonl"}
                     | ({"pairs.parquet"} if dpo_run else set())),
        checkpoint=str(result.checkpoint.path), storage=storage,
    )
    log.info("train: %d steps (%d this run), final loss %s -> %s", state["step"], len(run_now),
             history[-1]["loss"] if history else None, out)
    return out


def _write_merged(adapter_dir: Path, model_path: str, target: Path) -> None:
    """The LoRA adapter in `adapter_dir` merged into the base weights of `model_path`, as a plain model dir at
    `target` (written atomically)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(model_path).save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def starting_model(model_path: str, out: Path) -> str:
    """The plain model dir training starts from: `model_path`, or for a LoRA adapter dir (a `t2s train` LoRA or
    DPO output) its adapter merged into its base: its ``merged/`` when it has one, else ``<out>/base`` (written
    once, reused on resume). A new adapter goes on top of that, so with DPO disabling it gives exactly the
    starting (e.g. SFT) model, the reference; the new adapter's ``base_model_name_or_path`` names it."""
    if not models.is_adapter_dir(model_path):
        return model_path
    merged = Path(model_path) / "merged"
    if (merged / "config.json").is_file():
        return str(merged)
    target = out / "base"
    if not (target / "config.json").is_file():
        base_ref = json.loads((Path(model_path) / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        log.info("train: merging the LoRA adapter %s into its base %s -> %s (the starting model)", model_path,
                 base_ref, target)
        _write_merged(Path(model_path), models.resolve_model(base_ref), target)
    return str(target)
