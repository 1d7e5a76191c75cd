"""Weights that live in pinned host memory and visit the GPU only while they are used.

Two mechanisms, both free of host synchronisation once set up:

* :class:`BlockStreamer` keeps the first ``resident`` blocks of a stack of identical blocks (the
  DiT's 40, umT5's 24) on the GPU and streams the others through ``slots`` GPU buffers. After a
  streamed block has been *enqueued*, the copy of the block that will next use its buffer is
  enqueued on a side stream, ordered by CUDA events: the copy waits for the event recorded after
  the buffer's last reader, and the block waits for the event recorded after its copy. The host
  only ever enqueues, so copies run under the compute of the blocks in between.
* :class:`ModuleOffloader` moves a whole module (an encoder, the VAE) to the GPU for the time it
  is used (:meth:`ModuleOffloader.on_device`) and drops the GPU copy afterwards.

Each streamed block (or offloaded module) is laid out in one flat byte buffer (:class:`Layout`):
one host buffer per block, registered with CUDA as page-locked memory at its exact size (the
caching pinned allocator would round a 0.93 GB block up to 1 GiB), and one device buffer per slot.
A block's copy is one ``cudaMemcpyAsync``. The block's parameters are views into its slot's
buffer, bound once: the forward (compiled or not) sees the same tensors every call, so weight
movement stays outside the compiled region, in forward hooks. Tensor subclasses such as torchao's
``Float8Tensor`` are laid out by their inner tensors, so fp8 blocks stream the same way.

The device side is an :class:`Engine`: :class:`CudaEngine` on a GPU (side stream, events, pinned
memory), :class:`HostEngine` on the CPU (synchronous copies), which is how the tests run the same
code on a machine without a GPU. The only host synchronisation is :meth:`HostEngine.synchronize`,
called when an owner of registered host memory is collected (never while blocks run).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

ALIGN = 256  # bytes: every tensor starts on a boundary good for any dtype and for DMA


# --------------------------------------------------------------------------------------------
# Devices


class HostEngine:
    """Synchronous stand-in for a GPU: "device" buffers are ordinary CPU tensors and copies run
    at once. Events are plain records, so the order of operations can be checked in tests."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.log: list[tuple] | None = None  # set to [] to record (op, ...) tuples

    def _note(self, *entry) -> None:
        if self.log is not None:
            self.log.append(entry)

    def host_buffer(self, nbytes: int, owner: object = None) -> torch.Tensor:
        """``nbytes`` of host memory that ``owner`` keeps (on a GPU: page-locked while it lives)."""
        return torch.empty(nbytes, dtype=torch.uint8)

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def synchronize(self) -> None:
        """Block the host until every copy enqueued so far has finished (teardown only)."""
        self._note("synchronize")

    def event(self, name: str = "") -> object:
        return _Event(name)

    def record(self, event) -> None:
        """Record ``event`` on the compute stream (after the work enqueued so far)."""
        self._note("record", event.name)

    def wait(self, event) -> None:
        """Make the compute stream wait for ``event``."""
        self._note("wait", event.name)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, *, after, done, label: str = "") -> None:
        """Copy ``src`` into ``dst`` on the copy stream once ``after`` has happened; record ``done``."""
        self._note("copy", label, None if after is None else after.name, done.name)
        dst.copy_(src)


@dataclass
class _Event:
    name: str


class CudaEngine(HostEngine):
    """A CUDA device with a side stream for host-to-device copies."""

    def __init__(self, device: torch.device | str = "cuda"):
        super().__init__(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)

    def host_buffer(self, nbytes: int, owner: object = None) -> torch.Tensor:
        return pinned_buffer(nbytes, owner, synchronize=self.synchronize)

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        buffer.record_stream(self.stream)  # written on the copy stream: keep the allocator aware
        return buffer

    def event(self, name: str = ""):
        return torch.cuda.Event()

    def record(self, event) -> None:
        event.record(torch.cuda.current_stream(self.device))

    def wait(self, event) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, *, after, done, label: str = "") -> None:
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            else:  # a fresh buffer may be memory the compute stream freed with work still queued on it
                self.stream.wait_stream(compute)
            dst.copy_(src, non_blocking=True)
            done.record(self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()  # every copy from host memory runs on this stream


def engine_for(device: torch.device | str) -> HostEngine:
    device = torch.device(device)
    return CudaEngine(device) if device.type == "cuda" else HostEngine(device)


def pinned_buffer(nbytes: int, owner: object = None, synchronize=None) -> torch.Tensor:
    """``nbytes`` of page-locked host memory, registered at its exact size for as long as ``owner``
    lives: when ``owner`` is collected, ``synchronize`` (which waits for every copy that may read
    the buffer) runs, then the memory is unregistered and the buffer let go. Without an owner, or
    where registering fails, the caching pinned allocator's memory (freed with the tensor)."""
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes == 0:
        return buffer
    if owner is None:
        return buffer.pin_memory()
    try:
        status = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 1))  # 1: portable
    except (AttributeError, RuntimeError):
        status = -1
    if status != 0:  # registering failed (or is unavailable): the caching pinned allocator instead
        return buffer.pin_memory()
    # The finalizer holds the buffer itself, so the memory stays allocated (and registered) until
    # the owner is gone, however the views into it come and go; it must not reference the owner.
    finalizer = weakref.finalize(owner, _unregister, buffer, synchronize)
    finalizer.atexit = False  # at interpreter exit the process's memory goes anyway
    return buffer


def _unregister(buffer: torch.Tensor, synchronize) -> None:
    """Unregister ``buffer``'s page-locked memory once no copy from it can be in flight; the
    buffer is then let go. Where that cannot be made sure, the buffer is kept for good."""
    try:
        if synchronize is not None:
            synchronize()
        status = int(torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr()))
    except (AttributeError, RuntimeError):
        status = -1
    if status != 0:
        _KEPT.append(buffer)


_KEPT: list[torch.Tensor] = []  # registered buffers whose release failed: never freed while possibly in use


# --------------------------------------------------------------------------------------------
# Flat layouts of a module's tensors


def inner_tensors(tensor: torch.Tensor, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], torch.Tensor]]:
    """The plain tensors a tensor is made of: itself, or a subclass's inner tensors (recursively)."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            yield from inner_tensors(getattr(tensor, name), path + (name,))
    else:
        yield path, tensor


def _rebuild(template: torch.Tensor, views: dict[tuple[str, ...], torch.Tensor], path: tuple[str, ...] = ()) -> torch.Tensor:
    """``template`` with its plain tensors replaced by ``views`` (same subclass structure)."""
    if is_traceable_wrapper_subclass(template):
        names, context = template.__tensor_flatten__()
        inner = {name: _rebuild(getattr(template, name), views, path + (name,)) for name in names}
        return type(template).__tensor_unflatten__(inner, context, template.size(), template.stride())
    return views[path]


def _span_bytes(tensor: torch.Tensor) -> int:
    if tensor.numel() == 0:
        return 0
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return span * tensor.element_size()


@dataclass(frozen=True)
class _Slot:
    """One tensor of a module: where it sits in the flat buffer, per inner plain tensor."""

    module: str  # owner module's qualified name ("" for the root)
    name: str  # attribute name in the owner's _parameters or _buffers
    is_param: bool
    requires_grad: bool
    template: torch.Tensor  # the original tensor (for the subclass structure); not kept on device
    pieces: tuple[tuple[tuple[str, ...], int, torch.dtype, tuple[int, ...], tuple[int, ...], int], ...]
    # (inner path, byte offset, dtype, shape, stride, span bytes)


class Layout:
    """Where every parameter and buffer of ``module`` (except those under ``exclude`` prefixes)
    sits in one flat, 256-byte-aligned byte buffer."""

    def __init__(self, module: nn.Module, exclude: Sequence[str] = ()):
        slots, offset = [], 0
        for owner_name, owner in module.named_modules():
            if any(owner_name == p or owner_name.startswith(p + ".") for p in exclude):
                continue
            for is_param, table in ((True, owner._parameters), (False, owner._buffers)):
                for name, tensor in table.items():
                    if tensor is None:
                        continue
                    pieces = []
                    for path, leaf in inner_tensors(tensor):
                        nbytes = _span_bytes(leaf)
                        pieces.append((path, offset, leaf.dtype, tuple(leaf.shape), tuple(leaf.stride()), nbytes))
                        offset += math.ceil(nbytes / ALIGN) * ALIGN
                    slots.append(_Slot(owner_name, name, is_param, bool(tensor.requires_grad), _meta_like(tensor), tuple(pieces)))
        self.slots: tuple[_Slot, ...] = tuple(slots)
        self.nbytes = offset

    def signature(self) -> tuple:
        """Equal for modules whose tensors can share one buffer layout (identical blocks)."""
        return tuple((s.module, s.name, tuple(p[1:] for p in s.pieces)) for s in self.slots)

    def structure(self) -> tuple:
        """The tensors' names and shapes only (equal before a ``prepare`` that casts or quantizes
        identical blocks alike)."""
        return tuple((s.module, s.name, s.is_param, tuple((p[0], p[3]) for p in s.pieces)) for s in self.slots)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor of the layout as a view into ``flat`` (subclasses rebuilt around the views)."""
        out = []
        for slot in self.slots:
            views = {}
            for path, offset, dtype, shape, stride, nbytes in slot.pieces:
                raw = flat[offset : offset + nbytes]
                typed = raw.view(dtype) if nbytes else torch.empty(0, dtype=dtype, device=flat.device)
                views[path] = typed.as_strided(shape, stride)
            out.append(_rebuild(slot.template, views))
        return out

    @torch.no_grad()
    def pack(self, module: nn.Module, flat: torch.Tensor) -> None:
        """Copy ``module``'s current tensors into ``flat`` (host or device) at their places."""
        for slot, view in zip(self.slots, self.views(flat)):
            for (_, dst), (_, src) in zip(inner_tensors(view), inner_tensors(_lookup(module, slot))):
                dst.copy_(src)

    def bind(self, module: nn.Module, flat: torch.Tensor) -> None:
        """Make ``module``'s parameters and buffers views into ``flat``."""
        for slot, view in zip(self.slots, self.views(flat)):
            owner = module.get_submodule(slot.module) if slot.module else module
            if slot.is_param:
                owner._parameters[slot.name] = nn.Parameter(view, requires_grad=slot.requires_grad)
            else:
                owner._buffers[slot.name] = view


def _lookup(module: nn.Module, slot: _Slot) -> torch.Tensor:
    owner = module.get_submodule(slot.module) if slot.module else module
    return (owner._parameters if slot.is_param else owner._buffers)[slot.name]


def _meta_like(tensor: torch.Tensor) -> torch.Tensor:
    """A structural template of ``tensor`` that holds no memory on the device (subclasses keep
    their outer metadata; their inner tensors are replaced on every rebuild anyway)."""
    meta = {path: torch.empty_strided(leaf.shape, leaf.stride(), dtype=leaf.dtype, device="meta")
            for path, leaf in inner_tensors(tensor)}
    return _rebuild(tensor, meta)


# --------------------------------------------------------------------------------------------
# Whole modules on the device only while used


class ModuleOffloader:
    """Keep ``module``'s weights in pinned host memory; :meth:`on_device` brings them to the GPU
    (one copy) for the duration of a ``with`` block. ``exclude``: submodules left alone (e.g. a
    block stack that a :class:`BlockStreamer` handles)."""

    def __init__(self, module: nn.Module, engine: HostEngine, exclude: Sequence[str] = (), name: str = ""):
        self.module, self.engine, self.name = module, engine, name or type(module).__name__
        self.layout = Layout(module, exclude)
        self.host = engine.host_buffer(self.layout.nbytes, owner=self)  # pinned while this offloader lives
        self.layout.pack(module, self.host)
        self.layout.bind(module, self.host)  # the originals (on whatever device) are released
        self._ready = engine.event(f"{self.name}:ready")
        self.depth = 0
        self.device_flat: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def onload(self) -> None:
        flat = self.engine.device_buffer(self.layout.nbytes)
        self.engine.copy(flat, self.host, after=None, done=self._ready, label=self.name)
        self.engine.wait(self._ready)
        self.layout.bind(self.module, flat)
        self.device_flat = flat

    def offload(self) -> None:
        self.layout.bind(self.module, self.host)
        self.device_flat = None  # its memory goes back to the allocator, in stream order

    @contextmanager
    def on_device(self) -> Iterator[nn.Module]:
        if self.depth == 0:
            self.onload()
        self.depth += 1
        try:
            yield self.module
        finally:
            self.depth -= 1
            if self.depth == 0:
                self.offload()


# --------------------------------------------------------------------------------------------
# Streaming a stack of identical blocks


class BlockStreamer:
    """Blocks ``0 .. resident-1`` stay on the device; the others stream through ``slots`` buffers.

    Streamed block ``i`` (counted among the streamed ones) always uses buffer ``i % slots``; the
    number of streamed blocks is a multiple of ``slots`` (one more block is streamed when needed),
    so the order of use is cyclic across forwards: after streamed block ``i`` is enqueued, the
    copy of block ``(i + slots) % streamed`` into the same buffer is enqueued behind it, and the
    first blocks of the next forward arrive while the last ones of this forward run.

    Blocks must be called in order, as a forward does; a block called out of turn (a forward
    broken off by an error) is fetched on the spot, still without a host sync.
    """

    def __init__(self, blocks: nn.ModuleList, engine: HostEngine, resident: int, slots: int = 2, name: str = "blocks",
                 prepare=None):
        n = len(blocks)
        resident = max(0, min(int(resident), n))
        streamed = n - resident
        slots = max(1, min(int(slots), streamed // 2 if streamed >= 2 else 1))
        if streamed % slots:  # stream a few more so the buffers are used cyclically
            extra = slots - streamed % slots
            if streamed + extra <= n:
                resident -= extra
                streamed += extra
            else:
                slots = 1
        self.blocks, self.engine, self.name = blocks, engine, name
        self.resident = list(range(resident))
        self.streamed = list(range(resident, n))
        self.num_slots = slots if self.streamed else 0
        self.hosts: list[torch.Tensor] = []
        self.buffers: list[torch.Tensor] = []
        self.layout: Layout | None = None
        self._handles = []
        # 1. Every streamed block's layout, compared before anything is moved or rebound: a stack
        #    whose blocks differ (T5's first layer has the relative-attention bias) is refused with
        #    every block as it was, so the caller can fall back to moving the stack whole.
        self._check_identical([Layout(blocks[index]) for index in self.streamed], first=resident, key=Layout.structure)
        # 2. Block by block, so the device never holds more than the resident blocks and the block
        #    in hand (``prepare``, e.g. to the GPU and to fp8, runs on each block first): a streamed
        #    block is packed into its host buffer and bound to it (still whole and valid there).
        layouts = []
        for index, block in enumerate(blocks):
            if prepare is not None:
                prepare(block)
            if index < resident:
                block.to(engine.device)
                continue
            layout = Layout(block)
            host = engine.host_buffer(layout.nbytes, owner=self)  # pinned while this streamer lives
            layout.pack(block, host)
            layout.bind(block, host)
            layouts.append(layout)
            self.hosts.append(host)
        if not self.streamed:
            return
        # ``prepare`` kept them identical (if not: refused, each block still whole in its host buffer)
        self._check_identical(layouts, first=resident, key=Layout.signature)
        # 3. Only now the slot buffers, and the blocks' tensors become views of them: from here on
        #    the host copy is a block's only other copy (the first fetches fill the buffers below).
        self.layout = layouts[0]
        self.buffers = [engine.device_buffer(self.layout.nbytes) for _ in range(self.num_slots)]
        for i, index in enumerate(self.streamed):
            self.layout.bind(blocks[index], self.buffers[i % self.num_slots])
        self.ready = [engine.event(f"{name}:ready{s}") for s in range(self.num_slots)]
        self.free = [engine.event(f"{name}:free{s}") for s in range(self.num_slots)]
        self.holds: list[int | None] = [None] * self.num_slots  # which streamed block each buffer holds (or is getting)
        self._freed = [False] * self.num_slots  # whether free[s] has been recorded since the buffer was filled
        for i in range(self.num_slots):
            self._fetch(i)
        for i, index in enumerate(self.streamed):
            block = blocks[index]
            self._handles.append(block.register_forward_pre_hook(lambda _m, _a, i=i: self._before(i)))
            self._handles.append(block.register_forward_hook(lambda _m, _a, _o, i=i: self._after(i)))

    def _check_identical(self, layouts: list[Layout], first: int, key) -> None:
        for offset, layout in enumerate(layouts[1:], start=1):
            if key(layout) != key(layouts[0]):
                raise ValueError(f"{self.name}: block {first + offset} differs in shape from block {first}; "
                                 "only identical blocks stream")

    # -- accounting --------------------------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        return self.layout.nbytes if self.layout is not None else 0

    @property
    def device_bytes(self) -> int:
        """Bytes of the stack on the device: resident blocks plus the buffers."""
        resident = sum(_module_bytes(self.blocks[i]) for i in self.resident)
        return resident + self.num_slots * self.block_bytes

    @property
    def host_bytes(self) -> int:
        return len(self.hosts) * self.block_bytes

    def describe(self) -> str:
        return (f"{self.name}: {len(self.resident)} resident, {len(self.streamed)} streamed through "
                f"{self.num_slots} buffers of {self.block_bytes / 2**30:.2f} GiB")

    # -- the copies --------------------------------------------------------------------------

    def _fetch(self, i: int) -> None:
        """Enqueue the copy of streamed block ``i`` into its buffer, after the buffer's last reader."""
        slot = i % self.num_slots
        after = self.free[slot] if self._freed[slot] else None
        self.engine.copy(self.buffers[slot], self.hosts[i], after=after, done=self.ready[slot],
                         label=f"{self.name}:{self.streamed[i]}->slot{slot}")
        self.holds[slot] = i
        self._freed[slot] = False

    def _before(self, i: int) -> None:
        slot = i % self.num_slots
        if self.holds[slot] != i:  # out of turn: fetch it now
            self._fetch(i)
        self.engine.wait(self.ready[slot])

    def _after(self, i: int) -> None:
        slot = i % self.num_slots
        self.engine.record(self.free[slot])
        self._freed[slot] = True
        following = (i + self.num_slots) % len(self.streamed)
        if following != i:
            self._fetch(following)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _module_bytes(module: nn.Module) -> int:
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        total += sum(leaf.numel() * leaf.element_size() for _, leaf in inner_tensors(tensor))
    return total
