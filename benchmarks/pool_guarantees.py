"""Why sqlexec keeps its own executor pool: what Ray's own pools do when one work item kills its actor.

    python benchmarks/pool_guarantees.py

20 items, item 7 kills the process running it (``os._exit``), as a query that crashes its executor would.
Measured: `ray.util.ActorPool.map_unordered` (actors with max_restarts=3, max_task_retries=1) and a Ray Data
`map_batches` actor pool (`ActorPoolStrategy`, max_restarts=3, max_task_retries=1 and 3). Each prints how
many of the 20 results came back. sqlexec's pool (`run_pairs` / `run_checks`, used through verify.py)
gives every item a result: the culprit fails alone after `MAX_EXECUTOR_KILLS` dead actors or its own
budget, everything else is retried (tests/test_sqlexec.py::test_killed_actor_loses_no_item,
tests/test_sqlexec_limits.py::test_a_second_kill_of_the_replacement_loses_no_queued_item). Not a speed
claim; a guarantee, measured once.
"""

from __future__ import annotations

import os
import time

import ray
from ray.util import ActorPool

from text2sql_ray.common import ensure_ray

POISON, N = 7, 20


class Exec:
    def __call__(self, batch):
        if POISON in list(batch["id"]):
            os._exit(1)
        return batch


@ray.remote(num_cpus=0.1, max_restarts=3, max_task_retries=1)
class Actor:
    def run(self, x):
        if x == POISON:
            os._exit(1)
        return x


def ray_data(retries: int) -> str:
    ds = ray.data.range(N, override_num_blocks=10).map_batches(
        Exec, batch_size=None, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.1,
        max_restarts=3, max_task_retries=retries)
    t = time.time()
    try:
        return f"{len(ds.take_all())} of {N} results ({time.time() - t:.1f} s)"
    except Exception as e:  # noqa: BLE001  (what we measure)
        return f"0 of {N} results: the dataset failed after {time.time() - t:.1f} s ({type(e).__name__})"


def actor_pool() -> str:
    pool, got = ActorPool([Actor.remote(), Actor.remote()]), []
    try:
        got.extend(pool.map_unordered(lambda a, x: a.run.remote(x), range(N)))
    except Exception as e:  # noqa: BLE001
        return f"{len(got)} of {N} results, then {type(e).__name__} ends the iteration"
    return f"{len(got)} of {N} results"


def main() -> None:
    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"ray {ray.__version__}; item {POISON} of {N} kills its process")
    print(f"ray.util.ActorPool.map_unordered (max_restarts=3, max_task_retries=1): {actor_pool()}")
    for retries in (1, 3):
        print(f"Ray Data ActorPoolStrategy (max_restarts=3, max_task_retries={retries}): {ray_data(retries)}")


if __name__ == "__main__":
    main()
