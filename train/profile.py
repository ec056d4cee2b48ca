"""What training needs from a runtime profile, as model-level values: train/ never reads live settings itself.

The CLI reads the YAML profile and hands train-tiny a :class:`TrainingProfile`.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.audio_features import SAMPLE_RATE
from model.config import ModelConfig
from model.stack import StackOptions


@dataclass(frozen=True)
class TrainingProfile:
    """The model sizes, how the profile builds its stack, and the audio window the engine cuts for each block."""

    model: ModelConfig
    options: StackOptions
    audio_left_context_s: float
    audio_lookahead_s: float
    size: int = 192  # the square frame the characters are drawn at (the profile's video size)

    @property
    def frames_per_block(self) -> int:
        """Video frames per generated block (4 per latent frame: the Wan VAE's temporal stride)."""
        return self.model.dit.frames_per_block * 4

    def audio_context_samples(self) -> tuple[int, int]:
        """Samples of past audio before a block and of lookahead after it (16 kHz)."""
        return round(self.audio_left_context_s * SAMPLE_RATE), round(self.audio_lookahead_s * SAMPLE_RATE)
