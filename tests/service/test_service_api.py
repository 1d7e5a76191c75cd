"""The HTTP API end to end on the tiny model, served by uvicorn on 127.0.0.1 with the embedded worker."""

from __future__ import annotations

import json

import av
import httpx
import pytest

from .service_helpers import FAST, Api, wait_until


def read_sse(response: httpx.Response):
    """(event, data) pairs of a text/event-stream response."""
    event, data = "message", []
    for line in response.iter_lines():
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


@pytest.fixture()
def server(live_server):
    server = live_server()
    server.wait_ready()
    return server


@pytest.fixture()
def api(server):
    client = Api(server.url)
    yield client
    client.close()


def test_upload_then_progress_events_then_the_mp4(api: Api, inputs, tmp_path) -> None:
    job_id = api.submit(inputs, sample_steps=2)
    events = []
    with api.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for event, job in read_sse(response):
            events.append((event, job))
            if event == "end":
                break
    statuses = [job["status"] for _, job in events]
    assert statuses[-1] == "succeeded" and events[-1][0] == "end"
    stages = [job["progress"]["stage"] for _, job in events if job["progress"]]
    assert "sample" in stages and stages.index("sample") < len(stages) - 1  # progress came before the end
    sample = [job["progress"] for _, job in events if job["progress"] and job["progress"]["stage"] == "sample"]
    # Each event carries the job as it is when the stream wakes up (states in between may merge).
    assert sample and all(p["total"] == 2 and p["eta_s"] is not None for p in sample)
    fractions = [job["progress"]["fraction"] for _, job in events if job["progress"]]
    assert fractions == sorted(fractions)
    result = events[-1][1]["result"]
    assert result["frames"] == 5 and result["fps"] == 25 and result["video_url"] == f"/v1/jobs/{job_id}/video"

    video = api.http.get(result["video_url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    path = tmp_path / "out.mp4"
    path.write_bytes(video.content)
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert container.streams.audio[0].codec_context.name == "aac"
        assert sum(1 for _ in container.decode(video=0)) == 5
    # Byte ranges work (players seek with them).
    part = api.http.get(result["video_url"], headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and len(part.content) == 100

    listed = api.http.get("/v1/jobs").json()["jobs"]
    assert [j["id"] for j in listed] == [job_id]
    metrics = api.http.get("/metrics").text
    assert "talkgen_jobs_submitted_total 1.0" in metrics
    assert 'talkgen_jobs_finished_total{status="succeeded"} 1.0' in metrics
    assert 'talkgen_jobs{status="succeeded"} 1.0' in metrics


def test_invalid_requests_are_refused_before_queueing_with_the_field_named(api: Api, inputs, tmp_path) -> None:
    image, audio = inputs["image"].read_bytes(), inputs["audio"].read_bytes()

    def post(files, params=None):
        data = {"params": params if isinstance(params, str) else json.dumps(params or {})}
        return api.http.post("/v1/jobs", files=files, data=data)

    cases = [
        (post({"image": ("p.png", image)}), "audio"),
        (post({"audio": ("s.wav", audio)}), "image"),
        (post({"image": ("p.png", image), "audio": ("s.wav", audio)}, {"sample_steps": 0}), "sample_steps"),
        (post({"image": ("p.png", image), "audio": ("s.wav", audio)}, {"sample_stepz": 3}), "sample_stepz"),
        (post({"image": ("p.png", image), "audio": ("s.wav", audio)}, "{not json"), "params"),
        (post({"image": ("p.png", image), "audio": ("s.wav", audio), "audio2": ("b.wav", audio)}), "audio_type"),
        (post({"image": ("p.png", b"not an image"), "audio": ("s.wav", audio)}), "image (p.png)"),
        (post({"image": ("p.png", image), "audio": ("s.wav", b"RIFF....junk")}), "audio (s.wav)"),
        (post({"image": ("p.png", image), "audio": ("s.wav", audio), "extra": ("x", b"1")}), "extra"),
        (post({"video": ("v.mp4", b"\0" * 100), "audio": ("s.wav", audio)}), "infinitetalk"),
        (post({"image": ("p.png", image), "audio2": ("s.wav", audio)}, {"audio_type": "add"}), "audio2"),
        (api.http.post("/v1/jobs", json={"image": "http://x/p.png", "audio": "s3://b/a.wav"}), "image"),
        (api.http.post("/v1/jobs", json={"audio": "s3://b/a.wav", "image": "s3://b/p.png", "bogus": 1}), "bogus"),
    ]
    for response, field in cases:
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["type"] == "InputError" and field in body["error"], body
    assert api.http.get("/v1/jobs").json()["jobs"] == []  # nothing was queued
    assert api.http.get("/v1/jobs/nope").status_code == 404


def test_cancel_stops_a_running_job_at_its_next_step(api: Api, inputs) -> None:
    job_id = api.submit(inputs, sample_steps=200)
    wait_until(lambda: (p := api.job(job_id)["progress"]) and p["stage"] == "sample", 60, 0.1, "sampling to start")
    response = api.http.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 202 and response.json()["cancel_requested"]
    job = api.wait(job_id, timeout=30)
    assert job["status"] == "cancelled" and job["progress"]["step"] < 200
    video = api.http.get(f"/v1/jobs/{job_id}/video")
    assert video.status_code == 409 and "cancelled" in video.json()["error"]
    # The worker is free again.
    assert api.wait(api.submit(inputs))["status"] == "succeeded"


def test_cancel_a_queued_job_and_video_of_an_unfinished_job(live_server, inputs) -> None:
    server = live_server(workers=0)  # nothing runs: jobs stay queued
    api = Api(server.url)
    job_id = api.submit(inputs)
    video = api.http.get(f"/v1/jobs/{job_id}/video")
    assert video.status_code == 409 and "not ready" in video.json()["error"] and video.headers["retry-after"]
    response = api.http.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert api.http.get("/v1/jobs", params={"status": "cancelled"}).json()["jobs"][0]["id"] == job_id
    api.close()


def test_uploads_over_the_limit_are_refused_while_streaming(live_server, inputs) -> None:
    server = live_server(workers=0, max_upload_mb=0.25)
    api = Api(server.url)
    big = b"\0" * (1024 * 1024)
    response = api.http.post("/v1/jobs", files={"image": ("p.png", big), "audio": ("s.wav", b"x")})
    assert response.status_code == 413 and "0.25 MiB" in response.json()["error"]

    def chunks():  # no Content-Length: the limit is enforced on the bytes as they arrive
        yield (b'--b\r\nContent-Disposition: form-data; name="image"; filename="p.png"\r\n'
               b"Content-Type: image/png\r\n\r\n")
        for _ in range(8):
            yield b"x" * 65536

    response = api.http.post("/v1/jobs", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413
    assert api.http.get("/v1/jobs").json()["jobs"] == []
    api.close()


def test_json_bodies_have_their_own_small_limit_and_media_types_ignore_case(live_server) -> None:
    server = live_server(workers=0)  # upload limit: the default 512 MiB
    api = Api(server.url)
    padding = {"prompt": "x" * (2 << 20)}
    response = api.http.post("/v1/jobs", json={"image": "s3://b/p.png", "audio": "s3://b/a.wav", "params": padding})
    assert response.status_code == 413 and "JSON job body is at most 1024 KiB" in response.json()["error"]
    response = api.http.post("/v1/jobs", content=b'{"image": "s3://nowhere/p.png", "audio": "s3://nowhere/a.wav"}',
                             headers={"Content-Type": "Application/JSON; charset=UTF-8"})
    assert response.status_code == 422 and "bucket 'nowhere'" in response.json()["error"], response.text
    api.close()


def test_a_full_temporary_folder_while_reading_an_upload_is_a_503(monkeypatch, inputs, tmp_path) -> None:
    """Starlette spools uploads over 1 MiB to TMPDIR while it parses the form."""
    import errno

    from fastapi.testclient import TestClient
    from starlette.requests import Request

    from talkgen.service.api import create_app
    from talkgen.service.settings import Settings

    async def full_disk(self, **_limits):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Request, "form", full_disk)
    with TestClient(create_app(Settings(model="tiny", workers=0, data_dir=tmp_path / "data"))) as client:
        response = client.post("/v1/jobs", files={"image": ("p.png", inputs["image"].read_bytes()),
                                                  "audio": ("s.wav", inputs["audio"].read_bytes())})
    assert response.status_code == 503 and "TMPDIR" in response.json()["error"], response.text


def test_api_keys_are_required_when_configured(live_server, inputs) -> None:
    server = live_server(workers=0, api_keys="secret-1,secret-2")
    anonymous, wrong, right = Api(server.url), Api(server.url, "nope"), Api(server.url, "secret-2")
    for path in ("/v1/jobs", "/metrics"):
        assert anonymous.http.get(path).status_code == 401
        assert wrong.http.get(path).status_code == 401
        assert right.http.get(path).status_code == 200
    assert anonymous.http.post("/v1/jobs", files={"audio": ("s.wav", b"x")}).status_code == 401
    assert right.submit(inputs)
    health = anonymous.http.get("/v1/health").json()  # open, for load balancers; says keys are needed
    assert health["auth_required"] is True and health["jobs"]["queued"] == 1
    assert anonymous.http.get("/").status_code == 200
    assert "/v1/jobs" in anonymous.http.get("/openapi.json").json()["paths"]
    for client in (anonymous, wrong, right):
        client.close()


def test_openapi_documents_both_ways_to_submit(api: Api) -> None:
    spec = api.http.get("/openapi.json").json()
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= body.keys()
    presets = {p["name"] for p in api.http.get("/v1/presets").json()}
    assert presets == {"quality", "fast", "small_gpu"}
    assert FAST["sample_steps"] == 1
