"""Throughput of the step pipeline at a given world size: sustained FPS, time to first frame, memory per rank.

:func:`run_pipeline_bench` is what ``live-avatar bench`` calls for N = 1, 2, 4; ``python -m cli.pipeline_bench``
runs it for several world sizes and prints a table with the command that reproduces it.

Method: one session on a 16:9 version of the built-in character (so the area rule gives upstream's landscape
sizes, 720*400 → 704×384, as in ``live-avatar bench``), all audio (silence) pushed up front so blocks queue up and the
pipeline runs full. Time to first frame = from the first ``generate_block`` call (session already started) to the
first decoded block in the ring; sustained FPS = frames of the blocks after ``warmup`` divided by the time between
the last warm-up block and the last block. Every delivered block is synchronised on rank 0's device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from cli.bench import reference_image
from live.engine.pipeline import PipelineEngine, PipelineHost
from live.engine.stream import ProfileStack
from live.settings import Settings, load_settings


def _sync(device: torch.device) -> None:
    """Wait for rank 0's compute stream (the frames are on it). Not ``torch.cuda.synchronize``: that also waits
    for receives already posted for later blocks, i.e. for the other ranks, and would serialise the pipeline."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def run_pipeline_bench(settings: Settings, world_size: int, blocks: int, warmup: int) -> dict:
    """Run ``warmup + blocks`` blocks through a ``world_size``-rank pipeline of ``settings`` (its other pipeline
    options kept) and return ``fps``, ``ttff_s``, percentiles of the interval between blocks and of a block's
    latency (into the pipeline → frames on rank 0), ``start_s`` (session start: reference encode + sink prefill
    on every rank) and ``ranks`` (per rank: device, steps, decodes, ``peak_memory_bytes``, ``cache_bytes``).
    The ranks are started for the run and stopped after it."""
    if blocks < 1 or warmup < 0:
        raise ValueError(f"blocks must be >= 1 and warmup >= 0, got {blocks} and {warmup}")
    s = settings.model_copy(update={"pipeline": settings.pipeline.model_copy(update={"world_size": world_size})})
    stack = ProfileStack.from_settings(s)
    host = PipelineHost(stack)
    try:
        if s.compile:  # every rank compiles during its first blocks: a throwaway session, as live-avatar bench does
            _session(stack, host, 2)[0].close()
        engine, start_s, t0, done, latency = _session(stack, host, warmup + blocks)
        ranks = host.stats()
        engine.close()
    finally:
        host.shutdown()
    marks = [t0, *done]
    measured = marks[warmup:]
    intervals = [b - a for a, b in zip(measured, measured[1:])]
    return {
        "world_size": world_size, "backend": s.pipeline.backend, "decode_on": s.pipeline.decode_on,
        "steps": s.stream.steps, "device": str(stack.device), "dtype": s.dtype,
        "size": [engine.width, engine.height], "blocks": blocks, "warmup": warmup,
        "fps": blocks * engine.frames_per_block / (measured[-1] - measured[0]),
        "ttff_s": done[0] - t0, "start_s": start_s,
        "interval_p50_s": statistics.median(intervals), "interval_p95_s": float(np.percentile(intervals, 95)),
        "latency_p50_s": statistics.median(latency[warmup:]),
        "latency_p95_s": float(np.percentile(latency[warmup:], 95)),
        "ranks": ranks,
    }


def _session(stack: ProfileStack, host: PipelineHost, blocks: int) -> tuple[PipelineEngine, float, float, list[float],
                                                                          list[float]]:
    """Start a session, push ``blocks`` blocks of audio and run them through; returns the (open) engine, its start
    time, the time generation began, when each block's frames arrived, and each block's latency."""
    engine = PipelineEngine(stack, seed=stack.settings.seed, host=host)
    t0 = time.perf_counter()
    engine.start(reference_image())
    start_s = time.perf_counter() - t0
    engine.push_audio(np.zeros(blocks * engine.samples_per_block + engine.lookahead_samples, np.float32))
    done: list[float] = []
    latency: list[float] = []
    t0 = time.perf_counter()
    while len(done) < blocks:
        if engine.generate_block():
            _sync(stack.device)
            done.append(time.perf_counter())
            latency.append(engine.block_latency_s)
            engine.ring.clear()
    return engine, start_s, t0, done, latency


def format_table(results: list[dict]) -> str:
    """A plain-text table of :func:`run_pipeline_bench` results, one row per world size."""
    head = (f"{'N':>3} {'decode':>6} {'FPS':>7} {'TTFF s':>7} {'latency p50/p95 s':>18} "
            f"{'interval p50/p95 s':>19}  peak memory per rank (GiB)")
    rows = [head]
    for r in results:
        mem = " ".join(f"{x['peak_memory_bytes'] / 2**30:.1f}" for x in r["ranks"])
        rows.append(f"{r['world_size']:>3} {r['decode_on']:>6} {r['fps']:>7.2f} {r['ttff_s']:>7.2f} "
                    f"{r['latency_p50_s']:>9.3f}/{r['latency_p95_s']:<8.3f} "
                    f"{r['interval_p50_s']:>9.3f}/{r['interval_p95_s']:<9.3f}  {mem}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """``python -m cli.pipeline_bench --config PROFILE --world-sizes 1 2 4``: table of FPS / TTFF / memory."""
    p = argparse.ArgumentParser(prog="python -m cli.pipeline_bench", description=main.__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--blocks", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--decode-on", choices=["last", "own"], default=None)
    p.add_argument("--backend", choices=["nccl", "gloo"], default=None, help="gloo for CPU profiles")
    p.add_argument("--random-weights", action="store_true", help="ignore checkpoints; real-size random weights")
    args = p.parse_args(argv)
    settings = load_settings(args.config)
    if args.random_weights:
        settings = settings.model_copy(update={"checkpoint_dir": None, "lora": None})
    chosen = {k: v for k, v in (("decode_on", args.decode_on), ("backend", args.backend)) if v}
    settings = settings.model_copy(update={"pipeline": settings.pipeline.model_copy(update=chosen)})
    results = [run_pipeline_bench(settings, n, args.blocks, args.warmup) for n in args.world_sizes]
    first = results[0]
    print(f"{settings.name}: {first['size'][0]}x{first['size'][1]}, {first['steps']} steps, {first['dtype']}, "
          f"{settings.pipeline.backend}, {args.blocks} blocks after {args.warmup} warm-up")
    print(format_table(results))
    print("reproduce: python -m cli.pipeline_bench " + " ".join(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
