"""What the HTTP API takes and gives, and how a job's options become a :class:`GenerationRequest`."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from talkgen.errors import InputError
from talkgen.service.jobs import Job

# Inputs by form field / JSON key -> where they go in the reference's request.
INPUT_FIELDS = ("image", "video", "audio", "audio2")
# Fields of GenerationRequest that name input files: given as files or URIs, never inside params.
# (Text to speak, ``tts_audio``, is an option: it may stand in for the audio file.)
INPUT_REQUEST_FIELDS = {"cond_image", "cond_video", "cond_audio"}

# Presets set options the caller did not set. Values are the engine's own options; "fast" and
# "small_gpu" trade detail (fewer steps) and length per chunk (fewer frames) for time and memory.
PRESETS: dict[str, dict] = {
    "quality": {"sample_steps": 40, "size": 480, "frame_num": 81},
    "fast": {"sample_steps": 16, "size": 480, "frame_num": 81},
    "small_gpu": {"sample_steps": 30, "size": 480, "frame_num": 41},
}
PRESET_NOTES = {
    "quality": "the reference's defaults: 40 steps, 81 frames per clip",
    "fast": "16 steps: about 2.5x faster, slightly softer detail",
    "small_gpu": "41 frames per clip and 30 steps: about half the activation memory",
}


class S3JobRequest(BaseModel):
    """``POST /v1/jobs`` with a JSON body: the inputs are already in S3."""

    model_config = ConfigDict(extra="forbid")
    image: str | None = Field(None, description="s3://bucket/key of the portrait")
    video: str | None = Field(None, description="s3://bucket/key of a video to dub (instead of image)")
    audio: str | None = Field(None, description="s3://bucket/key of the speech (person 1); or params.tts_audio")
    audio2: str | None = Field(None, description="s3://bucket/key of the second speaker's speech")
    params: dict = Field(default_factory=dict, description="generation options (see GET /v1/presets)")


class Progress(BaseModel):
    stage: str
    step: int = 0
    total: int = 0
    chunk: int = 0
    fraction: float = Field(0, description="0..1, for a progress bar")
    eta_s: float | None = Field(None, description="seconds left, once sampling has started")
    elapsed_s: float | None = None


class JobResult(BaseModel):
    uri: str
    video_url: str
    frames: int
    fps: int
    duration_s: float
    seed: int
    bytes: int | None = None
    notes: list[str] = Field(default_factory=list, description="what the engine wants you to know (e.g. clip mode cut long speech)")


class Chunk(BaseModel):
    index: int
    url: str
    frames: int
    duration_s: float


class JobView(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: Progress | None = None
    error: str | None = None
    result: JobResult | None = None
    chunks: list[Chunk] = Field(default_factory=list, description="finished chunks (streaming jobs), watchable now")
    live_url: str | None = Field(None, description="streaming jobs: HLS playlist of the part finished so far "
                                                   "(grows while the job runs, ends with the job)")
    attempts: int = 0
    worker: str | None = Field(None, description="the worker running (or that ran) it")
    cancel_requested: bool = False
    params: dict = Field(default_factory=dict)

    @classmethod
    def of(cls, job: Job) -> JobView:
        result = None
        if job.result:
            result = JobResult(video_url=f"/v1/jobs/{job.id}/video", **{k: v for k, v in job.result.items()
                                                                        if k in JobResult.model_fields})
        chunks = [Chunk(index=c["index"], url=f"/v1/jobs/{job.id}/chunks/{c['index']}", frames=c["frames"],
                        duration_s=c["duration_s"]) for c in job.chunks]
        from talkgen.service import live  # live builds on this module's presets

        live_url = live.playlist_path(job.id) if live.is_streaming(job) else None
        return cls(id=job.id, status=job.status, created_at=job.created_at, started_at=job.started_at,
                   finished_at=job.finished_at, progress=Progress(**job.progress) if job.progress else None,
                   error=job.error, result=result, chunks=chunks, live_url=live_url, attempts=job.attempts,
                   worker=job.worker, cancel_requested=job.cancel_requested, params=job.params)


class JobCreated(BaseModel):
    id: str
    status: str = "queued"
    url: str


class JobList(BaseModel):
    jobs: list[JobView]


class ErrorBody(BaseModel):
    error: str
    type: str


class NotReadyBody(ErrorBody):
    live_url: str | None = Field(None, description="streaming jobs: the HLS playlist where the part finished so far "
                                                   "plays")


class WorkerInfo(BaseModel):
    name: str
    device: str | None = None
    state: str
    job: str | None = None
    error: str | None = None


class Health(BaseModel):
    status: Literal["ok", "loading", "degraded"]
    model: str
    queue: Literal["embedded", "redis"]
    workers: list[WorkerInfo]
    jobs: dict[str, int]
    auth_required: bool
    max_upload_mb: float


class Preset(BaseModel):
    name: str
    params: dict
    note: str


def generation_values(params: dict, inputs: dict[str, str | Path]) -> dict:
    """A job's params (with its preset applied) and its input files -> GenerationRequest values."""
    params = dict(params)
    misplaced = sorted(INPUT_REQUEST_FIELDS & params.keys())
    if misplaced:
        raise InputError(f"Invalid request: params.{misplaced[0]}: inputs are sent as the 'image'/'audio'/'audio2' "
                         "files or s3:// URIs, not inside params.")
    preset = params.pop("preset", None)
    if preset is not None:
        if not isinstance(preset, str) or preset not in PRESETS:
            raise InputError(f"Invalid request: params.preset: {preset!r} is not a preset; use one of {', '.join(PRESETS)}.")
        params = {**PRESETS[preset], **params}
    values = dict(params)
    if "image" in inputs:
        values["cond_image"] = str(inputs["image"])
    if "video" in inputs:
        values["cond_video"] = str(inputs["video"])
    cond_audio = {}
    if "audio" in inputs:
        cond_audio["person1"] = str(inputs["audio"])
    if "audio2" in inputs:
        cond_audio["person2"] = str(inputs["audio2"])
    values["cond_audio"] = cond_audio
    return values


# ------------------------------------------------------------------------------------------------
# The service's own checks on top of the engine's (the HTTP API is stricter than the CLI)

# Where a GenerationRequest field comes from in an HTTP request: the input files, else params.
REQUEST_FIELD_SOURCE = {"cond_image": "image", "cond_video": "video", "cond_audio": "audio"}
# Text to speech over HTTP: the text and voice names; folders and files stay the server's choice.
TTS_FIELDS = {"text", "human1_voice", "human2_voice", "backend"}
TTS_VOICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+-]{0,63}")
MAX_TEXT = 10_000  # characters of a prompt or of text to speak
STRICT_TYPES = {"int_type": "a JSON number without a fraction", "int_parsing": "a JSON number without a fraction",
                "float_type": "a JSON number", "float_parsing": "a JSON number", "bool_type": "true or false",
                "bool_parsing": "true or false", "string_type": "a JSON string", "dict_type": "a JSON object",
                "list_type": "a JSON array", "literal_error": None}


def validate_request(params: dict, inputs: dict[str, str | Path]):
    """A job's options as the engine will validate them, plus what only the service demands: JSON
    types as they are (``"3"`` is not a number, ``true`` is not 1), finite numbers, bounded text,
    and text-to-speech without server paths. Returns the :class:`GenerationRequest`; every error is
    an :class:`InputError` naming the field (``params.sample_steps``, ``audio2``, ...)."""
    from pydantic import ValidationError

    from talkgen.pipeline.request import GenerationRequest

    _check_finite(params, "params")
    for name in ("prompt", "negative_prompt"):
        if isinstance(params.get(name), str) and len(params[name]) > MAX_TEXT:
            raise InputError(f"Invalid request: params.{name}: {len(params[name])} characters is too long; keep it "
                             f"under {MAX_TEXT}.")
    _check_tts(params.get("tts_audio"))
    values = generation_values(params, inputs)
    strict = dict(values)  # strict mode takes paths as paths
    for key in ("cond_image", "cond_video"):
        if key in strict:
            strict[key] = Path(strict[key])
    strict["cond_audio"] = {k: Path(v) for k, v in values["cond_audio"].items()}
    try:
        GenerationRequest.model_validate(strict, strict=True)
    except ValidationError as exc:
        raise InputError(describe_request_error(exc)) from None
    return GenerationRequest.parse(values)


def describe_request_error(exc) -> str:
    """pydantic's report -> one sentence per field, named as the HTTP request names it."""
    parts = []
    for error in exc.errors():
        loc = [str(p) for p in error["loc"]]
        if loc and loc[0] in REQUEST_FIELD_SOURCE:
            where = "audio2" if loc[1:2] == ["person2"] else REQUEST_FIELD_SOURCE[loc[0]]
        else:
            where = ".".join(["params", *loc]) if loc else "params"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "is not a known option (check its spelling; GET /v1/presets shows common ones)"
        elif STRICT_TYPES.get(error["type"]):
            message = f"{message}: send {STRICT_TYPES[error['type']]}, got {_json_kind(error.get('input'))}"
        elif error["type"] == "value_error" and ":" in message.split(" ", 1)[0]:
            # the engine's own sentences start with the field ("audio_type: two speakers need ...")
            field, _, rest = message.partition(":")
            where, message = (REQUEST_FIELD_SOURCE.get(field, f"params.{field}"), rest.strip())
        parts.append(f"{where}: {message}")
    return "Invalid request: " + "; ".join(parts) + "."


def _json_kind(value) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "an array"
    return "null" if value is None else type(value).__name__


def _check_finite(value, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"Invalid request: {where}: {value} is not a number JSON allows; send a finite number.")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}.{i}")


def _check_tts(tts) -> None:
    if tts is None:
        return
    if not isinstance(tts, dict):
        raise InputError("Invalid request: params.tts_audio: send an object such as {\"text\": \"Hello there\"}.")
    unknown = sorted(set(tts) - TTS_FIELDS)
    if unknown:
        raise InputError(f"Invalid request: params.tts_audio.{unknown[0]}: not an option here (the server chooses "
                         f"the TTS model and its files); send {', '.join(sorted(TTS_FIELDS))}.")
    text = tts.get("text")
    if isinstance(text, str) and len(text) > MAX_TEXT:
        raise InputError(f"Invalid request: params.tts_audio.text: {len(text)} characters is too long; keep it "
                         f"under {MAX_TEXT} (or send the speech as an audio file).")
    for key in ("human1_voice", "human2_voice", "backend"):
        value = tts.get(key)
        if value is not None and (not isinstance(value, str) or not TTS_VOICE.fullmatch(value)):
            raise InputError(f"Invalid request: params.tts_audio.{key}: {str(value)[:40]!r} is not a name (letters, "
                             "digits and _+- only, no paths); e.g. 'af_heart' or 'en-us'.")
