"""Teacher generation speed: the hf engine batched on Ray Data vs one prompt at a time (the seed's pattern).

    python benchmarks/synth_speed.py --rows 32                      # SmolLM2-135M-Instruct on CPU
    python benchmarks/synth_speed.py --rows 256 --device cuda --shape 1b --max-new-tokens 256 --batch-size 64

Both paths generate the same work with the same code (`engines.HFGenerator`, per-sample seeds, the same
model, dtype, sampling and max_new_tokens): `--samples` chains for each of `--rows` teacher prompts of
`t2s synthesize` (the bundled demo's train questions, blind mode, the convert output's user turn):

* seed pattern: one process, one request per (question, sample), each a `generate` call on one prompt
  (the cookbook's `create_reasoning_dataset.py` sends one blocking request per example);
* ours: `engines.generate(ds, cfg, n=samples)` on Ray Data, `--batch-size` prompts x n samples per
  `generate` call, `--concurrency` actors.

Timed: the seed loop including its model load, and the Ray Data path from dataset creation to the last
row (actor start and model load included). Ray start-up is timed apart. One run each; rows/s (questions),
samples/s, tokens/s and the ratio are printed, and written as JSON with `--json`.

`--model` takes a dir or hub name (empty = the embedded SmolLM2); `--shape` builds a random-init Llama
(SmolLM2's tokenizer) of a given size instead: a preset (`tiny`, `135m`, `1b`, `8b`) or
`layers=16,hidden=2048,heads=32,kv_heads=8,intermediate=8192`. `--device cuda` puts the model on one GPU
(engine.num_gpus=1). Random weights rarely emit EOS, so generations run to max_new_tokens on both paths.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = {
    "tiny": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128},
    "135m": {"layers": 30, "hidden": 576, "heads": 9, "kv_heads": 3, "intermediate": 1536},
    "1b": {"layers": 16, "hidden": 2048, "heads": 32, "kv_heads": 8, "intermediate": 8192},
    "8b": {"layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 8, "intermediate": 14336},
}


def parse_shape(spec: str) -> dict:
    if spec in SHAPES:
        return dict(SHAPES[spec])
    out = {}
    for part in spec.split(","):
        k, _, v = part.partition("=")
        if k.strip() not in ("layers", "hidden", "heads", "kv_heads", "intermediate"):
            raise SystemExit(f"--shape: unknown key {k!r}; use layers, hidden, heads, kv_heads, intermediate or a preset "
                             f"({', '.join(SHAPES)}).")
        out[k.strip()] = int(v)
    return out


def random_llama(shape: dict, out: Path, dtype: str) -> Path:
    """A random-init Llama of this shape with SmolLM2's tokenizer and chat template, saved to `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from text2sql_ray.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(""))
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=8192, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg)
    if dtype in ("bfloat16", "float16"):
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"random Llama {shape}: {n / 1e6:.1f} M parameters -> {out}", flush=True)
    return out


def teacher_prompts(rows: int, convert_dir: str) -> list[dict]:
    """`rows` teacher prompts (blind) from a convert output (default: the demo train split, converted here)."""
    import pyarrow.parquet as pq

    from text2sql_ray.prompts import teacher_messages_for

    if not convert_dir:
        from text2sql_ray import convert
        from text2sql_ray.config import ConvertConfig

        convert_dir = tempfile.mkdtemp(prefix="synth_speed_convert_")
        atexit.register(shutil.rmtree, convert_dir, ignore_errors=True)
        convert.run(ConvertConfig(out=convert_dir, val_fraction=0.0, workers=1))
    conv = pq.read_table(Path(convert_dir) / "train.parquet").to_pylist()
    if not conv:
        raise SystemExit(f"{convert_dir}/train.parquet is empty")
    out = []
    for i in range(rows):  # cycle when asked for more rows than the split has (keys stay distinct)
        r = conv[i % len(conv)]
        out.append({"question_id": i, "teacher_messages": teacher_messages_for(r["messages"], "blind")})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32, help="questions (teacher prompts)")
    ap.add_argument("--samples", type=int, default=2, help="chains per question (k)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per generate call on the Ray Data path")
    ap.add_argument("--concurrency", type=int, default=1, help="generation actors on the Ray Data path")
    ap.add_argument("--model", default="", help="model dir or hub name (empty = embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--shape", default="", help="random-init Llama instead of --model: preset or layers=..,hidden=..")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch on both paths (0 = all cores)")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--convert-dir", default="", help="a `t2s convert` output to take prompts from (default: demo)")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    args = ap.parse_args()

    import ray
    import torch

    from text2sql_ray.common import ensure_ray
    from text2sql_ray.config import EngineConfig
    from text2sql_ray.engines import HFGenerator, generate

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    model = args.model
    if args.shape:
        tmp_model = Path(tempfile.mkdtemp(prefix="synth_speed_model_"))
        atexit.register(shutil.rmtree, tmp_model, ignore_errors=True)  # an 8B random model is 16 GB
        model = str(random_llama(parse_shape(args.shape), tmp_model, args.dtype))
    gpu = args.device == "cuda"
    t0 = time.perf_counter()
    ensure_ray()
    ray_start = time.perf_counter() - t0
    work = teacher_prompts(args.rows, args.convert_dir)
    k = args.samples
    print(f"{args.rows} questions x {k} samples, max_new_tokens {args.max_new_tokens}, model "
          f"{model or 'SmolLM2-135M-Instruct'} on {args.device} ({threads} threads), Ray start {ray_start:.1f} s",
          flush=True)

    # --- the seed's pattern: one prompt, one sample per generate call --------------------------------
    base_cfg = EngineConfig(model=model, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                            batch_size=1, num_gpus=1.0 if gpu else 0.0, dtype=args.dtype)
    t0 = time.perf_counter()
    gen = HFGenerator(base_cfg)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    seq_tokens = 0
    for row in work:
        for j in range(k):  # one request per (question, sample): a one-prompt batch, one sample, own seed
            [g] = gen.generate([row["teacher_messages"]], n=1, keys=[f"{row['question_id']}/{j}"])
            if g.error:
                raise SystemExit(f"baseline generation failed: {g.error}")
            seq_tokens += g.tokens[0]
    seq_gen_s = time.perf_counter() - t1
    seq_total = load_s + seq_gen_s
    del gen
    if gpu:
        torch.cuda.empty_cache()

    # --- ours: Ray Data, batched, n samples per prompt ------------------------------------------------
    ray_cfg = EngineConfig(model=model, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size, concurrency=args.concurrency,
                           num_gpus=1.0 if gpu else 0.0, num_cpus=float(threads), dtype=args.dtype)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    t0 = time.perf_counter()
    ds = ray.data.from_items(work, override_num_blocks=max(1, -(-len(work) // args.batch_size)))
    rows = generate(ds, ray_cfg, n=k, messages_column="teacher_messages", key_column="question_id").take_all()
    ray_s = time.perf_counter() - t0
    errors = [r["gen_error"] for r in rows if r["gen_error"]]
    if len(rows) != len(work) or errors:
        raise SystemExit(f"Ray Data path: {len(rows)} rows back of {len(work)}; errors: {errors[:3]}")
    ray_tokens = sum(sum(r["gen_tokens"]) for r in rows)

    n, s = len(work), len(work) * k
    result = {
        "rows": n, "samples": s, "max_new_tokens": args.max_new_tokens, "model": model or "SmolLM2-135M-Instruct",
        "shape": args.shape, "device": args.device, "threads": threads, "batch_size": args.batch_size,
        "concurrency": args.concurrency, "ray_start_s": round(ray_start, 2),
        "seed_pattern": {"load_s": round(load_s, 2), "generate_s": round(seq_gen_s, 2), "total_s": round(seq_total, 2),
                         "rows_per_s": round(n / seq_total, 4), "samples_per_s": round(s / seq_total, 4),
                         "tokens": seq_tokens, "tokens_per_s": round(seq_tokens / seq_total, 2)},
        "ray_data": {"total_s": round(ray_s, 2), "rows_per_s": round(n / ray_s, 4), "samples_per_s": round(s / ray_s, 4),
                     "tokens": ray_tokens, "tokens_per_s": round(ray_tokens / ray_s, 2)},
    }
    result["speedup_rows_per_s"] = round(result["ray_data"]["rows_per_s"] / result["seed_pattern"]["rows_per_s"], 2)
    print(f"seed pattern (one prompt, one sample per call): {seq_total:8.1f} s (load {load_s:.1f} s) "
          f"{n / seq_total:7.3f} rows/s  {s / seq_total:7.3f} samples/s  {seq_tokens} tokens")
    print(f"Ray Data hf engine (batch {args.batch_size} x n={k}): {ray_s:8.1f} s (actor start + load included) "
          f"{n / ray_s:7.3f} rows/s  {s / ray_s:7.3f} samples/s  {ray_tokens} tokens")
    print(f"ratio (Ray Data rows/s / seed rows/s): {result['speedup_rows_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
