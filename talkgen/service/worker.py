"""The worker: owns a resident :class:`Pipeline`, runs one job at a time on its GPU set.

A job is a :class:`JobOrder` (id, options, input URIs). The worker fetches the inputs, runs the
pipeline with a progress callback that reports progress (with an ETA) and is also where
cancellation happens: when the job has been cancelled the callback raises :class:`Cancelled`, so
the pipeline stops at its next step; when the worker is shutting down it raises :class:`Stopping`
and the job is handed back to the queue. Where it reports to is a :class:`Reporter`: the job store
directly (embedded worker) or Redis (``talkgen worker``, see :mod:`talkgen.service.queue`).

Streaming jobs: every finished chunk (the pipeline's ``on_chunk``) is written to storage at once
as its own mp4, as an HLS segment, and with the state the stream resumes from, and
``jobs/<id>/resume.json`` lists them. The part made so far is watchable (the live playlist
``GET /v1/jobs/{id}/live.m3u8``, see :mod:`talkgen.service.live`, or chunk by chunk at
``GET /v1/jobs/{id}/chunks/{n}``), and a job taken up again after its worker died resumes after
its last finished chunk; the final mp4 is then the finished chunks followed by the rest.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol
from urllib.parse import urlparse

from talkgen.errors import TalkgenError
from talkgen.pipeline.progress import ProgressEvent
from talkgen.service import faults
from talkgen.service.intake import check_files, check_layout
from talkgen.service.schemas import generation_values
from talkgen.service.settings import Settings
from talkgen.service.storage import Storage

log = logging.getLogger("talkgen.service.worker")

FPS = 25
SPEECH_RATE = 16_000


class Cancelled(Exception):
    """Raised from the progress callback when the job was cancelled: the pipeline stops there."""


class Stopping(Exception):
    """Raised from the progress callback when the worker shuts down: the job goes back to the queue."""


@dataclass
class JobOrder:
    """What travels through the queue: everything a worker on any machine needs to run the job."""

    job_id: str
    params: dict
    inputs: dict[str, str]  # "image" | "video" | "audio" | "audio2" -> URI

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> JobOrder:
        return cls(job_id=data["job_id"], params=data["params"], inputs=data["inputs"])


class Reporter(Protocol):
    """Where a worker reports. ``start`` decides whether the job runs at all (it may be finished,
    cancelled, out of attempts, or running elsewhere)."""

    def start(self, order: JobOrder, worker: str) -> bool: ...
    def progress(self, job_id: str, data: dict) -> None: ...
    def chunk(self, job_id: str, data: dict) -> None: ...
    def finish(self, order: JobOrder, kind: str, data: dict) -> None: ...  # succeeded|failed|cancelled|requeued
    def should_cancel(self, job_id: str) -> bool: ...


def worker_name(device: str | None = None) -> str:
    name = f"{socket.gethostname()}:{os.getpid()}"
    return f"{name}:{device}" if device else name


# Share of a one-chunk job's time each stage ends at (for a progress bar; sampling dominates).
STAGE_END = {"stored": 0.0, "load": 0.0, "audio": 0.02, "text": 0.04, "image": 0.05, "condition": 0.06,
             "sample": 0.94, "decode": 0.98, "write": 1.0, "upload": 1.0}


class ProgressTracker:
    """Turns pipeline events into progress records: ``fraction`` of the whole job and an ETA.

    Within a chunk the ETA comes from the measured time per sampling step. Once a streaming job
    has finished chunks (:meth:`chunk_finished`), the fraction is of the whole video's frames and
    the ETA comes from the measured time per frame.
    """

    def __init__(self, min_interval: float = 0.25, clock=time.monotonic):
        self.clock = clock
        self.started = clock()
        self.min_interval = min_interval
        self.sample_start: dict[int, float] = {}
        self.previous_at = self.started
        self.sent_at = -1e9
        self.sent_stage: tuple[str, int] | None = None
        # streaming: frames done / total; a resumed job starts with frames an earlier attempt made
        self.frames_done = self.total_frames = self.chunk_frames = self.base_frames = 0
        self.last_chunk_at = self.started

    def resumed_from(self, frames_done: int, total_frames: int, chunk_frames: int) -> None:
        self.base_frames = self.frames_done = frames_done
        self.total_frames, self.chunk_frames = total_frames, chunk_frames

    def chunk_finished(self, frames_done: int, total_frames: int) -> None:
        self.chunk_frames = max(frames_done - self.frames_done, 1)
        self.frames_done, self.total_frames = frames_done, total_frames
        self.last_chunk_at = self.clock()

    def __call__(self, event: ProgressEvent) -> dict:
        now = self.clock()
        eta = None
        within = STAGE_END.get(event.stage, 0.0)  # share of the current chunk done
        if event.stage == "sample" and event.total:
            start = self.sample_start.setdefault(event.chunk, self.previous_at)
            per_step = (now - start) / max(event.step, 1)
            eta = per_step * (event.total - event.step)
            within = STAGE_END["condition"] + (STAGE_END["sample"] - STAGE_END["condition"]) * event.step / event.total
        self.previous_at = now
        fraction = within
        if self.total_frames:
            current = min(self.chunk_frames, self.total_frames - self.frames_done)
            fraction = min(1.0, (self.frames_done + within * current) / self.total_frames)
            made_here = self.frames_done - self.base_frames
            if made_here > 0:
                per_frame = (self.last_chunk_at - self.started) / made_here
                eta = max(0.0, per_frame * (self.total_frames - self.frames_done) - (now - self.last_chunk_at))
        return {"stage": event.stage, "step": event.step, "total": event.total, "chunk": event.chunk,
                "fraction": round(min(fraction, 0.99), 4),  # 1 only once the job has succeeded
                "eta_s": None if eta is None else round(eta, 1),
                "elapsed_s": round(now - self.started, 1)}

    def due(self, data: dict) -> bool:
        """Send every stage change and the last step at once; other steps at most every ``min_interval``."""
        now = self.clock()
        key = (data["stage"], data["chunk"])
        if key != self.sent_stage or data["step"] == data["total"] or now - self.sent_at >= self.min_interval:
            self.sent_stage, self.sent_at = key, now
            return True
        return False


class GenerationWorker:
    """One resident pipeline on one device (a GPU set); runs one job at a time."""

    def __init__(self, settings: Settings, storage: Storage, device: str | None = None, name: str | None = None):
        self.settings = settings
        self.storage = storage
        self.device = device
        self.name = name or worker_name(device)
        self.pipeline = None
        self.state = "loading"  # loading | idle | busy | failed
        self.current: str | None = None
        self.error: str | None = None

    def load(self) -> None:
        from talkgen.pipeline.pipeline import Pipeline

        faults.sweep_stale_temp()  # temporary folders of workers that were killed (-9) on this machine

        try:
            weights = self.settings.weights_dir
            if self.settings.model == "tiny":
                from talkgen.pipeline.tiny import ensure_tiny_weights

                ensure_tiny_weights(weights)
            from talkgen.runtime.launch import launched_parallel

            # `talkgen worker|serve --gpus N`: this is rank 0 of N; the other ranks run DiT shards
            self.pipeline = Pipeline.from_pretrained(weights, self.settings.model, people=self.settings.people,
                                                     device=self.device, parallel=launched_parallel())
        except Exception as exc:
            self.state, self.error = "failed", str(exc) if isinstance(exc, TalkgenError) else f"{type(exc).__name__}: {exc}"
            raise
        self.state = "idle"

    @property
    def broken(self) -> str | None:
        """Why this worker can take no more jobs, or None: a DiT forward that failed on rank 0 of a
        sequence-parallel group (``--gpus N``) leaves the other ranks out of step, and only a new
        process puts them back in step."""
        return getattr(getattr(self.pipeline, "parallel", None), "broken", None)

    def run(self, order: JobOrder, reporter: Reporter, stopping: threading.Event) -> str:
        """Run one job if the reporter says so; returns what became of it."""
        if not reporter.start(order, self.name):
            log.info("job %s: not run here (finished, cancelled, out of attempts or running elsewhere)", order.job_id)
            return "skipped"
        self.state, self.current = "busy", order.job_id
        started = time.monotonic()
        log.info("job %s: started", order.job_id)
        try:
            outcome, data = self._generate(order, reporter, stopping)
        finally:
            self.state, self.current = "idle", None
        reporter.finish(order, outcome, data)
        log.info("job %s: %s after %.1f s%s", order.job_id, outcome, time.monotonic() - started,
                 f" ({data['error']})" if "error" in data else "")
        if self.broken:
            self.state, self.error = "failed", f"the GPUs of this worker are out of step ({self.broken}): restart it"
            log.error("worker %s: %s", self.name, self.error)
        return outcome

    def _generate(self, order: JobOrder, reporter: Reporter, stopping: threading.Event) -> tuple[str, dict]:
        from talkgen.pipeline.request import GenerationRequest

        job_id = order.job_id
        tracker = ProgressTracker()
        prompt = str(order.params.get("prompt") or "")

        def progress(event: ProgressEvent) -> None:
            if reporter.should_cancel(job_id):
                raise Cancelled()
            if stopping.is_set():
                raise Stopping()
            data = tracker(event)
            if tracker.due(data):
                reporter.progress(job_id, data)
            # Tests only (nothing when unset); after the report, so a fault held in a stage happens
            # while the job is seen to be in it.
            faults.inject(self.settings.faults, event.stage, prompt)

        try:
            with tempfile.TemporaryDirectory(prefix=faults.temp_prefix("job", job_id)) as tmp:
                tmp = Path(tmp)
                paths = {name: self.storage.fetch(uri, tmp / "inputs" / f"{name}{_suffix(uri)}")
                         for name, uri in order.inputs.items()}
                request = GenerationRequest.parse(generation_values(order.params, paths))
                # Inputs a client named by s3:// URI were only sized at intake (uploads were decoded
                # there): decode them within the same limits before any model runs; an InputError
                # fails the job with the reason.
                named = {name: paths[name] for name, uri in order.inputs.items()
                         if uri.startswith("s3:") and f"/jobs/{job_id}/inputs/" not in uri}
                if named:
                    check_layout(request, check_files(named, self.settings))
                extra, sink = {}, None
                if getattr(request, "mode", "clip") == "streaming" and _accepts(self.pipeline.generate, "on_chunk"):
                    sink = ChunkSink(job_id, reporter, self.storage, tmp, tracker, self.settings)
                    extra["on_chunk"] = sink
                    resume = sink.resume_point()
                    if resume is not None:
                        extra["resume"] = resume
                        log.info("job %s: resuming after chunk %d", job_id, resume.index)
                output = tmp / "video.mp4"
                with capture_soundtrack(self.pipeline, sink):
                    result = self.pipeline.generate(request, output=output, progress=progress, **extra)
                frames = result.num_frames
                if sink is not None and sink.resumed:
                    output, frames = sink.stitch(output, result.audio, tmp / "whole.mp4")
                size = output.stat().st_size
                reporter.progress(job_id, tracker(ProgressEvent("upload")))
                uri = faults.store_result(self.storage, self.settings, f"jobs/{job_id}/video.mp4", output,
                                          "video/mp4", prompt)
            return "succeeded", {"uri": uri, "frames": frames, "fps": result.fps, "bytes": size,
                                 "duration_s": round(frames / result.fps, 3), "seed": result.seed,
                                 "notes": list(getattr(result, "notes", []) or [])}
        except Cancelled:
            return "cancelled", {}
        except Stopping:
            return "requeued", {"graceful": True, "reason": "its worker shut down; it will start again"}
        except TalkgenError as exc:
            return "failed", {"error": str(exc)}
        except Exception as exc:  # out of memory, disk full, or a bug: fail the job, keep the worker alive
            reason = faults.failure_reason(exc, self.device)
            if reason is None:
                log.exception("job %s failed", job_id)
            return "failed", {"error": reason or f"internal error: {type(exc).__name__}: {exc}"}
        finally:
            _release_memory()


class ChunkSink:
    """The pipeline's ``on_chunk``: each finished chunk of a streaming job goes to storage at once
    (``jobs/<id>/chunks/<index>.mp4`` with its stretch of the soundtrack, the same h264 with its
    packets of the whole soundtrack as the live segment ``jobs/<id>/live/<index>.ts``, and
    ``<index>.state.safetensors``, what the stream resumes from), then ``jobs/<id>/resume.json``
    is rewritten to list every finished chunk, then the chunk is reported."""

    def __init__(self, job_id: str, reporter: Reporter, storage: Storage, tmp: Path, tracker: ProgressTracker,
                 settings: Settings):
        self.job_id, self.reporter, self.storage, self.tmp, self.tracker = job_id, reporter, storage, tmp, tracker
        self.settings = settings  # storage retries: a storage that does not answer for a moment must not end a stream
        self.soundtrack, self.rate = None, SPEECH_RATE  # filled by capture_soundtrack
        self.aac = None  # the soundtrack as one AAC stream, cut between the live segments
        self.done: list[dict] = []
        self.before: list[dict] = []  # chunks an earlier attempt finished
        self.resumed = False

    def key(self, name: str) -> str:
        return f"jobs/{self.job_id}/{name}"

    def put(self, key: str, path: Path, content_type: str | None = None) -> str:
        return faults.put_with_retries(self.storage, self.settings, key, path, content_type)

    def resume_point(self):
        """The state after the last chunk an earlier attempt finished, or None."""
        marker = self.storage.uri(self.key("resume.json"))
        if self.storage.size(marker) is None:
            return None
        self.done = json.loads(self.storage.fetch(marker, self.tmp / "resume.json").read_text())["chunks"]
        if not self.done:
            return None
        last = self.done[-1]
        self.before, self.resumed = list(self.done), True
        for record in self.done:  # in case the last report was lost with the worker that made it
            self.reporter.chunk(self.job_id, record)
        self.tracker.resumed_from(last["first_frame"] + last["frames"], last["total_frames"], last["frames"])
        return load_chunk_state(self.storage.fetch(last["state"], self.tmp / "resume.state.safetensors"))

    def __call__(self, chunk) -> None:
        from talkgen.media.video import AacTrack, write_mp4, write_ts_segment
        from talkgen.service.live import segment_key

        index, frames, first, total = int(chunk.index), chunk.frames, int(chunk.first_frame), int(chunk.total_frames)
        audio = None
        if self.soundtrack is not None:
            start, end = (round(f * self.rate / FPS) for f in (first, first + len(frames)))
            audio = self.soundtrack[start:end]
            if self.aac is None:
                self.aac = AacTrack(self.soundtrack, self.rate, total, fps=FPS)
        # No B-frames: the segment reuses this h264, and its decode order must be its frame order.
        video = write_mp4(self.tmp / f"chunk-{index:05d}.mp4", frames, audio, self.rate, fps=FPS, b_frames=False)
        segment = write_ts_segment(self.tmp / f"chunk-{index:05d}.ts", video, first, self.aac,
                                   last=first + len(frames) >= total, fps=FPS)
        state = save_chunk_state(chunk.state, self.tmp / f"chunk-{index:05d}.state.safetensors")
        record = {"index": index, "frames": len(frames), "first_frame": first, "total_frames": total,
                  "duration_s": round(len(frames) / FPS, 3),
                  "uri": self.put(self.key(f"chunks/{index:05d}.mp4"), video, "video/mp4"),
                  "segment": self.put(segment_key(self.job_id, index), segment, "video/mp2t"),
                  "state": self.put(self.key(f"chunks/{index:05d}.state.safetensors"), state)}
        for path in (video, segment, state):
            path.unlink(missing_ok=True)
        self.done = [c for c in self.done if c["index"] < index] + [record]
        marker = self.tmp / "resume.json"
        marker.write_text(json.dumps({"chunks": self.done}))
        self.put(self.key("resume.json"), marker, "application/json")
        self.tracker.chunk_finished(first + len(frames), int(chunk.total_frames))
        self.reporter.chunk(self.job_id, record)
        self.reporter.progress(self.job_id, self.tracker(ProgressEvent("stored", chunk=index)))

    def stitch(self, rest: Path, soundtrack, target: Path) -> tuple[Path, int]:
        """The whole video of a resumed job: the chunks finished before, then what this attempt made
        (decoded and encoded once more, with the whole soundtrack)."""
        from talkgen.media.video import Mp4Writer

        writer = None
        try:
            sources = [self.storage.fetch(c["uri"], self.tmp / f"earlier-{c['index']:05d}.mp4") for c in self.before]
            if rest.exists():
                sources.append(rest)
            for path in sources:
                for frames in _decoded(path):
                    if writer is None:
                        height, width = frames.shape[1:3]
                        writer = Mp4Writer(target, width, height, soundtrack, self.rate, fps=FPS)
                    writer.write(frames)
        finally:
            if writer is not None:
                writer.close()
        return target, writer.frames_written if writer is not None else 0


@contextmanager
def capture_soundtrack(pipeline, sink: ChunkSink | None):
    """Let the chunk sink see the soundtrack the pipeline prepares (each chunk's mp4 carries its
    stretch of it). The pipeline's chunks carry frames only; this reads ``prepare``'s result."""
    original = getattr(pipeline, "prepare", None)
    if sink is None or original is None:
        yield
        return

    def prepare(*args, **kwargs):
        inputs = original(*args, **kwargs)
        sink.soundtrack = getattr(inputs, "soundtrack", None)
        sink.rate = getattr(inputs, "soundtrack_rate", SPEECH_RATE)
        return inputs

    pipeline.prepare = prepare
    try:
        yield
    finally:
        del pipeline.prepare


def save_chunk_state(state, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"latent": state.latent.detach().cpu().contiguous()}, str(path),
              metadata={"index": str(state.index), "start": str(state.start), "frames_done": str(state.frames_done)})
    return path


def load_chunk_state(path: Path):
    from safetensors import safe_open

    from talkgen.pipeline.chunks import ChunkState

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        latent = f.get_tensor("latent")
    return ChunkState(index=int(meta["index"]), start=int(meta["start"]), latent=latent,
                      frames_done=int(meta["frames_done"]))


def _decoded(path: Path, batch: int = 32):
    """uint8 RGB frames of an mp4, a few at a time."""
    import av
    import numpy as np

    with av.open(str(path)) as container:
        frames = []
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == batch:
                yield np.stack(frames)
                frames = []
        if frames:
            yield np.stack(frames)


def _accepts(function, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _suffix(uri: str) -> str:
    return PurePosixPath(urlparse(uri).path).suffix


def _release_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # never let cleanup fail a job
        pass


def worker_devices(settings: Settings) -> list[str | None]:
    """One device (GPU set) per embedded worker: every GPU by default, else one CPU worker."""
    if settings.device:
        return [settings.device] * (settings.workers if settings.workers is not None else 1)
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices: list[str | None] = [f"cuda:{i}" for i in range(count)] or ["cpu"]
    if settings.workers is not None:
        devices = (devices * settings.workers)[: settings.workers]
    return devices
