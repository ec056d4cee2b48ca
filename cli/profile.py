"""The profile a command runs: the YAML file, then environment overrides, then the command's flags."""

from __future__ import annotations

import argparse

from live.settings import Settings, load_settings


def settings_from_args(args: argparse.Namespace) -> Settings:
    """``--config`` with ``--checkpoint-dir``, ``--lora``, ``--device`` and ``--random-weights`` applied."""
    extra = {k: str(getattr(args, k)) for k in ("checkpoint_dir", "lora") if getattr(args, k, None)}
    if getattr(args, "device", None):
        extra["device"] = args.device
    settings = load_settings(args.config, **extra)
    if getattr(args, "random_weights", False):
        settings = settings.model_copy(update={"checkpoint_dir": None, "lora": None, "weights": None})
    return settings
