"""`t2s convert` speed: the seed's single-process loop beside the Ray Data path with 1 and 2 workers.

    python benchmarks/convert_speed.py --data /work/shared/data/bird/train [--tokenizer DIR] [--limit N]

All three produce the same rows (the same pure `convert_row` + the same writer), and the script checks
that their train/validation/rejected Parquet files are byte-identical before printing times. One run
each; Ray start-up is timed separately and excluded from the Ray rows (a cluster pays it once).
The loop is the seed's pattern (`create_sft_dataset.py`: one process, question after question), with
our schema cache so that it measures the same work, not the seed's per-question schema reads.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from text2sql_ray import bird
from text2sql_ray.config import ConvertConfig
from text2sql_ray.convert import (
    SPLITS,
    convert_row,
    prompt_token_counts,
    run,
    validation_dbs,
    write_splits,
)
from text2sql_ray.schema import SchemaCache


def loop_convert(cfg: ConvertConfig, out: Path) -> float:
    """The single-process baseline: load, convert question by question, write. Returns seconds."""
    t = time.perf_counter()
    split = bird.load_split(bird.resolve_data(cfg.data, "train"))
    questions = split.questions[: cfg.limit] if cfg.limit else split.questions
    tokenizer = None
    if cfg.tokenizer:
        from text2sql_ray.models import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
    cache = SchemaCache.from_split(split, cfg.prompt, tokenizer)
    with_schema = sorted({q["db_id"] for q in questions if split.db_path(q["db_id"]) is not None or q["db_id"] in split.tables})
    val = set(validation_dbs(with_schema, cfg.val_fraction, cfg.seed))
    rows = []
    for q in questions:
        row = convert_row(q, cache, cfg.prompt, val)
        if row["messages"] is not None:
            row["prompt_tokens"] = prompt_token_counts([row["messages"]], tokenizer)[0]
        rows.append(row)
    write_splits(out, rows)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="", help="BIRD split directory (default: bundled demo train)")
    ap.add_argument("--tokenizer", default="", help="count prompt tokens with this tokenizer (default chars/4)")
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args()

    import ray

    from text2sql_ray.common import ensure_ray

    base = {"data": args.data, "tokenizer": args.tokenizer, "limit": args.limit}
    tmp = Path(tempfile.mkdtemp(prefix="convert_speed_"))
    n = len(bird.load_split(bird.resolve_data(args.data, "train")).questions)
    n = min(n, args.limit) if args.limit else n
    print(f"data: {args.data or 'bundled demo train'} ({n} questions); tokenizer: {args.tokenizer or 'chars/4'}; "
          f"os.cpu_count() = {os.cpu_count()}")

    loop_s = loop_convert(ConvertConfig(**base), tmp / "loop")

    t = time.perf_counter()
    ensure_ray()
    ray_start_s = time.perf_counter() - t
    results = {}
    for workers in (1, 2):
        t = time.perf_counter()
        run(ConvertConfig(**base, out=str(tmp / f"ray{workers}"), workers=workers))
        results[workers] = time.perf_counter() - t
    ray.shutdown()

    for workers in (1, 2):
        for name in SPLITS:
            a, b = (tmp / "loop" / f"{name}.parquet").read_bytes(), (tmp / f"ray{workers}" / f"{name}.parquet").read_bytes()
            if a != b:
                print(f"MISMATCH: {name}.parquet differs between the loop and Ray with {workers} worker(s)")
                return 1
    print("outputs: loop, Ray x1 and Ray x2 wrote byte-identical train/validation/rejected.parquet")
    print(f"{'path':<34}{'seconds':>9}{'questions/s':>13}{'loop / this':>13}")
    print(f"{'single-process loop (seed pattern)':<34}{loop_s:>9.2f}{n / loop_s:>13.0f}{1.0:>13.2f}")
    for workers, secs in results.items():
        label = f"t2s convert, Ray Data, {workers} worker{'s' if workers > 1 else ''}"
        print(f"{label:<34}{secs:>9.2f}{n / secs:>13.0f}{loop_s / secs:>13.2f}")
    print(f"(Ray start-up, paid once per process, not included above: {ray_start_s:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
