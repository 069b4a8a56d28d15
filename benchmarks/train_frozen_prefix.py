"""`train.frozen_prefix_cache` side by side: the laptop profile's LoRA (adapters on the last 8 of SmolLM2-135M's 30
layers, 3 epochs) with the frozen 22 layers run every step (the baseline) and with their output kept from the first
epoch (ours), on the same converted demo rows.

    python benchmarks/train_frozen_prefix.py [--limit 24] [--epochs 3] [--json FILE]

Converts the bundled demo train split with the laptop profile's convert section (text2sql_ray/demo/pipeline_laptop.yaml),
keeps the first --limit training rows, then runs `train.run` twice with the profile's train section (2 Ray Train
workers of 1 CPU, one torch thread each) on the local Ray instance the stages start. Prints both runs' train wall
times (the manifests' wall_time_s: start-up included, which both pay) and median step times, the ratios, and whether
the two runs' per-step losses are the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from text2sql_ray import convert, train
from text2sql_ray.config import build_config

LAPTOP = REPO / "text2sql_ray" / "demo" / "pipeline_laptop.yaml"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=24, help="training rows (the laptop profile trains on 62)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)

    import pyarrow.parquet as pq

    tmp = Path(tempfile.mkdtemp(prefix="t2s_frozen_prefix_"))
    conv = build_config("convert", str(LAPTOP), [("out", str(tmp / "convert"))])
    convert.run(conv)
    rows = pq.read_table(tmp / "convert" / "train.parquet").slice(0, args.limit)
    pq.write_table(rows, tmp / "sft.parquet")
    out = {}
    for name, on in (("baseline", False), ("frozen_prefix_cache", True)):
        cfg = build_config("train", str(LAPTOP), [("input", str(tmp / "sft.parquet")), ("out", str(tmp / name)),
                                                  ("epochs", str(args.epochs)), ("checkpoint_every", "0")])
        cfg = dataclasses.replace(cfg, frozen_prefix_cache=on)
        train.run(cfg)
        manifest = json.loads((tmp / name / "manifest.json").read_text())
        steps = [json.loads(line) for line in (tmp / name / "steps.jsonl").read_text().splitlines()]
        out[name] = {"wall_time_s": manifest["wall_time_s"], "steps": len(steps),
                     "median_step_time_s": manifest["metrics"]["median_step_time_s"],
                     "losses": [s["loss"] for s in steps]}
    shutil.rmtree(tmp, ignore_errors=True)
    b, o = out["baseline"], out["frozen_prefix_cache"]
    same = b["losses"] == o["losses"]
    diff = max(abs(x - y) for x, y in zip(b["losses"], o["losses"], strict=True))
    result = {"rows": rows.num_rows, "epochs": args.epochs, "baseline": b, "frozen_prefix_cache": o,
              "median_step_ratio": round(b["median_step_time_s"] / o["median_step_time_s"], 2),
              "wall_ratio": round(b["wall_time_s"] / o["wall_time_s"], 2), "losses_identical": same,
              "max_loss_difference": diff}
    print(f"{rows.num_rows} rows x {args.epochs} epochs, {b['steps']} steps each")
    print(f"baseline: train {b['wall_time_s']:.1f} s, median step {b['median_step_time_s']:.2f} s")
    print(f"frozen_prefix_cache: train {o['wall_time_s']:.1f} s, median step {o['median_step_time_s']:.2f} s")
    print(f"ratio: wall {result['wall_ratio']}x, median step {result['median_step_ratio']}x; "
          f"per-step losses identical: {same} (max difference {diff:.2e})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
