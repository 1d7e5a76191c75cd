"""Time the full-size DiT (Wan2.1 I2V-14B + audio adapter) with random weights on one GPU.

Reports per-NFE time, the 3-NFE and 2-NFE step, peak GPU memory and host RSS, eager and with
the blocks compiled. Run on the GPU machine:

    python benchmarks/bench_dit.py --frames 81 --height 448 --width 896
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cuda_time, median, peak_rss_gib, random_dit, save  # noqa: E402
from talkgen.models import dit  # noqa: E402
from talkgen.models.attention import resolve_backend  # noqa: E402
from talkgen.models.dit import DiTConfig  # noqa: E402
from talkgen.runtime.compile import compile_blocks  # noqa: E402


def inputs(config: DiTConfig, frames: int, height: int, width: int, people: int, dtype, device="cuda"):
    g = torch.Generator(device=device).manual_seed(1)
    t_lat, h, w = (frames - 1) // 4 + 1, height // 8, width // 8
    rnd = lambda *shape: torch.randn(*shape, generator=g, device=device)  # noqa: E731
    masks = torch.zeros(3, h, w, device=device)
    masks[0, :, : w // 2] = 1
    masks[1, :, w // 2 :] = 1
    return dict(
        x=rnd(1, 16, t_lat, h, w), y=rnd(1, 20, t_lat, h, w), t=torch.tensor([999.0], device=device),
        context=[rnd(120, config.text_dim).to(dtype)], clip_fea=rnd(1, 257, config.image_dim).to(dtype),
        audio=rnd(1, people, frames, config.audio_window, config.audio_layers, config.audio_channels).to(dtype),
        ref_target_masks=masks if people == 2 else None,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=448)
    ap.add_argument("--width", type=int, default=896)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--people", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tag", default="")
    ap.add_argument("--fp8", action="store_true", help="block linears in torchao dynamic fp8 (talkgen.runtime.fp8)")
    ap.add_argument("--torchao-inductor", action="store_true",
                    help="torchao's recommended Inductor settings (coordinate-descent tuning, TF32 matmuls)")
    ap.add_argument("--gluon-variant", default=None,
                    help="with TALKGEN_ATTENTION=gluon: the kernel configuration by name (talkgen.kernels.attention_gluon.VARIANTS)")
    ap.add_argument("--torch-norms", action="store_true",
                    help="the block's residual adds + LayerNorms as torch ops (Inductor) instead of "
                         "talkgen.kernels.layer_norm: the A/B of that kernel")
    ap.add_argument("--unfused-gelu", action="store_true",
                    help="the FFN's bias + GELU as a kernel of its own (Inductor) instead of the GEMM's cuBLASLt "
                         "epilogue (talkgen.models.dit.FeedForward): the A/B of that epilogue")
    ap.add_argument("--unshared", action="store_true",
                    help="also time the steps with every pass computing the first block's self-attention itself")
    ap.add_argument("--no-batched", action="store_true",
                    help="skip the batched-guidance variants (each compiles its own batch shape)")
    a = ap.parse_args()

    dtype = torch.bfloat16
    if a.torch_norms:  # the block looks these up at call time, so the compiled forward traces the torch ops
        dit.add_and_norm, dit.modulated_norm = dit.torch_add_and_norm, dit.torch_modulated_norm
    if a.unfused_gelu:
        dit._gelu_epilogue_takes = lambda x, layer: False
    config = DiTConfig(num_layers=a.layers)
    model = random_dit(config, dtype)
    if a.gluon_variant:
        from talkgen.kernels import attention_gluon

        attention_gluon.DEFAULT_CONFIG = next(c for c in attention_gluon.VARIANTS if c.name == a.gluon_variant)
    if a.torchao_inductor:
        from torchao.quantization.utils import recommended_inductor_config_setter

        recommended_inductor_config_setter()
    if a.fp8:  # before compiling, as Pipeline does
        from talkgen.runtime.fp8 import quantize_fp8

        for block in model.blocks:
            quantize_fp8(block)
    if a.compile:
        compile_blocks(model.blocks)
    cond = inputs(config, a.frames, a.height, a.width, a.people, dtype)
    null_audio = torch.zeros_like(cond["audio"][:, -1:])

    def nfe(audio=None, shared=None):
        with torch.no_grad():
            return model(**dict(cond, audio=cond["audio"] if audio is None else audio,
                                ref_target_masks=cond["ref_target_masks"] if audio is None else None), shared=shared)

    def step(passes: int, share: bool = True):
        """One guidance step as the pipeline runs it: the passes one after the other, the first
        block's self-attention shared between them (talkgen.models.dit.SharedFirstBlock) unless
        ``share`` is False."""
        shared = dit.SharedFirstBlock() if share else None
        return [nfe(shared=shared) for _ in range(passes - 1)] + [nfe(null_audio, shared=shared)]

    def batched_step(passes: int):
        """All guidance passes of one step in one forward (one speaker: they share the audio shape)."""
        audio = torch.cat([cond["audio"]] * (passes - 1) + [null_audio])
        batch = dict(cond, x=cond["x"].expand(passes, -1, -1, -1, -1), y=cond["y"].expand(passes, -1, -1, -1, -1),
                     t=cond["t"].expand(passes), context=cond["context"] * passes,
                     clip_fea=cond["clip_fea"].expand(passes, -1, -1), audio=audio, ref_target_masks=None)
        with torch.no_grad():
            return model(**batch)

    torch.cuda.reset_peak_memory_stats()
    per_nfe = cuda_time(nfe, warmup=2 if a.compile else 1, reps=a.reps)
    step3 = cuda_time(lambda: step(3), warmup=0, reps=2)
    step2 = cuda_time(lambda: step(2), warmup=0, reps=2)
    unshared = {}
    if a.unshared:
        unshared["step3_unshared_s"] = median(cuda_time(lambda: step(3, share=False), warmup=0, reps=2))
        unshared["step2_unshared_s"] = median(cuda_time(lambda: step(2, share=False), warmup=0, reps=2))
    batched = {}
    if a.people == 1 and not a.no_batched:
        batched["step3_batched_s"] = median(cuda_time(lambda: batched_step(3), warmup=1, reps=2))
        batched["step2_batched_s"] = median(cuda_time(lambda: batched_step(2), warmup=1, reps=2))
    tokens = ((a.frames - 1) // 4 + 1) * (a.height // 16) * (a.width // 16)
    gemms = "fp8" if a.fp8 else "bf16"
    save(f"dit{a.tag}_{'compiled' if a.compile else 'eager'}_{a.people}p{'_fp8' if a.fp8 else ''}", dict(
        impl="talkgen", compiled=a.compile, dtype="bf16", gemms=gemms, torchao_inductor=a.torchao_inductor,
        gluon_variant=a.gluon_variant, fused_norms=not a.torch_norms, gelu_epilogue=not a.unfused_gelu,
        attention=resolve_backend("cuda"), attention_setting=os.environ.get("TALKGEN_ATTENTION", "auto"), layers=a.layers, people=a.people, tokens=tokens,
        frames=a.frames, size=[a.height, a.width], nfe_s=median(per_nfe), nfe_all=per_nfe,
        step3_s=median(step3), step2_s=median(step2), **unshared,
        peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30, peak_rss_gib=peak_rss_gib(),
        params=sum(p.numel() for p in model.parameters()), **batched,
    ))


if __name__ == "__main__":
    main()
