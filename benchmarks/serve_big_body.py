"""A small request next to a 10 MB request body on `t2s serve`: without a body cap, and with the default cap.

    python benchmarks/serve_big_body.py            # [--model DIR] [--big-mb 10] [--json out.json]

Two apps of the same model run side by side in one Ray instance (their own routes, one replica each):
- baseline: `max_request_bytes` 64 MiB, i.e. no cap, as before the cap existed: the big body is parsed
  and its prompt tokenized by the model replica (under the lock its generate calls share) before the
  context-length 400;
- ours: the default `max_request_bytes` (1 MiB): 413 before the body is read.
For each: a small request alone (warm), then the big body and, 0.5 s after it starts, a small request
(4 tokens, greedy). Printed: status and seconds of each, the machine's load average. One run each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from text2sql_ray import serve as serve_mod
from text2sql_ray.config import ServeConfig

SMALL = {"messages": [{"role": "user", "content": "How many rows?"}], "max_tokens": 4, "temperature": 0}


def timed_post(url: str, body: bytes) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = requests.post(url, data=body, headers={"content-type": "application/json"}, timeout=1800)
    return r.status_code, time.perf_counter() - t0


def run_case(url: str, big: bytes) -> dict:
    small = json.dumps(SMALL).encode()
    timed_post(url, small)  # warm
    alone = timed_post(url, small)
    out: dict = {}
    th = threading.Thread(target=lambda: out.setdefault("big", timed_post(url, big)))
    th.start()
    time.sleep(0.5)
    beside = timed_post(url, small)
    th.join()
    return {"small_alone": alone, "big": out["big"], "small_beside_big": beside}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="")
    ap.add_argument("--big-mb", type=float, default=10.0)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    words = int(args.big_mb * 1e6 / 2)
    big = json.dumps({"messages": [{"role": "user", "content": "a " * words}], "max_tokens": 4}).encode()
    results = {}
    for name, cap in (("baseline (no cap: 64 MiB)", 64 * 2**20), ("ours (default cap)", ServeConfig().max_request_bytes)):
        app = "bench_" + name.split()[0]
        served = serve_mod.start(ServeConfig(model=args.model, port=args.port, name=app, route_prefix=f"/{app}",
                                             num_cpus=0.5, max_request_bytes=cap, default_max_tokens=4, blocking=False))
        try:
            results[name] = run_case(served.url + "/chat/completions", big)
        finally:
            serve_mod.stop(app)
    print(f"\nbig body: {len(big) / 1e6:.1f} MB; load average {os.getloadavg()[0]:.1f}")
    print("| app | small alone (status, s) | big body (status, s) | small 0.5 s after it (status, s) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        cells = [f"{r[k][0]}, {r[k][1]:.2f}" for k in ("small_alone", "big", "small_beside_big")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
