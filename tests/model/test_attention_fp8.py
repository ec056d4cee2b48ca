"""FP8 attention (model/attention_fp8.py): per-head e4m3 quantisation, the float32 reference, and (CUDA with
cuDNN's frontend only) the fused cuDNN kernel against that reference.

Tolerances. One e4m3 value carries a relative rounding error of at most 2^-4 (3 mantissa bits; ≈ 2^-4/√3 ≈ 0.036
rms). In attention with unit-variance scores, V's error reaches the output at about that size and Q·K's error
moves the softmax weights by about as much, so ≈ √2 · 0.036 ≈ 0.05 is expected (0.045-0.048 measured on these
shapes); 0.08 bounds it with margin, while an unquantised path (≈ 1e-7) or a wrong scale (O(1)) fails. The
cuDNN kernel also rounds P (averaged over keys) and O (≤ 2^-4 relative per element) to e4m3, hence ≤ 0.06
between kernel and reference from the same FP8 inputs.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from model.attention_fp8 import (
    E4M3,
    E4M3_MAX,
    CudnnFP8Attention,
    _fold_qk_scales,
    attention_fp32,
    dequantize_heads,
    import_cudnn,
    quantize_heads,
    quantize_qkv,
    sdpa_fp8_reference,
    smooth_keys,
)

REF_TOL = 0.08
KERNEL_TOL = 0.06


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _randn(*shape: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator(device=device).manual_seed(seed), device=device)


@pytest.mark.parametrize("per_head", [True, False])
def test_quantize_roundtrip_within_e4m3_rounding(per_head):
    x = _randn(2, 64, 4, 128) * torch.logspace(-2, 2, 4).reshape(1, 1, 4, 1)
    x8, descale = quantize_heads(x, per_head=per_head)
    assert x8.dtype == E4M3 and x8.shape == x.shape and descale.dtype == torch.float32
    assert descale.shape == ((2, 4) if per_head else (1, 1))
    back = dequantize_heads(x8, descale)
    d = descale.reshape(2, 1, 4, 1) if per_head else descale.reshape(1, 1, 1, 1)
    # half an ulp is 1/16 of the value in e4m3's normal range; below it the spacing is descale·2^-9
    assert torch.all((back - x).abs() <= x.abs() / 16 + d * 2.0**-9)
    amax = x8.float().abs().amax(dim=(1, 3)) if per_head else x8.float().abs().amax()
    assert torch.all(amax == E4M3_MAX)  # each scale maps its own largest magnitude onto 448


@pytest.mark.parametrize("factor", [100.0, 1e4])
def test_per_head_scales_isolate_a_large_head(factor):
    x = _randn(1, 256, 4, 128, seed=1)
    big = x.clone()
    big[:, :, 1] *= factor
    x8, d = quantize_heads(x)
    b8, bd = quantize_heads(big)
    others = [0, 2, 3]
    # the other heads are quantised exactly as without the large head, and the large head's scale follows it
    assert torch.equal(b8[:, :, others].view(torch.uint8), x8[:, :, others].view(torch.uint8))
    assert torch.equal(bd[:, others], d[:, others])
    torch.testing.assert_close(bd[:, 1], d[:, 1] * factor, rtol=1e-6, atol=0)
    err = [_rel(dequantize_heads(b8, bd)[:, :, h], big[:, :, h]) for h in others]
    assert max(err) < 0.03
    if factor >= 1e4:  # one scale for the whole tensor pushes the small heads into e4m3's subnormals
        t8, td = quantize_heads(big, per_head=False)
        err_t = [_rel(dequantize_heads(t8, td)[:, :, h], big[:, :, h]) for h in others]
        assert min(err_t) > 1.5 * max(err)


def test_fp32_attention_matches_torch_sdpa():
    q, k, v = _randn(2, 40, 3, 64, seed=2), _randn(2, 70, 3, 64, seed=3), _randn(2, 70, 3, 64, seed=4)
    out, lse = attention_fp32(q, k, v)
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8.0
    torch.testing.assert_close(lse, torch.logsumexp(s, dim=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 96, 300, 4, 128), (2, 64, 129, 3, 64)])
@pytest.mark.parametrize("per_head_qk", [True, False])
def test_reference_fp8_attention_close_to_fp32(shape, per_head_qk):
    b, sq, skv, h, d = shape
    q, k, v = _randn(b, sq, h, d, seed=5), _randn(b, skv, h, d, seed=6), _randn(b, skv, h, d, seed=7)
    ref, ref_lse = attention_fp32(q, k, v)
    q8, k8, v8, qd, kd, vd = quantize_qkv(q, k, v, per_head_qk=per_head_qk)
    assert (qd.shape == (b, h)) == per_head_qk and kd.numel() == (b * h if per_head_qk else 1)
    out, lse = sdpa_fp8_reference(q8, k8, v8, qd, kd, vd, return_lse=True, out_dtype=torch.float32)
    err = _rel(out, ref)
    assert 1e-3 < err < REF_TOL  # really quantised, and within e4m3 rounding
    assert float((lse - ref_lse).abs().max()) < 0.1
    assert sdpa_fp8_reference(q8, k8, v8, qd, kd, vd).dtype == torch.bfloat16


def test_reference_large_head_leaves_other_heads_alone():
    q, k, v = _randn(1, 80, 4, 128, seed=8), _randn(1, 200, 4, 128, seed=9), _randn(1, 200, 4, 128, seed=10)
    base = sdpa_fp8_reference(*quantize_qkv(q, k, v), out_dtype=torch.float32)
    big = [t.clone() for t in (q, k, v)]
    for t in big:
        t[:, :, 2] *= 100.0
    out = sdpa_fp8_reference(*quantize_qkv(*big), out_dtype=torch.float32)
    others = [0, 1, 3]
    assert torch.equal(out[:, :, others], base[:, :, others])
    ref = attention_fp32(q, k, v)[0]
    assert _rel(out[:, :, others], ref[:, :, others]) < REF_TOL


def test_folding_qk_scales_keeps_the_scores():
    """The cuDNN fallback for backends without per-head Q/K descales: fold them into Q (one more rounding)."""
    mags = torch.tensor([1.0, 3.0, 0.5, 2.0]).reshape(1, 1, 4, 1)
    q, k = _randn(1, 64, 4, 128, seed=11) * mags, _randn(1, 150, 4, 128, seed=12) / mags
    v = _randn(1, 150, 4, 128, seed=13)
    q8, k8, v8, qd, kd, vd = quantize_qkv(q, k, v)
    fq8, fqd, fkd = _fold_qk_scales(q8, qd, kd)
    assert fq8.dtype == E4M3 and fqd.numel() == 1 and float(fkd) == 1.0
    per_head = sdpa_fp8_reference(q8, k8, v8, qd, kd, vd, out_dtype=torch.float32)
    folded = sdpa_fp8_reference(fq8, k8, v8, fqd, fkd, vd, out_dtype=torch.float32)
    assert _rel(folded, per_head) < 0.05
    assert _rel(folded, attention_fp32(q, k, v)[0]) < REF_TOL


def test_lse_merges_two_key_sets():
    """The log-sum-exp is [B, H, Sq] natural log of the scaled scores, as model.attention.merge_attention needs."""
    q, k, v = _randn(1, 50, 2, 64, seed=14), _randn(1, 120, 2, 64, seed=15), _randn(1, 120, 2, 64, seed=16)
    q8, k8, v8, qd, kd, vd = quantize_qkv(q, k, v)
    whole = sdpa_fp8_reference(q8, k8, v8, qd, kd, vd, out_dtype=torch.float32)
    o1, l1 = sdpa_fp8_reference(q8, k8[:, :45], v8[:, :45], qd, kd, vd, return_lse=True, out_dtype=torch.float32)
    o2, l2 = sdpa_fp8_reference(q8, k8[:, 45:], v8[:, 45:], qd, kd, vd, return_lse=True, out_dtype=torch.float32)
    assert l1.shape == (1, 2, 50)
    w = torch.sigmoid(l1 - l2).transpose(1, 2).unsqueeze(-1)  # [B, Sq, H, 1]
    torch.testing.assert_close(o2 + (o1 - o2) * w, whole, rtol=1e-5, atol=1e-5)


def _normed_with_outliers(n: int, seed: int, heads: int = 4, hd: int = 128) -> torch.Tensor:
    """Tokens RMS-normalised over the full width (as WanRMSNorm does) with 4 channels carrying a large common
    offset (~20x the other channels after the norm)."""
    x = _randn(1, n, heads * hd, seed=seed)
    x[..., [5, 130, 300, 301]] += 30.0
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).view(1, n, heads, hd)


def test_smoothing_keys_is_exact_and_rescues_outlier_channels():
    q, k, v = _normed_with_outliers(128, 17), _normed_with_outliers(400, 18), _randn(1, 400, 4, 128, seed=19)
    ref, ref_lse = attention_fp32(q, k, v)
    ks, shift = smooth_keys(q, k)
    out, lse = attention_fp32(q, ks, v)  # exact: each query's scores move by one constant
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse + shift, ref_lse, rtol=1e-5, atol=1e-4)
    plain = sdpa_fp8_reference(*quantize_qkv(q, k, v), out_dtype=torch.float32)
    smooth, lse8 = sdpa_fp8_reference(*quantize_qkv(q, ks, v), return_lse=True, out_dtype=torch.float32)
    # K's offset channels set its scale and their rounding (8% at the top of e4m3's range) swamps the scores
    assert _rel(plain, ref) > 0.1
    assert _rel(smooth, ref) < REF_TOL
    assert float((lse8 + shift - ref_lse).abs().max()) < 0.05


def test_module_imports_without_cudnn():
    attn = CudnnFP8Attention(per_head_qk=False)  # construction needs neither CUDA nor the cuDNN frontend
    assert attn.per_head_qk(torch.device("cpu")) is False
    if importlib.util.find_spec("cudnn") is None:
        with pytest.raises(ImportError, match="nvidia-cudnn-frontend"):
            import_cudnn()


def _cudnn_ready() -> bool:
    return (torch.cuda.is_available() and importlib.util.find_spec("cudnn") is not None
            and torch.cuda.get_device_capability()[0] >= 9)


@pytest.mark.skipif(not _cudnn_ready(), reason="needs a Hopper-or-newer CUDA GPU and nvidia-cudnn-frontend")
@pytest.mark.parametrize("per_head_qk", [None, False])
def test_cudnn_fp8_attention_matches_reference(per_head_qk):
    dev = "cuda"
    mags = torch.tensor([1.0, 10.0, 0.3, 2.0, 1.0, 1.0, 0.5, 3.0], device=dev).reshape(1, 1, 8, 1)
    q = _randn(1, 300, 8, 128, seed=20, device=dev) * mags
    k = _randn(1, 700, 8, 128, seed=21, device=dev) / mags.sqrt()
    v = _randn(1, 700, 8, 128, seed=22, device=dev) * mags
    attn = CudnnFP8Attention(per_head_qk=per_head_qk)
    q8, k8, v8, qd, kd, vd = attn.quantize(q, k, v)
    ref, ref_lse = sdpa_fp8_reference(q8, k8, v8, qd, kd, vd, return_lse=True, out_dtype=torch.float32)
    out, lse = attn(q8, k8, v8, qd, kd, vd, return_lse=True)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape and lse.shape == (1, 8, 300)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    err = _rel(out, ref)
    lse_err = float((lse - ref_lse).abs().max())
    print(f"per_head_qk={attn.per_head_qk(q.device)} ({attn.probe_notes}); rel err {err:.4f}, lse err {lse_err:.2e}")
    assert err < KERNEL_TOL
    assert lse_err < 0.05
    assert _rel(out, attention_fp32(q, k, v)[0]) < REF_TOL + KERNEL_TOL
    # sink | ring split merged by the kernel's log-sum-exp equals one attention over both
    (o1, l1), (o2, l2) = (attn.attend(q, k[:, sl], v[:, sl], return_lse=True)
                          for sl in (slice(0, 260), slice(260, None)))
    w = torch.sigmoid(l1 - l2).transpose(1, 2).unsqueeze(-1)
    merged = o2.float() + (o1.float() - o2.float()) * w
    assert _rel(merged, attention_fp32(q, k, v)[0]) < REF_TOL + KERNEL_TOL
    # FP8 output with its descale; a second call reuses the cached graph
    o8, o_descale, none = attn.forward_fp8(q8, k8, v8, qd, kd, vd)
    assert o8.dtype == E4M3 and o_descale.shape == (1, 8) and none is None
    assert _rel(dequantize_heads(o8, o_descale), ref) < KERNEL_TOL


@pytest.mark.skipif(not _cudnn_ready(), reason="needs a Hopper-or-newer CUDA GPU and nvidia-cudnn-frontend")
def test_cudnn_smooth_k_with_outlier_channels():
    q, k, v = (t.cuda() for t in (_normed_with_outliers(256, 23), _normed_with_outliers(640, 24),
                                   _randn(1, 640, 4, 128, seed=25)))
    ref, ref_lse = attention_fp32(q, k, v)
    attn = CudnnFP8Attention()
    out, lse = attn.attend(q, k, v, return_lse=True, smooth_k=True)
    assert _rel(out, ref) < REF_TOL + KERNEL_TOL
    assert float((lse - ref_lse).abs().max()) < 0.1
