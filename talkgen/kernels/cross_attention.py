"""The I2V cross-attention's two attentions and their sum in one Triton kernel.

``ImageTextCrossAttention`` attends each video token to the 512 text tokens and, separately, to
the 257 image tokens, and adds the two outputs. In torch that is two SDPA calls (each writes a
[L, 5120] output) and an add that reads both and writes the sum: three passes over L x 5120 bf16
for what the following projection reads once. This kernel keeps both online softmaxes of a block
of query rows in registers and writes only the sum, reading each query row once.

The arithmetic is the torch path's: scores and softmax in float32 (base 2, the 1/sqrt(D) scale
folded into one multiplier), P in the input dtype for the P V product as in flash attention, each
attention's output rounded to the input dtype, then the two added in float32 and rounded (a bf16
``+``). K and V are short (hundreds of tokens) and sit in L2, so they are read with plain loads.

Layout: ``q`` [B, Lq, H, D], ``k_*`` / ``v_*`` [B, Lk, H, D] (any strides whose last one is 1: the
DiT passes its projections viewed per head), output [B, Lq, H * D].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Config:
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2


DEFAULT_CONFIG = Config()
VARIANTS = (
    Config(128, 64, 8, 2),
    Config(128, 128, 8, 2),
    Config(128, 64, 4, 2),
    Config(64, 64, 4, 2),
    Config(128, 64, 8, 3),
)


@triton.jit
def _attend(q, K, V, length, stride_kn, stride_vn, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            D: tl.constexpr, STAGES: tl.constexpr):
    """softmax(q K^T) V of one block of query rows against one (batch, head)'s ``length`` keys,
    rounded to the input dtype."""
    offs_d = tl.arange(0, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in tl.range(0, length, BLOCK_N, num_stages=STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        inside = offs_n < length
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=inside[:, None], other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=inside[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(inside[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return (acc / l_i[:, None]).to(q.dtype)


@triton.jit
def _text_image_attention(Q, KT, VT, KI, VI, OUT, Lq, Lt, Li, H,
                          sq_b, sq_l, sq_h, st_b, st_l, st_h, sti_b, sti_l, sti_h,
                          si_b, si_l, si_h, svi_b, svi_l, svi_h, scale,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, STAGES: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    rows = offs_m < Lq
    q_ptrs = Q + b.to(tl.int64) * sq_b + h * sq_h + offs_m[:, None].to(tl.int64) * sq_l + offs_d[None, :]
    q = tl.load(q_ptrs, mask=rows[:, None], other=0.0)
    text = _attend(q, KT + b.to(tl.int64) * st_b + h * st_h, VT + b.to(tl.int64) * sti_b + h * sti_h, Lt,
                   st_l, sti_l, scale, BLOCK_M, BLOCK_N, D, STAGES)
    image = _attend(q, KI + b.to(tl.int64) * si_b + h * si_h, VI + b.to(tl.int64) * svi_b + h * svi_h, Li,
                    si_l, svi_l, scale, BLOCK_M, BLOCK_N, D, STAGES)
    out = (text.to(tl.float32) + image.to(tl.float32)).to(q.dtype)
    out_ptrs = OUT + (b.to(tl.int64) * Lq + offs_m[:, None]) * (H * D) + h * D + offs_d[None, :]
    tl.store(out_ptrs, out, mask=rows[:, None])


def launch(q: torch.Tensor, k_text: torch.Tensor, v_text: torch.Tensor, k_image: torch.Tensor,
           v_image: torch.Tensor, config: Config = DEFAULT_CONFIG) -> torch.Tensor:
    """The kernel on [B, L, H, D] tensors (see the module docstring); returns [B, Lq, H * D]."""
    b, lq, heads, d = q.shape
    for name, t in (("k_text", k_text), ("v_text", v_text), ("k_image", k_image), ("v_image", v_image)):
        if t.shape[0] != b or t.shape[2:] != (heads, d) or t.dtype != q.dtype:
            raise ValueError(f"text_image_attention: {name} {tuple(t.shape)} {t.dtype} does not match q "
                             f"{tuple(q.shape)} {q.dtype} ([B, L, H, D], one dtype)")
    if k_text.shape[1] != v_text.shape[1] or k_image.shape[1] != v_image.shape[1]:
        raise ValueError("text_image_attention: k and v of one context need the same length")
    q, k_text, v_text, k_image, v_image = (t if t.stride(-1) == 1 else t.contiguous()
                                           for t in (q, k_text, v_text, k_image, v_image))
    out = q.new_empty(b, lq, heads * d)
    if b * lq == 0:
        return out
    grid = (triton.cdiv(lq, config.block_m), b * heads)
    _text_image_attention[grid](
        q, k_text, v_text, k_image, v_image, out, lq, k_text.shape[1], k_image.shape[1], heads,
        q.stride(0), q.stride(1), q.stride(2), k_text.stride(0), k_text.stride(1), k_text.stride(2),
        v_text.stride(0), v_text.stride(1), v_text.stride(2), k_image.stride(0), k_image.stride(1),
        k_image.stride(2), v_image.stride(0), v_image.stride(1), v_image.stride(2), LOG2E / math.sqrt(d),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, D=d, STAGES=config.num_stages, num_warps=config.num_warps,
    )
    return out


@torch.library.custom_op("talkgen::text_image_attention", mutates_args=())
def text_image_attention(q: torch.Tensor, k_text: torch.Tensor, v_text: torch.Tensor, k_image: torch.Tensor,
                         v_image: torch.Tensor) -> torch.Tensor:
    """``attention(q, k_text, v_text) + attention(q, k_image, v_image)`` with heads merged: [B, L, H, D]
    inputs (CUDA, bf16 / fp16, head_dim a power of two >= 16) -> [B, Lq, H * D]. An opaque op, so
    torch.compile calls the kernel without a graph break."""
    return launch(q, k_text, v_text, k_image, v_image)


@text_image_attention.register_fake
def _text_image_attention_fake(q, k_text, v_text, k_image, v_image):
    b, lq, heads, d = q.shape
    return q.new_empty(b, lq, heads * d)
