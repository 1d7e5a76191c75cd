"""Attention backends behind one function, so the models show only the math.

Layout everywhere in talkgen: ``[batch, heads, tokens, head_dim]``. The reference uses
flash-attn / xformers / sageattention; all of them compute the same softmax attention with the
default scale ``1/sqrt(head_dim)``, which is what torch SDPA computes too.

Self-attention-sized problems (q, k, v of one shape, at least ``MIN_TOKENS`` tokens, head_dim 64 or
128, bf16/fp16, on a GPU) can run on talkgen's own Triton kernels (:mod:`talkgen.kernels.attention_triton`).
``TALKGEN_ATTENTION`` picks: ``auto`` (default: the Gluon kernel on Hopper GPUs when Triton has
Gluon's Hopper module, measured 1.2x SDPA on an H100; SDPA elsewhere, and SDPA for the rest of the
process if the Gluon kernel ever fails to compile or launch: Gluon is experimental),
``sdpa``, ``triton`` (the bf16 kernel), ``gluon`` (the bf16 kernel in Gluon, Hopper only:
:mod:`talkgen.kernels.attention_gluon`), ``triton-fp8`` (int8 QK, bf16 PV: 1.11-1.16x SDPA on an
H100, 1-2.5e-2 relative error instead of SDPA's 2e-3), ``triton-fp8-fast`` (int8 QK, e4m3 PV:
1.25-1.32x SDPA, 2-3e-2 on DiT-like inputs, up to 6e-2 on noise) or ``gluon-fp8`` (the same
arithmetic in Gluon, Hopper only: 1.42-1.48x SDPA; head_dim 64 goes to ``triton-fp8-fast``). The
8-bit ones are opt-in.
Everything else (cross-attention, the person map, CPU runs) always uses SDPA. ``sdpa`` also turns
off talkgen's other GPU kernels (q / k RMSNorm + RoPE in one pass, :mod:`talkgen.kernels.norm_rope`;
each residual add with the LayerNorm after it, :mod:`talkgen.kernels.layer_norm`): PyTorch's own
kernels only.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from talkgen.errors import ResourceError, TalkgenError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "triton", "gluon", "triton-fp8", "triton-fp8-fast", "gluon-fp8")
MIN_TOKENS = 4096  # shorter problems (text/image/audio cross-attention, the person map) stay on SDPA


def backend_setting() -> str:
    """``TALKGEN_ATTENTION`` (default ``auto``), checked."""
    value = os.environ.get("TALKGEN_ATTENTION", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise TalkgenError(f"TALKGEN_ATTENTION={value!r} is not a known attention backend; "
                           f"use one of {', '.join(BACKENDS)}.")
    return value


def _triton_version() -> str | None:
    try:
        import triton
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401  (Triton >= 3.4)
    except ImportError:
        return None
    return triton.__version__


@torch.compiler.assume_constant_result
def resolve_backend(device_type: str, device_index: int = 0) -> str:
    """The backend self-attention uses on a device: ``sdpa``, ``triton``, ``gluon``, ``gluon-auto``
    (the Gluon kernel as ``auto`` chose it: SDPA if it fails), ``triton-fp8``, ``triton-fp8-fast`` or
    ``gluon-fp8``.
    Constant for a process (torch.compile bakes it in)."""
    setting = backend_setting()
    if setting == "sdpa" or device_type != "cuda" or not torch.cuda.is_available():
        return "sdpa"
    if setting == "auto":
        hopper = torch.cuda.get_device_capability(device_index)[0] == 9
        if not hopper or _triton_version() is None:
            return "sdpa"
        from talkgen.kernels.attention_gluon import GLUON_AVAILABLE

        return "gluon-auto" if GLUON_AVAILABLE else "sdpa"
    if _triton_version() is None:
        raise ResourceError(f"TALKGEN_ATTENTION={setting} needs Triton >= 3.4 (pip install 'triton>=3.4'), "
                            "or set TALKGEN_ATTENTION=sdpa.")
    if setting in ("gluon", "gluon-fp8"):
        from talkgen.kernels.attention_gluon import GLUON_AVAILABLE

        if not GLUON_AVAILABLE or torch.cuda.get_device_capability(device_index)[0] != 9:
            other = "triton-fp8-fast" if setting == "gluon-fp8" else "triton"
            raise ResourceError(f"TALKGEN_ATTENTION={setting} needs a Hopper GPU (H100/H200) and a Triton with "
                                f"Gluon's Hopper module (>= 3.5); use TALKGEN_ATTENTION={other} or sdpa elsewhere.")
    return setting


@torch.compiler.assume_constant_result
def own_kernels_allowed(device_type: str) -> bool:
    """Whether talkgen's plain Triton kernels (not attention: ``talkgen.kernels.norm_rope`` and
    ``talkgen.kernels.layer_norm``) and the FFN's GEMM epilogue (``talkgen.models.dit.FeedForward``)
    may run on a device type: a CUDA GPU, Triton importable, and ``TALKGEN_ATTENTION`` not ``sdpa``
    (which keeps a run on PyTorch's plain ops). Constant for a process (torch.compile bakes it in)."""
    return (device_type == "cuda" and torch.cuda.is_available() and backend_setting() != "sdpa"
            and _triton_version() is not None)


def check_backend(device: torch.device | str) -> str:
    """:func:`resolve_backend` for ``device``, called when a model is loaded: a bad
    ``TALKGEN_ATTENTION`` (on any device, the CPU included) or a forced Triton backend without
    Triton is then one clear :class:`TalkgenError` before the weights load, instead of an error
    raised inside torch.compile's tracing of the first forward (``assume_constant_result``)."""
    device = torch.device(device)
    index = 0
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
    return resolve_backend(device.type, index)


def describe_backend() -> str:
    """One line for ``talkgen info``: the self-attention backend on the first GPU (or the CPU)."""
    try:
        setting = backend_setting()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        backend = resolve_backend(device)
    except TalkgenError as exc:
        return f"invalid setting: {exc}"
    norm_rope = ("; q / k RMSNorm + RoPE and each residual add + LayerNorm in one Triton pass"
                 if own_kernels_allowed(device) else "")
    if backend == "sdpa":
        return f"torch SDPA (TALKGEN_ATTENTION={setting}){norm_rope}"
    what = {"triton": "talkgen Triton flash-attention, bf16",
            "gluon": "talkgen Gluon flash-attention for Hopper, bf16",
            "gluon-auto": "talkgen Gluon flash-attention for Hopper, bf16 (SDPA if it fails)",
            "triton-fp8": "talkgen Triton 8-bit attention (int8 QK, bf16 PV)",
            "triton-fp8-fast": "talkgen Triton 8-bit attention (int8 QK, fp8 PV)",
            "gluon-fp8": "talkgen Gluon 8-bit attention for Hopper (int8 QK, fp8 PV)"}[backend]
    return (f"{what} for self-attention, SDPA for the rest{norm_rope} (Triton {_triton_version()}, "
            f"TALKGEN_ATTENTION={setting})")


@torch.library.custom_op("talkgen::flash_attention", mutates_args=())
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """The Triton kernels as one opaque op, so torch.compile calls them without a graph break.
    ``backend``: triton, gluon, gluon-auto, triton-fp8, triton-fp8-fast or gluon-fp8. Returns [B, H, L, D] as
    a view of a [B, L, H, D] buffer (``merge_heads`` is then free)."""
    from talkgen.kernels import attention_triton as kernels

    if backend in ("gluon", "gluon-auto"):
        return _gluon_attention(q, k, v, fallback=backend == "gluon-auto")
    if backend == "gluon-fp8" and q.shape[-1] == 128:  # the 8-bit Gluon kernel has head_dim 128 only
        from talkgen.kernels import attention_gluon

        return attention_gluon.attention_fp8_gluon(q, k, v, attention_gluon.FP8_DEFAULT_CONFIG)
    if backend == "triton":
        return kernels.attention_bf16(q, k, v)
    config = kernels.FP8_FAST_CONFIG if backend in ("triton-fp8-fast", "gluon-fp8") else kernels.FP8_CONFIG
    return kernels.attention_fp8(q, k, v, config)


_gluon_failed: str | None = None  # why the Gluon kernel was given up in this process (auto only)


def _gluon_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fallback: bool) -> torch.Tensor:
    """The Gluon kernel; chosen by ``auto``, a failure to compile or launch it (Gluon's API changes
    between Triton releases) is logged once and SDPA serves the rest of the process instead of the
    video failing. Forced by ``TALKGEN_ATTENTION=gluon``, a failure is raised."""
    global _gluon_failed
    from talkgen.kernels import attention_gluon

    if _gluon_failed is None or not fallback:
        try:
            return attention_gluon.attention_bf16_gluon(q, k, v, attention_gluon.DEFAULT_CONFIG)
        except Exception as exc:  # noqa: BLE001 - any compile/launch error of an experimental kernel
            if not fallback:
                raise
            _gluon_failed = f"{type(exc).__name__}: {exc}"
            logger.warning("talkgen's Gluon attention kernel failed (%s); using torch SDPA from now on. "
                           "Set TALKGEN_ATTENTION=sdpa to skip it.", _gluon_failed[:300])
    out = F.scaled_dot_product_attention(q, k, v)  # [B, H, L, D]; the op returns a [B, L, H, D] buffer's view
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@flash_attention.register_fake
def _flash_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    b, h, n, d = q.shape
    return q.new_empty(b, n, h, d).transpose(1, 2)


def _fits_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (q.is_cuda and q.shape == k.shape == v.shape and q.shape[-1] in (64, 128)
            and q.shape[2] >= MIN_TOKENS and q.dtype in (torch.bfloat16, torch.float16)
            and k.dtype == q.dtype and v.dtype == q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal softmax attention, no mask. ``q``: [B, H, Lq, D]; ``k``, ``v``: [B, H, Lk, D]."""
    if _fits_triton(q, k, v):
        backend = resolve_backend(q.device.type, q.device.index or 0)
        if backend != "sdpa":
            return flash_attention(q, k, v, backend)
    return F.scaled_dot_product_attention(q, k, v)
