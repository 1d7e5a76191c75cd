"""fp8 GEMMs for the DiT blocks: torchao's dynamic float8 (e4m3 activations and weights, one
scale per row of each), then ``torch.compile`` fuses the activation quantization into the
surrounding kernels and the GEMMs run on ``torch._scaled_mm``.

Only the linear layers inside the blocks are converted (about 97 % of the DiT's weights and
GEMM work); the embeddings, the head and the audio projection stay in bf16. The weights take one
byte each (plus a float32 scale per row), half of bf16, which also halves what a streamed block
moves over PCIe.

Switch: ``fp8="auto"`` (default: on where the GPU and torchao support it, else off), ``"on"``
(an error names what is missing) or ``"off"``. The CLI's ``--fp8/--no-fp8`` and the
``TALKGEN_FP8`` variable (``auto | on | off``) set it. Quality guard: ``benchmarks/check_fp8.py``
(output relative error against bf16 at most 3e-2 on random full-width weights).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from talkgen.errors import ResourceError

FP8_SETTINGS = ("auto", "on", "off")


def parse_fp8(value: bool | str | None) -> str:
    """``True``/``False``/``None`` or a setting name -> ``"auto" | "on" | "off"`` (``None``: the
    ``TALKGEN_FP8`` variable, else ``"auto"``)."""
    if value is None:
        value = os.environ.get("TALKGEN_FP8", "auto")
    if isinstance(value, bool):
        return "on" if value else "off"
    text = str(value).strip().lower()
    aliases = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}
    text = aliases.get(text, text)
    if text not in FP8_SETTINGS:
        raise ResourceError(f"fp8 = {value!r}: choose auto, on or off (TALKGEN_FP8, --fp8/--no-fp8).")
    return text


def fp8_unsupported_reason(device: torch.device | str) -> str | None:
    """Why fp8 GEMMs cannot run on ``device`` (``None`` when they can)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"fp8 GEMMs need an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); the device is {device.type}"
    if not torch.cuda.is_available():
        return "fp8 GEMMs need CUDA, which this torch build or machine does not have"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"fp8 GEMMs need compute capability 8.9 or newer; {name} has {major}.{minor}"
    try:
        import torchao  # noqa: F401
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow  # noqa: F401
    except ImportError as exc:
        return f"fp8 needs torchao ({exc}); install it with pip install 'talkgen[fp8]'"
    return None


def resolve_fp8(value: bool | str | None, device: torch.device | str) -> bool:
    """Whether to run the DiT blocks in fp8. ``"on"`` where it cannot run is a :class:`ResourceError`."""
    setting = parse_fp8(value)
    if setting == "off":
        return False
    reason = fp8_unsupported_reason(device)
    if reason is None:
        return True
    if setting == "on":
        raise ResourceError(f"fp8 was asked for (--fp8 / TALKGEN_FP8=on) but {reason}; run with --no-fp8.")
    return False


def is_block_linear(module: nn.Module, name: str) -> bool:
    """The layers converted: every ``nn.Linear`` (inside a block; the caller passes blocks)."""
    return isinstance(module, nn.Linear)


def quantize_fp8(module: nn.Module) -> nn.Module:
    """Convert the linear layers of ``module`` (a DiT block, on the GPU) to dynamic fp8, per-row
    scales, in place. Call before ``torch.compile`` runs the module for the first time."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    # set_inductor_config=False: torchao's recommended Inductor settings turn on coordinate-descent
    # tuning, which multiplies compile time for little gain here.
    # activation_value_lb: a row of zeros (the zero padding of the 512 text tokens, padded shard
    # tokens) has amax 0, so its scale would be 0 and the row 0/0 = NaN; a tiny floor keeps it 0.
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False,
                                                       activation_value_lb=1e-12)
    quantize_(module, config, filter_fn=is_block_linear)
    return module
