"""Load on `t2s serve` (backend 'hf', dynamic batching) beside direct batched transformers generation.

    python benchmarks/serve_load.py --requests 64   # [--model DIR] [--max-tokens 32] [--concurrency 1,8,32]
                                                    # [--max-batch-size 8] [--batch-wait-s 0.05] [--json out.json]

The same N short prompts (the bundled demo dev questions, one user turn each, cycled) are generated
greedily with max_tokens tokens:
- direct: plain transformers in this process (chat template, left-padded batches of --max-batch-size,
  `model.generate`), no Ray, with as many torch threads as the replica gets (Ray sets OMP_NUM_THREADS to
  a replica's num_cpus): the throughput of the same work without the server.
- serve: the Ray Serve app of `t2s serve` (one replica, @serve.batch up to --max-batch-size) through the
  `openai` client, with 1, 8 and 32 requests in flight (a thread pool), no client retries, so an
  overloaded server's 503s are counted as such.
Printed: requests/s, p50/p99 latency per concurrency, every request's outcome (ok / 503 / other error:
none may be lost), the serve/direct throughput ratio, and how many served answers equal the direct
ones (greedy; batching changes float rounding, so a few may differ). One run each; the machine's load
average is printed beside the numbers (shared machines make them rough).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from text2sql_ray import bird

SYSTEM = "You are a SQLite expert. Answer with one SQLite query."


def prompts(n: int) -> list[list[dict]]:
    split = bird.load_split(bird.resolve_data("", "dev"))
    qs = split.questions
    return [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": qs[i % len(qs)]["question"]}]
        for i in range(n)
    ]


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def direct(model_path: str, chats: list[list[dict]], max_tokens: int, batch: int, threads: int) -> dict:
    """Plain transformers, one process: left-padded batches, greedy, `threads` torch threads."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]

    def run(batch_texts):
        enc = tok(batch_texts, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id,
                                 temperature=None, top_p=None, top_k=None)
        return [tok.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True) for o in out]

    run(texts[:2])  # warm-up
    t0 = time.perf_counter()
    answers = []
    for i in range(0, len(texts), batch):
        answers += run(texts[i : i + batch])
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "rps": len(chats) / wall, "answers": answers}


def load(client, model_id: str, chats: list[list[dict]], max_tokens: int, concurrency: int) -> dict:
    import openai

    def one(chat):
        t0 = time.perf_counter()
        try:
            r = client.chat.completions.create(model=model_id, messages=chat, max_tokens=max_tokens, temperature=0)
            return "ok", time.perf_counter() - t0, r.choices[0].message.content
        except openai.APIStatusError as e:
            return str(e.status_code), time.perf_counter() - t0, None
        except Exception as e:  # noqa: BLE001 - a lost request is counted, not raised
            return type(e).__name__, time.perf_counter() - t0, None

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, chats))
    wall = time.perf_counter() - t0
    ok = [lat for status, lat, _ in results if status == "ok"]
    outcomes: dict[str, int] = {}
    for status, _, _ in results:
        outcomes[status] = outcomes.get(status, 0) + 1
    return {
        "concurrency": concurrency,
        "wall_s": wall,
        "rps": len(ok) / wall,
        "p50_s": percentile(ok, 50) if ok else None,
        "p99_s": percentile(ok, 99) if ok else None,
        "outcomes": outcomes,
        "answers": [a for _, _, a in results],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--model", default="", help="model dir or hub name; empty = the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--batch-wait-s", type=float, default=0.05, help="serve.batch_wait_timeout_s")
    ap.add_argument("--replica-cpus", type=float, default=1.0)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    from text2sql_ray.models import resolve_model

    model_path = resolve_model(args.model)
    chats = prompts(args.requests)
    load_avg = [os.getloadavg()[0]]
    print(f"{args.requests} requests, max_tokens {args.max_tokens}, model {model_path}, "
          f"{os.cpu_count()} CPUs, load average {load_avg[0]:.1f}", flush=True)

    # Ray starts the replica with OMP_NUM_THREADS = its num_cpus, so torch there uses that many threads: the
    # direct baseline uses the same (on a busy 2-core machine 2 spinning OpenMP threads can be far slower than 1).
    threads = max(1, int(args.replica_cpus))
    base = direct(model_path, chats, args.max_tokens, args.max_batch_size, threads)
    print(f"direct transformers (batch {args.max_batch_size}, {threads} torch thread(s)): {base['wall_s']:.2f} s, "
          f"{base['rps']:.2f} req/s", flush=True)

    import openai

    from text2sql_ray import serve as serve_mod
    from text2sql_ray.common import ensure_ray
    from text2sql_ray.config import ServeConfig

    t0 = time.perf_counter()
    ensure_ray()
    ray_s = time.perf_counter() - t0
    cfg = ServeConfig(model=args.model, port=args.port, name="serve_load", num_cpus=args.replica_cpus,
                      max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_s,
                      max_ongoing_requests=max(levels),
                      max_queued_requests=2 * max(levels), max_tokens_limit=max(args.max_tokens, 64),
                      default_max_tokens=min(args.max_tokens, 64), blocking=False)
    t0 = time.perf_counter()
    served = serve_mod.start(cfg)
    start_s = time.perf_counter() - t0
    client = openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0, timeout=600)
    model_id = served.model_ids[0]
    client.chat.completions.create(model=model_id, messages=chats[0], max_tokens=4, temperature=0)  # warm-up
    print(f"Ray start {ray_s:.1f} s, serve start {start_s:.1f} s", flush=True)

    rows = []
    try:
        for c in levels:
            r = load(client, model_id, chats, args.max_tokens, c)
            same = sum(1 for a, b in zip(r["answers"], base["answers"]) if a == b)
            r["identical_to_direct"] = same
            rows.append(r)
            load_avg.append(os.getloadavg()[0])
            print(f"serve c={c}: {r['wall_s']:.2f} s, {r['rps']:.2f} req/s, p50 {r['p50_s']:.2f} s, "
                  f"p99 {r['p99_s']:.2f} s, outcomes {r['outcomes']}, identical to direct {same}/{len(chats)}",
                  flush=True)
    finally:
        serve_mod.stop(served.app_name)

    print()
    print("| path | concurrency | wall (s) | req/s | p50 (s) | p99 (s) | ok | 503 | other | vs direct |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| direct transformers, batch {args.max_batch_size}, {threads} thread(s) | - | {base['wall_s']:.2f} | {base['rps']:.2f} "
          f"| - | - | {len(chats)} | - | - | 1.00x |")
    for r in rows:
        o = dict(r["outcomes"])
        ok, shed = o.pop("ok", 0), o.pop("503", 0) + o.pop("429", 0)
        other = sum(o.values())
        print(f"| serve (1 replica, batch <= {args.max_batch_size}, wait {args.batch_wait_s:g} s) | {r['concurrency']} | {r['wall_s']:.2f} | "
              f"{r['rps']:.2f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | {ok} | {shed} | {other} | "
              f"{r['rps'] / base['rps']:.2f}x |")
    print(f"\nload average during the runs: {', '.join(f'{x:.1f}' for x in load_avg)}")
    lost = [r for r in rows if sum(v for k, v in r["outcomes"].items() if k not in ("ok", "503", "429"))]
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "direct": {k: v for k, v in base.items() if k != "answers"},
            "serve": [{k: v for k, v in r.items() if k != "answers"} for r in rows], "load_avg": load_avg,
            "ray_start_s": ray_s, "serve_start_s": start_s,
        }, indent=2))
    if lost:
        print("FAILED: some requests neither succeeded nor were shed with 503/429", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
