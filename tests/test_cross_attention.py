"""The I2V cross-attention's text + image attention and sum in one Triton kernel
(talkgen.kernels.cross_attention) against the torch path it replaces, in Triton's interpreter on
the CPU (a fresh process: the setting must precede the import of triton), and the module's choice
between the two. On a GPU, benchmarks/bench_cross_attention.py checks it at full size."""

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
def test_kernel_matches_the_torch_path_in_the_interpreter():
    code = r"""
import torch
from talkgen.models import dit
from talkgen.kernels.cross_attention import Config, launch, text_image_attention

g = torch.Generator().manual_seed(0)
B, L, H, D = 2, 150, 3, 32  # 150 query rows: the last block is partial
for text_len, image_len in ((70, 9), (64, 1)):  # lengths off and on the key block
    x = torch.randn(5, B, max(L, text_len), H, D, generator=g)
    x[1] += 1.5  # keys with a common component, as real ones have
    q = x[0, :, :L].half()
    k, v = x[1, :, :text_len].half(), x[2, :, :text_len].half()
    k_img, v_img = x[3, :, :image_len].half(), x[4, :, :image_len].half()
    args = (q, k, v, k_img, v_img)
    exact = dit.torch_text_image_attention(*(t.double() for t in args))
    expected = dit.torch_text_image_attention(*args)  # SDPA twice in fp16 and an fp16 add
    err = lambda t: ((t.double() - exact).norm() / exact.norm()).item()
    for config in (Config(64, 32, 4, 2), Config(32, 16, 4, 1)):
        got = launch(*args, config=config)
        assert got.shape == (B, L, H * D) and got.dtype == torch.float16
        assert err(got) <= max(2 * err(expected), 1e-3), (config, err(got), err(expected))
        assert (got.float() - expected.float()).abs().max() <= 4e-3, (got.float() - expected.float()).abs().max()
    # the module's dispatch: with talkgen's kernels allowed, inference takes the kernel (default config)
    dit.own_kernels_allowed = lambda device_type: True
    with torch.no_grad():
        assert torch.equal(dit.text_image_attention(*args), text_image_attention(*args))
    dit.own_kernels_allowed = lambda device_type: False
    assert torch.equal(dit.text_image_attention(*args), expected)
print("OK")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, TRITON_INTERPRET="1"), timeout=600)
    assert "OK" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]


def test_cross_attention_module_keeps_the_torch_path_on_the_cpu():
    """On the CPU the block's cross-attention is SDPA twice and an add, as before the kernel."""
    torch.manual_seed(0)
    module = dit.ImageTextCrossAttention(32, 4, 1e-6).eval()
    x, text, image = torch.randn(2, 10, 32), torch.randn(2, 7, 32), torch.randn(2, 3, 32)
    with torch.no_grad():
        got = module(x, text, image)
        q = dit.split_heads(module.norm_q(module.q(x)), 4)
        k, v = dit.split_heads(module.norm_k(module.k(text)), 4), dit.split_heads(module.v(text), 4)
        ki, vi = dit.split_heads(module.norm_k_img(module.k_img(image)), 4), dit.split_heads(module.v_img(image), 4)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        expected = module.o(dit.merge_heads(sdpa(q, k, v)) + dit.merge_heads(sdpa(q, ki, vi)))
    assert torch.equal(got, expected)


@needs_triton
def test_kernel_refuses_mismatched_contexts():
    from talkgen.kernels.cross_attention import launch

    q = torch.zeros(1, 4, 2, 16, dtype=torch.float16)
    k = torch.zeros(1, 5, 2, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"k_image \(1, 3, 3, 16\)"):
        launch(q, k, k, torch.zeros(1, 3, 3, 16, dtype=torch.float16), torch.zeros(1, 3, 2, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match="same length"):
        launch(q, k, k[:, :4], k, k)
