"""Sequence parallelism (Ulysses) of the DiT across the GPUs of one host.

Every rank holds the whole model; :class:`SequenceParallel` splits the video tokens of each
forward into ``world`` equal contiguous shards (the token count padded at the end to a multiple
of ``world``). Per block:

* norms, modulation, q/k/v projections, qk RMSNorm (per token, over the full width), the 3-D RoPE
  (each rank's slice of the global table), image/text cross-attention and the FFN run on the local
  shard: they are per token.
* self-attention: q, k and v travel together, stacked in one buffer, from token-sharded
  [B, n, H, D] to head-sharded full-sequence [B, H/N, L, D] (padding dropped, so it never enters a
  softmax); SDPA; back. The local heads go in ``chunks`` groups, each group's all-to-all issued at
  once, asynchronously: group g+1 is in flight while group g is attended, and group g's output
  travels back while group g+1 is attended, so only the first group's inbound and the last one's
  outbound traffic is not hidden behind attention. ``exchange="p2p"`` does the same with batched
  sends and receives that land in the layout attention reads and leave from the one it writes
  (fewer copies than reshaping all-to-all buffers). ``heads % world == 0`` is required (40 heads:
  2, 4, 5, 8 GPUs).
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
  It runs outside the compiled block (see :meth:`ShardPlan.audio_cross_attention`).
* after the head (per token) the outputs are all-gathered (8 MB at 448x896x81), so every rank
  returns the whole prediction.

Collectives: ``all_to_all_single`` (NCCL; gloo in recent torch too); ``all_to_all="gather"`` (or
automatically, where the backend raises for all_to_all) emulates it with one ``all_gather``.
The self-attention exchange runs outside ``torch.compile`` (``torch.compiler.disable``), so blocks
compiled with :func:`talkgen.runtime.compile.compile_blocks` keep their fused norms and RoPE.

The pipeline's side (:class:`ParallelDiT`): only rank 0 runs the pipeline (encoders, sampler,
VAE, mp4). Each DiT call there sends its inputs to the other ranks, which wait in
:meth:`ParallelDiT.follow` and run their shard of that forward; so the encoders and the VAE run
once, and the other ranks need no request, only the DiT.

Use::

    sp = SequenceParallel.from_env()          # under torchrun: NCCL (CUDA) or gloo, device set
    out = model(..., parallel=sp)             # every rank, same inputs; or, from a pipeline:
    pipe = Pipeline.from_pretrained(weights, parallel=sp)   # see talkgen.runtime.launch
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from talkgen.models.attention import attention
from talkgen.models.dit import compute_person_map, merge_heads, split_heads

# Head groups per rank whose all-to-alls overlap attention (TALKGEN_SP_CHUNKS overrides).
DEFAULT_CHUNKS = 2
# How q/k/v reach the head-sharded layout: "all_to_all" (one all_to_all_single per head group,
# buffers reshaped on arrival) or "p2p" (batched send/recv straight into the layout attention
# reads, and from the layout it writes: fewer copies). TALKGEN_SP_EXCHANGE overrides.
EXCHANGES = ("all_to_all", "p2p")
# Ranks other than 0 may wait for rank 0's next call for as long as a worker is idle.
CONTROL_TIMEOUT = timedelta(days=365)


class SequenceParallel:
    """A process group over which the DiT's video tokens are sharded (Ulysses degree = world).

    ``chunks``: head groups per rank in the self-attention exchange (1: one exchange for q, k
    and v, none overlapped; the effective count is the largest divisor of the heads per rank
    not above it). ``exchange``: ``"all_to_all"`` or ``"p2p"`` (:data:`EXCHANGES`). Creating one
    is collective (it makes a gloo group for control messages)."""

    def __init__(self, group: dist.ProcessGroup | None = None, all_to_all: str = "auto", chunks: int | None = None,
                 exchange: str | None = None):
        if all_to_all not in ("auto", "native", "gather"):
            raise ValueError(f"all_to_all must be auto, native or gather, not {all_to_all!r}")
        exchange = exchange or os.environ.get("TALKGEN_SP_EXCHANGE", "all_to_all")
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {', '.join(EXCHANGES)}, not {exchange!r}")
        self.exchange = exchange
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.all_to_all_mode = all_to_all
        self.chunks = max(1, int(chunks if chunks is not None else os.environ.get("TALKGEN_SP_CHUNKS", DEFAULT_CHUNKS)))
        self.source = 0 if group is None else dist.get_global_rank(group, 0)  # rank 0 of the group
        ranks = None if group is None else dist.get_process_group_ranks(group)
        # one host: gloo over loopback, whatever the host name resolves to
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        self.control = dist.new_group(ranks, backend="gloo", timeout=CONTROL_TIMEOUT)
        self._plans: dict[tuple, ShardPlan] = {}

    @classmethod
    def from_env(cls, backend: str | None = None, all_to_all: str = "auto", chunks: int | None = None,
                 high_priority: bool = True, exchange: str | None = None) -> SequenceParallel:
        """Initialise the default process group from torchrun's environment (idempotent) and,
        on CUDA, bind this process to GPU ``LOCAL_RANK``. ``high_priority``: NCCL kernels on
        high-priority streams, so an all-to-all gets SMs while attention runs."""
        if not dist.is_initialized():
            if backend is None:
                backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
                options = None
                if high_priority and hasattr(dist, "ProcessGroupNCCL"):
                    options = dist.ProcessGroupNCCL.Options()
                    options.is_high_priority_stream = True
                dist.init_process_group(backend, pg_options=options,
                                        device_id=torch.device("cuda", torch.cuda.current_device()))
            else:
                dist.init_process_group(backend)
        return cls(None, all_to_all, chunks, exchange)

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
            heads = num_heads // self.world
            groups = max(g for g in range(1, min(self.chunks, heads) + 1) if heads % g == 0)
            self._plans[key] = ShardPlan(
                sp=self, frames=t, frame_tokens=h * w, length=length, local=local, start=self.rank * local,
                head_groups=groups,
            )
        return self._plans[key]

    def barrier(self) -> None:
        dist.barrier(group=self.control)

    # -- collectives (outside torch.compile) ------------------------------------------------------

    def all_to_all_into(self, out: torch.Tensor, x: torch.Tensor):
        """Start ``out <- all_to_all(x)`` on [world, ...] tensors (chunk i goes to rank i; row j of
        ``out`` comes from rank j). Returns a handle to ``wait()`` on, or None when it is done."""
        if self.all_to_all_mode != "gather":
            try:
                return dist.all_to_all_single(out, x, group=self.group, async_op=True)
            except (RuntimeError, NotImplementedError):
                if self.all_to_all_mode == "native":
                    raise
                self.all_to_all_mode = "gather"  # the backend has no all_to_all: emulate from now on
        gathered = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(gathered, x, group=self.group)
        torch.stack([g[self.rank] for g in gathered], out=out)
        return None

    def send_receive(self, sends: list[tuple[torch.Tensor, int]], receives: list[tuple[torch.Tensor, int]]) -> list:
        """Start point-to-point sends and receives ((tensor, rank in the group) each) as one
        batch; returns the handles to ``wait()`` on. Between two ranks, both sides list their
        messages in the same order."""
        def peer(rank: int) -> int:
            return rank if self.group is None else dist.get_global_rank(self.group, rank)

        ops = [dist.P2POp(dist.isend, t, peer(r), self.group) for t, r in sends]
        ops += [dist.P2POp(dist.irecv, t, peer(r), self.group) for t, r in receives]
        return dist.batch_isend_irecv(ops) if ops else []

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
    head_groups: int = 1  # chunks of the self-attention exchange

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

    @torch.compiler.disable
    def self_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, person_masks: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``q``, ``k``, ``v``: [B, H, local, D] after RoPE. Returns the merged-head attention
        output [B, local, H*D] (before ``o``) and the whole person map [B, classes, L] or None.

        Heads are numbered (rank r, group g, head i): rank r attends heads r*H/N .. (r+1)*H/N - 1,
        in ``head_groups`` groups of ``hg``."""
        sp, n_ranks, groups = self.sp, self.sp.world, self.head_groups
        b, h, n, d = q.shape
        hg = h // (n_ranks * groups)
        # [B, H, n, D] -> send [G, N, 3, B, n, hg, D]: group g's block is contiguous, row r to rank r
        send = q.new_empty(groups, n_ranks, 3, b, n, hg, d)
        for i, t in enumerate((q, k, v)):
            send[:, :, i].copy_(t.unflatten(1, (n_ranks, groups, hg)).permute(2, 1, 0, 4, 3, 5))
        if sp.exchange == "p2p":
            return self._exchange_p2p(send, person_masks)
        received = torch.empty_like(send)  # [G, N (source rank: its tokens), 3, B, n, hg, D]
        inbound = [sp.all_to_all_into(received[g], send[g]) for g in range(groups)]

        back = q.new_empty(groups, n_ranks, b, n, hg, d)  # [G, N (destination rank), B, n, hg, D]
        result = torch.empty_like(back)  # [G, N (head rank), B, n, hg, D]
        outbound, person_sum = [], None
        for g in range(groups):
            if inbound[g] is not None:
                inbound[g].wait()
            # [N, B, n, hg, D] -> [B, hg, N*n, D], padding dropped
            qg, kg, vg = (received[g, :, i].permute(1, 3, 0, 2, 4).reshape(b, hg, n_ranks * n, d)[:, :, : self.length]
                          for i in range(3))
            out = self._pad(attention(qg, kg, vg), 2)  # [B, hg, N*n, D]
            back[g].copy_(out.unflatten(2, (n_ranks, n)).permute(2, 0, 3, 1, 4))
            outbound.append(sp.all_to_all_into(result[g], back[g]))
            person_sum = self._add_person_map(person_sum, qg, kg, person_masks)
        for handle in outbound:
            if handle is not None:
                handle.wait()
        return self._merge(result, person_sum)

    @staticmethod
    def _add_person_map(person_sum: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                        person_masks: torch.Tensor | None) -> torch.Tensor | None:
        """``person_sum`` plus the person map (head mean) of one head group [B, hg, L, D]; None
        without masks."""
        if person_masks is None:
            return None
        mass = compute_person_map(q, k, person_masks)
        return mass if person_sum is None else person_sum + mass

    def _merge(self, result: torch.Tensor, person_sum: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The end of both exchanges: ``result`` [G, N (head rank), B, n, hg, D] -> [B, n, (N, G, hg) * D]
        (heads back in order), and the whole person map from the per-group sums (all-reduced)."""
        groups, n_ranks, b, n, hg, d = result.shape
        out = result.permute(2, 3, 1, 0, 4, 5).reshape(b, n, n_ranks * groups * hg * d)
        person_map = None
        if person_sum is not None:
            # the mean of the N * G equal-size group means is the mean over all heads
            person_map = self.sp.all_reduce_sum(person_sum) / (n_ranks * groups)
        return out, person_map

    def _exchange_p2p(self, send: torch.Tensor, person_masks: torch.Tensor | None):
        """:meth:`self_attention` with batched sends and receives: each rank's real tokens land
        straight in [G, 3, B, L, hg, D] (the [B, L, H, D] layout the projections give, which
        attention reads through transposed views, as on one GPU), and the output goes back from
        the layout attention writes. ``send``: [G, N, 3, B, n, hg, D]."""
        sp, n_ranks, groups, me = self.sp, self.sp.world, self.head_groups, self.sp.rank
        _, _, _, b, n, hg, d = send.shape
        counts = [max(0, min(n, self.length - j * n)) for j in range(n_ranks)]  # real tokens of rank j
        rows = [slice(j * n, j * n + counts[j]) for j in range(n_ranks)]
        peers = [j for j in range(n_ranks) if j != me]
        received = send.new_empty(groups, 3, b, self.length, hg, d)
        received[:, :, :, rows[me]] = send[:, me, :, :, : counts[me]]
        inbound = []
        for g in range(groups):
            sends = [(send[g, j, i, s, : counts[me]], j) for j in peers if counts[me] for i in range(3) for s in range(b)]
            receives = [(received[g, i, s, rows[j]], j) for j in peers if counts[j] for i in range(3) for s in range(b)]
            inbound.append(sp.send_receive(sends, receives))

        result = send.new_empty(groups, n_ranks, b, n, hg, d)  # [G, N (head rank), B, n, hg, D]
        if counts[me] < n:
            result[:, :, :, counts[me] :] = 0  # padding tokens
        outbound, keep, person_sum = [], [], None
        for g in range(groups):
            for handle in inbound[g]:
                handle.wait()
            qg, kg, vg = (received[g, i].transpose(1, 2) for i in range(3))  # [B, hg, L, D] views
            tokens = attention(qg, kg, vg).transpose(1, 2)  # [B, L, hg, D]
            result[g, me, :, : counts[me]] = tokens[:, rows[me]]
            pieces = [(tokens[s, rows[j]].contiguous(), j) for j in peers if counts[j] for s in range(b)]
            keep.append(pieces)  # alive until sent
            outbound.append(sp.send_receive(pieces, [(result[g, j, s, : counts[me]], j)
                                                     for j in peers if counts[me] for s in range(b)]))
            person_sum = self._add_person_map(person_sum, qg, kg, person_masks)
        for handles in outbound:
            for handle in handles:
                handle.wait()
        return self._merge(result, person_sum)

    # -- audio cross-attention ---------------------------------------------------------------------

    # Eager on purpose: traced into the compiled block it was no faster on 2x H200 (1.79x vs
    # 1.78x per NFE) and Inductor's different fusion of the shard doubled the distance to one
    # GPU's compiled output (rel err 1.8e-2 vs 9.2e-3; eager vs eager is bit-identical).
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


# ------------------------------------------------------------------------------------------------
# The pipeline's DiT: rank 0 leads, the other ranks follow


_ALIGN = 16  # bytes: every tensor of a packed message starts aligned for its dtype


def pack_tensors(values: dict, device: torch.device) -> tuple[dict, torch.Tensor]:
    """``{name: tensor | list of tensors | None}`` -> (layout, one uint8 buffer on ``device``)."""
    layout, parts = {}, []

    def add(t: torch.Tensor) -> tuple:
        flat = t.detach().to(device).contiguous().reshape(-1).view(torch.uint8)
        parts.append(F.pad(flat, (0, -flat.numel() % _ALIGN)))
        return tuple(t.shape), t.dtype

    for name, value in values.items():
        if value is None:
            layout[name] = None
        elif isinstance(value, (list, tuple)):
            layout[name] = [add(t) for t in value]
        else:
            layout[name] = add(value)
    buffer = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=device)
    return layout, buffer


def unpack_tensors(layout: dict, buffer: torch.Tensor) -> dict:
    offset = 0

    def take(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        nonlocal offset
        size = torch.Size(shape).numel() * dtype.itemsize
        t = buffer[offset : offset + size].view(dtype).reshape(shape)
        offset += size + (-size % _ALIGN)
        return t

    return {name: None if spec is None else [take(*s) for s in spec] if isinstance(spec, list) else take(*spec)
            for name, spec in layout.items()}


def buffer_size(layout: dict) -> int:
    specs = [s for spec in layout.values() if spec is not None for s in (spec if isinstance(spec, list) else [spec])]
    sizes = (torch.Size(shape).numel() * dtype.itemsize for shape, dtype in specs)
    return sum(size + (-size % _ALIGN) for size in sizes)


class ParallelError(RuntimeError):
    """The ranks of a sequence-parallel DiT are out of step (an error inside a forward)."""


_INSTANCES: weakref.WeakSet = weakref.WeakSet()


class ParallelDiT:
    """The DiT of a sequence-parallel pipeline.

    On rank 0 (the leader) it is called like the model. Each call first sends the call's inputs
    (one small pickled header over a gloo control group, then one byte buffer over the data
    group: about 35 MB a forward at 448x896x81, against a forward of seconds), then runs this
    rank's shard; the other ranks (followers) wait in :meth:`follow` and run their shards of the
    same forward. A TeaCache ``block_runner`` is mirrored: every follower keeps a TeaCache of the
    same settings, and every skip decision is agreed by all ranks (:func:`any_rank`).
    :meth:`done` ends one piece of work (``follow`` returns with the leader's result) and
    :meth:`close` lets the followers go for good; :func:`release_all` pairs the two sides at exit.
    """

    def __init__(self, dit, sp: SequenceParallel):
        heads = dit.config.num_heads
        if heads % sp.world:
            from talkgen.errors import InputError

            usable = ", ".join(str(n) for n in range(2, heads + 1) if heads % n == 0 and n <= 16)
            raise InputError(f"{sp.world} GPUs cannot share the DiT's {heads} attention heads equally; use {usable}.")
        self.dit = dit
        self.sp = sp
        self._lock = threading.Lock()
        self._cache_keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._counter = itertools.count()
        self._caches: dict[int, object] = {}  # follower: the leader's TeaCache key -> its mirror
        self.closed = False
        self.broken: str | None = None
        _INSTANCES.add(self)

    @property
    def leads(self) -> bool:
        return self.sp.rank == 0

    @property
    def device(self) -> torch.device:
        return self.dit.device

    # -- leader -----------------------------------------------------------------------------------

    def __call__(self, x, t, y, context, clip_fea, audio, ref_target_masks=None, block_runner=None) -> torch.Tensor:
        if not self.leads:
            raise RuntimeError("only rank 0 calls the sequence-parallel DiT; the other ranks follow()")
        teacache = self._describe(block_runner)
        inputs = dict(x=x, t=t, y=y, context=list(context) if isinstance(context, (list, tuple)) else context,
                      clip_fea=clip_fea, audio=audio, ref_target_masks=ref_target_masks)
        with self._lock:
            self._check()
            layout, buffer = pack_tensors(inputs, self.device)
            self._send(("forward", {"layout": layout, "teacache": teacache}))
            dist.broadcast(buffer, src=self.sp.source, group=self.sp.group)
            if teacache is not None:  # its decisions agreed with the followers'
                block_runner.teacache[0].agree = any_rank(self.sp.control)
            try:
                return self.dit(**inputs, block_runner=block_runner, parallel=self.sp)
            except BaseException as exc:
                # the other ranks may be waiting inside this forward's collectives
                self.broken = f"{type(exc).__name__}: {exc}"
                raise

    def done(self, result: dict | None = None, error: BaseException | None = None) -> None:
        """End of one piece of work: the followers' :meth:`follow` returns ``("done", payload)``."""
        payload = {"result": result}
        if error is not None:
            payload = {"error": type(error).__name__, "message": str(error)}
        with self._lock:
            if self.closed or self.broken:
                return
            self._send(("done", payload))

    def close(self) -> None:
        """Let the followers go (their :meth:`follow` returns ``("close", None)``); idempotent."""
        with self._lock:
            if self.closed or self.broken:
                return
            self.closed = True
            self._send(("close", None))

    def _check(self) -> None:
        if self.broken:
            raise ParallelError(f"an earlier DiT forward failed on rank 0 ({self.broken}); the GPUs are out "
                                "of step: restart the process")
        if self.closed:
            raise ParallelError("the other ranks were released (close()); no more forwards can run")

    def _send(self, message) -> None:
        dist.broadcast_object_list([message], src=self.sp.source, group=self.sp.control)

    def _describe(self, block_runner) -> tuple | None:
        """What a follower needs to mirror a TeaCache runner (``runner.teacache = (cache, names, step)``)."""
        if block_runner is None:
            return None
        spec = getattr(block_runner, "teacache", None)
        if spec is None:
            raise ValueError("a sequence-parallel DiT mirrors TeaCache runners only (a block runner "
                             "without its .teacache = (cache, names, step))")
        cache, names, step = spec
        key = self._cache_keys.setdefault(cache, next(self._counter))
        return (key, cache.steps, cache.thresh, cache.tier, cache.use_ret_steps, tuple(names), step)

    # -- followers --------------------------------------------------------------------------------

    def follow(self) -> tuple[str, dict | None]:
        """Run this rank's shard of every forward rank 0 makes, until it calls :meth:`done`
        (returns ``("done", payload)``) or :meth:`close` (``("close", None)``)."""
        if self.leads:
            raise RuntimeError("rank 0 leads; the other ranks follow()")
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=self.sp.source, group=self.sp.control)
            kind, payload = message[0]
            if kind != "forward":
                self.closed = kind == "close"
                return kind, payload
            try:
                buffer = torch.empty(buffer_size(payload["layout"]), dtype=torch.uint8, device=self.device)
                dist.broadcast(buffer, src=self.sp.source, group=self.sp.group)
                inputs = unpack_tensors(payload["layout"], buffer)
                with torch.no_grad():
                    self.dit(**inputs, block_runner=self._mirror(payload["teacache"]), parallel=self.sp)
            except BaseException as exc:
                self.broken = f"{type(exc).__name__}: {exc}"
                raise

    def release(self) -> None:
        """At exit, both sides: the leader sends ``close`` and a follower that has not had it yet
        takes it, so no message is left unread. Nothing once either side is broken."""
        if self.leads:
            self.close()
            return
        while not (self.closed or self.broken):
            self.follow()

    def _mirror(self, spec: tuple | None):
        if spec is None:
            return None
        from talkgen.sampling.teacache import TeaCache

        key, steps, thresh, tier, use_ret_steps, names, step = spec
        if key not in self._caches:  # a new chunk's cache: the previous one is finished
            self._caches = {key: TeaCache(steps, thresh, tier=tier, use_ret_steps=use_ret_steps)}
            self._caches[key].agree = any_rank(self.sp.control)
        return self._caches[key].runner(names, step)


def any_rank(group: dist.ProcessGroup) -> Callable[[bool], bool]:
    """``agree(flag)``: whether any rank of ``group`` (the gloo control group) passed True; a MAX
    all-reduce of one integer, on the CPU."""

    def agree(flag: bool) -> bool:
        value = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        return bool(value.item())

    return agree


def release_all() -> None:
    """:meth:`ParallelDiT.release` for every one in this process (at exit)."""
    for instance in list(_INSTANCES):
        try:
            instance.release()
        except Exception:  # the group may already be gone
            pass
