"""The CLIP ViT-H/14 image encoder against the reference (golden files), loading and preprocessing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import golden_params, meta_json, read_golden, rel_err

from talkgen.errors import InputError, WeightsError
from talkgen.models.image_encoder import (
    CHECKPOINT_NAME,
    CLIP_MEAN,
    CLIP_STD,
    ImageEncoder,
    ImageEncoderConfig,
    build_model,
    original_shapes,
    preprocess,
    write_tiny_image_encoder,
)


def _write_original(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    """The golden ``weights.*`` tensors as the released file would hold them (a torch.save'd dict)."""
    torch.save({k.removeprefix("weights."): v for k, v in tensors.items() if k.startswith("weights.")}, path)
    return path


@pytest.mark.parametrize("golden", golden_params("clip_"))
def test_matches_reference(golden: Path, tmp_path: Path) -> None:
    tensors, meta = read_golden(golden)
    config = ImageEncoderConfig.from_golden_config(meta_json(meta, "config"))
    pth = _write_original(tensors, tmp_path / CHECKPOINT_NAME)
    encoder = ImageEncoder.from_original(pth, config, dtype=torch.float32)

    out = encoder.encode(tensors["inputs.video"])  # [3, 1, H, W], any H x W

    assert out.shape == tensors["expected.out"].shape == (1, config.num_tokens, config.dim)
    assert rel_err(out, tensors["expected.out"]) <= 1e-4


@pytest.mark.parametrize("golden", golden_params("clip_"))
def test_missing_tensor_is_named(golden: Path, tmp_path: Path) -> None:
    tensors, meta = read_golden(golden)
    config = ImageEncoderConfig.from_golden_config(meta_json(meta, "config"))
    del tensors["weights.visual.transformer.0.attn.to_qkv.weight"]
    pth = _write_original(tensors, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(WeightsError, match=r"visual\.transformer\.0\.attn\.to_qkv\.weight.*talkgen download"):
        ImageEncoder.from_original(pth, config, dtype=torch.float32)


def test_unexpected_visual_tensor_is_named(tmp_path: Path) -> None:
    pth = tmp_path / CHECKPOINT_NAME
    config = write_tiny_image_encoder(pth)
    state = torch.load(pth, weights_only=True)
    state["visual.proj_extra"] = torch.zeros(3)
    torch.save(state, pth)
    with pytest.raises(WeightsError, match=r"visual\.proj_extra"):
        ImageEncoder.from_original(pth, config)


def test_missing_file_says_how_to_download(tmp_path: Path) -> None:
    advice = r"Wan2\.1-I2V-14B-480P.*talkgen download --model multitalk"
    with pytest.raises(WeightsError, match=rf"{CHECKPOINT_NAME}.*{advice}"):
        ImageEncoder.from_original(tmp_path / CHECKPOINT_NAME, ImageEncoderConfig.tiny())


def test_tiny_round_trip(tmp_path: Path) -> None:
    config = write_tiny_image_encoder(tmp_path / "a.pth", seed=0)
    assert config == ImageEncoderConfig.tiny()
    state = torch.load(tmp_path / "a.pth", weights_only=True)
    assert set(original_shapes(config)) < set(state)  # plus a sliver of the text tower, skipped

    frame = torch.rand(3, 1, 40, 60, generator=torch.Generator().manual_seed(0)) * 2 - 1
    encoder = ImageEncoder.from_original(tmp_path / "a.pth", config, dtype=torch.float32)
    out = encoder.encode(frame)
    assert out.shape == (1, 5, 64) and torch.isfinite(out).all()

    write_tiny_image_encoder(tmp_path / "b.pth", seed=0)
    same = ImageEncoder.from_original(tmp_path / "b.pth", config, dtype=torch.float32)
    assert torch.equal(out, same.encode(frame))
    write_tiny_image_encoder(tmp_path / "c.pth", seed=1)
    other = ImageEncoder.from_original(tmp_path / "c.pth", config, dtype=torch.float32)
    assert not torch.equal(out, other.encode(frame))


def test_frame_layouts_agree(tmp_path: Path) -> None:
    config = write_tiny_image_encoder(tmp_path / "w.pth")
    encoder = ImageEncoder.from_original(tmp_path / "w.pth", config, dtype=torch.float32)
    image = torch.rand(3, 33, 47) * 2 - 1
    video = encoder.encode(image[:, None])  # [3, T=1, H, W], the reference's layout
    batch = encoder.encode(image[None])  # [B=1, 3, H, W]
    videos = encoder.encode(image[None, :, None])  # [B=1, 3, T=1, H, W]
    assert torch.equal(video, batch) and torch.equal(video, videos)
    with pytest.raises(InputError, match="ambiguous"):
        encoder.encode(torch.zeros(3, 3, 8, 8))
    with pytest.raises(InputError):
        encoder.encode(torch.zeros(2, 4, 8, 8))


def test_preprocess_is_bicubic_resize_then_clip_normalisation() -> None:
    grey = torch.zeros(1, 3, 30, 50)  # 0 in [-1, 1] is mid-grey: 0.5 after mapping to [0, 1]
    out = preprocess(grey, 28)
    want = (0.5 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert out.shape == (1, 3, 28, 28)
    assert torch.allclose(out, want.view(1, 3, 1, 1).expand_as(out), atol=1e-6)
    # Bicubic overshoots and the reference does not clamp: a hard edge goes past the input range.
    edge = torch.cat([-torch.ones(1, 3, 30, 25), torch.ones(1, 3, 30, 25)], dim=3)
    mapped = preprocess(edge, 28) * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    assert mapped.max() > 1.0 and mapped.min() < 0.0


def test_full_size_parameter_count() -> None:
    """ViT-H/14 visual tower of the file, and the part the image tokens depend on."""
    d, mlp, grid = 1280, 5120, 224 // 14
    per_block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
    stem = d * 3 * 14 * 14 + d + (1 + grid * grid) * d + 2 * d  # patch conv (no bias), cls, positions, pre-norm
    tail = 2 * d + d * 1024  # post-norm and projection head
    in_file = stem + 32 * per_block + tail
    assert in_file == 632_076_800
    config = ImageEncoderConfig.vit_h_14()
    assert sum(torch.Size(s).numel() for s in original_shapes(config).values()) == in_file

    model = build_model(config)  # 31 blocks on the meta device: the last block, post-norm and head are skipped
    assert sum(p.numel() for p in model.parameters()) == in_file - per_block - tail == 611_086_080
