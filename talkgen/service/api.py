"""The HTTP API and the web page. Routes validate, authorize, hand over and answer: the job store
owns state, the queue owns delivery, the workers own the model.

Errors are the engine's own sentences: ``InputError`` -> 422 (413 for a body over the limit),
``WeightsError``/``ResourceError`` -> 503, any other ``TalkgenError`` -> 500, as
``{"error": "...", "type": "InputError"}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.datastructures import UploadFile

from talkgen import __version__
from talkgen.errors import InputError, ResourceError, TalkgenError, WeightsError
from talkgen.service import live
from talkgen.service.faults import disk_full
from talkgen.service.intake import Intake, UploadTooLarge, parse_params
from talkgen.service.jobs import Job, JobStore
from talkgen.service.schemas import (INPUT_FIELDS, PRESET_NOTES, PRESETS, ErrorBody, Health, JobCreated, JobList,
                                     JobView, NotReadyBody, Preset, S3JobRequest)
from talkgen.service.settings import Settings
from talkgen.service.storage import Storage, open_storage

log = logging.getLogger("talkgen.service.api")
STATIC = Path(__file__).parent / "static"


# ------------------------------------------------------------------------------------------------
# Plumbing: change notification, metrics, the request-size limit


class Notifier:
    """Wakes SSE streams when their job changes (the store calls it from any thread)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._watchers: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def __call__(self, job: Job, _before: str) -> None:
        with self._lock:
            watchers = list(self._watchers.get(job.id, ()))
        for loop, event in watchers:
            loop.call_soon_threadsafe(event.set)

    @asynccontextmanager
    async def watch(self, job_id: str) -> AsyncIterator[asyncio.Event]:
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._watchers.setdefault(job_id, set()).add(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                self._watchers[job_id].discard(entry)
                if not self._watchers[job_id]:
                    del self._watchers[job_id]


class Metrics:
    """Prometheus metrics on a registry of this app's own."""

    def __init__(self, store: JobStore, queue):
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.core import GaugeMetricFamily

        self.registry = CollectorRegistry()
        self.submitted = Counter("talkgen_jobs_submitted", "Jobs accepted (202).", registry=self.registry)
        self.finished = Counter("talkgen_jobs_finished", "Jobs that ended, by status.", ["status"], registry=self.registry)
        buckets = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, float("inf"))
        self.duration = Histogram("talkgen_job_run_seconds", "Time from start to end of a job.", buckets=buckets,
                                  registry=self.registry)
        self.waited = Histogram("talkgen_job_queue_seconds", "Time a job waited before it started.", buckets=buckets,
                                registry=self.registry)

        class Current:
            def collect(self):
                jobs = GaugeMetricFamily("talkgen_jobs", "Jobs in the store, by status.", labels=["status"])
                for status, count in store.counts().items():
                    jobs.add_metric([status], count)
                yield jobs
                workers = GaugeMetricFamily("talkgen_workers", "Workers, by state.", labels=["state"])
                states: dict[str, int] = {}
                for worker in queue.health():
                    states[worker["state"]] = states.get(worker["state"], 0) + 1
                for state, count in states.items():
                    workers.add_metric([state], count)
                yield workers

        self.registry.register(Current())

    def __call__(self, job: Job, before: str) -> None:
        if before == job.status:
            return
        if job.status == "running" and before == "queued" and job.started_at:
            self.waited.observe(max(0.0, job.started_at - job.created_at))
        if job.terminal:
            self.finished.labels(job.status).inc()
            if job.started_at and job.finished_at:
                self.duration.observe(max(0.0, job.finished_at - job.started_at))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class BodyLimit:
    """Refuse request bodies over the limit while they stream in: at once from Content-Length,
    else as soon as the bytes received pass it (nothing over the limit is ever spooled)."""

    def __init__(self, app, limit: int, paths: tuple[str, ...] = ("/v1/jobs",)):
        self.app, self.limit, self.paths = app, limit, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error_response(413, UploadTooLarge(self._message()))(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise UploadTooLarge(self._message())
            return message

        return await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return (f"The request is larger than {self.limit / 2**20:g} MiB (TALKGEN_MAX_UPLOAD_MB): send shorter speech "
                "or a smaller image, or put the inputs in S3 and send their s3:// URIs.")


# A JSON job names its inputs; it never carries them. A few kB is typical.
MAX_JSON_BODY = 1 << 20


async def read_json_body(request: Request) -> bytes:
    """The body of a JSON job, refused past MAX_JSON_BODY as it arrives (not the upload limit: a
    JSON body held in memory at that size would let a few requests exhaust the server's memory)."""
    too_large = UploadTooLarge(f"A JSON job body is at most {MAX_JSON_BODY >> 10} KiB: it names its inputs "
                               "(s3:// URIs); upload files as multipart/form-data instead.")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_JSON_BODY:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_JSON_BODY:
            raise too_large
    return bytes(body)


@asynccontextmanager
async def read_form(request: Request):
    """The multipart form; Starlette spools files over 1 MiB to TMPDIR while parsing, so a full disk
    there is a 503 naming the folder rather than a 500."""
    try:
        form = await request.form(max_files=len(INPUT_FIELDS), max_fields=len(INPUT_FIELDS) + 1)
    except OSError as exc:
        if disk_full(exc):
            raise ResourceError(f"No space left in the server's temporary folder (TMPDIR) ({exc.strerror}): the "
                                "server cannot keep the upload; try again later (operators: free disk space).") from None
        raise
    try:
        yield form
    finally:
        await form.close()


def error_response(status: int, exc: Exception, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": str(exc), "type": type(exc).__name__}, status_code=status, headers=headers)


def status_of(exc: TalkgenError) -> int:
    if isinstance(exc, UploadTooLarge):
        return 413
    if isinstance(exc, InputError):
        return 422
    if isinstance(exc, (WeightsError, ResourceError)):
        return 503
    return 500


# ------------------------------------------------------------------------------------------------
# The service object and its dependencies


class Service:
    def __init__(self, settings: Settings, queue_factory=None):
        self.settings = settings
        self.store = JobStore(settings.database_path)
        self.storage: Storage = open_storage(settings)
        if queue_factory is not None:
            self.queue = queue_factory(settings, self.store, self.storage)
        elif settings.redis_url:
            from talkgen.service.queue import RedisQueue

            self.queue = RedisQueue(settings, self.store, self.storage)
        else:
            from talkgen.service.queue import EmbeddedQueue

            self.queue = EmbeddedQueue(settings, self.store, self.storage)
        self.intake = Intake(self.store, self.queue, self.storage, settings)
        self.notifier = Notifier()
        self.metrics = Metrics(self.store, self.queue)
        self.store.subscribe(self.notifier)
        self.store.subscribe(self.metrics)

    def job(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise HTTPException(404, f"No job {job_id}: check the id (GET /v1/jobs lists jobs).")
        return job


def service(request: Request) -> Service:
    return request.app.state.service


def authorize(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """`Authorization: Bearer KEY` against every configured key, in constant time."""
    keys = request.app.state.service.settings.api_keys
    if not keys:
        return
    scheme, _, token = (authorization or "").partition(" ")
    # Digests first: equal lengths, so not even a key's length shows in the time taken.
    given = hashlib.sha256(token.strip().encode()).digest()
    matched = False
    for key in keys:  # no early exit: the time taken does not depend on which key matched
        matched |= hmac.compare_digest(given, hashlib.sha256(key.get_secret_value().encode()).digest())
    if scheme.lower() != "bearer" or not matched:
        raise HTTPException(401, "A valid API key is required: send 'Authorization: Bearer KEY' (keys are set "
                                 "with TALKGEN_API_KEYS on the server).", headers={"WWW-Authenticate": "Bearer"})


ServiceDep = Annotated[Service, Depends(service)]
Authorized = [Depends(authorize)]


# ------------------------------------------------------------------------------------------------
# The app


def create_app(settings: Settings | None = None, queue_factory=None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = Service(settings, queue_factory)
        app.state.service = svc
        svc.queue.start()
        try:
            yield
        finally:
            await run_in_threadpool(svc.queue.stop)

    app = FastAPI(title="talkgen", version=__version__, lifespan=lifespan,
                  description="Portrait + speech -> talking video (MultiTalk / InfiniteTalk).",
                  responses={401: {"model": ErrorBody}, 422: {"model": ErrorBody}})
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)

    @app.exception_handler(TalkgenError)
    async def talkgen_error(_request: Request, exc: TalkgenError):
        return error_response(status_of(exc), exc)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and Starlette's own (404, 405, bad multipart)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": exc.detail, "type": "HTTPError"}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"] if p != "body")
            parts.append(f"{where}: {error['msg']}" if where else error["msg"])
        return error_response(422, InputError("Invalid request: " + "; ".join(parts) + "."))

    # -- jobs ------------------------------------------------------------------------------------

    multipart_schema = {
        "type": "object",
        "properties": {
            "image": {"type": "string", "format": "binary", "description": "the portrait"},
            "video": {"type": "string", "format": "binary", "description": "a video to dub (instead of image)"},
            "audio": {"type": "string", "format": "binary", "description": "speech of person 1"},
            "audio2": {"type": "string", "format": "binary", "description": "speech of person 2"},
            "params": {"type": "string", "description": "JSON object of generation options, e.g. "
                                                        '{"prompt": "...", "preset": "fast", "sample_steps": 20}'},
        },
        "required": ["audio"],
    }

    @app.post("/v1/jobs", status_code=202, response_model=JobCreated, dependencies=Authorized,
              summary="Submit a job (multipart files, or JSON naming s3:// inputs)",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "multipart/form-data": {"schema": multipart_schema},
                  "application/json": {"schema": S3JobRequest.model_json_schema()}}}})
    async def submit(request: Request, svc: ServiceDep) -> JobCreated:
        refusal = await run_in_threadpool(svc.queue.accepting)  # a Redis ping: not on the event loop
        if refusal:
            raise ResourceError(refusal)
        content_type = request.headers.get("content-type", "").lower()  # media types are case-insensitive
        if content_type.startswith("multipart/form-data"):
            async with read_form(request) as form:
                unknown = sorted(set(form.keys()) - {*INPUT_FIELDS, "params"})
                if unknown:
                    raise InputError(f"Invalid request: {unknown[0]}: not a known field; send image (or video), "
                                     "audio, audio2 and params.")
                twice = sorted(name for name in form.keys() if len(form.getlist(name)) > 1)
                if twice:
                    raise InputError(f"Invalid request: {twice[0]}: sent {len(form.getlist(twice[0]))} times; send "
                                     "each field once (a second speaker is 'audio2').")
                if isinstance(form.get("params"), UploadFile):
                    raise InputError("Invalid request: params must be a text field holding a JSON object, not a file.")
                uploads = {}
                for name in INPUT_FIELDS:
                    value = form.get(name)
                    if isinstance(value, UploadFile):
                        uploads[name] = (value.filename, value.file)
                    elif value:
                        raise InputError(f"Invalid request: {name} must be a file upload.")
                params = form.get("params")
                job = await run_in_threadpool(svc.intake.submit_files,
                                              parse_params(params if isinstance(params, str) else None), uploads)
        elif content_type.startswith("application/json"):
            try:
                body = S3JobRequest.model_validate_json(await read_json_body(request))
            except ValueError as exc:
                from talkgen.service.intake import describe_body_error

                raise InputError(describe_body_error(exc)) from None
            job = await run_in_threadpool(svc.intake.submit_s3, body)
        else:
            raise InputError("Send the job as multipart/form-data (files image, audio, audio2, params) or as "
                             "application/json naming s3:// inputs.")
        svc.metrics.submitted.inc()
        return JobCreated(id=job.id, status=job.status, url=f"/v1/jobs/{job.id}")

    @app.get("/v1/jobs", response_model=JobList, dependencies=Authorized, summary="Recent jobs, newest first")
    def list_jobs(svc: ServiceDep, status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
                  limit: Annotated[int, Query(ge=1, le=500)] = 50,
                  offset: Annotated[int, Query(ge=0, le=2**31)] = 0) -> JobList:
        return JobList(jobs=[JobView.of(j) for j in svc.store.list(status, limit, offset)])

    @app.get("/v1/jobs/{job_id}", response_model=JobView, dependencies=Authorized, summary="Status and progress")
    def get_job(job_id: str, svc: ServiceDep) -> JobView:
        return JobView.of(svc.job(job_id))

    @app.get("/v1/jobs/{job_id}/events", dependencies=Authorized, summary="Status as server-sent events",
             response_description="`event: job` with the job (as GET /v1/jobs/{id}) on every change, "
                                  "then `event: end` when it has ended")
    async def job_events(job_id: str, svc: ServiceDep):
        from sse_starlette import EventSourceResponse

        svc.job(job_id)  # 404 before the stream starts

        async def stream():
            async with svc.notifier.watch(job_id) as changed:
                seq = -1
                while True:
                    changed.clear()
                    job = svc.store.get(job_id)
                    if job.seq != seq:
                        seq = job.seq
                        yield {"event": "job", "id": str(seq), "data": JobView.of(job).model_dump_json()}
                    if job.terminal:
                        yield {"event": "end", "data": JobView.of(job).model_dump_json()}
                        return
                    try:
                        await asyncio.wait_for(changed.wait(), timeout=5)
                    except TimeoutError:
                        pass

        return EventSourceResponse(stream(), ping=15)

    @app.get("/v1/jobs/{job_id}/video", dependencies=Authorized, summary="The mp4 (or a redirect to S3)",
             responses={200: {"content": {"video/mp4": {}}}, 307: {"description": "presigned S3 URL"},
                        409: {"model": NotReadyBody, "description": "no mp4 yet (`Retry-After`); a streaming job's "
                                                                    "`live_url` plays the part finished so far"}})
    def get_video(job_id: str, svc: ServiceDep):
        job = svc.job(job_id)
        if job.status != "succeeded":
            return not_ready(job)
        return serve_object(svc.storage, job.result["uri"], f"talkgen-{job.id}.mp4")

    @app.get("/v1/jobs/{job_id}/chunks/{index}", dependencies=Authorized,
             summary="One finished chunk (streaming jobs), watchable while the job runs")
    def get_chunk(job_id: str, index: int, svc: ServiceDep):
        job = svc.job(job_id)
        chunk = next((c for c in job.chunks if c["index"] == index), None)
        if chunk is None:
            raise HTTPException(404, f"Job {job_id} has no finished chunk {index} (it has {len(job.chunks)}).")
        return serve_object(svc.storage, chunk["uri"], f"talkgen-{job.id}-{index:05d}.mp4")

    @app.get("/v1/jobs/{job_id}/live.m3u8", dependencies=Authorized,
             summary="The part finished so far as an HLS playlist (streaming jobs), watchable while the job runs",
             response_description="`EVENT` playlist of the finished chunks' segments; `EXT-X-ENDLIST` once the job "
                                  "has ended. Segments are `live/<n>.ts` here, or presigned URLs when results are in S3",
             responses={200: {"content": {live.PLAYLIST_TYPE: {}}}, 404: {"model": ErrorBody}})
    def get_live_playlist(job_id: str, svc: ServiceDep):
        job = svc.job(job_id)
        if not live.is_streaming(job):
            raise HTTPException(404, f"Job {job_id} is a clip (mode 'clip'): it is made in one piece, so there is no "
                                     f"live playlist; its mp4 is at /v1/jobs/{job_id}/video once it has succeeded.")

        def segment_url(chunk: dict) -> str:
            name = f"talkgen-{job.id}-{chunk['index']:05d}.ts"
            return svc.storage.download_url(chunk["segment"], name) or f"live/{chunk['index']:05d}.ts"

        return Response(live.playlist(job, segment_url), media_type=live.PLAYLIST_TYPE,
                        headers={"Cache-Control": "no-cache"})

    @app.get("/v1/jobs/{job_id}/live/{index}.ts", dependencies=Authorized,
             summary="One segment of the live playlist (MPEG-TS: one finished chunk, h264 + AAC)",
             responses={200: {"content": {live.SEGMENT_TYPE: {}}}, 307: {"description": "presigned S3 URL"}})
    def get_live_segment(job_id: str, index: int, svc: ServiceDep):
        job = svc.job(job_id)
        chunk = next((c for c in live.segments(job) if c["index"] == index), None)
        if chunk is None:
            raise HTTPException(404, f"Job {job_id} has no live segment {index} (it has {len(live.segments(job))}): "
                                     f"read /v1/jobs/{job_id}/live.m3u8 for the segments there are.")
        return serve_object(svc.storage, chunk["segment"], f"talkgen-{job.id}-{index:05d}.ts", live.SEGMENT_TYPE)

    @app.delete("/v1/jobs/{job_id}", response_model=JobView, dependencies=Authorized,
                summary="Cancel: a queued job ends now, a running one at its next step")
    def cancel_job(job_id: str, svc: ServiceDep):
        before = svc.job(job_id)
        job = svc.store.request_cancel(job_id)
        if not before.terminal:  # tell the workers too (a queued copy may already be on its way)
            svc.queue.cancel(job)
        return JSONResponse(JobView.of(job).model_dump(mode="json"), status_code=200 if job.terminal else 202)

    # -- the rest --------------------------------------------------------------------------------

    @app.get("/v1/presets", response_model=list[Preset], summary="Option presets for params.preset")
    def presets() -> list[Preset]:
        return [Preset(name=name, params=values, note=PRESET_NOTES[name]) for name, values in PRESETS.items()]

    @app.get("/v1/health", response_model=Health, summary="Liveness, workers and queue")
    def health(svc: ServiceDep) -> Health:
        workers = svc.queue.health()
        states = {w["state"] for w in workers}
        if svc.queue.accepting():
            status = "degraded"
        elif svc.queue.kind == "embedded" and "loading" in states:
            status = "loading"
        else:
            status = "ok"
        return Health(status=status, model=svc.settings.model, queue=svc.queue.kind, workers=workers,
                      jobs=svc.store.counts(), auth_required=bool(svc.settings.api_keys),
                      max_upload_mb=svc.settings.max_upload_mb)

    @app.get("/metrics", dependencies=Authorized, include_in_schema=False)
    def metrics(svc: ServiceDep) -> Response:
        body, content_type = svc.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def serve_object(storage: Storage, uri: str, filename: str, media_type: str = "video/mp4"):
    url = storage.download_url(uri, filename)
    if url is not None:
        return RedirectResponse(url, status_code=307)
    path = storage.local_path(uri)
    if path is None or not path.is_file():
        raise HTTPException(410, f"The stored file {uri} is gone from storage.")
    return FileResponse(path, media_type=media_type, filename=filename, content_disposition_type="inline")


def not_ready(job: Job) -> JSONResponse:
    """409 while there is no mp4. A streaming job's answer names its live playlist (``live_url``),
    where the part finished so far plays: a client asking for the mp4 gets JSON it can act on, not
    a playlist in place of a video file."""
    body = {"type": "NotReady"}
    if live.is_streaming(job):
        body["live_url"] = live.playlist_path(job.id)
    if job.status in ("failed", "cancelled"):
        message = f"Job {job.id} {job.status}: {job.error or 'no video was made'}"
        if job.chunks and live.is_streaming(job):
            message += f" (the {len(job.chunks)} chunk(s) it finished play from {body['live_url']})"
        return JSONResponse({"error": message, **body}, status_code=409)
    where = ""
    if job.progress:
        p = job.progress
        where = f" ({p['stage']} {p['step']}/{p['total']})" if p.get("total") else f" ({p['stage']})"
    hint = ""
    if "live_url" in body:
        hint = f"; the part finished so far plays from the HLS playlist {body['live_url']}, which grows as it is made"
        if job.chunks:
            hint += f" ({len(job.chunks)} finished chunk(s), also each at /v1/jobs/{job.id}/chunks/N)"
    message = (f"Job {job.id} is {job.status}{where}: the video is not ready yet{hint}. "
               f"Follow /v1/jobs/{job.id}/events or try again later.")
    return JSONResponse({"error": message, **body}, status_code=409, headers={"Retry-After": "5"})


def serve(settings: Settings) -> None:
    """Run the API (and its embedded workers) until interrupted."""
    import uvicorn

    settings.check_exposure()
    for line in settings.describe():
        log.info(line)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=30)

