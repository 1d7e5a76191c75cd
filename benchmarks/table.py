"""The speed issue's table from one run's JSON results (``benchmarks/run_gpu_table.sh`` writes them
under $OUT): talkgen's figures with their ratios to the floor and the reference measured in the
same run, against the targets. Prints markdown; missing results show as "not run".

    python3 benchmarks/table.py [RESULTS_DIR]     # default: $OUT or benchmarks/results
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def seconds(value: float | None) -> str:
    return "not run" if value is None else f"{value:.2f} s"


def ratio(value: float | None, base: float | None) -> str:
    return "—" if value is None or not base else f"{value / base:.3f}x"


def verdict(ok: bool | None) -> str:
    return "not run" if ok is None else ("met" if ok else "missed")


def rows(folder: Path) -> list[list[str]]:
    floor, reference = load(folder, "floor"), load(folder, "reference_step_3p_1h")
    bf16, fp8 = load(folder, "dit_compiled_1p"), load(folder, "dit_compiled_1p_fp8")
    fp8_attention = load(folder, "dit_fp8attn_compiled_1p_fp8")  # opt-in: TALKGEN_ATTENTION=gluon-fp8 (run_gpu_table.sh)
    clip = load(folder, "clip_4steps_2nfe_fp8")
    small = load(folder, "clip_4steps_2nfe_stream-blocks")
    floor_step = floor and floor["step3_floor_s"]
    ref_step = reference and reference["step_s"]
    out = [["figure", "talkgen", "floor (same run)", "reference (same run)", "vs floor", "vs reference", "target", ""]]
    step = bf16 and bf16["step3_s"]
    out.append(["one 3-NFE step, bf16", seconds(step), seconds(floor_step), seconds(ref_step), ratio(step, floor_step),
                ratio(step, ref_step), "<= 1.05x floor", verdict(None if not (step and floor_step) else step <= 1.05 * floor_step)])
    unshared = bf16 and bf16.get("step3_unshared_s")
    if unshared:  # bench_dit --unshared: the step without talkgen.models.dit.SharedFirstBlock
        out.append(["the same, each pass computing the first block's self-attention", seconds(unshared),
                    seconds(floor_step), seconds(ref_step), ratio(unshared, floor_step), ratio(unshared, ref_step),
                    "(for comparison)", ""])
    step8 = fp8 and fp8["step3_s"]
    out.append(["one 3-NFE step, fp8 GEMMs", seconds(step8), seconds(floor_step), seconds(ref_step),
                ratio(step8, floor_step), ratio(step8, ref_step), "<= 5.5 s", verdict(None if step8 is None else step8 <= 5.5)])
    if fp8_attention:
        step8a = fp8_attention["step3_s"]
        out.append(["one 3-NFE step, fp8 GEMMs + 8-bit attention (opt-in)", seconds(step8a), seconds(floor_step),
                    seconds(ref_step), ratio(step8a, floor_step), ratio(step8a, ref_step), "<= 5.5 s",
                    verdict(step8a <= 5.5)])
    clip_s = clip and clip["clip_s"]
    out.append(["4-step clip (2 NFE/step), end to end, fp8", seconds(clip_s), "—", "—", "—", "—", "<= 15 s",
                verdict(None if clip_s is None else clip_s <= 15)])
    if small:
        sample_nfe = small["stages_s"]["sample"] / ((small["steps"] - 1) * small["nfe_per_step"])
        base = bf16 and bf16["nfe_s"]
        slowdown = None if not base else sample_nfe / base
        out.append(["smallest tier (stream-blocks, bf16): peak GPU / per-NFE slowdown",
                    f"{small['peak_gpu_gib']:.1f} GiB / {ratio(sample_nfe, base)}", "—", "—", "—", "—",
                    "<= 12 GB / <= 1.15x",
                    verdict(None if slowdown is None else small["peak_gpu_gib"] * 2**30 <= 12e9 and slowdown <= 1.15)])
    else:
        out.append(["smallest tier (stream-blocks, bf16): peak GPU / per-NFE slowdown", "not run", "—", "—", "—", "—",
                    "<= 12 GB / <= 1.15x", "not run"])
    return out


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "benchmarks/results"))
    table = rows(folder)
    print("| " + " | ".join(table[0]) + " |")
    print("|" + " --- |" * len(table[0]))
    for row in table[1:]:
        print("| " + " | ".join(row) + " |")
    for name in ("dit_compiled_1p", "dit_compiled_1p_fp8", "dit_fp8attn_compiled_1p_fp8", "clip_4steps_2nfe_fp8",
                 "clip_4steps_2nfe_stream-blocks"):
        record = load(folder, name)
        if record:
            print(f"{name}: peak GPU {record.get('peak_gpu_gib', 0):.1f} GiB, peak host RSS "
                  f"{record.get('peak_rss_gib', 0):.1f} GiB, {record.get('device', '?')}, {record.get('date', '?')}")


if __name__ == "__main__":
    main()
