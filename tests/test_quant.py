"""The reference's optimum-quanto files, dequantized at load, on the golden tiny DiT.

Files are written here in quanto 0.2.6's on-disk format by our own code (per-row absmax scales,
``<m>.weight._data`` / ``._scale`` / ``.input_scale`` / ``.output_scale`` + the JSON map); when
optimum-quanto itself is importable, a file it writes is read as well.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from talkgen.errors import WeightsError
from talkgen.weights.dit import load_dit
from talkgen.weights.lora import merge_lora
from talkgen.weights.quant import load_quantized_dit, quant_map_path

from conftest import golden_params, meta_json, read_golden, rel_err
from test_dit import golden_weights, write_original_layout

GOLDEN = golden_params("multitalk_dit_")[0]
STORAGE = {"qint8": torch.int8, "qfloat8_e4m3fn": torch.float8_e4m3fn}


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    path = GOLDEN.values[0]
    if path is None:
        pytest.skip("no multitalk_dit_* golden file")
    tensors, meta = read_golden(path)
    config = meta_json(meta, "config")
    base, audio = write_original_layout(golden_weights(tensors), config, tmp_path_factory.mktemp("dit"))
    model, _ = load_dit(base, audio, dtype=torch.float32)
    return model, tensors, meta, base


def quantize_rows(weight: torch.Tensor, qtype: str, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """quanto's weight quantization: axis 0, scale = absmax / qmax (in the weight dtype)."""
    w = weight.to(scale_dtype)
    storage = STORAGE[qtype]
    qmax = 127.0 if storage == torch.int8 else torch.finfo(storage).max
    scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) / qmax
    data = w / scale
    if storage == torch.int8:
        data = data.round().clamp(-128, 127)
    else:
        data = data.clamp(torch.finfo(storage).min, torch.finfo(storage).max)
    return data.to(storage), scale


def write_quanto_file(model: nn.Module, qtype: str, path: Path, scale_dtype: torch.dtype = torch.bfloat16,
                      map_name: str | None = None) -> tuple[Path, Path]:
    """Every nn.Linear quantized (what ``quantize(model, weights=...)`` does), the rest as is."""
    state = {k: v.detach().to(scale_dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    qmap, out = {}, {}
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if module in linears and leaf == "weight":
            data, scale = quantize_rows(value, qtype, scale_dtype)
            out[f"{key}._data"], out[f"{key}._scale"] = data, scale
            out[f"{module}.input_scale"] = torch.ones((), dtype=scale_dtype)
            out[f"{module}.output_scale"] = torch.ones((), dtype=scale_dtype)
            qmap[module] = {"weights": qtype, "activations": "none"}
        else:
            out[key] = value.contiguous()
    save_file(out, str(path))
    map_path = path.with_name(map_name) if map_name else path.with_suffix(".json")
    map_path.write_text(json.dumps(qmap))
    return path, map_path


def forward(model, tensors, case="single"):
    inputs = {k.split(".inputs.")[1]: v for k, v in tensors.items() if k.startswith(f"{case}.inputs.")}
    with torch.no_grad():
        return model(x=inputs["x"][None], t=inputs["t"], y=inputs["y"][None], context=[inputs["context"]],
                     clip_fea=inputs["clip_fea"], audio=inputs["audio"][None],
                     ref_target_masks=inputs["ref_target_masks"])[0]


@pytest.mark.parametrize("qtype,max_rel_out", [("qint8", 2e-2), ("qfloat8_e4m3fn", 8e-2)])
def test_dequantized_weights_and_forward(golden, tmp_path: Path, qtype: str, max_rel_out: float) -> None:
    model, tensors, _, base = golden
    path, _ = write_quanto_file(model, qtype, tmp_path / f"infinitetalk_single_{qtype}.safetensors", torch.float32)
    loaded, report = load_quantized_dit(path, base_dir=base, dtype=torch.float32)
    assert loaded.config == model.config
    ours, original = loaded.state_dict(), model.state_dict()
    assert set(ours) == set(original)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for key, w in original.items():
        module = key.rpartition(".")[0]
        if module in linears and key.endswith(".weight"):
            data, scale = quantize_rows(w, qtype, torch.float32)
            assert torch.equal(ours[key], scale * data.float()), key  # exactly scale * data
            if qtype == "qint8":
                assert ((ours[key] - w).abs() <= scale / 2 * (1 + 1e-5)).all(), key
            else:  # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normal values
                assert ((ours[key] - w).abs() <= w.abs() / 16 + scale * 2**-9).all(), key
        else:
            assert torch.equal(ours[key], w), key
    err = rel_err(forward(loaded, tensors), tensors["single.expected.out"])
    assert err < max_rel_out, f"{qtype}: forward rel err {err:.2e}"


def test_bfloat16_file_loads_in_bfloat16_with_float32_time_path(golden, tmp_path: Path) -> None:
    model, tensors, _, base = golden
    path, _ = write_quanto_file(model, "qint8", tmp_path / "dit_model_int8.safetensors", torch.bfloat16,
                                map_name="dit_model_map_int8.json")
    loaded, _ = load_quantized_dit(path, base_dir=base, dtype=torch.bfloat16)
    assert loaded.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert loaded.time_projection[1].weight.dtype == torch.float32
    assert not any(p.is_meta for p in loaded.parameters())
    assert rel_err(forward(loaded.float(), tensors), tensors["single.expected.out"]) < 3e-2


def test_lora_merges_on_top_of_a_quantized_load(golden, tmp_path: Path) -> None:
    model, _, _, base = golden
    path, _ = write_quanto_file(model, "qint8", tmp_path / "infinitetalk_multi_int8.safetensors", torch.float32)
    loaded, _ = load_quantized_dit(path, base_dir=base, dtype=torch.float32)
    before = loaded.state_dict()["blocks.0.ffn.0.weight"].clone()
    down, up = torch.randn(2, before.shape[1]), torch.randn(before.shape[0], 2)
    save_file({"diffusion_model.blocks.0.ffn.0.lora_down.weight": down,
               "diffusion_model.blocks.0.ffn.0.lora_up.weight": up}, str(tmp_path / "l.safetensors"))
    merge_lora(loaded, tmp_path / "l.safetensors", 0.5)
    torch.testing.assert_close(loaded.state_dict()["blocks.0.ffn.0.weight"], before + 0.5 * up @ down)


def test_map_file_names(tmp_path: Path) -> None:
    q = tmp_path / "quant_models"
    q.mkdir()
    for name in ["dit_model_map_int8.json", "quantization_map_int8_FusionX.json", "t5_map_fp8.json",
                 "infinitetalk_single_fp8.json", "infinitetalk_multi_int8_lora.json"]:
        (q / name).write_text("{}")
    assert quant_map_path(q / "dit_model_int8.safetensors").name == "dit_model_map_int8.json"
    assert quant_map_path(q / "quant_model_int8_FusionX.safetensors").name == "quantization_map_int8_FusionX.json"
    assert quant_map_path(q / "t5_fp8.safetensors").name == "t5_map_fp8.json"
    assert quant_map_path(q / "infinitetalk_single_fp8.safetensors").name == "infinitetalk_single_fp8.json"
    assert quant_map_path(q / "infinitetalk_multi_int8_lora.safetensors").name == "infinitetalk_multi_int8_lora.json"
    with pytest.raises(WeightsError, match="dit_model_map_fp8.json"):
        quant_map_path(q / "dit_model_fp8.safetensors")


def _edit(path: Path, map_path: Path, *, drop: str | None = None, qmap_edit=None) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if drop:
        del tensors[drop]
    save_file(tensors, str(path))
    if qmap_edit:
        qmap = json.loads(map_path.read_text())
        qmap_edit(qmap)
        map_path.write_text(json.dumps(qmap))


@pytest.mark.parametrize(
    "drop,qmap_edit,message",
    [
        ("blocks.1.norm3.weight", None, r"blocks\.1\.norm3\.weight.*missing"),
        ("blocks.0.self_attn.q.weight._scale", None, r"blocks\.0\.self_attn\.q\.weight\._scale"),
        (None, lambda m: m.update({"blocks.0.self_attn.k": {"weights": "qint4", "activations": "none"}}), "qint4"),
        (None, lambda m: m.update({"blocks.0.self_attn.k": {"weights": "qint8", "activations": "qint8"}}), "activations"),
        (None, lambda m: m.update({"blocks.9.self_attn.k": {"weights": "qint8", "activations": "none"}}), r"blocks\.9"),
        (None, lambda m: m.pop("blocks.0.self_attn.k"), r"blocks\.0\.self_attn\.k\.weight\._data.*not in its quantization map"),
        (None, lambda m: m.update({"blocks.0.self_attn.k": {"weights": "qfloat8", "activations": "none"}}),
         r"blocks\.0\.self_attn\.k\.weight\._data.*torch\.int8.*float8"),
    ],
)
def test_damaged_files_are_weights_errors(golden, tmp_path: Path, drop, qmap_edit, message) -> None:
    model, _, _, base = golden
    path, map_path = write_quanto_file(model, "qint8", tmp_path / "dit_model_int8.safetensors",
                                       map_name="dit_model_map_int8.json")
    _edit(path, map_path, drop=drop, qmap_edit=qmap_edit)
    with pytest.raises(WeightsError, match=message):
        load_quantized_dit(path, base_dir=base, dtype=torch.float32)


@pytest.mark.parametrize("qtype", ["qint8", "qfloat8"])
def test_a_file_written_by_optimum_quanto(golden, tmp_path: Path, qtype: str) -> None:
    """optimum-quanto 0.2.6 itself (not a dependency; install it to run this) quantizes, freezes
    and serialises the model as the reference did; we read it and match quanto's dequantize()."""
    quanto = pytest.importorskip("optimum.quanto", reason="optimum-quanto is not installed (test-only cross-check)")
    model, tensors, _, base = golden
    qmodel = copy.deepcopy(model).to(torch.bfloat16)
    quanto.quantize(qmodel, weights=getattr(quanto, qtype))
    quanto.freeze(qmodel)
    state = {k: v.contiguous() for k, v in qmodel.state_dict().items()}
    path = tmp_path / "quant_models" / f"dit_model_{'int8' if qtype == 'qint8' else 'fp8'}.safetensors"
    path.parent.mkdir()
    save_file(state, str(path))
    qmap = quanto.quantization_map(qmodel)
    path.with_name(path.name.replace("dit_model_", "dit_model_map_").replace(".safetensors", ".json")).write_text(json.dumps(qmap))
    assert "blocks.0.self_attn.q" in qmap and f"blocks.0.self_attn.q.weight._data" in state

    loaded, _ = load_quantized_dit(path, base_dir=base, dtype=torch.bfloat16)
    ours = loaded.state_dict()
    for name, module in qmodel.named_modules():
        if name in qmap:
            expected = module.weight.dequantize()
            got = ours[f"{name}.weight"]
            assert torch.equal(got.to(expected.dtype), expected), name
    err = rel_err(forward(loaded.float(), tensors), tensors["single.expected.out"])
    assert err < (3e-2 if qtype == "qint8" else 8e-2)
