"""Self-attention's q / k preparation in one pass: RMSNorm over the model width, then the 3-D RoPE
rotation of every head, in one Triton kernel (one program per token row).

It computes what ``talkgen.models.dit`` does in torch, with the same roundings: the norm in float32,
rounded to the input dtype, times the weight (rounded again), then each (even, odd) pair rotated in
float32 and rounded once. Inductor compiles the same torch code into a two-pass reduction at
~1.2 TB/s (0.58 ms per [32,928 x 5120] tensor on an H100, 2026-12-06); this kernel reads the row
once (its first version: 0.26 ms there, ~2.6 TB/s; as committed, 0.18 ms on an H200). In the DiT:
0.64 ms less per block (a 10-block A/B on an H200, -0.86 % per NFE; docs/performance.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_rope(X, W, COS, SIN, OUT, rows_per_batch, eps, WIDTH: tl.constexpr, BLOCK: tl.constexpr,
                   HALF_HEAD: tl.constexpr):
    """Row r of X [rows, WIDTH] -> OUT row r; token r % rows_per_batch picks the cos / sin row."""
    row = tl.program_id(0)
    token = row % rows_per_batch
    cols = tl.arange(0, BLOCK)
    inside = cols < WIDTH
    x = tl.load(X + row.to(tl.int64) * WIDTH + cols, mask=inside, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, 0) / WIDTH + eps)
    weight = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    # RMSNorm's two roundings: the normalised row, then its product with the weight (a bf16 / fp16
    # product is a float32 one rounded, spelled out here)
    dtype = OUT.dtype.element_ty
    y = ((x * inv_rms).to(dtype).to(tl.float32) * weight).to(dtype).to(tl.float32)
    even, odd = tl.split(tl.reshape(y, [BLOCK // 2, 2]))
    pair = tl.arange(0, BLOCK // 2) % HALF_HEAD  # the rotation angle of a pair depends on its place in the head
    cos = tl.load(COS + token * HALF_HEAD + pair)
    sin = tl.load(SIN + token * HALF_HEAD + pair)
    out = tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), [BLOCK])
    tl.store(OUT + row.to(tl.int64) * WIDTH + cols, out.to(OUT.dtype.element_ty), mask=inside)


@torch.library.custom_op("talkgen::rms_norm_rope", mutates_args=())
def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                  eps: float) -> torch.Tensor:
    """``x`` [B, L, C] (bf16 / fp16, CUDA), ``weight`` [C], ``cos`` / ``sin`` [L, C / heads / 2]
    float32 -> RoPE(RMSNorm(x)) as [B, L, heads, C / heads] in x's dtype."""
    b, n, width = x.shape
    half_head = width // heads // 2
    if cos.shape != (n, half_head) or sin.shape != (n, half_head) or weight.shape != (width,):
        raise ValueError(f"rms_norm_rope: x {tuple(x.shape)} with {heads} heads needs weight ({width},) and "
                         f"cos / sin ({n}, {half_head}); got {tuple(weight.shape)}, {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    x = x.contiguous()
    out = torch.empty_like(x)
    if b * n:
        _rms_norm_rope[(b * n,)](x, weight.to(x.dtype).contiguous(), cos.contiguous(), sin.contiguous(), out, n, eps,
                                 WIDTH=width, BLOCK=triton.next_power_of_2(width), HALF_HEAD=half_head,
                                 num_warps=8 if width >= 4096 else 4)
    return out.view(b, n, heads, width // heads)


@rms_norm_rope.register_fake
def _rms_norm_rope_fake(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                        eps: float) -> torch.Tensor:
    b, n, width = x.shape
    return x.new_empty(b, n, heads, width // heads)
