"""Small helpers every stage uses: atomic output files, manifests, JSONL, Ray start-up, logging."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import __version__

log = logging.getLogger("text2sql_ray")


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr with timestamps (once)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(level)
        log.propagate = False


# --------------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# Code points written as JSON \u escapes although JSON allows them raw: lone surrogates (valid in JSON text
# as escapes, but not encodable as UTF-8: writing one raw fails the whole file) and the line breaks that
# str.splitlines() splits on beside \n and \r (U+0085, U+2028, U+2029; json.dumps escapes the others,
# which are control characters). They only occur inside JSON strings, where the escape means the same.
_ESCAPE = re.compile("[\ud800-\udfff\u0085\u2028\u2029]")


def json_dumps(obj: Any, indent: int | None = None) -> str:
    """JSON text that every reader gets back intact: UTF-8-encodable, one line per JSONL row whatever splits it."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, default=str)
    return _ESCAPE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json_dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json_dumps(row) + "\n")
    return Path(path)


def read_text_utf8(path: str | Path) -> str:
    """A text file's contents; bytes that are not UTF-8 raise ValueError naming the file and line."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"{path}:{lineno}: not UTF-8 (byte {raw[e.start:e.start + 1]!r} at offset {e.start}); "
            "save the file as UTF-8."
        ) from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSONL file; bad lines raise ValueError naming
    the file and line. Lines end at \n only (\r\n too): U+2028 or U+0085 inside a string do not split a row."""
    for lineno, line in enumerate(read_text_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or delete that line.") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """Read JSONL; a malformed line raises ValueError naming the file and line number."""
    rows = []
    for lineno, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}.")
        rows.append(row)
    return rows


def write_parquet(path: str | Path, table) -> Path:
    """Write a pyarrow Table atomically (deterministic: no timestamps, fixed row group size)."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=50_000)
    return Path(path)


# --------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------


def write_manifest(out_dir: str | Path, stage: str, cfg: Any, started: float, **sections: Any) -> Path:
    """manifest.json beside a stage's outputs: resolved config, version, counts, metrics, wall time."""
    import dataclasses
    import sqlite3

    config = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    manifest = {
        "stage": stage,
        "package_version": __version__,
        # the execution verdicts depend on it (e.g. SQLite 3.43+ sums floats with compensation: AVG's last bit)
        "sqlite_version": sqlite3.sqlite_version,
        "config": config,
        "wall_time_s": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **sections,
    }
    return write_json(Path(out_dir) / "manifest.json", manifest)


def read_manifest(out_dir: str | Path) -> dict | None:
    p = Path(out_dir) / "manifest.json"
    return json.loads(p.read_text()) if p.is_file() else None


# --------------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------------


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS (a `ray job submit` run) or start a local instance.

    Locally, Ray is given at least 8 logical CPUs: on a 2-core laptop an actor pool or Train workers
    that claim every CPU can deadlock Ray Data and Serve (measured); logical CPUs only schedule.

    A joined cluster keeps its own network and authentication settings. A local instance is private:
    always a new one (``address="local"``: never a ``ray start`` cluster found in /tmp/ray; set
    RAY_ADDRESS=auto to join that), every Ray process listening on 127.0.0.1 only, no dashboard, and
    Ray's token authentication as Ray sets it up (on unless RAY_AUTH_MODE says otherwise).
    """
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    # Ray's gRPC servers (GCS, raylet, every worker, the agents) bind loopback only when the node IP
    # is 127.0.0.1, and ray.init turns a given 127.0.0.1 into this machine's network IP unless Ray's
    # single-machine mode is on (what Ray uses on macOS/Windows; ray/_private/services.py
    # get_node_ip_address). The switch is read at `import ray` time, so it is set both in the
    # environment (inherited by Ray's processes, which this call starts) and in this process, and
    # this process's value is restored afterwards (then the connected node's IP answers).
    env_name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    previous_env = os.environ.get(env_name)
    previous = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[env_name], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus or max(8, os.cpu_count() or 1),
            include_dashboard=False,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous
        if previous_env is None:
            os.environ.pop(env_name, None)
        else:
            os.environ[env_name] = previous_env


def available_cpus() -> int:
    """Physical-ish CPU count to size executor pools: the cluster's CPUs if Ray runs, else os.cpu_count()."""
    try:
        import ray

        if ray.is_initialized() and os.environ.get("RAY_ADDRESS"):
            return max(1, int(ray.cluster_resources().get("CPU", 1)))
    except Exception:  # pragma: no cover
        pass
    return max(1, os.cpu_count() or 1)


def pct(x: float | None, fraction: bool = False) -> str:
    """A percentage for a report table: `x` in percent as '12.34' ('-' for None); with ``fraction``, `x` in
    [0, 1] as '12.3%' ('n/a' for None), synthesize's yield format."""
    if fraction:
        return "n/a" if x is None else f"{100 * x:.1f}%"
    return "-" if x is None else f"{x:.2f}"
