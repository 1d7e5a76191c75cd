"""The DiT block's residual adds + LayerNorms + modulation in one Triton pass each
(talkgen.kernels.layer_norm) against the torch path they replace, in Triton's interpreter on the CPU
(a fresh process: the setting must precede the import of triton); the block's choice between the
two; and the op's errors. On a GPU, benchmarks/check_attention.py holds the kernel to the torch
path's bf16 roundings at the DiT's width."""

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
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@needs_triton
def test_fused_kernel_matches_the_torch_path_in_the_interpreter():
    code = r"""
import torch
from benchmarks.check_layer_norm import (FLOAT32_SLACK, FORMS, inputs, kernels_allowed, make_norm, residual_operands,
                                        run_form, torch_output)
from talkgen.kernels import layer_norm

launches = []  # the kernel's launches: a form that silently took the torch path would compare torch with torch
launch = layer_norm._launch
layer_norm._launch = lambda *args: launches.append(1) or launch(*args)

g = torch.Generator().manual_seed(0)
for dtype in (torch.float16, torch.bfloat16):
    ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    x, delta, chunks = inputs(2, 7, 48, dtype, "cpu", g)  # width 48: not a power of two, so the row is masked
    for form in FORMS:
        norm = make_norm(form, 48, dtype, "cpu", g)
        with torch.no_grad():
            with kernels_allowed(False):
                want_total, _ = run_form(form, norm, x, delta, chunks)
            before = len(launches)
            with kernels_allowed(True):
                total, out = run_form(form, norm, x, delta, chunks)
            assert len(launches) == before + 1, form
            with kernels_allowed(False):
                expected, rounding, operands = torch_output(form, norm, total, chunks)
        assert total.dtype == out.dtype == dtype and out.shape == x.shape
        diff = (out.float() - expected.float()).abs()
        slack = FLOAT32_SLACK * operands
        if dtype == torch.float16:  # rounds to nearest in the interpreter too
            assert torch.equal(total, want_total), form
            assert (diff <= ulp * rounding + slack).all(), (form, (diff / rounding).max().item())
            assert (diff > 0).float().mean() < 0.01, form
        else:  # the interpreter rounds to bf16 towards zero (the GPU to nearest): one ulp each
            total_slack = FLOAT32_SLACK * residual_operands(form, x, delta, chunks)
            assert ((total.float() - want_total.float()).abs() <= ulp * want_total.float().abs() + total_slack).all(), form
            assert (diff <= 2 * ulp * rounding + slack).all(), (form, (diff / rounding).max().item())
print("OK")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, TRITON_INTERPRET="1"), timeout=300)
    assert "OK" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]


@needs_triton
def test_block_with_fused_norms_matches_the_torch_block_in_the_interpreter():
    """A whole tiny block with talkgen's kernels allowed against the same block on torch ops: in
    fp16 (which the interpreter rounds as a GPU does) bit for bit. With autograd on, the block keeps
    the torch ops (the kernels have no backward)."""
    code = r"""
import torch
from talkgen.kernels import layer_norm
from talkgen.models import dit

launches = []
launch = layer_norm._launch
layer_norm._launch = lambda *args: launches.append(1) or launch(*args)

torch.manual_seed(0)
config = dit.DiTConfig.tiny()
block = dit.DiTBlock(config)
for p in block.parameters():
    p.data = 0.3 * torch.randn_like(p)
block = block.to(torch.float16)
grid = (2, 3, 4)
tokens = grid[0] * grid[1] * grid[2]
x = torch.randn(2, tokens, config.dim).to(torch.float16)
kwargs = dict(e0=torch.randn(2, 6, config.dim), rope=dit._rope_3d_table(grid, config.head_dim, torch.device("cpu")),
              text=torch.randn(2, 5, config.dim).to(torch.float16), image=torch.randn(2, 3, config.dim).to(torch.float16),
              audio_tokens=torch.randn(2, grid[0], config.context_tokens, config.output_dim).to(torch.float16),
              frames=grid[0], person_masks=None)
dit._gelu_epilogue_takes = lambda x, layer: False  # the FFN's GEMM epilogue rounds otherwise: tests/test_dit.py
dit.own_kernels_allowed = lambda device_type: False
with torch.no_grad():
    expected = block(x, **kwargs).float()
dit.own_kernels_allowed = lambda device_type: True
with torch.no_grad():
    fused = block(x, **kwargs).float()
assert len(launches) == 4, launches  # norm1, then three residual adds with the norm after each
assert torch.equal(fused, expected)
assert torch.equal(block(x, **kwargs).float(), expected)  # autograd on: the torch ops
assert len(launches) == 4
print("OK")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, TRITON_INTERPRET="1"), timeout=300)
    assert "OK" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]


def test_cpu_keeps_the_torch_path():
    """On the CPU the block's norms are torch ops: add_and_norm is the residual add, then the norm."""
    norm = dit.LayerNorm32(16, eps=1e-6, elementwise_affine=False)
    x, delta = torch.randn(1, 4, 16, dtype=torch.bfloat16), torch.randn(1, 4, 16, dtype=torch.bfloat16)
    scale, shift = torch.randn(1, 1, 16), torch.randn(1, 1, 16)
    total, out = dit.add_and_norm(x, delta, norm, scale=scale, shift=shift)
    assert torch.equal(total, x + delta)
    assert torch.equal(out, (norm(x + delta).float() * (1 + scale) + shift).to(torch.bfloat16))
    total, out = dit.add_and_norm(x, delta, torch.nn.Identity())  # norm_x of a checkpoint without it
    assert torch.equal(total, x + delta) and torch.equal(out, total)


@needs_triton
def test_op_names_a_bad_argument():
    from talkgen.kernels.layer_norm import add_layer_norm

    x = torch.randn(2, 4, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="gate must be float32"):
        add_layer_norm(x, x, torch.randn(3, 1, 16), None, None, None, None, 1e-6)
    with pytest.raises(ValueError, match="delta"):
        add_layer_norm(x, x[:, :2], None, None, None, None, None, 1e-6)
    with pytest.raises(ValueError, match="scale and shift"):
        add_layer_norm(x, x, None, None, None, torch.randn(2, 1, 16), None, 1e-6)
    with pytest.raises(ValueError, match="weight"):
        add_layer_norm(x, x, None, torch.ones(8), None, None, None, 1e-6)
