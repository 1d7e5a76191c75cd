"""Stream checkpoint tensors into a model built on the meta device.

Every model in talkgen is constructed on ``torch.device("meta")`` (no memory), then each tensor
of the released files is read on its own, cast to the run dtype and assigned in place. Host RAM
therefore peaks at the model in its run dtype plus one tensor, instead of the reference's fp32
state dict plus a model copy (75-110 GB for the 14B DiT).

Key checks are strict: a missing or unexpected key is a :class:`WeightsError` that names the key,
the file it came from (or should have come from) and the weight set to download.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from talkgen.errors import WeightsError

TensorGetter = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class WeightSet:
    """What a user downloads to get a file: shown in every error about missing weights."""

    name: str
    repo_id: str
    download_command: str

    def advice(self) -> str:
        return f"it belongs to {self.name} ({self.repo_id}); get it with `{self.download_command}`"


@dataclass
class LoadReport:
    """Which file each parameter came from; useful for `talkgen info` and for debugging."""

    source_of: dict[str, str] = field(default_factory=dict)
    overridden: list[str] = field(default_factory=list)


def iter_checkpoint(path: Path) -> Iterator[tuple[str, TensorGetter]]:
    """Yield ``(key, getter)`` for every tensor of a safetensors or torch file, reading lazily.

    Torch files are opened with ``weights_only=True`` (no pickle code runs) and memory-mapped, so
    a multi-GB ``.pth`` is paged in tensor by tensor as well.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Weight file {path} does not exist.")
    if path.suffix == ".safetensors":
        yield from iter_safetensors(path)
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise WeightsError(
            f"{path} could not be read as a torch checkpoint with weights_only=True ({exc}); "
            "talkgen never unpickles code, so download the file again or use its safetensors copy."
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a dict of tensors.")
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            yield key, (lambda value=value: value)


# safetensors dtype names -> torch dtypes (the format's own table; F8 names as torch spells them).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """The header of a safetensors file (``{key: {dtype, shape, data_offsets}}``) and where its data starts."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length <= 0 or 8 + length > size:
                raise ValueError(f"header length {length} does not fit a {size}-byte file")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as exc:  # a truncated or foreign file
        raise WeightsError(f"{path} is not a readable safetensors file ({exc}); download it again.") from exc
    header.pop("__metadata__", None)
    start = 8 + length
    for key, entry in header.items():
        if not _entry_is_consistent(entry) or start + entry["data_offsets"][1] > size:
            raise WeightsError(f"{path}: tensor '{key}' is truncated, of an unknown dtype, or its shape does not "
                               "match its data; download the file again.")
    return header, start


def _entry_is_consistent(entry) -> bool:
    """A header entry names a known dtype, and its shape fills its byte range exactly (as the
    safetensors library checks: a crafted header must not reach the reshape)."""
    try:
        begin, end = (int(v) for v in entry["data_offsets"])
        shape = [int(n) for n in entry["shape"]]
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
    except (KeyError, TypeError, ValueError):
        return False
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 0 <= begin <= end and all(n >= 0 for n in shape) and end - begin == math.prod(shape) * itemsize


def iter_safetensors(path: Path) -> Iterator[tuple[str, TensorGetter]]:
    """``(key, getter)`` for every tensor of a safetensors file, read with plain file reads.

    Not memory-mapped: pages of a mapped file count as the process's resident memory until the
    file is closed, which for a 10 GB float32 shard would add 10 GB to the loader's peak. Each
    getter reads its tensor into a fresh buffer (the file's dtype); the caller casts it and drops it.
    """
    header, start = read_safetensors_header(path)

    def getter(entry: dict) -> torch.Tensor:
        begin, end = entry["data_offsets"]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(start + begin)
            view, done = memoryview(buffer.numpy()), 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise WeightsError(f"{path} ended inside tensor data; download the file again.")
                done += got
        return buffer.view(_SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    for key, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        yield key, (lambda entry=entry: getter(entry))


def iter_files(paths: Sequence[Path]) -> Iterator[tuple[str, TensorGetter, Path]]:
    for path in paths:
        for key, getter in iter_checkpoint(path):
            yield key, getter, Path(path)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:  # pragma: no cover - guarded by the key check
        raise KeyError(name)


def load_streaming(
    model: nn.Module,
    tensors: Iterable[tuple[str, TensorGetter, Path]],
    *,
    weight_set: WeightSet | Callable[[str], WeightSet],
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    rename: Callable[[str], str | None] | None = None,
    keep_float32: Callable[[str], bool] | None = None,
    convert: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    expected_files: str = "the weight files",
) -> LoadReport:
    """Assign every tensor of ``tensors`` into ``model`` (built on meta), strictly.

    ``rename`` maps a file key to the model's parameter name, or ``None`` to skip a key the
    model does not use (e.g. the text tower of the CLIP file). A key that appears again in a
    later file overrides the earlier one: InfiniteTalk's audio file wins on collisions, as in the
    reference. Floating tensors are cast to ``dtype`` on the fly unless ``keep_float32(name)``.
    """
    advice_for = weight_set if callable(weight_set) else (lambda _name: weight_set)
    expected = dict(model.state_dict(keep_vars=True))
    report = LoadReport()
    unexpected: list[tuple[str, Path]] = []
    for key, getter, path in tensors:
        name = rename(key) if rename else key
        if name is None:
            continue
        target = expected.get(name)
        if target is None:
            unexpected.append((key, path))
            continue
        tensor = getter()
        if convert is not None:
            tensor = convert(name, tensor)
        if tuple(tensor.shape) != tuple(target.shape):
            raise WeightsError(
                f"Tensor '{key}' in {path} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(target.shape)}: this file is for a different model size; {advice_for(name).advice()}."
            )
        if tensor.is_floating_point():
            want = torch.float32 if keep_float32 and keep_float32(name) else (dtype or target.dtype)
            tensor = tensor.to(device=device, dtype=want)
        else:
            tensor = tensor.to(device=device)
        if name in report.source_of:
            report.overridden.append(name)
        _assign(model, name, tensor.contiguous())
        report.source_of[name] = str(path)
    if unexpected:
        key, path = unexpected[0]
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise WeightsError(
            f"Unexpected tensor '{key}' in {path}{more}: the file does not match this model; "
            f"{advice_for(key).advice()}."
        )
    missing = sorted(set(expected) - set(report.source_of))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(
            f"Tensor '{missing[0]}'{more} is missing from {expected_files}; {advice_for(missing[0]).advice()}."
        )
    return report


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """Build modules without allocating memory (parameters live on the meta device)."""
    with torch.device("meta"):
        yield


def read_config_json(path: Path) -> dict:
    """A folder's ``config.json`` as a dict, ``{}`` when there is none."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise WeightsError(f"{path} is not valid JSON ({exc}); download it again.") from exc


def safetensors_files(folder: Path, stem: str, weight_set: WeightSet) -> list[Path]:
    """The safetensors files of a transformers/diffusers folder: its index's shards, else ``stem.safetensors``,
    else every ``stem*.safetensors``."""
    folder = Path(folder)
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except ValueError as exc:
            raise WeightsError(f"{index} is not valid JSON ({exc}); {weight_set.advice()}.") from exc
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{missing[0].name} is listed in {index} but is missing; {weight_set.advice()}.")
        if files:
            return files
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    files = sorted(folder.glob(f"{stem}*.safetensors"))
    if not files:
        raise WeightsError(f"No weights ({stem}.safetensors) in {folder}; {weight_set.advice()}.")
    return files
