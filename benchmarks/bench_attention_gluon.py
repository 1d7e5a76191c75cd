"""The Gluon (Hopper) flash-attention kernel on the GPU: correctness first, then speed against SDPA.

For each variant of ``talkgen.kernels.attention_gluon.VARIANTS`` in the run list (by default the
FA3-loop / ping-pong variants, then the best of the first loop; ``--all`` for every variant), in its
own subprocess so that a variant that hangs (an mbarrier never completing) or faults (which
poisons the CUDA context) is reported and the others still run:

1. correctness at small sizes (B 1-2, H 2, L 1000 / 4097 / 8192, both the contiguous [B, H, L, D]
   layout and the DiT's [B, L, H, D]-transposed one) against float32 math on Gaussian inputs
   (no TF32); the relative Frobenius error must be <= 5e-3 (bf16 SDPA: ~3-4e-3);
2. only if correct: speed at 1 x 40 x 32,928 x 128 and 1 x 40 x 75,600 x 128 (DiT layout), the
   median of 5 CUDA-event-timed calls after a warm-up, with torch SDPA timed in the same process,
   plus the relative difference to SDPA's output at full size.

A variant that times out is reported as a hang; the later ping-pong variants (same turn protocol)
are then skipped so that one protocol bug cannot eat the whole time budget.

With ``--fp8`` the same for the 8-bit variants (``FP8_VARIANTS``, ``attention_fp8_gluon``; first
run 2026-12-06: all three correct against their emulation, figures in docs/performance.md), each in
its own subprocess with a time limit:

1. correctness against float32 math: DiT-like inputs (``bench_attention.make_qkv("dit", ...)``:
   L 1000 / 4097 / 8192 and 4 heads at the full 32,928 tokens with RoPE) must stay within 3e-2
   relative error ("ok"), Gaussian ones (both layouts) are reported (the tl 8-bit kernel gets
   5-7e-2 there). Also reported: the difference to ``emulate_fp8_kernel`` on the very same
   quantized buffers (the kernel's arithmetic in torch: a few 1e-3 at most when the kernel does
   what its comments say; much more points at the kernel rather than at 8-bit rounding) and the
   tl kernel's ``attention_fp8(..., FP8_FAST_CONFIG)`` error on the same inputs;
2. if every error is finite and below 0.1 (a broken kernel gives ~1): speed at 1 x 40 x 32,928 x
   128 and 1 x 40 x 75,600 x 128 against SDPA and the tl ``attention_fp8(..., FP8_FAST_CONFIG)``
   timed in the same process, bf16-equivalent TFLOP/s (4 B H L^2 D flops), the quantization
   pre-pass included (its time alone is reported too). The default run takes ~2 minutes.

    python3 benchmarks/bench_attention_gluon.py --fp8
    python3 benchmarks/bench_attention_gluon.py --fp8 --variants 0     # indices into FP8_VARIANTS

Prints a table and writes ``$OUT/attention_gluon.json`` (``attention_gluon_fp8.json`` with
``--fp8``; OUT defaults to ``benchmarks/results``).
Needs an H100 (sm_90), Triton 3.6 with Gluon; the default run list (every variant but the three
measured slow ones of ``NOT_BY_DEFAULT``) stops starting variants after 220 s. Run from the
repository root:

    python3 benchmarks/bench_attention_gluon.py
    python3 benchmarks/bench_attention_gluon.py --variants 1 2 3 4   # a subset (indices into VARIANTS)
    python3 benchmarks/bench_attention_gluon.py --all

Measured on 2026-12-06 (H100 80GB HBM3, Triton 3.6.0, torch 2.11): the table in
``talkgen/kernels/attention_gluon.py``'s docstring and docs/performance.md; the best,
ws-split-ppns-lr-m128-n128-s3-w4 (every hand-over of the consumer loop through named barriers, O's
rescale skipped while no row max moves by more than 8), 690 / 671 TFLOP/s at L 32,928 / 75,600 =
1.2x SDPA in its process (``ppns`` 634 / 615 in the same run, ``--variants 4 5 6 7``); 8-bit:
fp8-ppns-lr-kp-i8qk-m128-n128-s3-w4 805-809 / 815-821 (``--fp8 --variants 5 7 8``, two runs;
fp8-ppns-lr 781-782 / 789-791 in the same processes).

Compile-only numbers from the CPU machine (Triton 3.6.0 and 3.9.0, ptxas for sm_90a, bf16, D=128;
no spills in any variant; launch allocation 168 registers, the consumer partitions raise theirs
to 256 / 240 with setmaxnreg, the producer warp drops to 24):
ws-split-pp-m128-n128-s2-w4: 164,160 B shared; ws-split-pp-m128-n128-s3-w4: 229,744 B (limit
232,448); ws-split-pp-m128-n64-s4-w4: 164,208 B; ws-split-fa3-m128-n128-s2-w4: 164,128 B (the
FA3-loop variants store O straight from the wgmma layout, no 16 KB conversion scratch);
ws-split-m128-n128-s2-w4: 180,288 B; ws-split-m128-n64-s4-w4: 180,336 B; ws-m128-n128-s2-w8:
196,668 B, consumers 240 regs; inline-m128-n128-s2-w8: 163,912 B, 239 regs.
8-bit variants (same machines and Tritons, bf16 output): launch 168 registers, consumers 256 / 240
and producer 24 after setmaxnreg, no spills; shared memory fp8-pp-i8qk-m128-n128-s4-w4 and
fp8-pp-e4qk-m128-n128-s4-w4 147,840 B, fp8-pp-i8qk-m128-n128-s6-w4 213,424 B; PTX with
wgmma m64n128k32 .s32.s8.s8 (int8 Q K^T) / .f32.e4m3.e4m3 (e4m3 Q K^T, and P V in all).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import cuda_time, median, save  # noqa: E402

CORRECTNESS_CASES = [  # (B, H, L, DiT layout)
    (1, 2, 1000, False),
    (2, 2, 1000, True),
    (2, 2, 4097, False),
    (2, 2, 4097, True),
    (1, 2, 8192, True),
]
SPEED_LENGTHS = (32928, 75600)
HEADS, HEAD_DIM = 40, 128
TOLERANCE = 5e-3
VARIANT_TIMEOUT_S = 90  # a variant takes ~20-40 s (import, compile, checks, timing): longer means a hang
TOTAL_BUDGET_S = 220  # stop starting variants after this (the lead's budget is 4 minutes)
# Measured 2026-12-06 and clearly slower than ws-split-m128-n64-s4-w4: only with --all / --variants.
NOT_BY_DEFAULT = {"ws-split-m128-n128-s2-w4", "ws-m128-n128-s2-w8", "inline-m128-n128-s2-w8"}
FP8_TOLERANCE = 3e-2  # DiT-like inputs (the tl 8-bit kernel with e4m3 P V: 2.5-3e-2)
FP8_SANITY = 0.1  # any input: above this (or NaN) the kernel is broken, not just imprecise
FP8_DIT_CASES = [(1, 2, 1000), (2, 2, 4097), (1, 2, 8192), (1, 4, 32928)]  # (B, H, L); 32,928 gets RoPE
FP8_GAUSSIAN_CASES = [(2, 2, 1000, True), (1, 2, 4097, False)]  # (B, H, L, DiT layout)
FP8_TOTAL_BUDGET_S = 170  # 5 variants x ~27 s (measured 2026-12-06); stop starting variants after this


def gaussian_qkv(B: int, H: int, L: int, dit_layout: bool, seed: int = 0):
    """bf16 q, k, v [B, H, L, D]: views of [B, L, H, D] buffers (the DiT's layout) or contiguous."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    if dit_layout:
        x = torch.randn(3, B, L, H, HEAD_DIM, generator=g, device="cuda", dtype=torch.bfloat16)
        return tuple(x[i].transpose(1, 2) for i in range(3))
    x = torch.randn(3, B, H, L, HEAD_DIM, generator=g, device="cuda", dtype=torch.bfloat16)
    return x[0], x[1], x[2]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    qf, kf, vf = q.float(), k.float(), v.float()
    return torch.softmax((qf @ kf.transpose(-1, -2)) * q.shape[-1] ** -0.5, -1) @ vf


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.float()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def tflops(B: int, H: int, L: int, seconds: float) -> float:
    return 4 * B * H * L * L * HEAD_DIM / seconds / 1e12


def run_variant(index: int) -> dict:
    """Correctness then speed of VARIANTS[index]; returns one JSON-able record."""
    from talkgen.kernels import attention_gluon as ag

    cfg = ag.VARIANTS[index]
    record: dict = {"variant": cfg.name, "config": cfg.__dict__}
    torch.backends.cuda.matmul.allow_tf32 = False
    start = time.time()
    errors, sdpa_errors = {}, {}
    for B, H, L, dit in CORRECTNESS_CASES:
        q, k, v = gaussian_qkv(B, H, L, dit)
        ref = reference(q, k, v)
        out = ag.attention_bf16_gluon(q, k, v, cfg)
        torch.cuda.synchronize()
        label = f"B{B}H{H}L{L}{'-dit' if dit else ''}"
        errors[label] = rel_err(out, ref)
        sdpa_errors[label] = rel_err(F.scaled_dot_product_attention(q, k, v), ref)
        if label == "B1H2L1000":
            record["first_call_s"] = round(time.time() - start, 2)  # compilation + first launch
    record["rel_err"] = errors
    record["sdpa_rel_err"] = sdpa_errors
    record["correct"] = all(e <= TOLERANCE for e in errors.values())  # NaN compares False
    if not record["correct"]:
        return record
    for L in SPEED_LENGTHS:
        q, k, v = gaussian_qkv(1, HEADS, L, True)
        sdpa_s = median(cuda_time(lambda: F.scaled_dot_product_attention(q, k, v), warmup=1, reps=5))
        gluon_s = median(cuda_time(lambda: ag.attention_bf16_gluon(q, k, v, cfg), warmup=1, reps=5))
        diff = rel_err(ag.attention_bf16_gluon(q, k, v, cfg), F.scaled_dot_product_attention(q, k, v).float())
        record[f"L{L}"] = {"gluon_ms": gluon_s * 1e3, "sdpa_ms": sdpa_s * 1e3,
                           "gluon_tflops": tflops(1, HEADS, L, gluon_s), "sdpa_tflops": tflops(1, HEADS, L, sdpa_s),
                           "speedup": sdpa_s / gluon_s, "rel_diff_vs_sdpa": diff}
        del q, k, v
        torch.cuda.empty_cache()
    return record


def run_isolated(index: int, timeout: float, fp8: bool = False) -> dict:
    """``run_variant(index)`` (``run_fp8_variant`` with ``fp8``) in a child process: a hang or a
    fault is reported, not fatal."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-fp8" if fp8 else "--child", str(index)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"variant_index": index, "error": f"timed out after {timeout:.0f} s (hang?)"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (done.stdout + done.stderr)[-3000:]
    return {"variant_index": index, "error": f"exit code {done.returncode}", "log_tail": tail}


def run_fp8_variant(index: int) -> dict:
    """Correctness then speed of FP8_VARIANTS[index]; returns one JSON-able record."""
    from benchmarks.bench_attention import make_qkv
    from benchmarks.bench_attention import reference as chunked_reference
    from talkgen.kernels import attention_gluon as ag
    from talkgen.kernels import attention_triton as at

    cfg = ag.FP8_VARIANTS[index]
    record: dict = {"variant": cfg.name, "config": cfg.__dict__}
    torch.backends.cuda.matmul.allow_tf32 = False
    start = time.time()
    errors, emulation_diffs, tl_errors, gaussian_errors = {}, {}, {}, {}
    cases = [("dit", B, H, L, True) for B, H, L in FP8_DIT_CASES] + [("gaussian", *c) for c in FP8_GAUSSIAN_CASES]
    for kind, B, H, L, dit_layout in cases:
        if kind == "dit":
            q, k, v = make_qkv("dit", B, H, L)
        else:
            q, k, v = gaussian_qkv(B, H, L, dit_layout)
        ref = chunked_reference(q, k, v)
        out = ag.attention_fp8_gluon(q, k, v, cfg)
        torch.cuda.synchronize()
        label = f"{kind}-B{B}H{H}L{L}{'' if dit_layout else '-bhld'}"
        if not errors and not gaussian_errors:
            record["first_call_s"] = round(time.time() - start, 2)  # compilation + first launch
        (errors if kind == "dit" else gaussian_errors)[label] = rel_err(out, ref)
        tl_errors[label] = rel_err(at.attention_fp8(q, k, v, at.FP8_FAST_CONFIG), ref)
        if B * H * L <= 4 * 8192:  # the kernel's own arithmetic on the same quantized buffers
            qd = at.quantize_qkv(q, k, v, cfg.block_n, qk_int8=cfg.qk_int8, pv_fp8=True)
            emulated = ag.emulate_fp8_kernel(qd, tuple(q.shape), cfg.block_n, cfg.qk_int8, torch.float32)
            emulation_diffs[label] = rel_err(out, emulated)
        del q, k, v, ref, out
        torch.cuda.empty_cache()
    record.update(rel_err=errors, gaussian_rel_err=gaussian_errors, tl_fp8_fast_rel_err=tl_errors,
                  rel_diff_vs_emulation=emulation_diffs)
    record["correct"] = all(e <= FP8_TOLERANCE for e in errors.values())  # NaN compares False
    record["sane"] = all(e <= FP8_SANITY for e in [*errors.values(), *gaussian_errors.values()])
    if not record["sane"]:
        return record
    for L in SPEED_LENGTHS:
        q, k, v = gaussian_qkv(1, HEADS, L, True)
        sdpa_s = median(cuda_time(lambda: F.scaled_dot_product_attention(q, k, v), warmup=1, reps=5))
        tl_s = median(cuda_time(lambda: at.attention_fp8(q, k, v, at.FP8_FAST_CONFIG), warmup=1, reps=5))
        quant_s = median(cuda_time(lambda: at.quantize_qkv(q, k, v, cfg.block_n, qk_int8=cfg.qk_int8),
                                   warmup=1, reps=5))
        gluon_s = median(cuda_time(lambda: ag.attention_fp8_gluon(q, k, v, cfg), warmup=1, reps=5))
        diff = rel_err(ag.attention_fp8_gluon(q, k, v, cfg), F.scaled_dot_product_attention(q, k, v).float())
        record[f"L{L}"] = {"gluon_ms": gluon_s * 1e3, "quantize_ms": quant_s * 1e3, "sdpa_ms": sdpa_s * 1e3,
                           "tl_fp8_fast_ms": tl_s * 1e3, "gluon_tflops": tflops(1, HEADS, L, gluon_s),
                           "sdpa_tflops": tflops(1, HEADS, L, sdpa_s), "tl_fp8_fast_tflops": tflops(1, HEADS, L, tl_s),
                           "speedup": sdpa_s / gluon_s, "speedup_vs_tl_fp8_fast": tl_s / gluon_s,
                           "rel_diff_vs_sdpa": diff}
        del q, k, v
        torch.cuda.empty_cache()
    return record


def sweep(configs, indices: list[int], budget_s: float, fp8: bool) -> list[dict]:
    """Each variant of ``configs`` (by index) in its own subprocess, within ``budget_s`` overall.
    After a ping-pong variant hangs, the later ping-pong ones are skipped: they share its turn
    protocol (every 8-bit variant is ping-pong)."""
    began = time.time()
    records = []
    pingpong_hung = False
    for index in indices:
        config = configs[index]
        pingpong = getattr(config, "pingpong", True)
        left = budget_s - (time.time() - began)
        if left < 30:
            records.append({"variant": config.name, "error": "skipped: out of time budget"})
            continue
        if pingpong_hung and pingpong:
            records.append({"variant": config.name,
                            "error": "skipped: an earlier ping-pong variant hung (same turn protocol)"})
            continue
        print(f"{'fp8 ' if fp8 else ''}variant {index}: {config.name} ...", flush=True)
        record = run_isolated(index, min(VARIANT_TIMEOUT_S, left), fp8=fp8)
        record.setdefault("variant", config.name)
        if pingpong and "timed out" in record.get("error", ""):
            pingpong_hung = True
        records.append(record)
        print(json.dumps(record), flush=True)
    return records


def print_fp8_table(records: list[dict]) -> None:
    print(f"\n{'variant':<30} {'ok':<4} {'dit err':>8} {'gauss err':>9} {'vs emu':>8} {'tl err':>8} "
          + " ".join(f"{'L' + str(L) + ' TF/s (x SDPA, x tl-fp8)':>34}" for L in SPEED_LENGTHS))
    for rec in records:
        name = rec.get("variant", f"#{rec.get('variant_index')}")
        if "error" in rec:
            print(f"{name:<30} ERROR {rec['error']}")
            continue
        worst = max(rec["rel_err"].values())
        gauss = max(rec["gaussian_rel_err"].values())
        emu = max(rec["rel_diff_vs_emulation"].values())
        tl_err = max(rec["tl_fp8_fast_rel_err"].values())
        cells = []
        for L in SPEED_LENGTHS:
            cell = rec.get(f"L{L}")
            cells.append(f"{cell['gluon_tflops']:6.0f} ({cell['speedup']:.3f}, {cell['speedup_vs_tl_fp8_fast']:.3f})"
                         f" q{cell['quantize_ms']:.1f}ms" if cell else f"{'-':>34}")
        ok = "yes" if rec["correct"] else ("no" if rec["sane"] else "BAD")
        print(f"{name:<30} {ok:<4} {worst:8.2e} {gauss:9.2e} {emu:8.2e} {tl_err:8.2e} "
              + " ".join(f"{c:>34}" for c in cells))
    for rec in records:
        for L in SPEED_LENGTHS:
            cell = rec.get(f"L{L}")
            if cell:
                print(f"  baselines L{L}: SDPA {cell['sdpa_tflops']:.0f} TF/s, tl fp8-fast "
                      f"{cell['tl_fp8_fast_tflops']:.0f} TF/s ({rec['variant']}'s process)")


def main_fp8(indices: list[int] | None) -> None:
    import triton
    from talkgen.kernels import attention_gluon as ag

    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, "
          f"GLUON_AVAILABLE={ag.GLUON_AVAILABLE}, 8-bit variants", flush=True)
    indices = indices if indices else list(range(len(ag.FP8_VARIANTS)))
    began = time.time()
    records = sweep(ag.FP8_VARIANTS, indices, FP8_TOTAL_BUDGET_S, fp8=True)
    print_fp8_table(records)
    save("attention_gluon_fp8", {"triton": triton.__version__, "heads": HEADS, "head_dim": HEAD_DIM,
                                 "tolerance": FP8_TOLERANCE, "results": records,
                                 "total_s": round(time.time() - began, 1)})


def print_table(records: list[dict]) -> None:
    print(f"\n{'variant':<28} {'ok':<4} {'max err':>9} "
          + " ".join(f"{'L' + str(L) + ' TF/s (x SDPA)':>24}" for L in SPEED_LENGTHS))
    for rec in records:
        name = rec.get("variant", f"#{rec.get('variant_index')}")
        if "error" in rec:
            print(f"{name:<28} ERROR {rec['error']}")
            continue
        worst = max(rec["rel_err"].values())
        cells = []
        for L in SPEED_LENGTHS:
            cell = rec.get(f"L{L}")
            cells.append(f"{cell['gluon_tflops']:7.0f} ({cell['speedup']:.3f}, SDPA {cell['sdpa_tflops']:.0f})"
                         if cell else f"{'-':>24}")
        print(f"{name:<28} {'yes' if rec['correct'] else 'NO':<4} {worst:9.2e} " + " ".join(f"{c:>24}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", type=int, nargs="*",
                        help="indices into VARIANTS (default: all but the measured slow ones)")
    parser.add_argument("--all", action="store_true", help="every variant of VARIANTS")
    parser.add_argument("--fp8", action="store_true", help="the 8-bit variants (FP8_VARIANTS) instead")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-fp8", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    child = args.child if args.child is not None else args.child_fp8
    if child is not None:
        try:
            record = run_variant(child) if args.child is not None else run_fp8_variant(child)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which goes on
            import traceback

            record = {"variant_index": child, "error": f"{type(exc).__name__}: {exc}",
                      "log_tail": traceback.format_exc()[-3000:]}
        print("RESULT " + json.dumps(record), flush=True)
        return
    if args.fp8:
        main_fp8(args.variants)
        return

    import triton
    from talkgen.kernels import attention_gluon as ag

    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, "
          f"GLUON_AVAILABLE={ag.GLUON_AVAILABLE}", flush=True)
    if args.variants:
        indices = args.variants
    else:
        indices = [i for i, cfg in enumerate(ag.VARIANTS) if args.all or cfg.name not in NOT_BY_DEFAULT]
    began = time.time()
    records = sweep(ag.VARIANTS, indices, TOTAL_BUDGET_S, fp8=False)
    print_table(records)
    save("attention_gluon", {"triton": triton.__version__, "heads": HEADS, "head_dim": HEAD_DIM,
                             "tolerance": TOLERANCE, "results": records,
                             "total_s": round(time.time() - began, 1)})


if __name__ == "__main__":
    main()
