"""Malformed requests: each answered 4xx with a message naming the field, nothing stored or queued,
and the server and its worker keep working; a 2 GiB upload is cut off at the limit as it streams."""

from __future__ import annotations

import pytest

from .harness import Cluster, make_bad_assets, rss_kib, run_bad_inputs, run_oversized_stream

LIMIT_MB = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_weights, assets):
    """``talkgen serve`` (one embedded worker) that reads local inputs under a root and S3 inputs from
    bucket 'allowed' only."""
    folder = tmp_path_factory.mktemp("bad-input")
    bad = make_bad_assets(folder / "assets", assets)
    cluster = Cluster(folder / "cluster", tiny_weights, redis=False, embedded_workers=1,
                      settings={"input_root": folder / "assets" / "input-root", "input_buckets": "allowed",
                                "max_upload_mb": LIMIT_MB})
    cluster.start_server()
    yield cluster, bad
    cluster.stop()


def test_bad_requests_are_refused_with_the_field_named_and_the_service_keeps_working(server, assets) -> None:
    cluster, bad = server
    report = run_bad_inputs(cluster, bad)
    assert report["cases"] >= 40
    assert not report["wrong"], "\n".join(f"{w['case']}: {w['status']} {w['error']}" for w in report["wrong"])
    assert all(400 <= r["status"] < 500 for r in report["results"]), report["statuses"]
    assert cluster.server.alive() and cluster.http.get("/v1/health").json()["status"] == "ok"
    assert cluster.jobs() == {}, "a refused request left a job behind"
    stored = cluster.storage / "jobs"
    assert not stored.exists() or not any(stored.iterdir()), "a refused request left inputs in storage"
    assert cluster.leftover_temp() == [], "uploads left temporary files behind"

    # The same server still takes good jobs: an upload, and local files under its input root.
    uploaded = cluster.submit(assets)
    local = cluster.http.post("/v1/jobs", json={"image": "portrait.png", "audio": "speech.wav",
                                                "params": {"sample_steps": 1, "frame_num": 5}})
    assert uploaded.status_code == 202 and local.status_code == 202, (uploaded.text, local.text)
    jobs = cluster.wait_jobs([uploaded.json()["id"], local.json()["id"]], 180)
    assert [j["status"] for j in jobs.values()] == ["succeeded", "succeeded"], jobs
    assert cluster.leftover_temp() == [], "jobs left temporary files behind"


def test_a_2_gib_upload_is_cut_off_at_the_limit_while_it_streams(server) -> None:
    cluster, _ = server
    before, jobs_before = rss_kib(cluster.server.pid), cluster.jobs()
    report = run_oversized_stream(cluster.url, total=2 * 2**30)
    grown_mib = (rss_kib(cluster.server.pid) - before) / 1024
    assert report["status"] == 413, report
    assert "16 MiB" in report["answer"] and "TALKGEN_MAX_UPLOAD_MB" in report["answer"]
    # The server answered once the limit was passed, not after 2 GiB: what was sent before the
    # answer arrived is the limit plus what the socket buffers held.
    assert report["sent_bytes"] < LIMIT_MB * 2**20 + 64 * 2**20, report
    assert grown_mib < LIMIT_MB + 64, f"the server grew by {grown_mib:.0f} MiB"
    assert cluster.server.alive() and cluster.http.get("/v1/health").json()["status"] == "ok"
    assert cluster.jobs().keys() == jobs_before.keys() and cluster.leftover_temp() == []
    print(f"2 GiB offered, {report['sent_bytes'] / 2**20:.1f} MiB sent before the 413 (limit {LIMIT_MB} MiB), "
          f"server grew {grown_mib:.1f} MiB")
