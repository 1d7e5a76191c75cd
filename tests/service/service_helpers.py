"""Helpers of the service tests (imported by conftest.py and the tests)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
# Tiny jobs: one sampling step, 5 frames (0.2 s of video). A few seconds each on a CPU.
FAST = {"sample_steps": 1, "frame_num": 5, "prompt": "A person is talking."}


# ------------------------------------------------------------------------------------------------
# Helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def find_program(name: str) -> str:
    """The program's path; installs it (idempotent script) if missing; skips only if that fails."""
    def lookup():
        candidate = VENV_BIN / name
        return str(candidate) if candidate.exists() else shutil.which(name)

    path = lookup()
    if path is None:
        result = subprocess.run(["bash", str(REPO / "scripts" / "install_test_servers.sh")], capture_output=True,
                                text=True, timeout=900)
        path = lookup()
        if path is None:
            pytest.skip(f"{name} is not installed and scripts/install_test_servers.sh could not install it: "
                        f"{result.stderr.strip() or 'no reason given'}")
    return path


def stop_process(process: subprocess.Popen, grace: float = 5.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def service_env(**settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALKGEN_")}
    env.update({f"TALKGEN_{k.upper()}": str(v) for k, v in settings.items() if v is not None})
    env.setdefault("OMP_NUM_THREADS", "1")  # two CPU workers side by side on two cores
    return env


class Api:
    """A small client for the job API."""

    def __init__(self, base_url: str, api_key: str | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=60)

    def submit(self, inputs: dict[str, Path], **params) -> str:
        files = {name: (path.name, path.read_bytes()) for name, path in inputs.items()}
        response = self.http.post("/v1/jobs", files=files, data={"params": json.dumps({**FAST, **params})})
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def job(self, job_id: str) -> dict:
        response = self.http.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout: float = 120) -> dict:
        return wait_until(lambda: (j := self.job(job_id))["status"] in statuses and j, timeout, 0.2,
                          f"job {job_id} to be {'/'.join(statuses)}")

    def close(self):
        self.http.close()
