"""Kernel-level measurements on one CUDA GPU for the 14B DiT at 704×384 (one block = 3168 query tokens).

Prints, in this order: the bf16 GEMM ceiling (8192³) and the copy bandwidth; the DiT's GEMM shapes in bf16 and
in FP8 (per-tensor and row-wise scales, with and without fast accumulation, raw ``torch._scaled_mm``) and the
whole :class:`model.fp8.FP8Linear` (activation quantisation included); self-attention over [sink | full ring]
as one cuDNN SDPA on the concatenation versus two LSE attentions merged (with the relative difference); and the
streaming VAE decode of one block with ``torch.backends.cudnn.benchmark`` off and on.

Usage (on the GPU machine): ``python3 bench/kernels.py [ceilings gemms attention vae_decode]``.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.attention import LseAttention, merge_attention  # noqa: E402
from model.fp8 import FP8Linear, quantize  # noqa: E402

DEV = "cuda"
T, SINK, RING, HEADS, HD, DIM, FFN = 1056, 2640, 12672, 40, 128, 5120, 13824
N = 3 * T


def timed(fn, reps: int = 20, warm: int = 3, inner: int = 1) -> float:
    """Milliseconds per ``fn()``: median over ``reps`` event-timed runs of ``inner`` back-to-back calls (several
    let the host's per-call work overlap the GPU, as in a model loop)."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return statistics.median(times)


def ceilings() -> None:
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    ms = timed(lambda: a @ b)
    print(f"bf16 GEMM 8192^3: {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s ({ms:.2f} ms)")
    x = torch.empty(2**30 // 2, device=DEV, dtype=torch.bfloat16).normal_()
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x))
    print(f"device copy 1 GiB: {2 * 2**30 / ms / 1e6:.0f} GB/s read+write")


def gemms() -> None:
    print("\nGEMM shapes of one block (M = 3168 tokens): ms and TFLOP/s")
    print("| shape MxKxN | bf16 | fp8 tensor | fp8 tensor fast | fp8 row | fp8 row fast | FP8Linear row (incl. quant) "
          "| FP8Linear tensor |")
    print("|---|---|---|---|---|---|---|---|")
    for k, n in ((DIM, DIM), (DIM, FFN), (FFN, DIM)):
        x = torch.randn(N, k, device=DEV, dtype=torch.bfloat16)
        lin = torch.nn.Linear(k, n, device=DEV, dtype=torch.bfloat16)
        flop = 2 * N * k * n
        cells = []
        ms = timed(lambda: lin(x))
        cells.append(f"{ms:.3f} ({flop / ms / 1e9:.0f})")
        for rowwise in (False, True):
            xq, xs = quantize(x, rowwise)
            wq, ws = quantize(lin.weight, rowwise)
            sa, sb = (xs, ws.reshape(1, -1)) if rowwise else (xs.reshape(()), ws.reshape(()))
            for fast in (False, True):
                try:
                    fn = lambda: torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=sb, bias=lin.bias,  # noqa: E731
                                                  out_dtype=torch.bfloat16, use_fast_accum=fast)
                    ms = timed(fn)
                    cells.append(f"{ms:.3f} ({flop / ms / 1e9:.0f})")
                except RuntimeError as exc:
                    cells.append("error: " + str(exc).splitlines()[0][:60])
        for rowwise in (True, False):
            layer = FP8Linear.from_linear(lin, rowwise)
            ms = timed(lambda: layer(x))
            cells.append(f"{ms:.3f} ({flop / ms / 1e9:.0f})")
        print(f"| {N}x{k}x{n} | " + " | ".join(cells) + " |")


def attention() -> None:
    print("\nSelf-attention, 3168 queries over sink 2640 + full ring 12672 keys, 40 heads x 128, bf16")
    g = torch.Generator(device=DEV).manual_seed(0)

    def r(n: int) -> torch.Tensor:
        return torch.randn(1, n, HEADS, HD, device=DEV, dtype=torch.bfloat16, generator=g).transpose(1, 2)

    q, sk, sv, rk, rv = r(N), r(SINK), r(SINK), r(RING), r(RING)
    ck, cv = torch.cat([sk, rk], 2), torch.cat([sv, rv], 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flop = 4 * N * (SINK + RING) * HEADS * HD
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel([backend]):
            ms = timed(lambda: F.scaled_dot_product_attention(q, ck, cv))
        print(f"one SDPA over the concatenation, {name}: {ms:.3f} ms ({flop / ms / 1e9:.0f} TFLOP/s)")
    attention_lse = LseAttention()
    print(f"LSE backend chosen: {attention_lse.backend(torch.bfloat16)}")
    split = lambda: merge_attention(*attention_lse(q, sk, sv), *attention_lse(q, rk, rv))  # noqa: E731
    ms = timed(split)
    print(f"sink + ring, two LSE attentions + merge: {ms:.3f} ms ({flop / ms / 1e9:.0f} TFLOP/s)")
    ms = timed(lambda: attention_lse(q, rk, rv))
    print(f"  ring part alone: {ms:.3f} ms; concatenating K and V per layer instead would copy "
          f"{2 * ck.numel() * 2 / 2**20:.0f} MiB")
    ref = F.scaled_dot_product_attention(q.float(), ck.float(), cv.float())
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        one = F.scaled_dot_product_attention(q, ck, cv).float()
    got = split()
    print(f"relative error vs fp32 reference: merged {float((got - ref).norm() / ref.norm()):.2e}, "
          f"single cuDNN call {float((one - ref).norm() / ref.norm()):.2e}")


def vae_decode() -> None:
    from model.config import VAEConfig
    from model.vae import StreamingVAEDecoder, build_vae

    print("\nStreaming VAE decode (Wan2.1 VAE, bf16) at 704x384: one block = 3 latents -> 12 frames")
    vae = build_vae(VAEConfig()).to(DEV, torch.bfloat16).eval()
    g = torch.Generator(device=DEV).manual_seed(0)
    for bench_mode, fmt in ((False, None), (True, None), (False, torch.channels_last_3d), (True, torch.channels_last_3d)):
        torch.backends.cudnn.benchmark = bench_mode
        if fmt is not None:  # only the 5-D conv weights can take the layout
            for m in vae.modules():
                if isinstance(m, torch.nn.Conv3d):
                    m.weight.data = m.weight.data.contiguous(memory_format=fmt)
        dec = StreamingVAEDecoder(vae)
        dec.decode(torch.randn(1, 16, 7, 48, 88, device=DEV, dtype=torch.bfloat16, generator=g))
        lat = torch.randn(1, 16, 3, 48, 88, device=DEV, dtype=torch.bfloat16, generator=g)
        ms = timed(lambda: dec.decode(lat), reps=5, warm=2)
        print(f"cudnn.benchmark={bench_mode}, weights {fmt or 'contiguous'}: {ms:.1f} ms per block, {ms / 12:.2f} ms/frame")
    torch.backends.cudnn.benchmark = False


if __name__ == "__main__":
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    with torch.no_grad():
        parts = [globals()[name] for name in sys.argv[1:]] or [ceilings, gemms, attention, vae_decode]
        for part in parts:
            try:
                part()
            except Exception as exc:  # noqa: BLE001 - keep measuring the other parts; the log shows what broke
                print(f"{part.__name__} failed: {type(exc).__name__}: {exc}")
