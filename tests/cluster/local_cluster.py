"""A real Ray cluster on this machine for the cluster tests: a head and worker nodes started with ``ray start``,
each on its own loopback address (127.0.0.2, .3, …: Ray turns 127.0.0.1 into the machine's network address) with
its own temp dir, and front doors (``live-avatar serve --cluster``) in child processes.

Each node runs ``ray start --block`` in a new session; its raylet's workers (the actors) are children of that
raylet, so a node is killed by SIGKILL to every process of its tree — what a host that loses power looks like.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

import psutil

from cli.server_process import serve_command

RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 120.0
# Ray in a container: no usage stats, no dashboard; a dead node is noticed in ~2 s instead of ~15 s.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_DEDUP_LOGS": "0",
}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


class LocalRayCluster:
    """``ray start`` nodes on loopback addresses; every process they start is killed by :meth:`stop`."""

    def __init__(self, log: IO[str]) -> None:
        """Nodes write their ``ray start`` output to ``log``."""
        self.log = log
        self.dir = Path(tempfile.mkdtemp(prefix="la-ray-", dir="/tmp"))  # short: Ray's socket paths have a limit
        self.port = free_port()
        self.address = f"127.0.0.2:{self.port}"
        self.env = {**os.environ, **RAY_ENV}
        self.nodes: dict[str, subprocess.Popen] = {}

    def start_head(self) -> None:
        """The head: GCS and a raylet with no avatar slots (front doors and the registry run here)."""
        self._start("127.0.0.2", ["--head", "--port", str(self.port), "--include-dashboard=false",
                                  "--disable-usage-stats"])
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                socket.create_connection(("127.0.0.2", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.nodes["127.0.0.2"].poll() is not None:
                    raise RuntimeError(f"the Ray head did not come up on {self.address}") from None
                time.sleep(0.3)

    def add_node(self, ip: str, slots: int) -> None:
        """A worker node on ``ip`` advertising ``slots`` avatar slots."""
        self._start(ip, ["--address", self.address, "--resources", json.dumps({"avatar_slots": slots})])

    def _start(self, ip: str, args: list[str]) -> None:
        command = [RAY, "start", "--block", "--node-ip-address", ip, "--num-cpus", "1",
                   "--object-store-memory", "100000000", "--temp-dir", str(self.dir / ip), *args]
        self.nodes[ip] = subprocess.Popen(command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                          start_new_session=True)

    def kill_node(self, ip: str) -> None:
        """SIGKILL every process of the node on ``ip``: its ``ray start``, raylet and the raylet's workers."""
        _kill(_tree(self.nodes.pop(ip).pid))

    def stop(self) -> None:
        """Kill every node (workers first, the head last), then remove the temp dir."""
        for ip in sorted(self.nodes, reverse=True):
            self.kill_node(ip)
        shutil.rmtree(self.dir, ignore_errors=True)


class FrontDoorProcess:
    """``live-avatar serve --cluster`` in a child process on a free loopback port."""

    def __init__(self, cluster: LocalRayCluster, profile: Path, log: IO[str]) -> None:
        """A front door of ``cluster`` serving ``profile``; its output goes to ``log``."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [*serve_command(), "serve", "--cluster", cluster.address, "--config", str(profile),
                   "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(command, env=cluster.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_hosts(self, count: int, timeout: float = START_TIMEOUT_S) -> dict:
        """Wait until /health shows ``count`` ready hosts; returns that /health."""
        deadline = time.monotonic() + timeout
        health: dict = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the front door exited with code {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    health = json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                health = json.loads(exc.read())
            except OSError:
                pass
            if sum(h["state"] == "ready" for h in health.get("hosts", [])) >= count:
                return health
            time.sleep(0.5)
        raise TimeoutError(f"{self.url} did not show {count} ready hosts within {timeout:g} s; last /health: {health}")

    def stop(self) -> None:
        """Interrupt (graceful), then kill what is left of its process tree."""
        procs = _tree(self.proc.pid)
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        _kill([p for p in procs if p.is_running()])
