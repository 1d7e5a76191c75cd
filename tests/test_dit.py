"""The DiT against the reference's outputs, loaded through the real original-layout loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from talkgen.errors import WeightsError
from talkgen.models.dit import DiTConfig, WanMultiTalkDiT
from talkgen.weights.dit import is_audio_key, load_dit
from talkgen.weights.loading import meta_device

from conftest import golden_params, meta_json, read_golden, rel_err


def write_original_layout(weights: dict[str, torch.Tensor], config: dict, root: Path, shards: int = 2) -> tuple[Path, Path]:
    """Base keys as index + shards in a Wan folder, audio keys in a separate multitalk file."""
    base, audio = root / "Wan2.1-I2V-14B-480P", root / "MeiGen-MultiTalk"
    base.mkdir(parents=True)
    audio.mkdir(parents=True)
    base_keys = sorted(k for k in weights if not is_audio_key(k))
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = base_keys[i::shards]
        save_file({k: weights[k].contiguous() for k in part}, str(base / name))
        weight_map.update({k: name for k in part})
    (base / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (base / "config.json").write_text(json.dumps(config))
    save_file({k: weights[k].contiguous() for k in weights if is_audio_key(k)}, str(audio / "multitalk.safetensors"))
    return base, audio / "multitalk.safetensors"


def golden_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}


@pytest.mark.parametrize("path", golden_params("multitalk_dit_"))
def test_dit_matches_reference(path: Path, tmp_path: Path) -> None:
    tensors, meta = read_golden(path)
    base, audio_file = write_original_layout(golden_weights(tensors), meta_json(meta, "config"), tmp_path)
    model, _ = load_dit(base, audio_file, dtype=torch.float32)
    for case in meta_json(meta, "cases"):
        inputs = {k.split(".inputs.")[1]: v for k, v in tensors.items() if k.startswith(f"{case}.inputs.")}
        audio = inputs["audio"]
        with torch.no_grad():
            tokens = model.embed_audio(audio[None])
            out = model(
                x=inputs["x"][None], t=inputs["t"], y=inputs["y"][None], context=[inputs["context"]],
                clip_fea=inputs["clip_fea"], audio=audio[None], ref_target_masks=inputs["ref_target_masks"],
            )[0]
        people = audio.shape[0]
        expected_tokens = tensors[f"{case}.debug.audio_tokens"]  # [people, T, n, C]
        assert rel_err(tokens[0], expected_tokens.permute(1, 0, 2, 3).flatten(1, 2)) <= 1e-4, case
        err = rel_err(out, tensors[f"{case}.expected.out"])
        assert err <= 1e-4, f"{case} ({people} people): rel err {err:.2e}"


def test_full_size_key_set_and_parameter_count() -> None:
    with meta_device():
        model = WanMultiTalkDiT(DiTConfig.wan_i2v_14b())
    state = model.state_dict()
    assert len(state) == 1633
    assert sum(t.numel() for t in state.values()) == 18_882_046_784
    audio = [k for k in state if is_audio_key(k)]
    assert len(audio) == 330
    assert sum(state[k].numel() for k in audio) == 2_487_168_000
    assert tuple(state["audio_proj.proj1_vf.weight"].shape) == (512, 73728)
    assert tuple(state["blocks.39.audio_cross_attn.kv_linear.weight"].shape) == (10240, 768)
    assert tuple(state["patch_embedding.weight"].shape) == (5120, 36, 1, 2, 2)


@pytest.mark.parametrize("path", golden_params("multitalk_dit_"))
def test_missing_tensor_is_named(path: Path, tmp_path: Path) -> None:
    tensors, meta = read_golden(path)
    weights = golden_weights(tensors)
    del weights["blocks.1.cross_attn.k_img.weight"]
    base, audio_file = write_original_layout(weights, meta_json(meta, "config"), tmp_path)
    with pytest.raises(WeightsError, match=r"blocks\.1\.cross_attn\.k_img\.weight.*Wan2\.1-I2V-14B-480P.*talkgen download"):
        load_dit(base, audio_file, dtype=torch.float32)


@pytest.mark.parametrize("path", golden_params("multitalk_dit_"))
def test_missing_audio_tensor_points_at_the_audio_weights(path: Path, tmp_path: Path) -> None:
    tensors, meta = read_golden(path)
    weights = golden_weights(tensors)
    del weights["blocks.0.norm_x.bias"]
    base, audio_file = write_original_layout(weights, meta_json(meta, "config"), tmp_path)
    with pytest.raises(WeightsError, match=r"blocks\.0\.norm_x\.bias.*MeiGen-MultiTalk"):
        load_dit(base, audio_file, dtype=torch.float32)


@pytest.mark.parametrize("path", golden_params("multitalk_dit_"))
def test_unexpected_tensor_is_named(path: Path, tmp_path: Path) -> None:
    tensors, meta = read_golden(path)
    weights = golden_weights(tensors)
    weights["blocks.0.self_attn.extra.weight"] = torch.zeros(2)
    base, audio_file = write_original_layout(weights, meta_json(meta, "config"), tmp_path)
    with pytest.raises(WeightsError, match=r"blocks\.0\.self_attn\.extra\.weight"):
        load_dit(base, audio_file, dtype=torch.float32)


@pytest.mark.parametrize("path", golden_params("multitalk_dit_"))
def test_loads_in_bfloat16_with_float32_time_path(path: Path, tmp_path: Path) -> None:
    tensors, meta = read_golden(path)
    base, audio_file = write_original_layout(golden_weights(tensors), meta_json(meta, "config"), tmp_path)
    model, report = load_dit(base, audio_file, dtype=torch.bfloat16)
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert model.time_projection[1].weight.dtype == torch.float32
    assert report.source_of["audio_proj.proj1.weight"].endswith("multitalk.safetensors")
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("path", golden_params("multitalk_dit_"))
def test_diffusers_layout_loads_to_the_same_model(path: Path, tmp_path: Path) -> None:
    """The -Diffusers repo's transformer/ (diffusers names) + the separate audio file."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    tensors, meta = read_golden(path)
    weights = golden_weights(tensors)
    base = {k: v for k, v in weights.items() if not is_audio_key(k)}
    converted = convert_wan_transformer_to_diffusers(dict(base))
    assert "blocks.0.attn2.add_k_proj.weight" in converted  # really diffusers names
    transformer = tmp_path / "transformer"
    transformer.mkdir()
    save_file({k: v.contiguous() for k, v in converted.items()}, str(transformer / "diffusion_pytorch_model.safetensors"))
    audio_file = tmp_path / "multitalk.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items() if is_audio_key(k)}, str(audio_file))
    config = DiTConfig.from_dict(meta_json(meta, "config"))
    model, _ = load_dit(transformer, audio_file, config=config, dtype=torch.float32, layout="diffusers")
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name].to(value.dtype)), name
