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

Prints a table and writes ``$OUT/attention_gluon.json`` (OUT defaults to ``benchmarks/results``).
Needs an H100 (sm_90), Triton 3.6 with Gluon; the default run list (5 variants) is meant to take
2-3 minutes and stops starting variants after 220 s. Run from the repository root:

    python3 benchmarks/bench_attention_gluon.py
    python3 benchmarks/bench_attention_gluon.py --variants 0 4     # a subset (indices into VARIANTS)
    python3 benchmarks/bench_attention_gluon.py --all

Measured on 2026-12-06 (H100 80GB HBM3, Triton 3.6.0, torch 2.11): the table in
``talkgen/kernels/attention_gluon.py``'s docstring and docs/performance.md; the best,
ws-split-pp-m128-n128-s3-w4, 616 / 595 TFLOP/s at L 32,928 / 75,600 = 1.05x SDPA.

Compile-only numbers from the CPU machine (Triton 3.6.0 and 3.9.0, ptxas for sm_90a, bf16, D=128;
no spills in any variant; launch allocation 168 registers, the consumer partitions raise theirs
to 256 / 240 with setmaxnreg, the producer warp drops to 24):
ws-split-pp-m128-n128-s2-w4: 164,160 B shared; ws-split-pp-m128-n128-s3-w4: 229,744 B (limit
232,448); ws-split-pp-m128-n64-s4-w4: 164,208 B; ws-split-fa3-m128-n128-s2-w4: 164,128 B (the
FA3-loop variants store O straight from the wgmma layout, no 16 KB conversion scratch);
ws-split-m128-n128-s2-w4: 180,288 B; ws-split-m128-n64-s4-w4: 180,336 B; ws-m128-n128-s2-w8:
196,668 B, consumers 240 regs; inline-m128-n128-s2-w8: 163,912 B, 239 regs.
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


def run_isolated(index: int, timeout: float) -> dict:
    """``run_variant(index)`` in a child process: a hang or a fault is reported, not fatal."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(index)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"variant_index": index, "error": f"timed out after {timeout:.0f} s (hang?)"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (done.stdout + done.stderr)[-3000:]
    return {"variant_index": index, "error": f"exit code {done.returncode}", "log_tail": tail}


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
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        try:
            record = run_variant(args.child)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which goes on
            import traceback

            record = {"variant_index": args.child, "error": f"{type(exc).__name__}: {exc}",
                      "log_tail": traceback.format_exc()[-3000:]}
        print("RESULT " + json.dumps(record), flush=True)
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
    records = []
    pingpong_hung = False
    for index in indices:
        left = TOTAL_BUDGET_S - (time.time() - began)
        if left < 30:
            records.append({"variant": ag.VARIANTS[index].name, "error": "skipped: out of time budget"})
            continue
        if pingpong_hung and ag.VARIANTS[index].pingpong:
            records.append({"variant": ag.VARIANTS[index].name,
                            "error": "skipped: an earlier ping-pong variant hung (same turn protocol)"})
            continue
        print(f"variant {index}: {ag.VARIANTS[index].name} ...", flush=True)
        record = run_isolated(index, min(VARIANT_TIMEOUT_S, left))
        record.setdefault("variant", ag.VARIANTS[index].name)
        if ag.VARIANTS[index].pingpong and "timed out" in record.get("error", ""):
            pingpong_hung = True
        records.append(record)
        print(json.dumps(record), flush=True)
    print_table(records)
    save("attention_gluon", {"triton": triton.__version__, "heads": HEADS, "head_dim": HEAD_DIM,
                             "tolerance": TOLERANCE, "results": records,
                             "total_s": round(time.time() - began, 1)})


if __name__ == "__main__":
    main()
