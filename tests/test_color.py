"""Colour correction against a direct transcription of the reference's per-frame loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from talkgen.errors import InputError
from talkgen.media.color import match_colors

color = pytest.importorskip("skimage.color", reason="scikit-image provides the Lab conversion")


def reference_match(video: torch.Tensor, reference: torch.Tensor, strength: float) -> torch.Tensor:
    """The reference's algorithm, one frame and one channel at a time, in numpy float32."""
    src = np.clip((video.permute(1, 2, 3, 0).numpy() + 1.0) / 2.0, 0.0, 1.0)
    ref_lab = color.rgb2lab(np.clip((reference.permute(1, 2, 0).numpy() + 1.0) / 2.0, 0.0, 1.0))
    frames = []
    for frame in src:
        lab = color.rgb2lab(frame)
        out = lab.copy()
        for j in range(3):
            mean_src, std_src = lab[:, :, j].mean(), lab[:, :, j].std()
            mean_ref, std_ref = ref_lab[:, :, j].mean(), ref_lab[:, :, j].std()
            out[:, :, j] = mean_ref if std_src == 0 else (out[:, :, j] - mean_src) * (std_ref / std_src) + mean_ref
        rgb = np.clip(color.lab2rgb(out), 0.0, 1.0)
        frames.append((1 - strength) * frame + strength * rgb)
    return torch.from_numpy(np.stack(frames) * 2.0 - 1.0).permute(3, 0, 1, 2)


def sample_video(frames: int = 21, height: int = 48, width: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth colour ramps plus noise (a little outside [-1, 1]), with two flat frames."""
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-1, 1, width).expand(height, width)
    video = torch.stack(
        [torch.stack([ramp * 0.8 + 0.1 * f / frames, ramp.flip(1) * 0.5, ramp * 0.2 - 0.3]) for f in range(frames)], dim=1
    )
    video = (video + 0.2 * torch.randn(video.shape, generator=generator)).clamp(-1.2, 1.2)
    video[:, 1] = -1.0  # black: L, a and b all flat (std 0)
    video[:, 2] = 0.25  # flat grey
    reference = (torch.rand(3, height, width, generator=generator) * 1.6 - 0.9).clamp(-1, 1)
    return video.float(), reference


def test_sample_has_flat_channels() -> None:
    video, _ = sample_video(frames=3)
    lab = color.rgb2lab(np.clip((video[:, 1].permute(1, 2, 0).numpy() + 1) / 2, 0, 1))
    assert all(lab[:, :, j].std() == 0 for j in range(3))


@pytest.mark.parametrize("strength", [1.0, 0.5, 0.25])
def test_matches_the_reference_loop_exactly(strength: float) -> None:
    video, reference = sample_video()
    ours = match_colors(video, reference, strength)
    expected = reference_match(video, reference, strength).to(torch.float32)
    assert ours.shape == video.shape and ours.dtype == video.dtype
    assert torch.equal(ours, expected)


def test_real_photo_frames_match_and_take_the_reference_statistics() -> None:
    data = pytest.importorskip("skimage.data")
    photo = torch.from_numpy(data.astronaut()[::4, ::4].copy()).permute(2, 0, 1).float() / 127.5 - 1  # [3, 128, 128]
    video = torch.stack([photo * 0.6 + 0.3, photo.flip(-1) * 0.9 - 0.1, photo[[2, 1, 0]]], dim=1).clamp(-1, 1)
    reference = photo.roll(17, dims=-1)
    ours = match_colors(video, reference, 1.0)
    assert torch.equal(ours, reference_match(video, reference, 1.0).float())
    ref_lab = color.rgb2lab((reference.permute(1, 2, 0).numpy() + 1) / 2)
    target = ref_lab.mean(axis=(0, 1))
    for f in range(video.shape[1]):
        before = color.rgb2lab((video[:, f].permute(1, 2, 0).numpy() + 1) / 2).mean(axis=(0, 1))
        after = color.rgb2lab((ours[:, f].permute(1, 2, 0).numpy() + 1) / 2).mean(axis=(0, 1))
        assert np.abs(after - target).max() < min(4.0, np.abs(before - target).max())  # exact up to the RGB clip


def test_accepts_a_reference_with_a_frame_axis_and_keeps_dtype() -> None:
    video, reference = sample_video(frames=5)
    a = match_colors(video, reference[:, None], 0.7)
    assert torch.equal(a, match_colors(video, reference, 0.7))
    half = match_colors(video.to(torch.bfloat16), reference, 0.7)
    assert half.dtype == torch.bfloat16


def test_strength_zero_is_identity_and_out_of_range_is_an_input_error() -> None:
    video, reference = sample_video(frames=5)
    assert match_colors(video, reference, 0.0) is video
    with pytest.raises(InputError, match="between 0 and 1"):
        match_colors(video, reference, 1.5)


def test_groups_of_frames_do_not_change_the_result(monkeypatch) -> None:
    import talkgen.media.color as module

    video, reference = sample_video(frames=9)
    whole = match_colors(video, reference, 1.0)
    monkeypatch.setattr(module, "FRAMES_PER_GROUP", 2)
    assert torch.equal(match_colors(video, reference, 1.0), whole)


def test_frames_are_independent_so_a_subset_can_be_corrected_first() -> None:
    video, reference = sample_video(frames=12)
    whole = match_colors(video, reference, 0.8)
    assert torch.equal(match_colors(video[:, -5:], reference, 0.8), whole[:, -5:])


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_torch_path_agrees_with_the_reference_loop(strength: float) -> None:
    """The GPU path (torch, run here on the CPU) against the reference's numpy loop: float32
    rounding apart, the same frames, flat frames included."""
    from talkgen.media.color import match_colors_torch

    video, reference = sample_video()
    expected = reference_match(video, reference, strength)
    got = match_colors_torch(video, reference, strength)
    assert got.shape == video.shape and got.dtype == video.dtype
    assert (got - expected).abs().max() < 2e-4
    assert torch.equal(got[:, 1], expected[:, 1].float()) or (got[:, 1] - expected[:, 1]).abs().max() < 1e-6


def test_torch_lab_conversions_match_scikit_image() -> None:
    from talkgen.media.color import lab_to_rgb, rgb_to_lab

    rgb = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(1))
    rgb[0, :8] = torch.tensor([0.0, 0.0, 0.0])  # black and white, the ends of both piecewise curves
    rgb[1, :8] = torch.tensor([1.0, 1.0, 1.0])
    lab = rgb_to_lab(rgb)
    assert np.abs(lab.numpy() - color.rgb2lab(rgb.numpy())).max() < 1e-4
    shifted = lab + torch.tensor([-20.0, 30.0, 90.0])  # out of gamut in places: negative Z, clipping
    assert ((shifted[..., 0] + 16) / 116 - shifted[..., 2] / 200 < 0).any()  # the negative-Z branch is hit
    with pytest.warns(UserWarning, match="negative Z"):
        expected = np.clip(color.lab2rgb(shifted.numpy()), 0, 1)
    assert np.abs(lab_to_rgb(shifted).numpy() - expected).max() < 1e-5
