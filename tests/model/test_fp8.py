"""FP8 linear layers: quantisation arithmetic, the layer swap and its exemptions, and (on CUDA) the fused GEMM."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.config import DiTConfig
from model.dit import CausalS2VDiT
from model.fp8 import E4M3, E4M3_MAX, FP8Linear, dequantize, quantize, quantize_dit_
from model.init import build_random

TINY = DiTConfig(dim=64, ffn_dim=128, freq_dim=32, num_heads=2, num_layers=4, text_dim=32, text_len=16,
                 audio_dim=32, num_audio_layers=3, audio_inject_layers=(0, 2, 3))


@pytest.mark.parametrize("rowwise", [True, False])
def test_quantize_roundtrip_within_e4m3_rounding(rowwise):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-2, 2, 64)[:, None]
    q, scale = quantize(x, rowwise)
    assert q.dtype == E4M3 and scale.dtype == torch.float32
    assert scale.shape == ((64, 1) if rowwise else (1, 1))
    back = dequantize(q, scale)
    # 3 mantissa bits: half an ulp is 1/16 of the value; below e4m3's normal range the spacing is scale·2^-9.
    assert torch.all((back - x).abs() <= x.abs() / 16 + scale * 2.0**-9)
    amax = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax()
    assert torch.allclose(q.float().abs().amax(dim=-1, keepdim=True) if rowwise else q.float().abs().amax(),
                          torch.full_like(amax, E4M3_MAX))


def test_fp8_linear_close_to_float_linear_and_keeps_no_float_weight():
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    x = torch.randn(3, 40, 256)
    with torch.no_grad():
        ref = lin(x)
    fp8 = FP8Linear.from_linear(lin)
    assert fp8.weight.dtype == E4M3 and fp8.compute_dtype == torch.float32
    assert not any(t.dtype.is_floating_point and t.dtype != E4M3 and t.numel() == lin.weight.numel()
                   for t in fp8.state_dict().values())
    with torch.no_grad():
        out = fp8(x)
    assert out.shape == ref.shape
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 0.05, rel


def test_quantize_dit_swaps_blocks_and_injectors_but_not_exempt_layers():
    dit = build_random(lambda: CausalS2VDiT(TINY), torch.device("cpu"), torch.float32, seed=0)
    n_inject = len(TINY.audio_inject_layers)
    expected = TINY.num_layers * 10 + n_inject * 5  # q,k,v,o ×2 + ffn ×2; injector q,k,v,o + AdaLN linear
    assert quantize_dit_(dit) == expected
    for name, module in dit.named_modules():
        if name.startswith(("blocks.", "audio_injector.")):
            assert not isinstance(module, nn.Linear), name
    for name in ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1",
                 "head.head", "casual_audio_encoder.encoder.final_linear"):
        assert type(dit.get_submodule(name)) is nn.Linear, name


def test_engine_runs_with_fp8_setting(tiny_settings):
    from live.engine.stream import ProfileStack, StreamEngine
    from tests.conftest import make_speechlike

    stack = ProfileStack.from_settings(tiny_settings.model_copy(update={"fp8": True}))
    assert isinstance(stack.dit.blocks[0].ffn[0], FP8Linear)
    eng = StreamEngine(stack)
    eng.start()
    eng.push_audio(make_speechlike(1.0))
    eng.generate_block()
    eng.wait_decoded()  # with the decode overlapped (auto on a CPU) the call returns once the block is denoised
    assert len(eng.ring) == eng.frames_per_block - eng.drop_first
    frame = eng.ring.get_nowait()
    assert frame is not None and frame.dtype == torch.uint8
    eng.close()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a GPU with FP8 tensor cores")
@pytest.mark.parametrize("rowwise", [True, False])
def test_scaled_mm_matches_emulated_product(rowwise):
    torch.manual_seed(0)
    lin = nn.Linear(512, 256).cuda().bfloat16()
    fp8 = FP8Linear.from_linear(lin, rowwise)
    x = torch.randn(2, 37, 512, device="cuda", dtype=torch.bfloat16)
    got = fp8(x).float()
    xq, xs = quantize(x.reshape(-1, 512), rowwise)
    want = (dequantize(xq, xs) @ dequantize(fp8.weight, fp8.weight_scale).T + fp8.bias.float()).reshape(2, 37, 256)
    assert float((got - want).norm() / want.norm()) < 1e-2
