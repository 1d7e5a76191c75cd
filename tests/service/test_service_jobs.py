"""The job store's state machine, settings, and the progress tracker (no servers)."""

from __future__ import annotations

import pytest

from talkgen.errors import InputError
from talkgen.pipeline.progress import ProgressEvent
from talkgen.service.jobs import JobStore
from talkgen.service.schemas import generation_values
from talkgen.service.settings import Settings
from talkgen.service.worker import ProgressTracker


@pytest.fixture()
def store(tmp_path) -> JobStore:
    return JobStore(tmp_path / "jobs.sqlite3")


def test_a_job_goes_queued_running_succeeded_and_every_change_is_seen(store: JobStore) -> None:
    seen = []
    store.subscribe(lambda job, before: seen.append((before, job.status, job.seq)))
    job = store.create({"prompt": "hi"}, {"image": "file:///a.png", "audio": "file:///a.wav"})
    assert job.status == "queued" and job.attempts == 0
    running = store.start(job.id, "w1", max_attempts=3)
    assert running.status == "running" and running.attempts == 1 and running.worker == "w1"
    store.record(job.id, "progress", {"stage": "sample", "step": 1, "total": 2, "chunk": 0})
    done = store.record(job.id, "succeeded", {"uri": "file:///v.mp4", "frames": 5, "fps": 25, "duration_s": 0.2, "seed": 1})
    assert done.status == "succeeded" and done.finished_at >= done.started_at
    assert [s[:2] for s in seen] == [("", "queued"), ("queued", "running"), ("running", "running"),
                                     ("running", "succeeded")]
    assert [s[2] for s in seen] == sorted(s[2] for s in seen)
    # A finished job stays finished: late or repeated events are ignored.
    assert store.record(job.id, "failed", {"error": "late"}) is None
    assert store.record(job.id, "progress", {"stage": "sample"}) is None
    assert store.start(job.id, "w2", max_attempts=3) is None
    assert store.get(job.id).status == "succeeded"


def test_cancel_ends_a_queued_job_at_once_and_flags_a_running_one(store: JobStore) -> None:
    queued = store.create({}, {})
    assert store.request_cancel(queued.id).status == "cancelled"
    assert store.start(queued.id, "w", 3) is None

    running = store.create({}, {})
    store.start(running.id, "w", 3)
    flagged = store.request_cancel(running.id)
    assert flagged.status == "running" and flagged.cancel_requested
    assert store.record(running.id, "cancelled").status == "cancelled"


def test_a_job_whose_worker_keeps_dying_fails_with_the_reason_after_max_attempts(store: JobStore) -> None:
    job = store.create({}, {})
    for attempt in (1, 2):
        assert store.start(job.id, f"w{attempt}", max_attempts=2).attempts == attempt
        # the worker died: on restart the job is still "running" and is started again
    assert store.start(job.id, "w3", max_attempts=2) is None
    failed = store.get(job.id)
    assert failed.status == "failed" and "started 2 times" in failed.error and "submit it again" in failed.error


def test_a_graceful_hand_back_does_not_count_as_an_attempt(store: JobStore) -> None:
    job = store.create({}, {})
    store.start(job.id, "w", 3)
    back = store.record(job.id, "requeued", {"graceful": True, "reason": "shutdown"})
    assert back.status == "queued" and back.attempts == 0 and back.worker is None


def test_remote_events_are_applied_once_with_the_stream_position(store: JobStore) -> None:
    job = store.create({}, {})
    store.apply_event("1-0", job.id, "started", {"attempt": 1, "worker": "remote"})
    store.apply_event("2-0", job.id, "chunk", {"index": 0, "uri": "s3://b/c0.mp4", "frames": 81, "duration_s": 3.24})
    store.apply_event("3-0", job.id, "chunk", {"index": 0, "uri": "s3://b/c0.mp4", "frames": 81, "duration_s": 3.24})
    store.apply_event("4-0", "no-such-job", "progress", {})
    assert store.meta("events_last_id") == "4-0"
    job = store.get(job.id)
    assert job.status == "running" and job.worker == "remote" and len(job.chunks) == 1
    assert store.counts()["running"] == 1


def test_generation_values_apply_the_preset_under_explicit_options() -> None:
    values = generation_values({"preset": "fast", "sample_steps": 3}, {"image": "a.png", "audio": "a.wav", "audio2": "b.wav"})
    assert values["sample_steps"] == 3 and values["frame_num"] == 81
    assert values["cond_audio"] == {"person1": "a.wav", "person2": "b.wav"} and values["cond_image"] == "a.png"
    with pytest.raises(InputError, match="params.preset"):
        generation_values({"preset": "best"}, {})
    with pytest.raises(InputError, match="params.cond_image"):
        generation_values({"cond_image": "x.png"}, {})


def test_settings_come_from_the_environment_and_keys_are_required_off_loopback(monkeypatch) -> None:
    monkeypatch.setenv("TALKGEN_API_KEYS", "k1, k2")
    monkeypatch.setenv("TALKGEN_MAX_UPLOAD_MB", "2")
    settings = Settings(host="0.0.0.0")
    assert [k.get_secret_value() for k in settings.api_keys] == ["k1", "k2"]
    assert settings.max_upload_bytes == 2 * 2**20
    settings.check_exposure()
    assert "***" not in " ".join(settings.describe()) and "2 key(s)" in " ".join(settings.describe())
    monkeypatch.delenv("TALKGEN_API_KEYS")
    with pytest.raises(InputError, match="TALKGEN_API_KEYS"):
        Settings(host="0.0.0.0").check_exposure()
    Settings(host="127.0.0.1").check_exposure()
    Settings(host="::1").check_exposure()


def test_progress_tracker_estimates_the_time_left_from_the_steps_done() -> None:
    now = [0.0]
    tracker = ProgressTracker(clock=lambda: now[0])
    tracker(ProgressEvent("condition"))
    now[0] = 10.0
    first = tracker(ProgressEvent("sample", 1, 5))
    assert first["eta_s"] == pytest.approx(40.0) and 0.06 < first["fraction"] < 0.94
    now[0] = 20.0
    assert tracker(ProgressEvent("sample", 2, 5))["eta_s"] == pytest.approx(30.0)
