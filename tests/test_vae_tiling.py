"""Tiled VAE decode (the low-memory tiers): diffusers' tiles, blended. On the tiny random-weight VAE
the blend changes pixels by about 10 % (its mid-block attention sees one tile instead of the frame,
and random weights do not make neighbouring tiles agree the way a trained VAE does), so the check
against the untiled decode is loose; a frame within one tile decodes exactly as untiled."""

from __future__ import annotations

import pytest
import torch

from talkgen.models.vae import VAEConfig, VideoVAE, write_tiny_vae


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> VideoVAE:
    path = write_tiny_vae(tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth")
    return VideoVAE.from_original(path, VAEConfig.tiny())


def latent(h: int, w: int, frames: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(16, frames, h, w, generator=torch.Generator().manual_seed(seed))


def test_tiled_decode_within_tolerance_of_untiled(vae: VideoVAE):
    z = latent(34, 34)  # 272 x 272 px: 2 x 2 tiles of 256 px every 192 px
    untiled = vae.decode(z)
    vae.set_tiling(True)
    try:
        tiled = vae.decode(z)
        # It is diffusers' own tiled decode (our latent normalisation around it).
        scaled = z / (1.0 / vae.latents_std).view(16, 1, 1, 1) + vae.latents_mean.view(16, 1, 1, 1)
        direct = vae.model.tiled_decode(scaled[None]).sample[0].clamp(-1, 1)
    finally:
        vae.set_tiling(False)
    assert tiled.shape == untiled.shape == (3, 1, 272, 272)
    assert torch.isfinite(tiled).all()
    assert torch.allclose(tiled, direct, atol=1e-6)
    rel = float((tiled - untiled).norm() / untiled.norm())
    assert rel < 0.2, rel
    # Away from the blended bands and the tile borders (the top-left tile's interior), the
    # decodes are close: what differs is the attention's context, not the convolutions.
    assert float((tiled[..., :96, :96] - untiled[..., :96, :96]).norm() / untiled[..., :96, :96].norm()) < rel
    assert vae.model.use_tiling is False  # the flag is only set around our own calls


def test_frame_within_one_tile_decodes_exactly(vae: VideoVAE):
    z = latent(16, 24, frames=2)
    untiled = vae.decode(z)
    vae.set_tiling(True)
    try:
        assert torch.equal(vae.decode(z), untiled)
    finally:
        vae.set_tiling(False)
