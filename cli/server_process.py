"""A server in a child process on a free loopback port, for benchmarks and tests that need a real one."""

from __future__ import annotations

import json
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

import yaml

from live.settings import REPO_ROOT, Settings

START_TIMEOUT_S = 900.0  # a 14B profile builds, quantises and calibrates before it is healthy


def serve_command() -> list[str]:
    """The ``live-avatar`` console script beside this interpreter, or the same entry point through ``-m`` where
    the project is on the path without being installed (the GPU machine)."""
    script = Path(sys.executable).with_name("live-avatar")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


class ServerProcess:
    """``with ServerProcess(settings) as url:`` runs ``signaling.app.serve`` with ``settings`` until the block ends."""

    def __init__(self, settings: Settings, log: IO[str] | None = None) -> None:
        """Serve ``settings``; the child's output goes to ``log`` (default: discarded)."""
        self.settings = settings
        self.log = log
        self.url = ""
        self._proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> str:
        self._dir = tempfile.TemporaryDirectory(prefix="live-avatar-server-")
        profile = Path(self._dir.name) / "profile.yaml"
        profile.write_text(yaml.safe_dump(self.settings.model_dump(mode="json", exclude={"source"})))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = [*serve_command(), "serve", "--config", str(profile), "--host", "127.0.0.1", "--port", str(port)]
        self._proc = subprocess.Popen(command, cwd=REPO_ROOT,
                                      stdout=self.log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            self._wait_healthy()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.url

    @property
    def pid(self) -> int:
        """The server's process id (while the ``with`` block runs)."""
        if self._proc is None:
            raise RuntimeError("the server is not running")
        return self._proc.pid

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self._proc.returncode} before it was healthy")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except urllib.error.HTTPError as exc:
                raise RuntimeError(f"server is unhealthy: {json.loads(exc.read())}") from None
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not come up within {START_TIMEOUT_S:g} s")
            time.sleep(0.5)

    def __exit__(self, *exc_info) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._dir is not None:
            self._dir.cleanup()
