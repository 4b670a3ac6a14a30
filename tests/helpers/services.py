"""Real services for tests, on 127.0.0.1: an S3 endpoint (moto's server) and a Ray cluster
of two nodes. Each runs in a session of its own, started on a free port and killed (the
whole session) when the test session ends."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers.processes import kill_session

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{process.args} did not listen on port {port}") from None
            time.sleep(0.1)


@contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 server; yields the environment a user's S3 client reads (endpoint and
    credentials), which the code under test finds as it would find a real store's."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_port(port, server, 60)
        yield {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        kill_session(server.pid)


@contextmanager
def ray_cluster(env: dict[str, str]) -> Iterator[str]:
    """A head node and a second node (`ray start`), one CPU each, the second with a
    resource of its own; `env` (the S3 settings) is what their workers see. Yields the
    address a driver joins with --ray-address."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a limit
    common = ["--num-cpus", "1", "--disable-usage-stats", "--block"]
    environ = {**os.environ, **env, "RAY_AUTH_MODE": "disabled"}
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--temp-dir", temp, "--include-dashboard", "false", *common],
            env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        _wait_for_port(port, nodes[0], 120)
        address = f"127.0.0.1:{port}"
        nodes.append(subprocess.Popen(
            [str(BIN / "ray"), "start", "--address", address, "--node-ip-address", "127.0.0.1",
             "--resources", '{"second_node": 1}', *common],
            env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        _wait_for_nodes(address, 2, 120)
        yield address
    finally:
        for node in reversed(nodes):
            kill_session(node.pid)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_nodes(address: str, count: int, seconds: float) -> None:
    script = (
        "import ray, time, sys\n"
        f"ray.init(address={address!r}, log_to_driver=False, configure_logging=False)\n"
        f"while len([n for n in ray.nodes() if n['Alive']]) < {count}: time.sleep(0.2)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=seconds)
