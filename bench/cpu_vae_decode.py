"""Streaming VAE decode of the built-in tiny avatar on CPU: ms per output frame, and the max abs difference from
diffusers' own (unpatched) one-shot decode.

Loads the shipped weights (``configs/tiny.yaml``), applies ``model.vae_cpu.speed_up_vae_`` as the engine does on
CPU, and decodes a stream of random latents at 192×192 (latent 24×24) in blocks of 3 latents (12 frames), after
the stream's first latent. Prints the median and best wall and CPU (process) time per frame over ``--blocks``
blocks, for each thread count in ``--threads``. On a shared machine the CPU time is the steadier number.

Usage: ``python bench/cpu_vae_decode.py [--threads 1 2] [--blocks 12] [--size 24]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from live.settings import load_settings  # noqa: E402
from model.vae import StreamingVAEDecoder, build_vae, denormalize_latents  # noqa: E402
from model.vae_cpu import speed_up_vae_  # noqa: E402


def _shipped_vae() -> torch.nn.Module:
    """The tiny profile's VAE with its shipped weights (unpatched)."""
    settings = load_settings("configs/tiny.yaml")
    vae = build_vae(settings.model.vae).eval().requires_grad_(False)
    weights = load_file(settings.weights)
    vae.load_state_dict({k.removeprefix("vae."): v for k, v in weights.items() if k.startswith("vae.")})
    return vae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--size", type=int, default=24, help="latent height and width (output is 8x)")
    args = parser.parse_args()

    plain = _shipped_vae()
    fast = speed_up_vae_(copy.deepcopy(plain))
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 1 + 3 * args.blocks, args.size, args.size, generator=gen)

    check = latents[:, :, :7]
    with torch.no_grad():
        reference = plain.decode(denormalize_latents(plain, check)).sample.clamp(-1, 1)
    decoder = StreamingVAEDecoder(fast)
    streamed = torch.cat([decoder.decode(c) for c in check.split([1, 3, 3], dim=2)], dim=2)
    print(f"max abs difference from diffusers' one-shot decode: {(streamed - reference).abs().max().item():.2e}")

    for threads in args.threads:
        torch.set_num_threads(threads)
        decoder = StreamingVAEDecoder(fast)
        decoder.decode(latents[:, :, :1])
        wall, cpu = [], []
        for i in range(args.blocks):
            block = latents[:, :, 1 + 3 * i : 4 + 3 * i]
            w0, c0 = time.perf_counter(), time.process_time()
            frames = decoder.decode(block).shape[2]
            wall.append((time.perf_counter() - w0) * 1000 / frames)
            cpu.append((time.process_time() - c0) * 1000 / frames)
        print(f"{threads} thread(s), {8 * args.size}x{8 * args.size}: wall {statistics.median(wall):.1f} ms/frame "
              f"(best {min(wall):.1f}), CPU {statistics.median(cpu):.1f} ms/frame (best {min(cpu):.1f}); "
              f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
