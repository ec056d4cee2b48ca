"""FP8 KV ring and FP8 self-attention in the 14B DiT (random weights) on one CUDA GPU: speed, memory, accuracy.

Variants, each on its own freshly allocated KV memory (one stream, batch 1, 4 steps, full ring + sink): KV stored
in bf16 or e4m3 (``kv_cache_dtype``) × self-attention in bf16 or FP8 (``attention``; FP8 layers all but
``--skip-layers``). Per variant: median / max ms of a full-ring block (DiT only, after ``--warmup`` full-ring
blocks that also build cuDNN's plans), the KV memory (``StepCaches.nbytes``), the peak allocated memory while the
variant ran (weights included), and the relative error of the last block's velocity (last step) against the bf16 /
bf16 variant on identical inputs. Then one layer's self-attention at the real size ([sink | ring] merged by the
log-sum-exp), random Q/K/V with RMS-normed statistics (and with 8 outlier channels), relative error against bf16
and float32 for: e4m3 KV with the engine's fixed scales + bf16 attention, FP8 attention over that KV, FP8
attention with K/V quantised per call.

FP8 linears, compile and CUDA graphs follow the profile and the environment (``gpu_fp8_kv`` sets
``LIVE_AVATAR_FP8=true``, the fastest measured setting; ``--cuda-graphs`` forces graphs on). Usage (GPU machine,
cuDNN frontend on PYTHONPATH): ``. bench/device_run.sh && gpu_fp8_kv`` or ``python3 bench/fp8_kv.py [--size 704*384]
[--blocks 6]``. Without CUDA it runs too, as a smoke test of the script on the tiny profile (``--config
configs/tiny.yaml --size 64*64``; CPU timings, no peak memory, FP8 attention through the float32 reference).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fp8_attention import make_qkv  # noqa: E402
from live.engine.stream import VAE_TEMPORAL_STRIDE, ProfileStack  # noqa: E402
from live.images import generation_size  # noqa: E402
from live.settings import load_settings  # noqa: E402
from model.attention import StreamAttention, merge_attention  # noqa: E402
from model.attention_fp8 import attention_fp32  # noqa: E402
from model.dit import AudioTokens, CausalS2VDiT  # noqa: E402
from model.kv_fp8 import StoredKV, kv_descale, quantize_fixed  # noqa: E402
from model.stack import configure_attention  # noqa: E402

VARIANTS = {  # name: (kv_cache_dtype, attention)
    "bf16-kv/bf16-attn": ("bf16", "dtype"),
    "fp8-kv/bf16-attn": ("fp8", "dtype"),
    "bf16-kv/fp8-attn": ("bf16", "fp8"),
    "fp8-kv/fp8-attn": ("fp8", "fp8"),
}
GIB = 2**30


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(stack: ProfileStack, lat_h: int, lat_w: int, blocks: int, warmup: int) -> dict:
    """Fill a fresh stream's rings, then time ``blocks`` full-ring blocks; its KV bytes, peak memory, block times
    and the last velocity (on the host)."""
    dit, dev, dt = stack.dit, stack.device, stack.dtype
    cfg = dit.config
    fpb = cfg.frames_per_block
    g = torch.Generator(device=dev).manual_seed(0)
    text_kv = dit.text_kv(torch.randn(1, cfg.text_len, cfg.text_dim, device=dev, dtype=dt, generator=g))
    ref = torch.randn(1, cfg.in_dim, 1, lat_h, lat_w, device=dev, dtype=dt, generator=g)
    motion = torch.randn(1, cfg.in_dim, cfg.lat_motion_frames, lat_h, lat_w, device=dev, dtype=dt, generator=g)
    audio = AudioTokens(torch.randn(1, fpb, 1, cfg.dim, device=dev, dtype=dt, generator=g),
                        torch.randn(1, fpb, cfg.num_audio_token, cfg.dim, device=dev, dtype=dt, generator=g))
    x = torch.randn(1, cfg.in_dim, fpb, lat_h, lat_w, device=dev, dtype=dt, generator=g)
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    caches = dit.new_caches(stack.schedule.steps, lat_h, lat_w)
    dit.prefill_sink(caches, ref, motion, text_kv)
    times = []
    fill = cfg.kv_cache_frames // fpb
    for b in range(fill + warmup + blocks):
        sync(dev)
        t0 = time.perf_counter()
        for i in range(stack.schedule.steps):
            out = dit.forward_block(x, stack.schedule.timestep(i, dev), audio, text_kv, caches, i, b * fpb)
        sync(dev)
        times.append((time.perf_counter() - t0) * 1000)
    timed = times[fill + warmup:]
    row = {"kv_gib": caches.nbytes() / GIB, "kv_dtype": str(caches.kv_dtype).removeprefix("torch."),
           "median_ms": statistics.median(timed), "max_ms": max(timed), "velocity": out.float().cpu(),
           "peak_gib": torch.cuda.max_memory_allocated(dev) / GIB if dev.type == "cuda" else float("nan")}
    del caches, out
    return row


def attention_errors(dit: CausalS2VDiT, lat_h: int, lat_w: int, dev: torch.device) -> list[str]:
    """Markdown rows: one layer's [sink | ring] self-attention at the real size in each precision, relative error of
    the merged output against bf16 and float32 (normal and outlier statistics)."""
    cfg = dit.config
    sq = cfg.frames_per_block * dit.tokens_per_frame(lat_h, lat_w)
    sink, ring = dit.sink_tokens(lat_h, lat_w), cfg.kv_cache_frames * dit.tokens_per_frame(lat_h, lat_w)
    dense, fp8 = StreamAttention("dtype"), StreamAttention("fp8", (), 1)
    rows = []
    for label, outliers in (("normal", False), ("8 outlier channels", True)):
        q, k, v = make_qkv(sq, sink + ring, outliers, 3, cfg.num_heads, cfg.head_dim, dev)
        ref = attention_fp32(q, k, v)[0].transpose(1, 2)
        parts = (slice(0, sink), slice(sink, None))
        kd, vd = kv_descale(k[:, :sink], rotary=True), kv_descale(v[:, :sink])  # fixed at the sink, as the engine
        stored = [StoredKV(quantize_fixed(k[:, sl], kd), quantize_fixed(v[:, sl], vd), kd, vd) for sl in parts]
        plain = [StoredKV(k[:, sl], v[:, sl]) for sl in parts]
        o16 = merge_attention(*dense(0, q, plain[0]), *dense(0, q, plain[1]))
        outs = {"bf16 KV, bf16 attention": o16,
                "e4m3 KV (fixed scales), bf16 attention": merge_attention(*dense(0, q, stored[0]),
                                                                          *dense(0, q, stored[1])),
                "e4m3 KV (fixed scales), FP8 attention": merge_attention(*fp8(0, q, stored[0]), *fp8(0, q, stored[1])),
                "bf16 KV quantised per call, FP8 attention": merge_attention(*fp8(0, q, plain[0]),
                                                                             *fp8(0, q, plain[1]))}
        for name, out in outs.items():
            rows.append(f"| {label} | {name} | {rel(out, o16):.4f} | {rel(out, ref):.4f} |")
        del q, k, v, ref, stored, plain, outs
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> int:
    """Print the variants' table and the real-size attention accuracy table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/liveavatar-14b.yaml")
    p.add_argument("--size", default="704*384", help="generation area W*H (default 704*384)")
    p.add_argument("--blocks", type=int, default=6, help="timed full-ring blocks per variant")
    p.add_argument("--warmup", type=int, default=2, help="full-ring blocks before timing (cuDNN plans, compile)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--skip-layers", type=int, nargs="*", default=[0, -1],
                   help="layers kept out of FP8 attention (default: first and last)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay full-ring steps as CUDA graphs")
    p.add_argument("--no-accuracy", action="store_true", help="skip the real-size attention accuracy table")
    args = p.parse_args()
    settings = load_settings(args.config)
    settings = settings.model_copy(update={"checkpoint_dir": None, "lora": None, "weights": None,
                                           "cuda_graphs": settings.cuda_graphs or args.cuda_graphs})
    stack = ProfileStack.from_settings(settings)
    dev = stack.device
    aw, ah = (int(v) for v in args.size.split("*"))
    h, w = generation_size((ah, aw), args.size, settings.video.size_multiple)
    lat_h, lat_w = h // 8, w // 8
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (smoke test)"
    print(f"{card}, torch {torch.__version__}, fp8 linears={settings.fp8}, compile={settings.compile}, "
          f"cuda_graphs={settings.cuda_graphs}, {w}×{h}, FP8 attention skips layers {args.skip_layers}; DiT only, "
          f"{stack.schedule.steps} steps, full ring + sink, median of {args.blocks} blocks after {args.warmup}\n")
    torch.set_grad_enabled(False)
    rows = {}
    for name in args.variants:
        kv, attention = VARIANTS[name]
        options = dataclasses.replace(stack.options, kv_cache_dtype=kv, attention=attention,
                                      fp8_attention_skip_layers=tuple(args.skip_layers))
        configure_attention(stack.dit, options, dev, stack.dtype)
        rows[name] = run_variant(stack, lat_h, lat_w, args.blocks, args.warmup)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        r = rows[name]
        print(f"{name}: {r['median_ms']:.0f} ms/block, peak {r['peak_gib']:.1f} GiB", flush=True)
    base = rows.get("bf16-kv/bf16-attn")
    print("\n| variant | KV storage | ms per block, median (max) | DiT-only FPS | KV GiB | peak allocated GiB "
          "| velocity rel err vs bf16/bf16 |")
    print("|---|---|---|---|---|---|---|")
    frames = stack.dit.config.frames_per_block * VAE_TEMPORAL_STRIDE
    for name, r in rows.items():
        err = f"{rel(r['velocity'], base['velocity']):.4f}" if base is not None else "–"
        print(f"| {name} | {r['kv_dtype']} | {r['median_ms']:.0f} ({r['max_ms']:.0f}) | "
              f"{frames * 1000 / r['median_ms']:.2f} | {r['kv_gib']:.2f} | {r['peak_gib']:.1f} | {err} |")
    if not args.no_accuracy:
        print("\n### One layer's self-attention at the real size (sink | ring merged by LSE), relative error\n")
        print("| data | precision | vs bf16 | vs float32 |")
        print("|---|---|---|---|")
        for line in attention_errors(stack.dit, lat_h, lat_w, dev):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
