"""Timesteps, Euler updates and guidance as the reference computes them."""

from __future__ import annotations

import pytest
import torch

from talkgen.sampling.guidance import Guidance, GuidanceConfig, MomentumBuffer, adaptive_projected_guidance
from talkgen.sampling.schedule import add_noise, euler_step, shifted_timesteps


@pytest.mark.parametrize(
    "steps, shift, expected",
    [
        (4, 2.0, [1000, 800.2, 500.7, 2.0, 0]),
        (8, 2.0, [1000, 923.2, 833.5, 727.6, 600.6, 445.3, 251.3, 2.0, 0]),
    ],
)
def test_shifted_timesteps_match_the_reference_table(steps, shift, expected) -> None:
    assert torch.allclose(shifted_timesteps(steps, shift), torch.tensor(expected, dtype=torch.float32), atol=0.06)


def test_forty_steps_shift_seven_ends() -> None:
    t = shifted_timesteps(40, 7.0)
    assert t.shape == (41,) and t.dtype == torch.float32
    assert torch.allclose(t[[0, 1, 2, -3, -2, -1]], torch.tensor([1000, 996.3, 992.3, 160.65, 6.96, 0]), atol=0.05)


def test_euler_reaches_x0_for_an_exact_velocity() -> None:
    x0, noise = torch.randn(4, 3), torch.randn(4, 3)
    t = shifted_timesteps(3, 5.0)
    x = noise.clone()
    for i in range(3):
        x = euler_step(x, noise - x0, t[i], t[i + 1])  # the true flow velocity is constant
    assert torch.allclose(x, x0, atol=1e-5)
    assert torch.allclose(add_noise(x0, noise, torch.tensor(250.0)), 0.75 * x0 + 0.25 * noise)


def test_three_pass_and_two_pass_guidance() -> None:
    assert GuidanceConfig(5, 4).passes == ("cond", "drop_text", "uncond")
    assert GuidanceConfig(1.0, 2).passes == ("cond", "drop_audio")
    cond, drop_text, uncond = torch.randn(3, 2, 16, 2, 4, 4).unbind(0)
    v = Guidance(GuidanceConfig(5, 4)).combine({"cond": cond, "drop_text": drop_text, "uncond": uncond})
    assert torch.allclose(v, uncond + 5 * (cond - drop_text) + 4 * (drop_text - uncond))
    v2 = Guidance(GuidanceConfig(1, 2)).combine({"cond": cond, "drop_audio": uncond})
    assert torch.allclose(v2, uncond + 2 * (cond - uncond))


def test_apg_without_momentum_clipping_or_projection_is_plain_cfg() -> None:
    cond, drop_text, uncond = torch.randn(3, 16, 2, 4, 4).unbind(0)
    plain = Guidance(GuidanceConfig(5, 4)).combine({"cond": cond, "drop_text": drop_text, "uncond": uncond})
    diff = cond - drop_text
    assert torch.allclose(adaptive_projected_guidance(diff, cond, None, 0.0, eta=1.0), diff, atol=1e-6)
    apg = (cond + 4 * adaptive_projected_guidance(cond - drop_text, cond, None, 0.0, eta=1.0)
           + 3 * adaptive_projected_guidance(drop_text - uncond, cond, None, 0.0, eta=1.0))
    assert torch.allclose(apg, plain, atol=1e-5)


def test_apg_projects_clips_and_keeps_momentum() -> None:
    cond, diff = torch.randn(16, 2, 4, 4), torch.randn(16, 2, 4, 4) * 100
    out = adaptive_projected_guidance(diff, cond, None, norm_threshold=55.0)
    assert abs(float((out * cond).sum())) < 1e-3 * float(out.norm() * cond.norm())  # orthogonal to cond
    assert float(out.norm()) <= 55.0 + 1e-3  # clipped
    buffer = MomentumBuffer(-0.75)
    first = buffer.update(diff)
    second = buffer.update(diff)
    assert torch.allclose(second, diff - 0.75 * first)
