"""Flow-matching Euler sampler with Live Avatar's schedule (4 steps, shift 3, no CFG).

diffusers' ``FlowMatchEulerDiscreteScheduler`` shifts the training sigmas in ``__init__`` and again in
``set_timesteps`` (the "double shift"), giving timesteps [1000, 857.69, 602.15, 8.93] for 4 steps; we take
the schedule from it and apply the Euler update ourselves so several streams can share one schedule.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler


class FlowMatchSchedule:
    """Timesteps (fed to the DiT) and sigmas (for the Euler update) of a few-step flow-matching sampler."""

    def __init__(self, steps: int = 4, shift: float = 3.0, num_train_timesteps: int = 1000) -> None:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
        scheduler.set_timesteps(steps)
        self.timesteps = scheduler.timesteps.float().cpu()
        self.sigmas = scheduler.sigmas.float().cpu()
        self.steps = steps
        self._on_device: dict[str, torch.Tensor] = {}

    def timestep(self, step: int, device: torch.device) -> torch.Tensor:
        """Step ``step``'s timestep as a ``[1]`` float32 tensor on ``device``. The table is copied to each device
        once: a host-to-device copy from pageable memory waits for the device, so one per step would stall it."""
        table = self._on_device.get(str(device))
        if table is None:
            table = self._on_device.setdefault(str(device), self.timesteps.to(device))
        return table[step:step + 1]

    def euler_step(self, x: torch.Tensor, velocity: torch.Tensor, step: int) -> torch.Tensor:
        """``x ← x + (σ_{i+1} − σ_i) · v`` computed in float32."""
        dt = float(self.sigmas[step + 1] - self.sigmas[step])
        return (x.float() + dt * velocity.float()).to(x.dtype)
