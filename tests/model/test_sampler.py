"""Live Avatar's 4-step schedule (model-facts §8): the double shift gives these exact timesteps."""

import pytest
import torch

from model.sampler import FlowMatchSchedule


def test_four_step_shift3_timesteps_match_reference():
    s = FlowMatchSchedule(steps=4, shift=3.0)
    assert s.timesteps.tolist() == pytest.approx([1000.0, 857.69, 602.15, 8.93], abs=0.01)
    assert s.sigmas.tolist() == pytest.approx([1.0, 0.85769, 0.60215, 0.008929, 0.0], abs=1e-5)


def test_euler_step_moves_by_sigma_difference():
    s = FlowMatchSchedule()
    x, v = torch.zeros(3), torch.ones(3)
    for i in range(4):
        x = s.euler_step(x, v, i)
    assert torch.allclose(x, torch.full((3,), -1.0))
