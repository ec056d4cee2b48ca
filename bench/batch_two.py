"""Two sessions on one GPU: one batch-2 forward per denoising step against two batch-1 forwards (round-robin).

Builds the profile's DiT (random weights of the real size, FP8 and compile as the profile or the environment say),
fills KV rings for one stream of batch 2 and two streams of batch 1 at each size, and times full-ring blocks
(4 steps) both ways; prints a table. Usage (on the GPU machine):
``LIVE_AVATAR_FP8=true LIVE_AVATAR_COMPILE=true python3 bench/batch_two.py --config configs/liveavatar-14b.yaml``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from live.engine.stream import ProfileStack  # noqa: E402
from live.images import generation_size  # noqa: E402
from live.settings import load_settings  # noqa: E402
from model.dit import AudioTokens  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def block_ms(stack: ProfileStack, batch: int, streams: int, lat_h: int, lat_w: int, blocks: int) -> float:
    """Median wall ms of one block (4 steps) for ``streams`` streams of batch ``batch``, run one after another."""
    dit, s, dev, dt = stack.dit, stack.settings, stack.device, stack.dtype
    cfg = dit.config
    fpb = cfg.frames_per_block
    text = torch.zeros(batch, cfg.text_len, cfg.text_dim, device=dev, dtype=dt)
    text_kv = dit.text_kv(text)
    ref = torch.randn(batch, cfg.in_dim, 1, lat_h, lat_w, device=dev, dtype=dt)
    motion = torch.randn(batch, cfg.in_dim, cfg.lat_motion_frames, lat_h, lat_w, device=dev, dtype=dt)
    caches = [dit.new_caches(s.stream.steps, lat_h, lat_w, batch=batch) for _ in range(streams)]
    for c in caches:
        dit.prefill_sink(c, ref, motion, text_kv)
    audio = AudioTokens(torch.randn(batch, fpb, 1, cfg.dim, device=dev, dtype=dt),
                        torch.randn(batch, fpb, cfg.num_audio_token, cfg.dim, device=dev, dtype=dt))
    x = torch.randn(batch, cfg.in_dim, fpb, lat_h, lat_w, device=dev, dtype=dt)
    times = []
    for b in range(cfg.kv_cache_frames // fpb + blocks):
        _sync(dev)
        t0 = time.perf_counter()
        for c in caches:
            for i in range(stack.schedule.steps):
                dit.forward_block(x, stack.schedule.timestep(i, dev).expand(batch), audio, text_kv, c, i, b * fpb)
        _sync(dev)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[-blocks:])


def main() -> int:
    """Print ms per block of two streams: batch 2 once, or batch 1 twice."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/liveavatar-14b.yaml")
    p.add_argument("--sizes", nargs="+", default=["384*256", "320*192"])
    p.add_argument("--blocks", type=int, default=4)
    args = p.parse_args()
    settings = load_settings(args.config).model_copy(update={"checkpoint_dir": None, "lora": None, "weights": None,
                                                               "cuda_graphs": False})
    stack = ProfileStack.from_settings(settings)
    card = torch.cuda.get_device_name(stack.device) if stack.device.type == "cuda" else "cpu"
    print(f"{card}, fp8={settings.fp8}, compile={settings.compile}, DiT only (4 steps, full ring + sink)\n")
    print("| size | latent | 2 × batch 1 (round-robin) ms | 1 × batch 2 ms | speed-up |")
    print("|---|---|---|---|---|")
    for area in args.sizes:
        aw, ah = (int(v) for v in area.split("*"))
        h, w = generation_size((ah, aw), area, settings.video.size_multiple)
        lat_h, lat_w = h // 8, w // 8
        block_ms(stack, 2, 1, lat_h, lat_w, 1)  # compile both shapes before timing
        block_ms(stack, 1, 1, lat_h, lat_w, 1)
        rr = block_ms(stack, 1, 2, lat_h, lat_w, args.blocks)
        b2 = block_ms(stack, 2, 1, lat_h, lat_w, args.blocks)
        print(f"| {area} | {w}×{h} | {rr:.0f} | {b2:.0f} | {rr / b2:.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
