"""Generation speed on one GPU: the hf engine vs the vllm engine, same prompts, model, sampling and limits.

    python benchmarks/generate_speed.py --model qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
        --data /path/to/bird/dev --limit 128 --samples 8 --max-new-tokens 512 --json out.json     # GPU

Both sides are the project's real generation path, `engines.generate(ds, cfg, n=k)` on Ray Data, as
`t2s synthesize` and `t2s evaluate --model` call it: `--limit` BIRD dev questions (those whose
database is on disk, the prompts of `t2s evaluate`: rich schema, chain of thought by default), k
samples per question at `--temperature` (per-sample seeds), `--max-new-tokens` at most, bf16.

* hf: transformers `generate` in one Ray Data actor on the GPU (engine.num_gpus=1), `--hf-batch-size`
  prompts x k samples per call, left-padded;
* vllm: `ray.data.llm` with one vLLM engine (tensor_parallel_size 1), `--vllm-batch-size` rows per
  engine call (Ray keeps 8 batches in flight), our prompt token ids, samples as rows (vLLM prefix
  caching shares each prompt's KV cache across its k samples).

Timed from dataset creation to the last row, model load and engine start (vLLM: CUDA graph capture and
torch.compile) included, so the end-to-end ratio is conservative for vLLM on small loads. Ray start-up is
timed apart. One run each, hf first; questions/s, samples/s, new tokens/s (stop token included, as
`gen_tokens` counts) and the vllm/hf ratio are printed, and written as JSON with `--json`.

`--startup-probe 2` (default) first runs each engine twice on one question, one sample, one new token:
the first probe is the cold start (vLLM: torch.compile into its cache, graph capture), the second the
fixed cost every later run pays (actor and model load, vLLM's engine process, compile-cache load, graph
capture), taken as the fixed cost. (On the H200 a single cold probe of vLLM took 153 s, longer than the
warm timed run after it, 109 s: one probe is not enough.) The report then adds each engine's steady rate,
samples / (wall - fixed cost), their ratio, the load at which the two engines' end-to-end times break even, and the end-to-end ratio projected to
`--project-samples` samples (a synthesis run's size; a projection from the two measured lines, marked so).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bird_prompts(data: str, limit: int, cot: bool) -> list[dict]:
    """{question_id, messages} of the first `limit` BIRD questions whose database is on disk (evaluate's prompts)."""
    from text2sql_ray import bird
    from text2sql_ray.config import EvaluateConfig, PromptConfig
    from text2sql_ray.evaluate import select_questions
    from text2sql_ray.generation import question_prompts

    cfg = EvaluateConfig(data=data, prompt=PromptConfig(cot=cot))
    split = bird.load_split(bird.resolve_data(data, "dev"))
    rows, errors = question_prompts(split, select_questions(split, 0), cfg)
    if errors:
        print(f"{len(errors)} questions without a readable schema skipped", flush=True)
    return rows[:limit] if limit else rows


def run_engine(rows: list[dict], cfg, k: int) -> dict:
    import ray

    from text2sql_ray.engines import generate

    t0 = time.perf_counter()
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), -(-len(rows) // cfg.batch_size))))
    out = generate(ds, cfg, n=k).select_columns(["question_id", "generations", "gen_tokens", "gen_error"]).take_all()
    wall = time.perf_counter() - t0
    errors = [r["gen_error"] for r in out if r["gen_error"]]
    tokens = sum(sum(int(t) for t in r["gen_tokens"]) for r in out)
    samples = sum(len(r["generations"]) for r in out)
    if len(out) != len(rows):
        raise SystemExit(f"{cfg.backend}: {len(out)} rows back of {len(rows)}")
    return {
        "backend": cfg.backend, "wall_s": round(wall, 2), "questions": len(out), "samples": samples,
        "errors": len(errors), "first_errors": errors[:3], "new_tokens": tokens,
        "questions_per_s": round(len(out) / wall, 3), "samples_per_s": round(samples / wall, 2),
        "new_tokens_per_s": round(tokens / wall, 1),
        "mean_new_tokens": round(tokens / max(1, samples), 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model dir, hub name or .gguf (exported once to $T2S_CACHE)")
    ap.add_argument("--data", default="", help="BIRD dev split dir (empty = the bundled demo dev)")
    ap.add_argument("--limit", type=int, default=128, help="questions (0 = all with a database)")
    ap.add_argument("--samples", type=int, default=8, help="samples per question (k)")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--cot", type=int, default=1, help="1: chain-of-thought prompt (synthesis-like), 0: SQL only")
    ap.add_argument("--hf-batch-size", type=int, default=32, help="hf: prompts per generate call (x k sequences)")
    ap.add_argument("--vllm-batch-size", type=int, default=64, help="vllm: rows per engine call")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--max-num-seqs", type=int, default=0,
                    help="vllm: most sequences per engine step (0 = vLLM's default, 128 with vllm 0.26 on an H200)")
    ap.add_argument("--engines", default="hf,vllm", help="which to run, in this order")
    ap.add_argument("--startup-probe", type=int, default=2,
                    help="probe runs per engine before the timed run (1 question, 1 sample, 1 new token); the last "
                         "is its fixed cost (0: none)")
    ap.add_argument("--project-samples", type=int, default=28000,
                    help="project the end-to-end ratio to this many samples (default: Spider train's 7000 x 4)")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    args = ap.parse_args()

    import ray

    from text2sql_ray.common import ensure_ray
    from text2sql_ray.config import EngineConfig
    from text2sql_ray.models import resolve_model

    t0 = time.perf_counter()
    model = resolve_model(args.model)  # a GGUF is exported once here, outside both timings
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ensure_ray()
    ray_start = time.perf_counter() - t0
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = bird_prompts(args.data, args.limit, bool(args.cot))
    k = args.samples
    base = EngineConfig(model=model, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                        max_model_len=args.max_model_len, dtype="auto")
    configs = {
        "hf": dataclasses.replace(base, backend="hf", num_gpus=1.0, num_cpus=2.0, batch_size=args.hf_batch_size),
        "vllm": dataclasses.replace(base, backend="vllm", batch_size=args.vllm_batch_size,
                                    max_num_seqs=args.max_num_seqs),
    }
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"{len(rows)} questions x {k} samples, temperature {args.temperature}, max_new_tokens {args.max_new_tokens}, "
          f"cot={bool(args.cot)}, model {args.model} ({model}), {gpu}; export {export_s:.1f} s, Ray start {ray_start:.1f} s",
          flush=True)
    results = {}
    for name in args.engines.split(","):
        probes = []
        for i in range(args.startup_probe):
            probes.append(run_engine(rows[:1], dataclasses.replace(configs[name], max_new_tokens=1), 1)["wall_s"])
            print(f"{name:5s}: probe {i + 1} (1 question, 1 sample, 1 new token) {probes[-1]:.1f} s", flush=True)
        results[name] = run_engine(rows, configs[name], k)
        r = results[name]
        if probes:
            r["probes_s"], r["startup_s"] = probes, probes[-1]
            busy = max(r["wall_s"] - probes[-1], 1e-3)
            r["steady_samples_per_s"] = round(r["samples"] / busy, 2)
            r["steady_new_tokens_per_s"] = round(r["new_tokens"] / busy, 1)
        print(f"{name:5s}: {r['wall_s']:8.1f} s  {r['questions_per_s']:7.3f} questions/s  {r['samples_per_s']:8.2f} "
              f"samples/s  {r['new_tokens_per_s']:9.1f} new tokens/s  ({r['new_tokens']} tokens, mean "
              f"{r['mean_new_tokens']}/sample, {r['errors']} errors)", flush=True)
    out = {"model": args.model, "model_dir": model, "gpu": gpu, "questions": len(rows), "samples": k,
           "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "cot": bool(args.cot),
           "hf_batch_size": args.hf_batch_size, "vllm_batch_size": args.vllm_batch_size,
           "export_s": round(export_s, 2), "ray_start_s": round(ray_start, 2), **results}
    if "hf" in results and "vllm" in results:
        out["ratio_questions_per_s"] = round(results["vllm"]["questions_per_s"] / results["hf"]["questions_per_s"], 2)
        out["ratio_new_tokens_per_s"] = round(results["vllm"]["new_tokens_per_s"] / results["hf"]["new_tokens_per_s"], 2)
        print(f"vllm / hf: {out['ratio_questions_per_s']:.2f}x questions/s, {out['ratio_new_tokens_per_s']:.2f}x "
              "new tokens/s (end to end, this load)", flush=True)
        h, v = results["hf"], results["vllm"]
        if "startup_s" in h and "startup_s" in v:
            out["ratio_steady_samples_per_s"] = round(v["steady_samples_per_s"] / h["steady_samples_per_s"], 2)
            # end-to-end time of N samples = fixed cost + N / steady rate, per engine
            per_h, per_v = 1 / h["steady_samples_per_s"], 1 / v["steady_samples_per_s"]
            gap = v["startup_s"] - h["startup_s"]
            out["break_even_samples"] = round(gap / (per_h - per_v)) if per_h > per_v and gap > 0 else 0
            n = args.project_samples
            out["projected"] = {"samples": n, "hf_s": round(h["startup_s"] + n * per_h, 1),
                                "vllm_s": round(v["startup_s"] + n * per_v, 1)}
            out["projected"]["ratio"] = round(out["projected"]["hf_s"] / out["projected"]["vllm_s"], 2)
            print(f"vllm / hf steady: {out['ratio_steady_samples_per_s']:.2f}x samples/s (fixed cost hf "
                  f"{h['startup_s']:.1f} s, vllm {v['startup_s']:.1f} s); break-even at {out['break_even_samples']} "
                  f"samples; projected to {n} samples: hf {out['projected']['hf_s']:.0f} s, vllm "
                  f"{out['projected']['vllm_s']:.0f} s = {out['projected']['ratio']:.2f}x (projection)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
