"""Load the DiT from the released files, unchanged, without the reference's index swap.

Original layout: the base folder's 7 shards (found through its own index, or by name) plus the
audio file read separately (``multitalk.safetensors`` or ``{single,multi}/infinitetalk.safetensors``).
The audio file is read last and wins on collisions, as InfiniteTalk's dict merge does.
``-Diffusers`` layout: the base keys are renamed back to the original names; the audio keys are
never passed through diffusers' substring renames (they would turn ``audio_cross_attn`` into
``audio_attn2``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch

from talkgen.errors import WeightsError
from talkgen.models.dit import DiTConfig, WanMultiTalkDiT
from talkgen.weights import manifest
from talkgen.weights.loading import LoadReport, TensorGetter, WeightSet, iter_files, load_streaming, meta_device

def is_audio_key(name: str) -> bool:
    """The 330 tensors of the MultiTalk / InfiniteTalk files (40 blocks x 8 + 10)."""
    return name.startswith("audio_proj.") or ".audio_cross_attn." in name or ".norm_x." in name


def base_shards(base_dir: Path) -> list[Path]:
    """The base DiT files of a Wan2.1 I2V folder, original layout.

    The folder's own index names the shards; if a user already did the reference's index swap,
    the entries pointing at the audio file are harmless (the separate audio file overrides them).
    """
    base_dir = Path(base_dir)
    index = base_dir / manifest.DIT_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({base_dir / name for name in weight_map.values()})
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise WeightsError(
                f"{missing[0].name} is listed in {index} but is missing; {manifest.WAN_I2V_480P.advice()}."
            )
        return files
    files = sorted(base_dir.glob(manifest.DIT_SHARD_GLOB)) or sorted(base_dir.glob("diffusion_pytorch_model.safetensors"))
    if not files:
        raise WeightsError(
            f"No DiT weights (diffusion_pytorch_model-*.safetensors) in {base_dir}; {manifest.WAN_I2V_480P.advice()}."
        )
    return files


@lru_cache(maxsize=1)
def _diffusers_to_original() -> dict[str, str]:
    """diffusers' Wan rename table applied to every original base key, inverted."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    with meta_device():
        model = WanMultiTalkDiT(DiTConfig(num_layers=1, dim=64, ffn_dim=64, num_heads=2, text_dim=8, image_dim=8,
                                          audio_layers=1, audio_channels=4, intermediate_dim=4, output_dim=4, context_tokens=1))
    table = {}
    for key in model.state_dict():
        if is_audio_key(key):
            continue
        (converted,) = convert_wan_transformer_to_diffusers({key: None}).keys()
        table[converted.replace("blocks.0.", "blocks.{i}.")] = key.replace("blocks.0.", "blocks.{i}.")
    return table


def diffusers_key_to_original(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "blocks":
        template = ".".join(["blocks", "{i}", *parts[2:]])
        original = _diffusers_to_original().get(template)
        return original.format(i=parts[1]) if original else key
    return _diffusers_to_original().get(key, key)


def diffusers_shards(transformer_dir: Path) -> list[Path]:
    files = sorted(Path(transformer_dir).glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        raise WeightsError(f"No transformer weights in {transformer_dir}; {manifest.WAN_I2V_480P.advice()}.")
    return files


def _config_for(base_dir: Path, layout: str) -> DiTConfig:
    if layout == "original" and (base_dir / "config.json").is_file():
        return DiTConfig.from_json(base_dir / "config.json")
    if layout == "diffusers":
        return DiTConfig.wan_i2v_14b()  # the -Diffusers config uses other names; the 14B preset is the model
    return DiTConfig.wan_i2v_14b()


def audio_weight_set(audio_file: Path) -> WeightSet:
    name = Path(audio_file).as_posix()
    if "infinitetalk" in name:
        return manifest.INFINITETALK_MULTI if "/multi/" in name else manifest.INFINITETALK_SINGLE
    return manifest.MULTITALK


def load_dit(
    base_dir: Path,
    audio_file: Path,
    *,
    config: DiTConfig | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    layout: str = "original",
) -> tuple[WanMultiTalkDiT, LoadReport]:
    """Build the DiT on meta and stream the base and audio weights into it, strictly.

    ``layout="original"``: ``base_dir`` is the Wan2.1-I2V-14B-480P folder. ``layout="diffusers"``:
    ``base_dir`` is the ``-Diffusers`` repo's ``transformer/`` folder.
    """
    base_dir, audio_file = Path(base_dir), Path(audio_file)
    if not audio_file.is_file():
        raise WeightsError(f"Audio-adapter weights {audio_file} are missing; {audio_weight_set(audio_file).advice()}.")
    config = config or _config_for(base_dir, layout)
    with meta_device():
        model = WanMultiTalkDiT(config)
    audio_set = audio_weight_set(audio_file)

    def tensors() -> Iterator[tuple[str, TensorGetter, Path]]:
        if layout == "diffusers":
            for key, getter, path in iter_files(diffusers_shards(base_dir)):
                yield diffusers_key_to_original(key), getter, path
        else:
            yield from iter_files(base_shards(base_dir))
        yield from iter_files([audio_file])

    report = load_streaming(
        model,
        tensors(),
        weight_set=lambda name: audio_set if is_audio_key(name) else manifest.WAN_I2V_480P,
        dtype=dtype,
        device=device,
        keep_float32=WanMultiTalkDiT.keeps_float32,
        expected_files=f"{base_dir} and {audio_file}",
    )
    return model.eval(), report
