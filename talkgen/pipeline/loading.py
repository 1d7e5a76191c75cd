"""Find and load every component of a weights directory.

Layout (the reference README's, unchanged)::

    DIR/Wan2.1-I2V-14B-480P/            7 DiT shards + index + config.json, umT5 .pth + google/umt5-xxl/,
                                        CLIP .pth, Wan2.1_VAE.pth
    DIR/chinese-wav2vec2-base/          config.json, model.safetensors (or pytorch_model.bin)
    DIR/MeiGen-MultiTalk/multitalk.safetensors                    (model="multitalk")
    DIR/InfiniteTalk/{single,multi}/infinitetalk.safetensors      (model="infinitetalk")

or, in place of ``DIR/Wan2.1-I2V-14B-480P/``, the -Diffusers repo (``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers``)::

    DIR/Wan2.1-I2V-14B-480P-Diffusers/  transformer/ (DiT), text_encoder/ + tokenizer/ (umT5),
                                        image_encoder/ (CLIP), vae/, each with its config.json

The -Diffusers folder is used for every base component when the original folder is absent; when
both are there the original folder wins, except for a DiT it lacks (``talkgen download --layout
diffusers`` fetches the encoders of the original repo and only the DiT of the -Diffusers one).

Nothing is written into these folders. ``model="tiny"`` first writes the tiny model there.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from talkgen.errors import InputError, WeightsError
from talkgen.pipeline.progress import ProgressCallback, ProgressEvent, no_progress
from talkgen.weights import manifest
from talkgen.models.dit import DiTConfig
from talkgen.weights.dit import load_dit
from talkgen.weights.loading import WeightSet, read_config_json

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


def base_layout(weights_dir: Path) -> str:
    """``"diffusers"`` when only the -Diffusers base folder is present, else ``"original"``."""
    weights_dir = Path(weights_dir)
    if not (weights_dir / manifest.BASE_DIR).is_dir() and (weights_dir / manifest.BASE_DIFFUSERS_DIR).is_dir():
        return "diffusers"
    return "original"


def dit_layout(weights_dir: Path) -> str:
    """Where the DiT comes from: as :func:`base_layout`, and also ``"diffusers"`` when the original
    folder holds no DiT shards but the -Diffusers ``transformer/`` folder exists."""
    weights_dir = Path(weights_dir)
    if base_layout(weights_dir) == "diffusers":
        return "diffusers"
    base = weights_dir / manifest.BASE_DIR
    has_original = (base / manifest.DIT_INDEX).is_file() or any(base.glob(manifest.DIT_SHARD_GLOB)) or (
        base / "diffusion_pytorch_model.safetensors").is_file()
    transformer = weights_dir / manifest.BASE_DIFFUSERS_DIR / "transformer"
    return "diffusers" if not has_original and transformer.is_dir() else "original"


def diffusers_dit_config(transformer_dir: Path, preset: DiTConfig) -> DiTConfig:
    """The DiT's shape from a diffusers ``WanTransformer3DModel`` ``config.json``; the audio adapter's
    sizes (not in that file) come from ``preset``."""
    values = read_config_json(Path(transformer_dir) / "config.json")
    if not values:
        return preset
    heads = int(values.get("num_attention_heads", preset.num_heads))
    head_dim = int(values.get("attention_head_dim", preset.head_dim))
    changes = dict(
        dim=heads * head_dim, num_heads=heads,
        ffn_dim=values.get("ffn_dim"), num_layers=values.get("num_layers"), in_dim=values.get("in_channels"),
        out_dim=values.get("out_channels"), freq_dim=values.get("freq_dim"), text_dim=values.get("text_dim"),
        eps=values.get("eps"), image_dim=values.get("image_dim"),
        patch_size=tuple(values["patch_size"]) if values.get("patch_size") else None,
    )  # fmt: skip
    return dataclasses.replace(preset, **{k: v for k, v in changes.items() if v is not None})


def required_files(weights_dir: Path, model: str, people: str = "single") -> list[tuple[Path, WeightSet]]:
    audio, audio_set = audio_weights_path(weights_dir, model, people)
    if base_layout(weights_dir) == "diffusers":
        folder, weight_set = weights_dir / manifest.BASE_DIFFUSERS_DIR, manifest.WAN_I2V_480P_DIFFUSERS
        return [
            (folder / "transformer" / "config.json", weight_set),
            (folder / "text_encoder" / "config.json", weight_set),
            (folder / "tokenizer", weight_set),
            (folder / "image_encoder" / "config.json", weight_set),
            (folder / "vae" / "config.json", weight_set),
            (weights_dir / manifest.WAV2VEC2_DIR / "config.json", manifest.WAV2VEC2),
            (audio, audio_set),
        ]
    base = weights_dir / manifest.BASE_DIR
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
        layout = "diffusers" if weight_set is manifest.WAN_I2V_480P_DIFFUSERS else "original"
        return manifest.download_command(weights_dir, model, people, layout=layout)
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
    dit_device: torch.device | None = None,
    encoder_device: torch.device | None = None,
    dit_only: bool = False,
) -> dict:
    """Every component of ``weights_dir``, on ``device`` in ``dtype`` (the VAE and wav2vec2 in float32).

    ``dit_device`` / ``encoder_device`` (default ``device``): where the DiT / the text encoder, image
    encoder and VAE are loaded when a memory tier keeps them elsewhere between uses (the CPU, from
    where :mod:`talkgen.runtime.memory` moves them into pinned memory); the dtypes stay those of
    ``device``. ``dit_only``: load the DiT alone (the other ranks of a sequence-parallel pipeline,
    where the encoders and the VAE run on rank 0 only); the other components are None.
    """
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
    diffusers = weights_dir / manifest.BASE_DIFFUSERS_DIR
    from_diffusers = base_layout(weights_dir) == "diffusers"
    audio_file, _ = audio_weights_path(weights_dir, model, people)
    compute_device = device
    dit_device = dit_device or device

    progress(ProgressEvent("load", 0, 5))
    dit_config = None
    if dit_layout(weights_dir) == "diffusers":
        dit_config = diffusers_dit_config(diffusers / "transformer", DiTConfig.tiny() if tiny else DiTConfig.wan_i2v_14b())
    if quant_file is not None:
        from talkgen.weights.quant import load_quantized_dit

        dit, _ = load_quantized_dit(quant_file, config=dit_config, base_dir=base, dtype=dtype, device=dit_device)
    elif dit_config is not None:
        dit, _ = load_dit(diffusers / "transformer", audio_file, config=dit_config, dtype=dtype, device=dit_device,
                          layout="diffusers")
    else:
        dit, _ = load_dit(base, audio_file, dtype=dtype, device=dit_device)
    if dit_only:
        progress(ProgressEvent("load", 5, 5))
        return dict(dit=dit, vae=None, text_encoder=None, image_encoder=None, audio_encoder=None)
    progress(ProgressEvent("load", 1, 5))
    # The reference runs the image encoder in float16 on the GPU; its tokens are cast to the DiT's dtype.
    clip_dtype = torch.float16 if compute_device.type == "cuda" else torch.float32
    device = encoder_device or device
    if from_diffusers:
        # Each folder's config.json gives its shape (the tiny model's as well).
        text_encoder = TextEncoder.from_diffusers(diffusers / "text_encoder", dtype=dtype, device=device)
        progress(ProgressEvent("load", 2, 5))
        image_encoder = ImageEncoder.from_diffusers(diffusers / "image_encoder", dtype=clip_dtype, device=device)
        progress(ProgressEvent("load", 3, 5))
        vae = VideoVAE.from_diffusers(diffusers / "vae", dtype=torch.float32, device=device)
    else:
        text_encoder = TextEncoder.from_original(
            base / manifest.T5_FILE, base / manifest.T5_TOKENIZER_DIR,
            TextEncoderConfig.tiny() if tiny else TextEncoderConfig.umt5_xxl(), dtype=dtype, device=device,
        )
        progress(ProgressEvent("load", 2, 5))
        image_encoder = ImageEncoder.from_original(
            base / manifest.CLIP_FILE, ImageEncoderConfig.tiny() if tiny else ImageEncoderConfig.vit_h_14(),
            dtype=clip_dtype, device=device,
        )
        progress(ProgressEvent("load", 3, 5))
        # The reference runs the VAE and wav2vec2 in float32; both are small.
        vae = VideoVAE.from_original(base / manifest.VAE_FILE, VAEConfig.tiny() if tiny else VAEConfig.wan21(),
                                     dtype=torch.float32, device=device)
    progress(ProgressEvent("load", 4, 5))
    audio_encoder = AudioEncoder.from_pretrained(weights_dir / manifest.WAV2VEC2_DIR, dtype=torch.float32, device="cpu")
    progress(ProgressEvent("load", 5, 5))
    return dict(dit=dit, vae=vae, text_encoder=text_encoder, image_encoder=image_encoder, audio_encoder=audio_encoder)
