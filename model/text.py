"""Text conditioning for models without a language model: a deterministic byte-embedding table.

Real models use the umT5-XXL encoder (model/umt5.py); both expose ``encode(prompt) -> [1, text_len, dim]``
with zero padding past the prompt's tokens, as upstream pads the context to ``text_len``.
"""

from __future__ import annotations

import torch
from torch import nn


class HashedTextEncoder(nn.Module):
    """UTF-8 bytes → rows of a fixed embedding table (seeded), zero-padded to ``text_len`` tokens."""

    def __init__(self, text_dim: int, text_len: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Embedding(256, text_dim)
        with torch.no_grad():
            self.table.weight.copy_(torch.randn(256, text_dim, generator=g))
        self.text_len = text_len

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        """Embed ``prompt``; an empty prompt gives all zeros."""
        ids = list(prompt.encode("utf-8"))[: self.text_len]
        out = torch.zeros(1, self.text_len, self.table.embedding_dim, device=self.table.weight.device,
                          dtype=self.table.weight.dtype)
        if ids:
            out[0, : len(ids)] = self.table(torch.tensor(ids, device=self.table.weight.device))
        return out
