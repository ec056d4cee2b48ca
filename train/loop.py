"""Training-loop pieces the train-tiny stages share: atomic checkpoints, resume, optimiser step with the LR
schedule, and time/step budgets."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch


def save_state(obj, path: Path) -> None:
    """``torch.save`` through a temporary file and a rename: a stage running beside this one (or a kill mid-write)
    never sees a half-written checkpoint."""
    tmp = Path(path).with_name(Path(path).name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def resume(ckpt: Path, key: str, module: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device,
            log) -> int:
    """Load ``module`` (saved under ``key``) and the optimiser from ``ckpt`` if it exists; returns the step to
    continue from (0 for a fresh start)."""
    if not ckpt.exists():
        return 0
    state = torch.load(ckpt, map_location=device)
    module.load_state_dict(state[key])
    opt.load_state_dict(state["opt"])
    log(f"{key}: resumed at step {state['step']}")
    return state["step"]


def optimizer_step(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], loss: torch.Tensor, lr: float,
                    warmup: int, floor: float, step: int, progress: float) -> None:
    """Backward, clip the gradient norm to 1, set the learning rate (linear warm-up over ``warmup`` steps, then a
    cosine from ``lr`` to ``floor · lr`` over the budget's ``progress``) and step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    scale = min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    for group in opt.param_groups:
        group["lr"] = lr * scale
    opt.step()


def state_done(path: Path) -> bool:
    """Whether the checkpoint at ``path`` marks its stage finished."""
    return path.exists() and bool(torch.load(path, map_location="cpu").get("done"))


class Budget:
    """Training progress in [0, 1] by steps, or by wall time when a budget in minutes and/or a ``deadline`` (Unix
    time by which the stage must stop) is given — the LR schedule follows it, so a time-boxed run still anneals."""

    def __init__(self, minutes: float | None, steps: int, start_step: int, deadline: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """``steps`` at most; ``clock`` (Unix seconds) measures the time budget."""
        self._clock = clock
        self.seconds = None if minutes is None else minutes * 60
        if deadline is not None:
            left = max(1.0, deadline - clock())
            self.seconds = left if self.seconds is None else min(self.seconds, left)
        self.steps, self.t0, self.start_step = steps, clock(), start_step

    def progress(self, step: int) -> float:
        """Fraction of the budget used at ``step``."""
        if self.seconds is None:
            return min(1.0, step / self.steps)
        return min(1.0, (self._clock() - self.t0) / self.seconds)

    def done(self, step: int) -> bool:
        return step >= self.steps or (self.seconds is not None and self.progress(step) >= 1.0)
