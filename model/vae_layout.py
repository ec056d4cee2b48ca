"""GPU layout for the Wan VAE: 3-D conv weights in channels-last (NDHWC).

With NCDHW weights cuDNN converts every activation to NDHWC and back around each conv and picks slower kernels;
with channels-last weights the decoder's activations stay NDHWC. Measured on one H100 at 704×384 (one block,
3 latents → 12 frames, bf16): 218 → 195 ms (bench/RESULTS.md). Values and the state dict's contents are
unchanged; only the weights' memory layout differs.
"""

from __future__ import annotations

import torch
from torch import nn


def channels_last_vae_(vae: nn.Module) -> nn.Module:
    """Store every ``Conv3d`` weight of ``vae`` channels-last, in place; returns ``vae``."""
    for m in vae.modules():
        if isinstance(m, nn.Conv3d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
    return vae
