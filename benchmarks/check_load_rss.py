"""Peak host RSS while loading the DiT from files laid out as the release (base shards + index +
config.json, the audio adapter in its own file), against the model's bytes in the run dtype.

The released DiT is 7 float32 shards, 65 GB; this writes a full-width model of ``--layers`` blocks
(every tensor at its real shape, so the largest read is the real 283 MB) in float32 like the
release, to fit the GPU machine's disk, and loads it in bf16 in a fresh process, sampling RSS:

    python benchmarks/check_load_rss.py --write /tmp/rss --layers 4
    python benchmarks/check_load_rss.py --load /tmp/rss --device cpu    # what stream-blocks does
    python benchmarks/check_load_rss.py --load /tmp/rss --device cuda   # resident tiers

Target: peak RSS growth <= 1.1x the model's bf16 bytes when loading to the CPU, and about one
tensor when loading to the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save  # noqa: E402

GiB = 2**30


def write(root: Path, layers: int, dtype: torch.dtype, shards: int) -> None:
    from safetensors.torch import save_file

    from talkgen.models.dit import DiTConfig, WanMultiTalkDiT
    from talkgen.weights import manifest
    from talkgen.weights.dit import is_audio_key

    config = DiTConfig(num_layers=layers)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanMultiTalkDiT(config).state_dict().items()}
    base = root / manifest.BASE_DIR
    base.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)

    def tensor(shape):
        return (torch.randn(shape, generator=generator, device=device) * 0.02).to(dtype).cpu()

    base_keys = sorted(k for k in shapes if not is_audio_key(k))
    weight_map, started = {}, time.perf_counter()
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = base_keys[i::shards]
        save_file({k: tensor(shapes[k]) for k in part}, str(base / name))
        weight_map.update({k: name for k in part})
    (base / manifest.DIT_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (base / "config.json").write_text(json.dumps(config.to_dict()))
    audio = root / manifest.MULTITALK_DIR / manifest.MULTITALK_FILE
    audio.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: tensor(shapes[k]) for k in shapes if is_audio_key(k)}, str(audio))
    size = sum(p.stat().st_size for p in root.rglob("*.safetensors"))
    print(f"wrote {size / GiB:.2f} GiB ({dtype}) in {time.perf_counter() - started:.1f} s to {root}", flush=True)


def status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def load(root: Path, device: str) -> None:
    from talkgen.weights import manifest
    from talkgen.weights.dit import load_dit

    if device == "cuda":
        torch.cuda.init()
        torch.empty(1, device="cuda")  # the CUDA context's host memory is not the loader's
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    before = {k: status(k) for k in ("VmRSS", "RssAnon", "RssFile")}
    peaks = dict(before)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for k in peaks:
                peaks[k] = max(peaks[k], status(k))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    model, _ = load_dit(root / manifest.BASE_DIR, root / manifest.MULTITALK_DIR / manifest.MULTITALK_FILE,
                        dtype=torch.bfloat16, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    peak_hwm = status("VmHWM")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    file_bytes = sum(p.stat().st_size for p in root.rglob("*.safetensors"))
    growth = max(peak_hwm, peaks["VmRSS"]) - before["VmRSS"]
    record = dict(
        device=device, layers=model.config.num_layers, model_gib=model_bytes / GiB, files_gib=file_bytes / GiB,
        load_s=seconds, read_gb_per_s=file_bytes / seconds / 1e9, rss_before_gib=before["VmRSS"] / GiB,
        rss_peak_gib=max(peak_hwm, peaks["VmRSS"]) / GiB, rss_growth_gib=growth / GiB,
        rss_anon_growth_gib=(peaks["RssAnon"] - before["RssAnon"]) / GiB,
        rss_file_growth_gib=(peaks["RssFile"] - before["RssFile"]) / GiB,
        growth_over_model=growth / model_bytes,
        target="<= 1.1x the model's bf16 bytes (cpu); about one tensor (cuda)",
        # 40-block estimate: the model grows, the largest tensor in hand stays 283 MB
        full_size_estimate_over_model=(growth - model_bytes) / (18_882_046_784 * 2) + 1 if device == "cpu" else None,
    )
    save(f"load_rss_{device}", record)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", type=Path)
    ap.add_argument("--load", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args()
    if a.write:
        write(a.write, a.layers, getattr(torch, a.dtype), a.shards)
    if a.load:
        load(a.load, a.device)


if __name__ == "__main__":
    main()
