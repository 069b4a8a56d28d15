"""A Ray instance that `t2s` starts is reachable from this machine only, and only with Ray's token.

A real `t2s serve` runs in a subprocess, as a user starts it (no RAY_AUTH_MODE, no RAY_ADDRESS): its
Ray processes (GCS, raylet, workers, agents, the Serve controller, proxy and replicas) are the
subprocess's process tree, and every socket they listen on is read from the kernel (psutil). Other
engineers' Ray instances on the same machine are never looked at.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def listening_sockets(pids: set[int]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket in LISTEN state held by one of `pids`."""
    out = set()
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            name = proc.name()
            conns = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out |= {(name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return sorted(out)


def process_tree(pid: int) -> set[int]:
    root = psutil.Process(pid)
    return {root.pid} | {p.pid for p in root.children(recursive=True)}


def session_ray_pids() -> set[int]:
    """This test session's Ray processes: this driver, and the GCS and raylet it started with their children."""
    import ray

    pids = {os.getpid()}
    for infos in ray._private.worker._global_node.all_processes.values():
        for info in infos:
            pids |= process_tree(info.process.pid)
    return pids


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def test_is_loopback_tells_loopback_from_every_interface():
    assert [is_loopback(a) for a in ("127.0.0.1", "::1", "::ffff:127.0.0.1")] == [True, True, True]
    assert [is_loopback(a) for a in ("0.0.0.0", "::", "192.0.2.2")] == [False, False, False]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_CONNECT = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
ray.experimental.internal_kv._internal_kv_put(b"t2s_test", b"written")
print("CONNECTED", len(ray.nodes()))
"""


def _connect(gcs: str, auth_mode: str) -> subprocess.CompletedProcess:
    """A second process on this machine connects to the instance's GCS and writes a key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    # Without this, ray.init turns the address 127.0.0.1 into this machine's network IP (nothing listens
    # there any more): the client side of the loopback-only mode that ensure_ray uses.
    env.update(RAY_AUTH_MODE=auth_mode, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    return subprocess.run([sys.executable, "-c", _CONNECT, gcs], env=env, capture_output=True, text=True,
                          timeout=180)


@pytest.mark.timeout(600)
def test_t2s_serve_listens_on_loopback_only_and_ray_needs_its_token(tiny_llama_dir, tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [str(BIN / "t2s"), "serve", "--model", str(tiny_llama_dir), "--model-id", "tiny", "--port", str(port),
         "--num-cpus", "0.25"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
    )
    try:
        deadline = time.time() + 400
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the app not deployed yet
                pass
            assert time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(2)
        answer = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "How many rows?"}], "max_tokens": 2, "temperature": 0})
        assert answer.status_code == 200  # the stage really runs while its sockets are read

        sockets = listening_sockets(process_tree(proc.pid))
        names = {name for name, _, _ in sockets}
        # the sockets of every kind of Ray process were read: this instance, nobody else's
        assert {"gcs_server", "raylet", "ray::ProxyActor"} <= names, sockets
        assert any(n.startswith("ray::ServeReplica") for n in names), sockets
        assert ("ray::ProxyActor", "127.0.0.1", port) in sockets
        assert [s for s in sockets if not is_loopback(s[1])] == []

        # Ray's token authentication is on: a second local process without the token can neither
        # connect nor write; with the token (~/.ray/auth_token, where Ray keeps it) it can.
        gcs = next(f"127.0.0.1:{p}" for name, _, p in sockets if name == "gcs_server")
        refused = _connect(gcs, "disabled")
        assert refused.returncode != 0 and "InvalidAuthToken" in refused.stdout + refused.stderr
        allowed = _connect(gcs, "token")
        assert allowed.returncode == 0 and "CONNECTED 1" in allowed.stdout, allowed.stderr[-3000:]
    finally:
        proc.send_signal(signal.SIGTERM)  # t2s serve stops its app and exits; Ray goes with it
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_ensure_ray_starts_a_loopback_instance_and_restores_the_process_setting(ray_local):
    from ray._private import ray_constants

    assert ray_local.util.get_node_ip_address() == "127.0.0.1"
    assert ray_constants.ENABLE_RAY_CLUSTER is True  # restored after start-up (Linux default)
    assert ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR not in os.environ
    sockets = listening_sockets(session_ray_pids())
    assert {"gcs_server", "raylet"} <= {name for name, _, _ in sockets}
    assert [s for s in sockets if not is_loopback(s[1])] == []
