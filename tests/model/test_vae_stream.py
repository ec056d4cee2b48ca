"""Wan VAE wrapper: normalisation, encode, and streaming decode equal to one-shot decode."""

from __future__ import annotations

import pytest
import torch

from model.config import VAEConfig
from model.vae import (
    StreamingVAEDecoder,
    build_vae,
    denormalize_latents,
    encode_video,
    normalize_latents,
    to_uint8_frames,
)

TINY = VAEConfig(base_dim=4, num_res_blocks=0)
TOL = 1e-4


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return build_vae(TINY).eval()


def _latents(t: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, t, 8, 8, generator=gen)


def _one_shot(vae, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(denormalize_latents(vae, latents)).sample


def _stream(decoder: StreamingVAEDecoder, latents: torch.Tensor, split: list[int]) -> list[torch.Tensor]:
    return [decoder.decode(chunk) for chunk in latents.split(split, dim=2)]


def test_build_vae_uses_config_architecture(vae):
    assert vae.config.base_dim == 4
    assert vae.config.num_res_blocks == 0
    assert vae.config.z_dim == 16
    assert list(vae.config.temperal_downsample) == [False, True, True]


@pytest.fixture(scope="module")
def one_shot_reference(vae):
    """One-shot diffusers decode of 9 latents. The VAE is causal, so decoding only the first t latents in one shot
    gives exactly this tensor's first 1 + 4(t-1) frames; every split below is compared against that prefix."""
    return _one_shot(vae, _latents(9))


@pytest.mark.parametrize("split", [[3, 3, 3], [1, 3, 3], [4, 4]])
def test_streamed_decode_matches_one_shot_decode(vae, one_shot_reference, split):
    chunks = _stream(StreamingVAEDecoder(vae), _latents(9)[:, :, : sum(split)], split)
    streamed = torch.cat(chunks, dim=2)
    reference = one_shot_reference[:, :, : 1 + 4 * (sum(split) - 1)]
    assert [c.shape[2] for c in chunks] == [1 + 4 * (split[0] - 1)] + [4 * t for t in split[1:]]
    assert streamed.shape == reference.shape
    assert streamed.shape[-2:] == (64, 64)
    assert (streamed - reference).abs().max().item() <= TOL
    assert streamed.abs().max() <= 1.0
    assert (streamed.abs() < 1.0).any(), "output fully clamped: the comparison would prove nothing"


def _count_decoder_calls(vae, monkeypatch) -> list[int]:
    """From now on, each call of ``vae.decoder`` appends the number of latent frames it got to the returned list."""
    calls: list[int] = []
    forward = vae.decoder.forward

    def spy(x, *args, **kwargs):
        calls.append(x.shape[2])
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(vae.decoder, "forward", spy)
    return calls


def test_a_chunk_is_one_decoder_call_and_equals_decoding_latent_by_latent(vae, monkeypatch):
    """After a stream's first latent (decoded alone, as diffusers does), each chunk is one call of the VAE's
    decoder over all its latents — and gives what one call per latent gives."""
    latents = _latents(7)
    per_latent = torch.cat(_stream(StreamingVAEDecoder(vae), latents, [1] * 7), dim=2)
    calls = _count_decoder_calls(vae, monkeypatch)
    chunked = torch.cat(_stream(StreamingVAEDecoder(vae), latents, [4, 3]), dim=2)
    assert calls == [1, 3, 3]
    assert (chunked - per_latent).abs().max().item() <= TOL


def test_two_interleaved_streams_on_one_vae_equal_two_separate_streams(vae):
    a, b = _latents(6, seed=2), _latents(6, seed=3)
    separate_a = torch.cat(_stream(StreamingVAEDecoder(vae), a, [3, 3]), dim=2)
    separate_b = torch.cat(_stream(StreamingVAEDecoder(vae), b, [3, 3]), dim=2)

    dec_a, dec_b = StreamingVAEDecoder(vae), StreamingVAEDecoder(vae)
    a1, b1 = dec_a.decode(a[:, :, :3]), dec_b.decode(b[:, :, :3])
    _one_shot(vae, a[:, :, :1])  # a plain decode on the shared module (it clears the VAE's cache) disturbs neither
    a2, b2 = dec_a.decode(a[:, :, 3:]), dec_b.decode(b[:, :, 3:])

    assert torch.equal(torch.cat([a1, a2], dim=2), separate_a)
    assert torch.equal(torch.cat([b1, b2], dim=2), separate_b)


def test_reset_starts_a_new_stream(vae):
    latents = _latents(2)
    decoder = StreamingVAEDecoder(vae)
    fresh = decoder.decode(latents)
    decoder.decode(_latents(1, seed=4))
    decoder.reset()
    assert torch.equal(decoder.decode(latents), fresh)


def test_shape_change_mid_stream_is_rejected(vae):
    decoder = StreamingVAEDecoder(vae)
    decoder.decode(_latents(1))
    with pytest.raises(ValueError, match="reset"):
        decoder.decode(torch.zeros(1, 16, 1, 4, 4))


def test_normalize_and_denormalize_use_wan_latent_stats_and_round_trip(vae):
    raw = torch.randn(2, 16, 3, 4, 4)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    normalized = normalize_latents(vae, raw)
    assert torch.allclose(normalized, (raw - mean) / std)
    assert vae.config.latents_mean[0] == pytest.approx(-0.7571)
    assert vae.config.latents_std[0] == pytest.approx(2.8184)
    assert torch.allclose(denormalize_latents(vae, normalized), raw, atol=1e-6)


@pytest.fixture(scope="module")
def encoding_vae():
    torch.manual_seed(0)
    return build_vae(VAEConfig(base_dim=4, num_res_blocks=1)).eval()


def test_encode_video_returns_normalized_posterior_mean(encoding_vae):
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    latents = encode_video(encoding_vae, video)
    assert latents.shape == (1, 16, 2, 4, 4)
    with torch.no_grad():
        mu = encoding_vae.encode(video).latent_dist.mode()
    assert torch.allclose(latents, normalize_latents(encoding_vae, mu))
    assert torch.equal(encode_video(encoding_vae, video), latents), "encode must be deterministic (no sampling)"


def test_encode_video_rejects_frame_counts_that_are_not_one_plus_four_k(encoding_vae):
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        encode_video(encoding_vae, torch.zeros(1, 3, 8, 32, 32))


def test_encode_video_explains_that_a_vae_without_res_blocks_cannot_encode(vae):
    with pytest.raises(ValueError, match="num_res_blocks >= 1"):
        encode_video(vae, torch.zeros(1, 3, 1, 64, 64))


def test_to_uint8_frames_maps_minus_one_to_zero_and_one_to_255_channels_last():
    frames = torch.stack([torch.full((2, 4, 5), v) for v in (-1.0, 0.0, 1.0)]).unsqueeze(0)
    frames = torch.cat([frames, torch.full_like(frames, 5.0)])  # batch 1 is ignored
    pixels = to_uint8_frames(frames)
    assert pixels.dtype == torch.uint8
    assert pixels.shape == (2, 4, 5, 3)
    assert pixels[0, 0, 0].tolist() == [0, 128, 255]


def test_latents_per_call_bounds_each_decoder_call(vae, monkeypatch):
    """``latents_per_call`` splits a chunk into bounded decoder calls (the GPU default is 1), same frames."""
    latents = _latents(7)
    whole = torch.cat(_stream(StreamingVAEDecoder(vae), latents, [4, 3]), dim=2)
    calls = _count_decoder_calls(vae, monkeypatch)
    bounded = torch.cat(_stream(StreamingVAEDecoder(vae, latents_per_call=2), latents, [4, 3]), dim=2)
    assert calls == [1, 2, 1, 2, 1]
    assert (bounded - whole).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="latents_per_call"):
        StreamingVAEDecoder(vae, latents_per_call=0)
