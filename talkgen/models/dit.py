"""The Wan2.1 image-to-video DiT with the MultiTalk / InfiniteTalk audio adapter.

Parameter names are those of the released checkpoints (``blocks.N.self_attn.q``,
``cross_attn.k_img``, ``norm3``, ``audio_cross_attn.q_linear``, ``norm_x``, ``audio_proj.proj1_vf``,
``head.modulation`` ...), so the 7 base shards and the 330-tensor audio files load with no key map.

One block, in order (``m0..m5`` = ``modulation + e0``, computed in float32)::

    x = x + self_attn(norm1(x) * (1 + m1) + m0) * m2          # 3-D RoPE, qk RMSNorm
    x = x + cross_attn(norm3(x), image tokens, text tokens)    # two attentions, summed, then o
    x = x + audio_cross_attn(norm_x(x), audio tokens of the same latent frame)
    x = x + ffn(norm2(x) * (1 + m4) + m3) * m5

Two speakers add L-RoPE routing: each video token gets a 1-D position from how much it attends
to each person's region of the first latent frame (the "person map"), and each person's audio
tokens a fixed position, so a token on person 1 hears person 1's speech. One speaker never builds
the map (the reference builds it in every block and throws it away).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from talkgen.models.attention import attention, own_kernels_allowed


@dataclass(frozen=True)
class DiTConfig:
    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 36
    out_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    image_dim: int = 1280  # width of the image-encoder tokens (ViT-H/14)
    # audio adapter
    audio_window: int = 5  # wav2vec2 frames around each video frame
    vae_scale: int = 4  # video frames per latent frame after the first
    audio_layers: int = 12  # stacked wav2vec2 layer outputs
    audio_channels: int = 768  # wav2vec2 hidden size
    intermediate_dim: int = 512
    output_dim: int = 768
    context_tokens: int = 32  # audio tokens per person and latent frame
    norm_input_visual: bool = True
    norm_output_audio: bool = True
    # L-RoPE ranges for two speakers: person 1 in [0, 4], person 2 in [20, 24], background 12
    class_range: int = 24
    class_interval: int = 4

    @classmethod
    def wan_i2v_14b(cls) -> DiTConfig:
        return cls()

    @classmethod
    def tiny(cls) -> DiTConfig:
        """The built-in tiny model: real structure, small widths; matches our tiny encoders."""
        return cls(
            dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=64, image_dim=64,
            audio_layers=3, audio_channels=32, intermediate_dim=32, output_dim=32, context_tokens=4,
        )

    @classmethod
    def from_dict(cls, values: dict) -> DiTConfig:
        """From a reference ``config.json`` (unknown keys such as ``model_type`` are ignored)."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in known}
        if "patch_size" in kwargs:
            kwargs["patch_size"] = tuple(kwargs["patch_size"])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: Path) -> DiTConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        values = asdict(self)
        values["model_type"] = "i2v"
        return values

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


# --------------------------------------------------------------------------------------------
# Small building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight.to(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (as the reference's WanLayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H*D] -> [B, H, L, D]"""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B, L, H*D]"""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def sinusoidal_embedding(dim: int, position: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding: [cos | sin] of position * 10000^(-k/half), in float64."""
    half = dim // 2
    position = position.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=position.device).div(half))
    angles = torch.outer(position, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


# --------------------------------------------------------------------------------------------
# Rotary position embeddings


@lru_cache(maxsize=16)
def _rope_3d_table(grid: tuple[int, int, int], head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the 3-D RoPE angles for a (T, h, w) token grid: each [T*h*w, head_dim/2].

    The head dimension is split into time/height/width pairs as in Wan (22/21/21 for 128); each
    axis uses theta=10000 over its own width. Angles are formed in float64 (as the reference),
    then cos/sin are stored in float32.
    """
    pairs = head_dim // 2
    h_pairs = w_pairs = pairs // 3
    t_pairs = pairs - h_pairs - w_pairs

    def axis_freqs(n_pairs: int) -> torch.Tensor:
        width = 2 * n_pairs
        return 1.0 / torch.pow(10000.0, torch.arange(0, width, 2, dtype=torch.float64) / width)

    t, h, w = grid
    ft = torch.outer(torch.arange(t, dtype=torch.float64), axis_freqs(t_pairs))
    fh = torch.outer(torch.arange(h, dtype=torch.float64), axis_freqs(h_pairs))
    fw = torch.outer(torch.arange(w, dtype=torch.float64), axis_freqs(w_pairs))
    angles = torch.cat(
        [
            ft[:, None, None, :].expand(t, h, w, t_pairs),
            fh[None, :, None, :].expand(t, h, w, h_pairs),
            fw[None, None, :, :].expand(t, h, w, w_pairs),
        ],
        dim=-1,
    ).reshape(t * h * w, pairs)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x0, x1) of the last axis by the given angles, in float32.

    ``x``: [..., D]; ``cos``/``sin``: broadcastable to [..., D/2].
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def _own_kernel_takes(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether one of talkgen's Triton kernels computes an op on ``x``: bf16 / fp16 on a GPU where
    they may run (:func:`talkgen.models.attention.own_kernels_allowed`), and no autograd (they have
    no backward)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params))
    return x.dtype in (torch.bfloat16, torch.float16) and not needs_grad and own_kernels_allowed(x.device.type)


def _modulate(normed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """AdaLN: ``normed * (1 + scale) + shift`` in float32, back in ``normed``'s dtype."""
    return (normed.float() * (1 + scale) + shift).to(normed.dtype)


def modulated_norm(x: torch.Tensor, norm: LayerNorm32, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` in x's dtype; ``scale`` / ``shift`` float32 [B, 1, C]. On a GPU
    where talkgen's kernels may run, one Triton pass (:mod:`talkgen.kernels.layer_norm`, the same
    roundings); else torch ops."""
    if _own_kernel_takes(x, norm.weight, norm.bias, scale, shift):
        from talkgen.kernels.layer_norm import layer_norm_modulate

        return layer_norm_modulate(x, norm.weight, norm.bias, scale, shift, norm.eps)
    return torch_modulated_norm(x, norm, scale, shift)


def add_and_norm(
    x: torch.Tensor,
    delta: torch.Tensor,
    norm: nn.Module,
    gate: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual add and the next layer's input: ``(x + delta * gate, norm(that) * (1 + scale) + shift)``,
    both in x's dtype (the sum in float32 when gated, as the reference); ``gate``, ``scale``, ``shift``
    are optional float32 [B, 1, C]. One Triton pass where :func:`modulated_norm` takes one."""
    if isinstance(norm, LayerNorm32) and _own_kernel_takes(x, delta, norm.weight, norm.bias, gate, scale, shift):
        from talkgen.kernels.layer_norm import add_layer_norm

        return add_layer_norm(x, delta, gate, norm.weight, norm.bias, scale, shift, norm.eps)
    return torch_add_and_norm(x, delta, norm, gate, scale, shift)


def torch_add_and_norm(x: torch.Tensor, delta: torch.Tensor, norm: nn.Module, gate=None, scale=None,
                       shift=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`add_and_norm` (the same arguments) in torch ops, which Inductor fuses when the block is compiled."""
    x = x + delta if gate is None else (x.float() + delta.float() * gate).to(x.dtype)
    normed = norm(x)
    return x, normed if scale is None else _modulate(normed, scale, shift)


def torch_modulated_norm(x: torch.Tensor, norm: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """:func:`modulated_norm` in torch ops."""
    return _modulate(norm(x), scale, shift)


def norm_and_rope(x: torch.Tensor, norm: RMSNorm, rope: tuple[torch.Tensor, torch.Tensor], heads: int) -> torch.Tensor:
    """RoPE(RMSNorm(x)) of self-attention's q or k: ``x`` [B, L, C] -> [B, L, heads, C / heads] in
    x's dtype. On a GPU where talkgen's kernels may run, one Triton pass
    (:mod:`talkgen.kernels.norm_rope`, the same roundings; inference only: it has no backward);
    else these torch ops."""
    if _own_kernel_takes(x, norm.weight):
        from talkgen.kernels.norm_rope import rms_norm_rope

        return rms_norm_rope(x, norm.weight, rope[0], rope[1], heads, norm.eps)
    b, n, _ = x.shape
    cos, sin = (t[:, None] for t in rope)  # [L, 1, D/2]: broadcast over heads
    return apply_rope_pairs(norm(x).view(b, n, heads, -1), cos, sin).to(x.dtype)


def rope_1d_angles(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for 1-D RoPE over the full head dim, pairs interleaved: positions [...] -> [..., D/2]."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


# --------------------------------------------------------------------------------------------
# Attention modules


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)  # over the full width, before the head split
        self.norm_k = RMSNorm(dim, eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        person_masks: torch.Tensor | None = None,
        parallel=None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the attention output and, when ``person_masks`` is given, the person map.

        ``parallel`` (a :class:`talkgen.runtime.parallel.ShardPlan`): ``x`` and ``rope`` are this
        rank's token shard; attention and the person map run over the whole sequence, head-sharded."""
        b, n, _ = x.shape
        # RoPE is applied in the [B, L, H, D] layout the projections produce (coalesced writes);
        # attention takes [B, H, L, D] views of it.
        q = norm_and_rope(self.q(x), self.norm_q, rope, self.num_heads)
        k = norm_and_rope(self.k(x), self.norm_k, rope, self.num_heads)
        v = self.v(x).view(b, n, self.num_heads, -1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if parallel is not None:
            out, person_map = parallel.self_attention(q, k, v, person_masks)
            return self.o(out), person_map
        out = self.o(merge_heads(attention(q, k, v)))
        person_map = None if person_masks is None else compute_person_map(q, k, person_masks)
        return out, person_map


def compute_person_map(q: torch.Tensor, k: torch.Tensor, person_masks: torch.Tensor) -> torch.Tensor:
    """How much each video token attends to each person's region of the first latent frame.

    ``q``, ``k``: [B, H, L, D] after RoPE; ``person_masks``: [classes, Nref] (token masks of latent
    frame 0: person 1, person 2, background). Returns [B, classes, L]: for each class, the
    softmax(q k_ref^T / sqrt(D)) mass on the class's tokens divided by its token count, averaged
    over heads. That is an attention whose values are the normalised masks, so SDPA computes it
    without materialising the [L, Nref] probability matrix (about 4 GB per block in the reference).
    """
    classes, n_ref = person_masks.shape
    ref_k = k[:, :, :n_ref]
    values = (person_masks / person_masks.sum(-1, keepdim=True)).t()  # [Nref, classes]
    # Zero-padded to the head dim so SDPA can use its fused kernels (they need equal q/v widths).
    values = F.pad(values, (0, q.shape[-1] - classes)).to(q.dtype)
    values = values.expand(q.shape[0], q.shape[1], n_ref, q.shape[-1])
    mass = attention(q, ref_k, values)[..., :classes]  # [B, H, L, classes]
    return mass.float().mean(1).transpose(1, 2)


class ImageTextCrossAttention(nn.Module):
    """I2V cross-attention: text and image tokens attended separately, summed, projected once."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.norm_k_img = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        heads = self.num_heads
        q = split_heads(self.norm_q(self.q(x)), heads)
        k = split_heads(self.norm_k(self.k(text)), heads)
        v = split_heads(self.v(text), heads)
        k_img = split_heads(self.norm_k_img(self.k_img(image)), heads)
        v_img = split_heads(self.v_img(image), heads)
        out = merge_heads(attention(q, k, v)) + merge_heads(attention(q, k_img, v_img))
        return self.o(out)


class AudioCrossAttention(nn.Module):
    """Each latent frame's video tokens attend only to that frame's audio tokens."""

    def __init__(self, dim: int, audio_dim: int, num_heads: int, class_range: int, class_interval: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(audio_dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.person1_range = (0.0, float(class_interval))
        self.person2_range = (float(class_range - class_interval), float(class_range))
        self.background_position = float(class_range // 2)

    def forward(
        self,
        x: torch.Tensor,
        audio_tokens: torch.Tensor,
        frames: int,
        person_map: torch.Tensor | None,
        parallel=None,
    ) -> torch.Tensor:
        """``x``: [B, T*S, C]; ``audio_tokens``: [B, T, people*tokens, audio_dim];
        ``person_map``: [B, 3, T*S] for two speakers, else None. With ``parallel``, ``x`` is this
        rank's token shard (the person map stays whole)."""
        if parallel is not None:
            return parallel.audio_cross_attention(self, x, audio_tokens, person_map)
        b, n, c = x.shape
        heads = self.num_heads
        # [B, T*S, C] -> [B*T, S, C]: one attention problem per latent frame
        q = split_heads(self.q_linear(x.reshape(b * frames, n // frames, c)), heads)
        kv = self.kv_linear(audio_tokens.flatten(0, 1))  # [B*T, Na, 2C]
        k, v = (split_heads(part, heads) for part in kv.chunk(2, dim=-1))
        if person_map is not None:
            q, k = self._route_speakers(q, k, person_map, frames)
        out = merge_heads(attention(q, k, v))  # [B*T, S, C]
        return self.proj(out).reshape(b, n, c)

    def _route_speakers(
        self, q: torch.Tensor, k: torch.Tensor, person_map: torch.Tensor, frames: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L-RoPE: positions for video tokens from the person map, fixed ones for each person's audio."""
        positions = self._token_positions(person_map)  # [B, T*S]
        return self._rotate_video(q, positions), self._rotate_audio(k)

    @staticmethod
    def _rotate_video(q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``q``: [B*T', H, S', D] (frames of tokens); ``positions``: [B, T'*S'] of those tokens."""
        cos, sin = rope_1d_angles(positions.reshape(q.shape[0], 1, -1), q.shape[-1])  # [B*T', 1, S', D/2]
        return apply_rope_pairs(q, cos, sin).to(q.dtype)

    def _rotate_audio(self, k: torch.Tensor) -> torch.Tensor:
        """Person 1's audio tokens (the first half) at its range's centre, person 2's at its."""
        n_audio = k.shape[2]
        audio_positions = torch.full((n_audio,), sum(self.person2_range) / 2, device=k.device)
        audio_positions[: n_audio // 2] = sum(self.person1_range) / 2
        cos_k, sin_k = rope_1d_angles(audio_positions, k.shape[-1])
        return apply_rope_pairs(k, cos_k, sin_k).to(k.dtype)

    def _token_positions(self, person_map: torch.Tensor) -> torch.Tensor:
        """Each token takes its strongest class's position; person scores are min-max scaled
        over the whole clip into that person's range, the background is a constant."""

        def rescale(scores: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
            smin = scores.amin(-1, keepdim=True)
            smax = scores.amax(-1, keepdim=True)
            return (scores - smin) / (smax - smin + 1e-8) * (hi - lo) + lo

        person1 = rescale(person_map[:, 0], *self.person1_range)
        person2 = rescale(person_map[:, 1], *self.person2_range)
        background = torch.full_like(person1, self.background_position)
        candidates = torch.stack([person1, person2, background], dim=1)  # [B, 3, L]
        strongest = person_map.argmax(dim=1, keepdim=True)
        return candidates.gather(1, strongest).squeeze(1)


class AudioProjection(nn.Module):
    """wav2vec2 windows -> ``context_tokens`` audio tokens per person and latent frame."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        c = config
        per_frame = c.audio_layers * c.audio_channels
        self.window = c.audio_window
        self.vae_scale = c.vae_scale
        self.context_tokens = c.context_tokens
        self.output_dim = c.output_dim
        self.proj1 = nn.Linear(c.audio_window * per_frame, c.intermediate_dim)  # latent frame 0
        self.proj1_vf = nn.Linear((c.audio_window + c.vae_scale - 1) * per_frame, c.intermediate_dim)
        self.proj2 = nn.Linear(c.intermediate_dim, c.intermediate_dim)
        self.proj3 = nn.Linear(c.intermediate_dim, c.context_tokens * c.output_dim)
        self.norm = nn.LayerNorm(c.output_dim) if c.norm_output_audio else nn.Identity()

    def latent_windows(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split per-video-frame windows into latent-frame windows.

        ``audio``: [N, F, window, layers, channels] with F = 1 + vae_scale*(T-1). Latent frame 0
        keeps video frame 0's window; latent frame k >= 1 covers video frames 4k-3..4k and takes
        the first frame's left half-window, the middle frames' centres and the last frame's right
        half-window: 8 consecutive wav2vec2 frames for window 5.
        """
        n, f = audio.shape[:2]
        mid = self.window // 2
        first = audio[:, :1]  # [N, 1, W, L, C]
        later = audio[:, 1:].unflatten(1, ((f - 1) // self.vae_scale, self.vae_scale))  # [N, T-1, 4, W, L, C]
        later = torch.cat(
            [
                later[:, :, 0, : mid + 1],
                later[:, :, 1:-1, mid],
                later[:, :, -1, mid:],
            ],
            dim=2,
        )  # [N, T-1, W + vae_scale - 1, L, C]
        return first, later

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """[N, F, window, layers, channels] -> [N, T, context_tokens, output_dim]"""
        first, later = self.latent_windows(audio)
        first = torch.relu(self.proj1(first.flatten(2)))  # [N, 1, inter]
        later = torch.relu(self.proj1_vf(later.flatten(2)))  # [N, T-1, inter]
        hidden = torch.relu(self.proj2(torch.cat([first, later], dim=1)))
        tokens = self.proj3(hidden).unflatten(-1, (self.context_tokens, self.output_dim))
        if isinstance(self.norm, nn.LayerNorm):  # in float32, as InfiniteTalk's autocast does
            tokens = F.layer_norm(tokens.float(), self.norm.normalized_shape, self.norm.weight.float(),
                                  self.norm.bias.float(), self.norm.eps).to(tokens.dtype)
        return tokens


class FeedForward(nn.Sequential):
    """The block's FFN, ``Linear -> GELU(tanh) -> Linear``, under the released names ``ffn.0`` / ``ffn.2``.

    On a GPU where talkgen's kernels may run (:func:`_own_kernel_takes`), the first layer's bias and
    GELU run in the epilogue of its cuBLASLt GEMM (``torch._addmm_activation``), so the
    [tokens, 13824] activation is written once instead of written, read and written again by a
    separate bias+GELU kernel (0.66 ms a block at 32,928 tokens). The epilogue computes the tanh
    GELU in float32 on the float32 sum, one rounding to bf16 where the torch path rounds twice.
    Layers converted to fp8 (tensor-subclass weights) keep the plain path.
    """

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self[0], self[2]
        if _gelu_epilogue_takes(x, up):
            hidden = torch._addmm_activation(up.bias, x.flatten(0, -2), up.weight.t(), use_gelu=True)
            return down(hidden.unflatten(0, x.shape[:-1]))
        return super().forward(x)


def _gelu_epilogue_takes(x: torch.Tensor, layer: nn.Module) -> bool:
    """Whether :class:`FeedForward` fuses ``layer``'s bias and GELU into its GEMM: a plain bf16 /
    fp16 ``nn.Linear`` with a bias of x's dtype, where talkgen's kernels may run."""
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    plain = type(layer) is nn.Linear and type(weight) in (torch.Tensor, nn.Parameter) and bias is not None
    return (plain and weight.dtype == x.dtype and bias.dtype == x.dtype and x.dim() >= 2
            and _own_kernel_takes(x, weight, bias))


class DiTBlock(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        c = config
        self.norm1 = LayerNorm32(c.dim, eps=c.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(c.dim, c.num_heads, c.eps)
        self.norm3 = LayerNorm32(c.dim, eps=c.eps, elementwise_affine=True)
        self.cross_attn = ImageTextCrossAttention(c.dim, c.num_heads, c.eps)
        self.norm2 = LayerNorm32(c.dim, eps=c.eps, elementwise_affine=False)
        self.ffn = FeedForward(c.dim, c.ffn_dim)
        self.modulation = nn.Parameter(torch.empty(1, 6, c.dim))
        self.audio_cross_attn = AudioCrossAttention(c.dim, c.output_dim, c.num_heads, c.class_range, c.class_interval)
        self.norm_x = LayerNorm32(c.dim, eps=c.eps, elementwise_affine=True) if c.norm_input_visual else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        text: torch.Tensor,
        image: torch.Tensor,
        audio_tokens: torch.Tensor,
        frames: int,
        person_masks: torch.Tensor | None,
        parallel=None,
        shared: SharedFirstBlock | None = None,
    ) -> torch.Tensor:
        """The block in two halves, each compiled on its own (:func:`talkgen.runtime.compile.compile_blocks`):
        what depends only on the tokens (self-attention), then what depends on the conditions.
        ``shared``: the guidance passes of one step (:class:`SharedFirstBlock`)."""
        if shared is not None:
            x, h, person_map = shared.attend_self(self, x, e0, rope, person_masks, parallel)
        else:
            x, h, person_map = self.attend_self(x, e0, rope, person_masks, parallel)
        return self.attend_context(x, h, e0, text, image, audio_tokens, frames, person_map, parallel)

    def attend_self(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        person_masks: torch.Tensor | None,
        parallel=None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Self-attention and its gated residual: (the residual stream, the cross-attention's
        input, the person map or None)."""
        shift1, scale1, gate1 = (self.modulation[:, :3].float() + e0[:, :3]).chunk(3, dim=1)  # [B,1,C] each
        h = modulated_norm(x, self.norm1, scale1, shift1)
        y, person_map = self.self_attn(h, rope, person_masks, parallel)
        # Each residual add is fused with the LayerNorm after it (add_and_norm): h is the next input.
        x, h = add_and_norm(x, y, self.norm3, gate=gate1)
        return x, h, person_map

    def attend_context(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        e0: torch.Tensor,
        text: torch.Tensor,
        image: torch.Tensor,
        audio_tokens: torch.Tensor,
        frames: int,
        person_map: torch.Tensor | None,
        parallel=None,
    ) -> torch.Tensor:
        """Text / image and audio cross-attention and the FFN, from :meth:`attend_self`'s outputs."""
        shift2, scale2, gate2 = (self.modulation[:, 3:].float() + e0[:, 3:]).chunk(3, dim=1)
        x, h = add_and_norm(x, self.cross_attn(h, text, image), self.norm_x)
        x, h = add_and_norm(x, self.audio_cross_attn(h, audio_tokens, frames, person_map, parallel), self.norm2,
                            scale=scale2, shift=shift2)
        y = self.ffn(h)
        return (x.float() + y.float() * gate2).to(x.dtype)


class SharedFirstBlock:
    """The first block's self-attention, computed once for all guidance passes of a step.

    The passes of one sampling step (cond, drop-text, uncond, ...) differ only in text and audio;
    they give the DiT the same latent, condition video and timestep, so the first block's
    self-attention half (:meth:`DiTBlock.attend_self`) sees the same tokens in each and gives the
    same result. Computing it once saves 2 of the step's 120 self-attentions in a 3-pass step (1 of
    80 with 2 passes); the outputs are the ones an unshared run gives, bit for bit.

    Give one instance to every ``WanMultiTalkDiT.forward`` of one step (``shared=``), never across
    steps or to passes with other latents. The first block it sees is the one it shares. A pass
    takes the saved result when its tokens have the saved shape and it needs no person map the
    saved result lacks; else it computes its own, which is saved in turn. The saved tensors live
    until the instance is dropped.
    """

    def __init__(self) -> None:
        self._block: DiTBlock | None = None
        self._saved: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self.reused = 0  # how many passes took the saved result

    def attend_self(self, block: DiTBlock, x, e0, rope, person_masks, parallel=None):
        if self._block is None:
            self._block = block
        if block is not self._block:
            return block.attend_self(x, e0, rope, person_masks, parallel)
        saved = self._saved
        # Only the same shape: rows of a batch are not bit-identical to the same rows computed alone.
        if saved is not None and saved[0].shape == x.shape and (person_masks is None or saved[2] is not None):
            self.reused += 1
            return saved[0], saved[1], saved[2] if person_masks is not None else None
        self._saved = block.attend_self(x, e0, rope, person_masks, parallel)
        return self._saved


class Head(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        c = config
        self.norm = LayerNorm32(c.dim, eps=c.eps, elementwise_affine=False)
        self.head = nn.Linear(c.dim, math.prod(c.patch_size) * c.out_dim)
        self.modulation = nn.Parameter(torch.empty(1, 2, c.dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        h = self.norm(x).float() * (1 + scale) + shift
        return F.linear(h, self.head.weight.float(), self.head.bias.float())


class ImageProjection(nn.Module):
    def __init__(self, image_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(image_dim), nn.Linear(image_dim, image_dim), nn.GELU(), nn.Linear(image_dim, dim), nn.LayerNorm(dim)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens)


# --------------------------------------------------------------------------------------------
# The model


class WanMultiTalkDiT(nn.Module):
    """Wan2.1 I2V DiT + audio adapter. Build on the meta device and load with
    :func:`talkgen.weights.dit.load_dit`; parameters that stay float32 are listed in
    :meth:`keeps_float32`."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        c = self.config = config
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"), nn.Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, c.dim * 6))
        self.blocks = nn.ModuleList([DiTBlock(c) for _ in range(c.num_layers)])
        self.head = Head(c)
        self.img_emb = ImageProjection(c.image_dim, c.dim)
        self.audio_proj = AudioProjection(c)

    @staticmethod
    def keeps_float32(name: str) -> bool:
        """The timestep path and modulation tables are tiny and precision-sensitive."""
        return name.startswith(("time_embedding.", "time_projection.")) or name.endswith("modulation")

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    # -- conditioning ------------------------------------------------------------------------

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps [B] -> (e [B, C], e0 [B, 6, C]) in float32."""
        weight_dtype = self.time_embedding[0].weight.dtype
        e = self.time_embedding(sinusoidal_embedding(self.config.freq_dim, t).to(weight_dtype)).float()
        e0 = self.time_projection(e.to(weight_dtype)).float().unflatten(1, (6, self.config.dim))
        return e, e0

    def embed_text(self, context: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Text-encoder outputs (unpadded, or padded [B, L, text_dim]) -> [B, text_len, C]."""
        if isinstance(context, torch.Tensor) and context.dim() == 2:
            context = [context]
        rows = [u.to(self.device, self.dtype) for u in context]
        padded = torch.stack([F.pad(u, (0, 0, 0, self.config.text_len - u.shape[0])) for u in rows])
        return self.text_embedding(padded)

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, people, F, window, layers, channels] -> [B, T, people*context_tokens, output_dim]."""
        b, people = audio.shape[:2]
        frames = audio.shape[2]
        if (frames - 1) % self.config.vae_scale:
            raise ValueError(f"audio covers {frames} video frames; it must be 4n+1")
        tokens = self.audio_proj(audio.flatten(0, 1).to(self.device, self.dtype))  # [B*P, T, n, C]
        tokens = tokens.unflatten(0, (b, people))  # [B, P, T, n, C]
        return tokens.permute(0, 2, 1, 3, 4).flatten(2, 3)  # persons side by side on the token axis

    def person_token_masks(self, masks: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[classes, h, w] latent-resolution masks -> [classes, h/2 * w/2] binary token masks."""
        _, gh, gw = grid
        token_masks = F.interpolate(masks[None].float(), size=(gh, gw), mode="nearest")[0] > 0
        return token_masks.flatten(1).to(self.device, self.dtype)

    # -- forward ------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        context: torch.Tensor | list[torch.Tensor],
        clip_fea: torch.Tensor,
        audio: torch.Tensor,
        ref_target_masks: torch.Tensor | None = None,
        block_runner=None,
        parallel=None,
        shared: SharedFirstBlock | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity.

        x: noisy latent [B, 16, T, h, w]; t: timesteps [B] in [0, 1000]; y: condition
        [B, 20, T, h, w]; context: text-encoder outputs (list of [L_i, text_dim] or padded);
        clip_fea: image tokens [B, N, image_dim]; audio: [B, people, F, window, layers, channels];
        ref_target_masks: [3, h, w] person/background masks, used only when people == 2.
        ``block_runner`` (optional) replaces the loop over blocks (caching, offload).
        ``parallel`` (optional, a :class:`talkgen.runtime.parallel.SequenceParallel`): run the blocks
        sequence-parallel over its process group; every rank gets the whole output.
        ``shared`` (optional): one :class:`SharedFirstBlock` for all guidance passes of a step.
        Returns [B, 16, T, h, w] in float32.
        """
        grid, tokens = self.patchify(torch.cat([x, y], dim=1))
        e, e0 = self.embed_time(t.to(self.device).reshape(-1))
        text = self.embed_text(context)
        image = self.img_emb(clip_fea.to(self.device, self.dtype))
        audio_tokens = self.embed_audio(audio)
        people = audio.shape[1]
        person_masks = None
        if people == 2:
            if ref_target_masks is None:
                raise ValueError("two speakers need ref_target_masks")
            person_masks = self.person_token_masks(ref_target_masks, grid)
        elif people != 1:
            raise ValueError(f"{people} audio streams: MultiTalk supports one or two speakers")
        rope = _rope_3d_table(grid, self.config.head_dim, self.device)
        kwargs = dict(e0=e0, rope=rope, text=text, image=image, audio_tokens=audio_tokens,
                      frames=grid[0], person_masks=person_masks)
        plan = None
        if parallel is not None:  # this rank's token shard; the blocks get the plan
            plan = parallel.plan(grid, self.config.num_heads)
            tokens, kwargs["rope"] = plan.shard(tokens), plan.shard_rope(rope)
            kwargs["parallel"] = plan
        if shared is not None:
            kwargs["shared"] = shared
        if block_runner is None:
            for block in self.blocks:
                tokens = block(tokens, **kwargs)
        else:
            tokens = block_runner(self.blocks, tokens, kwargs)
        out = self.head(tokens, e)
        if plan is not None:
            out = plan.gather(out)
        return self.unpatchify(out, grid)

    def patchify(self, latents: torch.Tensor) -> tuple[tuple[int, int, int], torch.Tensor]:
        """[B, 36, T, h, w] -> grid (T, h/2, w/2) and tokens [B, T*h/2*w/2, C]."""
        out = self.patch_embedding(latents.to(self.device, self.dtype))
        grid = tuple(out.shape[2:])
        return grid, out.flatten(2).transpose(1, 2)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, L, prod(patch)*out] -> [B, out, T, h, w]"""
        pt, ph, pw = self.config.patch_size
        b = tokens.shape[0]
        u = tokens.view(b, *grid, pt, ph, pw, self.config.out_dim)
        u = torch.einsum("bfhwpqrc->bcfphqwr", u)
        return u.reshape(b, self.config.out_dim, grid[0] * pt, grid[1] * ph, grid[2] * pw).float()
