"""The Gluon (Hopper) attention kernel on the CPU: the module imports everywhere, and where
Triton's Gluon with the Hopper module and ptxas are present, every benchmark variant compiles for
sm_90a (no GPU needed) into PTX with asynchronous wgmma and without register spills. Whether it
runs correctly and fast is benchmarks/bench_attention_gluon.py's job, on an H100. The 8-bit
variants (``FP8_VARIANTS``) are compile-checked the same way, and their arithmetic is checked on
the CPU through ``emulate_fp8_kernel`` (the kernel's formulas in torch).

The kernel is written against Triton 3.6 (the GPU machine's) and also compiles with 3.9 (CI's):
the two API renames between them (the TMA load, the CTA barrier) are resolved at import."""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import shutil
from pathlib import Path

import pytest

from talkgen.kernels import attention_gluon


def test_module_imports_and_reports_gluon():
    module = importlib.reload(attention_gluon)
    assert isinstance(module.GLUON_AVAILABLE, bool)
    assert module.VARIANTS and module.DEFAULT_CONFIG in module.VARIANTS
    # the model's default is the variant measured fastest on the H100 (docs/performance.md)
    assert module.DEFAULT_CONFIG.name == "ws-split-ppns-lr-m128-n128-s3-w4"
    assert len({cfg.name for cfg in module.VARIANTS}) == len(module.VARIANTS)


def test_rejects_unsupported_configurations():
    with pytest.raises(ValueError, match="num_warps"):
        attention_gluon._validate(attention_gluon.Config(split_consumers=True, num_warps=8))
    with pytest.raises(ValueError, match="warp_specialize"):
        attention_gluon._validate(attention_gluon.Config(warp_specialize=False, split_consumers=True))
    with pytest.raises(ValueError, match="split_consumers"):
        attention_gluon._validate(attention_gluon.Config(split_consumers=False, num_warps=8, fa3_loop=True))
    with pytest.raises(ValueError, match="pingpong needs fa3_loop"):
        attention_gluon._validate(attention_gluon.Config(pingpong=True))
    pingpong = dict(split_consumers=True, num_warps=4, fa3_loop=True, pingpong=True)
    with pytest.raises(ValueError, match="named_turns needs pingpong"):
        attention_gluon._validate(attention_gluon.Config(split_consumers=True, num_warps=4, fa3_loop=True,
                                                         named_turns=True))
    with pytest.raises(ValueError, match="named_release needs named_turns"):
        attention_gluon._validate(attention_gluon.Config(**pingpong, named_release=True))
    # the two-barrier rotation of the slot release is safe with at most 3 stages (see _release_named)
    with pytest.raises(ValueError, match="at most 3 stages"):
        attention_gluon._validate(attention_gluon.Config(**pingpong, stages=4, named_turns=True, named_release=True))
    attention_gluon._validate(attention_gluon.Config(**pingpong, stages=3, named_turns=True, named_release=True))
    # the signaller's three-barrier rotation rests on the same slot-release order
    with pytest.raises(ValueError, match="named_ready needs named_release"):
        attention_gluon._validate(attention_gluon.Config(**pingpong, stages=3, named_turns=True, named_ready=True))
    attention_gluon._validate(attention_gluon.Config(**pingpong, stages=3, named_turns=True, named_release=True,
                                                     named_ready=True))


def test_new_variants_come_first_and_are_named_apart():
    names = [cfg.name for cfg in attention_gluon.VARIANTS]
    assert names[0] == "ws-split-pp-m128-n128-s2-w4"
    first_old = next(i for i, cfg in enumerate(attention_gluon.VARIANTS) if not cfg.fa3_loop)
    assert all(not cfg.fa3_loop for cfg in attention_gluon.VARIANTS[first_old:])


def _ptxas_available() -> bool:
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    except ImportError:
        return False
    return bundled.exists() or shutil.which("ptxas") is not None


def _local_memory_bytes(cubin: bytes, tmp_path: Path) -> int | None:
    """Local memory (register spills) per thread of the cubin, from Triton's bundled cuobjdump;
    ``None`` where that tool is missing."""
    import re
    import subprocess

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    usage = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True).stdout
    found = re.search(r"LOCAL:(\d+)", usage)
    return int(found.group(1)) if found else None


def _sass_events(cubin: bytes, tmp_path: Path) -> str | None:
    """The consumer-relevant SASS instructions in order, one letter each: W = wait for all wgmma
    groups (``WARPGROUP.DEPBAR.LE gsb0, 0x0``), w = wait for all but one, e = MUFU.EX2; ``None``
    where Triton's bundled cuobjdump is missing."""
    import subprocess

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    path = tmp_path / "kernel_sass.cubin"
    path.write_bytes(cubin)
    sass = subprocess.run([str(tool), "-sass", str(path)], capture_output=True, text=True).stdout
    events = []
    for line in sass.splitlines():
        if "WARPGROUP.DEPBAR.LE" in line:
            events.append("W" if "0x0" in line.split("gsb0")[1].split(";")[0] else "w")
        elif "MUFU.EX2" in line:
            events.append("e")
    return "".join(events)


def _skip_reason() -> str | None:
    if not attention_gluon.GLUON_AVAILABLE:
        return "triton.experimental.gluon with the Hopper module is not importable here"
    if not _ptxas_available():
        return "no ptxas (Triton's bundled one or on PATH) to build the sm_90a cubin"
    return None


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_variants_compile_for_hopper(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # really compile, never a cached cubin
    for cfg in attention_gluon.VARIANTS:
        compiled = attention_gluon.compile_for_hopper(cfg, head_dim=128)
        ptx = compiled.asm["ptx"]
        assert "wgmma.mma_async" in ptx, cfg.name
        assert ".target sm_90a" in ptx, cfg.name
        assert compiled.asm["cubin"], cfg.name
        spilled = _local_memory_bytes(compiled.asm["cubin"], tmp_path)
        assert spilled in (None, 0), f"{cfg.name}: {spilled} B of local memory (register spills)"
        assert compiled.metadata.shared <= 232448, f"{cfg.name}: {compiled.metadata.shared} B shared"
        if cfg.warp_specialize:
            assert "setmaxnreg" in ptx, f"{cfg.name}: warp specialization without register reallocation"
        if cfg.fa3_loop:
            # The point of the FA3 loop: after "wait for S_j" (w) ptxas must leave the exp2s (e) of
            # the softmax before "wait for P V" (W), in both arms of the masking branch; in the old
            # loop it hoists W right behind w. Each consumer partition has one loop.
            events = _sass_events(compiled.asm["cubin"], tmp_path)
            if events is not None:
                arms = events.split("w")[1:]
                assert len(arms) == 2, f"{cfg.name}: {len(arms)} 'wait all but one' in the SASS, expected 2"
                for arm in arms:
                    head = arm.split("W")[0]
                    assert head.count("e") >= cfg.block_n // 4, f"{cfg.name}: P V wait hoisted above the softmax"
        if cfg.pingpong and cfg.named_turns:
            # Each consumer syncs on its own named barrier and arrives on the other's (256 threads).
            for sync, arrive in (("bar.sync 10, 256", "bar.arrive 11, 256"), ("bar.sync 11, 256", "bar.arrive 10, 256")):
                assert sync in ptx and arrive in ptx, f"{cfg.name}: named-barrier hand-over missing"
        elif cfg.pingpong:
            assert ptx.count("mbarrier.arrive.shared::cta.b64") >= 4 * 2, f"{cfg.name}: no turn arrives"
        if cfg.named_ready:
            # Only the signaller waits on mbarriers (Q, K, V: three sites; ppnr has ten, five per
            # consumer); the consumers sync on the ready barriers (id in a register, 160 threads) at
            # tile 0 and in the loop, and the signaller arrives on both consumers' barriers.
            assert ptx.count("mbarrier.try_wait") == 3, f"{cfg.name}: a consumer still waits on an mbarrier"
            assert len(re.findall(r"bar\.sync\s+%r\d+, 160", ptx)) == 4, f"{cfg.name}: ready syncs missing"
            assert len(re.findall(r"bar\.arrive\s+%r\d+, 160", ptx)) == 2, f"{cfg.name}: ready arrives missing"
        _check_lazy_rescale(cfg, ptx)


def _check_lazy_rescale(cfg, ptx: str) -> None:
    """Conditional rescaling: each consumer's two rescales of O (in the loop and before the last
    P V) are the inline-PTX block that tests both of a thread's row alphas against 1.0 and branches
    over the 64 multiplies; without it, no such block."""
    blocks = ptx.count("bra SKIP_RESCALE;")
    if cfg.lazy_rescale:
        assert blocks == 4, f"{cfg.name}: {blocks} lazy rescale blocks, expected 2 per consumer"
        assert ptx.count("setp.neu.or.f32 need,") == 4, cfg.name
    else:
        assert blocks == 0, cfg.name


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_lazy_rescale_refuses_another_register_order(tmp_path, monkeypatch):
    """The lazy-rescale PTX takes a thread's two row alphas from its elements 0 and 2; the kernel
    checks at compile time that O's layout puts them there, and refuses to compile otherwise
    (``auto`` then falls back to SDPA) instead of silently skipping rescales."""
    from triton.experimental import gluon

    @gluon.constexpr_function
    def never(reg_bases):
        return False

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(attention_gluon, "_rows_at_elements_0_and_2", never)
    with pytest.raises(Exception) as failure:
        attention_gluon.compile_for_hopper(attention_gluon.DEFAULT_CONFIG)
    chain, error = [], failure.value
    while error is not None:  # Triton wraps the assertion in one CompilationError per call frame
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("register order" in message for message in chain), chain[-1][-500:]


def test_lazy_rescale_keeps_p_in_range():
    """The threshold bounds P: bf16 P <= 2^8 (far inside its range); the 8-bit kernel's e4m3 P,
    already shifted by 2^P_SHIFT, must stay under e4m3's largest value, 448."""
    assert 0 < attention_gluon.LAZY_RESCALE_THRESHOLD <= 8
    for cfg in attention_gluon.FP8_VARIANTS:
        attention_gluon._validate_fp8(cfg)
        if cfg.lazy_rescale:
            assert 2 ** (cfg.p_shift + cfg.rescale_threshold) <= 448, cfg.name
    with pytest.raises(ValueError, match="e4m3"):
        attention_gluon._validate_fp8(attention_gluon.Fp8Config(lazy_rescale=True, rescale_threshold=1.0))


def test_lazy_online_softmax_is_exact():
    """The conditional-rescaling rule of ``_softmax_core`` (a row's max moves only when a block
    raises it by more than the threshold), emulated block by block in float64 on scores that keep
    rising, so both branches run: the result is softmax(S) V, as with the exact running max."""
    import torch

    torch.manual_seed(0)
    rows, keys, block, threshold = 16, 1024, 128, attention_gluon.LAZY_RESCALE_THRESHOLD
    s = torch.randn(rows, keys, dtype=torch.float64) * 3 + torch.linspace(0, 40, keys, dtype=torch.float64)
    v = torch.randn(keys, 32, dtype=torch.float64)
    m = torch.full((rows,), -float("inf"), dtype=torch.float64)
    l = torch.zeros(rows, dtype=torch.float64)
    o = torch.zeros(rows, 32, dtype=torch.float64)
    moved = 0
    for j in range(0, keys, block):
        blk = s[:, j:j + block]
        row_max = blk.max(dim=1).values
        m_new = torch.where(row_max > m + threshold, row_max, m)
        moved += int((m_new != m).sum())
        p = torch.exp2(blk - m_new[:, None])
        assert p.max() <= 2 ** threshold
        alpha = torch.exp2(m - m_new)
        l = l * alpha + p.sum(dim=1)
        o = o * alpha[:, None] + p @ v[j:j + block]
        m = m_new
    expected = torch.softmax(s * math.log(2), dim=1) @ v
    assert rows < moved < rows * keys // block  # the max moved after the first block, but not always
    assert torch.allclose(o / l[:, None], expected, rtol=1e-12, atol=1e-12)


def test_auto_falls_back_to_sdpa_when_the_kernel_fails(monkeypatch):
    """Chosen by ``auto``, a Gluon kernel that fails to compile or launch (its API changes between
    Triton releases) is given up for SDPA, once, with the same output layout; forced by
    ``TALKGEN_ATTENTION=gluon`` the failure is raised."""
    import torch
    import torch.nn.functional as F

    from talkgen.kernels import attention_gluon
    from talkgen.models import attention as attn

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(attention_gluon, "attention_bf16_gluon", broken)
    monkeypatch.setattr(attn, "_gluon_failed", None)
    q, k, v = (torch.randn(1, 2, 64, 32) for _ in range(3))
    with pytest.raises(RuntimeError, match="PassManager"):
        attn.flash_attention(q, k, v, "gluon")
    out = attn.flash_attention(q, k, v, "gluon-auto")
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v))
    assert out.transpose(1, 2).is_contiguous()  # the [B, L, H, D] buffer the kernels return
    assert "PassManager" in attn._gluon_failed
    attn.flash_attention(q, k, v, "gluon-auto")
    assert len(calls) == 2  # given up after the first failure under auto


# ------------------------------------------------------------------------------------------------
# The 8-bit variants (attention_fp8_gluon): compile-checked here (the GPU run is
# benchmarks/bench_attention_gluon.py --fp8).


def test_fp8_variants_are_valid_and_named_apart():
    variants = attention_gluon.FP8_VARIANTS
    assert len(variants) >= 2 and len({cfg.name for cfg in variants}) == len(variants)
    assert {cfg.qk_int8 for cfg in variants} == {True, False}  # both score paths offered
    assert not set(cfg.name for cfg in variants) & set(cfg.name for cfg in attention_gluon.VARIANTS)
    assert attention_gluon.DEFAULT_CONFIG not in variants  # never the model's default
    for cfg in variants:
        attention_gluon._validate_fp8(cfg)
        assert attention_gluon.fp8_shared_bytes(cfg) <= attention_gluon.SHARED_LIMIT
    # 16 KB Q + 4 stages x (K 128x128 + V^T 128x128 bytes) + 15 mbarriers
    assert attention_gluon.fp8_shared_bytes(attention_gluon.Fp8Config(block_n=128, stages=4)) == 147576
    with pytest.raises(ValueError, match="shared memory"):
        attention_gluon._validate_fp8(attention_gluon.Fp8Config(block_n=256, stages=4))
    with pytest.raises(ValueError, match="block_m 128"):
        attention_gluon._validate_fp8(attention_gluon.Fp8Config(block_m=64))
    # the named-barrier rotations of the bf16 default hold for at most 3 stages
    with pytest.raises(ValueError, match="named_sync"):
        attention_gluon._validate_fp8(attention_gluon.Fp8Config(stages=4, named_turns=True, named_sync=True))
    with pytest.raises(ValueError, match="named_sync"):
        attention_gluon._validate_fp8(attention_gluon.Fp8Config(stages=3, named_sync=True))


def test_int32_to_float_bit_trick_is_exact():
    """The int8 path turns the int32 scores into floats with one integer add: bits(1.5 * 2^23) + s
    is the float 1.5 * 2^23 + s for |s| < 2^22, and int8 products over D = 128 stay below that."""
    import torch

    assert 127 * 127 * 128 < 2**22
    s = torch.cat([torch.arange(-(2**22) + 1, -(2**22) + 1000), torch.arange(-5000, 5000),
                   torch.arange(2**22 - 1000, 2**22), torch.randint(-(2**22) + 1, 2**22, (100000,))]).to(torch.int32)
    x = (s + attention_gluon.I32_F32_MAGIC).view(torch.float32)
    assert torch.equal(x.double() - 12582912.0, s.double())
    # the kernel folds "- MAGIC" into the per-row offset of one FMA: x * scale - (MAGIC * scale + m - 8)
    scale = torch.tensor(3e-5)
    m = (x.amax() - 12582912.0) * scale
    fused = x.double() * scale.double() - (scale * 12582912.0 + (m - attention_gluon.P_SHIFT)).double()
    exact = s.double() * scale.double() - (m.double() - attention_gluon.P_SHIFT)
    assert (fused - exact).abs().max().item() < 1e-4  # log2 units: p off by < 0.01 %


def _dit_qkv(L: int, H: int = 2):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.bench_attention import make_qkv

    return make_qkv("dit", 1, H, L, device="cpu")


def _ref(q, k, v):
    import torch

    qf, kf, vf = q.double(), k.double(), v.double()
    return torch.softmax(qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ vf


def _err(out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def test_fp8_kernel_arithmetic_on_cpu():
    """The kernel's arithmetic (``emulate_fp8_kernel``: scales, the 2^8 shift of P, the smoothing
    terms, tile-by-tile online softmax, the epilogue) on DiT-like inputs, two ways: against plain
    float math on the dequantized buffers (the scale bookkeeping; only P's e4m3 rounding differs)
    and against float64 attention on the original inputs (the bound the GPU benchmark holds the
    kernel to, 3e-2, for int8 Q K^T; e4m3 Q K^T is 2-3x worse, as in attention_triton)."""
    import torch

    q, k, v = _dit_qkv(1000)  # 1000 = 7 full 128-key tiles + a masked one
    B, H, L, D = q.shape
    ref = _ref(q, k, v)
    for qk_int8, bound in ((True, 3e-2), (False, 6e-2)):
        qd = attention_gluon.quantize_qkv_reference(q, k, v, 128, qk_int8)
        out = attention_gluon.emulate_fp8_kernel(qd, q.shape, 128, qk_int8, torch.float32)
        LP = qd["LP"]
        q_deq = qd["q8"].view(B, H, LP, D)[:, :, :L].double() * qd["q_scale"].view(B, H, LP, 1)[:, :, :L].double()
        k_deq = (qd["k8"].view(B, H, LP // 128, 128, D).double()
                 * qd["k_scale"].view(B, H, LP // 128, 1, 1).double()).view(B, H, LP, D)[:, :, :L]
        v_deq = (qd["vt8"].view(B, H, D, LP)[..., :L].transpose(-1, -2).double()
                 * qd["v_scale"].view(B, H, 1, D).double() + qd["v_mean"].view(B, H, 1, D).double())
        # q_scale holds log2(e) / sqrt(D): scores in log2 units, softmax in base 2
        direct = torch.softmax(q_deq @ k_deq.transpose(-1, -2) / LOG2E_DOUBLE, -1) @ v_deq
        assert _err(out, direct) < 2e-2, qk_int8  # P's e4m3 rounding only
        assert _err(out, ref) < bound, (qk_int8, _err(out, ref))
        if qk_int8:
            assert _err(out, ref) < _err(out.double() - qd["v_mean"].view(B, H, 1, D), ref) / 10  # mean_v matters


LOG2E_DOUBLE = 1.4426950408889634


def test_wgmma_key_column_permutes_within_16():
    """V^T's column order for ``key_permuted_v``: a permutation of each 16 tokens that takes the
    accumulator's keys of thread c (2c, 2c+1, 8+2c, 9+2c) to the A operand's (4c .. 4c+3)."""
    import torch

    from talkgen.kernels.layout import wgmma_key_column

    n = torch.arange(512)
    column = wgmma_key_column(n)
    assert sorted(column.tolist()) == n.tolist() and ((column // 16) == (n // 16)).all()
    for c in range(4):
        assert sorted(column[[2 * c, 2 * c + 1, 8 + 2 * c, 9 + 2 * c]].tolist()) == list(range(4 * c, 4 * c + 4))
        assert sorted(column[[16 + 2 * c, 17 + 2 * c, 24 + 2 * c, 25 + 2 * c]].tolist()) == list(range(16 + 4 * c, 20 + 4 * c))


def test_key_permuted_v_buffers_give_the_same_attention():
    """With V^T stored in the wgmma key order, the emulated kernel (which reads the order from the
    buffers) gives exactly the natural order's output: only V^T's columns move."""
    import torch

    q, k, v = _dit_qkv(300)
    natural = attention_gluon.quantize_qkv_reference(q, k, v, 128)
    permuted = attention_gluon.quantize_qkv_reference(q, k, v, 128, wgmma_key_order=True)
    assert permuted["vt8_key_order"] == "wgmma" and natural["vt8_key_order"] == "natural"
    assert not torch.equal(permuted["vt8"].view(torch.uint8), natural["vt8"].view(torch.uint8))
    a = attention_gluon.emulate_fp8_kernel(natural, q.shape, 128, True, torch.float32)
    b = attention_gluon.emulate_fp8_kernel(permuted, q.shape, 128, True, torch.float32)
    assert torch.equal(a, b)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_reference_quantizer_matches_quantize_qkv():
    """``quantize_qkv_reference`` (the CPU twin used above) against the real Triton pre-pass, run in
    Triton's interpreter in a fresh process (it must be set before triton is imported)."""
    import os
    import subprocess
    import sys

    code = r"""
import torch
from talkgen.kernels import attention_triton, attention_gluon as ag
g = torch.Generator().manual_seed(0)
x = torch.randn(3, 1, 300, 2, 128, generator=g)
x[1] += 2.0
q, k, v = (x[i].to(torch.bfloat16).transpose(1, 2) for i in range(3))
for i8, order in ((True, False), (False, False), (True, True)):
    a = attention_triton.quantize_qkv(q, k, v, 128, qk_int8=i8, wgmma_key_order=order)
    b = ag.quantize_qkv_reference(q, k, v, 128, i8, wgmma_key_order=order)
    assert a["vt8_key_order"] == b["vt8_key_order"]
    assert a["LP"] == b["LP"] and a["q8"].shape == b["q8"].shape and a["vt8"].shape == b["vt8"].shape
    for name in ("q_scale", "k_scale", "v_scale", "v_mean"):
        assert torch.allclose(a[name].float().view(-1), b[name].float().view(-1), rtol=1e-5, atol=1e-7), name
    for name in ("q8", "k8", "vt8"):
        d = (a[name].float() - b[name].float()).abs()
        if a[name].dtype == torch.int8:
            assert (d <= 1).all() and (d > 0).float().mean() < 0.01, name
        else:  # the interpreter's e4m3 rounding is cruder than the GPU's (some values off by 2x)
            assert (d > 0).float().mean() < 0.05, (name, (d > 0).float().mean())
print("OK")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, env=dict(os.environ, TRITON_INTERPRET="1"), timeout=120)
    assert "OK" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_fp8_variants_compile_for_hopper(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # really compile, never a cached cubin
    for cfg in attention_gluon.FP8_VARIANTS:
        compiled = attention_gluon.compile_fp8_for_hopper(cfg, head_dim=128)
        ptx = compiled.asm["ptx"]
        assert ".target sm_90a" in ptx, cfg.name
        # the 8-bit tensor-core products: S = Q8 K8^T (int8 -> s32 or e4m3 -> f32), O += P8 V8 (e4m3 -> f32)
        qk = ".s32.s8.s8" if cfg.qk_int8 else ".f32.e4m3.e4m3"
        assert f"wgmma.mma_async.sync.aligned.m64n{cfg.block_n}k32{qk}" in ptx, cfg.name
        assert "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in ptx, cfg.name
        assert "wgmma.mma_async.sync.aligned.m64n128k16" not in ptx, f"{cfg.name}: a 16-bit product"
        spilled = _local_memory_bytes(compiled.asm["cubin"], tmp_path)
        assert spilled in (None, 0), f"{cfg.name}: {spilled} B of local memory (register spills)"
        shared = compiled.metadata.shared
        assert shared <= attention_gluon.SHARED_LIMIT, f"{cfg.name}: {shared} B shared"
        estimate = attention_gluon.fp8_shared_bytes(cfg)
        assert estimate <= shared <= estimate + 1024, f"{cfg.name}: {shared} B shared, estimated {estimate}"
        assert "setmaxnreg" in ptx, cfg.name
        if cfg.named_turns:
            assert "bar.sync 10, 256" in ptx and "bar.arrive 10, 256" in ptx, f"{cfg.name}: named hand-over missing"
            if cfg.named_sync:  # only the signaller waits on mbarriers, as in ws-split-ppns
                assert ptx.count("mbarrier.try_wait") == 3, f"{cfg.name}: a consumer still waits on an mbarrier"
                assert len(re.findall(r"bar\.sync\s+%r\d+, 160", ptx)) == 4, f"{cfg.name}: ready syncs missing"
        else:
            assert ptx.count("mbarrier.arrive.shared::cta.b64") >= 4 * 2, f"{cfg.name}: no turn arrives"
        # the FA3 loop's point, as for the bf16 variants: the exp2s between "S_j done" and "P V done"
        events = _sass_events(compiled.asm["cubin"], tmp_path)
        if events is not None:
            arms = events.split("w")[1:]
            assert len(arms) == 2, f"{cfg.name}: {len(arms)} 'wait all but one' in the SASS, expected 2"
            for arm in arms:
                assert arm.split("W")[0].count("e") >= cfg.block_n // 4, f"{cfg.name}: P V wait hoisted"
        _check_lazy_rescale(cfg, ptx)
        _check_p_operand(cfg, ptx)


def _check_p_operand(cfg, ptx: str) -> None:
    """P from the S accumulator to the P V product's A operand: the plain conversion swaps
    registers between threads (shfl.sync.idx + prmt); with ``key_permuted_v`` none is left (the
    row max / sum reductions use shfl.sync.bfly; one idx shuffle sits outside the consumers)."""
    exchanges = ptx.count("shfl.sync.idx")
    if cfg.key_permuted_v:
        assert exchanges <= 1 and "prmt.b32" not in ptx, f"{cfg.name}: {exchanges} idx shuffles"
    else:
        assert exchanges >= 4 * 16, f"{cfg.name}: {exchanges} idx shuffles, the plain conversion has 16 per P"

