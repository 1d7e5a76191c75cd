"""q / k RMSNorm + RoPE in one Triton pass (talkgen.kernels.norm_rope) against the torch path it
replaces, in Triton's interpreter on the CPU (a fresh process: the setting must precede the import
of triton), and the self-attention module's choice between the two. On a GPU,
benchmarks/check_attention.py holds the kernel to the torch path's bf16 roundings."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from talkgen.models import dit

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_fused_kernel_matches_the_torch_path_in_the_interpreter():
    code = r"""
import torch
from talkgen.models import dit
from talkgen.kernels.norm_rope import rms_norm_rope

g = torch.Generator().manual_seed(0)
heads, head_dim, grid = 3, 16, (2, 3, 4)  # width 48: not a power of two, so the row is masked
cos, sin = dit._rope_3d_table(grid, head_dim, torch.device("cpu"))
norm = dit.RMSNorm(heads * head_dim, 1e-6)
norm.weight.data = 1 + 0.2 * torch.randn(heads * head_dim, generator=g)
for dtype in (torch.float16, torch.bfloat16):
    x = (3 * torch.randn(2, cos.shape[0], heads * head_dim, generator=g)).to(dtype)
    x[0, 5] += 40.0  # an outlier row
    expected = dit.apply_rope_pairs(norm(x).view(2, -1, heads, head_dim), cos[:, None], sin[:, None]).to(dtype)
    got = rms_norm_rope(x, norm.weight.data, cos, sin, heads, 1e-6)
    assert got.shape == expected.shape and got.dtype == dtype
    diff = (got.float() - expected.float()).abs()
    # A rotation keeps each pair's length, and the roundings before it err relative to that length.
    pair_length = expected.float().unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True).expand(-1, -1, -1, -1, 2)
    ulp = pair_length.flatten(-2).clamp_min(1e-3) * (2 ** -7 if dtype == torch.bfloat16 else 2 ** -10)
    if dtype == torch.float16:
        assert (diff <= ulp).all(), diff.max().item()  # at most one rounding apart
        assert (diff > 0).float().mean() < 0.05, (diff > 0).float().mean().item()
    else:  # the interpreter rounds to bf16 towards zero (the GPU to nearest): each of 3 roundings may differ
        assert (diff <= 3 * ulp).all(), diff.max().item()
    # The same through the self-attention module, with talkgen's kernels allowed on this "device".
    dit.own_kernels_allowed = lambda device_type: True
    with torch.no_grad():  # inference: the fused op
        assert torch.equal(dit.norm_and_rope(x, norm, (cos, sin), heads), got)
    # with autograd on (the weight is a parameter), the torch ops: the fused op has no backward
    assert torch.equal(dit.norm_and_rope(x, norm, (cos, sin), heads), expected)
print("OK")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, TRITON_INTERPRET="1"), timeout=300)
    assert "OK" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]


def test_cpu_and_sdpa_setting_keep_the_torch_path(monkeypatch):
    """On the CPU, and with TALKGEN_ATTENTION=sdpa anywhere, q / k go through the torch ops."""
    from talkgen.models import attention

    assert not attention.own_kernels_allowed("cpu")
    monkeypatch.setenv("TALKGEN_ATTENTION", "sdpa")
    assert not attention.own_kernels_allowed("cuda")
    heads, head_dim = 2, 8
    cos, sin = dit._rope_3d_table((1, 2, 2), head_dim, torch.device("cpu"))
    norm = dit.RMSNorm(heads * head_dim, 1e-6)
    x = torch.randn(1, 4, heads * head_dim, dtype=torch.bfloat16)
    out = dit.norm_and_rope(x, norm, (cos, sin), heads)
    expected = dit.apply_rope_pairs(norm(x).view(1, 4, heads, head_dim), cos[:, None], sin[:, None]).to(x.dtype)
    assert torch.equal(out, expected)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_fused_op_refuses_tables_of_another_length():
    """cos / sin rows are read by token index: tables for another token count would be read out of
    bounds, so the op refuses them before launching anything."""
    from talkgen.kernels.norm_rope import rms_norm_rope

    x = torch.zeros(1, 4, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"cos / sin \(4, 4\)"):
        rms_norm_rope(x, torch.ones(16), torch.zeros(3, 4), torch.zeros(3, 4), 2, 1e-6)
