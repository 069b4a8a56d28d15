"""A stage submitted with `ray job submit` to a real local Ray cluster (`ray start --head`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@pytest.fixture()
def ray_cluster(tmp_path):
    """`ray start --head --block` in its own process group, on free ports (other Ray instances may run)."""
    gcs, dash, agent_http, agent_grpc, client, metrics, rt_env = _free_ports(7)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    temp_dir = Path("/tmp") / f"t2s_rayjob_{os.getpid()}"
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--port", str(gcs), "--dashboard-port", str(dash),
         "--include-dashboard", "true", "--dashboard-agent-listen-port", str(agent_http),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--ray-client-server-port", str(client),
         "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(rt_env),
         "--num-cpus", "4", "--temp-dir", str(temp_dir)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        yield address, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:  # `ray start --block` takes ~30 s to wind down on SIGTERM; this cluster is throwaway (own temp dir)
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _submit(address: str, env: dict, entrypoint: list[str], deadline_s: float = 240) -> subprocess.CompletedProcess:
    """Submit and wait; the job agent needs a few seconds after `ray start` before it accepts jobs."""
    end = time.time() + deadline_s
    while True:
        res = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--", *entrypoint],
            env=env, capture_output=True, text=True, timeout=max(10, end - time.time()), cwd=REPO,
        )
        not_ready = "No available agent" in res.stderr + res.stdout or "Connection refused" in res.stderr + res.stdout
        if res.returncode == 0 or not not_ready or time.time() > end:
            return res
        time.sleep(3)


@pytest.mark.timeout(420)
def test_convert_submitted_as_ray_job_succeeds_and_writes_outputs(ray_cluster, tmp_path):
    address, env = ray_cluster
    out = tmp_path / "convert"
    res = _submit(address, env, ["t2s", "convert", "--config", "jobs/tiny_cpu.yaml", "--out", str(out)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "succeeded" in res.stdout + res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "convert"
    n = sum(pq.read_metadata(out / f).num_rows for f in ("train.parquet", "validation.parquet", "rejected.parquet"))
    assert n == 24  # jobs/tiny_cpu.yaml: convert.limit 24, nothing lost
