"""The umT5 text encoder against the reference (golden files), and its loading and tokenizing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import golden_params, meta_json, read_golden, rel_err

from talkgen.errors import WeightsError
from talkgen.models.text_encoder import (
    CHECKPOINT_NAME,
    TOKENIZER_SUBDIR,
    TextEncoder,
    TextEncoderConfig,
    build_model,
    clean_prompt,
    original_shapes,
    write_tiny_text_encoder,
)


def _write_original(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    """The golden ``weights.*`` tensors as the released file would hold them (a torch.save'd dict)."""
    torch.save({k.removeprefix("weights."): v for k, v in tensors.items() if k.startswith("weights.")}, path)
    return path


@pytest.mark.parametrize("golden", golden_params("t5_"))
def test_matches_reference(golden: Path, tmp_path: Path) -> None:
    tensors, meta = read_golden(golden)
    config = TextEncoderConfig.from_golden_config(meta_json(meta, "config"))
    pth = _write_original(tensors, tmp_path / CHECKPOINT_NAME)
    encoder = TextEncoder.from_original(pth, None, config, dtype=torch.float32)

    mask = tensors["inputs.mask"]
    out = encoder.encode_ids(tensors["inputs.ids"], mask)

    real = mask[0].bool()  # the reference keeps only the real tokens
    assert out.shape == tensors["expected.out"].shape
    assert rel_err(out[:, real], tensors["expected.out"][:, real]) <= 1e-4


@pytest.mark.parametrize("golden", golden_params("t5_"))
def test_missing_tensor_is_named(golden: Path, tmp_path: Path) -> None:
    tensors, meta = read_golden(golden)
    config = TextEncoderConfig.from_golden_config(meta_json(meta, "config"))
    del tensors["weights.blocks.1.ffn.gate.0.weight"]
    pth = _write_original(tensors, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(WeightsError, match=r"blocks\.1\.ffn\.gate\.0\.weight.*talkgen download --model multitalk"):
        TextEncoder.from_original(pth, None, config, dtype=torch.float32)


def test_unexpected_tensor_is_named(tmp_path: Path) -> None:
    config = write_tiny_text_encoder(tmp_path)
    pth = tmp_path / CHECKPOINT_NAME
    state = torch.load(pth, weights_only=True)
    state["blocks.9.attn.q.weight"] = state["blocks.0.attn.q.weight"]
    torch.save(state, pth)
    with pytest.raises(WeightsError, match=r"blocks\.9\.attn\.q\.weight"):
        TextEncoder.from_original(pth, tmp_path / TOKENIZER_SUBDIR, config)


def test_missing_file_says_how_to_download(tmp_path: Path) -> None:
    advice = r"Wan2\.1-I2V-14B-480P.*talkgen download --model multitalk"
    with pytest.raises(WeightsError, match=rf"{CHECKPOINT_NAME}.*{advice}"):
        TextEncoder.from_original(tmp_path / CHECKPOINT_NAME, tmp_path / TOKENIZER_SUBDIR, TextEncoderConfig.tiny())


def test_tiny_round_trip(tmp_path: Path) -> None:
    config = write_tiny_text_encoder(tmp_path / "a", seed=0)
    assert config == TextEncoderConfig.tiny()
    state = torch.load(tmp_path / "a" / CHECKPOINT_NAME, weights_only=True)
    assert set(state) == set(original_shapes(config))
    assert all(t.dtype == torch.bfloat16 for t in state.values())

    encoder = TextEncoder.from_original(tmp_path / "a" / CHECKPOINT_NAME, tmp_path / "a" / TOKENIZER_SUBDIR, config)
    prompts = ["A woman is talking to the camera.", "two people"]
    ids, mask = encoder.tokenize(prompts)
    assert ids.shape == mask.shape == (2, 512)
    lengths = mask.sum(1).tolist()
    assert ids[0, lengths[0] - 1] == 1 and ids[0, lengths[0]] == 0  # </s> appended, then <pad>

    out = encoder.encode(prompts)
    assert [tuple(o.shape) for o in out] == [(n, config.dim) for n in lengths]
    assert out[0].dtype == torch.bfloat16 and all(torch.isfinite(o.float()).all() for o in out)

    write_tiny_text_encoder(tmp_path / "b", seed=0)
    again = TextEncoder.from_original(tmp_path / "b" / CHECKPOINT_NAME, tmp_path / "b" / TOKENIZER_SUBDIR, config)
    assert all(torch.equal(x, y) for x, y in zip(out, again.encode(prompts)))


def test_trimming_the_padding_changes_nothing(tmp_path: Path) -> None:
    """encode() runs only up to the longest prompt; the full 512-token run must agree."""
    config = write_tiny_text_encoder(tmp_path, seed=1)
    encoder = TextEncoder.from_original(tmp_path / CHECKPOINT_NAME, tmp_path / TOKENIZER_SUBDIR, config, torch.float32)
    prompts = ["a man speaking in a studio, close up", "smiling"]
    short = encoder.encode(prompts)
    ids, mask = encoder.tokenize(prompts)
    full = encoder.encode_ids(ids, mask)
    for row, n, got in zip(full, mask.sum(1).tolist(), short):
        assert rel_err(got, row[:n]) <= 1e-6


def test_prompt_cleaning_matches_reference_rules() -> None:
    assert clean_prompt("  a\t woman\n\n talks  ") == "a woman talks"
    assert clean_prompt("don\u2019t") == "don't"  # ftfy straightens curly quotes
    assert clean_prompt("salt &amp;amp; pepper") == "salt & pepper"  # HTML unescaped twice


def test_full_size_parameter_count() -> None:
    """umT5-XXL encoder: embedding + 24 x (attention, relative bias, gated FFN, 2 norms) + norm."""
    config = TextEncoderConfig.umt5_xxl()
    per_block = 4 * 4096 * 4096 + 32 * 64 + 3 * 4096 * 10240 + 2 * 4096
    expected = 256384 * 4096 + 24 * per_block + 4096
    assert expected == 5_680_910_336
    assert sum(torch.Size(s).numel() for s in original_shapes(config).values()) == expected

    model = build_model(config)  # meta device: no memory
    assert sum(p.numel() for p in model.parameters()) == expected  # the tied embedding counts once
    assert model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.shape == (32, 64)
