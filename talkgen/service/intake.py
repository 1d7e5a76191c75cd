"""Accepting a job: check everything that can be checked before queueing, keep the inputs, queue.

Order matters: the options and the files are validated first (nothing is stored for a request
that would fail), then the inputs are written to storage, then the job record is committed,
then it is queued, and only then does the client get ``202``. Whatever was accepted survives a
crash from that point on (the record and its inputs are on disk or in S3; a job that was stored
but not yet queued is queued when the server starts again).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import logging

from talkgen.errors import InputError
from talkgen.service.jobs import Job, new_job_id
from talkgen.service.schemas import INPUT_FIELDS, S3JobRequest, generation_values
from talkgen.service.storage import Storage, split_s3

log = logging.getLogger("talkgen.service.intake")

# Dubbing a video is InfiniteTalk's (see Pipeline.prepare): refuse it before queueing elsewhere.
VIDEO_NEEDS_INFINITETALK = ("video: dubbing a video needs the infinitetalk model and this server runs {model}; "
                            "send a portrait image as 'image'.")


class UploadTooLarge(InputError):
    """The request body went past TALKGEN_MAX_UPLOAD_MB."""


def parse_params(text: str | None) -> dict:
    if not text:
        return {}
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"Invalid request: params is not valid JSON ({exc}); send an object such as "
                         '{"prompt": "A woman is talking", "sample_steps": 40}.') from None
    if not isinstance(params, dict):
        raise InputError("Invalid request: params must be a JSON object, e.g. {\"prompt\": \"...\"}.")
    return params


def check_params(params: dict, inputs: dict[str, str | Path], model: str) -> None:
    """Validate the options as the engine will see them (field names in the message)."""
    from talkgen.pipeline.request import GenerationRequest

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
    GenerationRequest.parse(generation_values(params, inputs))


def check_files(paths: dict[str, Path]) -> None:
    """Decode what is cheap to decode: the image fully, the audio's container and stream."""
    from talkgen.media.image import load_image
    from talkgen.media.video import probe_media

    for name, path in paths.items():
        label = f"{name} ({path.name.split('-', 1)[-1]})"
        if name == "image":
            try:
                load_image(path)
            except InputError as exc:
                raise InputError(str(exc).replace(str(path), label)) from None
        else:
            try:
                info = probe_media(path)
            except InputError as exc:
                raise InputError(str(exc).replace(str(path), label)) from None
            if name == "video" and info.video is None:
                raise InputError(f"{label} has no video stream: send a video to dub, or a portrait as 'image'.")
            if name != "video" and info.audio is None:
                raise InputError(f"{label} has no audio stream: send the speech as wav, flac, mp3, m4a or ogg.")


class Intake:
    def __init__(self, store, queue, storage: Storage, settings):
        self.store, self.queue, self.storage, self.settings = store, queue, storage, settings

    def submit_files(self, params: dict, uploads: dict[str, tuple[str, object]]) -> Job:
        """``uploads``: field -> (file name, binary file object). Runs in a worker thread."""
        with tempfile.TemporaryDirectory(prefix="talkgen-upload-") as tmp:
            paths: dict[str, Path] = {}
            for name, (filename, stream) in uploads.items():
                path = Path(tmp) / f"{name}-{_safe_name(filename, name)}"
                with open(path, "wb") as out:
                    shutil.copyfileobj(stream, out, 1 << 20)
                if path.stat().st_size == 0:
                    raise InputError(f"Invalid request: {name}: the file {filename!r} is empty.")
                paths[name] = path
            check_params(params, paths, self.settings.model)
            check_files(paths)
            job_id = new_job_id()
            inputs = {name: self.storage.put_file(f"jobs/{job_id}/inputs/{name}{path.suffix.lower()}", path)
                      for name, path in paths.items()}
        return self._queue(job_id, params, inputs)

    def submit_s3(self, body: S3JobRequest) -> Job:
        inputs = {name: getattr(body, name) for name in INPUT_FIELDS if getattr(body, name)}
        for name, uri in inputs.items():
            try:
                split_s3(uri)
            except InputError:
                raise InputError(f"Invalid request: {name}: {uri!r} is not an S3 location; write it as "
                                 "s3://bucket/key (or upload the file as multipart/form-data).") from None
        check_params(body.params, inputs, self.settings.model)
        limit = self.settings.max_upload_bytes
        for name, uri in inputs.items():
            size = self.storage.size(uri)
            if size is None:
                raise InputError(f"Invalid request: {name}: {uri} does not exist, or the server's S3 credentials "
                                 "cannot read it.")
            if size > limit:
                raise UploadTooLarge(f"{name}: {uri} is {size / 2**20:.0f} MiB; the limit is "
                                     f"{self.settings.max_upload_mb:g} MiB (TALKGEN_MAX_UPLOAD_MB).")
        return self._queue(new_job_id(), body.params, inputs)

    def _queue(self, job_id: str, params: dict, inputs: dict[str, str]) -> Job:
        job = self.store.create(params, inputs, job_id=job_id)
        try:
            self.queue.enqueue(job)
        except Exception:  # stored but not handed over: the queue hands it over when it can
            log.exception("job %s is stored but could not be queued yet", job_id)
        return job


def _safe_name(filename: str | None, fallback: str) -> str:
    name = Path(filename or fallback).name
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[-80:]
    return cleaned or fallback
