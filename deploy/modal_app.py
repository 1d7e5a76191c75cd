"""talkgen on Modal: a GPU class that keeps the model loaded, the weights on a Modal Volume, the
results in S3 (credentials from a Modal Secret), the same :class:`talkgen.pipeline.Pipeline` and
the same job runner as ``talkgen worker`` (:class:`talkgen.service.worker.GenerationWorker`).

Set up once (see docs/service.md, "Serverless on Modal")::

    modal volume create talkgen-weights
    modal run deploy/modal_app.py::download_weights           # talkgen download into the volume
    modal secret create talkgen-s3 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \\
        TALKGEN_STORAGE=s3://my-bucket/talkgen [TALKGEN_S3_ENDPOINT_URL=https://...]
    modal deploy deploy/modal_app.py

Call it from Python (``modal.Cls.from_name("talkgen", "Generator")().generate.remote({...})``) or
``modal run deploy/modal_app.py --image s3://... --audio s3://...``. A request::

    {"image": "s3://bucket/in/portrait.png",            # or "video"; s3:// URI or raw bytes
     "audio": "s3://bucket/in/speech.wav", "audio2": ..., # bytes also as {"data": b"...", "name": "a.wav"}
     "params": {"prompt": "A woman is talking", "preset": "fast", ...},   # GenerationRequest fields
     "job_id": "optional; a retry with the same id resumes a streaming job after its last chunk"}

returns ``{"id", "status": "succeeded", "uri": "s3://.../jobs/<id>/video.mp4", "url": <presigned>,
"frames", "fps", "duration_s", "seed", "bytes", "notes"}`` or ``{"id", "status": "failed", "error"}``.

Settings are the service's ``TALKGEN_*`` variables (the image sets the model, the weights path and
a scratch data dir; the secret adds the storage and S3 endpoint); boto3 reads ``AWS_*`` credentials
from the environment when ``TALKGEN_S3_ACCESS_KEY_ID`` is unset. Locally (tests), ``.local()``
runs the same code: ``file://`` URIs and local paths are accepted as inputs there.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import modal

APP_NAME = os.environ.get("TALKGEN_MODAL_APP", "talkgen")
GPU = os.environ.get("TALKGEN_MODAL_GPU", "H100")
WEIGHTS_VOLUME = os.environ.get("TALKGEN_MODAL_VOLUME", "talkgen-weights")
S3_SECRET = os.environ.get("TALKGEN_MODAL_SECRET", "talkgen-s3")
WEIGHTS_DIR = "/weights"  # where the volume is mounted in the container
REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger("talkgen.modal")

# The image: talkgen (this checkout) with its service extra (boto3 for S3), CUDA torch from PyPI.
image = (
    modal.Image.debian_slim(python_version="3.11")
    .apt_install("libsndfile1")
    .add_local_dir(REPO, "/opt/talkgen", copy=True,
                   ignore=[".git", ".venv", "**/__pycache__", "**/*.pyc", "tests", "shared", "deploy"])
    .run_commands("pip install '/opt/talkgen[service]'")
    .env({"TALKGEN_MODEL": os.environ.get("TALKGEN_MODAL_MODEL", "multitalk"), "TALKGEN_WEIGHTS": WEIGHTS_DIR,
          "TALKGEN_DATA_DIR": "/tmp/talkgen", "HF_HUB_DISABLE_TELEMETRY": "1"})
)

volume = modal.Volume.from_name(WEIGHTS_VOLUME, create_if_missing=True)
s3_secret = modal.Secret.from_name(S3_SECRET)

app = modal.App(APP_NAME, image=image)


class _Outcome:
    """The worker's Reporter for one synchronous call: every job runs, progress goes to the log,
    what became of the job is kept for the return value."""

    def __init__(self):
        self.kind: str | None = None
        self.data: dict = {}

    def start(self, order, worker: str) -> bool:
        return True

    def progress(self, job_id: str, data: dict) -> None:
        log.debug("job %s: %s", job_id, data)

    def chunk(self, job_id: str, data: dict) -> None:
        log.info("job %s: chunk %d stored (%s)", job_id, data["index"], data["uri"])

    def finish(self, order, kind: str, data: dict) -> None:
        self.kind, self.data = kind, dict(data)

    def should_cancel(self, job_id: str) -> bool:
        return False


_MAGIC = [(b"\x89PNG", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"RIFF", ".wav"), (b"fLaC", ".flac"), (b"OggS", ".ogg"),
          (b"ID3", ".mp3"), (b"\x1a\x45\xdf\xa3", ".webm")]


def _suffix_of(data: bytes, name: str | None) -> str:
    if name and Path(name).suffix:
        return Path(name).suffix.lower()
    if data[4:8] == b"ftyp":
        return ".mp4"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((suffix for magic, suffix in _MAGIC if data.startswith(magic)), "")


def stage_inputs(request: dict, folder: Path, allow_local: bool) -> dict[str, str]:
    """The request's inputs as URIs the worker fetches: s3:// URIs as they are, bytes written to
    ``folder`` (file:// URIs); local paths / file:// URIs only when ``allow_local`` (tests, or a
    file on a volume of this container)."""
    from talkgen.errors import InputError

    inputs = {}
    for name in ("image", "video", "audio", "audio2"):
        value = request.get(name)
        if value is None:
            continue
        if isinstance(value, dict) and "data" in value:
            data, filename = value["data"], value.get("name")
        else:
            data, filename = value, None
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data)
            target = folder / f"{name}{_suffix_of(data, filename)}"
            target.write_bytes(data)
            inputs[name] = target.as_uri()
        elif isinstance(data, str) and data.startswith("s3://"):
            inputs[name] = data
        elif isinstance(data, str) and allow_local and (data.startswith("file://") or Path(data).is_absolute()):
            inputs[name] = data if data.startswith("file://") else Path(data).as_uri()
        else:
            raise InputError(f"Invalid request: {name}: give an s3://bucket/key URI or the file's bytes"
                             f"{' (or an absolute path)' if allow_local else ''}, not {type(data).__name__} {str(data)[:80]!r}.")
    if "image" in inputs and "video" in inputs:
        raise InputError("Invalid request: give either 'image' or 'video', not both.")
    if not ({"image", "video"} & inputs.keys()) or "audio" not in inputs:
        raise InputError("Invalid request: 'image' (or 'video') and 'audio' are required.")
    return inputs


@app.cls(gpu=GPU, volumes={WEIGHTS_DIR: volume}, secrets=[s3_secret], timeout=2 * 60 * 60, scaledown_window=10 * 60,
         retries=modal.Retries(max_retries=2, initial_delay=5.0), max_containers=int(os.environ.get("TALKGEN_MODAL_MAX_GPUS", "4")))
class Generator:
    """One container = one GPU with the pipeline loaded once (``@modal.enter``), one job at a time."""

    @modal.enter()
    def load(self) -> None:
        from talkgen.service.settings import Settings
        from talkgen.service.storage import open_storage
        from talkgen.service.worker import GenerationWorker

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.settings = Settings()
        self.storage = open_storage(self.settings)
        self.stopping = threading.Event()
        self.worker = GenerationWorker(self.settings, self.storage, device=self.settings.device, name="modal")
        self.worker.load()  # tiny: writes the tiny model first
        log.info("model %s loaded from %s; results go to %s", self.settings.model, self.settings.weights_dir,
                 self.settings.storage or "local storage")

    @modal.exit()
    def stop(self) -> None:
        self.stopping.set()  # a running job stops at its next step; Modal's retry resumes it

    @modal.method()
    def generate(self, request_json: dict) -> dict:
        """Run one job (see the module's docstring for the request and the answer)."""
        from talkgen.errors import TalkgenError
        from talkgen.service.worker import JobOrder

        job_id = str(request_json.get("job_id") or uuid.uuid4().hex)
        try:
            params = dict(request_json.get("params") or {})
            with tempfile.TemporaryDirectory(prefix=f"talkgen-modal-{job_id}-") as tmp:
                inputs = stage_inputs(request_json, Path(tmp), allow_local=_local_inputs_allowed())
                outcome = _Outcome()
                self.worker.run(JobOrder(job_id=job_id, params=params, inputs=inputs), outcome, self.stopping)
        except TalkgenError as exc:
            return {"id": job_id, "status": "failed", "error": str(exc)}
        if outcome.kind == "requeued":  # the container is shutting down: fail the call so Modal retries it
            raise RuntimeError(f"job {job_id} interrupted by shutdown; retry with the same job_id to resume")
        answer: dict[str, Any] = {"id": job_id, "status": outcome.kind, **outcome.data}
        if outcome.kind == "succeeded":
            answer["url"] = self.storage.download_url(answer["uri"], filename=f"{job_id}.mp4")
        return answer


def _local_inputs_allowed() -> bool:
    """Paths are inputs only off Modal (tests) or when explicitly allowed (files on a mounted volume)."""
    return modal.is_local() or os.environ.get("TALKGEN_MODAL_ALLOW_PATHS") == "1"


@app.function(volumes={WEIGHTS_DIR: volume}, timeout=4 * 60 * 60)
def download_weights(model: str = "multitalk", people: str = "single") -> None:
    """Fill the weights volume once (``talkgen download``; files already there are kept)."""
    import subprocess

    subprocess.run(["talkgen", "download", "--dir", WEIGHTS_DIR, "--model", model, "--people", people], check=True)
    volume.commit()


@app.local_entrypoint()
def main(image: str = "", audio: str = "", audio2: str = "", video: str = "", params: str = "{}") -> None:
    """``modal run deploy/modal_app.py --image s3://... --audio s3://... --params '{"prompt": "..."}'``;
    local file paths are uploaded as bytes."""
    import json

    request: dict[str, Any] = {"params": json.loads(params)}
    for name, value in (("image", image), ("video", video), ("audio", audio), ("audio2", audio2)):
        if value:
            request[name] = value if value.startswith("s3://") else {"data": Path(value).read_bytes(), "name": Path(value).name}
    print(json.dumps(Generator().generate.remote(request), indent=2))
