"""What is on disk: the lock file, streaming hashes, ``talkgen verify`` and ``talkgen info``'s weights list.

``talkgen download`` writes ``DIR/talkgen-lock.json`` with the size and sha256 of every file it
fetched or found already in place (after checking it against the Hub). Everything here works
offline from that file and the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal

from talkgen.errors import WeightsError
from talkgen.weights import manifest
from talkgen.weights.manifest import FileSet, Selection

LOCK_NAME = "talkgen-lock.json"
LOCK_VERSION = 1
CHUNK = 8 * 2**20  # hashing reads this much at a time: memory stays flat for 10 GB files

ByteProgress = Callable[[int], None]  # called with the number of bytes just read


# --- hashing ---------------------------------------------------------------------------------------


def sha256_file(path: Path, progress: ByteProgress | None = None) -> str:
    """sha256 of a file, read in chunks (the Hub's LFS object id for large files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The git blob id of a file: what the Hub reports (as blobId / ETag) for small files kept in git."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- the lock file -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LockEntry:
    """One downloaded file: where it came from and what it must hash to."""

    path: str  # relative to the weights directory, POSIX separators
    set: str  # manifest key
    repo_id: str
    revision: str  # as asked for ("main", "refs/pr/1", a commit)
    commit: str  # what that revision was when the file was fetched
    path_in_repo: str
    size: int
    sha256: str
    selection: dict  # the `talkgen download` options that fetched it, to rebuild the exact command

    def command(self, weights_dir: Path, repair: bool = False) -> str:
        return Selection.from_dict(self.selection).command(weights_dir, repair=repair)


def lock_path(weights_dir: Path) -> Path:
    return Path(weights_dir) / LOCK_NAME


def read_lock(weights_dir: Path) -> dict[str, LockEntry]:
    """The lock's entries by relative path; empty when there is no lock file yet."""
    path = lock_path(weights_dir)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {rel: LockEntry(path=rel, **fields) for rel, fields in data["files"].items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(
            f"{path} is not a talkgen lock file ({type(exc).__name__}: {exc}); delete it and run `talkgen download` "
            "again: files already in place are checked against the Hub and kept."
        ) from exc


def write_lock(weights_dir: Path, entries: dict[str, LockEntry]) -> None:
    """Write atomically: an interrupted download never leaves a half-written lock behind."""
    files = {rel: {k: v for k, v in asdict(e).items() if k != "path"} for rel, e in sorted(entries.items())}
    data = {"version": LOCK_VERSION, "written_by": "talkgen download; checked by talkgen verify", "files": files}
    path = lock_path(weights_dir)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


# --- talkgen verify ----------------------------------------------------------------------------------

Status = Literal["ok", "missing", "size mismatch", "hash mismatch"]


@dataclass(frozen=True)
class FileCheck:
    entry: LockEntry
    status: Status
    actual_size: int | None = None
    actual_sha256: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def describe(self, weights_dir: Path) -> str:
        """One line a person can act on: which file, what is wrong, where it comes from, how to fix it."""
        e = self.entry
        origin = f"{e.path_in_repo} from {e.repo_id} at {e.commit[:12]}"
        if self.status == "ok":
            return f"ok             {e.path} ({human_size(e.size)})"
        if self.status == "missing":
            return f"missing        {e.path} ({origin}); get it with `{e.command(weights_dir)}`"
        if self.status == "size mismatch":
            detail = f"{self.actual_size} bytes, expected {e.size}"
        else:
            detail = f"sha256 {self.actual_sha256}, expected {e.sha256}"
        return f"{self.status}  {e.path}: {detail} ({origin}); replace it with `{e.command(weights_dir, repair=True)}`"


def verify_weights(weights_dir: Path, *, hashes: bool = True, progress: ByteProgress | None = None) -> list[FileCheck]:
    """Re-check every file of the lock: present, right size, and (unless ``hashes=False``) right sha256."""
    weights_dir = Path(weights_dir)
    entries = read_lock(weights_dir)
    if not entries:
        raise WeightsError(
            f"No {LOCK_NAME} in {weights_dir}: it is written by `talkgen download`. Run "
            f"`{manifest.download_command(weights_dir)}` (or the command for your model); files already in "
            "place are checked against the Hub and kept, not downloaded again."
        )
    return [check_file(weights_dir, entry, hashes=hashes, progress=progress) for entry in entries.values()]


def check_file(weights_dir: Path, entry: LockEntry, *, hashes: bool = True,
               progress: ByteProgress | None = None) -> FileCheck:  # fmt: skip
    path = weights_dir / entry.path
    if not path.is_file():
        return FileCheck(entry, "missing")
    size = path.stat().st_size
    if size != entry.size:
        return FileCheck(entry, "size mismatch", actual_size=size)
    if not hashes:
        return FileCheck(entry, "ok", actual_size=size)
    sha256 = sha256_file(path, progress)
    return FileCheck(entry, "ok" if sha256 == entry.sha256 else "hash mismatch", actual_size=size, actual_sha256=sha256)


# --- talkgen info -------------------------------------------------------------------------------------

State = Literal["present", "partial", "missing"]


@dataclass(frozen=True)
class WeightSetStatus:
    """One weight set of the manifest as found in a weights directory."""

    title: str
    repo_id: str
    state: State
    enables: str
    found: int
    expected: int
    missing: tuple[str, ...]  # paths (or patterns) relative to the weights directory
    command: str | None  # the `talkgen download` command that fetches it
    core: bool  # needed by a plain `--model multitalk|infinitetalk` run (the rest are extras)

    def describe(self) -> str:
        line = f"{self.title} ({self.repo_id}): {self.state}"
        if self.state == "partial":
            line += f", {self.found} of {self.expected} files, first missing {self.missing[0]}"
        line += f"; enables {self.enables}"
        if self.state != "present" and self.command:
            line += f"; get it with `{self.command}`"
        return line


def describe_weights(weights_dir: Path, catalog: dict[str, FileSet] | None = None) -> list[WeightSetStatus]:
    """Which weight sets of the manifest are present, partial or missing in ``weights_dir``.

    Works offline: exact file names come from the manifest, names behind patterns (tokenizer files,
    voices) from the lock file when there is one, else from whatever matches on disk.
    """
    weights_dir = Path(weights_dir)
    catalog = manifest.CATALOG if catalog is None else catalog
    locked = read_lock(weights_dir) if weights_dir.is_dir() else {}
    core = {k for m in manifest.MODELS for p in manifest.PEOPLE for k in manifest.set_keys(Selection(m, p))}
    groups: dict[str, list[FileSet]] = {}
    for file_set in catalog.values():
        groups.setdefault(file_set.title, []).append(file_set)
    return [_group_status(weights_dir, sets, locked, catalog, core) for sets in groups.values()]


def _group_status(weights_dir: Path, sets: list[FileSet], locked: dict[str, LockEntry],
                  catalog: dict[str, FileSet], core: set[str]) -> WeightSetStatus:  # fmt: skip
    found, missing = 0, []
    for file_set in sets:
        for item, present in _expected_items(weights_dir, file_set, locked):
            found += present
            if not present:
                missing.append(item)
    expected = found + len(missing)
    state: State = "present" if not missing else "missing" if not found else "partial"
    selection = manifest.selection_for(sets[0].key, catalog)
    return WeightSetStatus(
        title=sets[0].title, repo_id=sets[0].repo_id, state=state, enables=sets[0].enables, found=found,
        expected=expected, missing=tuple(missing), command=selection.command(weights_dir) if selection else None,
        core=any(s.key in core for s in sets),
    )


def _expected_items(weights_dir: Path, file_set: FileSet, locked: dict[str, LockEntry]) -> list[tuple[str, bool]]:
    """(relative path or pattern, present?) for every file of a set."""
    items = [(file_set.local_path(f), (weights_dir / file_set.local_path(f)).is_file()) for f in file_set.exact_files()]
    for pattern in file_set.patterns():
        local_pattern = file_set.local_path(pattern)
        names = [e.path for e in locked.values() if e.set == file_set.key and fnmatchcase(e.path_in_repo, pattern)]
        if names:  # the lock knows exactly which files the pattern stood for
            items += [(name, (weights_dir / name).is_file()) for name in names]
        else:
            items.append((local_pattern, weights_dir.is_dir() and any(weights_dir.glob(local_pattern))))
    return items


def format_weights(statuses: list[WeightSetStatus], *, all_sets: bool = False) -> list[str]:
    """Lines for `talkgen info`: every core set, and extras (quant, LoRA, TTS) only when some file is there."""
    return [s.describe() for s in statuses if all_sets or s.core or s.state != "missing"]


def human_size(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"

