"""LoRA merging on the golden tiny DiT, with synthetic LoRA files in each format in use."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from talkgen.errors import WeightsError
from talkgen.weights.dit import load_dit
from talkgen.weights.lora import PRESETS, REFERENCE_CLI_SCALE, merge_lora, merge_loras

from conftest import golden_params, meta_json, read_golden
from test_dit import golden_weights, write_original_layout

GOLDEN = golden_params("multitalk_dit_")[0]


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    path = GOLDEN.values[0]
    if path is None:
        pytest.skip("no multitalk_dit_* golden file")
    tensors, meta = read_golden(path)
    base, audio = write_original_layout(golden_weights(tensors), meta_json(meta, "config"), tmp_path_factory.mktemp("dit"))
    model, _ = load_dit(base, audio, dtype=torch.float32)
    return model


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def random_pair(out_features: int, in_shape: tuple[int, ...], rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, *in_shape, generator=g) * 0.1
    up_shape = (out_features, rank) + (1,) * (len(in_shape) - 1)
    return down, torch.randn(*up_shape, generator=g) * 0.1


TARGETS = ["blocks.0.self_attn.q", "blocks.1.cross_attn.k_img", "blocks.0.ffn.2", "head.head"]


def expected_delta(w: torch.Tensor, down: torch.Tensor, up: torch.Tensor, factor: float) -> torch.Tensor:
    return factor * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(w.shape)


def test_lora_down_up_with_diff_and_diff_b(dit, tmp_path: Path) -> None:
    """Kijai/FusionX layout: diffusion_model. prefix, lora_down/lora_up, diff (norm), diff_b, conv."""
    model, before = copy.deepcopy(dit), weights(dit)
    tensors, pairs = {}, {}
    for i, name in enumerate(TARGETS + ["patch_embedding"]):
        w = before[f"{name}.weight"]
        pairs[name] = random_pair(w.shape[0], tuple(w.shape[1:]), rank=4, seed=i)
        tensors[f"diffusion_model.{name}.lora_down.weight"], tensors[f"diffusion_model.{name}.lora_up.weight"] = pairs[name]
    diff = torch.randn(before["blocks.1.norm3.weight"].shape) * 0.01
    diff_b = torch.randn(before["blocks.0.self_attn.q.bias"].shape) * 0.01
    tensors["diffusion_model.blocks.1.norm3.diff"] = diff
    tensors["diffusion_model.blocks.0.self_attn.q.diff_b"] = diff_b
    save_file(tensors, str(tmp_path / "lora.safetensors"))

    updated = merge_lora(model, tmp_path / "lora.safetensors", scale=0.7)
    after = model.state_dict()
    for name, (down, up) in pairs.items():
        w = before[f"{name}.weight"]
        torch.testing.assert_close(after[f"{name}.weight"], w + expected_delta(w, down, up, 0.7), rtol=0, atol=1e-6)
    torch.testing.assert_close(after["blocks.1.norm3.weight"], before["blocks.1.norm3.weight"] + 0.7 * diff, rtol=0, atol=1e-7)
    torch.testing.assert_close(after["blocks.0.self_attn.q.bias"], before["blocks.0.self_attn.q.bias"] + 0.7 * diff_b,
                               rtol=0, atol=1e-7)
    touched = {f"{n}.weight" for n in pairs} | {"blocks.1.norm3.weight", "blocks.0.self_attn.q.bias"}
    assert set(updated) == touched
    assert all(torch.equal(after[k], before[k]) for k in before if k not in touched)


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_lora_a_b_with_alpha_scales_by_alpha_over_rank(dit, tmp_path: Path, prefix: str) -> None:
    model, before = copy.deepcopy(dit), weights(dit)
    tensors, rank, alpha = {}, 8, 4.0
    for i, name in enumerate(TARGETS):
        w = before[f"{name}.weight"]
        down, up = random_pair(w.shape[0], tuple(w.shape[1:]), rank, seed=10 + i)
        tensors.update({f"{prefix}{name}.lora_A.weight": down, f"{prefix}{name}.lora_B.weight": up,
                        f"{prefix}{name}.alpha": torch.tensor(alpha)})
    save_file(tensors, str(tmp_path / "lora.safetensors"))
    merge_lora(model, tmp_path / "lora.safetensors")
    for name in TARGETS:
        w = before[f"{name}.weight"]
        delta = expected_delta(w, tensors[f"{prefix}{name}.lora_A.weight"], tensors[f"{prefix}{name}.lora_B.weight"], alpha / rank)
        torch.testing.assert_close(model.state_dict()[f"{name}.weight"], w + delta, rtol=0, atol=1e-6)

    reference_like = copy.deepcopy(dit)  # the reference ignores alpha
    merge_lora(reference_like, tmp_path / "lora.safetensors", use_alpha=False)
    w = before["head.head.weight"]
    delta = expected_delta(w, tensors[f"{prefix}head.head.lora_A.weight"], tensors[f"{prefix}head.head.lora_B.weight"], 1.0)
    torch.testing.assert_close(reference_like.state_dict()["head.head.weight"], w + delta, rtol=0, atol=1e-6)


def test_kohya_names(dit, tmp_path: Path) -> None:
    model, before = copy.deepcopy(dit), weights(dit)
    name = "blocks.1.audio_cross_attn.kv_linear"  # underscores inside names must survive the mapping
    w = before[f"{name}.weight"]
    down, up = random_pair(w.shape[0], (w.shape[1],), 2, seed=3)
    kohya = "lora_unet_" + name.replace(".", "_")
    save_file({f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up, f"{kohya}.alpha": torch.tensor(1.0)},
              str(tmp_path / "kohya.safetensors"))
    merge_lora(model, tmp_path / "kohya.safetensors", scale=2.0)
    torch.testing.assert_close(model.state_dict()[f"{name}.weight"], w + expected_delta(w, down, up, 2.0 * 0.5),
                               rtol=0, atol=1e-6)


def test_diffusers_names(dit, tmp_path: Path) -> None:
    model, before = copy.deepcopy(dit), weights(dit)
    w = before["blocks.0.self_attn.q.weight"]
    down, up = random_pair(w.shape[0], (w.shape[1],), 2, seed=5)
    bias = torch.randn(before["head.head.bias"].shape) * 0.01
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": down, "transformer.blocks.0.attn1.to_q.lora_B.weight": up,
               "transformer.proj_out.lora_B.bias": bias}, str(tmp_path / "diffusers.safetensors"))
    merge_lora(model, tmp_path / "diffusers.safetensors")
    after = model.state_dict()
    torch.testing.assert_close(after["blocks.0.self_attn.q.weight"], w + expected_delta(w, down, up, 1.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(after["head.head.bias"], before["head.head.bias"] + bias, rtol=0, atol=1e-7)


def test_several_loras_stack_with_their_scales(dit, tmp_path: Path) -> None:
    model, before = copy.deepcopy(dit), weights(dit)
    w = before["blocks.0.self_attn.o.weight"]
    files, expected = [], w.clone()
    for i, scale in enumerate([1.0, 0.5]):
        down, up = random_pair(w.shape[0], (w.shape[1],), 4, seed=20 + i)
        path = tmp_path / f"l{i}.safetensors"
        save_file({"diffusion_model.blocks.0.self_attn.o.lora_down.weight": down,
                   "diffusion_model.blocks.0.self_attn.o.lora_up.weight": up}, str(path))
        files.append((path, scale))
        expected += expected_delta(w, down, up, scale)
    report = merge_loras(model, files)
    assert report.count == 2
    torch.testing.assert_close(model.state_dict()["blocks.0.self_attn.o.weight"], expected, rtol=0, atol=1e-6)


def test_bfloat16_weights_merge_in_float32_and_round_once(dit, tmp_path: Path) -> None:
    model = copy.deepcopy(dit).to(torch.bfloat16)
    w = model.state_dict()["blocks.0.ffn.0.weight"].clone()
    down, up = random_pair(w.shape[0], (w.shape[1],), 4, seed=7)
    save_file({"diffusion_model.blocks.0.ffn.0.lora_down.weight": down.to(torch.bfloat16),
               "diffusion_model.blocks.0.ffn.0.lora_up.weight": up.to(torch.bfloat16)}, str(tmp_path / "l.safetensors"))
    merge_lora(model, tmp_path / "l.safetensors", scale=REFERENCE_CLI_SCALE)
    delta = expected_delta(w, down.to(torch.bfloat16).float(), up.to(torch.bfloat16).float(), REFERENCE_CLI_SCALE)
    merged = model.state_dict()["blocks.0.ffn.0.weight"]
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, (w.float() + delta).to(torch.bfloat16))


def test_merged_model_runs(dit, tmp_path: Path) -> None:
    """A zero-up LoRA leaves the forward unchanged; a real one changes it."""
    cfg = dit.config
    model = copy.deepcopy(dit)
    w = model.state_dict()["blocks.0.self_attn.v.weight"]
    down, up = random_pair(w.shape[0], (w.shape[1],), 2, seed=9)
    save_file({"blocks.0.self_attn.v.lora_down.weight": down, "blocks.0.self_attn.v.lora_up.weight": up * 0},
              str(tmp_path / "zero.safetensors"))
    save_file({"blocks.0.self_attn.v.lora_down.weight": down, "blocks.0.self_attn.v.lora_up.weight": up},
              str(tmp_path / "real.safetensors"))
    g = torch.Generator().manual_seed(0)
    inputs = dict(x=torch.randn(1, 16, 2, 8, 8, generator=g), t=torch.tensor([500.0]), y=torch.randn(1, 20, 2, 8, 8, generator=g),
                  context=[torch.randn(5, cfg.text_dim, generator=g)], clip_fea=torch.randn(1, 257, cfg.image_dim, generator=g),
                  audio=torch.randn(1, 1, 5, cfg.audio_window, cfg.audio_layers, cfg.audio_channels, generator=g))
    with torch.no_grad():
        base = model(**inputs)
        merge_lora(model, tmp_path / "zero.safetensors")  # in place: same storage, same kernels
        assert torch.equal(model(**inputs), base)
        merge_lora(model, tmp_path / "real.safetensors")
        assert not torch.allclose(model(**inputs), base)


@pytest.mark.parametrize(
    "tensors,message",
    [
        ({"diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.zeros(2, 128),
          "diffusion_model.blocks.7.self_attn.q.lora_up.weight": torch.zeros(128, 2)}, r"blocks\.7\.self_attn\.q\.lora_down\.weight.*bad\.safetensors"),
        ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 64),
          "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(128, 2)}, r"another model size"),
        ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 128)}, r"without its up"),
        ({"diffusion_model.blocks.0.self_attn.q.dora_scale": torch.zeros(1, 128)}, r"dora_scale.*bad\.safetensors"),
        ({"diffusion_model.blocks.0.norm2.diff": torch.zeros(128)}, r"blocks\.0\.norm2"),  # a norm without weights
        ({"diffusion_model.head.head.diff_b": torch.zeros(7)}, r"another model size"),
    ],
)
def test_bad_keys_are_weights_errors_naming_key_and_file(dit, tmp_path: Path, tensors, message) -> None:
    model, before = copy.deepcopy(dit), weights(dit)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match=message):
        merge_lora(model, tmp_path / "bad.safetensors")


def test_missing_file_is_a_weights_error(dit, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        merge_lora(copy.deepcopy(dit), tmp_path / "nope.safetensors")


def test_presets() -> None:
    assert (PRESETS["lightx2v"].steps, PRESETS["lightx2v"].shift) == (4, 2.0)
    assert (PRESETS["fusionx"].steps, PRESETS["fusionx"].shift) == (8, 2.0)
    for preset in PRESETS.values():
        assert (preset.text_guide_scale, preset.audio_guide_scale) == (1.0, 2.0)


def test_a_bad_file_changes_nothing(dit, tmp_path: Path) -> None:
    """Shapes are checked before any weight changes, so a failed merge leaves the model as it was."""
    model, before = copy.deepcopy(dit), weights(dit)
    w = before["blocks.0.self_attn.q.weight"]
    down, up = random_pair(w.shape[0], (w.shape[1],), 2, seed=1)
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up,
               "diffusion_model.blocks.1.self_attn.q.diff_b": torch.zeros(3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match=r"blocks\.1\.self_attn\.q\.diff_b"):
        merge_lora(model, tmp_path / "bad.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
