"""Scale-out: the API queues in a real redis-server, `talkgen worker` processes run the jobs."""

from __future__ import annotations

import json
import uuid
from collections import Counter

import av
import numpy as np
import pytest
import redis
import soundfile as sf

from talkgen.media.samples import sample_speech

from .service_helpers import Api, service_env, wait_until
from .test_service_live import check_continuous, fetch_segments, parse_playlist

# Dead-worker detection fast enough for a test: a worker silent for 5 s is dead, and every
# broker call looks for dead workers (production: 60 s, 1% of calls).
FAST_RECOVERY = dict(heartbeat_timeout_s=5, redis_maintenance_chance=1_000_000, job_lease_s=4, max_attempts=3)


@pytest.fixture()
def cluster(tmp_path, redis_url, tiny_weights, live_server, processes):
    """An API server (no embedded worker) on a fresh queue name, and a way to start workers."""
    queue = f"t{uuid.uuid4().hex[:8]}"
    storage = tmp_path / "shared-storage"  # what a shared volume would be between machines
    server = live_server(redis_url=redis_url, queue_name=queue, storage=str(storage), workers=0, **FAST_RECOVERY)
    shared = storage

    class Cluster:
        api = Api(server.url)
        queue_name = queue
        storage = shared
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        workers: list = []

        def start_worker(self, name: str):
            env = service_env(queue_name=queue, **FAST_RECOVERY)
            worker = processes(["worker", "--redis", redis_url, "--model", "tiny", "--weights", str(tiny_weights),
                                "--storage", str(storage), "--device", "cpu"], env, tmp_path / f"{name}.log")
            self.workers.append(worker)
            return worker

        def wait_workers(self, count: int, timeout: float = 90):
            def ready():
                for worker in self.workers:
                    assert worker.alive() or worker.process.returncode == -9, worker.log()[-3000:]
                return len(self.api.http.get("/v1/health").json()["workers"]) >= count
            wait_until(ready, timeout, 0.25, f"{count} worker(s) to be ready")

        def started_events(self) -> Counter:
            entries = self.client.xrange(f"{queue}:events")
            return Counter(fields["job"] for _, fields in entries if fields["kind"] == "started")

    cluster = Cluster()
    yield cluster
    cluster.api.close()
    cluster.client.close()


JOBS = 20  # the service issue's figure


def test_two_workers_share_the_jobs_none_lost_none_run_twice(cluster, inputs) -> None:
    cluster.start_worker("a")
    cluster.start_worker("b")
    cluster.wait_workers(2)
    ids = [cluster.api.submit(inputs, seed=i) for i in range(JOBS)]
    jobs = [cluster.api.wait(job_id, timeout=600) for job_id in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * JOBS, [j["error"] for j in jobs]
    assert all(j["attempts"] == 1 for j in jobs)
    started = cluster.started_events()
    assert all(started[job_id] == 1 for job_id in ids), started  # each ran exactly once
    by_worker = Counter(j["worker"] for j in jobs)
    assert len(by_worker) == 2, by_worker  # both took part
    assert {j["result"]["seed"] for j in jobs} == set(range(JOBS))

    # SIGTERM hands the running job back: another worker runs it, and the hand-back is no failed try.
    job_id = cluster.api.submit(inputs, sample_steps=40)
    running = wait_until(lambda: (j := cluster.api.job(job_id))["progress"] and j["progress"]["stage"] == "sample"
                         and j, 60, 0.05, "sampling")
    stopped = next(w for w in cluster.workers if f":{w.pid}:" in running["worker"])
    stopped.stop()
    assert "job %s: requeued" % job_id in stopped.log()
    job = cluster.api.wait(job_id, timeout=120)
    assert job["status"] == "succeeded" and job["attempts"] == 1 and f":{stopped.pid}:" not in job["worker"]
    assert cluster.started_events()[job_id] == 2

    # Cancel reaches a remote worker at its next step.
    job_id = cluster.api.submit(inputs, sample_steps=300)
    wait_until(lambda: (p := cluster.api.job(job_id)["progress"]) and p["stage"] == "sample", 60, 0.1, "sampling")
    assert cluster.api.http.delete(f"/v1/jobs/{job_id}").status_code == 202
    job = cluster.api.wait(job_id, timeout=60)
    assert job["status"] == "cancelled" and job["progress"]["step"] < 300


def test_a_worker_killed_mid_stream_loses_nothing_and_the_stream_resumes(cluster, inputs, tmp_path) -> None:
    speech = tmp_path / "long.wav"  # 1.2 s = 30 frames: chunks of 9, 8, 8, 5 new frames
    sf.write(speech, np.asarray(sample_speech(1.2), dtype=np.float32), 16_000)
    first = cluster.start_worker("first")
    cluster.wait_workers(1)
    job_id = cluster.api.submit({"image": inputs["image"], "audio": speech}, mode="streaming", frame_num=9,
                                motion_frame=1, sample_steps=1)
    wait_until(lambda: cluster.api.job(job_id)["chunks"], 90, 0.05, "the first chunk")
    # Another job that has already been started (and its worker died) as often as allowed: it
    # must end failed with the reason, not loop forever.
    doomed = cluster.api.submit(inputs)
    cluster.client.set(f"{cluster.queue_name}:job:{doomed}:attempts", 3)
    # A job cancelled while queued never starts anywhere.
    dropped = cluster.api.submit(inputs)
    assert cluster.api.http.delete(f"/v1/jobs/{dropped}").json()["status"] == "cancelled"
    first.kill9()
    kept = json.loads((cluster.storage / "jobs" / job_id / "resume.json").read_text())["chunks"]
    assert kept and kept[-1]["index"] < 3, "killed too late: the stream had finished"

    cluster.start_worker("second")
    job = cluster.api.wait(job_id, timeout=180)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2 and cluster.started_events()[job_id] == 2
    assert f":{first.pid}:" not in job["worker"]
    # The second attempt made only the chunks after the last one kept, and the video is whole.
    events = [f for _, f in cluster.client.xrange(f"{cluster.queue_name}:events") if f["job"] == job_id]
    restart = [i for i, f in enumerate(events) if f["kind"] == "started"][1]
    sampled = {json.loads(f["data"])["chunk"] for f in events[restart:]
               if f["kind"] == "progress" and json.loads(f["data"])["stage"] == "sample"}
    assert sampled == set(range(kept[-1]["index"] + 1, 4)), (kept, sampled)
    assert [c["index"] for c in job["chunks"]] == [0, 1, 2, 3]
    video = cluster.api.http.get(job["result"]["video_url"])
    (tmp_path / "whole.mp4").write_bytes(video.content)
    with av.open(str(tmp_path / "whole.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == job["result"]["frames"] == 30
    # Its live playlist plays as one stream: the segments of both attempts, no seam where the worker died.
    tags, segments = parse_playlist(cluster.api.http.get(job["live_url"]).text)
    assert tags[-1] == "#EXT-X-ENDLIST" and len(segments) == 4
    check_continuous(fetch_segments(cluster.api.http, cluster.api.base_url + job["live_url"], segments, tmp_path), 30)

    failed = cluster.api.wait(doomed, timeout=60)
    assert failed["status"] == "failed" and "started 3 times" in failed["error"]
    wait_until(lambda: "not run here" in "".join(w.log() for w in cluster.workers), 30, 0.2, "the cancelled copy")
    assert cluster.api.job(dropped)["status"] == "cancelled" and cluster.started_events()[dropped] == 0
