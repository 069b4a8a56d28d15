"""`t2s train`'s LoRA training step beside a plain transformers + peft loop, in one process, same card.

    python benchmarks/train_speed.py --shape 8b                 # GPU: Llama-3.1-8B shape, seq 2048, LoRA r16 all-linear
    python benchmarks/train_speed.py --shape 1b --data sft      # another shape / the padded-SFT comparison only
    python benchmarks/train_speed.py --shape tiny --seq 256 --micro-batch 2 --steps 3 --warmup 1   # CPU check

Both sides get a randomly initialised Llama of the chosen shape (speed does not depend on weight values),
the same LoRA (r16, alpha 32, all linear layers, dropout 0 = PEFT's default) and AdamW, and the same
token batches. Per side: median step time over --steps steps after --warmup steps, tokens/s = real
(non-padding) tokens per step / step time; peak GPU memory.

- plain: `get_peft_model` (fp32 adapters, PEFT's default), `model(input_ids, labels=...).loss` (full
  [tokens x vocab] logits), gradient checkpointing on every layer, micro-batch --micro-batch (4). This is
  the reference loop of shared/device/README.md (6,450 tokens/s on an H200 for the 8B shape).
- ours: `text2sql_ray.train.prepare_for_training` + `forward_backward`, the functions the `t2s train`
  worker loop runs: bf16 autocast with PEFT's fp32 input casts off, the chunked lm_head + cross-entropy
  over labelled tokens only (no full logits), packing, and gradient checkpointing only where memory
  needs it: the first candidate of --ours (micro-batch x checkpointed fraction) that fits is kept.
  liger-kernel's ops are added as extra candidates when it is installed (--liger).

Data modes (--data): 'random' = full-length random sequences, every token labelled (the reference's
setting: no padding, so packing does not matter); 'sft' = SFT-like examples (lengths log-normal around
--mean-len, loss on the last 25% of each example): plain pads each micro-batch to its longest example
(dynamic padding) with labels -100 on prompt and padding, ours packs examples into --seq rows.
Ray is not involved: shared/device/README.md measured the same LoRA run inside Ray Train (1 GPU worker)
at the plain loop's speed (6,461 vs 6,450 tokens/s).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # Llama-3.1-8B, Llama-3.2-1B, and a tiny one for CPU checks (SmolLM2's vocabulary size)
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, max_position_embeddings=4096, tie_word_embeddings=True),
}
IGNORE = -100


def make_model(shape: str, dtype, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    model.config.use_cache = False
    return model


# --- data ------------------------------------------------------------------------------------------


def random_micro_batches(n: int, mb: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (mb, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
                    "position_ids": torch.arange(seq).expand(mb, seq).clone(), "n_tokens": mb * seq})
    return out


def sft_examples(n: int, seq: int, vocab: int, mean_len: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Random-token examples with log-normal lengths (median mean_len, clipped to [64, seq]); labels on the last 25%."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = int(min(seq, max(64, rng.lognormvariate(math.log(mean_len), 0.6))))
        ids = [rng.randrange(vocab) for _ in range(length)]
        answer = max(8, length // 4)
        out.append((ids, [IGNORE] * (length - answer) + ids[length - answer:]))
    return out


def padded_micro_batches(examples, mb: int, n: int) -> list[dict]:
    """Plain side: consecutive examples, right-padded to the micro-batch's longest (dynamic padding)."""
    import torch

    out = []
    for k in range(n):
        rows = examples[k * mb:(k + 1) * mb]
        width = max(len(r[0]) for r in rows)
        ids = torch.zeros((mb, width), dtype=torch.long)
        labels = torch.full((mb, width), IGNORE, dtype=torch.long)
        mask = torch.zeros((mb, width), dtype=torch.long)
        for i, (e_ids, e_labels) in enumerate(rows):
            ids[i, :len(e_ids)], labels[i, :len(e_ids)], mask[i, :len(e_ids)] = (
                torch.tensor(e_ids), torch.tensor(e_labels), 1)
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask,
                    "n_tokens": sum(len(r[0]) for r in rows)})
    return out


def packed_micro_batches(examples, mb: int, seq: int, n: int) -> list[dict]:
    """Ours: `t2s train`'s packing (first-fit decreasing per 1024 examples) and collation."""
    from text2sql_ray import train as T

    rows = []
    for s in range(0, len(examples), T.PACK_BUFFER):
        rows += T.pack_examples(examples[s:s + T.PACK_BUFFER], seq)
        if len(rows) >= n * mb:
            break
    if len(rows) < n * mb:
        raise SystemExit(f"not enough examples for {n} packed micro-batches of {mb}; raise --examples")
    batches = []
    for k in range(n):
        chunk = rows[k * mb:(k + 1) * mb]
        batches.append(T.collate({c: [r[c] for r in chunk] for c in ("input_ids", "labels", "position_ids")}, pad_id=0))
    return batches


# --- the two loops ------------------------------------------------------------------------------------


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(step_fn, batches, warmup, device) -> dict:
    import torch

    times, tokens = [], []
    for i, b in enumerate(batches):
        _sync(device)
        t0 = time.perf_counter()
        step_fn(b)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            tokens.append(b["n_tokens"])
    med = statistics.median(times)
    return {
        "median_step_s": round(med, 4),
        "tokens_per_step": round(sum(tokens) / len(tokens), 1),
        "tokens_per_s": round(sum(tokens) / sum(times), 1),
        "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None,
    }


def lora_config(args):
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=args.lora_dropout, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def plain_loop(args, batches, dtype, device, checkpointing: bool = True) -> dict:
    import torch
    from peft import get_peft_model

    base = make_model(args.shape, dtype, device)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, lora_config(args))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(b):
        out = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                    labels=b["labels"].to(device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _timed(step, batches, args.warmup, device)


def ours_loop(args, batches, dtype, device, checkpoint_fraction: float | None, liger: bool = False) -> dict:
    import torch

    from text2sql_ray import train as T
    from text2sql_ray.config import TrainConfig

    cfg = TrainConfig(method="lora", lora_r=16, lora_alpha=32, lora_dropout=args.lora_dropout,
                      lora_targets="all-linear", gradient_checkpointing=checkpoint_fraction is not None,
                      checkpoint_layers=checkpoint_fraction or 1.0, use_gpu=device.type == "cuda", liger=liger)
    wrapper, autocast = T.prepare_for_training(make_model(args.shape, dtype, device), cfg, dtype, device.type)
    wrapper.train()
    params = [p for p in wrapper.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

    def step(b):
        n_label = max(1, int((b["labels"][:, 1:] != IGNORE).sum()))
        T.forward_backward(wrapper, [b], 1.0 / n_label, autocast, device)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    res = _timed(step, batches, args.warmup, device)
    res["loss_impl"] = wrapper.loss_impl
    return res


def attempt(fn, *a, **kw) -> dict:
    """Run one configuration; an out-of-memory error is a result ('OOM'), then memory is released."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        return fn(*a, **kw)
    except torch.OutOfMemoryError as e:
        return {"oom": str(e).split("\n")[0][:160]}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def parse_candidates(spec: str) -> list[tuple[int, float | None]]:
    """'4:none,4:0.5,2:none,4:1' -> [(micro-batch, checkpointed fraction or None)]."""
    out = []
    for item in spec.split(","):
        mb, frac = item.split(":")
        out.append((int(mb), None if frac in ("none", "0") else float(frac)))
    return out


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4, help="plain loop micro-batch (the reference's 4)")
    ap.add_argument("--ours", default="4:none,4:0.25,4:0.5,2:none,4:1",
                    help="ours' candidates micro-batch:checkpointed-fraction, in order; the first that fits wins")
    ap.add_argument("--try-all", action="store_true", help="measure every candidate, not just the first that fits")
    ap.add_argument("--plain-no-gc", type=int, default=0, metavar="MB",
                    help="also time the plain loop without checkpointing at this micro-batch (0 = skip)")
    ap.add_argument("--data", choices=["random", "sft", "both"], default="both")
    ap.add_argument("--mean-len", type=int, default=700, help="median example length in --data sft")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--liger", action="store_true", help="add liger-kernel candidates (GPU, if installed)")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    has_liger = importlib.util.find_spec("liger_kernel") is not None
    import peft
    import transformers

    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "liger_kernel_installed": has_liger, "shape": args.shape, "seq": args.seq, "dtype": str(dtype)}
    print(json.dumps(env), flush=True)
    n = args.warmup + args.steps
    vocab = SHAPES[args.shape]["vocab_size"]
    candidates = [(mb, frac, False) for mb, frac in parse_candidates(args.ours)]
    if args.liger and has_liger and device.type == "cuda":
        candidates += [(mb, frac, True) for mb, frac, _ in candidates]
    elif args.liger:
        print("liger-kernel is not installed (or no GPU): liger candidates skipped", flush=True)

    results = {"env": env, "modes": {}}
    for mode in (["random", "sft"] if args.data == "both" else [args.data]):
        rows = []
        if mode == "random":
            plain_batches = random_micro_batches(n, args.micro_batch, args.seq, vocab)
        else:
            examples = sft_examples(max(4096, 8 * n * args.micro_batch), args.seq, vocab, args.mean_len)
            plain_batches = padded_micro_batches(examples, args.micro_batch, n)
        t = time.time()
        plain = attempt(plain_loop, args, plain_batches, dtype, device, True)
        rows.append({"side": "plain", "micro_batch": args.micro_batch, "checkpointing": 1.0, **plain})
        print(f"[{mode}] plain mb={args.micro_batch} gc=all: {plain} ({time.time() - t:.0f}s)", flush=True)
        if args.plain_no_gc:
            pb = (random_micro_batches(n, args.plain_no_gc, args.seq, vocab) if mode == "random"
                  else padded_micro_batches(examples, args.plain_no_gc, n))
            res = attempt(plain_loop, args, pb, dtype, device, False)
            rows.append({"side": "plain", "micro_batch": args.plain_no_gc, "checkpointing": 0.0, **res})
            print(f"[{mode}] plain mb={args.plain_no_gc} gc=none: {res}", flush=True)
        best = None
        for mb, frac, liger in candidates:
            if best is not None and not args.try_all and liger == best["liger"]:
                continue
            ob = (random_micro_batches(n, mb, args.seq, vocab) if mode == "random"
                  else packed_micro_batches(examples, mb, args.seq, n))
            t = time.time()
            res = attempt(ours_loop, args, ob, dtype, device, frac, liger)
            row = {"side": "ours", "micro_batch": mb, "checkpointing": frac or 0.0, "liger": liger, **res}
            rows.append(row)
            print(f"[{mode}] ours mb={mb} gc={frac or 'none'} liger={liger}: {res} ({time.time() - t:.0f}s)",
                  flush=True)
            if "oom" not in res and (best is None or res["tokens_per_s"] > best["tokens_per_s"]):
                best = row
        ratio = (best["tokens_per_s"] / plain["tokens_per_s"]) if best and "oom" not in plain else None
        results["modes"][mode] = {"rows": rows, "best_ours": best, "ratio": ratio}
        print(f"\n== {mode} | {env['device']} | {args.shape} seq {args.seq} ==")
        print(f"{'side':<6} {'mb':>3} {'ckpt':>5} {'liger':>6} {'tokens/s':>10} {'step s':>8} {'peak GB':>8}")
        for r in rows:
            if "oom" in r:
                print(f"{r['side']:<6} {r['micro_batch']:>3} {r['checkpointing']:>5} {r.get('liger', '')!s:>6} {'OOM':>10}")
            else:
                print(f"{r['side']:<6} {r['micro_batch']:>3} {r['checkpointing']:>5} {r.get('liger', '')!s:>6} "
                      f"{r['tokens_per_s']:>10,.0f} {r['median_step_s']:>8.3f} {r['peak_gb']!s:>8}")
        print(f"ratio ours/plain ({mode}): {ratio:.2f}x" if ratio else f"ratio ({mode}): n/a", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
