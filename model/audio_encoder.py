"""The in-DiT causal audio encoder (official key prefix ``casual_audio_encoder``, misspelling kept).

wav2vec2 hidden states (all layers) → learned layer mix → causal strided 1-D convs → per latent frame
4 local audio tokens + 1 learned padding token (cross-attention context of the injectors) and 1 global
vector (drives the injectors' AdaLN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalConv1d(nn.Module):
    """Conv1d with replicate left padding, so output t sees inputs ≤ t only."""

    def __init__(self, chan_in: int, chan_out: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.pad = kernel_size - 1
        self.conv = nn.Conv1d(chan_in, chan_out, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.pad, 0), mode="replicate"))


class MotionEncoderTC(nn.Module):
    """Local (multi-token) and global branches sharing conv2/conv3 (upstream ``MotionEncoder_tc``)."""

    def __init__(self, in_dim: int, hidden_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.conv1_local = CausalConv1d(in_dim, hidden_dim // 4 * num_heads, 3, stride=1)
        self.conv1_global = CausalConv1d(in_dim, hidden_dim // 4, 3, stride=1)
        self.conv2 = CausalConv1d(hidden_dim // 4, hidden_dim // 2, 3, stride=2)
        self.conv3 = CausalConv1d(hidden_dim // 2, hidden_dim, 3, stride=2)
        self.final_linear = nn.Linear(hidden_dim, hidden_dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, hidden_dim))
        self.hidden_dim = hidden_dim

    @staticmethod
    def _norm_act(x: torch.Tensor) -> torch.Tensor:
        """LayerNorm over channels (no affine, eps 1e-6) + SiLU on a ``[N, C, T]`` tensor."""
        y = F.layer_norm(x.transpose(1, 2), (x.shape[1],), eps=1e-6)
        return F.silu(y).transpose(1, 2)

    def _shared_tail(self, x: torch.Tensor) -> torch.Tensor:
        x = self._norm_act(self.conv2(x))
        return self._norm_act(self.conv3(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, C_in]`` → (global ``[B, T', 1, D]``, local ``[B, T', num_heads + 1, D]``)."""
        b = x.shape[0]
        x = x.transpose(1, 2)
        local = self.conv1_local(x)
        local = local.unflatten(1, (self.num_heads, -1)).flatten(0, 1)
        local = self._shared_tail(self._norm_act(local))
        local = local.transpose(1, 2).unflatten(0, (b, self.num_heads)).transpose(1, 2)
        padding = self.padding_tokens.expand(b, local.shape[1], 1, -1).to(local.dtype)
        local = torch.cat([local, padding], dim=2)
        glob = self._shared_tail(self._norm_act(self.conv1_global(x)))
        glob = self.final_linear(glob.transpose(1, 2)).unsqueeze(2)
        return glob, local


class CausalAudioEncoder(nn.Module):
    """Layer-mixed wav2vec2 features → audio tokens per latent frame (upstream ``CausalAudioEncoder``)."""

    def __init__(self, audio_dim: int, num_layers: int, out_dim: int, num_token: int,
                 motion_frames: int, lat_motion_frames: int) -> None:
        super().__init__()
        self.encoder = MotionEncoderTC(audio_dim, out_dim, num_token)
        self.weights = nn.Parameter(torch.full((1, num_layers, 1, 1), 0.01))
        self.motion_frames = motion_frames
        self.lat_motion_frames = lat_motion_frames

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``features [B, L, C, F]`` (F video frames, a multiple of 4) → (global ``[B, F/4, 1, D]``,
        local ``[B, F/4, num_token + 1, D]``).

        As upstream does per block, the first frame is repeated ``motion_frames`` times on the left and the
        first ``lat_motion_frames`` outputs are dropped, so each block is encoded on its own.
        """
        features = features.float()
        features = torch.cat([features[..., :1].expand(*features.shape[:-1], self.motion_frames), features], -1)
        w = F.silu(self.weights.float())
        mixed = (features * w / w.sum(dim=1, keepdim=True)).sum(dim=1)
        w_dtype = self.encoder.final_linear.weight.dtype
        glob, local = self.encoder(mixed.transpose(1, 2).to(w_dtype))
        return glob[:, self.lat_motion_frames:], local[:, self.lat_motion_frames:]
