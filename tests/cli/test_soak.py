"""Back-to-back sessions against a real server leave nothing behind: after the first session (which warms up
thread pools and caches) the server process has the same threads and file descriptors after every session."""

from __future__ import annotations

from cli.soak_bench import run_soak
from live.settings import load_settings

SESSIONS = 5


def test_threads_and_fds_return_to_baseline_after_each_session():
    result = run_soak(load_settings("configs/tiny.yaml"), SESSIONS, seconds=1.5, warmup=1)
    steady = result.steady
    assert len(steady) == SESSIONS, result.table()
    assert {s.threads for s in steady} == {steady[0].threads}, result.table()
    assert {s.fds for s in steady} == {steady[0].fds}, result.table()
