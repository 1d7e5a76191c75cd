"""Flash-attention forward in Triton for the DiT's self-attention: a bf16 kernel and an 8-bit one.

Non-causal, no mask, ``q``/``k``/``v`` ``[B, H, L, D]`` with any strides whose last one is 1 (the
DiT passes ``[B, L, H, D]`` buffers seen through ``transpose(1, 2)``; no copy is made). The output
is written in ``[B, L, H, D]`` order and returned as its ``[B, H, L, D]`` view, so the DiT's
``merge_heads`` that follows is a free reshape.

* :func:`attention_bf16`: softmax(q k^T / sqrt(D)) v with bf16 (or fp16) tensor-core products and
  float32 softmax state, the same arithmetic as FlashAttention-2/3 and torch SDPA.
* :func:`attention_fp8`: SageAttention-style 8-bit attention (Zhang et al., SageAttention 1/2).
  K is smoothed (its mean over tokens is subtracted: softmax-invariant, since q.mean(k) is one
  constant per query row), then Q is quantized to int8 per token and K per block of ``block_n``
  tokens (fp8 e4m3 optional: 2-3x the error). The scores come from int8 tensor-core products
  (int32, turned into float32 with two adds instead of the slow conversion instruction). With
  ``FP8_CONFIG`` P V stays in bf16 (SageAttention 1's choice): about 1-2.5e-2 relative error.
  With ``FP8_FAST_CONFIG`` P = 2^8 exp2(s - m) and V (smoothed: its mean is subtracted and added
  back at the end, rows of P summing to one; scaled per channel) are fp8 e4m3 too
  (SageAttention 2's choice): faster, but e4m3's 3 mantissa bits on both operands cost about
  2.5-3e-2 on DiT-like inputs and 5-7e-2 on Gaussian noise, whatever the scaling.

Measured on an H100 (docs/performance.md, "Self-attention kernels"): SDPA 570-590 TFLOP/s at
32,928 and 75,600 tokens; the bf16 kernel 0.92-0.94x SDPA (so ``auto`` uses the Gluon kernel of
``attention_gluon.py`` on Hopper instead, 1.2x SDPA; its 8-bit kernel, ``gluon-fp8``, 1.42-1.48x); ``FP8_CONFIG``
1.11-1.16x and ``FP8_FAST_CONFIG`` 1.25-1.32x SDPA (bf16-equivalent work, quantization included).
What limits the Triton kernels there: Triton 3.6 does not warp-specialize on Hopper (the ``warp_specialize`` flag changes nothing) and waits for
each tensor-core product right after issuing it, so within one program the softmax never runs
during a product; the overlap comes from two programs per multiprocessor, which the 8-bit tiles
allow (half the shared memory and registers of bf16 ones) and the bf16 tiles barely do.

Both kernels take their K/V tiles through tensor descriptors (Hopper's bulk tensor copy, TMA) when
``Config.tma`` is set, and through plain ``tl.load`` otherwise; the math is the same code. The
plain variant is what CPU tests run in Triton's interpreter (``TRITON_INTERPRET=1``).

The kernel structure (online softmax in log2 units, the K/V loop over tensor descriptors, the
``tl.range(..., warp_specialize=...)`` option) follows Triton's tutorial 06-fused-attention
(github.com/triton-lang/triton, python/tutorials/06-fused-attention.py, MIT licence); the
sub-tiled query block, the strided 2-D views, the 8-bit path and the quantization kernels are ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from talkgen.kernels.layout import view_2d

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton < 3.4: only the tl.load variant
    TensorDescriptor = None

LOG2E = 1.4426950408889634
P_SHIFT = 8.0  # e4m3 P is stored as 2^8 * exp2(s - m): keeps small probabilities normal
FP8_MAX = 448.0  # largest finite e4m3 value


@dataclass(frozen=True)
class Config:
    """Tile shape and launch options. ``split`` query sub-tiles of ``block_m // split`` rows share
    each K/V tile (their products and softmaxes interleave, so tensor cores and the exp unit overlap)."""

    block_m: int = 128
    block_n: int = 128
    split: int = 1
    num_warps: int = 8
    num_stages: int = 2
    warp_specialize: bool = False
    tma: bool = True
    qk_int8: bool = True  # 8-bit kernel: int8 Q/K (else fp8 e4m3)
    pv_fp8: bool = True  # 8-bit kernel: P and V in e4m3 (else P V in the input's 16-bit type)
    two_level: bool = True  # 8-bit kernel: e4m3 P V summed in float32 outside the tensor core
    lazy_rescale: bool = False  # rescale the running output only when the row max grows a lot
    exp16: bool = False  # 8-bit kernel: exp2 in packed fp16 (GPU only: inline PTX)
    tc_sum: bool = False  # 8-bit kernel with e4m3 P V: row sums of P on the tensor cores

    def portable(self) -> "Config":
        """The same math through ``tl.load`` (no TMA, no warp specialization)."""
        return replace(self, tma=False, warp_specialize=False)


# Measured best on an H100 with Triton 3.6 (benchmarks/bench_attention.py --sweep, docs/performance.md).
# 8-bit: two query sub-tiles of 64 rows in one warpgroup and 64-key blocks, so that two programs fit
# on each multiprocessor (registers, shared memory) and one's softmax overlaps the other's products.
BF16_CONFIG = Config(block_m=128, block_n=128, num_warps=8, num_stages=3)
FP8_CONFIG = Config(block_m=128, block_n=64, split=2, num_warps=4, num_stages=3, pv_fp8=False)
FP8_FAST_CONFIG = Config(block_m=128, block_n=64, split=2, num_warps=4, num_stages=3, two_level=False)
PAD = 256  # 8-bit buffers are padded to a multiple of this many tokens (>= any block size)


# ------------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _load_tile(desc, base, row, col, n0, L, stride_l, ROWS: tl.constexpr, D: tl.constexpr,
               USE_TMA: tl.constexpr):
    """Rows ``n0 .. n0+ROWS`` (tokens) x ``D`` of one (batch, head). TMA: the tile at ``[row+n0, col]``
    of a 2-D view (rows past the head's end are other data or zeros: callers mask them). Else
    pointer loads from ``base`` (the head's first token), rows past ``L`` read as zeros."""
    if USE_TMA:
        tile = desc.load([row + n0, col])
    else:
        offs_n = n0 + tl.arange(0, ROWS)
        offs_d = tl.arange(0, D)
        tile = tl.load(base + offs_n[:, None] * stride_l + offs_d[None, :], mask=(offs_n < L)[:, None], other=0.0)
    return tile


@triton.jit
def _online_softmax(qk, m_i, l_i, acc, scale, n0, L, BN: tl.constexpr, MASK: tl.constexpr,
                    SHIFT: tl.constexpr, LAZY: tl.constexpr, TAU: tl.constexpr, EXP16: tl.constexpr,
                    TC_SUM: tl.constexpr):
    """One K block of the online softmax, in log2 units. ``qk``: raw scores [M, BN] (float32);
    ``scale``: [M] factor to log2 units; ``m_i``/``l_i``/``acc``: running max, sum and output.
    Returns p = 2^SHIFT * exp2(s - m) and the updated m, l (p's row sums added) and rescaled acc.
    LAZY: the running max (and with it acc and l) is only updated when some row's block max
    exceeds it by more than TAU, so most blocks leave acc alone (p then reaches 2^(SHIFT+TAU)).
    EXP16: exp2 in packed half precision (two per instruction of the exp unit); TC_SUM: the caller
    sums p on the tensor cores (l is then [M, 16], every column the sum)."""
    if MASK:  # the last K block: keys past L do not exist
        qk = tl.where(((n0 + tl.arange(0, BN)) < L)[None, :], qk, float("-inf"))
    m_blk = tl.max(qk, 1) * scale
    if LAZY:
        if tl.max(m_blk - m_i, 0) > TAU:
            m_new = tl.maximum(m_i, m_blk)
            alpha = tl.math.exp2(m_i - m_new)
            acc = acc * alpha[:, None]
            l_i = _rescale_rows(l_i, alpha, TC_SUM)
            m_i = m_new
    else:
        m_new = tl.maximum(m_i, m_blk)
        alpha = tl.math.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        l_i = _rescale_rows(l_i, alpha, TC_SUM)
        m_i = m_new
    x = qk * scale[:, None] - (m_i - SHIFT)[:, None]
    if EXP16:
        p = _exp2_f16(x)
    else:
        p = tl.math.exp2(x)
    if not TC_SUM:
        l_i = l_i + tl.sum(p.to(tl.float32), 1)
    return p, m_i, l_i, acc


@triton.jit
def _rescale_rows(l_i, alpha, TC_SUM: tl.constexpr):
    if TC_SUM:
        l_i = l_i * alpha[:, None]
    else:
        l_i = l_i * alpha
    return l_i


@triton.jit
def _exp2_f16(x):
    """exp2 of a float32 tensor through half precision, two elements per instruction (sm_75+)."""
    return tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x.to(tl.float16)],
                                     dtype=tl.float16, is_pure=True, pack=2)


@triton.jit
def _store_rows(O, b, h, n0, H, L, out, ROWS: tl.constexpr, D: tl.constexpr):
    """Store [ROWS, D] rows of (b, h) into O laid out [B, L, H, D]; rows past L are dropped."""
    offs_n = n0 + tl.arange(0, ROWS)
    offs_d = tl.arange(0, D)
    ptrs = O + ((b.to(tl.int64) * L + offs_n[:, None]) * H + h) * D + offs_d[None, :]
    tl.store(ptrs, out.to(O.dtype.element_ty), mask=(offs_n < L)[:, None])


@triton.jit
def _i32_to_f32(x):
    """int32 -> float32 for |x| < 2^22 with an integer and a float add (the magic-number trick)
    instead of the slower conversion instruction: bits(1.5 * 2^23) + x is the float 1.5 * 2^23 + x."""
    return (x + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


# ------------------------------------------------------------------------------------------------
# bf16 / fp16 kernel


@triton.jit
def _bf16_block(q, k, v, m_i, l_i, acc, scale, n0, L, BN: tl.constexpr, MASK: tl.constexpr, LAZY: tl.constexpr):
    qk = tl.dot(q, tl.trans(k))
    p, m_i, l_i, acc = _online_softmax(qk, m_i, l_i, acc, scale, n0, L, BN, MASK, 0.0, LAZY, 8.0, False, False)
    acc = tl.dot(p.to(v.dtype), v, acc)
    return m_i, l_i, acc


@triton.jit
def _bf16_block2(q0, q1, k, v, m0, l0, acc0, m1, l1, acc1, scale, n0, L, BN: tl.constexpr,
                 MASK: tl.constexpr, LAZY: tl.constexpr):
    # both score products first, so the second runs on the tensor cores during the first softmax
    qk0 = tl.dot(q0, tl.trans(k))
    qk1 = tl.dot(q1, tl.trans(k))
    p0, m0, l0, acc0 = _online_softmax(qk0, m0, l0, acc0, scale, n0, L, BN, MASK, 0.0, LAZY, 8.0, False, False)
    acc0 = tl.dot(p0.to(v.dtype), v, acc0)
    p1, m1, l1, acc1 = _online_softmax(qk1, m1, l1, acc1, scale, n0, L, BN, MASK, 0.0, LAZY, 8.0, False, False)
    acc1 = tl.dot(p1.to(v.dtype), v, acc1)
    return m0, l0, acc0, m1, l1, acc1


@triton.jit
def _attn_fwd_bf16(
    Q, K, V, O, desc_q, desc_k, desc_v,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl,  # element strides (tl.load variant)
    rqb, rqh, cqh, rkb, rkh, ckh, rvb, rvh, cvh,  # 2-D view coordinates (TMA variant)
    H, L, qk_scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr,
    USE_TMA: tl.constexpr, WS: tl.constexpr, LAZY: tl.constexpr,
):
    SUB: tl.constexpr = BM // SPLIT
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    q_row = b * rqb + h * rqh
    k_row = b * rkb + h * rkh
    v_row = b * rvb + h * rvh
    m_start = pid_m * BM
    n_full = (L // BN) * BN
    scale = tl.full([SUB], qk_scale, tl.float32)

    q0 = _load_tile(desc_q, q_base, q_row, h * cqh, m_start, L, sql, SUB, D, USE_TMA)
    m0 = tl.full([SUB], float("-inf"), tl.float32)
    l0 = tl.zeros([SUB], tl.float32)
    acc0 = tl.zeros([SUB, D], tl.float32)
    if SPLIT == 1:
        for n0 in tl.range(0, n_full, BN, warp_specialize=WS):
            k = _load_tile(desc_k, k_base, k_row, h * ckh, n0, L, skl, BN, D, USE_TMA)
            v = _load_tile(desc_v, v_base, v_row, h * cvh, n0, L, svl, BN, D, USE_TMA)
            m0, l0, acc0 = _bf16_block(q0, k, v, m0, l0, acc0, scale, n0, L, BN, False, LAZY)
        if n_full < L:
            k = _load_tile(desc_k, k_base, k_row, h * ckh, n_full, L, skl, BN, D, USE_TMA)
            v = _load_tile(desc_v, v_base, v_row, h * cvh, n_full, L, svl, BN, D, USE_TMA)
            m0, l0, acc0 = _bf16_block(q0, k, v, m0, l0, acc0, scale, n_full, L, BN, True, LAZY)
    else:
        q1 = _load_tile(desc_q, q_base, q_row, h * cqh, m_start + SUB, L, sql, SUB, D, USE_TMA)
        m1 = tl.full([SUB], float("-inf"), tl.float32)
        l1 = tl.zeros([SUB], tl.float32)
        acc1 = tl.zeros([SUB, D], tl.float32)
        for n0 in tl.range(0, n_full, BN, warp_specialize=WS):
            k = _load_tile(desc_k, k_base, k_row, h * ckh, n0, L, skl, BN, D, USE_TMA)
            v = _load_tile(desc_v, v_base, v_row, h * cvh, n0, L, svl, BN, D, USE_TMA)
            m0, l0, acc0, m1, l1, acc1 = _bf16_block2(q0, q1, k, v, m0, l0, acc0, m1, l1, acc1,
                                                      scale, n0, L, BN, False, LAZY)
        if n_full < L:
            k = _load_tile(desc_k, k_base, k_row, h * ckh, n_full, L, skl, BN, D, USE_TMA)
            v = _load_tile(desc_v, v_base, v_row, h * cvh, n_full, L, svl, BN, D, USE_TMA)
            m0, l0, acc0, m1, l1, acc1 = _bf16_block2(q0, q1, k, v, m0, l0, acc0, m1, l1, acc1,
                                                      scale, n_full, L, BN, True, LAZY)
        _store_rows(O, b, h, m_start + SUB, H, L, acc1 / l1[:, None], SUB, D)
    _store_rows(O, b, h, m_start, H, L, acc0 / l0[:, None], SUB, D)


# ------------------------------------------------------------------------------------------------
# 8-bit kernel (SageAttention-style) and its quantization pre-pass


@triton.jit
def _quant_rows(X, sxb, sxh, sxl, MEAN, OUT, SCALE, H, L, LP, mult,
                D: tl.constexpr, ROWS: tl.constexpr, PER_TOKEN: tl.constexpr,
                SUB_MEAN: tl.constexpr, INT8: tl.constexpr):
    """Quantize ROWS tokens of one (batch, head) of X [B, H, L, D] (any strides) into OUT
    [B*H*LP, D] (int8 or e4m3; rows past L are zeros), with one scale per token (PER_TOKEN) or per
    block. SCALE receives the dequantization scale times ``mult``."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = pid * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, D)
    valid = (offs_n < L)[:, None]
    x = tl.load(X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + offs_n[:, None] * sxl + offs_d[None, :],
                mask=valid, other=0.0).to(tl.float32)
    if SUB_MEAN:
        x = tl.where(valid, x - tl.load(MEAN + bh * D + offs_d)[None, :], 0.0)
    QMAX: tl.constexpr = 127.0 if INT8 else 448.0
    if PER_TOKEN:
        scale = tl.maximum(tl.max(tl.abs(x), 1), 1e-20) / QMAX
        xq = x / scale[:, None]
        tl.store(SCALE + bh * LP + offs_n, scale * mult)
    else:
        scale = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-20) / QMAX
        xq = x / scale
        tl.store(SCALE + bh * (LP // ROWS) + pid, scale * mult)
    if INT8:
        xq = tl.where(xq >= 0, xq + 0.5, xq - 0.5).to(tl.int8)  # round half away from zero
    else:
        xq = xq.to(OUT.dtype.element_ty)
    tl.store(OUT + (bh * LP + offs_n)[:, None].to(tl.int64) * D + offs_d[None, :], xq)


@triton.jit
def _quant_vt(X, sxb, sxh, sxl, MEAN, SV, OUT, H, L, LP, D: tl.constexpr, ROWS: tl.constexpr,
              WGMMA_KEY_ORDER: tl.constexpr = False):
    """(V - mean) / scale per channel, to e4m3, stored transposed: OUT [B*H*D, LP] (the layout
    Hopper's fp8 tensor-core product wants for the right operand); columns past L are zeros.
    ``WGMMA_KEY_ORDER``: token n goes to column ``layout.wgmma_key_column(n)`` (see there)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = pid * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, D)
    valid = (offs_n < L)[:, None]
    x = tl.load(X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + offs_n[:, None] * sxl + offs_d[None, :],
                mask=valid, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + bh * D + offs_d)
    inv = 1.0 / tl.load(SV + bh * D + offs_d)
    xq = tl.where(valid, (x - mean[None, :]) * inv[None, :], 0.0).to(OUT.dtype.element_ty)
    if WGMMA_KEY_ORDER:
        offs_n = _wgmma_key_column(offs_n)
    tl.store(OUT + (bh * D + offs_d)[None, :].to(tl.int64) * LP + offs_n[:, None], xq)


@triton.jit
def _wgmma_key_column(n):
    """``talkgen.kernels.layout.wgmma_key_column`` in Triton."""
    j = n & 15
    return (n - j) | (j & 1) | (((j >> 3) & 1) << 1) | (((j >> 1) & 3) << 2)


@triton.jit
def _load_v(desc, VT8, v_base, bh, v_row, v_col, n0, L, LP, svl, D: tl.constexpr, BN: tl.constexpr,
            USE_TMA: tl.constexpr, PV_FP8: tl.constexpr):
    """The V tile of tokens n0 .. n0+BN: e4m3 V^T [D, BN] (PV_FP8) or the input's own [BN, D]."""
    if PV_FP8:
        if USE_TMA:
            tile = desc.load([bh * D, n0])
        else:
            offs_d = tl.arange(0, D)
            offs_n = n0 + tl.arange(0, BN)
            tile = tl.load(VT8 + (bh * D + offs_d)[:, None].to(tl.int64) * LP + offs_n[None, :])
    else:
        tile = _load_tile(desc, v_base, v_row, v_col, n0, L, svl, BN, D, USE_TMA)
    return tile


@triton.jit
def _fp8_scores(q, k, QK_INT8: tl.constexpr):
    qk = tl.dot(q, tl.trans(k))
    if QK_INT8:
        qk = _i32_to_f32(qk)
    return qk


@triton.jit
def _fp8_pv(p, v, acc, l_i, BN: tl.constexpr, PV_FP8: tl.constexpr, TWO_LEVEL: tl.constexpr,
            TC_SUM: tl.constexpr):
    if PV_FP8:  # v is V^T [D, BN] in e4m3
        p8 = p.to(v.dtype)
        if TC_SUM:  # row sums of the rounded p, on the tensor cores: P @ ones
            l_i = l_i + tl.dot(p8, tl.full([BN, 16], 1.0, tl.float32).to(v.dtype))
        if TWO_LEVEL:
            acc = acc + tl.dot(p8, tl.trans(v))
        else:
            acc = tl.dot(p8, tl.trans(v), acc)
    else:  # v is the input's [BN, D] tile (bf16/fp16)
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i


@triton.jit
def _fp8_block(q, k, v, sq, sk, m_i, l_i, acc, n0, L, BN: tl.constexpr, MASK: tl.constexpr,
               QK_INT8: tl.constexpr, PV_FP8: tl.constexpr, TWO_LEVEL: tl.constexpr, LAZY: tl.constexpr,
               SHIFT: tl.constexpr, EXP16: tl.constexpr, TC_SUM: tl.constexpr):
    qk = _fp8_scores(q, k, QK_INT8)
    p, m_i, l_i, acc = _online_softmax(qk, m_i, l_i, acc, sq * sk, n0, L, BN, MASK, SHIFT, LAZY, 4.0,
                                       EXP16, TC_SUM)
    acc, l_i = _fp8_pv(p, v, acc, l_i, BN, PV_FP8, TWO_LEVEL, TC_SUM)
    return m_i, l_i, acc


@triton.jit
def _fp8_block2(q0, q1, k, v, sq0, sq1, sk, m0, l0, acc0, m1, l1, acc1, n0, L, BN: tl.constexpr,
                MASK: tl.constexpr, QK_INT8: tl.constexpr, PV_FP8: tl.constexpr, TWO_LEVEL: tl.constexpr,
                LAZY: tl.constexpr, SHIFT: tl.constexpr, EXP16: tl.constexpr, TC_SUM: tl.constexpr):
    qk0 = _fp8_scores(q0, k, QK_INT8)
    qk1 = _fp8_scores(q1, k, QK_INT8)
    p0, m0, l0, acc0 = _online_softmax(qk0, m0, l0, acc0, sq0 * sk, n0, L, BN, MASK, SHIFT, LAZY, 4.0,
                                       EXP16, TC_SUM)
    acc0, l0 = _fp8_pv(p0, v, acc0, l0, BN, PV_FP8, TWO_LEVEL, TC_SUM)
    p1, m1, l1, acc1 = _online_softmax(qk1, m1, l1, acc1, sq1 * sk, n0, L, BN, MASK, SHIFT, LAZY, 4.0,
                                       EXP16, TC_SUM)
    acc1, l1 = _fp8_pv(p1, v, acc1, l1, BN, PV_FP8, TWO_LEVEL, TC_SUM)
    return m0, l0, acc0, m1, l1, acc1


@triton.jit
def _fp8_epilogue(O, b, h, bh, n0, H, L, acc, l_i, VM, SV, ROWS: tl.constexpr, D: tl.constexpr,
                  PV_FP8: tl.constexpr, TC_SUM: tl.constexpr):
    if TC_SUM:
        l_i = tl.max(l_i, 1)
    out = acc / l_i[:, None]
    if PV_FP8:
        offs_d = tl.arange(0, D)
        out = out * tl.load(SV + bh * D + offs_d)[None, :] + tl.load(VM + bh * D + offs_d)[None, :]
    _store_rows(O, b, h, n0, H, L, out, ROWS, D)


@triton.jit
def _zero_sums(ROWS: tl.constexpr, TC_SUM: tl.constexpr):
    if TC_SUM:
        l_i = tl.zeros([ROWS, 16], tl.float32)
    else:
        l_i = tl.zeros([ROWS], tl.float32)
    return l_i


@triton.jit
def _attn_fwd_fp8(
    Q8, K8, VT8, V, desc_q, desc_k, desc_v, SQ, SK, VM, SV, O,
    svb, svh, svl, rvb, rvh, cvh,  # the input V (when P V runs in 16 bits)
    H, L, LP,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr,
    USE_TMA: tl.constexpr, WS: tl.constexpr, QK_INT8: tl.constexpr, PV_FP8: tl.constexpr,
    TWO_LEVEL: tl.constexpr, LAZY: tl.constexpr, SHIFT: tl.constexpr, EXP16: tl.constexpr,
    TC_SUM: tl.constexpr,
):
    SUB: tl.constexpr = BM // SPLIT
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    row = bh * LP  # first row of this head in Q8 / K8 [B*H*LP, D]
    q_base = Q8 + row.to(tl.int64) * D
    k_base = K8 + row.to(tl.int64) * D
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    v_row = b * rvb + h * rvh
    v_col = h * cvh
    nbk = LP // BN
    m_start = pid_m * BM
    n_full = (L // BN) * BN

    q0 = _load_tile(desc_q, q_base, row, 0, m_start, LP, D, SUB, D, USE_TMA)
    sq0 = tl.load(SQ + row + m_start + tl.arange(0, SUB))
    m0 = tl.full([SUB], float("-inf"), tl.float32)
    l0 = _zero_sums(SUB, TC_SUM)
    acc0 = tl.zeros([SUB, D], tl.float32)
    if SPLIT == 1:
        for n0 in tl.range(0, n_full, BN, warp_specialize=WS):
            k = _load_tile(desc_k, k_base, row, 0, n0, LP, D, BN, D, USE_TMA)
            v = _load_v(desc_v, VT8, v_base, bh, v_row, v_col, n0, L, LP, svl, D, BN, USE_TMA, PV_FP8)
            sk = tl.load(SK + bh * nbk + n0 // BN)
            m0, l0, acc0 = _fp8_block(q0, k, v, sq0, sk, m0, l0, acc0, n0, L, BN, False,
                                      QK_INT8, PV_FP8, TWO_LEVEL, LAZY, SHIFT, EXP16, TC_SUM)
        if n_full < L:
            k = _load_tile(desc_k, k_base, row, 0, n_full, LP, D, BN, D, USE_TMA)
            v = _load_v(desc_v, VT8, v_base, bh, v_row, v_col, n_full, L, LP, svl, D, BN, USE_TMA, PV_FP8)
            sk = tl.load(SK + bh * nbk + n_full // BN)
            m0, l0, acc0 = _fp8_block(q0, k, v, sq0, sk, m0, l0, acc0, n_full, L, BN, True,
                                      QK_INT8, PV_FP8, TWO_LEVEL, LAZY, SHIFT, EXP16, TC_SUM)
    else:
        q1 = _load_tile(desc_q, q_base, row, 0, m_start + SUB, LP, D, SUB, D, USE_TMA)
        sq1 = tl.load(SQ + row + m_start + SUB + tl.arange(0, SUB))
        m1 = tl.full([SUB], float("-inf"), tl.float32)
        l1 = _zero_sums(SUB, TC_SUM)
        acc1 = tl.zeros([SUB, D], tl.float32)
        for n0 in tl.range(0, n_full, BN, warp_specialize=WS):
            k = _load_tile(desc_k, k_base, row, 0, n0, LP, D, BN, D, USE_TMA)
            v = _load_v(desc_v, VT8, v_base, bh, v_row, v_col, n0, L, LP, svl, D, BN, USE_TMA, PV_FP8)
            sk = tl.load(SK + bh * nbk + n0 // BN)
            m0, l0, acc0, m1, l1, acc1 = _fp8_block2(q0, q1, k, v, sq0, sq1, sk, m0, l0, acc0, m1, l1, acc1,
                                                     n0, L, BN, False, QK_INT8, PV_FP8, TWO_LEVEL, LAZY, SHIFT,
                                                     EXP16, TC_SUM)
        if n_full < L:
            k = _load_tile(desc_k, k_base, row, 0, n_full, LP, D, BN, D, USE_TMA)
            v = _load_v(desc_v, VT8, v_base, bh, v_row, v_col, n_full, L, LP, svl, D, BN, USE_TMA, PV_FP8)
            sk = tl.load(SK + bh * nbk + n_full // BN)
            m0, l0, acc0, m1, l1, acc1 = _fp8_block2(q0, q1, k, v, sq0, sq1, sk, m0, l0, acc0, m1, l1, acc1,
                                                     n_full, L, BN, True, QK_INT8, PV_FP8, TWO_LEVEL, LAZY, SHIFT,
                                                     EXP16, TC_SUM)
        _fp8_epilogue(O, b, h, bh, m_start + SUB, H, L, acc1, l1, VM, SV, SUB, D, PV_FP8, TC_SUM)
    _fp8_epilogue(O, b, h, bh, m_start, H, L, acc0, l0, VM, SV, SUB, D, PV_FP8, TC_SUM)


# ------------------------------------------------------------------------------------------------
# Host side


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"self-attention needs q, k, v of one shape [B, H, L, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] not in (64, 128):
        raise ValueError(f"head_dim {q.shape[-1]} is not supported (64 or 128)")


def _empty_out(q: torch.Tensor) -> torch.Tensor:
    B, H, L, D = q.shape
    return torch.empty(B, L, H, D, dtype=q.dtype, device=q.device)


def attention_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: Config = BF16_CONFIG) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for bf16/fp16 ``[B, H, L, D]`` tensors; returns ``[B, H, L, D]``
    (a view of a ``[B, L, H, D]`` buffer)."""
    _check(q, k, v)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, L, D = q.shape
    out = _empty_out(q)
    cfg = config if TensorDescriptor is not None else config.portable()
    if cfg.tma:  # layouts a 2-D descriptor cannot address are copied to [B, H, L, D] (rare)
        q, k, v = (t if view_2d(t) is not None else t.contiguous() for t in (q, k, v))
        views = [view_2d(t) for t in (q, k, v)]
    sub = cfg.block_m // cfg.split
    if cfg.tma:
        descs = [TensorDescriptor(t, shape, strides, [rows, D])
                 for t, (shape, strides, *_), rows in zip((q, k, v), views, (sub, cfg.block_n, cfg.block_n))]
        coords = [c for view in views for c in view[2:]]
    else:
        descs = [None, None, None]
        coords = [0] * 9
    grid = (triton.cdiv(L, cfg.block_m), B * H)
    _attn_fwd_bf16[grid](
        q, k, v, out, *descs,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *coords,
        H, L, LOG2E / math.sqrt(D),
        D=D, BM=cfg.block_m, BN=cfg.block_n, SPLIT=cfg.split, USE_TMA=cfg.tma, WS=cfg.warp_specialize,
        LAZY=cfg.lazy_rescale, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out.transpose(1, 2)


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int, qk_int8: bool = True,
                 pv_fp8: bool = True, wgmma_key_order: bool = False) -> dict:
    """The 8-bit kernel's inputs: smoothed, quantized Q/K (per token / per ``block_n`` tokens),
    V^T in e4m3 per channel (when ``pv_fp8``), and their scales (Q's include 1/sqrt(D), log2(e)).
    ``wgmma_key_order``: V^T's columns in the order of ``layout.wgmma_key_column`` (the Gluon 8-bit
    kernel's ``key_permuted_v``); the result says so under ``"vt8_key_order"``."""
    B, H, L, D = q.shape
    LP = triton.cdiv(L, PAD) * PAD
    dev = q.device
    qk_dtype = torch.int8 if qk_int8 else torch.float8_e4m3fn
    k_mean = k.mean(dim=2, dtype=torch.float32).contiguous()  # [B, H, D]
    q8 = torch.empty(B * H * LP, D, dtype=qk_dtype, device=dev)
    k8 = torch.empty(B * H * LP, D, dtype=qk_dtype, device=dev)
    q_scale = torch.empty(B * H * LP, dtype=torch.float32, device=dev)
    k_scale = torch.empty(B * H * (LP // block_n), dtype=torch.float32, device=dev)
    rows = 64
    _quant_rows[(LP // rows, B * H)](q, q.stride(0), q.stride(1), q.stride(2), q, q8, q_scale, H, L, LP,
                                     LOG2E / math.sqrt(D), D=D, ROWS=rows, PER_TOKEN=True, SUB_MEAN=False,
                                     INT8=qk_int8, num_warps=4)
    _quant_rows[(LP // block_n, B * H)](k, k.stride(0), k.stride(1), k.stride(2), k_mean, k8, k_scale, H, L, LP,
                                        1.0, D=D, ROWS=block_n, PER_TOKEN=False, SUB_MEAN=True, INT8=qk_int8,
                                        num_warps=4)
    out = dict(q8=q8, k8=k8, q_scale=q_scale, k_scale=k_scale, LP=LP, vt8=None, v_mean=None, v_scale=None,
               vt8_key_order="wgmma" if wgmma_key_order else "natural")
    if pv_fp8:
        v_mean = v.mean(dim=2, dtype=torch.float32).contiguous()
        v_min, v_max = torch.aminmax(v, dim=2)
        v_scale = (torch.maximum(v_max.float() - v_mean, v_mean - v_min.float()).clamp_min(1e-20)
                   / FP8_MAX).contiguous()
        vt8 = torch.empty(B * H * D, LP, dtype=torch.float8_e4m3fn, device=dev)
        _quant_vt[(LP // rows, B * H)](v, v.stride(0), v.stride(1), v.stride(2), v_mean, v_scale, vt8, H, L, LP,
                                       D=D, ROWS=rows, WGMMA_KEY_ORDER=wgmma_key_order, num_warps=4)
        out.update(vt8=vt8, v_mean=v_mean, v_scale=v_scale)
    return out


def attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: Config = FP8_CONFIG) -> torch.Tensor:
    """8-bit attention (see the module docstring) for bf16/fp16 ``[B, H, L, D]`` inputs; returns
    ``[B, H, L, D]`` in the input dtype (a view of a ``[B, L, H, D]`` buffer)."""
    _check(q, k, v)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, L, D = q.shape
    cfg = config if TensorDescriptor is not None else config.portable()
    if cfg.tma and not cfg.pv_fp8 and view_2d(v) is None:
        v = v.contiguous()
    v_view = view_2d(v)
    qd = quantize_qkv(q, k, v, cfg.block_n, cfg.qk_int8, cfg.pv_fp8)
    LP = qd["LP"]
    out = _empty_out(q)
    sub = cfg.block_m // cfg.split
    v_coords = [0, 0, 0]
    if cfg.tma:
        descs = [TensorDescriptor(qd["q8"], [B * H * LP, D], [D, 1], [sub, D]),
                 TensorDescriptor(qd["k8"], [B * H * LP, D], [D, 1], [cfg.block_n, D])]
        if cfg.pv_fp8:
            descs.append(TensorDescriptor(qd["vt8"], [B * H * D, LP], [LP, 1], [D, cfg.block_n]))
        else:
            descs.append(TensorDescriptor(v, v_view[0], v_view[1], [cfg.block_n, D]))
            v_coords = list(v_view[2:])
    else:
        descs = [None, None, None]
    dummy = qd["q_scale"]
    grid = (triton.cdiv(L, cfg.block_m), B * H)
    _attn_fwd_fp8[grid](
        qd["q8"], qd["k8"], qd["vt8"] if cfg.pv_fp8 else qd["q8"], v, *descs, qd["q_scale"], qd["k_scale"],
        qd["v_mean"] if cfg.pv_fp8 else dummy, qd["v_scale"] if cfg.pv_fp8 else dummy, out,
        v.stride(0), v.stride(1), v.stride(2), *v_coords,
        H, L, LP,
        D=D, BM=cfg.block_m, BN=cfg.block_n, SPLIT=cfg.split, USE_TMA=cfg.tma, WS=cfg.warp_specialize,
        QK_INT8=cfg.qk_int8, PV_FP8=cfg.pv_fp8, TWO_LEVEL=cfg.two_level, LAZY=cfg.lazy_rescale,
        SHIFT=P_SHIFT - 4.0 if cfg.lazy_rescale else P_SHIFT,  # e4m3 P holds up to 448: p <= 2^(SHIFT + TAU) = 256
        EXP16=cfg.exp16, TC_SUM=cfg.tc_sum and cfg.pv_fp8,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out.transpose(1, 2)
