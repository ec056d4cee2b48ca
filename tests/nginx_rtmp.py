"""A real RTMP server for the output tests: Debian's nginx with libnginx-mod-rtmp, on a loopback port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

RTMP_MODULE = Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")
START_TIMEOUT_S = 10.0

CONFIG = """\
load_module {module};
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 64; }}
rtmp {{
    server {{
        listen 127.0.0.1:{port};
        application live {{
            live on;
            record off;
            wait_key on;
            wait_video on;
        }}
    }}
}}
"""


def missing() -> str | None:
    """Why the RTMP tests cannot run here, or None."""
    if shutil.which("nginx") is None:
        return "nginx is not installed (Debian package nginx; scripts/setup_env.sh test installs it)"
    if not RTMP_MODULE.exists():
        return f"the nginx RTMP module is not installed at {RTMP_MODULE} (Debian package libnginx-mod-rtmp)"
    return None


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NginxRtmp:
    """nginx-rtmp in the foreground as a child process; config, pid and logs live in ``workdir``."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        """Prepare a server on ``port`` (default: a free one); nothing runs until :meth:`start`."""
        self.dir = workdir
        self.port = port or free_port()
        self.conf = workdir / "nginx.conf"
        self.conf.write_text(CONFIG.format(module=RTMP_MODULE, dir=workdir, port=self.port))
        self._proc: subprocess.Popen | None = None

    def url(self, key: str) -> str:
        """The RTMP URL of stream ``key`` in application ``live``."""
        return f"rtmp://127.0.0.1:{self.port}/live/{key}"

    def start(self) -> None:
        """Start nginx and wait until its port accepts connections."""
        log = open(self.dir / "stdout.log", "a")
        self._proc = subprocess.Popen(["nginx", "-p", str(self.dir), "-c", str(self.conf), "-e",
                                       str(self.dir / "error.log")], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self._proc.returncode}: "
                                   f"{(self.dir / 'error.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("nginx did not open its RTMP port") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """Kill nginx at once (SIGKILL): every connection drops as if the server crashed."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
