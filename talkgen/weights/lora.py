"""Merge LoRA files into the DiT's weights (original key names), in place, before any quantization.

Formats understood (one file may mix them; keys with or without a ``diffusion_model.`` prefix):

=====================================================  ==============================================
keys of one target module ``<m>``                      update of ``<m>.weight`` / ``<m>.bias``
=====================================================  ==============================================
``<m>.lora_down.weight`` + ``<m>.lora_up.weight``      ``W += scale * (alpha / rank) * up @ down``
``<m>.lora_A.weight`` + ``<m>.lora_B.weight``          the same (PEFT naming)
``<m>.alpha`` (optional, a scalar)                     the ``alpha / rank`` factor; absent -> 1
``<m>.diff``                                           ``W += scale * diff`` (norm weights included)
``<m>.diff_b`` (or ``<m>.lora_B.bias``)                ``b += scale * diff_b``
=====================================================  ==============================================

``<m>`` is an original Wan name (``blocks.0.self_attn.q``, optionally after ``diffusion_model.``),
its kohya spelling with underscores (``lora_unet_blocks_0_self_attn_q``, resolved against the
model's own module names), or after a ``transformer.`` prefix a diffusers name
(``transformer.blocks.0.attn1.to_q``, mapped back with diffusers' Wan rename table). ``rank`` is
the first dimension of the down matrix. Convolutions (``patch_embedding``) use the flattened
matrices. Every update is computed in float32 and the sum cast back to the parameter's dtype once.

**alpha.** The reference (``wan/wan_lora.py`` of both repositories) ignores ``.alpha`` keys and
merges ``up @ down * scale``. We apply the kohya / diffusers / PEFT semantics, ``alpha / rank``,
which is what a trainer that writes an alpha means. The LoRAs the reference recommends
(Kijai's lightx2v rank 32/64, FusionX) carry no alpha, so both give the same weights for them;
``use_alpha=False`` reproduces the reference on files that do carry one.

**Other differences from the reference**, all on inputs it mishandles: it only reads keys with the
``diffusion_model.`` prefix (others are silently ignored), reads no ``lora_A``/``lora_B`` keys
(although its warning names them), merges in bf16 on the GPU, and fails with an ``AttributeError``
on a key naming a module the model lacks. Here a key that names no parameter of the model, a
down without its up, or a shape that does not fit is a :class:`WeightsError` naming the key and
the file.

Scale: 1.0 per LoRA in this API; the reference CLI's default ``--lora_scale`` is 1.2
(:data:`REFERENCE_CLI_SCALE`). Several LoRAs stack (each merged with its own scale).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from talkgen.errors import WeightsError

REFERENCE_CLI_SCALE = 1.2  # generate_*.py's default --lora_scale


@dataclass(frozen=True)
class DistillPreset:
    """Sampling settings of a step-distilled LoRA (the reference README's recommendations).
    A text scale of 1 selects the 2-pass guidance (cond, drop-audio)."""

    name: str
    steps: int
    shift: float
    text_guide_scale: float
    audio_guide_scale: float


PRESETS: dict[str, DistillPreset] = {
    "lightx2v": DistillPreset("lightx2v", steps=4, shift=2.0, text_guide_scale=1.0, audio_guide_scale=2.0),
    "fusionx": DistillPreset("fusionx", steps=8, shift=2.0, text_guide_scale=1.0, audio_guide_scale=2.0),
}

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_", "lora_unet.")
_DOWN = ("lora_down.weight", "lora_A.weight")
_UP = ("lora_up.weight", "lora_B.weight")
_BIAS = ("diff_b", "lora_B.bias")  # diffusers/PEFT write the bias update as lora_B.bias
_SUFFIXES = (*_DOWN, *_UP, "alpha", *_BIAS, "diff")


@dataclass
class LoraModule:
    """The tensors of one LoRA file that target one module (keys of the file, not values)."""

    down: str | None = None
    up: str | None = None
    alpha: str | None = None
    diff: str | None = None
    diff_b: str | None = None


@dataclass
class LoraReport:
    """What a merge changed: parameter names, per file."""

    updated: dict[str, list[str]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.updated.values())


def _split_key(key: str) -> tuple[str, str, str] | None:
    """``prefix.<module>.<suffix>`` -> (prefix, module spelling, suffix), or None if no known suffix."""
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix):
            module = key[: -len(suffix) - 1]
            for prefix in PREFIXES:
                if module.startswith(prefix):
                    return prefix, module[len(prefix):], suffix
            return "", module, suffix
    return None


def _module_names(model: nn.Module) -> tuple[set[str], dict[str, str]]:
    """The model's modules with parameters, and their kohya spellings (dots -> underscores)."""
    names = {name.rpartition(".")[0] for name, _ in model.named_parameters()}
    kohya = {n.replace(".", "_"): n for n in names}
    return names, kohya


def _resolve(prefix: str, spelled: str, names: set[str], kohya: dict[str, str]) -> str | None:
    """An original name, a kohya spelling, or (``transformer.`` prefix) a diffusers name -> our module."""
    if prefix == "transformer.":
        from talkgen.weights.dit import diffusers_key_to_original

        spelled = diffusers_key_to_original(f"{spelled}.weight").removesuffix(".weight")
    if spelled in names:
        return spelled
    return kohya.get(spelled)


def parse_lora_keys(keys: Iterable[str], model: nn.Module, path: Path | str = "the LoRA file") -> dict[str, LoraModule]:
    """Group a LoRA file's keys by the model module they update; unknown keys are errors."""
    names, kohya = _module_names(model)
    params = dict(model.named_parameters())
    modules: dict[str, LoraModule] = {}
    for key in keys:
        split = _split_key(key)
        if split is None:
            raise WeightsError(
                f"LoRA key '{key}' in {path} is not a LoRA tensor talkgen understands "
                f"(expected a name ending in {', '.join('.' + s for s in _SUFFIXES)})."
            )
        prefix, spelled, suffix = split
        module = _resolve(prefix, spelled, names, kohya)
        if module is None:
            raise WeightsError(
                f"LoRA key '{key}' in {path} targets '{spelled}', which this DiT does not have: "
                "the LoRA is for another model (talkgen merges Wan2.1 I2V-14B LoRAs)."
            )
        target = f"{module}.bias" if suffix in _BIAS else f"{module}.weight"
        if target not in params:
            raise WeightsError(f"LoRA key '{key}' in {path} updates '{target}', which this DiT does not have.")
        entry = modules.setdefault(module, LoraModule())
        slot = ("diff_b" if suffix in _BIAS else "down" if suffix in _DOWN else "up" if suffix in _UP else suffix)
        if getattr(entry, slot) is not None:
            raise WeightsError(
                f"LoRA file {path} has two '{slot}' tensors for '{module}' ('{getattr(entry, slot)}', '{key}')."
            )
        setattr(entry, slot, key)
    for module, entry in modules.items():
        if (entry.down is None) != (entry.up is None):
            have = entry.down or entry.up
            missing = "up" if entry.up is None else "down"
            raise WeightsError(f"LoRA file {path} has '{have}' without its {missing} matrix.")
    return modules


def lora_delta(down: torch.Tensor, up: torch.Tensor, shape: torch.Size, alpha: float | None = None) -> torch.Tensor:
    """``(alpha / rank) * up @ down`` in float32, reshaped to the weight's shape (conv kernels)."""
    rank = down.shape[0]
    delta = up.float().reshape(up.shape[0], -1) @ down.float().reshape(rank, -1)
    if alpha is not None:
        delta = delta * (alpha / rank)
    return delta.reshape(shape)


@torch.no_grad()
def merge_lora(model: nn.Module, path: str | os.PathLike, scale: float = 1.0, *, use_alpha: bool = True) -> list[str]:
    """Merge one LoRA file into ``model``'s parameters in place; returns the updated names.

    Read tensor by tensor (``safe_open``), so host memory stays at one module's matrices."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"LoRA file {path} does not exist.")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:
        raise WeightsError(f"{path} is not a readable safetensors file ({exc}).") from exc
    params = dict(model.named_parameters())
    with handle as f:
        modules = parse_lora_keys(f.keys(), model, path)
        _check_shapes(modules, params, lambda key: tuple(f.get_slice(key).get_shape()), path)  # before any change
        updated: list[str] = []
        for module, entry in modules.items():
            weight = params[f"{module}.weight"]
            deltas: dict[str, torch.Tensor] = {}
            if entry.down is not None:
                down, up = f.get_tensor(entry.down).to(weight.device), f.get_tensor(entry.up).to(weight.device)
                alpha = float(f.get_tensor(entry.alpha).float().item()) if entry.alpha and use_alpha else None
                deltas[f"{module}.weight"] = lora_delta(down, up, weight.shape, alpha)
            if entry.diff is not None:
                diff = f.get_tensor(entry.diff).float().to(weight.device)
                deltas[f"{module}.weight"] = deltas.get(f"{module}.weight", 0) + diff
            if entry.diff_b is not None:
                deltas[f"{module}.bias"] = f.get_tensor(entry.diff_b).float()
            for target, delta in deltas.items():  # one rounding to the parameter's dtype per tensor
                param = params[target]
                param.copy_((param.float() + scale * delta.to(param.device)).to(param.dtype))
                updated.append(target)
    return updated


def _check_shapes(modules: dict[str, LoraModule], params: dict[str, torch.Tensor], shape_of, path: Path) -> None:
    def fail(key: str, shape: tuple[int, ...], target: str) -> None:
        raise WeightsError(
            f"LoRA key '{key}' in {path} gives an update of shape {shape} for '{target}' of shape "
            f"{tuple(params[target].shape)}: the LoRA is for another model size."
        )

    for module, entry in modules.items():
        weight = f"{module}.weight"
        w_shape = tuple(params[weight].shape)
        if entry.down is not None:
            down, up = shape_of(entry.down), shape_of(entry.up)
            if len(up) < 2 or up[1] != down[0] or any(n != 1 for n in up[2:]):
                raise WeightsError(f"LoRA file {path}: '{entry.up}' {up} and '{entry.down}' {down} do not multiply.")
            if up[0] != w_shape[0] or math.prod(down[1:]) != math.prod(w_shape[1:]):
                fail(entry.down, (up[0], math.prod(down[1:])), weight)
        if entry.diff is not None and shape_of(entry.diff) != w_shape:
            fail(entry.diff, shape_of(entry.diff), weight)
        if entry.diff_b is not None and shape_of(entry.diff_b) != tuple(params[f"{module}.bias"].shape):
            fail(entry.diff_b, shape_of(entry.diff_b), f"{module}.bias")


def merge_loras(model: nn.Module, loras: Sequence[str | os.PathLike | tuple[str | os.PathLike, float]], *,
                use_alpha: bool = True) -> LoraReport:
    """Merge several LoRAs in order, each a path (scale 1.0) or ``(path, scale)``."""
    report = LoraReport()
    for item in loras:
        path, scale = (item, 1.0) if isinstance(item, (str, os.PathLike)) else item
        report.updated[str(path)] = merge_lora(model, path, scale, use_alpha=use_alpha)
    return report
