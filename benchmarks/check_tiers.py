"""Memory tiers at full size on one GPU: peak GPU memory and time per NFE (448x896, 81 frames =
32,928 tokens, bf16 or fp8, random weights, compiled blocks), one tier per process.

    python benchmarks/check_tiers.py --tier resident
    python benchmarks/check_tiers.py --tier stream-blocks --budget 12          # 12 GiB peak
    python benchmarks/check_tiers.py --tier resident --fp8
    python benchmarks/check_tiers.py --encoders      # umT5 / ViT-H / VAE moved in and out, VAE tiled vs not
    python benchmarks/check_tiers.py --summary       # the table of every result in $OUT, ratios to resident

The DiT is built on the GPU (random weights), then the tier is applied as the pipeline applies it
(talkgen.runtime.memory): blocks quantized to fp8, streamed blocks packed into pinned host memory.
Peaks are ``torch.cuda.max_memory_allocated`` over the timed NFEs (weights included), next to
what the tier's planner estimated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_dit import inputs  # noqa: E402
from benchmarks.common import cuda_time, median, out_dir, peak_rss_gib, random_dit, save  # noqa: E402

GiB = 2**30


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def wall(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def dit_tier(a) -> None:
    from talkgen.models.dit import DiTConfig
    from talkgen.runtime.compile import compile_blocks
    from talkgen.runtime.memory import MemoryManager, MemoryPlan, estimate_peak, estimate_sizes, prepare_dit, resident_blocks_for

    config = DiTConfig.tiny() if a.tiny else DiTConfig()
    config = dataclasses.replace(config, num_layers=a.layers)
    cuda = a.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    sizes = estimate_sizes(tiny=a.tiny, dtype=dtype, fp8=a.fp8, dit_config=config)
    resident = None
    if a.tier == "stream-blocks":
        resident = a.resident if a.resident is not None else resident_blocks_for(sizes, int(a.budget * GiB))
    plan = MemoryPlan(a.tier, fp8=a.fp8, resident_blocks=resident, slots=a.slots)
    started = time.perf_counter()
    model = random_dit(config, dtype, device=a.device)
    manager = MemoryManager(plan, a.device)
    prepare_dit(model, plan, manager)  # fp8 and streaming exactly as Pipeline.from_pretrained does
    sync(a.device)
    setup_s = time.perf_counter() - started
    streamer = manager.streamers.get("DiT")
    compile_blocks(model.blocks, backend="inductor" if cuda else "eager")
    if cuda:
        torch.cuda.empty_cache()
    cond = inputs(config, a.frames, a.height, a.width, 1, dtype, device=a.device)

    def nfe():
        with torch.no_grad():
            return model(**cond)

    started = time.perf_counter()
    nfe()  # compiles
    sync(a.device)
    first_s = time.perf_counter() - started
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        times = cuda_time(nfe, warmup=1, reps=a.reps)
    else:
        times = [wall(nfe) for _ in range(a.reps)]
    tokens = ((a.frames - 1) // 4 + 1) * (a.height // 16) * (a.width // 16)
    name = f"tier_{a.tier}{'_fp8' if a.fp8 else ''}{f'_{a.budget:g}g' if a.tier == 'stream-blocks' else ''}"
    attention_backend = os.environ.get("TALKGEN_ATTENTION", "")
    if attention_backend not in ("", "auto", "sdpa"):
        name += "_" + attention_backend.replace("-", "_")
    save(name, dict(
        tier=a.tier, fp8=a.fp8, attention=attention_backend or "sdpa", budget_gib=a.budget if a.tier == "stream-blocks" else None, layers=a.layers,
        tokens=tokens, size=[a.height, a.width], frames=a.frames, nfe_s=median(times), nfe_all=times,
        first_nfe_s=first_s, setup_s=setup_s,
        resident_blocks=None if streamer is None else len(streamer.resident),
        streamed_blocks=0 if streamer is None else len(streamer.streamed),
        block_gib=None if streamer is None else streamer.block_bytes / GiB,
        pinned_host_gib=0 if streamer is None else streamer.host_bytes / GiB,
        peak_gpu_gib=torch.cuda.max_memory_allocated() / GiB if cuda else None,
        peak_reserved_gib=torch.cuda.max_memory_reserved() / GiB if cuda else None,
        estimated_dit_peak_gib=(estimate_peak(sizes, "stream-blocks", resident, a.slots) if a.tier == "stream-blocks"
                                else sizes.dit + sizes.dit_workspace) / GiB,
        peak_rss_gib=peak_rss_gib(),
    ))


def encoders(a) -> None:
    """What the offload tiers add: moving umT5-XXL, ViT-H and the VAE in from pinned memory, and the
    VAE's activation peaks at 448x896x81, untiled and tiled."""
    import tempfile

    from transformers import AutoTokenizer

    from benchmarks.common import on_device
    from talkgen.models import image_encoder as ie
    from talkgen.models import text_encoder as te
    from talkgen.models.vae import VAEConfig, VideoVAE
    from talkgen.runtime.offload import CudaEngine, ModuleOffloader

    engine = CudaEngine("cuda")
    record: dict = {}
    text_config = te.TextEncoderConfig.umt5_xxl()
    tokenizer_dir = Path(tempfile.mkdtemp()) / "tok"
    te._write_tiny_tokenizer(tokenizer_dir)
    text = te.TextEncoder(on_device(lambda: te.build_model(text_config), torch.bfloat16),
                          AutoTokenizer.from_pretrained(str(tokenizer_dir)), text_config)
    prompts = ["a person is talking " * 20, "bad quality, blurry " * 30]
    resident_s = median(cuda_time(lambda: text.encode(prompts), warmup=1, reps=3))
    offloader = ModuleOffloader(text.model, engine, name="umT5")

    def offloaded():
        with offloader.on_device():
            text.encode(prompts)

    record.update(umt5_gib=offloader.nbytes / GiB, umt5_encode_resident_s=resident_s,
                  umt5_encode_offloaded_s=median(cuda_time(offloaded, warmup=1, reps=3)))
    torch.cuda.empty_cache()

    image_config = ie.ImageEncoderConfig.vit_h_14()
    clip_model = on_device(lambda: ie.build_model(image_config), torch.float16)
    ie.vision_tower(clip_model).embeddings.register_buffer(
        "position_ids", torch.arange(image_config.num_tokens, device="cuda").unsqueeze(0), persistent=False)
    image = ie.ImageEncoder(clip_model, image_config)
    frame = torch.rand(3, 1, 448, 896, device="cuda") * 2 - 1
    resident_s = median(cuda_time(lambda: image.encode(frame), warmup=1, reps=3))
    offloader = ModuleOffloader(clip_model, engine, name="ViT-H")

    def clip_offloaded():
        with offloader.on_device():
            image.encode(frame)

    record.update(clip_gib=offloader.nbytes / GiB, clip_encode_resident_s=resident_s,
                  clip_encode_offloaded_s=median(cuda_time(clip_offloaded, warmup=1, reps=3)))
    torch.cuda.empty_cache()

    vae_config = VAEConfig.wan21()
    vae = VideoVAE(on_device(vae_config.build, torch.float32), vae_config).to("cuda")
    latent = torch.randn(16, (a.frames - 1) // 4 + 1, a.height // 8, a.width // 8, device="cuda")
    video = torch.rand(3, a.frames, a.height, a.width, device="cuda") * 2 - 1
    base = torch.cuda.memory_allocated()
    for tiled in (False, True):
        vae.set_tiling(decode=tiled, encode=tiled)
        for what, fn in (("encode", lambda: vae.encode(video)), ("decode", lambda: vae.decode(latent))):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            seconds = median(cuda_time(fn, warmup=0, reps=1))
            key = f"vae_{what}_{'tiled' if tiled else 'untiled'}"
            record[f"{key}_s"] = seconds
            record[f"{key}_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / GiB  # above weights and inputs
    vae.set_tiling(False, False)
    with torch.no_grad():
        untiled = vae.decode(latent[:, :3])
        vae.set_tiling(decode=True)
        tiled = vae.decode(latent[:, :3])
    record["vae_tiled_vs_untiled_rel_err_random_weights"] = float((tiled - untiled).norm() / untiled.norm())
    offloader = ModuleOffloader(vae, engine, name="VAE")
    record["vae_gib"] = offloader.nbytes / GiB
    record["vae_onload_s"] = median(cuda_time(lambda: offloader.onload() or offloader.offload(), warmup=1, reps=3))
    save("tier_encoders", dict(record, size=[a.height, a.width], frames=a.frames, peak_rss_gib=peak_rss_gib()))


def summary() -> None:
    rows = [json.loads(path.read_text()) for path in sorted(out_dir().glob("tier_*.json"))]
    base = {r["fp8"]: r["nfe_s"] for r in rows
            if r.get("tier") == "resident" and "nfe_s" in r and r.get("attention", "sdpa") == "sdpa"}

    def num(value, spec=".2f", unit=""):
        return "-" if value is None else f"{value:{spec}}{unit}"

    def ratio(value, reference):
        return "-" if not reference else f"{value / reference:.3f}x"

    print("| tier | fp8 | resident blocks | per NFE | vs resident bf16 | vs resident, same dtype | peak GPU | estimated peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "nfe_s" not in r:
            continue
        name = r["tier"] + (f" @ {r['budget_gib']:g} GiB" if r.get("budget_gib") is not None else "")
        if r.get("attention", "sdpa") != "sdpa":
            name += f", attention {r['attention']}"
        blocks = r["resident_blocks"] if r.get("resident_blocks") is not None else r["layers"]
        print(f"| {name} | {r['fp8']} | {blocks} of {r['layers']} | {r['nfe_s']:.3f} s | {ratio(r['nfe_s'], base.get(False))} | "
              f"{ratio(r['nfe_s'], base.get(r['fp8']))} | {num(r.get('peak_gpu_gib'), '.1f', ' GiB')} | "
              f"{num(r.get('estimated_dit_peak_gib'), '.1f', ' GiB')} |")
    for r in rows:
        if r.get("umt5_gib") is not None:
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tier", default="resident", choices=["resident", "offload-encoders", "fp8", "stream-blocks"])
    ap.add_argument("--budget", type=float, default=12.0, help="GiB, for stream-blocks")
    ap.add_argument("--resident", type=int, default=None, help="resident blocks (overrides the budget)")
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=448)
    ap.add_argument("--width", type=int, default=896)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--encoders", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny config (a CPU dry run of the script)")
    ap.add_argument("--summary", action="store_true")
    a = ap.parse_args()
    if a.summary:
        return summary()
    if a.encoders:
        return encoders(a)
    if a.tier == "fp8":
        a.tier, a.fp8 = "resident", True
    if a.tier == "offload-encoders":
        a.tier = "resident"  # the DiT is resident in that tier; --encoders measures the rest
    dit_tier(a)


if __name__ == "__main__":
    main()
