"""Shared helpers for the GPU benchmarks: random full-size models built directly on the GPU,
CUDA-event timing, peak memory and host RSS. Imports only torch and talkgen's model code."""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch


def out_dir() -> Path:
    path = Path(os.environ.get("OUT", "benchmarks/results"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def save(name: str, record: dict) -> None:
    record = dict(record, date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                  device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    print(json.dumps(record), flush=True)
    (out_dir() / f"{name}.json").write_text(json.dumps(record, indent=1))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


@contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def random_dit(config, dtype: torch.dtype, device: str = "cuda", seed: int = 0):
    """The DiT with random weights allocated straight on the GPU in the run dtype (no host copy)."""
    from talkgen.models.dit import WanMultiTalkDiT

    with torch.device("meta"), default_dtype(dtype):
        model = WanMultiTalkDiT(config)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if WanMultiTalkDiT.keeps_float32(name):
                param.data = param.data.float()
            if name.endswith("modulation"):
                param.normal_(0, config.dim**-0.5, generator=generator)
            elif param.dim() == 1:
                param.fill_(1.0) if name.endswith("weight") else param.zero_()
            else:
                param.normal_(0, param[0].numel() ** -0.5 * 0.5, generator=generator)
    return model.eval()


def cuda_time(fn, warmup: int = 1, reps: int = 3) -> list[float]:
    """Seconds per call, timed with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill a module built with ``to_empty`` with random weights of a sane scale (timing only)."""
    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() >= 2:
                param.normal_(0, param[0].numel() ** -0.5 * 0.5, generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    return module


def on_device(build, dtype: torch.dtype, device: str = "cuda") -> torch.nn.Module:
    """``build()`` on the meta device, allocated on ``device`` in ``dtype``, randomized."""
    with torch.device("meta"), default_dtype(dtype):
        module = build()
    return randomize_(module.to_empty(device=device)).eval()
