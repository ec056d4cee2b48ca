"""Numerical parity with upstream Live Avatar (reference tensors recorded from the upstream code; see
tests/assets/parity/README.md for how). fp32, relative error ‖ours − ref‖ / ‖ref‖ ≤ 2e-6 (tight enough that a RoPE
table built without upstream's float16 rounding fails)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from live.engine.stream import ProfileStack, StreamEngine
from live.settings import load_settings
from model.config import DiTConfig, VAEConfig
from model.dit import CausalS2VDiT
from model.rope import apply_rope, rope_cos_sin
from model.sampler import FlowMatchSchedule
from model.vae import StreamingVAEDecoder, build_vae
from model.wan_vae_keys import wan_vae_to_diffusers

PARITY = Path(__file__).parents[1] / "assets" / "parity"
TOL = 2e-6


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).norm() / ref.float().norm())


@pytest.fixture(scope="module")
def recorded():
    stream = {k: v.float() if v.is_floating_point() else v for k, v in load_file(PARITY / "dit_stream.safetensors").items()}
    audio = {k: v.float() for k, v in load_file(PARITY / "audio_encoder.safetensors").items()}
    return stream, audio


@pytest.fixture(scope="module")
def dit() -> CausalS2VDiT:
    with safe_open(PARITY / "dit_weights.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["config"])
    cfg = DiTConfig(dim=meta["dim"], ffn_dim=meta["ffn_dim"], freq_dim=meta["freq_dim"], num_heads=meta["num_heads"],
                    num_layers=meta["num_layers"], text_dim=meta["text_dim"], text_len=meta["text_len"],
                    audio_dim=meta["audio_dim"], num_audio_layers=3,
                    audio_inject_layers=tuple(meta["audio_inject_layers"]), sink_rope_distance=17)
    model = CausalS2VDiT(cfg).eval()
    state = {k: v.float() for k, v in load_file(PARITY / "dit_weights.safetensors").items()}
    model.load_state_dict(state, strict=True)
    return model.requires_grad_(False)


def text_context(stream: dict, cfg: DiTConfig) -> torch.Tensor:
    ctx = stream["context"]
    padded = torch.zeros(1, cfg.text_len, cfg.text_dim)
    padded[0, : ctx.shape[0]] = ctx
    return padded


def test_audio_encoder_matches_upstream(dit, recorded):
    _, audio = recorded
    for b in range(6):
        tokens = dit.encode_audio(audio[f"block{b}.audio_input"])
        assert rel_err(tokens.global_, audio[f"block{b}.audio_emb_global"]) < TOL
        assert rel_err(tokens.local, audio[f"block{b}.audio_emb_local"]) < TOL


def test_sink_prefill_matches_upstream(dit, recorded):
    stream, _ = recorded
    cfg = dit.config
    caches = dit.new_caches(4, 16, 16)
    dit.prefill_sink(caches, stream["ref_latents"], stream["motion_latents"], dit.text_kv(text_context(stream, cfg)))
    cos, sin = rope_cos_sin(stream["sink.positions"], cfg.head_dim, cfg.rope_theta, cfg.rope_fp16_factors)
    recorded_factors = stream["sink.freqs"][:, :, 0], stream["sink.freqs"][:, :, 1]
    assert torch.equal(cos, recorded_factors[0]) and torch.equal(sin, recorded_factors[1])
    for layer in range(cfg.num_layers):
        k_ref, v_ref = stream[f"sink.layer{layer}.k"], stream[f"sink.layer{layer}.v"]
        n_ref = caches.ref_k.shape[2]
        assert rel_err(caches.ref_k[layer], k_ref[:, :n_ref]) < TOL  # reference keys kept un-roped
        assert rel_err(caches.sink_k[layer], apply_rope(k_ref, cos, sin)) < TOL
        assert rel_err(caches.sink_v[layer], v_ref) < TOL


def test_streaming_denoising_matches_upstream(dit, recorded):
    """Six blocks × 4 steps driven by the engine's own block loop (:meth:`StreamEngine.denoise`): warm KV rings,
    a ring wrap and the engine's sink refresh at block 4 (clip 1), the rolled reference position at block 5.
    Every recorded flow prediction (block1.step0 has a warm cache) and every block's final latents match."""
    stream, audio = recorded
    cfg = dit.config
    tiny = load_settings("configs/tiny.yaml", weights=None, device="cpu")
    settings = tiny.model_copy(update={"stream": tiny.stream.model_copy(update={"refresh_sink": True})})  # as upstream
    stack = ProfileStack(config=settings.model, options=settings.stack_options(), device=torch.device("cpu"),
                         dtype=torch.float32, dit=dit, vae=build_vae(VAEConfig(base_dim=4, num_res_blocks=0)),
                         wav2vec2=None, text_encoder=None, schedule=FlowMatchSchedule(4, 3.0), settings=settings)
    sched = stack.schedule
    assert torch.allclose(sched.timesteps, stream["timesteps"]) and torch.allclose(sched.sigmas, stream["sigmas"])
    assert dit.ref_position(5 * 3) == 32
    preds: dict[str, torch.Tensor] = {}
    forward_block = dit.forward_block

    def recording_forward(x, t, tokens, text_kv, caches, step, block_start):
        v = forward_block(x, t, tokens, text_kv, caches, step, block_start)
        preds[f"block{block_start // 3}.step{step}.flow_pred"] = v[0]
        return v

    engine = StreamEngine(stack, seed=0)
    engine.prefill(stream["ref_latents"], stream["motion_latents"], dit.text_kv(text_context(stream, cfg)))
    dit.forward_block = recording_forward
    try:
        for b in range(6):
            x = engine.denoise(b, dit.encode_audio(audio[f"block{b}.audio_input"]), stream[f"block{b}.noise"][None])
            assert rel_err(x[0], stream[f"block{b}.final"]) < TOL, f"block{b}.final"
    finally:
        del dit.forward_block
    recorded_preds = [k for k in stream if k.endswith(".flow_pred")]
    assert recorded_preds
    for key in recorded_preds:
        assert rel_err(preds[key], stream[key]) < TOL, key


def test_streaming_vae_decode_matches_upstream():
    recorded = {k: v.float() for k, v in load_file(PARITY / "vae_stream.safetensors").items()}
    cfg = VAEConfig(base_dim=4, num_res_blocks=0)
    vae = build_vae(cfg).eval()
    wan_state = {k: v.float() for k, v in load_file(PARITY / "vae_weights.safetensors").items()}
    vae.load_state_dict(wan_vae_to_diffusers(wan_state, cfg), strict=True)
    assert torch.allclose(torch.tensor(vae.config.latents_mean), recorded["latents_mean"])
    decoder = StreamingVAEDecoder(vae)
    for call in range(3):
        frames = decoder.decode(recorded[f"call{call}.latents"])
        assert rel_err(frames, recorded[f"call{call}.frames"]) < TOL, f"call{call}"
