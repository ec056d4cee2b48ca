"""Live Avatar's LoRA (``liveavatar.safetensors``): read a PEFT-format file lazily and merge it into DiT weights.

Upstream merges with PEFT (``get_peft_model`` + ``merge_and_unload``); we do the same arithmetic per weight while
the DiT loads, ``W' = W + (alpha / rank) · B · A`` in fp32, so no second copy of the DiT ever exists.

Accepted key forms, after an optional ``base_model.model.`` and/or ``diffusion_model.`` prefix:
``<module>.lora_A[.default].weight`` ``[rank, in]``, ``<module>.lora_B[.default].weight`` ``[out, rank]`` and,
optionally, a scalar ``<module>.alpha``. ``<module>`` uses the official Wan names (``blocks.0.self_attn.q``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

LORA_PREFIXES = ("base_model.model.", "diffusion_model.")
# PEFT files carry no alpha; Live Avatar trains with r=128, lora_alpha=64 (liveavatar/configs/s2v_causal_sft.yaml).
LIVE_AVATAR_ALPHA_PER_RANK = 64 / 128

_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.default)?\.weight|(?P<amodule>.+)\.alpha")


@dataclass(frozen=True)
class LoraPair:
    """The file keys of one target's low-rank factors and its merge scale ``alpha / rank``."""

    a_key: str
    b_key: str
    scale: float


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in LORA_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


class LoraFile:
    """A LoRA safetensors file opened lazily; maps DiT weight names (``blocks.0.self_attn.q.weight``) to factors.

    Construction parses and checks key names and ranks; :meth:`check_targets` checks the factors against the DiT's
    weight shapes; :meth:`merge` applies one target, reading only its two factors. Raises ``ValueError`` describing
    what is wrong (the caller adds the file name). The file stays open (memory-mapped) while the object lives.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = safe_open(str(path), framework="pt", device="cpu")
        factors: dict[str, dict[str, str]] = {}
        alphas: dict[str, str] = {}
        unknown: list[str] = []
        for key in self._file.keys():
            match = _LORA_KEY.fullmatch(_strip_prefixes(key))
            if match is None:
                unknown.append(key)
            elif match["amodule"] is not None:
                alphas[match["amodule"]] = key
            else:
                factors.setdefault(match["module"], {})[match["part"]] = key
        if unknown:
            raise ValueError(
                f"{len(unknown)} tensor(s) are not LoRA factors (expected '<module>.lora_A[.default].weight' / "
                f"'lora_B' with optional prefixes {LORA_PREFIXES}), e.g. {unknown[:5]}")
        if not factors:
            raise ValueError("the file holds no LoRA factors")
        unpaired = sorted(m for m, parts in factors.items() if set(parts) != {"lora_A", "lora_B"})
        if unpaired:
            raise ValueError(f"{len(unpaired)} module(s) lack lora_A or lora_B, e.g. {unpaired[:5]}")
        stray = sorted(set(alphas) - set(factors))
        if stray:
            raise ValueError(f"alpha given for module(s) without factors, e.g. {stray[:5]}")
        self.pairs: dict[str, LoraPair] = {}
        self.ranks: set[int] = set()
        for module, parts in sorted(factors.items()):
            a_shape = self._file.get_slice(parts["lora_A"]).get_shape()
            b_shape = self._file.get_slice(parts["lora_B"]).get_shape()
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise ValueError(
                    f"bad LoRA rank for {module}: lora_A {list(a_shape)} must be [rank, in] and lora_B "
                    f"{list(b_shape)} [out, rank] with the same rank")
            rank = a_shape[0]
            alpha = (float(self._file.get_tensor(alphas[module]).item()) if module in alphas
                     else LIVE_AVATAR_ALPHA_PER_RANK * rank)
            self.pairs[f"{module}.weight"] = LoraPair(parts["lora_A"], parts["lora_B"], alpha / rank)
            self.ranks.add(rank)
        if len(self.ranks) != 1:
            raise ValueError(f"bad LoRA rank: the file mixes ranks {sorted(self.ranks)}; expected one rank")

    def check_targets(self, weight_shapes: Mapping[str, tuple[int, ...]]) -> None:
        """``ValueError`` unless every target is a 2-D weight of the DiT whose ``[out, in]`` matches B and A."""
        absent = [name for name in self.pairs if name not in weight_shapes]
        if absent:
            raise ValueError(f"{len(absent)} LoRA target(s) are not DiT weights, e.g. {absent[:5]}")
        for name, pair in self.pairs.items():
            out_dim = self._file.get_slice(pair.b_key).get_shape()[0]
            in_dim = self._file.get_slice(pair.a_key).get_shape()[1]
            if tuple(weight_shapes[name]) != (out_dim, in_dim):
                raise ValueError(
                    f"LoRA for {name} is [out={out_dim}, in={in_dim}] but the weight is {list(weight_shapes[name])}")

    def merge(self, name: str, weight: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``weight + scale · B · A`` computed in fp32 on ``device`` (returned in fp32; the caller casts)."""
        pair = self.pairs[name]
        a = self._file.get_tensor(pair.a_key).to(device=device, dtype=torch.float32)
        b = self._file.get_tensor(pair.b_key).to(device=device, dtype=torch.float32)
        return torch.addmm(weight.to(device=device, dtype=torch.float32), b, a, alpha=pair.scale)
