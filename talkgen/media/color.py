"""Colour correction: match each decoded frame's Lab statistics to the reference image.

The reference's ``match_and_blend_colors`` (both MeiGen repositories), step by step:

1. video and reference from [-1, 1] to [0, 1] (``(x + 1) / 2``, then clipped), float32;
2. RGB -> CIE Lab with scikit-image (D65);
3. per frame and per channel (L, a, b): ``(x - mean_src) * (std_ref / std_src) + mean_ref``,
   or the constant ``mean_ref`` where the frame's channel is flat (``std_src == 0``);
4. Lab -> RGB, clipped to [0, 1], blended ``(1 - strength) * src + strength * corrected``;
5. back to [-1, 1].

The colour conversions are element-wise, so they run on many frames at once with the same result
bit for bit; the statistics are taken frame by frame in float32 exactly as the reference takes
them (a batched reduction sums in another order and differs in the last bits). Frames are
processed in groups (bounding memory on long 720p chunks) on a few threads: numpy and
scikit-image release the GIL in these loops, and the frames are independent, so
``match_colors(video)[:, a:b] == match_colors(video[:, a:b])`` (a streaming loop may correct the
frames the next chunk needs first and the rest in the background).
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from talkgen.errors import InputError

FRAMES_PER_GROUP = 8
MAX_THREADS = 8


def match_colors(video: torch.Tensor, reference: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Colour-correct ``video`` [3, F, H, W] in [-1, 1] towards ``reference`` [3, H, W] (or
    [3, 1, H, W]) in [-1, 1]; ``strength`` in [0, 1] (0: unchanged; the reference default is 1).
    Returns a tensor of the video's shape, dtype and device."""
    if strength == 0.0:
        return video
    if not 0.0 <= strength <= 1.0:
        raise InputError(f"Colour-correction strength must be between 0 and 1, got {strength}.")
    from skimage import color

    strength = float(strength)  # a Python float keeps the blend in float32, as in the reference
    if reference.dim() == 4:
        reference = reference[:, 0]
    if video.dim() != 4 or video.shape[0] != 3 or reference.dim() != 3 or reference.shape[0] != 3:
        raise ValueError(
            f"expected video [3, F, H, W] and reference [3, H, W], got {tuple(video.shape)}, {tuple(reference.shape)}"
        )

    ref01 = np.clip((reference.detach().float().permute(1, 2, 0).cpu().numpy() + 1.0) / 2.0, 0.0, 1.0)
    ref_lab = color.rgb2lab(ref01)
    ref_mean = np.array([ref_lab[:, :, j].mean() for j in range(3)], dtype=ref_lab.dtype)
    ref_std = np.array([ref_lab[:, :, j].std() for j in range(3)], dtype=ref_lab.dtype)

    frames = video.detach().float().permute(1, 2, 3, 0).cpu().numpy()  # [F, H, W, 3]
    out = np.empty_like(frames)
    groups = [slice(s, s + FRAMES_PER_GROUP) for s in range(0, frames.shape[0], FRAMES_PER_GROUP)]

    def work(group: slice) -> None:
        out[group] = _match_group(frames[group], ref_mean, ref_std, strength, color)

    threads = min(MAX_THREADS, os.cpu_count() or 1, len(groups))
    if threads <= 1:
        for group in groups:
            work(group)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, groups))
    return torch.from_numpy(out).permute(3, 0, 1, 2).contiguous().to(device=video.device, dtype=video.dtype)


def _match_group(frames: np.ndarray, ref_mean: np.ndarray, ref_std: np.ndarray, strength: float, color) -> np.ndarray:
    """[n, H, W, 3] float32 in [-1, 1] -> corrected and blended, still in [-1, 1]."""
    src01 = np.clip((frames + 1.0) / 2.0, 0.0, 1.0)
    lab = color.rgb2lab(src01)
    n = lab.shape[0]
    mean = np.empty((n, 3), dtype=lab.dtype)
    std = np.empty((n, 3), dtype=lab.dtype)
    for i in range(n):  # per frame, as the reference reduces (see the module docstring)
        for j in range(3):
            channel = lab[i][:, :, j]
            mean[i, j], std[i, j] = channel.mean(), channel.std()
    flat = std == 0
    ratio = ref_std[None] / np.where(flat, np.ones_like(std), std)  # [n, 3]
    corrected = (lab - mean[:, None, None, :]) * ratio[:, None, None, :] + ref_mean[None, None, None, :]
    corrected = np.where(flat[:, None, None, :], ref_mean[None, None, None, :], corrected).astype(lab.dtype, copy=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*negative Z values.*")  # expected after the transfer
        rgb = np.clip(color.lab2rgb(corrected), 0.0, 1.0)
    blended = (1 - strength) * src01 + strength * rgb
    return blended * 2.0 - 1.0
