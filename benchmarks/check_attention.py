"""GPU check of the Triton and Gluon attention kernels (the TMA / Hopper paths that CPU tests cannot run).

Odd lengths (tails of every block size), batch 1-3, the DiT's [B, L, H, D] layout and plain
[B, H, L, D], bf16 and fp16: the bf16 kernel within 1.5x SDPA's error against float32 (plus 1e-3),
the 8-bit kernel within 3e-2 (with e4m3 P and V: 3.5e-2 on DiT-like inputs, 8e-2 on noise);
every output element written (the output buffer is poisoned with NaN first); and ``talkgen.models.attention.attention`` under ``torch.compile(fullgraph=True)`` through
the custom op; q / k RMSNorm + RoPE (``talkgen.kernels.norm_rope``) and the residual adds + LayerNorms
(``talkgen.kernels.layer_norm``, ``benchmarks/check_layer_norm.py``) against the torch ops they
replace. Exits non-zero on a failure. Run on the GPU machine:

    python benchmarks/check_attention.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_attention import make_qkv, reference, rel_err  # noqa: E402
from talkgen.kernels import attention_gluon  # noqa: E402
from talkgen.kernels import attention_triton as kernels  # noqa: E402


def main() -> int:
    failures = []
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):  # every buffer the kernels allocate starts as NaN
        t = real_empty(*args, **kwargs)
        if t.is_floating_point() and t.element_size() >= 2:
            t.fill_(float("nan"))
        return t

    gluon = attention_gluon.GLUON_AVAILABLE and torch.cuda.get_device_capability()[0] == 9
    cases = [(1, 3, 4096 + 77, torch.bfloat16, "blhd"), (2, 2, 5000, torch.float16, "blhd"),
             (3, 2, 4133, torch.bfloat16, "bhld"), (1, 2, 32928, torch.bfloat16, "blhd"),
             (1, 1, 300, torch.bfloat16, "bhld")]
    for B, H, L, dtype, layout in cases:
        for kind in ("gaussian", "dit"):
            q, k, v = make_qkv(kind, B, H, L, 128, seed=L + B, dtype=dtype)
            if layout == "bhld":
                q, k, v = (t.contiguous() for t in (q, k, v))
            ref = reference(q, k, v)
            e_sdpa = rel_err(F.scaled_dot_product_attention(q, k, v), ref)
            torch.empty = poisoned_empty
            try:
                results = {"bf16": kernels.attention_bf16(q, k, v),
                           "bf16-ldst": kernels.attention_bf16(q, k, v, kernels.BF16_CONFIG.portable()),
                           "fp8": kernels.attention_fp8(q, k, v),
                           "fp8-ldst": kernels.attention_fp8(q, k, v, kernels.FP8_CONFIG.portable()),
                           "fp8fast": kernels.attention_fp8(q, k, v, kernels.FP8_FAST_CONFIG),
                           "fp8fast-ldst": kernels.attention_fp8(q, k, v, kernels.FP8_FAST_CONFIG.portable())}
                if gluon:
                    results["bf16-gluon"] = attention_gluon.attention_bf16_gluon(q, k, v)
                    results["fp8fast-gluon"] = attention_gluon.attention_fp8_gluon(
                        q, k, v, attention_gluon.FP8_DEFAULT_CONFIG)
            finally:
                torch.empty = real_empty
            for name, out in results.items():
                err = rel_err(out, ref)
                limit = (1.5 * e_sdpa + 1e-3 if name.startswith("bf16") else 3e-2 if not name.startswith("fp8fast")
                         else 3.5e-2 if kind == "dit" else 8e-2)  # e4m3 P and V: see attention_triton
                ok = err <= limit  # NaN (an unwritten element) fails too
                print(f"{'ok  ' if ok else 'FAIL'} B{B} H{H} L{L} {str(dtype)[6:]} {layout} {kind:8s} {name:12s} "
                      f"err {err:.2e} (SDPA {e_sdpa:.2e}, limit {limit:.1e})", flush=True)
                if not ok:
                    failures.append((B, H, L, kind, name, err))

    # the DiT's entry point under torch.compile: the custom op keeps the graph whole
    from talkgen.models import attention as attn

    q, k, v = make_qkv("dit", 1, 4, 8192, 128, seed=7)
    ref = reference(q, k, v)
    for setting in ("triton", "triton-fp8", "triton-fp8-fast") + (("gluon", "gluon-fp8") if gluon else ()):
        os.environ["TALKGEN_ATTENTION"] = setting
        torch._dynamo.reset()

        def block(q, k, v):
            return attn.attention(q * 1.0, k, v).transpose(1, 2).reshape(1, 8192, -1) + 1.0

        compiled = torch.compile(block, fullgraph=True)
        out = compiled(q, k, v)
        eager = block(q, k, v)
        err = rel_err((out - 1.0).view(1, 8192, 4, 128).transpose(1, 2), ref)
        same = (out - eager).abs().max().item()
        ok = err <= {"triton": 1e-2, "gluon": 1e-2, "triton-fp8": 3e-2, "triton-fp8-fast": 3.5e-2,
                     "gluon-fp8": 3.5e-2}[setting] and same <= 1e-2
        print(f"{'ok  ' if ok else 'FAIL'} torch.compile fullgraph, {setting}: err {err:.2e}, "
              f"|compiled - eager| {same:.1e}")
        if not ok:
            failures.append(("compile", setting, err, same))
    os.environ.pop("TALKGEN_ATTENTION")
    failures += check_norm_rope()
    from benchmarks.check_layer_norm import check as check_layer_norm

    failures += check_layer_norm()
    print("FAILED:", failures if failures else "none")
    return 1 if failures else 0


@torch.no_grad()  # inference, as the pipeline runs it (the op has no autograd formula)
def check_norm_rope() -> list:
    """q / k RMSNorm + RoPE in one Triton pass against the torch ops it replaces (eager), at the
    DiT's width on a 480p clip's tokens and at an odd length, batch 2: at most one rounding apart
    (relative to each rotated pair's length), nearly all elements equal, and the same under
    torch.compile."""
    from talkgen.kernels.norm_rope import rms_norm_rope
    from talkgen.models import dit

    failures = []
    g = torch.Generator(device="cuda").manual_seed(3)
    for batch, grid in ((1, (21, 28, 56)), (2, (3, 7, 11))):
        cos, sin = dit._rope_3d_table(grid, 128, torch.device("cuda"))
        norm = dit.RMSNorm(5120, 1e-6).cuda()
        norm.weight.data = 1 + 0.2 * torch.randn(5120, device="cuda", generator=g)
        x = (3 * torch.randn(batch, cos.shape[0], 5120, device="cuda", generator=g)).to(torch.bfloat16)
        expected = dit.apply_rope_pairs(norm(x).view(batch, -1, 40, 128), cos[:, None], sin[:, None]).to(x.dtype)
        got = rms_norm_rope(x, norm.weight, cos, sin, 40, 1e-6)
        compiled = torch.compile(lambda t: rms_norm_rope(t, norm.weight, cos, sin, 40, 1e-6) * 1.0, fullgraph=True)(x)
        pair = expected.float().unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True).expand(-1, -1, -1, -1, 2)
        diff = (got.float() - expected.float()).abs()
        worst = (diff / pair.flatten(-2).clamp_min(1e-3)).max().item()
        differing = (diff > 0).float().mean().item()
        ok = worst <= 2 ** -6 and differing < 0.02 and torch.equal(compiled, got)  # two roundings may flip
        print(f"{'ok  ' if ok else 'FAIL'} rms_norm_rope B{batch} L{cos.shape[0]}: worst {worst:.1e} of a pair's "
              f"length, {differing:.2%} of elements differ, compiled == eager: {torch.equal(compiled, got)}")
        if not ok:
            failures.append(("rms_norm_rope", batch, worst, differing))
    return failures


if __name__ == "__main__":
    if "--norm-rope-only" in sys.argv:
        sys.exit(1 if check_norm_rope() else 0)
    sys.exit(main())
