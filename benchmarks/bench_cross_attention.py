"""The DiT's cross-attentions at full size on one GPU: the I2V text + image attention and sum
(talkgen.kernels.cross_attention against SDPA twice and an add, compiled as in the block) and the
audio cross-attention's per-frame SDPA, with each SDPA backend. Checks the kernel against a
float32 computation (the torch path's error beside it). Run on the GPU machine:

    python benchmarks/bench_cross_attention.py [--frames 81 --height 448 --width 896]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cuda_time, median, save  # noqa: E402
from talkgen.kernels import cross_attention  # noqa: E402
from talkgen.models.dit import torch_text_image_attention  # noqa: E402

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def time_ms(fn) -> float:
    return median(cuda_time(fn, warmup=3, reps=20)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=448)
    ap.add_argument("--width", type=int, default=896)
    ap.add_argument("--people", type=int, default=1)
    a = ap.parse_args()
    heads, d, text_len, image_len = 40, 128, 512, 257
    t_lat = (a.frames - 1) // 4 + 1
    per_frame = (a.height // 16) * (a.width // 16)
    tokens = t_lat * per_frame
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    # [B, L, H, D] views of [B, L, C] projections, as the block makes them
    q = rnd(1, tokens, heads * d).unflatten(-1, (heads, d))
    k, v = (rnd(1, text_len, heads * d).unflatten(-1, (heads, d)) for _ in range(2))
    k_img, v_img = (rnd(1, image_len, heads * d).unflatten(-1, (heads, d)) for _ in range(2))
    args = (q, k, v, k_img, v_img)
    record: dict = dict(tokens=tokens, text_len=text_len, image_len=image_len, heads=heads, head_dim=d)

    exact = torch_text_image_attention(*(t.float() for t in args))
    compiled = torch.compile(torch_text_image_attention, dynamic=False)
    record["torch_compiled_ms"] = time_ms(lambda: compiled(*args))
    record["torch_rel_err"] = rel_err(compiled(*args), exact)
    for name, backend in BACKENDS.items():
        try:
            with sdpa_kernel(backend):
                record[f"torch_{name}_ms"] = time_ms(lambda: torch_text_image_attention(*args))
        except RuntimeError as exc:
            record[f"torch_{name}_ms"] = f"unavailable: {str(exc)[:60]}"
    kernel = {}
    for config in cross_attention.VARIANTS:
        name = f"m{config.block_m}-n{config.block_n}-w{config.num_warps}-s{config.num_stages}"
        try:
            out = cross_attention.launch(*args, config=config)
            kernel[name] = dict(ms=time_ms(lambda: cross_attention.launch(*args, config=config)),
                                rel_err=rel_err(out, exact))
        except Exception as exc:  # noqa: BLE001 - a configuration that does not compile is a result too
            kernel[name] = dict(error=f"{type(exc).__name__}: {str(exc)[:120]}")
        print(name, kernel[name], flush=True)
    record["kernel"] = kernel
    flops = 4 * tokens * (text_len + image_len) * heads * d
    best = min((r["ms"] for r in kernel.values() if "ms" in r), default=None)
    if best:
        record["kernel_best_tflops"] = flops / best / 1e9

    # the audio cross-attention: each latent frame's tokens against that frame's audio tokens
    audio_tokens = 32 * a.people
    qa = rnd(t_lat, per_frame, heads * d).unflatten(-1, (heads, d)).transpose(1, 2)
    ka, va = (rnd(t_lat, audio_tokens, heads * d).unflatten(-1, (heads, d)).transpose(1, 2) for _ in range(2))
    record["audio_sdpa_ms"] = time_ms(lambda: F.scaled_dot_product_attention(qa, ka, va))
    for name, backend in BACKENDS.items():
        try:
            with sdpa_kernel(backend):
                record[f"audio_{name}_ms"] = time_ms(lambda: F.scaled_dot_product_attention(qa, ka, va))
        except RuntimeError as exc:
            record[f"audio_{name}_ms"] = f"unavailable: {str(exc)[:60]}"
    save("cross_attention", record)


if __name__ == "__main__":
    main()
