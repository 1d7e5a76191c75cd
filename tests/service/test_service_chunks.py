"""Streaming jobs: every finished chunk is stored (mp4 + resume state) and watchable while the
job still runs; the final mp4 is the whole video."""

from __future__ import annotations

import json
import threading

import av
import numpy as np
import soundfile as sf

from talkgen.media.samples import sample_speech
from talkgen.service import worker as worker_module

from .service_helpers import Api, wait_until

STREAM = {"mode": "streaming", "frame_num": 9, "motion_frame": 1, "sample_steps": 1}


def frames_in(path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_finished_chunks_are_stored_and_watchable_before_the_job_ends(live_server, inputs, tmp_path,
                                                                      monkeypatch) -> None:
    # Hold the job after its first chunk until the test has looked at it.
    release, original = threading.Event(), worker_module.ChunkSink.__call__

    def held(self, chunk):
        original(self, chunk)
        if chunk.index == 0:
            assert release.wait(60)

    monkeypatch.setattr(worker_module.ChunkSink, "__call__", held)
    server = live_server()
    server.wait_ready()
    api = Api(server.url)
    try:
        check_the_first_chunk_while_running(api, server, inputs, tmp_path, release)
    finally:
        release.set()
        api.close()


def check_the_first_chunk_while_running(api, server, inputs, tmp_path, release) -> None:
    job_id = api.submit(inputs, **STREAM)  # 0.6 s of speech = 15 frames: chunks of 9 and 6 new frames
    job = wait_until(lambda: (j := api.job(job_id))["chunks"] and j, 60, 0.1, "the first chunk")
    assert job["status"] == "running" and [c["index"] for c in job["chunks"]] == [0]
    assert job["progress"]["stage"] == "stored" and job["progress"]["fraction"] == 0.6  # 9 of 15 frames
    not_yet = api.http.get(f"/v1/jobs/{job_id}/video")
    assert not_yet.status_code == 409 and "1 finished chunk(s)" in not_yet.json()["error"]
    chunk = api.http.get(job["chunks"][0]["url"])
    assert chunk.status_code == 200 and chunk.headers["content-type"] == "video/mp4"
    (tmp_path / "chunk0.mp4").write_bytes(chunk.content)
    with av.open(str(tmp_path / "chunk0.mp4")) as container:
        assert container.streams.audio, "a chunk carries its stretch of the speech"
    assert frames_in(tmp_path / "chunk0.mp4") == job["chunks"][0]["frames"] == 9
    assert api.http.get(f"/v1/jobs/{job_id}/chunks/7").status_code == 404

    release.set()
    job = api.wait(job_id)
    assert job["status"] == "succeeded" and [c["index"] for c in job["chunks"]] == [0, 1]
    (tmp_path / "whole.mp4").write_bytes(api.http.get(job["result"]["video_url"]).content)
    assert frames_in(tmp_path / "whole.mp4") == job["result"]["frames"] == 15
    stored = server.settings.data_dir / "storage" / "jobs" / job_id
    assert sorted(p.name for p in (stored / "chunks").iterdir()) == [
        "00000.mp4", "00000.state.safetensors", "00001.mp4", "00001.state.safetensors"]
    assert [c["index"] for c in json.loads((stored / "resume.json").read_text())["chunks"]] == [0, 1]


def test_a_stream_taken_up_again_resumes_after_its_last_finished_chunk(live_server, inputs, tmp_path) -> None:
    """What a worker does when a streaming job comes back after its worker died: the chunks in
    storage are kept, the stream continues after the last one, the final mp4 is whole."""
    server = live_server()
    server.wait_ready()
    api = Api(server.url)
    speech = tmp_path / "long.wav"  # 1.2 s = 30 frames: chunks of 9, 8, 8, 5 new frames
    sf.write(speech, np.asarray(sample_speech(1.2), dtype=np.float32), 16_000)
    first = api.submit({"image": inputs["image"], "audio": speech}, **STREAM)
    assert api.wait(first)["status"] == "succeeded"
    stored = server.settings.data_dir / "storage" / "jobs" / first
    whole = frames_in(stored / "video.mp4")
    assert whole == 30

    # Replay: the same job's record, with only its first two chunks kept, as if its worker died then.
    marker = json.loads((stored / "resume.json").read_text())
    (stored / "resume.json").write_text(json.dumps({"chunks": marker["chunks"][:2]}))
    (stored / "video.mp4").unlink()
    service = server.server.config.app.state.service
    job = service.store.get(first)
    events = []
    reporter = service.queue.reporter

    class Recorder:
        def start(self, order, worker):
            return True

        def progress(self, job_id, data):
            events.append(("progress", data))

        def chunk(self, job_id, data):
            events.append(("chunk", data))

        def finish(self, order, kind, data):
            events.append((kind, data))

        def should_cancel(self, job_id):
            return reporter.should_cancel(job_id)

    generator = service.queue.workers[0]
    outcome = generator.run(worker_module.JobOrder(job.id, job.params, job.inputs), Recorder(), threading.Event())
    assert outcome == "succeeded", events[-1]
    # Chunks 0 and 1 were not made again (only reported again, as they were), 2 and 3 were made.
    assert {d["chunk"] for kind, d in events if kind == "progress" and d["stage"] == "sample"} == {2, 3}
    chunk_events = [d for kind, d in events if kind == "chunk"]
    assert chunk_events[:2] == marker["chunks"][:2] and [d["index"] for d in chunk_events[2:]] == [2, 3]
    assert frames_in(stored / "video.mp4") == 30
    api.close()
