"""umT5 text encoder: prompt → ``[1, text_len, d_model]`` context, as Wan's ``T5EncoderModel`` produces it.

Upstream tokenises with ``padding="max_length"`` to ``text_len``, runs the encoder with the padding mask, keeps
the rows of the real tokens and zero-pads back to ``text_len``. Masked keys add exactly nothing to attention, so
running the encoder on the real tokens alone gives the same rows; we do that and pad with zeros.
The weights come from Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` (see ``model/checkpoint.py``).
"""

from __future__ import annotations

import html
import re

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel


def clean_prompt(prompt: str) -> str:
    """Wan's ``clean='whitespace'``: unescape HTML entities (twice), trim, collapse whitespace runs.

    Upstream first runs ``ftfy.fix_text`` (mojibake repair), a no-op for well-formed text; we skip it.
    """
    return re.sub(r"\s+", " ", html.unescape(html.unescape(prompt)).strip()).strip()


class UMT5TextEncoder(nn.Module):
    """A loaded ``UMT5EncoderModel`` and its tokenizer, with the same ``encode()`` as ``HashedTextEncoder``."""

    def __init__(self, model: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, text_len: int,
                 max_tokens: int | None = None) -> None:
        """``max_tokens`` (default ``text_len``) caps the tokens kept, the EOS token included."""
        super().__init__()
        max_tokens = text_len if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= text_len:
            raise ValueError(f"max_tokens must be in [1, text_len={text_len}], got {max_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.max_tokens = max_tokens
        self.requires_grad_(False).eval()

    @property
    def dim(self) -> int:
        """Width of the context rows (4096 for umT5-XXL)."""
        return self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        """Context ``[1, text_len, dim]`` for ``prompt``: encoder states of its tokens, zeros after them."""
        ids = self.tokenizer(clean_prompt(prompt), truncation=True, max_length=self.max_tokens,
                             return_tensors="pt").input_ids
        weight = self.model.shared.weight
        hidden = self.model(input_ids=ids.to(weight.device)).last_hidden_state
        out = torch.zeros(1, self.text_len, self.dim, device=weight.device, dtype=hidden.dtype)
        out[:, : ids.shape[1]] = hidden
        return out
