"""``talkgen download``: fetch exactly the files a selection needs from the Hub, resumably.

How, with huggingface_hub doing the HTTP (token, HF_ENDPOINT, offline mode, retries, progress bars):

1. one ``HfApi.model_info(repo, revision, files_metadata=True)`` per repo and revision gives the
   commit and every file's size and hash (LFS sha256, or git blob id for small files). That
   expands the manifest's patterns and sizes the free-disk check before a byte is downloaded;
2. a file already in place with the Hub's size and hash is kept, never rewritten; one that differs
   is left alone and reported, unless ``repair=True``;
3. every other file: a HEAD on ``resolve/<commit>/<path>`` (``get_hf_file_metadata``) says where the
   bytes are, and ``file_download.http_get`` streams them into
   ``DIR/.talkgen-partial/<path>.<hash>.incomplete``, resuming with a ``Range`` request from whatever
   an earlier run left there. The sha256 is checked, the file is moved into place and added to
   ``DIR/talkgen-lock.json``.

Why not ``hf_hub_download``/``snapshot_download``: in huggingface_hub 2.4 they download into a
process-unique temporary file and delete it when the download fails or is interrupted, so they
resume only within one call (``http_get`` retries a dropped connection with ``Range``); a 10 GB
file stopped at 9 GB starts again from zero on the next run (tests/test_weights_download.py keeps
a test of that). Here the partial file outlives the run, named after the hash it must reach so it
is never spliced onto other content. The ``resolve`` URL serves every file over plain HTTPS,
Xet-stored ones included (it is what browsers and huggingface_hub without ``hf_xet`` use), so
no Xet client is needed; a faster Xet transfer would lose the cross-run resume.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx2
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import WeakFileLock, build_hf_headers

from talkgen.errors import ResourceError, WeightsError
from talkgen.weights import manifest
from talkgen.weights.manifest import FileSet, Selection
from talkgen.weights.verify import LockEntry, git_blob_sha1, human_size, read_lock, sha256_file, write_lock

PARTIAL_DIR = ".talkgen-partial"

Reporter = Callable[[str], None]


def _quiet(_message: str) -> None:
    pass


@dataclass(frozen=True)
class RemoteFile:
    """One file of the Hub, pinned to a commit, with what it must hash to."""

    file_set: FileSet
    revision: str  # as the manifest asks for it
    commit: str
    repo_path: str
    size: int
    sha256: str | None  # LFS files: the object id is the content's sha256
    git_sha1: str | None  # small files kept in git: the blob id

    @property
    def local_path(self) -> str:
        return self.file_set.local_path(self.repo_path)

    @property
    def origin(self) -> str:
        return f"{self.repo_path} from {self.file_set.repo_id}"


@dataclass
class DownloadResult:
    downloaded: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # one sentence each
    needed_bytes: int = 0
    free_bytes: int = 0


def hub_endpoint(endpoint: str | None = None) -> str:
    """HF_ENDPOINT read now rather than at import, so a mirror set later (or by a test) is honoured."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def is_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


def download_weights(
    selection: Selection,
    weights_dir: Path,
    *,
    catalog: dict[str, FileSet] | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    repair: bool = False,
    dry_run: bool = False,
    report: Reporter = _quiet,
    tqdm_class: type | None = None,
) -> DownloadResult:
    """Bring ``weights_dir`` to the files ``selection`` needs; see the module docstring for how.

    ``token=None`` lets huggingface_hub use HF_TOKEN (or a saved login). Raises WeightsError
    (offline, no access, interrupted: run again to resume), ResourceError (disk space) or
    InputError (a combination nobody released).
    """
    weights_dir = Path(weights_dir).expanduser().absolute()
    plan = manifest.plan(selection, catalog)
    if is_offline():
        raise WeightsError(
            f"HF_HUB_OFFLINE is set, so `{selection.command(weights_dir)}` cannot reach the Hub; nothing was "
            f"downloaded. Unset HF_HUB_OFFLINE, or copy the files into {weights_dir} and run "
            f"`talkgen verify --dir {weights_dir}`."
        )
    endpoint = hub_endpoint(endpoint)
    locked = read_lock(weights_dir) if weights_dir.is_dir() else {}
    report(f"asking {endpoint} for the file lists of {len({s.repo_id for s in plan})} repositories")
    remote = resolve_files(plan, endpoint=endpoint, token=token, pinned=_pins(locked))

    result = DownloadResult()
    to_fetch = _triage(remote, weights_dir, locked, result, selection, repair=repair, hash_existing=not dry_run,
                       report=report)  # fmt: skip
    result.needed_bytes = sum(f.size - _partial_size(weights_dir, f) for f in to_fetch)
    result.free_bytes = free_space(weights_dir)
    report(f"{len(to_fetch)} files to download ({human_size(result.needed_bytes)}), {len(result.kept)} already "
           f"in place; {human_size(result.free_bytes)} free in {weights_dir}")  # fmt: skip
    if dry_run:
        result.downloaded = [f.local_path for f in to_fetch]
        return result
    check_free_space(weights_dir, result.needed_bytes, len(to_fetch))

    weights_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(weights_dir):
        write_lock(weights_dir, locked)  # records the files kept above even if a download below fails
        for i, remote_file in enumerate(to_fetch, 1):
            report(f"[{i}/{len(to_fetch)}] {remote_file.local_path} ({human_size(remote_file.size)}) "
                   f"from {remote_file.file_set.repo_id}")  # fmt: skip
            sha256 = fetch_file(remote_file, weights_dir, endpoint=endpoint, token=token, tqdm_class=tqdm_class)
            locked[remote_file.local_path] = _lock_entry(remote_file, sha256, selection)
            write_lock(weights_dir, locked)
            result.downloaded.append(remote_file.local_path)
    if result.conflicts:
        raise WeightsError(
            f"{len(result.conflicts)} file(s) in {weights_dir} differ from the Hub's and were left untouched: "
            f"{'; '.join(result.conflicts)}. Delete them, or replace them with "
            f"`{selection.command(weights_dir, repair=True)}`."
        )
    return result


# --- what the Hub has ----------------------------------------------------------------------------------


def resolve_files(plan: list[FileSet], *, endpoint: str, token: str | None,
                  pinned: dict[tuple[str, str], str] | None = None) -> list[RemoteFile]:  # fmt: skip
    """Every file the plan needs, with size and hash, from one listing per repo and revision.

    ``pinned`` maps (repo, revision) to the commit an earlier download used, so a directory is
    completed from the same commit it was started with.
    """
    pinned = pinned or {}
    api = HfApi(endpoint=endpoint, token=token)
    listings: dict[tuple[str, str], tuple[str, dict]] = {}
    files: list[RemoteFile] = []
    for file_set in plan:
        key = (file_set.repo_id, file_set.revision)
        if key not in listings:
            listings[key] = _list_repo(api, file_set.repo_id, pinned.get(key, file_set.revision), endpoint)
        commit, siblings = listings[key]
        chosen, absent = file_set.expand(sorted(siblings))
        if absent:
            raise WeightsError(
                f"{file_set.repo_id} at {commit[:12]} has no {absent[0]}: the talkgen manifest "
                f"(talkgen/weights/manifest.py, set '{file_set.key}') does not match the repository any more."
            )
        files += [_remote_file(file_set, commit, siblings[path]) for path in chosen]
    return files


def _list_repo(api: HfApi, repo_id: str, revision: str, endpoint: str) -> tuple[str, dict]:
    with hub_errors(f"{repo_id} (revision {revision})", endpoint):
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    return info.sha, {s.rfilename: s for s in info.siblings or []}


def _remote_file(file_set: FileSet, commit: str, sibling) -> RemoteFile:
    lfs = sibling.lfs
    return RemoteFile(
        file_set=file_set, revision=file_set.revision, commit=commit, repo_path=sibling.rfilename,
        size=lfs.size if lfs else sibling.size, sha256=lfs.sha256 if lfs else None,
        git_sha1=None if lfs else sibling.blob_id,
    )


@contextlib.contextmanager
def hub_errors(what: str, endpoint: str) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one sentence that says what to do."""
    try:
        yield
    except GatedRepoError as exc:
        raise WeightsError(f"{what} is gated on {endpoint}: accept its terms on the Hub page with your account, "
                           "then set HF_TOKEN to a token of that account.") from exc  # fmt: skip
    except RepositoryNotFoundError as exc:
        raise WeightsError(f"{what} was not found on {endpoint}, or it is private and HF_TOKEN is missing or has "
                           "no access to it.") from exc  # fmt: skip
    except RevisionNotFoundError as exc:
        raise WeightsError(f"{what}: no such revision on {endpoint}.") from exc
    except OfflineModeIsEnabled as exc:
        raise WeightsError(f"HF_HUB_OFFLINE is set, so {what} cannot be fetched; unset it.") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        hint = " (check HF_TOKEN)" if status in (401, 403) else ""
        raise WeightsError(f"{endpoint} refused {what}: HTTP {status}{hint}.") from exc
    except (httpx2.HTTPError, OSError) as exc:
        raise WeightsError(f"Cannot reach {endpoint} for {what} ({type(exc).__name__}: {exc}); check the network, "
                           "or HF_ENDPOINT if you use a mirror.") from exc  # fmt: skip


# --- what is already here ------------------------------------------------------------------------------


def _pins(locked: dict[str, LockEntry]) -> dict[tuple[str, str], str]:
    return {(e.repo_id, e.revision): e.commit for e in locked.values()}


def _triage(remote: list[RemoteFile], weights_dir: Path, locked: dict[str, LockEntry], result: DownloadResult,
            selection: Selection, *, repair: bool, hash_existing: bool,
            report: Reporter) -> list[RemoteFile]:  # fmt: skip
    """Split into files to fetch, files kept (recorded in ``locked``) and conflicts (in ``result``)."""
    to_fetch = []
    for remote_file in remote:
        entry = locked.get(remote_file.local_path)
        problem, sha256 = _existing_problem(remote_file, weights_dir, entry, hash_existing, repair, report)
        if problem is None:
            if sha256 is not None:  # hashed just now: the lock learns of it
                locked[remote_file.local_path] = _lock_entry(remote_file, sha256, selection)
            result.kept.append(remote_file.local_path)
            continue
        if problem != "absent":
            if not repair:
                result.conflicts.append(f"{remote_file.local_path} ({problem}; it is {remote_file.origin})")
                continue
            report(f"{remote_file.local_path}: {problem}; downloading it again (--repair)")
        to_fetch.append(remote_file)
    return to_fetch


def _existing_problem(remote: RemoteFile, weights_dir: Path, entry: LockEntry | None, hash_existing: bool,
                      repair: bool, report: Reporter) -> tuple[str | None, str | None]:  # fmt: skip
    """(what is wrong with the file in place, or None if it is the Hub's; its sha256 if hashed here)."""
    target = weights_dir / remote.local_path
    if not target.exists():
        return "absent", None
    if not target.is_file():
        return "not a regular file", None
    size = target.stat().st_size
    if size != remote.size:
        return f"{size} bytes, the Hub's file has {remote.size}", None
    trusted = entry is not None and entry.size == size and remote.sha256 is not None and entry.sha256 == remote.sha256
    if (trusted and not repair) or not hash_existing:
        return None, None  # hashed when it was written; `talkgen verify` (or --repair) re-hashes
    report(f"checking {remote.local_path} ({human_size(size)}), already there, against the Hub's hash")
    sha256 = sha256_file(target)
    if remote.sha256 is not None and sha256 != remote.sha256:
        return f"sha256 {sha256[:12]}..., the Hub's file has {remote.sha256[:12]}...", sha256
    if remote.sha256 is None and remote.git_sha1 is not None and git_blob_sha1(target) != remote.git_sha1:
        return f"content differs from the Hub's (git blob {remote.git_sha1[:12]}...)", sha256
    return None, sha256


def _lock_entry(remote: RemoteFile, sha256: str, selection: Selection) -> LockEntry:
    return LockEntry(
        path=remote.local_path, set=remote.file_set.key, repo_id=remote.file_set.repo_id, revision=remote.revision,
        commit=remote.commit, path_in_repo=remote.repo_path, size=remote.size, sha256=sha256,
        selection=selection.to_dict(),
    )


# --- disk space ----------------------------------------------------------------------------------------


def free_space(weights_dir: Path) -> int:
    """Free bytes where ``weights_dir`` is, or will be created."""
    probe = Path(weights_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_free_space(weights_dir: Path, needed: int, files: int) -> None:
    free = free_space(weights_dir)
    if needed > free:
        raise ResourceError(
            f"Downloading {files} file(s) needs {human_size(needed)} ({needed} bytes) in {weights_dir}, but only "
            f"{human_size(free)} ({free} bytes) is free; free {human_size(needed - free)} more or choose another --dir."
        )


# --- one file ------------------------------------------------------------------------------------------


def partial_path(weights_dir: Path, remote: RemoteFile) -> Path:
    """Where a file grows while it downloads; the expected hash in the name keeps versions apart."""
    tag = (remote.sha256 or remote.git_sha1 or remote.commit)[:16]
    return weights_dir / PARTIAL_DIR / f"{remote.local_path}.{tag}.incomplete"


def _partial_size(weights_dir: Path, remote: RemoteFile) -> int:
    path = partial_path(weights_dir, remote)
    size = path.stat().st_size if path.is_file() else 0
    return size if size <= remote.size else 0


def fetch_file(remote: RemoteFile, weights_dir: Path, *, endpoint: str, token: str | None,
               tqdm_class: type | None = None) -> str:  # fmt: skip
    """Download one file (resuming a partial one), check its hash, move it into place; its sha256."""
    partial = partial_path(weights_dir, remote)
    partial.parent.mkdir(parents=True, exist_ok=True)
    for stale in partial.parent.glob(f"{Path(remote.local_path).name}.*.incomplete"):
        if stale != partial:  # left by a download of another version of this file
            stale.unlink()
    if _partial_size(weights_dir, remote) == 0:
        partial.unlink(missing_ok=True)
    url = hf_hub_url(remote.file_set.repo_id, remote.repo_path, revision=remote.commit, endpoint=endpoint)
    with hub_errors(remote.origin, endpoint):
        location = urljoin(url, get_hf_file_metadata(url, token=token, endpoint=endpoint).location)
    headers = build_hf_headers(token=token)
    if _origin(location) != _origin(url):
        headers.pop("authorization", None)  # a signed CDN address: the token stays with the Hub
    start = partial.stat().st_size if partial.exists() else 0
    try:
        with open(partial, "ab") as f:
            http_get(location, f, resume_size=start, headers=headers, expected_size=remote.size,
                     displayed_filename=remote.local_path, tqdm_class=tqdm_class)  # fmt: skip
    except (httpx2.HTTPError, OSError) as exc:  # HfHubHTTPError is both
        have = partial.stat().st_size if partial.exists() else 0
        raise WeightsError(
            f"Downloading {remote.local_path} ({remote.origin}) stopped at {have} of {remote.size} bytes "
            f"({type(exc).__name__}: {exc}); run the same command again: it resumes from there."
        ) from exc
    sha256 = _check_hash(partial, remote)
    target = weights_dir / remote.local_path
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, target)
    return sha256


def _check_hash(path: Path, remote: RemoteFile) -> str:
    sha256 = sha256_file(path)
    bad = (remote.sha256 is not None and sha256 != remote.sha256) or (
        remote.sha256 is None and remote.git_sha1 is not None and git_blob_sha1(path) != remote.git_sha1
    )
    if bad:
        path.unlink()
        raise WeightsError(
            f"{remote.local_path} ({remote.origin}) arrived corrupted: its hash does not match the Hub's. "
            "The partial file was deleted; run the same command again."
        )
    return sha256


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


@contextlib.contextmanager
def _exclusive(weights_dir: Path) -> Iterator[None]:
    """One download per directory at a time: two would append to the same partial files."""
    lock_file = weights_dir / PARTIAL_DIR / "download.lock"
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = WeakFileLock(lock_file, timeout=1)
    try:
        lock.__enter__()
    except TimeoutError:  # filelock.Timeout
        raise WeightsError(f"Another `talkgen download` is writing to {weights_dir}; wait for it to finish.") from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)
        lock_file.unlink(missing_ok=True)
        _remove_empty_dirs(lock_file.parent)


def _remove_empty_dirs(root: Path) -> None:
    """Remove ``root`` and the folders under it that hold nothing (partial files are kept)."""
    for directory in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            directory.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()
