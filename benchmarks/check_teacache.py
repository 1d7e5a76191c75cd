"""TeaCache NFE count: 40 steps, shift 7, 3-pass guidance (text 5, audio 4), threshold 0.2, 480p
coefficients, at full size (448x896x81 = 32,928 tokens, full width).

What decides a skip (talkgen/sampling/teacache.py, as the reference): the relative L1 change of
``e0``, the time-projection output, between the steps a pass computed. ``e0`` depends on the
timestep and the time-embedding weights only, never on the blocks, the latent or the prompt. So
the count is exact for given time-embedding weights whatever the depth, and the sampler here runs
the real loop (Pipeline.sample_chunk, block runner, cached residuals) on a full-width DiT of
``--layers`` blocks (default 1) to show the skips happen in the model forward as counted.

The released time-embedding weights are not reachable here: with random ones the count says how
the schedule and the polynomial behave, not what the trained model does (the reference reports
about half the steps computed). ``--decisions-only`` evaluates just ``e0`` and the decisions for
two random initialisations (runs on a CPU in seconds).

    python benchmarks/check_teacache.py --layers 1
    python benchmarks/check_teacache.py --decisions-only --device cpu
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save  # noqa: E402

PASSES = ("cond", "drop_text", "uncond")


def decisions(model, steps: int, shift: float, thresh: float) -> dict:
    from talkgen.sampling.schedule import shifted_timesteps
    from talkgen.sampling.teacache import TeaCache

    from talkgen.sampling.teacache import relative_l1

    cache = TeaCache(steps, thresh, tier=480)
    timesteps = shifted_timesteps(steps, shift)
    rel, previous = [], None
    with torch.no_grad():
        for step in range(steps):
            _, e0 = model.embed_time(timesteps[step : step + 1].to(model.device))
            if previous is not None:
                rel.append(round(relative_l1(e0, previous), 4))  # step-to-step change of the signal
            previous = e0
            for name in PASSES:
                cache.decide(name, step, e0)
    total = steps * len(PASSES)
    computed = total - cache.skipped
    return dict(computed=computed, total=total, fraction=computed / total,
                computed_steps=[s for s in range(steps) if cache.computed[s]["cond"]], rel_l1_per_step=rel)


def decisions_only(a) -> None:
    from talkgen.models.dit import DiTConfig, WanMultiTalkDiT

    config = DiTConfig(num_layers=0)
    record = dict(steps=a.steps, shift=a.shift, thresh=a.thresh, passes=3)
    for init in ("pytorch_default", "benchmark_random"):
        torch.manual_seed(0)
        with torch.device(a.device):
            model = WanMultiTalkDiT(config).eval()  # PyTorch's default (Kaiming-uniform) init
        if init == "benchmark_random":
            from benchmarks.common import random_dit

            model = random_dit(config, torch.float32, device=a.device, seed=0)
        record[init] = decisions(model, a.steps, a.shift, a.thresh)
    save("teacache_decisions", record)


def full(a) -> None:
    from benchmarks.bench_dit import inputs
    from benchmarks.common import random_dit
    from talkgen.models.dit import DiTConfig
    from talkgen.pipeline.pipeline import Conditioning, Pipeline
    from talkgen.sampling.guidance import GuidanceConfig
    from talkgen.sampling.teacache import TeaCache

    config = DiTConfig(num_layers=a.layers)
    model = random_dit(config, torch.bfloat16, device=a.device)
    runs = [0]
    model.blocks[0].register_forward_pre_hook(lambda *_: runs.__setitem__(0, runs[0] + 1))
    raw = inputs(config, a.frames, a.height, a.width, 1, torch.bfloat16, device=a.device)
    cond = Conditioning(y=raw["y"][0], clip_tokens=raw["clip_fea"], context=raw["context"][0],
                        context_null=raw["context"][0][:20], audio=raw["audio"][0], person_masks=None)
    pipe = Pipeline(model, None, device=a.device)
    cache = TeaCache(a.steps, a.thresh, tier=480)
    started = time.perf_counter()
    pipe.sample_chunk(raw["x"][0], cond, steps=a.steps, shift=a.shift, guidance=GuidanceConfig(5.0, 4.0), teacache=cache)
    if a.device == "cuda":
        torch.cuda.synchronize()
    total = a.steps * len(PASSES)
    computed = total - cache.skipped
    record = dict(steps=a.steps, shift=a.shift, thresh=a.thresh, passes=3, layers=a.layers,
                  tokens=((a.frames - 1) // 4 + 1) * (a.height // 16) * (a.width // 16),
                  computed=computed, total=total, fraction=computed / total, block_runs=runs[0],
                  computed_steps=[s for s in range(a.steps) if cache.computed[s]["cond"]],
                  seconds=time.perf_counter() - started, target="<= 55% of NFEs computed",
                  note="random time-embedding weights: the trained model's count needs the released weights")
    record["decisions_only"] = decisions(model, a.steps, a.shift, a.thresh)
    save("teacache_full", record)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--shift", type=float, default=7.0)
    ap.add_argument("--thresh", type=float, default=0.2)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=448)
    ap.add_argument("--width", type=int, default=896)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--decisions-only", action="store_true")
    a = ap.parse_args()
    decisions_only(a) if a.decisions_only else full(a)


if __name__ == "__main__":
    main()
