"""Read the reference's optimum-quanto files (``quant_models/*.safetensors`` + JSON map), dequantized.

The reference quantizes the whole DiT (base + audio, optionally with FusionX merged) and the umT5
encoder with optimum-quanto 0.2.6, weights only, and loads them back with
``optimum.quanto.requantize``. talkgen does not depend on quanto: it reads the same files and
dequantizes each weight as it streams it into a model built on the meta device.

On-disk format (optimum-quanto 0.2.6, ``QModuleMixin._save_to_state_dict`` and
``WeightQBytesTensor``), for every module ``<m>`` in the map, in practice every ``nn.Linear``::

    <m>.weight._data   int8 (qint8) or float8_e4m3fn (qfloat8) [out, in]: the quantized values
    <m>.weight._scale  [out, 1] in the model's dtype: one scale per output row (axis 0, absmax)
    <m>.bias           unquantized
    <m>.input_scale, <m>.output_scale   scalars for activation quantization (unused: "none")

and every other tensor (norms, modulation, the patch-embedding conv) under its own name. The map
JSON, ``{"blocks.0.self_attn.q": {"weights": "qint8", "activations": "none"}, ...}``, names the
quantized modules; a weight dequantizes to ``_scale * _data`` (quanto's ``QBytesDequantizer``; for
float8 the data is first cast to the scale dtype). We form that product in float32, where it is
exact, and the loader casts it once to the run dtype: in bf16 this is bit-identical to quanto's
own ``dequantize()``.

File pairs (spec 1.4/1.5): MultiTalk ``dit_model_<q>.safetensors`` + ``dit_model_map_<q>.json``,
``quant_model_int8_FusionX.safetensors`` + ``quantization_map_int8_FusionX.json``, ``t5_<q>`` +
``t5_map_<q>.json``; InfiniteTalk ``<name>.safetensors`` + ``<name>.json``. The reference loads
non-strictly (``load_state_dict(strict=False)``); here a missing or unexpected tensor is an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from talkgen.errors import WeightsError
from talkgen.models.dit import DiTConfig, WanMultiTalkDiT
from talkgen.weights.loading import LoadReport, TensorGetter, WeightSet, load_streaming, meta_device

# quanto qtype names (``qtype.name``; ``qfloat8`` is an alias of e4m3fn) -> storage dtype
QTYPES: dict[str, torch.dtype] = {
    "qint8": torch.int8,
    "qfloat8": torch.float8_e4m3fn,
    "qfloat8_e4m3fn": torch.float8_e4m3fn,
    "qfloat8_e4m3fnuz": torch.float8_e4m3fnuz,
    "qfloat8_e5m2": torch.float8_e5m2,
}

_AUX_SUFFIXES = (".input_scale", ".output_scale")


def quant_map_path(weights: str | Path) -> Path:
    """Where the reference looks for the map of a quantized file (the first that exists)."""
    weights = Path(weights)
    name = weights.name
    candidates = [weights.with_suffix(".json")]  # InfiniteTalk: <name>.json
    if m := re.fullmatch(r"dit_model_(\w+)\.safetensors", name):
        candidates.insert(0, weights.with_name(f"dit_model_map_{m.group(1)}.json"))
    if m := re.fullmatch(r"t5_(\w+)\.safetensors", name):
        candidates.insert(0, weights.with_name(f"t5_map_{m.group(1)}.json"))
    if m := re.fullmatch(r"quant_model_(\w+?)_(\w+)\.safetensors", name):
        candidates.insert(0, weights.with_name(f"quantization_map_{m.group(1)}_{m.group(2)}.json"))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise WeightsError(
        f"The quantization map of {weights} is missing (looked for {', '.join(c.name for c in candidates)} beside it); "
        "it is published next to the quantized file in the same Hub folder (quant_models/)."
    )


def read_quant_map(path: str | Path) -> dict[str, dict[str, str]]:
    path = Path(path)
    try:
        qmap = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"Quantization map {path} could not be read as JSON ({exc}).") from exc
    if not isinstance(qmap, dict) or not all(isinstance(v, dict) for v in qmap.values()):
        raise WeightsError(f"Quantization map {path} is not a {{module: {{weights, activations}}}} object.")
    for module, entry in qmap.items():
        weights, activations = entry.get("weights", "none"), entry.get("activations", "none")
        if weights != "none" and weights not in QTYPES:
            raise WeightsError(
                f"Module '{module}' in {path} is quantized as {weights}; talkgen reads the 8-bit quanto types "
                f"({', '.join(QTYPES)}), which are the ones the reference publishes."
            )
        if activations != "none":
            raise WeightsError(
                f"Module '{module}' in {path} quantizes activations ({activations}); the reference's files are "
                "weight-only and talkgen dequantizes weights only."
            )
    return qmap


def dequantize(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale * data`` in float32 (exact for 8-bit data and a bf16/fp16/fp32 scale)."""
    return scale.float() * data.float()


def iter_quantized(path: str | Path, qmap: dict[str, dict[str, str]]) -> Iterator[tuple[str, TensorGetter, Path]]:
    """``(name, getter, path)`` for every tensor of a quanto file, quantized weights dequantized
    (float32) under their plain names, tensor by tensor; feed it to ``load_streaming``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Quantized weight file {path} does not exist.")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:
        raise WeightsError(f"{path} is not a readable safetensors file ({exc}); download it again.") from exc
    with handle as f:
        keys = set(f.keys())
        for key in sorted(keys):
            if key.endswith(".weight._scale"):
                if key.removesuffix("._scale") + "._data" not in keys:
                    data_key = key.removesuffix("._scale") + "._data"
                    raise WeightsError(f"{path} has '{key}' but no '{data_key}'; the file is damaged.")
                continue
            if key.endswith(_AUX_SUFFIXES) and key.rpartition(".")[0] in qmap:
                continue  # quanto's activation scales: ones, unused in weight-only quantization
            if key.endswith(".weight._data"):
                weight = key.removesuffix("._data")
                module = weight.removesuffix(".weight")
                if module not in qmap or qmap[module].get("weights", "none") == "none":
                    raise WeightsError(f"'{key}' in {path} is quantized but '{module}' is not in its quantization map.")
                scale_key = f"{weight}._scale"
                if scale_key not in keys:
                    raise WeightsError(f"'{key}' in {path} has no '{scale_key}'; the file is damaged.")
                expected = QTYPES[qmap[module]["weights"]]

                def getter(f=f, key=key, scale_key=scale_key, expected=expected) -> torch.Tensor:
                    data = f.get_tensor(key)
                    if data.dtype != expected:
                        raise WeightsError(f"'{key}' in {path} is {data.dtype}, but its map says {expected}.")
                    return dequantize(data, f.get_tensor(scale_key))

                yield weight, getter, path
                continue
            yield key, (lambda f=f, key=key: f.get_tensor(key)), path


def quant_weight_set(path: str | Path) -> WeightSet:
    """The download advice for a quantized file, from its name (spec 1.4/1.5 names)."""
    from talkgen.weights import manifest

    name = Path(path).name.lower()
    model = "infinitetalk" if "infinitetalk" in name else "multitalk"
    people = "multi" if "_multi_" in name else "single"
    quant = "fp8" if "fp8" in name else "int8"
    lora = "fusionx" if ("fusionx" in name or name.endswith("_lora.safetensors")) else None
    try:
        command = manifest.download_command(model=model, people=people, quant=quant, lora=lora)
    except Exception:  # a name outside the published set: still say where such files come from
        command = manifest.download_command(model=model, people=people, quant=quant)
    repo = "MeiGen-AI/InfiniteTalk" if model == "infinitetalk" else "MeiGen-AI/MeiGen-MultiTalk"
    return WeightSet(name=f"{Path(path).name} (pre-quantized DiT)", repo_id=repo, download_command=command)


def load_quantized_dit(
    path: str | Path,
    map_path: str | Path | None = None,
    *,
    config: DiTConfig | None = None,
    base_dir: str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> tuple[WanMultiTalkDiT, LoadReport]:
    """Build the DiT on meta and stream a quanto-quantized file into it, dequantizing each weight.

    ``config``: the DiT's shape; else ``base_dir/config.json`` (the reference reads the base
    folder's), else the 14B preset. The time path and modulation stay float32 as in ``load_dit``.
    LoRAs can be merged afterwards with :func:`talkgen.weights.lora.merge_loras` (the reference
    cannot: it only takes pre-merged quantized files).
    """
    path = Path(path)
    qmap = read_quant_map(Path(map_path) if map_path is not None else quant_map_path(path))
    if config is None:
        config_file = Path(base_dir) / "config.json" if base_dir is not None else None
        config = DiTConfig.from_json(config_file) if config_file and config_file.is_file() else DiTConfig.wan_i2v_14b()
    with meta_device():
        model = WanMultiTalkDiT(config)
    modules = dict(model.named_modules())
    for name in qmap:
        if name not in modules:
            raise WeightsError(f"Quantization map of {path} names module '{name}', which this DiT does not have; "
                               "the file is for another model.")
    report = load_streaming(
        model, iter_quantized(path, qmap), weight_set=quant_weight_set(path), dtype=dtype, device=device,
        keep_float32=WanMultiTalkDiT.keeps_float32, expected_files=str(path),
    )
    return model.eval(), report
