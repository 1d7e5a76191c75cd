"""The DiT block's residual adds and LayerNorms in one pass each: ``x + delta (* gate)``, LayerNorm
in float32 (with or without an affine weight / bias), then the AdaLN modulation ``* (1 + scale) +
shift``, in one Triton kernel that reads each token row once (one program per row).

It computes what ``talkgen.models.dit.DiTBlock`` does in torch, with the same roundings: the sum
rounded to the input dtype (it is the new residual), the normalised row rounded (``LayerNorm32``
returns the input dtype), then modulated in float32 and rounded once more. Inductor compiles the
same torch code into two-pass ("looped") reductions over the 5120-wide rows; this kernel keeps the
row in registers between the statistics and the output. Measured on an H100 (2026-12-06,
``benchmarks/check_layer_norm.py``): alone, both take the same time (0.35-0.59 ms per call at
[1, 32,928, 5120], 1.9-2.5 TB/s); inside the compiled block Inductor's four took 0.39-0.86 ms each in
a profile. The DiT at 10 blocks, A/B/A in one call (2026-12-07, ``bench_dit.py --layers 10
[--torch-norms]``): 0.7206 s per NFE with this kernel against 0.7234 / 0.7275 s without (0.4-1.0 %),
0.6011 against 0.6062 s with fp8 GEMMs (docs/performance.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_layer_norm(X, DELTA, GATE, WEIGHT, BIAS, SCALE, SHIFT, SUM, OUT, rows_per_batch, gate_batch_stride,
                    modulation_batch_stride, eps, WIDTH: tl.constexpr, BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr,
                    HAS_GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_MODULATION: tl.constexpr):
    """Row r of X [rows, WIDTH] -> SUM row r (with a delta) and OUT row r; the per-batch vectors
    (gate, scale, shift: float32) are read at row // rows_per_batch."""
    row = tl.program_id(0)
    batch = row // rows_per_batch
    cols = tl.arange(0, BLOCK)
    inside = cols < WIDTH
    offsets = row.to(tl.int64) * WIDTH + cols
    dtype = OUT.dtype.element_ty
    x = tl.load(X + offsets, mask=inside, other=0.0).to(tl.float32)
    if HAS_DELTA:
        delta = tl.load(DELTA + offsets, mask=inside, other=0.0).to(tl.float32)
        if HAS_GATE:
            delta = delta * tl.load(GATE + batch * gate_batch_stride + cols, mask=inside, other=0.0)
        x = (x + delta).to(dtype)  # the new residual, in the model's dtype as the torch path keeps it
        tl.store(SUM + offsets, x, mask=inside)
        x = x.to(tl.float32)
    mean = tl.sum(x, 0) / WIDTH
    centred = tl.where(inside, x - mean, 0.0)
    y = centred * tl.rsqrt(tl.sum(centred * centred, 0) / WIDTH + eps)
    if HAS_WEIGHT:
        y = y * tl.load(WEIGHT + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(BIAS + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_MODULATION:
        scale = tl.load(SCALE + batch * modulation_batch_stride + cols, mask=inside, other=0.0)
        shift = tl.load(SHIFT + batch * modulation_batch_stride + cols, mask=inside, other=0.0)
        y = y.to(dtype).to(tl.float32) * (1.0 + scale) + shift  # LayerNorm32 rounds before the modulation
    tl.store(OUT + offsets, y.to(dtype), mask=inside)


def _per_batch(vector: torch.Tensor | None, batch: int, width: int, name: str) -> tuple[torch.Tensor | None, int]:
    """A gate / scale / shift of shape [B, 1, C] or [B, C] (float32; a view with a batch stride is
    fine, as the chunks of ``modulation + e0`` are) -> (tensor, its batch stride)."""
    if vector is None:
        return None, 0
    flat = vector.reshape(vector.shape[0], -1) if vector.dim() == 3 else vector
    if flat.shape not in ((batch, width), (1, width)) or flat.dtype != torch.float32 or flat.stride(-1) != 1:
        raise ValueError(f"add_layer_norm: {name} must be float32 [B, 1, {width}] or [B, {width}] with B in "
                         f"(1, {batch}); got {vector.dtype} {tuple(vector.shape)}")
    return flat, (flat.stride(0) if flat.shape[0] > 1 else 0)


def _launch(x: torch.Tensor, delta: torch.Tensor | None, gate: torch.Tensor | None, weight: torch.Tensor | None,
            bias: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None,
            eps: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    b, n, width = x.shape
    if delta is not None and delta.shape != x.shape:
        raise ValueError(f"add_layer_norm: delta {tuple(delta.shape)} must have x's shape {tuple(x.shape)}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and param.shape != (width,):
            raise ValueError(f"add_layer_norm: {name} must be ({width},); got {tuple(param.shape)}")
    if (scale is None) != (shift is None):
        raise ValueError("add_layer_norm: scale and shift come together")
    gate, gate_stride = _per_batch(gate, b, width, "gate")
    scale, modulation_stride = _per_batch(scale, b, width, "scale")
    shift, shift_stride = _per_batch(shift, b, width, "shift")
    if shift is not None and (shift.shape != scale.shape or shift_stride != modulation_stride):
        raise ValueError(f"add_layer_norm: scale {tuple(scale.shape)} and shift {tuple(shift.shape)} must have "
                         "one shape and layout (chunks of one modulation tensor)")
    x = x.contiguous()
    delta = None if delta is None else delta.contiguous()
    total = x.new_empty(x.shape) if delta is not None else None
    out = x.new_empty(x.shape)
    if b * n:
        _add_layer_norm[(b * n,)](
            x, delta, gate, weight, bias, scale, shift, total, out, n, gate_stride, modulation_stride, eps,
            WIDTH=width, BLOCK=triton.next_power_of_2(width), HAS_DELTA=delta is not None,
            HAS_GATE=gate is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_MODULATION=scale is not None, num_warps=8 if width >= 4096 else 4)
    return total, out


@torch.library.custom_op("talkgen::add_layer_norm", mutates_args=())
def add_layer_norm(x: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x``, ``delta`` [B, L, C] (bf16 / fp16, CUDA); ``gate``, ``scale``, ``shift`` float32 [B, 1, C]
    or None; ``weight``, ``bias`` [C] or None. Returns ``(s, y)``: ``s = x + delta * gate`` in x's
    dtype, ``y = LayerNorm(s) * (1 + scale) + shift`` in x's dtype."""
    total, out = _launch(x, delta, gate, weight, bias, scale, shift, eps)
    return total, out


@add_layer_norm.register_fake
def _add_layer_norm_fake(x, delta, gate, weight, bias, scale, shift, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op("talkgen::layer_norm_modulate", mutates_args=())
def layer_norm_modulate(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        scale: torch.Tensor | None, shift: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` in x's dtype (the same arguments as :func:`add_layer_norm`)."""
    return _launch(x, None, None, weight, bias, scale, shift, eps)[1]


@layer_norm_modulate.register_fake
def _layer_norm_modulate_fake(x, weight, bias, scale, shift, eps):
    return x.new_empty(x.shape)
