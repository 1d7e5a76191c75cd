"""The Triton attention kernels at tiny sizes on the CPU, in Triton's interpreter, and the backend
selection. The interpreter runs the same kernel code (both the tensor-descriptor and the tl.load
variants); its numpy dot has no bf16 and its e4m3 rounding is cruder than the GPU's, so the bf16
kernel is checked in fp16 here and the 8-bit one only loosely (benchmarks/check_attention.py holds
both to their real limits on a GPU)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if "triton" not in sys.modules:  # Triton's own library functions must be built for the interpreter too
    _old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
        from talkgen.kernels import attention_triton  # noqa: F401  (built for the interpreter)
    except ImportError:
        pytest.skip("triton is not installed (pip install 'talkgen[test]')", allow_module_level=True)
    finally:
        os.environ.pop("TRITON_INTERPRET") if _old is None else os.environ.__setitem__("TRITON_INTERPRET", _old)
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from talkgen.kernels import attention_triton as kernels  # noqa: E402

# Imported earlier in this process without the interpreter: the kernel tests run in a fresh one.
INTERPRETED = isinstance(kernels._attn_fwd_bf16, InterpretedFunction)
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="Triton was imported before without "
                                       "TRITON_INTERPRET=1; test_kernels_in_fresh_interpreter runs these")
Config = kernels.Config


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """Interpreted kernels check the setting when they run, too."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.skipif(INTERPRETED, reason="the kernel tests run in this process")
def test_kernels_in_fresh_interpreter():
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            cwd=Path(__file__).parents[1], capture_output=True, text=True,
                            env=dict(os.environ, TRITON_INTERPRET="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def _qkv(B, H, L, D=128, dtype=torch.float16, layout="blhd", seed=0, k_offset=2.0, sharp=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, B, L, H, D, generator=g)
    x[1] += k_offset  # a common component in k, as real keys have (smoothing removes it)
    x[0] *= sharp
    x = x.to(dtype)
    q, k, v = (x[i].transpose(1, 2) for i in range(3))  # the DiT's layout: views of [B, L, H, D]
    if layout == "bhld":
        q, k, v = (t.contiguous() for t in (q, k, v))
    return q, k, v


def _ref(q, k, v):
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    return s.softmax(-1) @ v.double()


def _err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@needs_interpreter
@pytest.mark.parametrize("cfg", [Config(64, 32, tma=False), Config(64, 32), Config(64, 32, split=2),
                                 Config(32, 64, split=2, tma=False), Config(64, 32, lazy_rescale=True)],
                         ids=["ldst", "tma", "tma-split2", "ldst-split2", "lazy"])
@pytest.mark.parametrize("layout", ["blhd", "bhld"])
def test_bf16_kernel_matches_float64(cfg, layout):
    q, k, v = _qkv(2, 2, 200, layout=layout)  # 200: a partial last block for every block size
    ref = _ref(q, k, v)
    out = kernels.attention_bf16(q, k, v, cfg)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert out.transpose(1, 2).is_contiguous()  # written as [B, L, H, D]: merge_heads is free
    assert _err(out, ref) <= 2 * _err(F.scaled_dot_product_attention(q, k, v), ref) + 1e-4


@needs_interpreter
def test_bf16_kernel_head_dim_64_and_short_sequence():
    q, k, v = _qkv(1, 3, 40, D=64, layout="bhld", seed=3)
    out = kernels.attention_bf16(q, k, v, Config(32, 32))
    assert _err(out, _ref(q, k, v)) <= 2e-3


@needs_interpreter
@pytest.mark.parametrize("cfg", [Config(64, 32, tma=False), kernels.FP8_FAST_CONFIG,
                                 Config(64, 32, split=2, tc_sum=True), Config(64, 64, qk_int8=False, lazy_rescale=True)],
                         ids=["int8qk-ldst", "fast-default", "tc-sum", "e4m3qk-lazy"])
@pytest.mark.parametrize("sharp", [1.0, 4.0])
def test_fp8_kernel_close_to_float64(cfg, sharp):
    q, k, v = _qkv(2, 2, 200, dtype=torch.bfloat16, seed=1, sharp=sharp)
    out = kernels.attention_fp8(q, k, v, cfg)
    assert out.dtype == torch.bfloat16 and out.transpose(1, 2).is_contiguous()
    # a wrong block scale, a missing mask or a misplaced tile gives errors of order one
    assert _err(out, _ref(q, k, v)) <= 0.2


@needs_interpreter
@pytest.mark.parametrize("cfg", [kernels.FP8_CONFIG, kernels.FP8_CONFIG.portable()], ids=["tma", "ldst"])
def test_int8_qk_with_16_bit_pv(cfg):
    q, k, v = _qkv(2, 2, 200, seed=2)
    out = kernels.attention_fp8(q, k, v, cfg)
    assert _err(out, _ref(q, k, v)) <= 2e-2  # only the int8 rounding of the smoothed q and k


@needs_interpreter
def test_quantization_prepass():
    q, k, v = _qkv(1, 2, 130, dtype=torch.bfloat16, seed=4)
    qd = kernels.quantize_qkv(q, k, v, block_n=64)
    LP = qd["LP"]
    assert LP % kernels.PAD == 0 and LP >= 130
    q8 = qd["q8"].view(1, 2, LP, 128)
    assert q8.abs().amax().item() == 127 and (q8[:, :, 130:] == 0).all()
    # dequantized q equals q within half a step; scales carry 1/sqrt(D) * log2(e)
    step = qd["q_scale"].view(1, 2, LP, 1)[:, :, :130] / (kernels.LOG2E / math.sqrt(128))
    assert ((q8[:, :, :130].float() * step - q.float()).abs() <= step * 0.5 + 1e-6).all()
    k8 = qd["k8"].view(1, 2, LP, 128).float()
    k_smooth = k.float() - k.float().mean(2, keepdim=True)
    k_step = qd["k_scale"].view(1, 2, LP // 64, 1, 1)
    k_deq = (k8.view(1, 2, LP // 64, 64, 128) * k_step).view(1, 2, LP, 128)[:, :, :130]
    assert ((k_deq - k_smooth).abs() <= k_step.amax() * 0.5 + 1e-6).all()
    vt = qd["vt8"].view(1, 2, 128, LP).float()
    v_deq = vt.transpose(-1, -2)[:, :, :130] * qd["v_scale"].view(1, 2, 1, 128) + qd["v_mean"].view(1, 2, 1, 128)
    assert _err(v_deq, v.double()) <= 0.1  # e4m3 (3 mantissa bits; cruder rounding in the interpreter)


@needs_interpreter
def test_custom_op_under_torch_compile():
    from talkgen.models.attention import flash_attention

    q, k, v = _qkv(1, 2, 96, seed=5)

    def block(q, k, v):
        out = flash_attention(q * 0.5, k, v, "triton")  # [B, H, L, D] view of [B, L, H, D]
        return out.transpose(1, 2).reshape(1, 96, -1) * 2.0

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    got = compiled(q, k, v)
    want = block(q, k, v)
    assert torch.equal(got, want)
    ref = _ref(q * 0.5, k, v).transpose(1, 2).reshape(1, 96, -1) * 2.0
    assert _err(got, ref) <= 1e-3


def test_backend_setting(monkeypatch):
    from talkgen.errors import TalkgenError
    from talkgen.models import attention as attn

    monkeypatch.delenv("TALKGEN_ATTENTION", raising=False)
    assert attn.backend_setting() == "auto"
    for value in ("sdpa", "triton", "gluon", "triton-fp8", "triton-fp8-fast", "gluon-fp8", "AUTO"):
        monkeypatch.setenv("TALKGEN_ATTENTION", value)
        assert attn.backend_setting() == value.lower()
        assert attn.resolve_backend("cpu") == "sdpa"  # CPU runs always use SDPA
    monkeypatch.setenv("TALKGEN_ATTENTION", "flash")
    with pytest.raises(TalkgenError, match="TALKGEN_ATTENTION"):
        attn.backend_setting()
    assert "invalid setting" in attn.describe_backend()
    monkeypatch.setenv("TALKGEN_ATTENTION", "sdpa")
    assert attn.describe_backend() == "torch SDPA (TALKGEN_ATTENTION=sdpa)"


def test_attention_uses_sdpa_on_cpu(monkeypatch):
    """A problem the Triton kernels would take on a GPU (the shape check passed) still goes to
    SDPA on the CPU, whatever TALKGEN_ATTENTION forces."""
    from talkgen.models import attention as attn

    triton_calls = []
    monkeypatch.setattr(attn, "_fits_triton", lambda q, k, v: True)  # the backend choice decides alone
    monkeypatch.setattr(attn, "flash_attention", lambda *args: triton_calls.append(args[-1]))
    q, k, v = _qkv(1, 2, 64, dtype=torch.bfloat16)
    for value in ("auto", "triton", "gluon", "triton-fp8", "triton-fp8-fast", "gluon-fp8"):
        monkeypatch.setenv("TALKGEN_ATTENTION", value)
        assert torch.equal(attn.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert triton_calls == []


def test_bad_setting_refused_when_the_model_loads(monkeypatch, tmp_path):
    """A bad TALKGEN_ATTENTION is refused by from_pretrained before any weights load (on the CPU
    too, where self-attention never consults it), naming the setting and the accepted values;
    not later, from inside torch.compile's trace of the first forward."""
    from talkgen.errors import TalkgenError
    from talkgen.models import attention as attn
    from talkgen.pipeline.pipeline import Pipeline

    monkeypatch.setenv("TALKGEN_ATTENTION", "flash")
    with pytest.raises(TalkgenError, match="TALKGEN_ATTENTION='flash'.*auto, sdpa, triton, gluon, triton-fp8, triton-fp8-fast, gluon-fp8"):
        attn.check_backend("cpu")
    with pytest.raises(TalkgenError, match="TALKGEN_ATTENTION='flash'.*auto, sdpa, triton, gluon, triton-fp8, triton-fp8-fast, gluon-fp8"):
        Pipeline.from_pretrained(tmp_path / "tiny", "tiny", device="cpu")
    assert not (tmp_path / "tiny").exists()  # refused before the tiny weights were even written
    monkeypatch.setenv("TALKGEN_ATTENTION", "triton")
    assert attn.check_backend("cpu") == "sdpa"
