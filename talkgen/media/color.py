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

A video on a GPU is corrected there, in torch, with the same formulas and constants as
scikit-image's (float32, statistics per frame), so the decoded chunk does not travel to the host
first (the CPU path takes 4-5.5 s for 81 frames at 448x896 on two cores). It agrees with the CPU
path to float32 rounding (the reductions sum in another order; see ``tests/test_color.py``), not
bit for bit, so the CPU path, which is bit-exact with the reference, stays the one for CPU tensors.
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

# scikit-image's sRGB (D65) constants: skimage.color.colorconv.xyz_from_rgb and the D65 white
# point of the 2-degree observer.
XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
D65_WHITE = (0.95047, 1.0, 1.08883)


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
    if video.device.type != "cpu":
        return match_colors_torch(video, reference, strength)

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


# --------------------------------------------------------------------------------------------
# The same on the tensor's device (torch), for videos on a GPU


def match_colors_torch(video: torch.Tensor, reference: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """:func:`match_colors` computed in torch on ``video``'s device (float32), in groups of frames
    so the temporaries stay small. Shapes and value ranges as :func:`match_colors`."""
    if reference.dim() == 4:
        reference = reference[:, 0]
    ref_lab = rgb_to_lab(((reference.detach().float().to(video.device) + 1) / 2).clamp(0, 1).permute(1, 2, 0))
    ref_mean, ref_std = _lab_statistics(ref_lab[None])
    frames = video.detach().float().permute(1, 2, 3, 0)  # [F, H, W, 3]
    out = torch.empty_like(frames)
    for start in range(0, frames.shape[0], FRAMES_PER_GROUP):
        src01 = ((frames[start : start + FRAMES_PER_GROUP] + 1) / 2).clamp(0, 1)
        lab = rgb_to_lab(src01)
        mean, std = _lab_statistics(lab)  # [n, 3] each
        # A flat channel: the reference tests std == 0, which numpy's reductions give for a constant
        # channel; torch's mean of equal values may round, so test constancy directly.
        pixels = lab.flatten(1, 2)
        flat = pixels.amax(dim=1) == pixels.amin(dim=1)
        ratio = ref_std / torch.where(flat, torch.ones_like(std), std)
        corrected = (lab - mean[:, None, None]) * ratio[:, None, None] + ref_mean[:, None, None]
        corrected = torch.where(flat[:, None, None], ref_mean[:, None, None], corrected)
        rgb = lab_to_rgb(corrected)
        out[start : start + FRAMES_PER_GROUP] = ((1 - strength) * src01 + strength * rgb) * 2 - 1
    return out.permute(3, 0, 1, 2).contiguous().to(dtype=video.dtype)


def _lab_statistics(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame mean and population standard deviation of each Lab channel: [n, H, W, 3] -> [n, 3]."""
    pixels = lab.flatten(1, 2)
    return pixels.mean(dim=1), pixels.std(dim=1, correction=0)


def _constants(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xyz_from_rgb = torch.tensor(XYZ_FROM_RGB, dtype=torch.float64)
    rgb_from_xyz = torch.linalg.inv(xyz_from_rgb)  # as scikit-image: the inverse taken in float64
    white = torch.tensor(D65_WHITE, dtype=torch.float64)
    return tuple(t.to(like.device, like.dtype) for t in (xyz_from_rgb, rgb_from_xyz, white))


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """scikit-image's ``rgb2lab`` (sRGB, D65, 2-degree observer): [..., 3] in [0, 1] -> Lab."""
    xyz_from_rgb, _, white = _constants(rgb)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).pow(2.4), rgb / 12.92)
    xyz = (linear @ xyz_from_rgb.T) / white
    f = torch.where(xyz > 0.008856, xyz.abs().pow(1 / 3) * xyz.sign(), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(-1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """scikit-image's ``lab2rgb``: negative Z set to 0, the result clipped to [0, 1]."""
    _, rgb_from_xyz, white = _constants(lab)
    lightness, a, b = lab.unbind(-1)
    fy = (lightness + 16.0) / 116.0
    f = torch.stack([a / 500.0 + fy, fy, (fy - b / 200.0).clamp_min(0)], dim=-1)
    xyz = torch.where(f > 0.2068966, f.pow(3), (f - 16.0 / 116.0) / 7.787) * white
    linear = xyz @ rgb_from_xyz.T
    rgb = torch.where(linear > 0.0031308, 1.055 * linear.clamp_min(0).pow(1 / 2.4) - 0.055, linear * 12.92)
    return rgb.clamp(0, 1)
