"""FP8 (e4m3) cuDNN flash attention vs bf16 cuDNN SDPA at the DiT's self-attention shapes, on one CUDA GPU.

For 704×384 and 384×256: a block's queries (3 latent frames) over [sink | KV ring | the block itself] as the brief
counts them, and over [sink | ring] as model/dit.py runs it (the block's K/V are written into the ring); 40
heads × 128, batch 1. Prints a markdown table: bf16 cuDNN SDPA (torch, cuDNN backend) and bf16 with the
log-sum-exp; FP8 through :class:`model.attention_fp8.CudnnFP8Attention` as the kernel alone (e4m3 out), with the
output dequantised to bf16 (Q/K/V already FP8), with the log-sum-exp, and including Q/K/V quantisation (eager
torch); TFLOP/s, speed-ups, and the relative error ||o8 − o16|| / ||o16|| against the bf16 output on two data
sets: normal Q/K (RMS-normed tokens with per-channel gains) and the same with 8 outlier channels (a large common
offset, as in normed activations with massive channels), also with K smoothing. A second table scales one call
to one block (40 layers × 4 steps).

Usage (GPU machine, cuDNN frontend on PYTHONPATH): ``python3 bench/fp8_attention.py``.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kernels import timed as kernel_timed  # noqa: E402
from model.attention_fp8 import CudnnFP8Attention, attention_fp32, import_cudnn  # noqa: E402

DEV = "cuda"
HEADS, HD = 40, 128
LAYERS, STEPS = 40, 4
SIZES = (("704x384", 704, 384), ("384x256", 384, 256))  # width × height in pixels


def dit_geometry() -> tuple[int, int, int]:
    """(spatial patch, latent frames per block, ring frames) from model/config.py where it imports."""
    try:
        from model.config import DiTConfig

        c = DiTConfig()
        return c.patch_size[1], c.frames_per_block, c.kv_cache_frames
    except Exception:  # noqa: BLE001 -- the GPU image may lack pydantic; these are the 14B profile's values
        return 2, 3, 12


def sink_tokens(h: int, w: int) -> int:
    """``CausalS2VDiT.sink_tokens`` for a latent of h × w: reference T + FramePack T + T/4 + T/4 (= 2.5·T)."""
    try:
        from model.dit import CausalS2VDiT

        return CausalS2VDiT.sink_tokens(None, h, w)  # does not read self
    except Exception:  # noqa: BLE001 -- model.dit imports diffusers, which the GPU image may lack
        return 2 * (h // 2) * (w // 2) + (h // 4) * (w // 4) + 4 * (h // 8) * (w // 8)


def token_counts(width: int, height: int) -> dict[str, int]:
    """Latent = pixels / 8; patch 2×2 → (h/2)·(w/2) tokens per latent frame."""
    patch, frames, ring_frames = dit_geometry()
    h, w = height // 8, width // 8
    t = (h // patch) * (w // patch)
    return {"per_frame": t, "block": frames * t, "sink": sink_tokens(h, w), "ring": ring_frames * t}


def timed(fn, reps: int = 15, inner: int = 5, warm: int = 3) -> float:
    """:func:`bench.kernels.timed` with 5 back-to-back calls per timed run."""
    return kernel_timed(fn, reps=reps, warm=warm, inner=inner)


def host_us(fn, n: int = 20) -> float:
    """Host (CPU) microseconds per ``fn()`` call, without waiting for the GPU."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / n * 1e6


def make_qkv(sq: int, skv: int, outliers: bool, seed: int, heads: int = HEADS, hd: int = HD,
             dev: torch.device | str = DEV) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 ``[1, S, heads, hd]`` Q/K/V with realistic statistics: tokens RMS-normed over the full width (Wan's q/k
    norm) times per-channel gains (lognormal, σ 0.3); V unnormalised with gains. ``outliers``: 8 channels (in 4
    heads at the 14B width) of Q and K carry a common offset of 30 before the norm (~20x the rest after it), and 8 V
    channels a 20x gain."""
    g = torch.Generator(device=dev).manual_seed(seed)
    width = heads * hd
    gain = lambda: torch.exp(0.3 * torch.randn(width, device=dev, generator=g))  # noqa: E731
    offset = torch.zeros(width, device=dev)
    if outliers:
        offset[torch.tensor([3, 70, 600, 601, 2050, 2100, 4000, 4001], device=dev) % width] = 30.0

    def normed(n: int, gn: torch.Tensor) -> torch.Tensor:
        x = torch.randn(1, n, width, device=dev, generator=g) + offset
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * gn).view(1, n, heads, hd).bfloat16()

    q, k = normed(sq, gain()), normed(skv, gain())
    gv = gain()
    if outliers:
        gv[torch.tensor([10, 900, 901, 3000, 3001, 3002, 4500, 5000], device=dev) % width] *= 20.0
    v = (torch.randn(1, skv, width, device=dev, generator=g) * gv).view(1, skv, heads, hd).bfloat16()
    return q, k, v


def bhsd(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.transpose(1, 2) for t in ts)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def bf16_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(*bhsd(q, k, v)).transpose(1, 2)


def bf16_sdpa_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(*bhsd(q, k, v), None, True)[:2]
    return out, lse


def measure(attn: CudnnFP8Attention, label: str, sq: int, skv: int) -> dict:
    """Timings (normal data) and errors (normal and outlier data) for one shape."""
    flop = 4 * sq * skv * HEADS * HD
    row: dict = {"label": label, "sq": sq, "skv": skv, "flop": flop}
    q, k, v = make_qkv(sq, skv, outliers=False, seed=0)
    q8, k8, v8, qd, kd, vd = attn.quantize(q, k, v)
    row["bf16"] = timed(lambda: bf16_sdpa(q, k, v))
    row["bf16_lse"] = timed(lambda: bf16_sdpa_lse(q, k, v))
    row["fp8_kernel"] = timed(lambda: attn.forward_fp8(q8, k8, v8, qd, kd, vd))
    row["fp8_out"] = timed(lambda: attn(q8, k8, v8, qd, kd, vd))
    row["fp8_lse"] = timed(lambda: attn(q8, k8, v8, qd, kd, vd, return_lse=True))
    row["fp8_quant"] = timed(lambda: attn.attend(q, k, v))
    row["quant_only"] = timed(lambda: attn.quantize(q, k, v))
    row["host_bf16"] = host_us(lambda: bf16_sdpa(q, k, v))
    row["host_fp8"] = host_us(lambda: attn.forward_fp8(q8, k8, v8, qd, kd, vd))
    for kind, outliers in (("normal", False), ("outliers", True)):
        if outliers:
            q, k, v = make_qkv(sq, skv, outliers=True, seed=1)
        o16 = bf16_sdpa(q, k, v)
        o8, lse8 = attn.attend(q, k, v, return_lse=True)
        o8s = attn.attend(q, k, v, smooth_k=True)
        ref, ref_lse = attention_fp32(q, k, v)
        _, lse16 = bf16_sdpa_lse(q, k, v)
        assert torch.isfinite(o8).all() and torch.isfinite(lse8).all(), f"non-finite FP8 output ({kind})"
        row[f"err_{kind}"] = rel(o8, o16)
        row[f"err_smooth_{kind}"] = rel(o8s, o16)
        row[f"err32_fp8_{kind}"] = rel(o8, ref)
        row[f"err32_bf16_{kind}"] = rel(o16, ref)
        row[f"lse_{kind}"] = float((lse8 - ref_lse).abs().max())
        lse16 = lse16.float().reshape(1, HEADS, -1)[..., :sq]
        row[f"lse16_{kind}"] = float((lse16 - ref_lse).abs().max())
        del o16, o8, o8s, ref
    return row


def merge_check(attn: CudnnFP8Attention, c: dict) -> str:
    """The DiT's path: the block's queries over the sink and over the ring as two FP8 attentions merged by their
    log-sum-exp, against one bf16 SDPA over [sink | ring] (normal data)."""
    sq, sink, ring = c["block"], c["sink"], c["ring"]
    q, k, v = make_qkv(sq, sink + ring, outliers=False, seed=2)
    o16 = bf16_sdpa(q, k, v)
    (o1, l1), (o2, l2) = (attn.attend(q, k[:, sl], v[:, sl], return_lse=True)
                          for sl in (slice(0, sink), slice(sink, None)))
    w = torch.sigmoid(l1 - l2).transpose(1, 2).unsqueeze(-1)
    merged = o2.float() + (o1.float() - o2.float()) * w
    kq, vq = (t.contiguous() for t in (k, v))
    q8, k8, v8, qd, kd, vd = attn.quantize(q, kq, vq)
    ms_two = timed(lambda: (attn(q8, k8[:, :sink], v8[:, :sink], qd, kd, vd, return_lse=True),
                            attn(q8, k8[:, sink:], v8[:, sink:], qd, kd, vd, return_lse=True)))
    return (f"sink ({sink}) + ring ({ring}) as two FP8 attentions merged by LSE vs one bf16 SDPA over both: "
            f"rel err {rel(merged, o16):.4f}; the two FP8 calls (pre-quantised, bf16 out + LSE) {ms_two:.3f} ms")


def main() -> None:
    cudnn = import_cudnn()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version()}), cudnn-frontend {getattr(cudnn, '__version__', '?')}, "
          f"cudnn.backend_version() {cudnn.backend_version()}")
    attn = CudnnFP8Attention()
    dev = torch.device(DEV, torch.cuda.current_device())
    print(f"per-head Q/K descales in the cuDNN graph: {attn.per_head_qk(dev)} -- {attn.probe_notes.get(dev.index)}")
    rows, merges = [], []
    with torch.no_grad():
        for name, width, height in SIZES:
            c = token_counts(width, height)
            print(f"{name}: {c['per_frame']} tokens/latent frame, block {c['block']}, sink {c['sink']}, "
                  f"ring {c['ring']}")
            for label, skv in ((f"{name} sink+ring+block", c["sink"] + c["ring"] + c["block"]),
                               (f"{name} sink+ring (dit.py)", c["sink"] + c["ring"])):
                try:
                    rows.append(measure(attn, label, c["block"], skv))
                except Exception as exc:  # noqa: BLE001 -- keep measuring the other shapes
                    traceback.print_exc()
                    print(f"{label} failed: {type(exc).__name__}: {exc}")
            try:
                merges.append(f"{name}: " + merge_check(attn, c))
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                merges.append(f"{name}: merge check failed: {type(exc).__name__}: {exc}")
            torch.cuda.empty_cache()

    tf = lambda r, key: r["flop"] / r[key] / 1e9  # noqa: E731
    print("\n### One self-attention call (batch 1, 40 heads x 128), ms (TFLOP/s)\n")
    print("| shape | q x kv | bf16 cuDNN SDPA | bf16 + LSE | FP8 kernel (e4m3 out) | FP8 -> bf16 out, excl. QKV quant "
          "| FP8 + LSE, excl. quant | FP8 incl. QKV quant | QKV quant alone | speed-up kernel / excl. / incl. "
          "| rel err vs bf16: normal / outliers / outliers+smooth K | rel err vs fp32: bf16 / FP8 (normal; outliers) "
          "| max abs LSE err vs fp32: bf16 / FP8 (normal; outliers) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[k]:.3f} ({tf(r, k):.0f})" for k in ("bf16", "bf16_lse", "fp8_kernel", "fp8_out", "fp8_lse",
                                                          "fp8_quant")]
        speed = " / ".join(f"{r['bf16'] / r[k]:.2f}x" for k in ("fp8_kernel", "fp8_out", "fp8_quant"))
        err = f"{r['err_normal']:.4f} / {r['err_outliers']:.4f} / {r['err_smooth_outliers']:.4f}"
        err32 = (f"{r['err32_bf16_normal']:.4f} / {r['err32_fp8_normal']:.4f}; "
                 f"{r['err32_bf16_outliers']:.4f} / {r['err32_fp8_outliers']:.4f}")
        lse = (f"{r['lse16_normal']:.2e} / {r['lse_normal']:.2e}; {r['lse16_outliers']:.2e} / {r['lse_outliers']:.2e}")
        print(f"| {r['label']} | {r['sq']} x {r['skv']} | " + " | ".join(cells) +
              f" | {r['quant_only']:.3f} | {speed} | {err} | {err32} | {lse} |")

    print("\nHost time per call (CPU, not waiting for the GPU): " + "; ".join(
        f"{r['label']}: bf16 SDPA {r['host_bf16']:.0f} us, FP8 forward_fp8 {r['host_fp8']:.0f} us" for r in rows))

    n = LAYERS * STEPS
    print(f"\n### Per block: one call x {LAYERS} layers x {STEPS} steps = {n} calls, ms per block\n")
    print("| shape | bf16 cuDNN SDPA | bf16 + LSE | FP8 kernel | FP8 -> bf16, excl. quant | FP8 + LSE, excl. quant "
          "| FP8 incl. QKV quant | saved vs bf16 (kernel / excl. / incl.) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = " | ".join(f"{r[k] * n:.0f}" for k in ("bf16", "bf16_lse", "fp8_kernel", "fp8_out", "fp8_lse",
                                                       "fp8_quant"))
        saved = " / ".join(f"{(r['bf16'] - r[k]) * n:.0f}" for k in ("fp8_kernel", "fp8_out", "fp8_quant"))
        print(f"| {r['label']} | {cells} | {saved} |")
    print()
    for line in merges:
        print(line)


if __name__ == "__main__":
    main()
