"""Memory tiers: where each component's weights live, chosen from the GPU's free memory.

=================  =========================================================================
tier               what is on the GPU
=================  =========================================================================
resident           everything, all the time (the fastest; estimated 58.7 GiB in bf16, 41.4 GiB
                   with fp8, at 480p)
offload-encoders   the DiT; umT5, the image encoder and the VAE come over from pinned host
                   memory only while they run (estimated 47.0 GiB in bf16, 29.7 GiB with fp8)
stream-blocks      the DiT's first N blocks, as many as ``vram_budget_gb`` allows; the others are
                   streamed from pinned host memory through two GPU buffers, the next block's copy
                   overlapping the current block's compute; umT5's layers stream the same way and
                   the VAE decodes in tiles
=================  =========================================================================

``memory="auto"`` (the default) takes the first of resident, offload-encoders and stream-blocks
whose estimated peak fits the limit: ``vram_budget_gb``, or the GPU's free memory when there is no
budget or the budget is larger (a note says so). fp8 is its own switch (:mod:`talkgen.runtime.fp8`,
default on where supported) and applies in every tier. ``memory="fp8"`` is not a tier of its own:
it is offload-encoders with fp8 forced on (an error where the GPU or torchao cannot run fp8 GEMMs).

Settings: ``Pipeline.from_pretrained(memory=..., vram_budget_gb=..., fp8=...)``, the CLI's
``--memory``, ``--vram-budget`` and ``--fp8/--no-fp8``, or ``TALKGEN_MEMORY``,
``TALKGEN_VRAM_BUDGET_GB`` and ``TALKGEN_FP8`` (arguments win over the variables).

The budget is peak GPU memory in GiB (``torch.cuda.max_memory_allocated``), not a parameter
count: the estimate adds the DiT's activations at the 480p bucket (32,928 tokens) and the VAE's
at 448x896. The plan is made at load time, before any request's size is known, so the estimate is
for 480p only: a 720p clip (e.g. 704x1280, 960x960) has about 2.3x the tokens and pixels, hence
about 2.3x the activations (:meth:`MemoryPlan.describe` says so). ``benchmarks/check_tiers.py``
measures the real peaks and the slowdown per tier.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from talkgen.errors import ResourceError

TIERS = ("resident", "offload-encoders", "stream-blocks")
# "fp8": offload-encoders with fp8 forced on (a name kept for the CLI; not a step of "auto")
MEMORY_SETTINGS = ("auto", "resident", "offload-encoders", "fp8", "stream-blocks")
GiB = 2**30
REFERENCE_TOKENS = 32_928  # 448x896, 81 frames: the 480p bucket the estimates are made for
ESTIMATE_SCOPE = "at 480p; a 720p clip needs about 2.3x the activations"
MARGIN = GiB // 2  # allocator slack kept free under the budget


def parse_memory(value: str | None) -> str:
    """A tier name or ``"auto"`` (``None``: ``TALKGEN_MEMORY``, else ``"auto"``)."""
    if value is None:
        value = os.environ.get("TALKGEN_MEMORY", "auto")
    text = str(value).strip().lower().replace("_", "-")
    if text not in MEMORY_SETTINGS:
        raise ResourceError(f"memory = {value!r}: choose one of {', '.join(MEMORY_SETTINGS)} (--memory, TALKGEN_MEMORY).")
    return text


def parse_budget(value: float | str | None) -> float | None:
    """GiB of GPU memory to stay under (``None``: ``TALKGEN_VRAM_BUDGET_GB``, else no budget)."""
    if value is None:
        value = os.environ.get("TALKGEN_VRAM_BUDGET_GB") or None
    if value is None:
        return None
    try:
        budget = float(value)
    except ValueError:
        raise ResourceError(f"vram budget {value!r}: give GiB as a number, e.g. 12 (--vram-budget, TALKGEN_VRAM_BUDGET_GB).") from None
    if budget < 0 or not math.isfinite(budget):
        raise ResourceError(f"vram budget {value!r}: give a positive number of GiB.")
    return budget


# --------------------------------------------------------------------------------------------
# Sizes


@dataclasses.dataclass(frozen=True)
class ModelSizes:
    """Bytes of each component in its run dtype, and of the activations at the 480p bucket."""

    dit_other: int  # everything of the DiT outside the blocks
    dit_block: int  # one block (fp8 or the run dtype, as planned)
    dit_blocks: int  # number of blocks
    text_other: int  # umT5's embedding and final norm
    text_block: int
    text_blocks: int
    image: int
    vae: int
    dit_workspace: int  # activations of one DiT forward at REFERENCE_TOKENS
    vae_workspace: int  # the VAE's activations at 448x896, 81 frames, untiled
    vae_workspace_tiled: int
    vae_encode_workspace: int = 0  # the untiled encode of the condition clip (kept untiled: exact latents)
    runtime_overhead: int = 0  # what stays allocated beside the weights and the streaming buffers (RoPE tables, conditions)

    @property
    def dit(self) -> int:
        return self.dit_other + self.dit_blocks * self.dit_block

    @property
    def text(self) -> int:
        return self.text_other + self.text_blocks * self.text_block


def _bytes(module: nn.Module, dtype: torch.dtype, keep_float32=None) -> int:
    total = 0
    for name, param in module.named_parameters():
        size = 4 if keep_float32 is not None and keep_float32(name) else torch.empty((), dtype=dtype).element_size()
        total += param.numel() * size
    return total


def _fp8_block_bytes(block: nn.Module, dtype: torch.dtype) -> int:
    """A block with its linear weights in e4m3 (1 byte) plus a float32 scale per output row."""
    element = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name, param in block.named_parameters():
        owner = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
        if isinstance(owner, nn.Linear) and name.endswith("weight"):
            total += param.numel() + param.shape[0] * 4
        else:
            total += param.numel() * (4 if name.endswith("modulation") else element)
    return total


def estimate_sizes(tiny: bool = False, dtype: torch.dtype = torch.bfloat16, fp8: bool = False, dit_config=None) -> ModelSizes:
    """Sizes from the model configs, built on the meta device (no memory, about a second)."""
    from talkgen.models.dit import DiTConfig, WanMultiTalkDiT
    from talkgen.models.image_encoder import ImageEncoderConfig
    from talkgen.models.image_encoder import build_model as build_image
    from talkgen.models.text_encoder import TextEncoderConfig
    from talkgen.models.text_encoder import build_model as build_text
    from talkgen.models.vae import VAEConfig

    config = dit_config or (DiTConfig.tiny() if tiny else DiTConfig.wan_i2v_14b())
    with torch.device("meta"):
        dit = WanMultiTalkDiT(config)
        vae = (VAEConfig.tiny() if tiny else VAEConfig.wan21()).build()
    text = build_text(TextEncoderConfig.tiny() if tiny else TextEncoderConfig.umt5_xxl())
    image = build_image(ImageEncoderConfig.tiny() if tiny else ImageEncoderConfig.vit_h_14())
    block = dit.blocks[0]
    dit_block = _fp8_block_bytes(block, dtype) if fp8 else _bytes(block, dtype, WanMultiTalkDiT.keeps_float32)
    dit_other = _bytes(dit, dtype, WanMultiTalkDiT.keeps_float32) - len(dit.blocks) * _bytes(block, dtype, WanMultiTalkDiT.keeps_float32)
    text_block = _bytes(text.encoder.block[0], dtype)
    text_blocks = len(text.encoder.block)
    text_other = _bytes(text, dtype) - text_blocks * text_block
    half = 2 if dtype != torch.float32 else 4
    # DiT activations: the residual stream, norms and modulation in float32, q/k/v, the FFN's
    # hidden layer; about 4 GiB at 32,928 tokens (measured peaks: 3.1 GiB compiled, 4.0 eager). Plus
    # the first block's outputs kept for the step's other guidance passes (SharedFirstBlock: the
    # residual stream and the next LayerNorm's output, 0.63 GiB at 32,928 tokens).
    dit_workspace = REFERENCE_TOKENS * (config.dim * (8 + 2) * half + config.ffn_dim * 2 * half)
    # The VAE (float32) at 448x896: its full-resolution stages hold a few [96, 4, 448, 896] maps;
    # the end-to-end clip peaked 11 GiB above the weights untiled. Tiles of 256x256 px cut that.
    vae_workspace = (11 * GiB) if not tiny else 64 * 2**20
    vae_workspace_tiled = (3 * GiB) if not tiny else 32 * 2**20
    # Measured on an H100 (2026-11-22, 4-step clip in stream-blocks at a 12 GiB budget, each phase's
    # own peak): between phases 6.9 GiB were allocated where the DiT's weights on the device come to
    # 6.1 (0.8 GiB of runtime state beside them); the untiled VAE encode of the 81-frame condition
    # clip rose to 14.2 GiB, 6.8 GiB above that plus the VAE's weights: the largest phase of the tier.
    vae_encode_workspace = int(6.8 * GiB) if not tiny else 64 * 2**20
    # Those 0.8 GiB were measured with umT5's two streaming buffers on the device (allocated at load,
    # kept in every phase: 2 x 0.36 GiB, which the 0.8 matches); estimate_peak counts the buffers on
    # their own, so they are taken out here, leaving the rest (RoPE tables, conditions: ~0.08 GiB).
    runtime_overhead = max(0, int(0.8 * GiB) - 2 * text_block) if not tiny else 0
    return ModelSizes(
        dit_other=dit_other, dit_block=dit_block, dit_blocks=len(dit.blocks), text_other=text_other,
        text_block=text_block, text_blocks=text_blocks, image=_bytes(image, torch.float16), vae=_bytes(vae, torch.float32),
        dit_workspace=dit_workspace, vae_workspace=vae_workspace, vae_workspace_tiled=vae_workspace_tiled,
        vae_encode_workspace=vae_encode_workspace, runtime_overhead=runtime_overhead,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Plans


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    tier: str
    fp8: bool = False
    resident_blocks: int | None = None  # DiT blocks kept on the device (None: all)
    slots: int = 2  # GPU buffers that streamed blocks pass through
    offload_encoders: bool = False
    stream_text: bool = False  # umT5's layers streamed too (stream-blocks)
    vae_tiling: bool = False
    budget_bytes: int | None = None
    estimated_peak: int = 0
    notes: tuple[str, ...] = dataclasses.field(default_factory=tuple)

    def describe(self) -> str:
        parts = [self.tier, "fp8" if self.fp8 else "bf16"]
        if self.tier == "stream-blocks" and self.resident_blocks is not None:
            parts.append(f"{self.resident_blocks} DiT blocks resident")
        if self.vae_tiling:
            parts.append("tiled VAE")
        parts.append(f"estimated peak {self.estimated_peak / GiB:.1f} GiB ({ESTIMATE_SCOPE})")
        if self.budget_bytes is not None:
            parts.append(f"budget {self.budget_bytes / GiB:.1f} GiB")
        return ", ".join(parts)


def estimate_peak(sizes: ModelSizes, tier: str, resident_blocks: int | None = None, slots: int = 2) -> int:
    """The largest of the phases' GPU use (encoding text, encoding the image, VAE, DiT forward),
    at the 480p bucket (see the module's docstring)."""
    s = sizes
    if tier == "resident":
        return s.dit + s.text + s.image + s.vae + max(s.dit_workspace, s.vae_workspace)
    if tier == "offload-encoders":
        return s.dit + max(s.dit_workspace, s.text, s.image, s.vae + s.vae_workspace)
    if tier != "stream-blocks":
        raise ValueError(f"no estimate for tier {tier!r}: one of {', '.join(TIERS)}")
    resident = s.dit_blocks if resident_blocks is None else resident_blocks
    streamed = s.dit_blocks - resident
    dit = s.dit_other + resident * s.dit_block + (min(slots, streamed) if streamed else 0) * s.dit_block
    text_buffers = 2 * s.text_block  # umT5's two streaming buffers: allocated at load, kept in every phase
    text_phase = s.text_other  # umT5's embedding and final norm come over while it runs
    vae_phase = s.vae + max(s.vae_encode_workspace, s.vae_workspace_tiled)  # encode untiled, decode tiled
    return dit + text_buffers + s.runtime_overhead + max(s.dit_workspace, text_phase, s.image, vae_phase)


def resident_blocks_for(sizes: ModelSizes, budget: int, slots: int = 2) -> int:
    """How many DiT blocks stay on the device under ``budget`` in the stream-blocks tier."""
    best = 0
    for resident in range(sizes.dit_blocks + 1):
        if estimate_peak(sizes, "stream-blocks", resident, slots) + MARGIN <= budget:
            best = resident
    return best


def plan_memory(
    setting: str | None,
    budget_gb: float | None,
    *,
    fp8: bool,
    sizes: ModelSizes,
    free_bytes: int | None,
    slots: int = 2,
) -> MemoryPlan:
    """Choose the tier. ``free_bytes``: the device's free memory (``None`` on the CPU, where
    ``"auto"`` means resident and an explicit tier is honoured as it would be on a GPU). The limit
    planned for is the smaller of the budget and the free memory (a budget above what the GPU has
    free is not trusted; a note says so). ``"fp8"`` is offload-encoders with ``fp8`` required."""
    setting = parse_memory(setting)
    budget = None if budget_gb is None else int(budget_gb * GiB)
    notes: list[str] = []
    if budget is not None and free_bytes is not None and budget > free_bytes:
        notes.append(f"the {budget / GiB:.1f} GiB budget is more than the {free_bytes / GiB:.1f} GiB free on the GPU: "
                     f"planned for {free_bytes / GiB:.1f} GiB")
        limit: int | None = free_bytes
    else:
        limit = budget if budget is not None else free_bytes
    if setting == "fp8":
        if not fp8:
            raise ResourceError("memory tier 'fp8' needs fp8 weights: drop --no-fp8 / TALKGEN_FP8=off, or choose another tier.")
        setting = "offload-encoders"  # with fp8 on, which the sizes already reflect

    def make(tier: str) -> MemoryPlan:
        if tier == "stream-blocks":
            resident = sizes.dit_blocks if limit is None else resident_blocks_for(sizes, limit, slots)
            peak = estimate_peak(sizes, tier, resident, slots)
            if limit is not None and peak + MARGIN > limit:
                notes.append(f"even with every DiT block streamed the estimated peak is {peak / GiB:.1f} GiB, "
                             f"over the {limit / GiB:.1f} GiB available")
            return MemoryPlan(tier, fp8, resident, slots, True, True, True, budget, peak, tuple(notes))
        peak = estimate_peak(sizes, tier)
        if limit is not None and peak + MARGIN > limit:
            notes.append(f"tier {tier} is estimated at {peak / GiB:.1f} GiB, over the {limit / GiB:.1f} GiB available")
        return MemoryPlan(tier, fp8, None, slots, tier != "resident", False, False, budget, peak, tuple(notes))

    if setting != "auto":
        return make(setting)
    if limit is None:
        return make("resident")
    for tier in ("resident", "offload-encoders"):
        if estimate_peak(sizes, tier) + MARGIN <= limit:
            return make(tier)
    return make("stream-blocks")


def free_device_memory(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


# --------------------------------------------------------------------------------------------
# Applying a plan


class MemoryManager:
    """What a plan did to the loaded components; the pipeline asks it to bring an encoder to the
    GPU around each use (:meth:`using`). ``trace`` records (on|off, component) for tests and logs."""

    def __init__(self, plan: MemoryPlan, device: torch.device | str):
        from talkgen.runtime.offload import engine_for

        self.plan = plan
        self.device = torch.device(device)
        self.engine = engine_for(self.device)
        self.offloaders: dict[int, object] = {}
        self.streamers: dict[str, object] = {}
        self.trace: list[tuple[str, str]] | None = None

    @contextmanager
    def using(self, component) -> Iterator[None]:
        offloader = self.offloaders.get(id(component)) if component is not None else None
        if offloader is None:
            yield
            return
        if self.trace is not None:
            self.trace.append(("on", offloader.name))
        with offloader.on_device():
            yield
        if self.trace is not None:
            self.trace.append(("off", offloader.name))

    def describe(self) -> str:
        lines = [self.plan.describe()]
        lines += [streamer.describe() for streamer in self.streamers.values()]
        lines += list(self.plan.notes)
        return "; ".join(lines)


def prepare_dit(dit: nn.Module, plan: MemoryPlan, manager: MemoryManager) -> None:
    """Move the DiT to the device per ``plan``: fp8 blocks, streamed blocks, the rest resident."""
    from talkgen.runtime.offload import BlockStreamer

    device = manager.device
    for name, child in dit.named_children():
        if name != "blocks":
            child.to(device)

    def prepare(block: nn.Module) -> None:
        block.to(device)
        if plan.fp8:
            from talkgen.runtime.fp8 import quantize_fp8

            quantize_fp8(block)

    if plan.tier == "stream-blocks":
        resident = len(dit.blocks) if plan.resident_blocks is None else plan.resident_blocks
        manager.streamers["DiT"] = BlockStreamer(dit.blocks, manager.engine, resident, plan.slots, name="DiT", prepare=prepare)
    else:
        for block in dit.blocks:
            prepare(block)


def prepare_encoders(components: dict, plan: MemoryPlan, manager: MemoryManager) -> None:
    """Pinned host copies of the encoders (and VAE) that visit the device only while used."""
    from talkgen.runtime.offload import BlockStreamer, ModuleOffloader

    engine = manager.engine
    text, image, vae = components.get("text_encoder"), components.get("image_encoder"), components.get("vae")
    if not plan.offload_encoders:
        for component in (text, image, vae):
            module = _module_of(component)
            if module is not None:
                module.to(manager.device)
        return
    if text is not None:
        exclude: tuple[str, ...] = ()
        if plan.stream_text and hasattr(text.model, "encoder") and hasattr(text.model.encoder, "block"):
            try:
                manager.streamers["umT5"] = BlockStreamer(text.model.encoder.block, engine, 0, 2, name="umT5")
                exclude = ("encoder.block",)
            except ValueError:  # layers of different shapes: move it whole
                exclude = ()
        manager.offloaders[id(text)] = ModuleOffloader(text.model, engine, exclude=exclude, name="text encoder")
    if image is not None:
        manager.offloaders[id(image)] = ModuleOffloader(image.model, engine, name="image encoder")
    if vae is not None:
        manager.offloaders[id(vae)] = ModuleOffloader(vae, engine, name="VAE")
    if plan.vae_tiling and vae is not None and hasattr(vae, "set_tiling"):
        vae.set_tiling(True)


def _module_of(component) -> nn.Module | None:
    if component is None:
        return None
    if isinstance(component, nn.Module):
        return component
    return getattr(component, "model", None)


def apply_plan(components: dict, plan: MemoryPlan, device: torch.device | str) -> MemoryManager:
    """Apply ``plan`` to loaded components (the DiT on the CPU or the device, the encoders on the
    CPU when they are to be offloaded). Returns the manager the pipeline keeps."""
    manager = MemoryManager(plan, device)
    prepare_dit(components["dit"], plan, manager)
    prepare_encoders(components, plan, manager)
    return manager


def resolve_plan(
    device: torch.device,
    memory: str | None = None,
    vram_budget_gb: float | None = None,
    fp8: bool | str | None = None,
    *,
    tiny: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    dit_config=None,
    dit_only: bool = False,
) -> MemoryPlan:
    """From the arguments (or the ``TALKGEN_*`` variables) and the device to a plan. ``dit_only``:
    for a process that loads the DiT alone (the other ranks of a sequence-parallel pipeline): no
    text or image encoder, VAE or VAE workspace is counted."""
    from talkgen.runtime.fp8 import fp8_unsupported_reason, resolve_fp8

    setting = parse_memory(memory)
    budget = parse_budget(vram_budget_gb)
    if setting == "fp8":
        reason = fp8_unsupported_reason(device)
        if reason is not None:
            raise ResourceError(f"memory tier 'fp8' needs fp8 GEMMs ({reason}); choose offload-encoders or stream-blocks")
    use_fp8 = resolve_fp8("on" if setting == "fp8" and fp8 is None else fp8, device)
    sizes = estimate_sizes(tiny=tiny, dtype=dtype, fp8=use_fp8, dit_config=dit_config)
    if dit_only:
        sizes = dataclasses.replace(sizes, text_other=0, text_block=0, image=0, vae=0, vae_workspace=0,
                                    vae_workspace_tiled=0, vae_encode_workspace=0)
    return plan_memory(setting, budget, fp8=use_fp8, sizes=sizes, free_bytes=free_device_memory(device))
