"""Find and load every component of a weights directory.

Layout (the reference README's, unchanged)::

    DIR/Wan2.1-I2V-14B-480P/            7 DiT shards + index + config.json, umT5 .pth + google/umt5-xxl/,
                                        CLIP .pth, Wan2.1_VAE.pth
    DIR/chinese-wav2vec2-base/          config.json, model.safetensors (or pytorch_model.bin)
    DIR/MeiGen-MultiTalk/multitalk.safetensors                    (model="multitalk")
    DIR/InfiniteTalk/{single,multi}/infinitetalk.safetensors      (model="infinitetalk")

Nothing is written into these folders. ``model="tiny"`` first writes the tiny model there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from talkgen.errors import InputError, WeightsError
from talkgen.pipeline.progress import ProgressCallback, ProgressEvent, no_progress
from talkgen.weights import manifest
from talkgen.weights.dit import load_dit
from talkgen.weights.loading import WeightSet

MODELS = ("multitalk", "infinitetalk", "tiny")


def is_tiny(weights_dir: Path) -> bool:
    """A folder of the built-in tiny model (its encoders have the tiny configs)."""
    return (Path(weights_dir) / "talkgen-tiny.json").is_file()


def audio_weights_path(weights_dir: Path, model: str, people: str = "single") -> tuple[Path, WeightSet]:
    if model in ("multitalk", "tiny"):
        return weights_dir / manifest.MULTITALK_DIR / manifest.MULTITALK_FILE, manifest.MULTITALK
    if people not in ("single", "multi"):
        raise InputError(f"people = {people!r}: choose 'single' or 'multi' InfiniteTalk weights.")
    weight_set = manifest.INFINITETALK_MULTI if people == "multi" else manifest.INFINITETALK_SINGLE
    return weights_dir / manifest.INFINITETALK_DIR / people / manifest.INFINITETALK_FILE, weight_set


def required_files(weights_dir: Path, model: str, people: str = "single") -> list[tuple[Path, WeightSet]]:
    base = weights_dir / manifest.BASE_DIR
    audio, audio_set = audio_weights_path(weights_dir, model, people)
    return [
        (base / "config.json", manifest.WAN_I2V_480P),
        (base / manifest.T5_FILE, manifest.WAN_I2V_480P),
        (base / manifest.T5_TOKENIZER_DIR, manifest.WAN_I2V_480P),
        (base / manifest.CLIP_FILE, manifest.WAN_I2V_480P),
        (base / manifest.VAE_FILE, manifest.WAN_I2V_480P),
        (weights_dir / manifest.WAV2VEC2_DIR / "config.json", manifest.WAV2VEC2),
        (audio, audio_set),
    ]


def _download_command(weights_dir: Path, model: str, people: str, weight_set: WeightSet | None = None) -> str:
    """The exact command for this model and directory, from the weights manifest."""
    if model in manifest.MODELS:
        return manifest.download_command(weights_dir, model, people)
    return (weight_set or manifest.WAN_I2V_480P).download_command.replace("DIR", str(weights_dir))


def check_weights(weights_dir: Path, model: str, people: str = "single", *, audio_adapter: bool = True) -> None:
    """Fail early, in one sentence, on the first missing file (before minutes of loading).
    ``audio_adapter=False``: a quantized DiT file holds the adapter, its own file is not needed."""
    if not weights_dir.is_dir():
        raise WeightsError(
            f"Weights directory {weights_dir} does not exist; get the weights with "
            f"`{_download_command(weights_dir, model, people)}` (or run `talkgen demo` for the tiny model)."
        )
    adapter_file, _ = audio_weights_path(weights_dir, model, people)
    for path, weight_set in required_files(weights_dir, model, people):
        if not audio_adapter and path == adapter_file:
            continue
        if not path.exists():
            command = _download_command(weights_dir, model, people, weight_set)
            raise WeightsError(f"{path} is missing: it belongs to {weight_set.name} ({weight_set.repo_id}); get it with `{command}`.")


def load_components(
    weights_dir: Path,
    model: str,
    *,
    people: str = "single",
    device: torch.device,
    dtype: torch.dtype,
    quant_file: Path | None = None,
    progress: ProgressCallback = no_progress,
) -> dict:
    from talkgen.models.audio_encoder import AudioEncoder
    from talkgen.models.image_encoder import ImageEncoder, ImageEncoderConfig
    from talkgen.models.text_encoder import TextEncoder, TextEncoderConfig
    from talkgen.models.vae import VAEConfig, VideoVAE

    if model not in MODELS:
        raise InputError(f"model = {model!r}: choose one of {', '.join(MODELS)}.")
    if model == "tiny":
        from talkgen.pipeline.tiny import ensure_tiny_weights

        ensure_tiny_weights(weights_dir)
    check_weights(weights_dir, model, people, audio_adapter=quant_file is None)
    tiny = is_tiny(weights_dir)
    base = weights_dir / manifest.BASE_DIR
    audio_file, _ = audio_weights_path(weights_dir, model, people)

    progress(ProgressEvent("load", 0, 5))
    if quant_file is not None:
        from talkgen.weights.quant import load_quantized_dit

        dit, _ = load_quantized_dit(quant_file, base_dir=base, dtype=dtype, device=device)
    else:
        dit, _ = load_dit(base, audio_file, dtype=dtype, device=device)
    progress(ProgressEvent("load", 1, 5))
    text_encoder = TextEncoder.from_original(
        base / manifest.T5_FILE, base / manifest.T5_TOKENIZER_DIR,
        TextEncoderConfig.tiny() if tiny else TextEncoderConfig.umt5_xxl(), dtype=dtype, device=device,
    )
    progress(ProgressEvent("load", 2, 5))
    # The reference runs the image encoder in float16 on the GPU; its tokens are cast to the DiT's dtype.
    image_encoder = ImageEncoder.from_original(
        base / manifest.CLIP_FILE, ImageEncoderConfig.tiny() if tiny else ImageEncoderConfig.vit_h_14(),
        dtype=torch.float16 if device.type == "cuda" else torch.float32, device=device,
    )
    progress(ProgressEvent("load", 3, 5))
    # The reference runs the VAE and wav2vec2 in float32; both are small.
    vae = VideoVAE.from_original(base / manifest.VAE_FILE, VAEConfig.tiny() if tiny else VAEConfig.wan21(),
                                 dtype=torch.float32, device=device)
    progress(ProgressEvent("load", 4, 5))
    audio_encoder = AudioEncoder.from_pretrained(weights_dir / manifest.WAV2VEC2_DIR, dtype=torch.float32, device="cpu")
    progress(ProgressEvent("load", 5, 5))
    return dict(dit=dit, vae=vae, text_encoder=text_encoder, image_encoder=image_encoder, audio_encoder=audio_encoder)
