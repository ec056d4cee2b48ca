"""Compare torch.compile modes of the DiT's per-layer pieces on the 14B FP8 stack (random weights), one process.

Rows: FP8 with the default inductor mode, then with ``max-autotune-no-cudagraphs`` (Triton GEMM/reduction
autotuning). CUDA-graph modes are not tried: the pieces run once per layer with that layer's weights as inputs,
so a graph per piece would be recorded per layer, and at 704×384 the GPU, not the launch rate, is the limit.

Usage (GPU machine): ``python3 bench/compile_modes.py [--blocks 20] [--warmup 3]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cli.bench import format_table, reference_image, run_engine  # noqa: E402
from live.engine.stream import ProfileStack  # noqa: E402
from live.settings import load_settings  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--blocks", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    settings = load_settings("configs/liveavatar-14b.yaml", fp8=True).model_copy(
        update={"checkpoint_dir": None, "lora": None})
    stack = ProfileStack.from_settings(settings)
    image = reference_image()
    results, notes = [], []
    for mode in (None, "max-autotune-no-cudagraphs"):
        torch._dynamo.reset()
        stack.dit.compile_blocks(mode)
        label = f"fp8+compile ({mode or 'default'})"
        t0 = time.perf_counter()
        run_engine(stack, label, image, warmup=1, blocks=1)
        notes.append(f"{label}: compile warm-up stream {time.perf_counter() - t0:.1f} s")
        results.append(run_engine(stack, label, image, args.warmup, args.blocks))
        print(f"[modes] {label}: {results[-1].fps:.2f} FPS, DiT {results[-1].dit_ms:.0f} ms/block", flush=True)
    print()
    print(format_table(results))
    print()
    for n in notes:
        print(f"- {n}")
    print(f"\n`python3 bench/compile_modes.py --blocks {args.blocks} --warmup {args.warmup}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
