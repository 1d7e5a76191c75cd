"""Sequence parallelism (Ulysses) of the DiT across the GPUs of one host.

Every rank holds the whole model and the same inputs; :class:`SequenceParallel` splits the video
tokens of each forward into ``world`` equal contiguous shards (the token count padded at the end to
a multiple of ``world``). Per block:

* norms, modulation, q/k/v projections, qk RMSNorm (per token, over the full width), the 3-D RoPE
  (each rank's slice of the global table), image/text cross-attention and the FFN run on the local
  shard: they are per token.
* self-attention: one all-to-all turns the token-sharded q/k/v [B, n, H, D] into head-sharded
  full-sequence tensors [B, H/N, L, D] (padding dropped, so it never enters a softmax); SDPA; one
  all-to-all back. ``heads % world == 0`` is required (40 heads: 2, 4, 5, 8 GPUs).
* the two-speaker person map is computed on those head-sharded full-sequence q/k, so the first
  latent frame's keys are global; its per-rank head mean is all-reduced (summed, divided by N),
  giving every rank the whole map [B, 3, L]. The L-RoPE positions (min/max over ALL tokens) are
  then taken from the whole map and sliced to the local tokens, exactly as on one GPU.
* audio cross-attention (tokens of latent frame t attend only to frame t's audio tokens): a shard
  need not start or end on a frame boundary (448x896x81 has 21 frames of 1568 tokens: 2 GPUs get
  10.5 frames each). Each rank splits its tokens into runs of whole frames, batched as on one GPU,
  plus at most one partial frame at each end, each attending to its own frame's audio tokens
  (the audio tokens are replicated; a rank projects only the frames it touches). Equal shards keep
  the per-token work balanced; frame-aligned uneven shards would cost ~5% on 2 GPUs at 21 frames.
* after the head (per token) the outputs are all-gathered, so every rank returns the whole
  prediction and the sampler runs identically (same noise, same seed) on every rank.

Collectives: ``all_to_all_single`` (NCCL; gloo in recent torch too); ``all_to_all="gather"`` (or
automatically, where the backend raises for all_to_all) emulates it with one ``all_gather``.
The collective-bearing steps run outside ``torch.compile`` (``torch.compiler.disable``), so blocks
compiled with :func:`talkgen.runtime.compile.compile_blocks` keep their fused norms and RoPE.

Use::

    sp = SequenceParallel.from_env()          # under torchrun: NCCL (CUDA) or gloo, device set
    out = model(..., parallel=sp)             # or parallel_forward(model, sp, **inputs)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from talkgen.models.attention import attention
from talkgen.models.dit import compute_person_map, merge_heads, split_heads


class SequenceParallel:
    """A process group over which the DiT's video tokens are sharded (Ulysses degree = world)."""

    def __init__(self, group: dist.ProcessGroup | None = None, all_to_all: str = "auto"):
        if all_to_all not in ("auto", "native", "gather"):
            raise ValueError(f"all_to_all must be auto, native or gather, not {all_to_all!r}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.all_to_all_mode = all_to_all
        self._plans: dict[tuple, ShardPlan] = {}

    @classmethod
    def from_env(cls, backend: str | None = None, all_to_all: str = "auto") -> SequenceParallel:
        """Initialise the default process group from torchrun's environment (idempotent) and,
        on CUDA, bind this process to GPU ``LOCAL_RANK``."""
        if not dist.is_initialized():
            if backend is None:
                backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
                dist.init_process_group(backend, device_id=torch.device("cuda", torch.cuda.current_device()))
            else:
                dist.init_process_group(backend)
        return cls(None, all_to_all)

    def plan(self, grid: tuple[int, int, int], num_heads: int) -> ShardPlan:
        """The token shard of this rank for a (T, h, w) token grid (cached, so compiled code
        guarding on it sees the same object every forward)."""
        key = (tuple(grid), num_heads)
        if key not in self._plans:
            if num_heads % self.world:
                raise ValueError(f"{num_heads} heads cannot be split over {self.world} ranks (Ulysses)")
            t, h, w = grid
            length = t * h * w
            local = -(-length // self.world)
            self._plans[key] = ShardPlan(
                sp=self, frames=t, frame_tokens=h * w, length=length, local=local, start=self.rank * local,
            )
        return self._plans[key]

    # -- collectives (outside torch.compile) ------------------------------------------------------

    @torch.compiler.disable
    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """[world, ...] -> [world, ...]: chunk i goes to rank i; row j of the result came from rank j."""
        x = x.contiguous()
        if self.all_to_all_mode != "gather":
            out = torch.empty_like(x)
            try:
                dist.all_to_all_single(out, x, group=self.group)
                return out
            except (RuntimeError, NotImplementedError):
                if self.all_to_all_mode == "native":
                    raise
                self.all_to_all_mode = "gather"  # the backend has no all_to_all: emulate from now on
        gathered = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(gathered, x, group=self.group)
        return torch.stack([g[self.rank] for g in gathered])

    @torch.compiler.disable
    def all_gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n, ...] on each rank -> [B, world*n, ...] in rank order."""
        gathered = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(gathered, x.contiguous(), group=self.group)
        return torch.cat(gathered, dim=1)

    @torch.compiler.disable
    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x


def frame_segments(start: int, end: int, frame_tokens: int) -> list[tuple[int, int, int, int]]:
    """Split global tokens [start, end) into (token_start, token_end, frame_start, frame_end):
    runs of whole latent frames, and partial frames (one frame each) where a boundary is cut."""
    segments = []
    g = start
    while g < end:
        frame = g // frame_tokens
        frame_start = frame * frame_tokens
        if g == frame_start and end - g >= frame_tokens:
            count = (end - g) // frame_tokens
            segments.append((g, g + count * frame_tokens, frame, frame + count))
            g += count * frame_tokens
        else:
            stop = min(end, frame_start + frame_tokens)
            segments.append((g, stop, frame, frame + 1))
            g = stop
    return segments


@dataclass(eq=False)
class ShardPlan:
    """One rank's slice [start, start+local) of a forward's padded token sequence."""

    sp: SequenceParallel = field(repr=False)
    frames: int
    frame_tokens: int
    length: int  # real tokens T*h*w
    local: int  # tokens per rank (padded length / world)
    start: int

    @property
    def valid(self) -> int:
        """Real (not padding) tokens in this rank's shard."""
        return max(0, min(self.local, self.length - self.start))

    @property
    def padded(self) -> int:
        return self.local * self.sp.world

    def _pad(self, x: torch.Tensor, dim: int, value: float = 0.0) -> torch.Tensor:
        extra = self.padded - x.shape[dim]
        if extra == 0:
            return x
        pad = [0, 0] * (x.dim() - 1 - dim) + [0, extra]
        return F.pad(x, pad, value=value)

    def shard(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, C] -> this rank's [B, local, C] (zero padding at the end of the sequence)."""
        return self._pad(tokens, 1)[:, self.start : self.start + self.local]

    def shard_rope(self, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The global 3-D RoPE table [L, D/2] sliced to this rank's tokens (padding: no rotation)."""
        cos, sin = rope
        cos = self._pad(cos, 0, 1.0)[self.start : self.start + self.local]
        sin = self._pad(sin, 0, 0.0)[self.start : self.start + self.local]
        return cos, sin

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """Per-token outputs [B, local, X] of every rank -> [B, L, X] on every rank."""
        return self.sp.all_gather_tokens(out)[:, : self.length]

    # -- self-attention ----------------------------------------------------------------------------

    def _to_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, H, local, D] (token shard) -> [B, H/N, L, D] (head shard, whole sequence, no padding)."""
        n_ranks = self.sp.world
        b, h, n, d = t.shape
        t = t.transpose(1, 2).reshape(b, n, n_ranks, h // n_ranks, d).movedim(2, 0)  # [N, B, n, H/N, D]
        t = self.sp.all_to_all(t)  # row j: rank j's tokens, my heads
        t = t.permute(1, 3, 0, 2, 4).reshape(b, h // n_ranks, n_ranks * n, d)
        return t[:, :, : self.length]

    def _to_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """[B, H/N, L, D] (head shard) -> [B, local, H*D] (token shard, heads merged in order)."""
        n_ranks = self.sp.world
        b, hl, _, d = t.shape
        t = self._pad(t, 2).reshape(b, hl, n_ranks, self.local, d).permute(2, 0, 3, 1, 4)  # [N, B, n, H/N, D]
        t = self.sp.all_to_all(t)  # row j: my tokens, head group j
        return t.permute(1, 2, 0, 3, 4).reshape(b, self.local, n_ranks * hl * d)

    @torch.compiler.disable
    def self_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, person_masks: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``q``, ``k``, ``v``: [B, H, local, D] after RoPE. Returns the merged-head attention
        output [B, local, H*D] (before ``o``) and the whole person map [B, classes, L] or None."""
        q, k, v = (self._to_heads(t) for t in (q, k, v))
        out = self._to_tokens(attention(q, k, v))
        person_map = None
        if person_masks is not None:
            # mean over this rank's heads; the mean of the N equal-size group means is the mean
            person_map = self.sp.all_reduce_sum(compute_person_map(q, k, person_masks)) / self.sp.world
        return out, person_map

    # -- audio cross-attention ---------------------------------------------------------------------

    @torch.compiler.disable
    def audio_cross_attention(
        self, module, x: torch.Tensor, audio_tokens: torch.Tensor, person_map: torch.Tensor | None
    ) -> torch.Tensor:
        """:class:`AudioCrossAttention` on this rank's tokens ``x`` [B, local, C]: each run of
        whole frames and each partial frame attends to its own frames' audio tokens."""
        b, n, c = x.shape
        heads = module.num_heads
        segments = frame_segments(self.start, self.start + self.valid, self.frame_tokens)
        if not segments:
            return module.proj(torch.zeros_like(x))
        first, last = segments[0][2], segments[-1][3]
        kv = module.kv_linear(audio_tokens[:, first:last].flatten(0, 1))  # [B*F', Na, 2C]
        k, v = (split_heads(part, heads) for part in kv.chunk(2, dim=-1))
        positions = None
        if person_map is not None:
            positions = module._token_positions(person_map)  # [B, L]: min/max over the whole clip
            k = module._rotate_audio(k)
        k, v = (t.unflatten(0, (b, last - first)) for t in (k, v))  # [B, F', H, Na, D]
        q_all = module.q_linear(x)
        outs = []
        for g0, g1, f0, f1 in segments:
            count = f1 - f0
            q = split_heads(q_all[:, g0 - self.start : g1 - self.start].reshape(b * count, -1, c), heads)
            if positions is not None:
                q = module._rotate_video(q, positions[:, g0:g1])
            ks, vs = (t[:, f0 - first : f1 - first].flatten(0, 1) for t in (k, v))
            outs.append(merge_heads(attention(q, ks, vs)).reshape(b, g1 - g0, c))
        out = torch.cat(outs, dim=1)
        if out.shape[1] < n:  # padding tokens at the end of the last shard
            out = F.pad(out, (0, 0, 0, n - out.shape[1]))
        return module.proj(out)


def parallel_forward(model, sp: SequenceParallel, **inputs) -> torch.Tensor:
    """``model(**inputs)`` run sequence-parallel over ``sp``; every rank gets the whole output."""
    return model(**inputs, parallel=sp)
