"""The image encoder: the ViT-H/14 visual tower of open-clip XLM-RoBERTa-large ViT-H/14.

The DiT's image cross-attention reads the tokens *after all but the last* transformer block,
with no post-norm ([1, 257, 1280] for a 224x224 input). The math is transformers'
``CLIPVisionModel`` and equals the reference ``wan/modules/clip.py`` ``VisionTransformer``
(``pool_type='token'``, ``pre_norm=True``):

- a 14x14 patch convolution without bias, a class token and learned absolute positions;
- a LayerNorm before the blocks (``pre_layrnorm``), eps 1e-5 everywhere;
- pre-norm blocks: scaled (1/sqrt(d)) self-attention, then an MLP with exact (erf) GELU.

So we build the model with one block fewer than the checkpoint and skip the last block, the
post-norm and the projection head when loading. The text tower in the same file is skipped too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from talkgen.errors import InputError, WeightsError
from talkgen.weights.loading import (
    TensorGetter,
    WeightSet,
    iter_files,
    load_streaming,
    meta_device,
    read_config_json,
    safetensors_files,
)
from talkgen.weights.manifest import WAN_I2V_480P_DIFFUSERS

CHECKPOINT_NAME = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"

# The OpenAI CLIP statistics, which the reference normalises with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

WEIGHT_SET = WeightSet(
    name="Wan2.1-I2V-14B-480P",
    repo_id="Wan-AI/Wan2.1-I2V-14B-480P",
    download_command="talkgen download --model multitalk --dir DIR",
)

_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu"}  # reference name -> transformers name


@dataclass(frozen=True)
class ImageEncoderConfig:
    """Sizes of the visual tower; ``num_layers`` counts the blocks in the checkpoint."""

    image_size: int
    patch_size: int
    dim: int
    num_heads: int
    num_layers: int
    mlp_ratio: float = 4.0
    eps: float = 1e-5  # the reference's norm_eps default, used by every LayerNorm of the tower
    activation: str = "gelu"
    out_dim: int = 1024  # the projection head's width; only its shape in the file depends on it

    @classmethod
    def vit_h_14(cls) -> ImageEncoderConfig:
        return cls(image_size=224, patch_size=14, dim=1280, num_heads=16, num_layers=32)

    @classmethod
    def tiny(cls) -> ImageEncoderConfig:
        return cls(image_size=28, patch_size=14, dim=64, num_heads=4, num_layers=3, out_dim=32)

    @classmethod
    def from_golden_config(cls, cfg: Mapping[str, Any]) -> ImageEncoderConfig:
        """From the reference ``VisionTransformer`` keyword arguments (the golden files' ``config``)."""
        layout = (cfg.get("pool_type", "token"), cfg.get("pre_norm", True), cfg.get("post_norm", False))
        if layout != ("token", True, False):
            raise ValueError(f"only pool_type='token', pre_norm=True, post_norm=False is supported, got {layout}")
        if cfg.get("activation", "gelu") not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation {cfg.get('activation')!r}")
        return cls(
            image_size=int(cfg["image_size"]),
            patch_size=int(cfg["patch_size"]),
            dim=int(cfg["dim"]),
            num_heads=int(cfg["num_heads"]),
            num_layers=int(cfg["num_layers"]),
            mlp_ratio=float(cfg.get("mlp_ratio", 4)),
            eps=float(cfg.get("norm_eps", 1e-5)),
            activation=str(cfg.get("activation", "gelu")),
            out_dim=int(cfg.get("out_dim") or cfg["dim"]),
        )

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> ImageEncoderConfig:
        """From a transformers ``CLIPVisionConfig`` ``config.json`` (the -Diffusers repo's ``image_encoder/``).

        ``num_hidden_layers`` counts the blocks in the checkpoint (32 for ViT-H/14), as our ``num_layers`` does.
        A full ``CLIPConfig`` is read through its ``vision_config``.
        """
        cfg = cfg.get("vision_config", cfg)
        preset = cls.vit_h_14()
        activation = str(cfg.get("hidden_act", preset.activation))
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation {activation!r}")
        dim = int(cfg.get("hidden_size", preset.dim))
        return cls(
            image_size=int(cfg.get("image_size", preset.image_size)),
            patch_size=int(cfg.get("patch_size", preset.patch_size)),
            dim=dim,
            num_heads=int(cfg.get("num_attention_heads", preset.num_heads)),
            num_layers=int(cfg.get("num_hidden_layers", preset.num_layers)),
            mlp_ratio=int(cfg.get("intermediate_size", preset.mlp_dim)) / dim,
            eps=float(cfg.get("layer_norm_eps", preset.eps)),
            activation=activation,
            out_dim=int(cfg.get("projection_dim") or preset.out_dim),
        )

    @property
    def mlp_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @property
    def num_tokens(self) -> int:
        return 1 + (self.image_size // self.patch_size) ** 2

    def to_hf(self):  # -> transformers.CLIPVisionConfig
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(
            hidden_size=self.dim,
            intermediate_size=self.mlp_dim,
            num_hidden_layers=self.num_layers - 1,  # the last block's output is never used
            num_attention_heads=self.num_heads,
            num_channels=3,
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_act=_ACTIVATIONS[self.activation],
            layer_norm_eps=self.eps,
            attention_dropout=0.0,
        )


def build_model(config: ImageEncoderConfig) -> nn.Module:
    """``CLIPVisionModel`` with ``num_layers - 1`` blocks on the meta device, in eval mode."""
    from transformers import CLIPVisionModel

    with meta_device():
        model = CLIPVisionModel(config.to_hf())
    # The post-norm only touches the pooled token, which we never read; dropping it keeps the
    # parameter set equal to what is loaded.
    vision_tower(model).post_layernorm = nn.Identity()
    return model.eval().requires_grad_(False)


def vision_tower(model: nn.Module) -> nn.Module:
    """The module holding ``embeddings``, ``pre_layrnorm`` and ``encoder``.

    transformers 5.x releases differ on whether ``CLIPVisionModel`` wraps it in ``vision_model``.
    """
    return getattr(model, "vision_model", model)


def checkpoint_key_map(config: ImageEncoderConfig) -> dict[str, str]:
    """Original ``visual.*`` key -> parameter name in :func:`vision_tower`, for the blocks we run.

    ``to_qkv`` is fused in the file; :func:`_split_qkv` presents it as ``...to_qkv.weight:q`` etc.
    """
    v, e = "visual", "embeddings"
    keys = {
        f"{v}.patch_embedding.weight": f"{e}.patch_embedding.weight",
        f"{v}.cls_embedding": f"{e}.class_embedding",
        f"{v}.pos_embedding": f"{e}.position_embedding.weight",
        f"{v}.pre_norm.weight": "pre_layrnorm.weight",
        f"{v}.pre_norm.bias": "pre_layrnorm.bias",
    }
    for i in range(config.num_layers - 1):
        src, dst = f"{v}.transformer.{i}", f"encoder.layers.{i}"
        for p in ("weight", "bias"):
            for part in "qkv":
                keys[f"{src}.attn.to_qkv.{p}:{part}"] = f"{dst}.self_attn.{part}_proj.{p}"
            keys[f"{src}.attn.proj.{p}"] = f"{dst}.self_attn.out_proj.{p}"
            keys[f"{src}.norm1.{p}"] = f"{dst}.layer_norm1.{p}"
            keys[f"{src}.norm2.{p}"] = f"{dst}.layer_norm2.{p}"
            keys[f"{src}.mlp.0.{p}"] = f"{dst}.mlp.fc1.{p}"
            keys[f"{src}.mlp.2.{p}"] = f"{dst}.mlp.fc2.{p}"
    return keys


def _is_unused(key: str, config: ImageEncoderConfig) -> bool:
    """Keys of the file that the image tokens do not depend on."""
    last = f"visual.transformer.{config.num_layers - 1}."
    return (
        not key.startswith("visual.")  # the XLM-RoBERTa text tower and the logit scale
        or key.startswith(last)
        or key.startswith("visual.post_norm.")
        or key == "visual.head"
    )


def _split_qkv(tensors: Iterable[tuple[str, TensorGetter, Path]]) -> Iterator[tuple[str, TensorGetter, Path]]:
    """Present each fused ``to_qkv`` tensor as three lazily sliced ones (rows: q, then k, then v)."""
    for key, getter, path in tensors:
        if ".attn.to_qkv." in key:
            for index, part in enumerate("qkv"):
                yield f"{key}:{part}", (lambda g=getter, i=index: g().chunk(3, dim=0)[i]), path
        else:
            yield key, getter, path


def _reshape_embeddings(name: str, tensor: torch.Tensor) -> torch.Tensor:
    # The reference stores the class token as [1, 1, D] and the positions as [1, N, D].
    if name.endswith("class_embedding"):
        return tensor.reshape(-1)
    if name.endswith("position_embedding.weight"):
        return tensor.reshape(tensor.shape[-2], tensor.shape[-1])
    return tensor


def load_original(
    model: nn.Module, path: Path, config: ImageEncoderConfig, *, dtype: torch.dtype, device: torch.device | str
) -> None:
    """Stream the ``visual.*`` tensors of the original file into ``model``, strictly."""
    key_map = checkpoint_key_map(config)
    _check_present(path, {k.partition(":")[0] for k in key_map})

    def rename(key: str) -> str | None:
        if _is_unused(key, config):
            return None
        return key_map.get(key, key)  # unknown visual keys stay unknown -> reported as unexpected

    tower = vision_tower(model)
    load_streaming(
        tower,
        _split_qkv(iter_files([path])),
        weight_set=WEIGHT_SET,
        dtype=dtype,
        device=device,
        rename=rename,
        convert=_reshape_embeddings,
        expected_files=str(path),
    )
    # position_ids is a non-persistent buffer (not in any file): rebuild it off the meta device.
    tower.embeddings.register_buffer(
        "position_ids", torch.arange(config.num_tokens, device=device).unsqueeze(0), persistent=False
    )


def _is_unused_diffusers(key: str, config: ImageEncoderConfig) -> bool:
    """Keys of a transformers CLIP checkpoint that the image tokens do not depend on: the last block,
    the post-norm and the projection head (skipped on purpose), a text tower, stale position ids."""
    last = f"vision_model.encoder.layers.{config.num_layers - 1}."
    return (
        key.startswith(last)
        or key.startswith("vision_model.post_layernorm.")
        or key.startswith(("visual_projection.", "text_model.", "text_projection."))
        or key in ("logit_scale", "vision_model.embeddings.position_ids")
    )


def load_diffusers(
    model: nn.Module,
    files: list[Path],
    config: ImageEncoderConfig,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> None:
    """Stream a transformers ``CLIPVisionModelWithProjection`` checkpoint (``vision_model.*``) into
    ``model`` (built by :func:`build_model`), strictly; missing tensors are named by their file key."""
    tower = vision_tower(model)
    expected_files = ", ".join(str(f) for f in files)
    present = {key for key, _, _ in iter_files(files)}
    missing = sorted({f"vision_model.{name}" for name in tower.state_dict()} - present)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(
            f"Tensor '{missing[0]}'{more} is missing from {expected_files}; {WAN_I2V_480P_DIFFUSERS.advice()}."
        )

    def rename(key: str) -> str | None:
        if _is_unused_diffusers(key, config):
            return None
        if key.startswith("vision_model."):
            return key.removeprefix("vision_model.")
        return f"\0{key}"  # no parameter has this name -> reported as unexpected under its file key

    load_streaming(
        tower,
        iter_files(files),
        weight_set=WAN_I2V_480P_DIFFUSERS,
        dtype=dtype,
        device=device,
        rename=rename,
        expected_files=expected_files,
    )
    tower.embeddings.register_buffer(
        "position_ids", torch.arange(config.num_tokens, device=device).unsqueeze(0), persistent=False
    )


def _check_present(path: Path, wanted: set[str]) -> None:
    """Name a missing tensor by its key in the released file, which is what a user can check."""
    present = {key for key, _, _ in iter_files([path])}
    missing = sorted(wanted - present)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"Tensor '{missing[0]}'{more} is missing from {path}; {WEIGHT_SET.advice()}.")


# ---------------------------------------------------------------------------------------------
# Preprocessing


def preprocess(frames: torch.Tensor, image_size: int) -> torch.Tensor:
    """Frames in [-1, 1] -> CLIP input ``[N, 3, S, S]`` in float32, as the reference does it.

    Accepted layouts: ``[3, T, H, W]`` (one video, the reference's per-item layout),
    ``[B, 3, T, H, W]`` (a batch of videos; every frame is encoded) or ``[B, 3, H, W]``.
    The resize is bicubic straight to ``S x S`` (no crop, no antialias, no clamp), then
    ``x * 0.5 + 0.5`` and the CLIP mean/std.
    """
    x = _as_images(frames).float()
    x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x * 0.5 + 0.5 - mean) / std


def _as_images(frames: torch.Tensor) -> torch.Tensor:
    """Any accepted layout -> ``[N, 3, H, W]``."""
    if frames.ndim == 5 and frames.shape[1] == 3:  # [B, 3, T, H, W] -> [B*T, 3, H, W]
        return frames.transpose(1, 2).flatten(0, 1)
    if frames.ndim == 4:
        video, images = frames.shape[0] == 3, frames.shape[1] == 3
        if video and images:
            raise InputError(
                f"Frames of shape {tuple(frames.shape)} are ambiguous ([3, T, H, W] or [B, 3, H, W]); "
                "pass [B, 3, T, H, W] instead."
            )
        if video:  # [3, T, H, W] -> [T, 3, H, W]
            return frames.transpose(0, 1)
        if images:
            return frames
    raise InputError(
        f"Frames of shape {tuple(frames.shape)} are not images: expected [3, T, H, W], [B, 3, T, H, W] "
        "or [B, 3, H, W] with values in [-1, 1]."
    )


# ---------------------------------------------------------------------------------------------
# The encoder


class ImageEncoder:
    """Frames -> the DiT's image tokens ``[N, 1 + (S/patch)^2, dim]``."""

    def __init__(self, model: nn.Module, config: ImageEncoderConfig):
        self.model = model
        self.config = config

    @classmethod
    def from_original(
        cls,
        pth_path: str | Path,
        config: ImageEncoderConfig | None = None,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
    ) -> ImageEncoder:
        """The reference runs this tower in float16 on the GPU, hence the default dtype."""
        config = config or ImageEncoderConfig.vit_h_14()
        pth_path = Path(pth_path)
        if not pth_path.is_file():
            raise WeightsError(f"Image encoder weights {pth_path} not found; {WEIGHT_SET.advice()}.")
        model = build_model(config)
        load_original(model, pth_path, config, dtype=dtype, device=device)
        return cls(model, config)

    @classmethod
    def from_diffusers(
        cls,
        folder: str | Path,
        config: ImageEncoderConfig | None = None,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
    ) -> ImageEncoder:
        """Load the ``image_encoder/`` folder of ``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers``.

        transformers' ``CLIPVisionModelWithProjection`` layout: ``config.json`` (the default ``config``;
        the ViT-H/14 preset without one) and ``model.safetensors`` (or shards with their index). The
        last block, ``post_layernorm`` and ``visual_projection`` are skipped: the DiT reads the tokens
        after all but the last block, before any norm.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise WeightsError(f"Image encoder folder {folder} not found; {WAN_I2V_480P_DIFFUSERS.advice()}.")
        if config is None:
            values = read_config_json(folder / "config.json")
            config = ImageEncoderConfig.from_hf_config(values) if values else ImageEncoderConfig.vit_h_14()
        files = safetensors_files(folder, "model", WAN_I2V_480P_DIFFUSERS)
        model = build_model(config)
        load_diffusers(model, files, config, dtype=dtype, device=device)
        return cls(model, config)

    @property
    def device(self) -> torch.device:
        return vision_tower(self.model).embeddings.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return vision_tower(self.model).embeddings.patch_embedding.weight.dtype

    @torch.inference_mode()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames in [-1, 1] (see :func:`preprocess` for layouts) -> ``[N, tokens, dim]``."""
        pixels = preprocess(frames.to(self.device), self.config.image_size).to(self.dtype)
        # With num_layers - 1 blocks built, last_hidden_state is the output of the second-to-last
        # block of the checkpoint, before any post-norm.
        return self.model(pixel_values=pixels).last_hidden_state


# ---------------------------------------------------------------------------------------------
# A tiny stand-in with the released file layout


def original_shapes(config: ImageEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every ``visual.*`` tensor in the released file for ``config``."""
    c, grid = config, config.image_size // config.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "visual.patch_embedding.weight": (c.dim, 3, c.patch_size, c.patch_size),
        "visual.cls_embedding": (1, 1, c.dim),
        "visual.pos_embedding": (1, 1 + grid * grid, c.dim),
        "visual.pre_norm.weight": (c.dim,),
        "visual.pre_norm.bias": (c.dim,),
    }
    for i in range(c.num_layers):
        b = f"visual.transformer.{i}"
        shapes.update({
            f"{b}.norm1.weight": (c.dim,), f"{b}.norm1.bias": (c.dim,),
            f"{b}.attn.to_qkv.weight": (3 * c.dim, c.dim), f"{b}.attn.to_qkv.bias": (3 * c.dim,),
            f"{b}.attn.proj.weight": (c.dim, c.dim), f"{b}.attn.proj.bias": (c.dim,),
            f"{b}.norm2.weight": (c.dim,), f"{b}.norm2.bias": (c.dim,),
            f"{b}.mlp.0.weight": (c.mlp_dim, c.dim), f"{b}.mlp.0.bias": (c.mlp_dim,),
            f"{b}.mlp.2.weight": (c.dim, c.mlp_dim), f"{b}.mlp.2.bias": (c.dim,),
        })  # fmt: skip
    shapes["visual.post_norm.weight"] = (c.dim,)
    shapes["visual.post_norm.bias"] = (c.dim,)
    shapes["visual.head"] = (c.dim, c.out_dim)
    return shapes


def write_tiny_image_encoder(
    path: Path, config: ImageEncoderConfig | None = None, seed: int = 0
) -> ImageEncoderConfig:
    """Write random weights in the released layout (``visual.*`` plus two text-tower keys)."""
    config = config or ImageEncoderConfig.tiny()
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in original_shapes(config).items():
        noise = torch.randn(shape, generator=gen)
        if key.endswith("norm1.weight") or key.endswith("norm2.weight") or key.endswith("norm.weight"):
            t = 1.0 + 0.1 * noise  # LayerNorm gains near 1
        elif len(shape) == 1:  # biases
            t = 0.02 * noise
        elif len(shape) == 2 and key != "visual.head":  # linear layers: unit-variance outputs
            t = noise / math.sqrt(shape[1])
        elif len(shape) == 4:  # patch convolution
            t = noise / math.sqrt(shape[1] * shape[2] * shape[3])
        else:  # class token, positions, head
            t = noise / math.sqrt(config.dim)
        state[key] = t
    # A sliver of the text tower, so loaders are exercised on skipping it as with the real file.
    state["textual.token_embedding.weight"] = torch.randn(8, 16, generator=gen)
    state["log_scale"] = torch.tensor(math.log(1 / 0.07))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return config
