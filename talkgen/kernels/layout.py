"""Memory layouts the attention kernels address through 2-D TMA descriptors (shared by the Triton
and the Gluon kernels)."""

from __future__ import annotations

import torch


def view_2d(t: torch.Tensor):
    """A 2-D (rows x cols, row stride) view of ``t`` [B, H, L, D] for a tensor descriptor, and the
    coordinates of token n of (b, h) in it: row = b*rb + h*rh + n, col = h*ch. ``None`` when the
    layout is neither [B, H, L, D] nor [B, L, H, D] in memory, or not 16-byte aligned."""
    B, H, L, D = t.shape
    sb, sh, sl, sd = t.stride()
    es = t.element_size()
    if sd != 1 or (sl * es) % 16 or t.data_ptr() % 16:
        return None
    if sl >= D and sh == L * sl and (sb == H * sh or B == 1):  # [B, H, L, D]
        return [B * H * L, D], [sl, 1], H * L, L, 0
    if sh >= D and sl == H * sh and (sb == L * sl or B == 1):  # [B, L, H, D]
        return [B * L, H * sh], [sl, 1], L, 0, sh
    return None


def wgmma_key_column(n: torch.Tensor) -> torch.Tensor:
    """The column of V^T that token ``n`` takes for the 8-bit Gluon kernel's ``key_permuted_v``
    variant: of each 16 tokens, 16g + 8b3 + 4b2 + 2b1 + b0 -> 16g + 8b2 + 4b1 + 2b3 + b0 (bits of
    the token index), the order in which a thread's P values sit in the wgmma accumulator
    (``attention_gluon._p_operand_fp8``). A permutation within each 16 tokens."""
    j = n & 15
    return (n - j) | (j & 1) | (((j >> 3) & 1) << 1) | (((j >> 1) & 3) << 2)
