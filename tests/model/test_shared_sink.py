"""One sink shared by all denoising steps gives the same outputs as a [sink | ring] buffer per step.

The reference below is the original per-step-buffer implementation (sink duplicated into each step's buffer,
one attention over the concatenation), written out with the block's own sub-modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.attention import LseAttention, merge_attention
from model.config import DiTConfig
from model.dit import MOTION_MASK_ID, NOISY_MASK_ID, REF_MASK_ID, CausalS2VDiT
from model.init import build_random
from model.rope import apply_rope, grid_positions, rope_cos_sin

CFG = DiTConfig(dim=64, ffn_dim=128, freq_dim=32, num_heads=2, num_layers=4, text_dim=32, text_len=16,
                audio_dim=32, num_audio_layers=3, audio_inject_layers=(0, 2, 3))


def _old_block(blk, x, e, attend_self, text_kv):
    shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = (blk.modulation.float() + e).chunk(6, dim=1)
    y = attend_self(blk.norm1(x) * (1 + scale_msa) + shift_msa)
    x = x + y.float() * gate_msa
    x = x + blk.cross_attn.cross(blk.norm3(x), text_kv).float()
    y = blk.ffn((blk.norm2(x) * (1 + scale_ffn) + shift_ffn).to(blk.ffn[0].weight.dtype))
    return x + y.float() * gate_ffn


class OldCaches:
    def __init__(self, dit: CausalS2VDiT, steps: int, h: int, w: int) -> None:
        c = dit.config
        self.tokens_per_frame = dit.tokens_per_frame(h, w)
        self.sink_tokens = dit.sink_tokens(h, w)
        self.ring_tokens = c.kv_cache_frames * self.tokens_per_frame
        shape = (steps, c.num_layers, 1, self.sink_tokens + self.ring_tokens, c.num_heads, c.head_dim)
        self.k, self.v = torch.zeros(shape), torch.zeros(shape)
        self.ref_k = torch.zeros((c.num_layers, 1, self.tokens_per_frame) + shape[-2:])
        self.frames_written = [0] * steps


def old_prefill(dit, caches, ref_latent, motion_latents, text_kv):
    c = dit.config
    ref_tokens, (_, hp, wp) = dit._patchify(dit.patch_embedding, ref_latent)
    mot_tokens, mot_pos = dit.frame_packer(motion_latents)
    n_ref = ref_tokens.shape[1]
    mask = dit.trainable_cond_mask.weight
    x = torch.cat([ref_tokens + mask[REF_MASK_ID], mot_tokens + mask[MOTION_MASK_ID]], dim=1).float()
    cos, sin = rope_cos_sin(torch.cat([grid_positions([c.ref_rope_index], hp, wp), mot_pos]), c.head_dim, c.rope_theta,
                            c.rope_fp16_factors)
    _, e0 = dit._time(torch.zeros(1))
    sink = caches.sink_tokens
    for layer, blk in enumerate(dit.blocks):
        def attend_self(h, layer=layer, blk=blk):
            q = blk.self_attn.project_q(h)
            k, v = blk.self_attn.project_kv(h)
            caches.ref_k[layer] = k[:, :n_ref]
            k_roped = apply_rope(k, cos, sin)
            caches.k[:, layer, :, :sink] = k_roped
            caches.v[:, layer, :, :sink] = v
            return blk.self_attn.attend(apply_rope(q, cos, sin), k_roped, v)

        x = _old_block(blk, x, e0, attend_self, text_kv[layer])


def old_forward_block(dit, latents, timestep, audio, text_kv, caches, step, block_start):
    c = dit.config
    x, (f, hp, wp) = dit._patchify(dit.patch_embedding, latents)
    x = (x + dit.cond_encoder.bias + dit.trainable_cond_mask.weight[NOISY_MASK_ID]).float()
    t = hp * wp
    cos, sin = rope_cos_sin(grid_positions(list(range(block_start, block_start + f)), hp, wp), c.head_dim, c.rope_theta,
                            c.rope_fp16_factors)
    ref_cos, ref_sin = rope_cos_sin(grid_positions([dit.ref_position(block_start)], hp, wp), c.head_dim, c.rope_theta,
                                    c.rope_fp16_factors)
    e, e0 = dit._time(timestep)
    sink, ring = caches.sink_tokens, caches.ring_tokens
    slot = (block_start % c.kv_cache_frames) * t
    n = x.shape[1]
    written = min(max(caches.frames_written[step], block_start + f) * t, ring)
    for layer, blk in enumerate(dit.blocks):
        def attend_self(h, layer=layer, blk=blk):
            q = apply_rope(blk.self_attn.project_q(h), cos, sin)
            k, v = blk.self_attn.project_kv(h)
            kbuf, vbuf = caches.k[step, layer], caches.v[step, layer]
            kbuf[:, :t] = apply_rope(caches.ref_k[layer], ref_cos, ref_sin)
            kbuf[:, sink + slot: sink + slot + n] = apply_rope(k, cos, sin)
            vbuf[:, sink + slot: sink + slot + n] = v
            return blk.self_attn.attend(q, kbuf[:, :sink + written], vbuf[:, :sink + written])

        x = _old_block(blk, x, e0, attend_self, text_kv[layer])
        if layer in dit.audio_injector.block_to_injector:
            x = x + dit.audio_injector(dit.audio_injector.block_to_injector[layer], x, audio.global_, audio.local).float()
    caches.frames_written[step] = max(caches.frames_written[step], block_start + f)
    return dit._unpatchify(dit.head(x, e), (f, hp, wp))


def test_attention_merged_from_two_key_sets_equals_attention_over_both():
    g = torch.Generator().manual_seed(0)
    q, k1, v1, k2, v2 = (torch.randn(2, 3, n, 16, generator=g) * 3 for n in (40, 25, 25, 70, 70))
    ref = F.scaled_dot_product_attention(q, torch.cat([k1, k2], 2), torch.cat([v1, v2], 2))
    attention = LseAttention()
    got = merge_attention(*attention(q, k1, v1), *attention(q, k2, v2))
    assert (got - ref).abs().max() < 1e-5


def test_shared_sink_matches_per_step_sink_buffers_fp32():
    torch.manual_seed(0)
    dit = build_random(lambda: CausalS2VDiT(CFG), torch.device("cpu"), torch.float32, seed=3).eval()
    h, w, steps = 8, 12, 4
    ref_latent, motion = torch.randn(1, 16, 1, h, w), torch.randn(1, 16, 19, h, w)
    text_kv = dit.text_kv(torch.randn(1, CFG.text_len, CFG.text_dim))
    new, old = dit.new_caches(steps, h, w), OldCaches(dit, steps, h, w)
    with torch.no_grad():
        dit.prefill_sink(new, ref_latent, motion, text_kv)
        old_prefill(dit, old, ref_latent, motion, text_kv)
        worst = 0.0
        for block in range(6):  # the ring (12 latent frames = 4 blocks) wraps at block 4
            audio = dit.encode_audio(torch.randn(1, CFG.num_audio_layers, CFG.audio_dim, 12))
            x = torch.randn(1, 16, 3, h, w)
            for step, t in enumerate((1000.0, 857.7, 602.2, 8.9)):
                ts = torch.tensor([t])
                a = dit.forward_block(x, ts, audio, text_kv, new, step, block * 3)
                b = old_forward_block(dit, x, ts, audio, text_kv, old, step, block * 3)
                worst = max(worst, float((a - b).abs().max()))
                x = x + 0.1 * a
    assert worst < 1e-5, f"shared-sink output differs by {worst:.3g}"
