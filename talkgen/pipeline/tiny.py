"""The tiny built-in model: the real architecture at toy widths, random weights from a fixed
seed, written on first use in the released file layout so the real loaders read it.

It exists to run every stage of the pipeline in seconds on a CPU (the demo and the tests). It
has never been trained: its videos are noise-like, not faces.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from talkgen.models.dit import DiTConfig, WanMultiTalkDiT
from talkgen.weights import manifest
from talkgen.weights.dit import is_audio_key

TINY_VERSION = 2  # bump when the tiny configs or the init change, so stale folders are rewritten
SEED = 20250707


def tiny_weights_ready(root: Path) -> bool:
    stamp = Path(root) / "talkgen-tiny.json"
    return stamp.is_file() and json.loads(stamp.read_text()).get("version") == TINY_VERSION


def ensure_tiny_weights(root: Path) -> Path:
    """Write the tiny model under ``root`` (once) and return ``root``."""
    root = Path(root)
    if tiny_weights_ready(root):
        return root
    from talkgen.models.audio_encoder import write_tiny_wav2vec2
    from talkgen.models.image_encoder import ImageEncoderConfig, write_tiny_image_encoder
    from talkgen.models.text_encoder import write_tiny_text_encoder
    from talkgen.models.vae import VAEConfig, write_tiny_vae

    base = root / manifest.BASE_DIR
    base.mkdir(parents=True, exist_ok=True)
    write_tiny_dit(base, root / manifest.MULTITALK_DIR / manifest.MULTITALK_FILE, DiTConfig.tiny())
    # The same adapter weights stand in for InfiniteTalk's single and multi files.
    for people in ("single", "multi"):
        target = root / manifest.INFINITETALK_DIR / people / manifest.INFINITETALK_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / manifest.MULTITALK_DIR / manifest.MULTITALK_FILE, target)
    write_tiny_text_encoder(base, seed=SEED + 1)
    write_tiny_image_encoder(base / manifest.CLIP_FILE, ImageEncoderConfig.tiny(), seed=SEED + 2)
    write_tiny_vae(base / manifest.VAE_FILE, VAEConfig.tiny(), seed=SEED + 3)
    write_tiny_wav2vec2(root / manifest.WAV2VEC2_DIR, seed=SEED + 4)
    (root / "talkgen-tiny.json").write_text(json.dumps({"version": TINY_VERSION, "note": "random weights, not a trained model"}))
    return root


def tiny_dit_state(config: DiTConfig, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random weights whose activations stay of order one through the blocks."""
    generator = torch.Generator().manual_seed(seed)
    model = WanMultiTalkDiT(config)
    state = {}
    for name, param in model.state_dict().items():
        if name.endswith("modulation"):
            value = torch.randn(param.shape, generator=generator) / config.dim**0.5
        elif param.dim() == 1:
            value = torch.ones(param.shape) if name.endswith("weight") else torch.zeros(param.shape)
        else:
            fan_in = param[0].numel()
            value = torch.randn(param.shape, generator=generator) * (0.5 / fan_in**0.5)
        state[name] = value.contiguous()
    return state


def write_tiny_dit(base_dir: Path, audio_file: Path, config: DiTConfig, shards: int = 2) -> None:
    """Base keys as ``diffusion_pytorch_model-0000k-of-0000n.safetensors`` + index + config.json
    (fp32, like the release); the 330-style audio keys in their own file."""
    state = tiny_dit_state(config, SEED)
    base_keys = sorted(k for k in state if not is_audio_key(k))
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = base_keys[i::shards]
        save_file({k: state[k] for k in part}, str(base_dir / name))
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": sum(state[k].numel() * 4 for k in base_keys)}, "weight_map": weight_map}
    (base_dir / manifest.DIT_INDEX).write_text(json.dumps(index, indent=1))
    (base_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    audio_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: state[k] for k in state if is_audio_key(k)}, str(audio_file))
