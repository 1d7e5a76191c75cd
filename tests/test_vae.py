"""The Wan2.1 VAE against the reference's golden outputs, loaded from original key names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import golden_params, read_golden, rel_err
from talkgen.errors import InputError, WeightsError
from talkgen.models.vae import (
    LATENTS_MEAN,
    LATENTS_STD,
    VAEConfig,
    VideoVAE,
    original_names,
    write_tiny_vae,
)

TOLERANCE = 1e-4


def _write_golden_weights(golden: dict[str, torch.Tensor], path: Path, drop: str | None = None) -> Path:
    """The golden ``weights.*`` as a Wan2.1_VAE.pth-style file (a plain dict, original names)."""
    state = {k.removeprefix("weights."): v for k, v in golden.items() if k.startswith("weights.")}
    if drop is not None:
        del state[drop]
    torch.save(state, path)
    return path


@pytest.fixture(params=golden_params("vae_"))
def golden(request, tmp_path):
    tensors, meta = read_golden(request.param)
    config = VAEConfig.from_dict(meta["config"])
    return tensors, config, _write_golden_weights(tensors, tmp_path / "Wan2.1_VAE.pth")


def test_encode_matches_reference(golden):
    tensors, config, pth = golden
    vae = VideoVAE.from_original(pth, config)
    latent = vae.encode(tensors["inputs.video"])
    assert latent.shape == tensors["expected.latent"].shape
    assert rel_err(latent, tensors["expected.latent"]) <= TOLERANCE


def test_decode_matches_reference(golden):
    tensors, config, pth = golden
    vae = VideoVAE.from_original(pth, config)
    video = vae.decode(tensors["inputs.latent"])
    assert video.shape == tensors["expected.decoded"].shape
    assert rel_err(video, tensors["expected.decoded"]) <= TOLERANCE
    assert video.min() >= -1 and video.max() <= 1


def test_latent_constants_match_reference(golden):
    tensors, _, _ = golden
    assert torch.equal(tensors["const.latents_mean"], torch.tensor(LATENTS_MEAN))
    assert torch.equal(tensors["const.latents_std"], torch.tensor(LATENTS_STD))


def test_original_key_names_match_reference(golden):
    tensors, config, _ = golden
    released = {k.removeprefix("weights.") for k in tensors if k.startswith("weights.")}
    assert set(original_names(config)) == released


def test_missing_key_is_named(golden, tmp_path):
    tensors, config, _ = golden
    pth = _write_golden_weights(tensors, tmp_path / "broken.pth", drop="decoder.head.2.weight")
    with pytest.raises(WeightsError, match=r"'decoder\.head\.2\.weight' is missing"):
        VideoVAE.from_original(pth, config)


def test_unexpected_key_is_named(tmp_path):
    path = write_tiny_vae(tmp_path / "vae.pth")
    state = torch.load(path, weights_only=True)
    state["encoder.extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"encoder\.extra\.weight"):
        VideoVAE.from_original(path, VAEConfig.tiny())


def test_tiny_writer_round_trip(tmp_path):
    path = write_tiny_vae(tmp_path / "vae.pth", seed=0)
    again = write_tiny_vae(tmp_path / "again.pth", seed=0)
    first, second = torch.load(path, weights_only=True), torch.load(again, weights_only=True)
    assert first.keys() == second.keys() == set(original_names(VAEConfig.tiny()))
    assert all(torch.equal(first[k], second[k]) for k in first)

    vae = VideoVAE.from_original(path, VAEConfig.tiny())
    video = torch.rand(3, 5, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latent = vae.encode(video)
    assert latent.shape == (16, 2, 4, 6)
    assert torch.isfinite(latent).all() and latent.abs().max() < 50
    decoded = vae.decode(latent)
    assert decoded.shape == video.shape
    assert torch.isfinite(decoded).all() and 0.05 < decoded.std() < 0.9  # neither flat nor saturated


def test_bad_shapes_are_input_errors(tmp_path):
    vae = VideoVAE.from_original(write_tiny_vae(tmp_path / "vae.pth"), VAEConfig.tiny())
    with pytest.raises(InputError, match="4k\\+1 frames"):
        vae.encode(torch.zeros(3, 4, 32, 32))
    with pytest.raises(InputError, match="\\[3, F, H, W\\]"):
        vae.encode(torch.zeros(1, 3, 5, 32, 32))
    with pytest.raises(InputError, match="latent"):
        vae.decode(torch.zeros(1, 16, 2, 4, 4))


def test_config_presets():
    assert VAEConfig.wan21().dim == 96 and VAEConfig.tiny().dim == 8
    assert VAEConfig.from_dict('{"dim": 8, "dim_mult": [1, 2, 4, 4], "extra": 1}') == VAEConfig.tiny()
