"""Accepting a job: check everything that can be checked before queueing, keep the inputs, queue.

Order matters: the options and the files are validated first (nothing is stored for a request
that would fail), then the inputs are written to storage, then the job record is committed,
then it is queued, and only then does the client get ``202``. Whatever was accepted survives a
crash from that point on (the record and its uploaded inputs are on disk or in S3; inputs a JSON
job names by s3:// URI or local path are read where they are when it runs; a job that was stored
but not yet queued is queued when the server starts again).

What is checked, each refusal an :class:`InputError` (422) naming the field and the fix:

- the options, as the engine validates them and stricter (JSON types as sent, finite numbers),
  boxes inside the image and on its visible part;
- file names (no paths), empty files;
- the image: a format PIL decodes, whole (not truncated), between 16 pixels a side and
  ``TALKGEN_MAX_IMAGE_MP`` megapixels (checked from the header, before decoding);
- each speech file: an audio stream ffmpeg decodes to the end, not cut short (a WAV's header
  says how long it should be), not silent, at most ``TALKGEN_MAX_AUDIO_S`` seconds (from the
  header first, then while decoding, which stops at the limit);
- URIs of JSON jobs: ``s3://`` in an allowed bucket (``TALKGEN_INPUT_BUCKETS``) with a plain key,
  or a local file under ``TALKGEN_INPUT_ROOT`` (symlinks resolved); nothing else.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import struct
import tempfile
import unicodedata
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

from talkgen.errors import InputError, ResourceError
from talkgen.service.faults import disk_full, sweep_stale_temp, temp_prefix
from talkgen.service.jobs import Job, new_job_id
from talkgen.service.schemas import INPUT_FIELDS, S3JobRequest, validate_request
from talkgen.service.storage import Storage, split_s3

log = logging.getLogger("talkgen.service.intake")

# Dubbing a video is InfiniteTalk's (see Pipeline.prepare): refuse it before queueing elsewhere.
VIDEO_NEEDS_INFINITETALK = ("video: dubbing a video needs the infinitetalk model and this server runs {model}; "
                            "send a portrait image as 'image'.")
MIN_IMAGE_SIDE = 16
SILENT_PEAK = 10 ** (-60 / 20)  # -60 dBFS: quieter than this everywhere is silence
MAX_URI = 1024


class UploadTooLarge(InputError):
    """The request body went past TALKGEN_MAX_UPLOAD_MB."""


# ------------------------------------------------------------------------------------------------
# Options


def parse_params(text: str | None) -> dict:
    if not text:
        return {}

    def no_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    try:
        params = json.loads(text, parse_constant=no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise InputError(f"Invalid request: params is not valid JSON ({str(exc) or type(exc).__name__}); send an "
                         'object such as {"prompt": "A woman is talking", "sample_steps": 40}.') from None
    if not isinstance(params, dict):
        raise InputError("Invalid request: params must be a JSON object, e.g. {\"prompt\": \"...\"}.")
    return params


def describe_body_error(exc: Exception) -> str:
    """A JSON job body pydantic refused -> one sentence naming the field."""
    from pydantic import ValidationError

    from talkgen.pipeline.request import describe_validation_error

    if not isinstance(exc, ValidationError):
        return f"Invalid request: {exc}"
    example = ('{"image": "s3://bucket/portrait.png", "audio": "s3://bucket/speech.wav", '
               '"params": {"prompt": "A woman is talking"}}')
    for error in exc.errors():
        if error["type"] == "json_invalid":
            return f"Invalid request: the body is not valid JSON ({error['msg'].removeprefix('Invalid JSON: ')}); send {example}."
        if not error["loc"]:
            return f"Invalid request: the body must be a JSON object such as {example}."
    unknown = [str(e["loc"][0]) for e in exc.errors() if e["type"] == "extra_forbidden" and e["loc"]]
    if unknown:
        return (f"Invalid request: {unknown[0]}: not a known field; send image (or video), audio, audio2 and params "
                f"(the options go inside params).")
    return describe_validation_error(exc)


def check_params(params: dict, inputs: dict[str, str | Path], model: str):
    """Validate the options as the engine will see them (field names in the message); returns the request."""
    if "image" in inputs and "video" in inputs:
        raise InputError("Invalid request: send either 'image' or 'video', not both.")
    if "image" not in inputs and "video" not in inputs:
        raise InputError("Invalid request: image: send the portrait to animate as 'image'.")
    if "audio" not in inputs and not params.get("tts_audio"):
        raise InputError("Invalid request: audio: send the speech as 'audio' (and the second speaker's as 'audio2').")
    if "audio2" in inputs and "audio" not in inputs:
        raise InputError("Invalid request: audio: 'audio2' is the second speaker; send the first one's as 'audio'.")
    if "video" in inputs and model != "infinitetalk":
        raise InputError("Invalid request: " + VIDEO_NEEDS_INFINITETALK.format(model=model))
    return validate_request(params, inputs)


def check_upload_name(field: str, filename: str | None) -> None:
    """A file name is a name: no folders, no control characters (browsers send the base name only)."""
    if filename is None:
        return
    bad = ("/" in filename or "\\" in filename or filename.strip() in (".", "..")
           or any(unicodedata.category(c) == "Cc" for c in filename))
    if bad or len(filename) > 255:
        shown = filename[:60] + ("..." if len(filename) > 60 else "")
        raise InputError(f"Invalid request: {field}: the file name {shown!r} is not a plain file name (no folders, "
                         "'..' or control characters, at most 255 characters); send the file under its own name, "
                         "e.g. 'speech.wav'.")


# ------------------------------------------------------------------------------------------------
# Files


def check_files(paths: dict[str, Path], settings=None) -> dict[str, tuple[int, int]]:
    """Decode what the engine will decode, within limits; returns {field: (height, width)} of pictures."""
    max_mp = getattr(settings, "max_image_mp", 64)
    max_audio_s = getattr(settings, "max_audio_s", 1800)
    sizes = {}
    for name, path in paths.items():
        label = f"{name} ({_original_name(path)})"
        if name == "image":
            sizes[name] = check_image(path, label, max_mp)
        elif name == "video":
            sizes[name] = check_video(path, label)
        else:
            check_audio(path, label, max_audio_s)
    return sizes


def _original_name(path: Path) -> str:
    return path.name.split("-", 1)[-1] if path.name.split("-", 1)[0] in INPUT_FIELDS else path.name


def check_image(path: Path, label: str, max_mp: float) -> tuple[int, int]:
    from PIL import Image

    from talkgen.media.image import load_image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                width, height = im.size
    except Image.DecompressionBombError:  # PIL refuses to open it at all: more than ~179 megapixels
        width, height = None, 0
    except Exception as exc:
        reason = str(exc).replace(f" '{path}'", "").replace(str(path), label)  # no server paths in answers
        raise InputError(f"{label} cannot be read as an image ({type(exc).__name__}: {reason}): send a PNG or JPEG "
                         "portrait.") from None
    if width is None or width * height > max_mp * 1e6:
        size = f" ({width}x{height} pixels)" if width else " (more than 179 megapixels)"
        raise InputError(f"{label} is too large{size}: this server takes images up to {max_mp:g} megapixels "
                         "(TALKGEN_MAX_IMAGE_MP); downscale it (the model works at about 0.4 or 0.9 megapixels).")
    if min(width, height) < MIN_IMAGE_SIDE:
        raise InputError(f"{label} is only {width}x{height} pixels: send a portrait at least {MIN_IMAGE_SIDE} pixels "
                         "on each side (512 or more works best).")
    try:
        load_image(path)  # decodes every pixel: a truncated file fails here, not in the worker
    except InputError as exc:
        raise InputError(str(exc).replace(f"Image file {path}", label).replace(str(path), label)) from None
    return height, width


def check_video(path: Path, label: str) -> tuple[int, int]:
    from talkgen.media.video import probe_media

    try:
        info = probe_media(path)
    except InputError as exc:
        raise InputError(str(exc).replace(str(path), label)) from None
    if info.video is None:
        raise InputError(f"{label} has no video stream: send a video to dub, or a portrait as 'image'.")
    return info.video.height, info.video.width


def check_audio(path: Path, label: str, max_seconds: float) -> float:
    """Decode the speech once, to the end or to the limit; returns its duration in seconds."""
    import av
    import numpy as np

    from talkgen.media.video import probe_media

    too_long = (f"{label} lasts {{seconds:.0f}} s; this server takes speech up to {max_seconds:g} s "
                "(TALKGEN_MAX_AUDIO_S): cut it into parts and submit each (or use a server with a higher limit).")
    try:
        info = probe_media(path)
    except InputError:
        raise InputError(f"{label} is not a sound file ffmpeg can read (damaged, cut short, or another kind of "
                         "file): send the speech as wav, flac, mp3, m4a or ogg.") from None
    if info.audio is None:
        raise InputError(f"{label} has no audio stream: send the speech as wav, flac, mp3, m4a or ogg.")
    declared = info.audio.duration or info.duration
    if declared and declared > max_seconds:
        raise InputError(too_long.format(seconds=declared))
    samples, rate, peak = 0, 0, 0.0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono")
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    data = out.to_ndarray()
                    samples, rate = samples + out.samples, out.sample_rate
                    if data.size:
                        peak = max(peak, float(np.nanmax(np.abs(data))))
                if rate and samples / rate > max_seconds:
                    raise InputError(too_long.format(seconds=samples / rate).replace(" lasts", " lasts more than"))
    except InputError:
        raise
    except Exception as exc:  # av.FFmpegError and friends: damaged data
        raise InputError(f"{label} cannot be decoded to the end ({type(exc).__name__}: {exc}): the file is damaged "
                         "or cut short; export the speech again as wav, flac or mp3.") from None
    if samples == 0:
        raise InputError(f"{label} holds no sound (zero samples): export the speech again with the sound in it.")
    seconds = samples / rate
    shortfall = wav_shortfall(path)
    if shortfall is not None:
        declared_bytes, present_bytes = shortfall
        raise InputError(f"{label} is cut short: its header announces {seconds * declared_bytes / present_bytes:.2f} s "
                         f"of sound but the file holds {seconds:.2f} s; upload the whole file (or export it again).")
    if not math.isfinite(peak) or peak < SILENT_PEAK:
        raise InputError(f"{label} is silent (its loudest sample is below -60 dBFS): send speech the model can "
                         "follow; for a still face, use any quiet recording of breathing or room sound.")
    return seconds


def wav_shortfall(path: Path) -> tuple[int, int] | None:
    """(bytes the WAV header announces, bytes present) when the data chunk is cut short, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
                return None
            order = "<" if head[:4] == b"RIFF" else ">"
            size = path.stat().st_size
            position = 12
            while position + 8 <= size:
                f.seek(position)
                chunk, length = struct.unpack(f"{order}4sI", f.read(8))
                if chunk == b"data":
                    present = size - position - 8
                    if length in (0, 0xFFFFFFFF) or length <= present:  # streamed writers leave 0 or -1
                        return None
                    return length, max(present, 1)
                position += 8 + length + (length & 1)
    except (OSError, struct.error):
        return None
    return None


def check_layout(request, sizes: dict[str, tuple[int, int]]) -> None:
    """Two speakers' boxes lie inside the picture and on the part the model sees."""
    picture = sizes.get("image") or sizes.get("video")
    if picture is None or request.people != 2 or request.bbox is None:
        return
    from talkgen.media.image import choose_bucket, person_masks

    height, width = picture
    try:
        person_masks(height, width, choose_bucket(height, width, request.size), 2, request.bbox)
    except InputError as exc:
        raise InputError(f"Invalid request: params.{exc}") from None


# ------------------------------------------------------------------------------------------------
# URIs of JSON jobs


def resolve_input(name: str, value: str, settings) -> str:
    """An input URI a JSON job names -> the URI the job carries, or an InputError saying why not."""
    if len(value) > MAX_URI or any(unicodedata.category(c) == "Cc" for c in value):
        raise InputError(f"Invalid request: {name}: not a usable location (control characters, or longer than "
                         f"{MAX_URI} characters); write it as s3://bucket/key.")
    parsed = urlparse(value)
    if parsed.scheme == "s3":
        try:
            bucket, key = split_s3(value)
        except InputError:
            raise InputError(f"Invalid request: {name}: {value!r} is not an S3 location; write it as "
                             "s3://bucket/key (or upload the file as multipart/form-data).") from None
        allowed = settings.allowed_buckets
        if bucket not in allowed:
            which = f"only from {', '.join(allowed)}" if allowed else "from no bucket"
            raise InputError(f"Invalid request: {name}: this server reads inputs {which} (TALKGEN_INPUT_BUCKETS), "
                             f"not from bucket {bucket!r}; copy the file there or upload it as multipart/form-data.")
        key = parsed.path[1:]  # as written: split_s3 drops the slashes an empty first part leaves
        if any(part in ("", ".", "..") for part in key.split("/")) or "\\" in key:
            raise InputError(f"Invalid request: {name}: the key {key!r} has empty, '.' or '..' parts; name the "
                             "object by its plain key, e.g. s3://bucket/inputs/speech.wav.")
        return value
    if parsed.scheme == "" or (parsed.scheme == "file" and parsed.netloc in ("", "localhost")):
        return _local_input(name, unquote(parsed.path) if parsed.scheme == "file" else value, settings)
    raise InputError(f"Invalid request: {name}: {value!r} is not an S3 location; write it as s3://bucket/key "
                     "(or upload the file as multipart/form-data).")


def _local_input(name: str, value: str, settings) -> str:
    root = settings.input_root
    if root is None:
        raise InputError(f"Invalid request: {name}: {value!r} is a local path and this server reads no local files "
                         "(TALKGEN_INPUT_ROOT is not set); upload the file as multipart/form-data or give its S3 "
                         "location as s3://bucket/key.")
    root = Path(root).resolve()
    try:
        path = (root / value).resolve()  # an absolute value replaces root; symlinks are followed
        inside = root in path.parents and path.is_file()
    except (OSError, ValueError):
        inside = False
    if not inside:
        raise InputError(f"Invalid request: {name}: {value!r} is not a file under the folder this server reads "
                         "inputs from (TALKGEN_INPUT_ROOT); put it there and name it relative to it, or "
                         "upload it as multipart/form-data.")
    return path.as_uri()


# ------------------------------------------------------------------------------------------------


class Intake:
    def __init__(self, store, queue, storage: Storage, settings):
        self.store, self.queue, self.storage, self.settings = store, queue, storage, settings
        sweep_stale_temp(("upload",))  # uploads a killed server left behind

    def submit_files(self, params: dict, uploads: dict[str, tuple[str, object]]) -> Job:
        """``uploads``: field -> (file name, binary file object). Runs in a worker thread."""
        for name, (filename, _stream) in uploads.items():
            check_upload_name(name, filename)
        with _disk("the server's temporary folder (TMPDIR)"):
            folder = tempfile.TemporaryDirectory(prefix=temp_prefix("upload"))
        with folder as tmp:
            paths: dict[str, Path] = {}
            for name, (filename, stream) in uploads.items():
                path = Path(tmp) / f"{name}-{_safe_name(filename, name)}"
                with _disk("the server's temporary folder (TMPDIR)"):
                    with open(path, "wb") as out:
                        shutil.copyfileobj(stream, out, 1 << 20)
                if path.stat().st_size == 0:
                    raise InputError(f"Invalid request: {name}: the file {filename!r} is empty.")
                paths[name] = path
            request = check_params(params, paths, self.settings.model)
            check_layout(request, check_files(paths, self.settings))
            job_id = new_job_id()
            with _disk("the server's storage (TALKGEN_STORAGE)"):
                inputs = {name: self.storage.put_file(f"jobs/{job_id}/inputs/{name}{path.suffix.lower()}", path)
                          for name, path in paths.items()}
        return self._queue(job_id, params, inputs)

    def submit_s3(self, body: S3JobRequest) -> Job:
        """A JSON job: inputs named by ``s3://`` URIs (allowed buckets) or local paths (under the input root)."""
        inputs = {name: resolve_input(name, getattr(body, name), self.settings)
                  for name in INPUT_FIELDS if getattr(body, name)}
        request = check_params(body.params, inputs, self.settings.model)
        limit = self.settings.max_upload_bytes
        for name, uri in inputs.items():
            size = self.storage.size(uri)
            if size is None:
                raise InputError(f"Invalid request: {name}: {uri} does not exist, or the server's S3 credentials "
                                 "cannot read it.")
            if size > limit:
                raise UploadTooLarge(f"{name}: {uri} is {size / 2**20:.0f} MiB; the limit is "
                                     f"{self.settings.max_upload_mb:g} MiB (TALKGEN_MAX_UPLOAD_MB).")
        local = {name: Path(unquote(urlparse(uri).path)) for name, uri in inputs.items() if uri.startswith("file:")}
        if local:  # decoded here like uploads, S3 ones by the worker; a local input is
            # read where it is (under TALKGEN_INPUT_ROOT) when the job runs, not copied
            check_layout(request, check_files(local, self.settings))
        return self._queue(new_job_id(), body.params, inputs)

    def _queue(self, job_id: str, params: dict, inputs: dict[str, str]) -> Job:
        job = self.store.create(params, inputs, job_id=job_id)
        try:
            self.queue.enqueue(job)
        except Exception:  # stored but not handed over: the queue hands it over when it can
            log.exception("job %s is stored but could not be queued yet", job_id)
        return job


class _disk:
    """Turn a full disk into a 503 that says which disk."""

    def __init__(self, where: str):
        self.where = where

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, _tb):
        if exc is not None and disk_full(exc):
            raise ResourceError(f"No space left in {self.where} ({exc.strerror}): the server cannot keep the inputs; "
                                "try again later (operators: free disk space).") from None
        return False


def _safe_name(filename: str | None, fallback: str) -> str:
    name = Path(filename or fallback).name
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[-80:]
    return cleaned or fallback
