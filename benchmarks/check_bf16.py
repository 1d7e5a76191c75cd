"""bf16 against float32 on the same random weights: full width, reduced depth (so float32 fits).

    python benchmarks/check_bf16.py --layers 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_dit import inputs  # noqa: E402
from benchmarks.common import random_dit, save  # noqa: E402
from talkgen.models.dit import DiTConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=448)
    ap.add_argument("--width", type=int, default=896)
    a = ap.parse_args()
    config = DiTConfig(num_layers=a.layers)
    record = dict(layers=a.layers, frames=a.frames, size=[a.height, a.width])
    for people in (1, 2):
        ref = random_dit(config, torch.float32, seed=7)
        cond = inputs(config, a.frames, a.height, a.width, people, torch.float32)
        with torch.no_grad():
            out32 = ref(**cond)
        state = ref.state_dict()
        del ref
        torch.cuda.empty_cache()
        model = random_dit(config, torch.bfloat16, seed=7)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(state[name])
        del state
        cond16 = {k: ([u.to(torch.bfloat16) for u in v] if k == "context" else v) for k, v in cond.items()}
        for key in ("clip_fea", "audio"):
            cond16[key] = cond[key].to(torch.bfloat16)
        with torch.no_grad():
            out16 = model(**cond16)
        del model
        torch.cuda.empty_cache()
        err = float((out16.double() - out32.double()).norm() / out32.double().norm())
        record[f"rel_err_{people}p"] = err
    save("bf16_vs_fp32", record)


if __name__ == "__main__":
    main()
