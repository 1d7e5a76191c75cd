"""Attention backends behind one function, so the models show only the math.

Layout everywhere in talkgen: ``[batch, heads, tokens, head_dim]``. The reference uses
flash-attn / xformers / sageattention; all of them compute the same softmax attention with the
default scale ``1/sqrt(head_dim)``, which is what torch SDPA computes too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal softmax attention, no mask. ``q``: [B, H, Lq, D]; ``k``, ``v``: [B, H, Lk, D]."""
    return F.scaled_dot_product_attention(q, k, v)
