"""The audit's attacks on the SQL executor (issue 11 items 1 and 3), against the old and the new executor.

    python benchmarks/exec_attacks.py [--old-ref 8d12b06] [--cases zeroblob,doubling,bigrows,instr,pool,birdgold]
                                      [--old-wall-cap 400] [--old-mem-cap-gb 12]

"old" is the executor of git ref ``--old-ref`` (default ``8d12b06``, main before the hardening):
its ``text2sql_ray`` package is extracted into a temp dir and imported from there; the query runs as ``SqlExecutor.compare_pair``
against the gold ``SELECT 1`` in the process that calls it, as it did inside each executor actor.
"new" is this worktree's ``IsolatedExecutor.compare_pair`` (the executor actors' class now): the pair
runs in its child process. Each (executor, case) runs in a fresh Python process; its peak RSS is the
largest ``ru_maxrss`` of that process and its children (the new executor's child is waited for, so
it is counted). Wall time is the call's.

Cases (the audit's, issue 11): ``zeroblob`` ``SELECT zeroblob(1e9)``; ``doubling`` a recursive
``s || s``; ``bigrows`` 300 rows x 1 MB; ``instr`` one long ``instr`` call on a 3 s budget; ``pool``
twelve such ``instr`` rows among twelve good ones through ``run_pairs`` with a 5 s budget (as
``t2s evaluate --timeout-s 5``, 2 actors); ``birdgold`` (not an attack: the cost on legit work) the
432 executable BIRD dev questions with gold SQL as the prediction through ``run_pairs`` (2 actors,
Ray start-up not timed), per-question results compared old vs new. The old executor may be stopped by
``--old-wall-cap`` seconds (reported as ">cap") and ``--old-mem-cap-gb`` (RLIMIT_AS, reported as a
MemoryError): both guard the shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CASES = {
    "zeroblob": ("SELECT zeroblob(1e9)", 30.0),
    "doubling": (
        "WITH RECURSIVE c(s) AS (SELECT 'ab' UNION ALL SELECT s || s FROM c WHERE length(s) < 1e9) SELECT length(s) FROM c",
        30.0,
    ),
    "bigrows": (
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM c WHERE i < 300) SELECT i, randomblob(1000000) FROM c",
        30.0,
    ),
    "instr": ("SELECT instr(printf('%.*c',20000000,'a'), printf('%.*c',100000,'a')||'b')", 3.0),
}
POOL_ROWS, POOL_TIMEOUT = 12, 5.0
DEFAULT_BIRD_DEV = Path(os.environ.get("T2S_BIRD_DATA", REPO.parent.parent / "shared" / "data" / "bird")) / "dev"


def run_one(case: str, db: str) -> dict:
    """Inside the fresh process: run one case with whichever executor `text2sql_ray` here provides."""
    from text2sql_ray import sqlexec

    new = hasattr(sqlexec, "IsolatedExecutor")
    t0 = time.monotonic()
    if case == "birdgold":  # legit work: the 432 executable BIRD dev questions, gold SQL as the prediction
        from text2sql_ray import bird

        split = bird.load_split(os.environ.get("T2S_BIRD_DEV", str(DEFAULT_BIRD_DEV)))
        items = [(str(split.db_path(q["db_id"])), q["SQL"], q["SQL"]) for q in split.questions
                 if split.db_path(q["db_id"]) is not None]
        sqlexec.run_pairs(items[:2], num_actors=2, progress=False)  # Ray start-up and actors, not timed
        t0 = time.monotonic()
        out = sqlexec.run_pairs(items, num_actors=2, timeout_s=30.0, progress=False)
        res = {"n": len(out), "correct": sum(r.correct for r in out),
               "per_question": [[r.correct, r.pred_error, r.gold_error, r.timed_out, r.pred_rows, r.gold_rows]
                                for r in out]}
    elif case == "pool":
        sql = CASES["instr"][0]
        items = []
        for i in range(POOL_ROWS):
            items += [(db, sql, "SELECT 1"), (db, f"SELECT {i}", f"SELECT {i}")]
        out = sqlexec.run_pairs(items, num_actors=2, timeout_s=POOL_TIMEOUT, progress=False)
        good = [r for j, r in enumerate(out) if j % 2 == 1]
        bad = [r for j, r in enumerate(out) if j % 2 == 0]
        res = {
            "good_correct": sum(r.correct for r in good),
            "attack_timed_out": sum(bool(r.timed_out) for r in bad),
            "errors": sorted({(r.pred_error or "")[:80] for r in out if r.pred_error}),
        }
    else:
        sql, timeout = CASES[case]
        ex = sqlexec.IsolatedExecutor() if new else sqlexec.SqlExecutor()
        r = ex.compare_pair(db, sql, "SELECT 1", timeout)  # what an executor actor runs for greedy EX
        res = {"ok": r.pred_error is None, "timed_out": r.timed_out, "error": (r.pred_error or "")[:100]}
        ex.close()
    res["wall_s"] = round(time.monotonic() - t0, 2)
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    res["peak_rss_mb"] = round(max(self_kb, child_kb) / 1024, 1)
    res["executor"] = "IsolatedExecutor (child process)" if new else "SqlExecutor (in process)"
    res["package"] = str(Path(sqlexec.__file__).parents[1])
    if case in ("pool", "birdgold"):  # Ray actors are not our children: no executor peak here
        res["peak_rss_mb"] = None
    return res


def spawn(pythonpath: str, case: str, db: str, wall_cap: float, mem_cap: int) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath, RAY_AUTH_MODE="disabled")
    code = (
        f"import json, resource, sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        f"cap = {mem_cap}\n"
        "if cap: resource.setrlimit(resource.RLIMIT_AS, (cap, cap))\n"
        f"from exec_attacks import run_one; print('RESULT ' + json.dumps(run_one({case!r}, {db!r})))"
    )
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=wall_cap,
                           check=False,
                           cwd=str(Path(db).parent))  # not the repo: "-c" puts the cwd first on sys.path
    except subprocess.TimeoutExpired:
        return {"wall_s": f">{wall_cap:g}", "error": f"still running after {wall_cap:g} s; stopped"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (p.stderr.strip().splitlines() or [""])[-1]
    return {"wall_s": round(time.monotonic() - t0, 2), "error": f"process failed (rc {p.returncode}): {tail[:160]}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-ref", default="8d12b06")  # main before the executor hardening (issue 11)
    ap.add_argument("--cases", default="zeroblob,doubling,bigrows,instr,pool,birdgold")
    ap.add_argument("--old-wall-cap", type=float, default=400.0)
    ap.add_argument("--old-mem-cap-gb", type=float, default=12.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old_root = Path(tmp) / "old"
        old_root.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.old_ref, "text2sql_ray"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old_root)], input=archive, check=True)
        db = str(Path(tmp) / "t.sqlite")
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE t(a)")
        con.commit()
        con.close()
        rows = []
        for case in args.cases.split(","):
            for name, path, cap, mem in (("old", str(old_root), args.old_wall_cap, int(args.old_mem_cap_gb * 2**30)),
                                         ("new", str(REPO), 600.0, 0)):
                r = spawn(path, case, db, cap, mem)
                rows.append((case, name, r))
                print(json.dumps({"case": case, "executor": name, **{k: v for k, v in r.items() if k != "per_question"}}),
                      flush=True)
    gold = {name: r for case, name, r in rows if case == "birdgold"}
    if len(gold) == 2 and all("per_question" in r for r in gold.values()):
        same = gold["old"]["per_question"] == gold["new"]["per_question"]
        print(f"birdgold: per-question results identical old vs new: {same}")
        for r in gold.values():
            r["outcome"] = f"{r['correct']}/{r['n']} correct; per-question results identical to the other: {same}"
    print()
    print("| case | executor | peak RSS (MB) | wall (s) | outcome |")
    print("|---|---|---:|---:|---|")
    for case, name, r in rows:
        if case == "birdgold":
            outcome = r.get("outcome", r.get("error", ""))
        elif case == "pool":
            outcome = (f"{r.get('good_correct', '?')}/{POOL_ROWS} good rows correct, "
                       f"{r.get('attack_timed_out', '?')}/{POOL_ROWS} attack rows timed out; "
                       + "; ".join(r.get("errors", [])[:2]) if "good_correct" in r else r.get("error", ""))
        else:
            outcome = ("ok" if r.get("ok") else ("timeout: " if r.get("timed_out") else "") + r.get("error", ""))
        print(f"| {case} | {name} | {r.get('peak_rss_mb', '-')} | {r.get('wall_s')} | {outcome} |")


if __name__ == "__main__":
    main()
