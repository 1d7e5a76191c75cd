"""End-to-end clip time with every full-size component (random weights) on one GPU:
speech -> wav2vec2, prompt -> umT5, portrait -> ViT-H, VAE condition, sampling, VAE decode,
colour matching, mp4 mux. Run twice; the second run is reported (the first compiles).

    python benchmarks/bench_clip.py --steps 4 --text-scale 1 --audio-scale 2 --shift 2   # lightx2v setting

A stream instead of one clip, and the same stream with each chunk's mp4 encoded before the next
chunk starts (what talkgen did before ``BackgroundWriter``), to see what encoding beside the GPU
work buys:

    python benchmarks/bench_clip.py --steps 4 --fp8 --mode streaming --seconds 6
    python benchmarks/bench_clip.py --steps 4 --fp8 --mode streaming --seconds 6 --sync-writer
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import on_device, peak_rss_gib, random_dit, save  # noqa: E402


def build_pipeline(people: int, fp8: bool = False, memory: str | None = None, budget_gb: float | None = None):
    from transformers import AutoTokenizer, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from talkgen.models import image_encoder as ie
    from talkgen.models import text_encoder as te
    from talkgen.models.audio_encoder import AudioEncoder
    from talkgen.models.dit import DiTConfig
    from talkgen.models.vae import VAEConfig, VideoVAE
    from talkgen.pipeline.pipeline import Pipeline
    from talkgen.runtime.compile import compile_blocks

    dit = random_dit(DiTConfig.wan_i2v_14b(), torch.bfloat16)
    text_config = te.TextEncoderConfig.umt5_xxl()
    tokenizer_dir = Path(tempfile.mkdtemp()) / "tok"
    te._write_tiny_tokenizer(tokenizer_dir)  # token ids are all that matter for timing
    text = te.TextEncoder(on_device(lambda: te.build_model(text_config), torch.bfloat16),
                          AutoTokenizer.from_pretrained(str(tokenizer_dir)), text_config)
    image_config = ie.ImageEncoderConfig.vit_h_14()
    clip_model = on_device(lambda: ie.build_model(image_config), torch.float16)
    ie.vision_tower(clip_model).embeddings.register_buffer(  # non-persistent: to_empty left it undefined
        "position_ids", torch.arange(image_config.num_tokens, device="cuda").unsqueeze(0), persistent=False)
    image = ie.ImageEncoder(clip_model, image_config)
    vae_config = VAEConfig.wan21()
    vae = VideoVAE(on_device(vae_config.build, torch.float32), vae_config).to("cuda")
    audio = AudioEncoder(Wav2Vec2Model(Wav2Vec2Config()).eval(), Wav2Vec2FeatureExtractor(do_normalize=True))
    components = dict(dit=dit, vae=vae, text_encoder=text, image_encoder=image, audio_encoder=audio)
    manager = None
    if memory:  # a tier applied as Pipeline.from_pretrained applies it (fp8, pinned host copies, streaming)
        from talkgen.runtime.memory import apply_plan, estimate_sizes, free_device_memory, plan_memory

        torch.cuda.empty_cache()
        plan = plan_memory(memory, budget_gb, fp8=fp8, sizes=estimate_sizes(fp8=fp8),
                           free_bytes=free_device_memory(torch.device("cuda")))
        manager = apply_plan(components, plan, "cuda")
        torch.cuda.empty_cache()
        print("memory:", manager.describe() if hasattr(manager, "describe") else plan.describe(), flush=True)
    elif fp8:  # torchao dynamic fp8, per-row scales, on every block linear (talkgen.runtime.fp8)
        from talkgen.runtime.fp8 import quantize_fp8

        for block in dit.blocks:
            quantize_fp8(block)
    compile_blocks(dit.blocks)
    return Pipeline(**components, model="multitalk", device="cuda", memory=manager)


class SyncWriter:
    """``BackgroundWriter``'s interface, encoding in the caller's thread (``--sync-writer``)."""

    def __init__(self, writer, depth: int = 2):
        self.writer = writer

    @property
    def frames_written(self) -> int:
        return self.writer.frames_written

    def write(self, frames) -> None:
        self.writer.write(frames)

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.container.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--text-scale", type=float, default=1.0)
    ap.add_argument("--audio-scale", type=float, default=2.0)
    ap.add_argument("--shift", type=float, default=2.0)
    ap.add_argument("--seconds", type=float, default=3.3)
    ap.add_argument("--fp8", action="store_true", help="DiT block linears in fp8 (needs torchao, sm89+)")
    ap.add_argument("--memory", default=None, help="a memory tier (talkgen.runtime.memory), e.g. stream-blocks")
    ap.add_argument("--vram-budget", type=float, default=None, help="GiB, with --memory")
    ap.add_argument("--mode", choices=["clip", "streaming"], default="clip",
                    help="streaming: chunks of 81 frames (25 carried over) until the speech ends")
    ap.add_argument("--sync-writer", action="store_true",
                    help="encode each chunk's mp4 before the next chunk starts (no background writer)")
    a = ap.parse_args()
    if a.sync_writer:
        from talkgen.media import video

        video.BackgroundWriter = SyncWriter

    import soundfile as sf
    from PIL import Image

    from talkgen.media.samples import sample_portrait, sample_speech
    from talkgen.pipeline.request import GenerationRequest

    tmp = Path(tempfile.mkdtemp())
    Image.fromarray(sample_portrait((720, 1280))).save(tmp / "p.png")  # 16:9 -> the 448x896 bucket
    sf.write(tmp / "s.wav", sample_speech(a.seconds), 16_000)
    pipe = build_pipeline(1, fp8=a.fp8, memory=a.memory, budget_gb=a.vram_budget)
    request = GenerationRequest.parse(dict(cond_image=str(tmp / "p.png"), cond_audio={"person1": str(tmp / "s.wav")},
                                           sample_steps=a.steps, text_guide_scale=a.text_scale,
                                           audio_guide_scale=a.audio_scale, sample_shift=a.shift, mode=a.mode))
    stages: dict[str, float] = {}
    runs = []
    peaks: dict[str, float] = {}

    def measured(name: str, fn):
        """``fn`` recording its own peak GPU memory under ``name`` (a progress stage also spans part
        of a sampling step). Its stage begins right before the call: resetting there loses nothing."""
        def call(*args, **kwargs):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
            return out
        return call

    pipe.condition, pipe.decode = measured("vae_encode", pipe.condition), measured("vae_decode", pipe.decode)
    for run in range(2):
        torch.cuda.synchronize()
        last = [time.perf_counter(), "prepare"]
        stages.clear()
        peaks.clear()

        def progress(event) -> None:
            torch.cuda.synchronize()
            now = time.perf_counter()
            stages[last[1]] = stages.get(last[1], 0.0) + now - last[0]
            peaks[last[1]] = max(peaks.get(last[1], 0.0), torch.cuda.max_memory_allocated() / 2**30)
            torch.cuda.reset_peak_memory_stats()  # so each stage's own peak is seen (the max is the run's)
            last[0], last[1] = now, event.stage

        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = pipe.generate(request, output=tmp / "clip.mp4", progress=progress)
        torch.cuda.synchronize()
        stages[last[1]] = stages.get(last[1], 0.0) + time.perf_counter() - last[0]
        peaks[last[1]] = max(peaks.get(last[1], 0.0), torch.cuda.max_memory_allocated() / 2**30)
        runs.append(time.perf_counter() - start)
        print(f"run {run}: {runs[-1]:.2f} s, {result.num_frames} frames", {k: round(v, 2) for k, v in stages.items()},
              "peak GiB", {k: round(v, 1) for k, v in peaks.items()}, flush=True)
    tier = f"_{a.memory}" if a.memory else ""
    kind = "" if a.mode == "clip" else f"_stream{'_sync' if a.sync_writer else ''}"
    save(f"clip_{a.steps}steps_{'2' if a.text_scale == 1 else '3'}nfe{'_fp8' if a.fp8 else ''}{tier}{kind}", dict(fp8=a.fp8,
        memory=a.memory, vram_budget_gib=a.vram_budget, mode=a.mode, sync_writer=a.sync_writer, seconds=a.seconds,
        steps=a.steps, nfe_per_step=2 if a.text_scale == 1 else 3, frames=result.num_frames, size=[448, 896],
        tokens=32928, clip_s=runs[-1], first_run_s=runs[0], stages_s={k: round(v, 3) for k, v in stages.items()},
        peak_gpu_gib=max(peaks.values()), stage_peak_gpu_gib={k: round(v, 2) for k, v in peaks.items()}, peak_rss_gib=peak_rss_gib(), dtype="fp8" if a.fp8 else "bf16",
    ))


if __name__ == "__main__":
    main()
