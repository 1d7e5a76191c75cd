"""S3 storage against a real S3-compatible server (SeaweedFS on 127.0.0.1)."""

from __future__ import annotations

import io
import os

import av
import httpx
import pytest

from .service_helpers import Api, FAST
from talkgen.service.settings import Settings
from talkgen.service.storage import S3Storage


def s3_settings(seaweedfs, **values) -> dict:
    return dict(s3_endpoint_url=seaweedfs["endpoint"], s3_access_key_id=seaweedfs["key"],
                s3_secret_access_key=seaweedfs["secret"], **values)


def test_large_files_go_up_in_parts_and_come_back_by_presigned_url(seaweedfs, tmp_path) -> None:
    settings = Settings(**s3_settings(seaweedfs, s3_multipart_chunk_mb=5))
    storage = S3Storage(seaweedfs["bucket"], "unit", settings)
    payload = os.urandom(11 * 2**20 + 123)
    source = tmp_path / "big.bin"
    source.write_bytes(payload)
    uri = storage.put_file("big.bin", source)
    assert uri == f"s3://{seaweedfs['bucket']}/unit/big.bin"
    head = seaweedfs["client"].head_object(Bucket=seaweedfs["bucket"], Key="unit/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three parts: a multipart upload
    assert storage.size(uri) == len(payload)
    assert storage.size(uri + ".missing") is None
    url = storage.download_url(uri, "big.bin")
    assert "X-Amz-Signature" in url
    assert httpx.get(url).content == payload
    assert httpx.get(url.replace("X-Amz-Signature=", "X-Amz-Signature=0")).status_code == 403
    # Streams (the upload path of the API) too.
    stream_uri = storage.put_stream("stream.bin", io.BytesIO(payload[:1000]))
    assert storage.fetch(stream_uri, tmp_path / "back.bin").read_bytes() == payload[:1000]


def test_s3_inputs_in_result_in_s3_and_the_video_by_presigned_url(live_server, seaweedfs, inputs, tmp_path) -> None:
    bucket, s3 = seaweedfs["bucket"], seaweedfs["client"]
    s3.upload_file(str(inputs["image"]), bucket, "in/portrait.png")
    s3.upload_file(str(inputs["audio"]), bucket, "in/speech.wav")
    server = live_server(**s3_settings(seaweedfs, storage=f"s3://{bucket}/results"))
    server.wait_ready()
    api = Api(server.url)

    missing = api.http.post("/v1/jobs", json={"image": f"s3://{bucket}/in/portrait.png",
                                              "audio": f"s3://{bucket}/in/nothing.wav", "params": FAST})
    assert missing.status_code == 422 and "in/nothing.wav does not exist" in missing.json()["error"]

    response = api.http.post("/v1/jobs", json={"image": f"s3://{bucket}/in/portrait.png",
                                               "audio": f"s3://{bucket}/in/speech.wav", "params": FAST})
    assert response.status_code == 202, response.text
    job = api.wait(response.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["uri"] == f"s3://{bucket}/results/jobs/{job['id']}/video.mp4"
    assert s3.head_object(Bucket=bucket, Key=f"results/jobs/{job['id']}/video.mp4")["ContentLength"] > 0

    redirect = api.http.get(job["result"]["video_url"])
    assert redirect.status_code == 307
    presigned = redirect.headers["location"]
    assert presigned.startswith(seaweedfs["endpoint"]) and "X-Amz-Signature" in presigned
    video = httpx.get(presigned)
    assert video.status_code == 200
    path = tmp_path / "from-s3.mp4"
    path.write_bytes(video.content)
    with av.open(str(path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5

    # Uploaded files are kept in S3 too, before the job is accepted.
    uploaded = api.submit(inputs)
    assert api.wait(uploaded)["status"] == "succeeded"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"results/jobs/{uploaded}/")["Contents"]}
    assert keys == {f"results/jobs/{uploaded}/inputs/image.png", f"results/jobs/{uploaded}/inputs/audio.wav",
                    f"results/jobs/{uploaded}/video.mp4"}
    api.close()


def test_s3_inputs_are_decoded_within_the_limits_before_the_model_runs(live_server, seaweedfs, inputs, tmp_path) -> None:
    """Intake only sizes s3:// inputs; the worker decodes them with the same checks as uploads."""
    import numpy as np
    import soundfile as sf

    bucket, s3 = seaweedfs["bucket"], seaweedfs["client"]
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    s3.upload_file(str(inputs["image"]), bucket, "in/portrait.png")
    s3.upload_file(str(silent), bucket, "in/silent.wav")
    server = live_server(**s3_settings(seaweedfs, storage=f"s3://{bucket}/results"))
    server.wait_ready()
    api = Api(server.url)
    response = api.http.post("/v1/jobs", json={"image": f"s3://{bucket}/in/portrait.png",
                                               "audio": f"s3://{bucket}/in/silent.wav", "params": FAST})
    assert response.status_code == 202, response.text  # only its size is known here
    job = api.wait(response.json()["id"])
    assert job["status"] == "failed" and "audio" in job["error"] and "silent" in job["error"], job
    assert job["attempts"] == 1  # a bad input is not retried
    api.close()


@pytest.mark.parametrize("uri", ["s3://talkgen-test", "s3:///key", "file:///etc/passwd"])
def test_only_s3_locations_are_accepted_as_inputs(live_server, seaweedfs, uri) -> None:
    server = live_server(workers=0, **s3_settings(seaweedfs))
    api = Api(server.url)
    response = api.http.post("/v1/jobs", json={"image": uri, "audio": uri})
    assert response.status_code == 422 and "s3://bucket/key" in response.json()["error"]
    api.close()
