"""CPU fast path of the Wan VAE (live/cpu_vae.py): same values as diffusers' modules, state dict unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

from model.config import VAEConfig
from model.vae import StreamingVAEDecoder, build_vae, denormalize_latents, encode_video
from model.vae_cpu import FastRMSNorm, speed_up_vae_

TOL = 1e-4


@pytest.fixture(scope="module")
def plain_vae():
    """The tiny profile's VAE shape (4 channels at full resolution, so frames get paired), random weights with
    non-trivial norm gains and biases."""
    torch.manual_seed(0)
    vae = build_vae(VAEConfig(base_dim=4, num_res_blocks=1)).eval().requires_grad_(False)
    for name, p in vae.named_parameters():
        if name.endswith("gamma"):
            p.uniform_(-1.5, 1.5)
        elif name.endswith("bias"):
            p.normal_(0, 0.1)
    return vae


@pytest.fixture(scope="module")
def fast_vae(plain_vae):
    return speed_up_vae_(copy.deepcopy(plain_vae))


def _latents(t: int, seed: int = 1, size: int = 6) -> torch.Tensor:
    return torch.randn(1, 16, t, size, size, generator=torch.Generator().manual_seed(seed))


def test_state_dict_is_unchanged(plain_vae, fast_vae):
    plain, fast = plain_vae.state_dict(), fast_vae.state_dict()
    assert plain.keys() == fast.keys()
    assert all(torch.equal(plain[k], fast[k]) for k in plain)


@pytest.mark.parametrize("split", [[1, 3, 3, 3], [4, 3, 3], [2, 1, 2, 5], [10]])
def test_streamed_decode_matches_diffusers_one_shot_decode(plain_vae, fast_vae, split):
    latents = _latents(sum(split))
    with torch.no_grad():
        reference = plain_vae.decode(denormalize_latents(plain_vae, latents)).sample.clamp(-1, 1)
    decoder = StreamingVAEDecoder(fast_vae)
    streamed = torch.cat([decoder.decode(chunk) for chunk in latents.split(split, dim=2)], dim=2)
    assert streamed.shape == reference.shape == (1, 3, 1 + 4 * (sum(split) - 1), 48, 48)
    assert (streamed - reference).abs().max().item() <= TOL
    assert (streamed.abs() < 1.0).any(), "output fully clamped: the comparison would prove nothing"


def test_cache_survives_other_decodes_on_the_same_vae(fast_vae):
    """A decoder's cache must not share memory that later work on the VAE overwrites."""
    latents = _latents(7, seed=2)
    decoder = StreamingVAEDecoder(fast_vae)
    decoder.decode(latents[:, :, :4])
    twin = copy.deepcopy(decoder)  # the cache as it is now, in memory of its own
    StreamingVAEDecoder(fast_vae).decode(_latents(4, seed=5))
    assert torch.equal(decoder.decode(latents[:, :, 4:]), twin.decode(latents[:, :, 4:]))


def test_encoder_and_plain_decode_match_diffusers(plain_vae, fast_vae):
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    assert (encode_video(fast_vae, video) - encode_video(plain_vae, video)).abs().max().item() <= TOL
    z = torch.randn(1, 16, 2, 4, 4)
    with torch.no_grad():
        assert (fast_vae.decode(z).sample - plain_vae.decode(z).sample).abs().max().item() <= TOL


def test_autograd_falls_back_to_differentiable_maths(plain_vae):
    """Training (train_tiny) runs the patched modules with autograd on."""
    plain = copy.deepcopy(plain_vae).requires_grad_(True)
    fast = speed_up_vae_(copy.deepcopy(plain)).requires_grad_(True)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    losses = []
    for vae in (plain, fast):
        recon = vae.decode(vae.encode(video).latent_dist.mode()).sample
        loss = recon.square().mean()
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    grads = dict(plain.named_parameters()), dict(fast.named_parameters())
    for name, p in grads[0].items():
        assert (p.grad - grads[1][name].grad).abs().max().item() <= 1e-4, name


@pytest.mark.parametrize("layout", ["ncdhw", "ndhwc", "paired", "image_nhwc"])
@pytest.mark.parametrize("bias", [False, True])
def test_fast_rms_norm_equals_wan_rms_norm_in_every_layout(layout, bias):
    torch.manual_seed(3)
    images = layout == "image_nhwc"
    plain = WanRMS_norm(4, images=images, bias=bias)
    with torch.no_grad():
        plain.gamma.uniform_(-2, 2)
        if bias:
            plain.bias.normal_()
    fast = copy.deepcopy(plain)
    fast.__class__ = FastRMSNorm
    x = torch.randn(1, 4, 6, 5, 7)
    x[0, :, 0, 0, 0] = 0.0  # a zero pixel: F.normalize's clamp keeps it at 0 (plus bias)
    if layout == "ndhwc":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif images:
        x = x[:, :, 0].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = plain(x)
    if layout == "paired":  # [1, 4, 3, 2, 5, 7] over memory [1, 3, 5, 7, 2, 4]
        x = x.permute(0, 2, 3, 4, 1).reshape(1, 3, 2, 5, 7, 4).permute(0, 1, 3, 4, 2, 5).contiguous()
        x = x.permute(0, 5, 1, 4, 2, 3)
        expected = expected.unflatten(2, (3, 2))
    with torch.no_grad():
        out = torch.empty_like(x)
        fast.normalize_into(x, out)
        assert (fast(x) - expected).abs().max().item() <= 1e-5
    assert (out - expected).abs().max().item() <= 1e-5


def test_non_float32_vae_falls_back_to_diffusers(plain_vae):
    plain = copy.deepcopy(plain_vae).to(torch.bfloat16)
    fast = speed_up_vae_(copy.deepcopy(plain))
    latents = _latents(4, size=2).to(torch.bfloat16)
    expected = torch.cat([StreamingVAEDecoder(plain).decode(c) for c in latents.split([1, 3], dim=2)], dim=2)
    streamed = torch.cat([StreamingVAEDecoder(fast).decode(c) for c in latents.split([1, 3], dim=2)], dim=2)
    assert torch.equal(streamed, expected)


def test_batch_of_two_streams_matches_diffusers(plain_vae, fast_vae):
    latents = torch.cat([_latents(4, seed=6, size=4), _latents(4, seed=7, size=4)])
    with torch.no_grad():
        reference = plain_vae.decode(denormalize_latents(plain_vae, latents)).sample.clamp(-1, 1)
    decoder = StreamingVAEDecoder(fast_vae)
    streamed = torch.cat([decoder.decode(chunk) for chunk in latents.split([1, 3], dim=2)], dim=2)
    assert (streamed - reference).abs().max().item() <= TOL
