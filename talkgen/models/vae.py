"""The Wan2.1 causal video VAE: diffusers' ``AutoencoderKLWan``, loaded from ``Wan2.1_VAE.pth``.

The network itself is diffusers' (a port of the reference ``WanVAE_``: causal 3D convolutions
with a per-frame feature cache, so video is encoded as 1, 4, 4, ... frames and decoded latent
frame by latent frame). What lives here is what the reference wraps around it:

* the released file's **original key names**, mapped to diffusers' names once from the key list
  (diffusers' own ``convert_wan_vae_to_diffusers`` run on names instead of tensors), so the
  ~500 MB file streams into a model built on the meta device;
* the 16 per-channel latent constants, applied as ``(mu - mean) / std`` after encoding and undone
  before decoding (the DiT works in this normalised space);
* a deterministic tiny checkpoint writer for tests, in the original key names.

Shapes: video ``[3, F, H, W]`` in [-1, 1] <-> latent ``[16, T, H/8, W/8]`` with ``T = (F-1)/4 + 1``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from talkgen.errors import InputError, WeightsError
from talkgen.weights.loading import iter_files, load_streaming, meta_device, read_config_json, safetensors_files
from talkgen.weights.manifest import WAN_I2V_480P, WAN_I2V_480P_DIFFUSERS

# The per-channel statistics of the Wan2.1 latent space (reference ``WanVAE.__init__``).
LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

@dataclass(frozen=True)
class VAEConfig:
    """Constructor arguments of the reference ``WanVAE_`` (the names of its ``cfg`` dict)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0

    @classmethod
    def wan21(cls) -> VAEConfig:
        """The released Wan2.1 VAE."""
        return cls()

    @classmethod
    def tiny(cls) -> VAEConfig:
        """The golden files' VAE: the real layout with 8 base channels instead of 96."""
        return cls(dim=8)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | str) -> VAEConfig:
        """From a dict (or its JSON text), e.g. the golden metadata ``config``; unknown keys are ignored."""
        if isinstance(values, str):
            values = json.loads(values)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}
        return cls(**kwargs)

    @classmethod
    def from_diffusers_config(cls, values: Mapping[str, Any]) -> VAEConfig:
        """From an ``AutoencoderKLWan`` ``config.json`` (the ``vae/`` folder of a -Diffusers repo).

        Keys it lacks keep the released Wan2.1 values; ``base_dim`` is our ``dim``.
        """
        defaults = cls.wan21()
        get = lambda key, default: values.get(key, default) if values.get(key) is not None else default  # noqa: E731
        return cls(
            dim=int(get("base_dim", defaults.dim)),
            z_dim=int(get("z_dim", defaults.z_dim)),
            dim_mult=tuple(int(v) for v in get("dim_mult", defaults.dim_mult)),
            num_res_blocks=int(get("num_res_blocks", defaults.num_res_blocks)),
            attn_scales=tuple(float(v) for v in get("attn_scales", defaults.attn_scales)),
            temperal_downsample=tuple(bool(v) for v in get("temperal_downsample", defaults.temperal_downsample)),
            dropout=float(get("dropout", defaults.dropout)),
        )

    def build(self) -> nn.Module:
        """An ``AutoencoderKLWan`` of this shape (on the current default device: use meta to load)."""
        from diffusers import AutoencoderKLWan

        return AutoencoderKLWan(
            base_dim=self.dim,
            z_dim=self.z_dim,
            dim_mult=list(self.dim_mult),
            num_res_blocks=self.num_res_blocks,
            attn_scales=list(self.attn_scales),
            temperal_downsample=list(self.temperal_downsample),
            dropout=self.dropout,
            latents_mean=list(LATENTS_MEAN),
            latents_std=list(LATENTS_STD),
        )


# --- key names: original (Wan2.1_VAE.pth) <-> diffusers -------------------------------------


def diffusers_names(original_keys: Iterable[str]) -> dict[str, str]:
    """Map each original key to its diffusers name, using diffusers' converter on the names only.

    The converter only moves dict values to new keys, so giving it ``{key: key}`` yields
    ``{diffusers_name: original_key}`` without touching a tensor: the mapping is computed from the
    key list and the file can then be streamed.
    """
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    keys = list(original_keys)
    converted = convert_wan_vae_to_diffusers({k: k for k in keys})
    if len(converted) != len(keys):  # two original keys landed on one name: not a Wan2.1 VAE file
        raise WeightsError(
            f"The VAE file's {len(keys)} keys do not map one-to-one onto diffusers' AutoencoderKLWan; "
            f"{WAN_I2V_480P.advice()}."
        )
    return {original: new for new, original in converted.items()}


# Inverse of diffusers' renaming. Whole-module renames come first and are final; inside a residual
# block the layer names are mapped as a second step (`norm1` -> `residual.0`, ...).
_MODULE_RULES: tuple[tuple[str, str], ...] = (
    (r"^quant_conv\.", "conv1."),
    (r"^post_quant_conv\.", "conv2."),
    (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
    (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
)
# The original residual block is Sequential(RMS_norm, SiLU, conv, RMS_norm, SiLU, Dropout, conv).
_RESIDUAL_LAYERS = {
    "norm1": "residual.0",
    "conv1": "residual.2",
    "norm2": "residual.3",
    "conv2": "residual.6",
    "conv_shortcut": "shortcut",
}


def _original_name(name: str, config: VAEConfig) -> str:
    for pattern, replacement in _MODULE_RULES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    block, leaf = _original_block(name, config)
    layer, _, param = leaf.partition(".")
    return f"{block}.{_RESIDUAL_LAYERS.get(layer, layer)}.{param}"


def _original_block(name: str, config: VAEConfig) -> tuple[str, str]:
    """Split a diffusers name into the original block prefix and the rest."""
    if match := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)$", name):
        part, index, rest = match.groups()
        return f"{part}.middle.{2 * int(index)}", rest  # middle = [resnet, attention, resnet]
    if match := re.match(r"^encoder\.down_blocks\.(\d+)\.(.*)$", name):
        return f"encoder.downsamples.{match[1]}", match[2]  # the same flat list in both
    if match := re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)$", name):
        # Each original decoder level is (num_res_blocks + 1) residual blocks then an upsampler,
        # flattened into one `upsamples` list.
        level, _, resnet, rest = match.groups()
        offset = int(resnet) if resnet is not None else config.num_res_blocks + 1
        block = f"decoder.upsamples.{int(level) * (config.num_res_blocks + 2) + offset}"
        return block, rest  # an upsampler's `resample.1` / `time_conv` pass through unchanged
    raise WeightsError(f"No original Wan2.1 VAE name is known for diffusers parameter '{name}'.")


def original_names(config: VAEConfig) -> dict[str, str]:
    """``{original_key: diffusers_name}`` for every tensor of a VAE of this shape.

    Obtained by inverting diffusers' renaming and checked by running diffusers' converter forward
    again: a mismatch means diffusers changed its layout, and is reported rather than guessed at.
    """
    with meta_device():
        names = list(config.build().state_dict())
    inverse = {_original_name(n, config): n for n in names}
    if diffusers_names(inverse) != inverse:
        raise WeightsError(  # pragma: no cover - guards a diffusers upgrade
            "diffusers' Wan VAE key conversion no longer matches talkgen's inverse of it; "
            "pin diffusers to the version in pyproject.toml."
        )
    return inverse


# --- the model ---------------------------------------------------------------------------------


class VideoVAE(nn.Module):
    """Wan2.1 video VAE working on single (unbatched) clips in the DiT's normalised latent space."""

    def __init__(self, model: nn.Module, config: VAEConfig):
        super().__init__()
        self.model = model
        self.config = config
        self.register_buffer("latents_mean", torch.tensor(LATENTS_MEAN), persistent=False)
        self.register_buffer("latents_std", torch.tensor(LATENTS_STD), persistent=False)
        self.tile_decode = False  # see set_tiling
        self.tile_encode = False

    @classmethod
    def from_original(
        cls,
        pth_path: str | Path,
        config: VAEConfig | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> VideoVAE:
        """Stream ``Wan2.1_VAE.pth`` (original key names) into a model built on the meta device."""
        config = config or VAEConfig.wan21()
        path = Path(pth_path)
        with meta_device():
            model = config.build()
        rename = diffusers_names(key for key, _, _ in iter_files([path]))
        _check_missing(set(rename), config, path)
        load_streaming(
            model,
            iter_files([path]),
            weight_set=WAN_I2V_480P,
            dtype=dtype,
            device=device,
            rename=rename.get,
            expected_files=str(path),
        )
        return cls._finish(model, config, device)

    @classmethod
    def _finish(
        cls,
        model: nn.Module,
        config: VAEConfig,
        device: torch.device | str,
        latents_mean: Iterable[float] | None = None,
        latents_std: Iterable[float] | None = None,
    ) -> VideoVAE:
        model.eval().requires_grad_(False)
        if torch.device(device).type == "cpu":
            use_frame_conv3d(model)
        vae = cls(model, config)
        if latents_mean is not None and latents_std is not None:
            vae.latents_mean = torch.tensor(list(latents_mean), dtype=torch.float32)
            vae.latents_std = torch.tensor(list(latents_std), dtype=torch.float32)
        # The constants stay float32 whatever the run dtype: they are applied to the float32 latent.
        vae.latents_mean = vae.latents_mean.to(device)
        vae.latents_std = vae.latents_std.to(device)
        return vae

    @classmethod
    def from_diffusers(
        cls,
        folder: str | Path,
        config: VAEConfig | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> VideoVAE:
        """Stream the ``vae/`` folder of ``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers`` (diffusers names).

        ``config``: by default from the folder's ``config.json`` (:meth:`VAEConfig.from_diffusers_config`),
        the Wan2.1 preset when there is none. The latent constants come from ``config.json`` when it
        has them (the -Diffusers repo stores the same 16 + 16 values).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise WeightsError(f"VAE folder {folder} not found; {WAN_I2V_480P_DIFFUSERS.advice()}.")
        values = read_config_json(folder / "config.json")
        config = config or (VAEConfig.from_diffusers_config(values) if values else VAEConfig.wan21())
        files = safetensors_files(folder, "diffusion_pytorch_model", WAN_I2V_480P_DIFFUSERS)
        with meta_device():
            model = config.build()
        load_streaming(
            model,
            iter_files(files),
            weight_set=WAN_I2V_480P_DIFFUSERS,
            dtype=dtype,
            device=device,
            expected_files=", ".join(str(f) for f in files),
        )
        mean, std = values.get("latents_mean"), values.get("latents_std")
        if mean is not None and std is not None and (len(mean) != config.z_dim or len(std) != config.z_dim):
            raise WeightsError(
                f"{folder / 'config.json'} has {len(mean)} latents_mean / {len(std)} latents_std values for "
                f"z_dim {config.z_dim}; {WAN_I2V_480P_DIFFUSERS.advice()}."
            )
        return cls._finish(model, config, device, mean, std)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def set_tiling(self, decode: bool = True, encode: bool = False, tile: int = 256, stride: int = 192) -> None:
        """Run the decoder (and, with ``encode``, the encoder) on overlapping spatial tiles of
        ``tile`` px every ``stride`` px (diffusers' tiling), on frames larger than one tile.

        The activations then scale with the tile instead of the frame: the low-memory tiers
        decode this way (:mod:`talkgen.runtime.memory`). Tiles are blended over ``tile - stride``
        px, so pixels differ a little from the untiled decode; the encoder is left untiled by
        default, so the condition latents stay exact.
        """
        self.tile_decode, self.tile_encode = bool(decode), bool(encode)
        self.model.tile_sample_min_height = self.model.tile_sample_min_width = int(tile)
        self.model.tile_sample_stride_height = self.model.tile_sample_stride_width = int(stride)

    @contextlib.contextmanager
    def _tiled(self, enabled: bool):
        previous = self.model.use_tiling
        self.model.use_tiling = enabled
        try:
            yield
        finally:
            self.model.use_tiling = previous

    def _channel(self, values: torch.Tensor) -> torch.Tensor:
        return values.view(self.config.z_dim, 1, 1, 1)  # broadcast over [C, T, h, w]

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``[3, F, H, W]`` in [-1, 1] -> normalised latent ``[16, T, H/8, W/8]`` (float32).

        The latent is the encoder's mean (no sampling), as in the reference.
        """
        _check_video(video)
        x = video.to(device=self.device, dtype=self.dtype).unsqueeze(0)
        with self._tiled(self.tile_encode):
            mu = self.model.encode(x).latent_dist.mean[0].float()
        # The reference multiplies by 1/std rather than dividing; same here for bitwise parity.
        return (mu - self._channel(self.latents_mean)) * self._channel(1.0 / self.latents_std)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent ``[16, T, h, w]`` -> video ``[3, 4(T-1)+1, 8h, 8w]`` clamped to [-1, 1].

        Decoding is causal and runs one latent frame at a time through diffusers' feature cache,
        so activation memory does not grow with the clip length (only the output does).
        Spatial tiling is off unless :meth:`set_tiling` turned it on (it blends tiles, which
        changes the pixels slightly).
        """
        if latent.dim() != 4 or latent.shape[0] != self.config.z_dim:
            raise InputError(
                f"A VAE latent must be [{self.config.z_dim}, T, h, w], got {tuple(latent.shape)}; "
                "pass one clip at a time without a batch dimension."
            )
        z = latent.to(device=self.device, dtype=torch.float32)
        z = z / self._channel(1.0 / self.latents_std) + self._channel(self.latents_mean)
        with self._tiled(self.tile_decode):
            out = self.model.decode(z.to(self.dtype).unsqueeze(0)).sample[0]
        return out.float().clamp_(-1.0, 1.0)


def _check_missing(file_keys: set[str], config: VAEConfig, path: Path) -> None:
    """Name a missing tensor by its original key (the loader would name the diffusers one)."""
    missing = sorted(set(original_names(config)) - file_keys)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"Tensor '{missing[0]}'{more} is missing from {path}; {WAN_I2V_480P.advice()}.")


def _check_video(video: torch.Tensor) -> None:
    if video.dim() != 4 or video.shape[0] != 3:
        raise InputError(
            f"A video for the VAE must be [3, F, H, W] in [-1, 1], got {tuple(video.shape)}; "
            "pass one clip at a time without a batch dimension."
        )
    frames, height, width = video.shape[1:]
    if (frames - 1) % 4 or height % 8 or width % 8:
        raise InputError(
            f"The VAE needs 4k+1 frames and a size divisible by 8, got {frames} frames of {height}x{width}; "
            "pad or crop the clip first."
        )


# --- tiny deterministic checkpoint for tests ---------------------------------------------------


def write_tiny_vae(path: str | Path, config: VAEConfig | None = None, seed: int = 0) -> Path:
    """Write deterministic random weights under the original key names (``torch.save`` of a dict).

    Convolutions get a variance-preserving scale (std = 1/sqrt(fan_in)) and the RMS-norm gains
    stay near 1, so activations neither vanish nor blow up through the ~30 layers of a tiny VAE.
    """
    config = config or VAEConfig.tiny()
    with meta_device():
        shapes = {name: tuple(t.shape) for name, t in config.build().state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for original, name in sorted(original_names(config).items()):
        shape = shapes[name]
        noise = torch.randn(shape, generator=generator)
        if name.endswith(".gamma"):
            tensor = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            tensor = 0.02 * noise
        else:  # conv weights [out, in, (t,) kh, kw]
            fan_in = int(torch.tensor(shape[1:]).prod())
            tensor = noise / fan_in**0.5
        state[original] = tensor.contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


# --- speed on the CPU --------------------------------------------------------------------------


def frame_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding) -> torch.Tensor:
    """A 3-D convolution as a sum of 2-D convolutions over the kernel's time taps.

    PyTorch's CPU build runs every ``conv3d`` on its slow reference kernel (no oneDNN path), while
    ``conv2d`` uses oneDNN: for the VAE's causal convolutions (time padding already applied, so
    none here) this is about 5x faster on the CPU and equal up to float rounding.
    """
    b, c, t, h, w = x.shape
    kt = weight.shape[2]
    st = stride[0]
    t_out = (t - kt) // st + 1
    out = None
    for tap in range(kt):
        frames = x[:, :, tap : tap + st * (t_out - 1) + 1 : st]  # [B, C, T_out, H, W]
        frames = frames.transpose(1, 2).reshape(b * t_out, c, h, w)
        part = torch.nn.functional.conv2d(frames, weight[:, :, tap], None, stride[1:], padding[1:])
        out = part if out is None else out + part
    out = out.reshape(b, t_out, *out.shape[1:]).transpose(1, 2)
    return out if bias is None else out + bias[None, :, None, None, None]


def use_frame_conv3d(model: nn.Module) -> None:
    """Route the CPU convolutions of ``model``'s Conv3d layers through :func:`frame_conv3d`."""
    for module in model.modules():
        if not isinstance(module, nn.Conv3d) or module.groups != 1 or module.dilation != (1, 1, 1):
            continue
        if module.padding[0] != 0 or module.padding_mode != "zeros":
            continue

        def conv(x, weight, bias, module=module):
            if x.device.type != "cpu":
                return nn.Conv3d._conv_forward(module, x, weight, bias)
            return frame_conv3d(x, weight, bias, module.stride, module.padding)

        module._conv_forward = conv
