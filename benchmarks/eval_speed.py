"""Evaluator execution speed: our Ray actor pool beside a single-process loop and a multiprocessing.Pool.

    python benchmarks/eval_speed.py [--bird /work/shared/data/bird/dev] [--repeat 8] [--workers N]

All three run the same function (`SqlExecutor.compare_pair`: one budget per pair, official BIRD rule)
on the executable BIRD dev questions (gold SQL as the prediction), once (432 pairs) and `--repeat`
times over (a heavier load). Ray start-up is timed apart from the execution phase (which includes
starting the executor actors). Per-question results must be identical across the three. Last, a
runaway query with a 2 s budget is timed alone and added to the 432-pair load, to show it costs its
budget and no more. Each timing is the best of `--trials` interleaved runs (machines are shared).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from text2sql_ray import bird  # noqa: E402
from text2sql_ray.sqlexec import SqlExecutor, _auto_batch, run_pairs  # noqa: E402

RUNAWAY = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT count(*) FROM c"
DEFAULT_BIRD = Path(os.environ.get("T2S_BIRD_DATA", REPO.parent / "shared" / "data" / "bird")) / "dev"


def load_items(split_dir: Path) -> list[tuple[str, str, str]]:
    split = bird.load_split(split_dir)
    items = []
    for q in split.questions:
        p = split.db_path(q["db_id"])
        if p is not None:
            items.append((str(p), q["SQL"], q["SQL"]))
    return items


def serial(items, timeout_s):
    ex = SqlExecutor()
    return [ex.compare_pair(d, p, g, timeout_s) for d, p, g in items]


_EXECUTOR: SqlExecutor | None = None


def _mp_one(args):
    global _EXECUTOR
    d, p, g, timeout_s = args
    _EXECUTOR = _EXECUTOR or SqlExecutor()  # a per-process cached executor, like our actors
    return _EXECUTOR.compare_pair(d, p, g, timeout_s)


def with_pool(pool, items, timeout_s, workers):
    return list(
        pool.imap(_mp_one, [(*it, timeout_s) for it in items], chunksize=_auto_batch(len(items), workers))
    )


def signature(results):
    return [(r.correct, r.pred_error, r.gold_error, r.timed_out, r.pred_digest, r.gold_rows) for r in results]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bird", type=Path, default=DEFAULT_BIRD, help="BIRD dev split directory")
    ap.add_argument(
        "--repeat", type=int, default=8, help="the heavier load runs every question this many times"
    )
    ap.add_argument("--workers", type=int, default=0, help="processes / actors (0 = os.cpu_count())")
    ap.add_argument(
        "--trials", type=int, default=3, help="runs of each (best is reported; the machine may be shared)"
    )
    ap.add_argument("--timeout", type=float, default=30.0, help="budget per pair (s)")
    ap.add_argument("--runaway-budget", type=float, default=2.0, help="budget given to the runaway query (s)")
    args = ap.parse_args()

    base = load_items(args.bird)
    if not base:
        print(f"no executable questions under {args.bird}", file=sys.stderr)
        return 1
    workers = args.workers or os.cpu_count() or 1
    loads = {f"{len(base)} x1": base, f"{len(base)} x{args.repeat}": base * args.repeat}
    print(
        f"# eval_speed: {len(base)} executable BIRD dev questions, {workers} workers, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, python {sys.version.split()[0]}"
    )

    times: dict[str, dict[str, list[float]]] = {name: {"single": [], "mp": [], "ray": []} for name in loads}
    sigs: dict[str, dict[str, list]] = {name: {} for name in loads}
    # The Pool's workers are forked before Ray starts any threads; then the three run interleaved, trial
    # after trial, so that load from other processes on the machine hits all three alike.
    t_pool_start, pool = timed(lambda: mp.get_context("fork").Pool(workers))
    pool.map(_mp_one, [(*base[0], args.timeout)] * workers)  # workers up before timing

    import ray

    from text2sql_ray.common import ensure_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    t_ray_start, _ = timed(ensure_ray)
    runners = {
        "single": lambda items: serial(items, args.timeout),
        "mp": lambda items: with_pool(pool, items, args.timeout, workers),
        "ray": lambda items: run_pairs(items, num_actors=workers, timeout_s=args.timeout, progress=False),
    }
    with pool:
        for trial in range(args.trials):
            for name, items in loads.items():
                for kind, fn in runners.items():
                    t, res = timed(lambda fn=fn, items=items: fn(items))
                    times[name][kind].append(t)
                    sigs[name].setdefault(kind, signature(res))
                    assert sigs[name][kind] == signature(res), f"{kind} changed its results between trials"
            print(f"  trial {trial + 1}/{args.trials} done", file=sys.stderr)
    t_one = min(timed(lambda: run_pairs(base[:1], num_actors=workers, progress=False))[0] for _ in range(3))

    print()
    print(
        f"best of {args.trials} trials; all trials (s): "
        + json.dumps({n: {k: [round(x, 2) for x in v] for k, v in t.items()} for n, t in times.items()})
    )
    print(
        f"{'load (pairs)':<14} {'single':>9} {'mp.Pool':>9} {'ray pool':>9}   "
        f"{'single/ray':>10} {'mp/ray':>7}   identical"
    )
    for name in loads:
        s, m, r = (min(times[name][k]) for k in ("single", "mp", "ray"))
        same = sigs[name]["single"] == sigs[name]["mp"] == sigs[name]["ray"]
        n_ok = sum(1 for x in sigs[name]["ray"] if x[0])
        print(
            f"{name:<14} {s:>8.2f}s {m:>8.2f}s {r:>8.2f}s   {s / r:>9.2f}x {m / r:>6.2f}x   "
            f"{'yes' if same else 'NO'} ({n_ok}/{len(loads[name])} correct)"
        )
    print(
        f"start-up, not in the times above: Ray {t_ray_start:.2f} s; "
        f"multiprocessing.Pool {t_pool_start:.2f} s "
        f"(the ray pool times include starting its actors: a 1-pair run takes {t_one:.2f} s)"
    )

    # A runaway query costs its budget, not more.
    db = base[0][0]
    budget = args.runaway_budget
    t_alone, r = timed(lambda: SqlExecutor().compare_pair(db, RUNAWAY, "SELECT 1", budget))
    print()
    print(
        f"runaway query alone, {budget:g} s budget: {t_alone:.2f} s wall "
        f"(timed_out={r.timed_out}: {r.pred_error})"
    )
    t_plain, _ = timed(lambda: run_pairs(base, num_actors=workers, timeout_s=budget, progress=False))
    with_runaway = [(db, RUNAWAY, "SELECT 1")] + base
    t_mixed, res = timed(
        lambda: run_pairs(with_runaway, num_actors=workers, timeout_s=budget, progress=False)
    )
    print(
        f"ray pool, {len(base)} pairs: {t_plain:.2f} s; the same + 1 runaway: {t_mixed:.2f} s "
        f"(+{t_mixed - t_plain:.2f} s; the runaway pair itself {res[0].seconds:.2f} s, "
        f"{sum(x.correct for x in res[1:])}/{len(base)} others correct)"
    )
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
