"""Self-attention kernels on the GPU: torch SDPA vs talkgen's Triton kernels (bf16 and 8-bit).

The DiT's self-attention at the 480p and 720p buckets (81 frames: 32,928 and 75,600 tokens),
40 heads of 128, batch 1, inputs in the DiT's own layout ([B, L, H, D] buffers seen as
[B, H, L, D]). Rates count 4*B*H*L*L*D flops (bf16-equivalent work, also for the 8-bit kernel,
whose time includes its quantization pre-pass). Accuracy: relative Frobenius error against a
float32 reference (no TF32) on 4 heads at the full length, for three kinds of synthetic
activations (``make_qkv``). SDPA is measured in the same run. Run on the GPU machine:

    python benchmarks/bench_attention.py --repeat 2     # the table for docs/performance.md
    python benchmarks/bench_attention.py --sweep        # candidate tile configurations instead
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cuda_time, median  # noqa: E402
from talkgen.kernels import attention_triton as kernels  # noqa: E402
from talkgen.kernels.attention_triton import Config  # noqa: E402

GRIDS = {32928: (21, 28, 56), 75600: (21, 45, 80)}  # latent frames x patch rows x patch columns


def make_qkv(kind: str, B: int, H: int, L: int, D: int = 128, device: str = "cuda", seed: int = 0,
             dtype: torch.dtype = torch.bfloat16):
    """q, k, v as the DiT hands them to attention: [B, H, L, D] views of [B, L, H, D] buffers.

    ``gaussian``: N(0, 1). ``dit``: what RMS-normed, RoPE'd projections look like: per-channel
    gains (log-normal), a per-head mean over tokens (large for k: the common component that
    SageAttention's smoothing removes), 4 outlier channels per head (x2.5), 1% outlier tokens (x4),
    q scaled so logits have a std of about 2 (a few hundred keys carry most of a row, outlier tokens
    act as attention sinks), then Wan's 3-D RoPE on q and k when L is a known bucket. ``peaked``:
    ``dit`` with q pulled towards its own token's k (sharp, local attention: a few keys carry most
    of each row)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    if kind == "gaussian":
        x = randn(3, B, L, H, D)
    else:
        x = randn(3, B, L, H, D)
        gain = (0.3 * randn(3, 1, 1, H, D)).exp()
        outliers = torch.rand(3, 1, 1, H, D, generator=g, device=device).argsort(-1) < 4
        gain = torch.where(outliers, 2.5 * gain, gain)
        mean = randn(3, 1, 1, H, D) * torch.tensor([0.5, 2.0, 1.0], device=device).view(3, 1, 1, 1, 1)
        x = x * gain + mean
        rows = (torch.rand(1, B, L, 1, 1, generator=g, device=device) < 0.01).float() * 3 + 1
        x[:2] *= rows
        x[0] *= 0.6  # logits of std ~2 over the sequence (a few hundred keys carry most of a row)
        if kind == "peaked":
            x[0] = x[0] + 0.4 * x[1]
        if L in GRIDS:
            from talkgen.models.dit import _rope_3d_table, apply_rope_pairs

            cos, sin = (t[:, None] for t in _rope_3d_table(GRIDS[L], D, torch.device(device)))
            x[0] = apply_rope_pairs(x[0], cos, sin)
            x[1] = apply_rope_pairs(x[1], cos, sin)
    x = x.to(dtype)
    return tuple(x[i].transpose(1, 2) for i in range(3))


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v in float32 on the GPU (no TF32), a chunk of queries at a time."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        qf, kf, vf = q.float(), k.float(), v.float()
        out = torch.empty(qf.shape, device=q.device)
        for s in range(0, q.shape[2], chunk):
            scores = qf[:, :, s:s + chunk] @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
            out[:, :, s:s + chunk] = scores.softmax(-1) @ vf
        return out
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.float()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def cuda_median(fn, warmup: int = 1, reps: int = 5) -> float:
    return median(cuda_time(fn, warmup=warmup, reps=reps))


def tflops(B: int, H: int, L: int, D: int, seconds: float) -> float:
    return 4 * B * H * L * L * D / seconds / 1e12


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def variant(name: str, cfg: Config | None):
    """(label, callable) for one kernel configuration."""
    if name == "sdpa":
        return "sdpa", sdpa
    fn = kernels.attention_bf16 if name == "bf16" else kernels.attention_fp8
    label = (f"{name} m{cfg.block_m}n{cfg.block_n}s{cfg.split} w{cfg.num_warps} st{cfg.num_stages}"
             f"{' ws' if cfg.warp_specialize else ''}{'' if cfg.tma else ' ldst'}"
             f"{' lazy' if cfg.lazy_rescale else ''}")
    if name == "fp8":
        label += (f" {'i8' if cfg.qk_int8 else 'e4'}qk {'e4pv' if cfg.pv_fp8 else 'bf16pv'}"
                  f"{'' if cfg.two_level else ' 1lvl'}{' exp16' if cfg.exp16 else ''}{' tcsum' if cfg.tc_sum else ''}")
    return label, (lambda q, k, v: fn(q, k, v, cfg))


# Measured on an H100, Triton 3.6, 2026-11-22, 32,928 tokens (TFLOP/s; SDPA 573-575 in the same runs):
# round 1: bf16 m128n128 w8 st2 469, st3 576, m128n64 w4 st3 509, w8 st3 527, query sub-tiles m256n64s2 w8
#   479, m256n128s2 309, m128n128s2 w4 231, m128n64s2 w4 504, tl.load tiles 327, warp_specialize=True 469
#   (no effect on Hopper); 8-bit (int8 QK, e4m3 PV) m128n128 w8 st2 548, st3 603, m128n64 w4 406,
#   m256n64s2 330, m128n128s2 w4 664, m128n256 604, e4m3 QK 591 (2-3x the error), one-level 574.
# round 2: bf16 m128n128 w8 st3 554, m128n64 w4 st2 517 (lazy rescaling 417), m128n64s2 w4 st2 539,
#   m128n32 w4 st3 460, m128n128 w8 st3 lazy 502; 8-bit e4m3 PV m128n128s2 w4 st2 one-level 722,
#   m128n64s2 w4 st3 one-level 751 (fp16x2 exp2 685, + tensor-core row sums 640, + lazy 543),
#   int8 QK + bf16 PV m128n64s2 w4 st3 683, m128n128 w8 st3 592.
SWEEP = [
    ("fp8", Config(128, 64, 2, 4, 4, two_level=False)),
    ("fp8", Config(128, 32, 2, 4, 3, two_level=False)),
    ("fp8", Config(128, 64, 2, 4, 2, pv_fp8=False)),
    ("fp8", Config(128, 32, 2, 4, 3, pv_fp8=False)),
    ("bf16", Config(64, 64, 1, 4, 3)),
    ("bf16", Config(128, 64, 2, 4, 3)),
]
TABLE = [("sdpa", None), ("bf16", kernels.BF16_CONFIG), ("fp8", kernels.FP8_CONFIG), ("fp8", kernels.FP8_FAST_CONFIG)]
NAMES = {kernels.BF16_CONFIG: "triton", kernels.FP8_CONFIG: "triton-fp8", kernels.FP8_FAST_CONFIG: "triton-fp8-fast"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[32928, 75600])
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sweep", action="store_true", help="time the configurations in SWEEP instead")
    parser.add_argument("--top", type=int, default=3,
                        help="--sweep: configurations per kind timed at the longer lengths")
    parser.add_argument("--budget", type=float, default=1e9,
                        help="--sweep: stop starting new configurations after this many seconds")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per kernel (the median is kept)")
    parser.add_argument("--repeat", type=int, default=1, help="run the whole list this many times (the spread)")
    args = parser.parse_args()
    import triton

    out_dir = Path(os.environ.get("OUT", "benchmarks/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    log = open(out_dir / "bench_attention.jsonl", "a")
    t_start = time.time()
    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    B, H, D = args.batch, args.heads, 128
    date = time.strftime("%Y-%m-%d")

    def record(**row):
        row.update(date=date, device=device, torch=torch.__version__, triton=triton.__version__)
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(json.dumps(row), flush=True)

    candidates = [variant(n, c) for n, c in (SWEEP if args.sweep else TABLE[1:])]
    if not args.sweep:  # the table: backend names first (TALKGEN_ATTENTION values)
        candidates = [(f"{NAMES[c]}: {label}", fn) for (label, fn), (_, c) in zip(candidates, TABLE[1:])]
    rates: dict[str, float] = {}
    for li, L in enumerate([t for t in args.tokens for _ in range(args.repeat)]):
        # accuracy inputs: 4 heads at the full length, three kinds
        acc_sets = []
        for kind in ("gaussian", "dit", "peaked"):
            q, k, v = make_qkv(kind, 1, 4, L, D, seed=li)
            acc_sets.append((kind, (q, k, v), reference(q, k, v)))
        q, k, v = make_qkv("dit", B, H, L, D, seed=100 + li)

        def run(label, fn, reps):
            row = dict(tokens=L, heads=H, batch=B, kernel=label)
            try:
                for kind, inputs, ref in acc_sets:
                    row[f"err_{kind}"] = rel_err(fn(*inputs), ref)
                seconds = cuda_median(lambda: fn(q, k, v), reps=reps)
                row.update(ms=seconds * 1e3, tflops=tflops(B, H, L, D, seconds))
            except Exception as exc:  # a configuration the compiler rejects: note it, go on
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            record(**row)
            return row

        base = run("sdpa", sdpa, args.reps)
        todo = candidates
        if args.sweep and L != args.tokens[0]:  # the longer lengths: the fastest accurate few of each kind
            ranked = sorted((lbl for lbl in rates if lbl.split()[0] in ("bf16", "fp8")), key=lambda lbl: -rates[lbl])
            keep = [lbl for kind in ("bf16", "fp8") for lbl in [x for x in ranked if x.startswith(kind)][:args.top]]
            todo = [(lbl, fn) for lbl, fn in candidates if lbl in keep]
        for label, fn in todo:
            if args.sweep and L == args.tokens[0] and time.time() - t_start > args.budget:
                record(tokens=L, kernel=label, error="skipped: time budget")
                continue
            row = run(label, fn, args.reps)
            if "tflops" in row and L == args.tokens[0]:
                rates[label] = row["tflops"]
            if "tflops" in row:
                print(f"  -> {row['tflops'] / base['tflops']:.3f}x SDPA", flush=True)
        torch.cuda.empty_cache()
    print(f"done in {time.time() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
