"""torch.compile of the repeated DiT block: fuses the norms, modulation and RoPE around the
GEMMs and attention (measured 1.41x per DiT forward on an H100, docs/performance.md)."""

from __future__ import annotations

import os

import torch
from torch import nn


def compile_enabled(device_type: str) -> bool:
    """On by default on CUDA; ``TALKGEN_COMPILE=0`` turns it off (e.g. to debug)."""
    setting = os.environ.get("TALKGEN_COMPILE")
    if setting is not None:
        return setting not in ("0", "false", "no", "off")
    return device_type == "cuda"


def compile_blocks(blocks: nn.ModuleList, *, backend: str = "inductor") -> None:
    """Compile each block's two halves in place (``attend_self``, ``attend_context``); identical
    blocks share the compiled code.

    ``DiTBlock.forward`` itself stays eager: it only picks whether the first half is computed or
    shared between guidance passes (``SharedFirstBlock``), and the module's forward hooks (the
    streamed blocks' weight movement, :mod:`talkgen.runtime.offload`) run outside the compiled
    regions. The halves meet where the residual stream and the next LayerNorm's output are written
    anyway, so the split moves no extra bytes.
    """
    for block in blocks:
        block.attend_self = torch.compile(block.attend_self, dynamic=False, backend=backend)
        block.attend_context = torch.compile(block.attend_context, dynamic=False, backend=backend)
