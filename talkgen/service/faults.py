"""What a worker does when something breaks under it, and the switch that breaks it on purpose.

- **Storing results** (:func:`store_result`): a write that fails because the storage does not
  answer (S3 stopped, a network blip) is tried again, ``TALKGEN_STORAGE_TRIES`` times with a
  doubling wait; then the job fails with a sentence naming the storage and what to check. A full
  disk is not retried (waiting frees no space).
- **Failures people can act on** (:func:`failure_reason`): out of GPU memory and a full disk end
  the job with advice instead of a stack trace; the worker releases its memory and takes the next
  job.
- **Temporary files** (:func:`temp_prefix`, :func:`sweep_stale_temp`): every job and upload works
  in its own temporary folder, removed when it ends; folders of processes that were killed
  (``kill -9`` runs no cleanup) are removed by the next worker or server that starts on the machine.
- **Fault injection** (``TALKGEN_FAULTS``, for the reliability tests; empty in production):
  comma-separated ``ACTION@POINT[:SECONDS][~TEXT]``. ``POINT`` is a stage the worker's progress
  callback sees (``audio``, ``text``, ``image``, ``condition``, ``sample``, ``decode``, ``write``)
  or ``upload`` (storing the result). ``ACTION`` is ``delay`` (sleep ``SECONDS``, to widen a window
  a test aims a ``kill -9`` at), ``oom`` (raise ``torch.OutOfMemoryError`` as CUDA does) or
  ``enospc`` (raise ``OSError(ENOSPC)`` as a full disk does). ``~TEXT`` limits the fault to jobs
  whose prompt contains ``TEXT``.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from talkgen.errors import InputError, ResourceError, TalkgenError

log = logging.getLogger("talkgen.service.faults")

ACTIONS = ("delay", "oom", "enospc")
POINTS = ("audio", "text", "image", "condition", "sample", "decode", "write", "upload")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
FAULT = re.compile(r"(?P<action>[a-z]+)@(?P<point>[a-z]+)(?::(?P<seconds>[0-9.]+))?(?:~(?P<match>.+))?")


# ------------------------------------------------------------------------------------------------
# Fault injection


@dataclass(frozen=True)
class Fault:
    action: str
    point: str
    seconds: float = 0.0
    match: str = ""


def parse_faults(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in (spec or "").split(","))):
        found = FAULT.fullmatch(item)
        if not found or found["action"] not in ACTIONS or found["point"] not in POINTS:
            raise ValueError(f"TALKGEN_FAULTS: {item!r} is not ACTION@POINT[:SECONDS][~TEXT] with ACTION one of "
                             f"{', '.join(ACTIONS)} and POINT one of {', '.join(POINTS)}")
        faults.append(Fault(found["action"], found["point"], float(found["seconds"] or 0), found["match"] or ""))
    return faults


def inject(spec: str, point: str, prompt: str = "") -> None:
    """Apply the faults ``spec`` sets at ``point`` (nothing when ``spec`` is empty)."""
    if not spec:
        return
    for fault in parse_faults(spec):
        if fault.point != point or fault.match not in (prompt or ""):
            continue
        log.warning("fault injection: %s at %s", fault.action, point)
        if fault.action == "delay":
            time.sleep(fault.seconds)
        elif fault.action == "oom":
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated by TALKGEN_FAULTS)")
        elif fault.action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<storage write at {point}>")


# ------------------------------------------------------------------------------------------------
# Storing results


def store_result(storage, settings, key: str, path: Path, content_type: str | None = None, prompt: str = "") -> str:
    """The job's result through :func:`put_with_retries` (the ``upload`` stage of fault injection)."""
    inject(settings.faults, "upload", prompt)
    return put_with_retries(storage, settings, key, path, content_type)


def put_with_retries(storage, settings, key: str, path: Path, content_type: str | None = None) -> str:
    """``storage.put_file`` with retries for a storage that does not answer; a full disk fails at once."""
    tries, delay, started = settings.storage_tries, settings.storage_retry_delay_s, time.monotonic()
    for attempt in range(1, tries + 1):
        try:
            return storage.put_file(key, path, content_type)
        except InputError:
            raise
        except Exception as exc:
            if disk_full(exc):
                raise
            reason = str(exc) if isinstance(exc, TalkgenError) else f"{type(exc).__name__}: {exc}"
            if attempt == tries:
                raise ResourceError(
                    f"Could not store the result {key} after {tries} tries over {time.monotonic() - started:.0f} s "
                    f"({reason.rstrip('.')}): the storage does not answer; check that it is up and reachable "
                    "(TALKGEN_STORAGE, TALKGEN_S3_ENDPOINT_URL), then submit the job again.") from None
            log.warning("storing %s failed (try %d of %d: %s); trying again in %.1f s", key, attempt, tries, reason,
                        delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------
# Failures people can act on


def disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


def failure_reason(exc: BaseException, device: str | None = None) -> str | None:
    """The sentence a job fails with for out-of-memory and disk-full errors (None for others)."""
    try:
        import torch

        out_of_memory = isinstance(exc, torch.OutOfMemoryError)
    except (ImportError, AttributeError):
        out_of_memory = False
    if out_of_memory:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
        where = device if device and device.startswith("cuda") else "the GPU"
        return (f"Out of GPU memory on {where} ({first.rstrip('.')}): the job needs more memory than is free there. "
                "Submit it again with the preset 'small_gpu' (41 frames per chunk), a smaller frame_num, size 480, "
                "or text_guide_scale 1 (one pass per step instead of three); or run one worker per GPU.")
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        target = exc.filename2 or exc.filename  # shutil's copies name the source first, the destination second
        what = f" while writing {target}" if target else ""
        if exc.errno == errno.EFBIG:
            return (f"A file grew past the size this worker may write{what} ({exc.strerror}): raise the file size "
                    "limit of the worker's service ('ulimit -f', LimitFSIZE=), then submit the job again.")
        return (f"No space left on the device{what} ({exc.strerror}): free disk space where the results go "
                "(TALKGEN_STORAGE, TALKGEN_DATA_DIR) and in the temporary folder (TMPDIR), then submit the job again.")
    return None


# ------------------------------------------------------------------------------------------------
# Temporary folders


def temp_prefix(kind: str, name: str = "") -> str:
    """``talkgen-<kind>-<pid>-[<name>-]``: the pid tells a later sweep whether its owner still runs."""
    return f"talkgen-{kind}-{os.getpid()}-" + (f"{name}-" if name else "")


def sweep_stale_temp(kinds: tuple[str, ...] = ("job", "upload")) -> int:
    """Remove temporary folders of talkgen processes that no longer run (killed with ``-9``)."""
    removed = 0
    root = Path(tempfile.gettempdir())
    pattern = re.compile(rf"talkgen-({'|'.join(kinds)})-(\d+)-")
    try:
        entries = list(root.iterdir())
    except OSError:
        return 0
    for entry in entries:
        found = pattern.match(entry.name)
        if not found or int(found[2]) == os.getpid() or _running(int(found[2])):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed += not entry.exists()
    if removed:
        log.info("removed %d temporary folder(s) of talkgen processes that had stopped", removed)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
