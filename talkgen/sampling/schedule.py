"""The reference's flow-matching schedule: shifted timesteps and plain Euler steps.

``t_i = linspace(1000, 1, steps)`` with 0 appended, each shifted as ``s*t / (1 + (s-1)*t)`` on
``t/1000``; the model predicts the velocity ``v = noise - x0`` and the update is
``x <- x - v * (t_i - t_{i+1}) / 1000``. Computed in float32 as the reference does, so the
timesteps the model sees are bit-identical.
"""

from __future__ import annotations

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_timestep(t: torch.Tensor, shift: float, num_train: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    sigma = t / num_train
    return shift * sigma / (1 + (shift - 1) * sigma) * num_train


def shifted_timesteps(steps: int, shift: float, num_train: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """``steps + 1`` float32 timesteps from 1000 down to 0 (the last one is the clean end)."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    base = list(np.linspace(num_train, 1, steps, dtype=np.float32)) + [np.float32(0.0)]
    return torch.stack([shift_timestep(torch.tensor([t]), shift, num_train) for t in base]).reshape(-1)


def euler_step(latent: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
               num_train: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """One step of the flow ODE from ``t`` to ``t_next`` (both on the 0..1000 scale)."""
    dt = (t - t_next) / num_train
    return latent + (-velocity) * dt


def add_noise(clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, num_train: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, with t on the 0..1000 scale (used to re-noise context frames)."""
    sigma = t.float() / num_train
    return (1 - sigma) * clean + sigma * noise
