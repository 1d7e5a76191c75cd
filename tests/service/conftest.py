"""Fixtures for the service tests: real servers on 127.0.0.1 (redis-server, SeaweedFS, talkgen
itself, in this process or as subprocesses), started here and stopped here.

A server program that is missing is installed with scripts/install_test_servers.sh first; only if
that is impossible is the test skipped, with the reason.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from talkgen.media.samples import sample_portrait, sample_speech

from .service_helpers import REPO, VENV_BIN, free_port, find_program, stop_process, wait_until  # noqa: F401


# ------------------------------------------------------------------------------------------------
# Inputs and weights


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    from talkgen.pipeline.tiny import ensure_tiny_weights

    return ensure_tiny_weights(tmp_path_factory.mktemp("tiny-weights"))


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    portrait, speech = folder / "portrait.png", folder / "speech.wav"
    Image.fromarray(sample_portrait((256, 256))).save(portrait)
    sf.write(speech, np.asarray(sample_speech(0.6), dtype=np.float32), 16_000)
    return {"image": portrait, "audio": speech}


# ------------------------------------------------------------------------------------------------
# Real servers


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    program = find_program("redis-server")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen([program, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                "--dir", str(folder), "--protected-mode", "yes"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)

    def up():
        try:
            return client.ping()
        except redis.ConnectionError:
            assert process.poll() is None, "redis-server exited at start"
            return False

    try:
        wait_until(up, 20, what="redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        stop_process(process)


S3_KEY, S3_SECRET, S3_BUCKET = "talkgen-test-key", "talkgen-test-secret", "talkgen-test"


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory) -> Iterator[dict]:
    """SeaweedFS (master + volume + filer + S3 gateway in one process) with one identity."""
    program = find_program("weed")
    folder = tmp_path_factory.mktemp("seaweedfs")
    (folder / "data").mkdir()
    config = folder / "s3.json"
    config.write_text(json.dumps({"identities": [{"name": "test", "credentials": [
        {"accessKey": S3_KEY, "secretKey": S3_SECRET}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {name: free_port() for name in ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc",
                                            "s3", "s3.grpc")}
    args = [program, "server", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
            f"-s3.config={config}", "-volume.max=20", "-master.telemetry=false", "-s3.port.iceberg=0",
            "-s3.port.lance=0", "-debug.port=0", "-master.volumeSizeLimitMB=64"]
    args += [f"-{name.replace('.grpc', '.port.grpc') if '.grpc' in name else name + '.port'}={port}"
             for name, port in ports.items()]
    log = open(folder / "weed.log", "wb")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    import boto3
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                      region_name="us-east-1", config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))

    def bucket_ready():
        assert process.poll() is None, f"weed exited at start: {(folder / 'weed.log').read_text()[-2000:]}"
        try:
            s3.create_bucket(Bucket=S3_BUCKET)
            return True
        except s3.exceptions.BucketAlreadyOwnedByYou:
            return True
        except Exception:
            return False

    try:
        wait_until(bucket_ready, 60, 0.5, "SeaweedFS's S3 gateway")
        # The first write waits for a volume to be assigned: do it here, not inside a test.
        wait_until(lambda: _try(lambda: s3.put_object(Bucket=S3_BUCKET, Key="ready", Body=b"1")), 60, 0.5,
                   "SeaweedFS to accept writes")
        yield {"endpoint": endpoint, "key": S3_KEY, "secret": S3_SECRET, "bucket": S3_BUCKET, "client": s3}
    finally:
        # weed shuts down slowly on SIGTERM: a short wait, then SIGKILL.
        stop_process(process, grace=3)
        log.close()


def _try(action) -> bool:
    try:
        action()
        return True
    except Exception:
        return False


# ------------------------------------------------------------------------------------------------
# talkgen servers and workers


class LiveServer:
    """`create_app` served by uvicorn in a thread of this process (its embedded worker included)."""

    def __init__(self, settings):
        import uvicorn

        from talkgen.service.api import create_app

        self.settings = settings
        self.port = settings.port
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 30, what="the in-process server")

    def wait_ready(self, timeout: float = 60):
        def ready():
            health = httpx.get(f"{self.url}/v1/health").json()
            return health["status"] == "ok" and health
        return wait_until(ready, timeout, 0.2, "the workers to load the model")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture()
def live_server(tmp_path, tiny_weights) -> Iterator:
    """A factory: ``live_server(**settings)`` starts a server; all are stopped after the test."""
    from talkgen.service.settings import Settings

    started: list[LiveServer] = []

    def start(**overrides) -> LiveServer:
        values = dict(model="tiny", weights=tiny_weights, data_dir=tmp_path / f"data{len(started)}",
                      port=free_port(), workers=1, device="cpu")
        values.update(overrides)
        server = LiveServer(Settings(**values))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class Process:
    """`talkgen serve` or `talkgen worker` as a subprocess, its output in a log file."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log_path = log
        self._log = open(log, "ab")
        self.process = subprocess.Popen([str(VENV_BIN / "talkgen"), *args], env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT, cwd=REPO)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self, grace: float = 15) -> None:
        stop_process(self.process, grace)
        self._log.close()


@pytest.fixture()
def processes() -> Iterator:
    """A factory for subprocesses (servers, workers); every one is stopped after the test."""
    started: list[Process] = []

    def start(args: list[str], env: dict, log: Path) -> Process:
        process = Process(args, env, log)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop(grace=5)
