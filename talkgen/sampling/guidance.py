"""Classifier-free guidance over text and audio, as the reference combines it.

Three passes when the text scale is not 1 (cond, drop-text, uncond)::

    v = uncond + s_t * (cond - drop_text) + s_a * (drop_text - uncond)

Two passes when it is 1 (the step-distilled LoRA setting: cond, drop-audio)::

    v = drop_audio + s_a * (cond - drop_audio)

With APG (adaptive projected guidance) each difference is first smoothed by a momentum buffer,
clipped to a norm threshold and stripped of its component along the conditional prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class GuidanceConfig:
    text_scale: float = 5.0
    audio_scale: float = 4.0
    use_apg: bool = False
    apg_momentum: float = -0.75
    apg_norm_threshold: float = 55.0

    @property
    def passes(self) -> tuple[str, ...]:
        """Which model passes each step needs, in the reference's order."""
        if math.isclose(self.text_scale, 1.0):
            return ("cond", "drop_audio")
        return ("cond", "drop_text", "uncond")


class MomentumBuffer:
    def __init__(self, momentum: float):
        self.momentum = momentum
        self.running_average: torch.Tensor | float = 0.0

    def update(self, value: torch.Tensor) -> torch.Tensor:
        self.running_average = value + self.momentum * self.running_average
        return self.running_average


def adaptive_projected_guidance(diff: torch.Tensor, pred_cond: torch.Tensor, buffer: MomentumBuffer | None,
                                norm_threshold: float, eta: float = 0.0) -> torch.Tensor:
    """APG on [..., C, T, H, W] tensors: norms and projections over the last four axes."""
    dims = [-1, -2, -3, -4]
    if buffer is not None:
        diff = buffer.update(diff)
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=dims, keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(diff), norm_threshold / norm)
    d64, unit = diff.double(), torch.nn.functional.normalize(pred_cond.double(), dim=dims)
    parallel = (d64 * unit).sum(dim=dims, keepdim=True) * unit
    orthogonal = d64 - parallel
    return (orthogonal + eta * parallel).to(diff.dtype)


@dataclass
class Guidance:
    """Per-chunk guidance state (APG keeps one momentum buffer per guidance term)."""

    config: GuidanceConfig
    text_buffer: MomentumBuffer | None = field(init=False, default=None)
    audio_buffer: MomentumBuffer | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.config.use_apg:
            self.text_buffer = MomentumBuffer(self.config.apg_momentum)
            self.audio_buffer = MomentumBuffer(self.config.apg_momentum)

    def combine(self, preds: dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.config
        cond = preds["cond"]
        if "drop_audio" in preds:
            drop_audio = preds["drop_audio"]
            if c.use_apg:
                return cond + (c.audio_scale - 1) * self._apg(cond - drop_audio, cond, self.audio_buffer)
            return drop_audio + c.audio_scale * (cond - drop_audio)
        drop_text, uncond = preds["drop_text"], preds["uncond"]
        if c.use_apg:
            return (
                cond
                + (c.text_scale - 1) * self._apg(cond - drop_text, cond, self.text_buffer)
                + (c.audio_scale - 1) * self._apg(drop_text - uncond, cond, self.audio_buffer)
            )
        return uncond + c.text_scale * (cond - drop_text) + c.audio_scale * (drop_text - uncond)

    def _apg(self, diff: torch.Tensor, cond: torch.Tensor, buffer: MomentumBuffer | None) -> torch.Tensor:
        return adaptive_projected_guidance(diff, cond, buffer, self.config.apg_norm_threshold)
