"""`live-avatar bench` runs on the tiny profile on CPU and prints its table and command."""

from __future__ import annotations

import re

from cli.main import main


def test_bench_tiny_prints_table_and_command(capsys):
    assert main(["bench", "--config", "configs/tiny.yaml", "--blocks", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| variant |"))
    for col in ("FPS", "block p50 ms", "block p95 ms", "TTFF s", "peak GiB", "DiT ms/block", "decode ms/frame"):
        assert col in lines[header]
    row = [c.strip() for c in lines[header + 2].strip("|").split("|")]
    assert row[0] == "fp32" and re.fullmatch(r"\d+×\d+", row[2])
    assert float(row[3]) > 0 and float(row[6]) > 0
    assert "`live-avatar bench --config configs/tiny.yaml --blocks 2 --warmup 1`" in out

