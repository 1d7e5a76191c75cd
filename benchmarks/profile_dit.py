"""Where one DiT forward spends its time: torch.profiler over a compiled forward at full width
(reduced depth), plus the SDPA backends on the self-attention shape.

    python benchmarks/profile_dit.py --layers 4 --people 1
    python benchmarks/profile_dit.py --layers 4 --fp8 --skip-sdpa   # the fp8 GEMM path's kernels
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_dit import inputs  # noqa: E402
from benchmarks.common import cuda_time, median, random_dit  # noqa: E402
from talkgen.models.dit import DiTConfig  # noqa: E402
from talkgen.runtime.compile import compile_blocks  # noqa: E402


def sdpa_backends(tokens: int) -> None:
    q = torch.randn(1, 40, tokens, 128, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    flops = 4 * tokens * tokens * 5120
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                t = median(cuda_time(lambda: F.scaled_dot_product_attention(q, k, v), warmup=2, reps=5))
            print(f"sdpa {backend.name}: {t * 1e3:.1f} ms, {flops / t / 1e12:.0f} TFLOP/s", flush=True)
        except RuntimeError as exc:
            print(f"sdpa {backend.name}: unavailable ({str(exc)[:80]})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--people", type=int, default=1)
    ap.add_argument("--fp8", action="store_true", help="block linears in torchao dynamic fp8 (talkgen.runtime.fp8)")
    ap.add_argument("--skip-sdpa", action="store_true", help="skip the SDPA backend comparison")
    ap.add_argument("--cpu-ops", action="store_true",
                    help="also record the host-side ops (which aten op launched a kernel, e.g. a copy)")
    a = ap.parse_args()
    if not a.skip_sdpa:
        sdpa_backends(32928)
    config = DiTConfig(num_layers=a.layers)
    model = random_dit(config, torch.bfloat16)
    if a.fp8:
        from talkgen.runtime.fp8 import quantize_fp8

        for block in model.blocks:
            quantize_fp8(block)
    compile_blocks(model.blocks)
    cond = inputs(config, 81, 448, 896, a.people, torch.bfloat16)
    with torch.no_grad():
        for _ in range(2):
            model(**cond)
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CUDA]
        if a.cpu_ops:
            activities.append(torch.profiler.ProfilerActivity.CPU)
        with torch.profiler.profile(activities=activities, record_shapes=a.cpu_ops) as prof:
            model(**cond)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=110))
    if a.cpu_ops:  # the aten ops that launched copies, with their input shapes
        table = prof.key_averages(group_by_input_shape=True).table(sort_by="cuda_time_total", row_limit=80,
                                                                    max_name_column_width=60)
        print("\n".join(line for line in table.splitlines() if any(
            word in line for word in ("copy", "clone", "contiguous", "attention", "Name", "---"))))


if __name__ == "__main__":
    main()
