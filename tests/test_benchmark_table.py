"""benchmarks/table.py: the speed issue's table from a run's JSON results, ratios taken within
the run and each target judged from the figures (a wrong verdict would misreport a GPU run)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write(folder: Path, name: str, record: dict) -> None:
    (folder / f"{name}.json").write_text(json.dumps(record))


def table(folder: Path) -> str:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "table.py"), str(folder)],
                          check=True, capture_output=True, text=True).stdout


def test_ratios_and_verdicts(tmp_path):
    write(tmp_path, "floor", {"step3_floor_s": 8.0})
    write(tmp_path, "reference_step_3p_1h", {"step_s": 16.0})
    write(tmp_path, "dit_compiled_1p", {"step3_s": 8.2, "nfe_s": 3.0, "peak_gpu_gib": 38, "peak_rss_gib": 2})
    write(tmp_path, "dit_compiled_1p_fp8", {"step3_s": 6.0, "nfe_s": 2.0})
    write(tmp_path, "dit_fp8attn_compiled_1p_fp8", {"step3_s": 5.4, "nfe_s": 1.8})
    write(tmp_path, "clip_4steps_2nfe_fp8", {"clip_s": 14.0})
    write(tmp_path, "clip_4steps_2nfe_stream-blocks", {"stages_s": {"sample": 6 * 3.6}, "steps": 4, "nfe_per_step": 2,
                                                        "peak_gpu_gib": 11.0})
    lines = {line.split(" | ")[0].strip("| "): line for line in table(tmp_path).splitlines()}
    bf16 = lines["one 3-NFE step, bf16"]
    assert "1.025x" in bf16 and "0.512x" in bf16 and bf16.endswith("| met |")  # 8.2/8.0 and 8.2/16.0
    assert lines["one 3-NFE step, fp8 GEMMs"].endswith("| missed |")  # 6.0 s > 5.5 s
    assert lines["one 3-NFE step, fp8 GEMMs + 8-bit attention (opt-in)"].endswith("| met |")  # 5.4 s
    assert lines["4-step clip (2 NFE/step), end to end, fp8"].endswith("| met |")
    small = lines["smallest tier (stream-blocks, bf16): peak GPU / per-NFE slowdown"]
    assert "11.0 GiB / 1.200x" in small and small.endswith("| missed |")  # 11.0 GiB fits 12 GB, 1.2x is too slow


def test_missing_results_say_not_run(tmp_path):
    out = table(tmp_path)
    assert out.count("not run") >= 4 and "met" not in out
    assert "8-bit attention" not in out  # the opt-in row appears only when it was run
