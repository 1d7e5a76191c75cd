"""The Gluon (Hopper) attention kernel on the CPU: the module imports everywhere, and where
Triton's Gluon with the Hopper module and ptxas are present, every benchmark variant compiles for
sm_90a (no GPU needed) into PTX with asynchronous wgmma and without register spills. Whether it
runs correctly and fast is benchmarks/bench_attention_gluon.py's job, on an H100.

The kernel is written against Triton 3.6 (the GPU machine's) and also compiles with 3.9 (CI's):
the two API renames between them (the TMA load, the CTA barrier) are resolved at import."""

from __future__ import annotations

import importlib
import shutil
import time
from pathlib import Path

import pytest

from talkgen.kernels import attention_gluon


def test_module_imports_and_reports_gluon():
    module = importlib.reload(attention_gluon)
    assert isinstance(module.GLUON_AVAILABLE, bool)
    assert module.VARIANTS and module.DEFAULT_CONFIG in module.VARIANTS
    # the model's default is the variant measured fastest on the H100 (docs/performance.md)
    assert module.DEFAULT_CONFIG.name == "ws-split-pp-m128-n128-s3-w4"
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
    start = time.time()
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
        if cfg.pingpong:
            assert ptx.count("mbarrier.arrive.shared::cta.b64") >= 4 * 2, f"{cfg.name}: no turn arrives"
    assert time.time() - start < 60


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
