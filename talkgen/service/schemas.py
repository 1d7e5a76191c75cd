"""What the HTTP API takes and gives, and how a job's options become a :class:`GenerationRequest`."""

from __future__ import annotations

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
        return cls(id=job.id, status=job.status, created_at=job.created_at, started_at=job.started_at,
                   finished_at=job.finished_at, progress=Progress(**job.progress) if job.progress else None,
                   error=job.error, result=result, chunks=chunks, attempts=job.attempts, worker=job.worker,
                   cancel_requested=job.cancel_requested, params=job.params)


class JobCreated(BaseModel):
    id: str
    status: str = "queued"
    url: str


class JobList(BaseModel):
    jobs: list[JobView]


class ErrorBody(BaseModel):
    error: str
    type: str


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
        if preset not in PRESETS:
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
