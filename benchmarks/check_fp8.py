"""Quality guard for the fp8 blocks: the DiT output with the block linears in torchao's dynamic fp8
(per-row scales), eager and compiled, against the same random weights in bf16 (eager). Full width,
reduced depth, 448x896x81 (32,928 tokens), one and two speakers. Exits 1 when the compiled fp8
output's relative L2 error exceeds --max-rel-err (3e-2).

    python benchmarks/check_fp8.py --layers 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_dit import inputs  # noqa: E402
from benchmarks.common import cuda_time, median, random_dit, save  # noqa: E402


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=448)
    ap.add_argument("--width", type=int, default=896)
    ap.add_argument("--max-rel-err", type=float, default=3e-2)
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()

    from talkgen.models.dit import DiTConfig
    from talkgen.runtime.compile import compile_blocks
    from talkgen.runtime.fp8 import fp8_unsupported_reason, quantize_fp8

    reason = fp8_unsupported_reason(torch.device("cuda"))
    if reason:
        save("fp8_check", dict(skipped=reason))
        sys.exit(f"fp8 cannot run here: {reason}")
    config = DiTConfig(num_layers=a.layers)
    model = random_dit(config, torch.bfloat16, seed=7)
    conds = {people: inputs(config, a.frames, a.height, a.width, people, torch.bfloat16) for people in (1, 2)}
    with torch.no_grad():
        reference = {people: model(**cond) for people, cond in conds.items()}
    with torch.no_grad():
        bf16_s = median(cuda_time(lambda: model(**conds[1]), warmup=0, reps=2)) / a.layers
    for block in model.blocks:
        quantize_fp8(block)
    record = dict(layers=a.layers, tokens=((a.frames - 1) // 4 + 1) * (a.height // 16) * (a.width // 16),
                  granularity="per-row", bf16_eager_s_per_block=bf16_s)
    with torch.no_grad():
        for people, cond in conds.items():
            record[f"rel_err_eager_{people}p"] = rel_err(model(**cond), reference[people])
        if not a.no_compile:
            compile_blocks(model.blocks)
            started = time.perf_counter()
            out = model(**conds[1])
            torch.cuda.synchronize()
            record["compile_s"] = time.perf_counter() - started
            record["rel_err_compiled_1p"] = rel_err(out, reference[1])  # (two speakers: eager above, one compile here)
            record["fp8_compiled_s_per_block"] = median(cuda_time(lambda: model(**conds[1]), warmup=1, reps=3)) / a.layers
    worst = max(v for k, v in record.items() if k.startswith("rel_err_compiled" if not a.no_compile else "rel_err_eager"))
    record.update(max_rel_err=a.max_rel_err, worst_rel_err=worst, passed=worst <= a.max_rel_err,
                  peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30)
    save("fp8_check", record)
    print(f"fp8 vs bf16: worst rel err {worst:.3e} (limit {a.max_rel_err:.0e}): {'PASS' if worst <= a.max_rel_err else 'FAIL'}")
    sys.exit(0 if worst <= a.max_rel_err else 1)


if __name__ == "__main__":
    main()
