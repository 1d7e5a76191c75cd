"""The live playlist of a streaming job: while it runs, the finished chunks play as one HLS stream
(segments with their audio, timestamps running on across the joins); when it ends, the playlist
ends and holds exactly the final video's frames."""

from __future__ import annotations

import json
import threading
from fractions import Fraction
from pathlib import Path
from urllib.parse import urljoin

import av
import httpx
import numpy as np
import soundfile as sf

from talkgen.media.samples import sample_speech
from talkgen.media.video import SEGMENT_CLOCK_START
from talkgen.service import worker as worker_module

from .service_helpers import Api, wait_until

STREAM = {"mode": "streaming", "frame_num": 9, "motion_frame": 1, "sample_steps": 1}
FPS, RATE = 25, 16_000
AAC_FRAME = 1024  # samples


def hold_after(monkeypatch, index: int) -> threading.Event:
    """Hold the job after it has stored chunk ``index`` until the returned event is set."""
    release, original = threading.Event(), worker_module.ChunkSink.__call__

    def held(self, chunk):
        original(self, chunk)
        if chunk.index == index:
            assert release.wait(60)

    monkeypatch.setattr(worker_module.ChunkSink, "__call__", held)
    return release


def speech(tmp_path: Path, seconds: float) -> Path:
    path = tmp_path / f"speech-{seconds}.wav"
    sf.write(path, np.asarray(sample_speech(seconds), dtype=np.float32), RATE)
    return path


def parse_playlist(text: str) -> tuple[list[str], list[tuple[Fraction, str]]]:
    """(tags, [(duration, uri)]) of a media playlist."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert lines[0] == "#EXTM3U"
    tags, segments, duration = [], [], None
    for line in lines[1:]:
        if line.startswith("#EXTINF:"):
            duration = Fraction(line[len("#EXTINF:"):].split(",")[0])
        elif line.startswith("#"):
            tags.append(line)
        else:
            segments.append((duration, line))
            duration = None
    return tags, segments


def fetch_segments(client: httpx.Client, playlist_url: str, segments, folder: Path) -> list[Path]:
    paths = []
    for n, (_duration, uri) in enumerate(segments):
        response = client.get(urljoin(playlist_url, uri), follow_redirects=True)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("video/mp2t")
        path = folder / f"segment-{n}.ts"
        path.write_bytes(response.content)
        paths.append(path)
    return paths


def decoded(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def timestamps(path: Path, kind: str) -> list[tuple[Fraction, Fraction]]:
    """(start, duration) in seconds of each packet of the first ``kind`` stream, in decode order."""
    with av.open(str(path)) as container:
        stream = getattr(container.streams, kind)[0]
        default = Fraction(1, FPS) if kind == "video" else Fraction(AAC_FRAME, stream.codec_context.sample_rate)
        return [(p.pts * p.time_base, p.duration * p.time_base if p.duration else default)
                for p in container.demux(stream) if p.dts is not None]


def check_segment(path: Path, first_frame: int, chunk: Path, last: bool) -> None:
    """One segment: the chunk's frames (the same h264), placed at its position in the whole video,
    and the AAC packets that begin within it."""
    frames = decoded(path)
    assert np.array_equal(frames, decoded(chunk)), "the segment carries the chunk's own video"
    start = SEGMENT_CLOCK_START + Fraction(first_frame, FPS)
    end = start + Fraction(len(frames), FPS)
    video = timestamps(path, "video")
    assert [t for t, _ in video] == [start + Fraction(i, FPS) for i in range(len(frames))]
    audio = timestamps(path, "audio")
    assert audio, "a segment carries its stretch of the speech"
    first_audio = audio[0][0]
    if first_frame == 0:
        assert first_audio == start - Fraction(AAC_FRAME, RATE)  # the encoder's priming packet, before frame 0
    else:
        assert start <= first_audio < start + Fraction(AAC_FRAME, RATE)
    audio_end = audio[-1][0] + audio[-1][1]
    if not last:
        assert end <= audio_end < end + Fraction(AAC_FRAME, RATE)
    with av.open(str(path)) as container:
        assert sum(f.samples for f in container.decode(audio=0)) == len(audio) * AAC_FRAME


def check_continuous(paths: list[Path], frames: int) -> None:
    """The segments in a row are one stream: each video frame and each AAC packet starts where the
    one before ends, across every join; the audio covers the video."""
    video = [t for path in paths for t in timestamps(path, "video")]
    assert len(video) == frames
    assert [t for t, _ in video] == [SEGMENT_CLOCK_START + Fraction(i, FPS) for i in range(frames)]
    audio = [t for path in paths for t in timestamps(path, "audio")]
    assert all(b[0] == a[0] + a[1] for a, b in zip(audio, audio[1:])), "an audio gap or overlap at a join"
    assert audio[0][0] < SEGMENT_CLOCK_START and audio[-1][0] + audio[-1][1] >= SEGMENT_CLOCK_START + Fraction(frames, FPS)


def test_the_live_playlist_grows_with_the_chunks_and_ends_with_the_job(live_server, inputs, tmp_path,
                                                                       monkeypatch) -> None:
    release = hold_after(monkeypatch, 1)
    server = live_server()
    server.wait_ready()
    api = Api(server.url)
    try:
        job_id = api.submit({"image": inputs["image"], "audio": speech(tmp_path, 1.2)}, **STREAM)
        # 1.2 s of speech = 30 frames: chunks of 9, 8, 8 and 5 new frames; held after the second.
        job = wait_until(lambda: len((j := api.job(job_id))["chunks"]) == 2 and j, 60, 0.1, "two chunks")
        assert job["status"] == "running" and job["live_url"] == f"/v1/jobs/{job_id}/live.m3u8"

        not_yet = api.http.get(f"/v1/jobs/{job_id}/video")
        assert not_yet.status_code == 409 and not_yet.headers["retry-after"]
        assert not_yet.json()["live_url"] == job["live_url"] and job["live_url"] in not_yet.json()["error"]

        playlist_url = server.url + job["live_url"]
        response = api.http.get(job["live_url"])
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/vnd.apple.mpegurl")
        assert response.headers["cache-control"] == "no-cache"
        tags, segments = parse_playlist(response.text)
        assert "#EXT-X-PLAYLIST-TYPE:EVENT" in tags and "#EXT-X-ENDLIST" not in tags
        assert "#EXT-X-TARGETDURATION:1" in tags and "#EXT-X-MEDIA-SEQUENCE:0" in tags
        assert [d for d, _ in segments] == [Fraction(9, FPS), Fraction(8, FPS)]
        paths = fetch_segments(api.http, playlist_url, segments, tmp_path)
        for n, (path, first) in enumerate(zip(paths, (0, 9))):
            chunk = tmp_path / f"chunk-{n}.mp4"
            chunk.write_bytes(api.http.get(f"/v1/jobs/{job_id}/chunks/{n}").content)
            check_segment(path, first, chunk, last=False)
        check_continuous(paths, 17)
        assert api.http.get(f"/v1/jobs/{job_id}/live/00002.ts").status_code == 404  # not finished yet

        release.set()
        job = api.wait(job_id)
        assert job["status"] == "succeeded"
        tags, segments = parse_playlist(api.http.get(job["live_url"]).text)
        assert "#EXT-X-PLAYLIST-TYPE:EVENT" in tags and tags[-1] == "#EXT-X-ENDLIST"
        assert [d for d, _ in segments] == [Fraction(n, FPS) for n in (9, 8, 8, 5)]
        assert sum(d for d, _ in segments) == Fraction(job["result"]["frames"], FPS) == Fraction(30, FPS)
        assert float(sum(d for d, _ in segments)) == job["result"]["duration_s"]
        paths = fetch_segments(api.http, playlist_url, segments, tmp_path)
        for n, (path, first) in enumerate(zip(paths, (0, 9, 17, 25))):
            chunk = tmp_path / f"chunk-{n}.mp4"
            chunk.write_bytes(api.http.get(f"/v1/jobs/{job_id}/chunks/{n}").content)
            check_segment(path, first, chunk, last=n == 3)
        check_continuous(paths, 30)
        whole = tmp_path / "whole.mp4"
        whole.write_bytes(api.http.get(job["result"]["video_url"]).content)
        assert len(decoded(whole)) == sum(len(decoded(p)) for p in paths) == 30
        # A player reads it as one video: FFmpeg's own HLS client, through the playlist URL.
        with av.open(playlist_url) as container:
            assert sum(1 for _ in container.decode(video=0)) == 30
        with av.open(playlist_url) as container:
            samples = sum(f.samples for f in container.decode(audio=0))
        assert samples >= 30 * RATE // FPS
    finally:
        release.set()
        api.close()


def test_a_clip_has_no_live_playlist(live_server, inputs) -> None:
    server = live_server()
    server.wait_ready()
    api = Api(server.url)
    job_id = api.submit(inputs)
    job = api.wait(job_id)
    assert job["status"] == "succeeded" and job["live_url"] is None
    response = api.http.get(f"/v1/jobs/{job_id}/live.m3u8")
    assert response.status_code == 404 and f"/v1/jobs/{job_id}/video" in response.json()["error"]
    assert api.http.get("/v1/jobs/nothing/live.m3u8").status_code == 404
    api.close()


def test_a_resumed_stream_continues_the_live_segments_seamlessly(live_server, inputs, tmp_path) -> None:
    """A job taken up again after its worker died: the segments stored before are kept, the new
    ones continue them (the soundtrack is encoded the same way again: the same packets)."""
    server = live_server()
    server.wait_ready()
    api = Api(server.url)
    job_id = api.submit({"image": inputs["image"], "audio": speech(tmp_path, 1.2)}, **STREAM)
    assert api.wait(job_id)["status"] == "succeeded"
    stored = server.settings.data_dir / "storage" / "jobs" / job_id
    first_run = [(stored / "live" / f"{n:05d}.ts").read_bytes() for n in range(4)]

    # As if the worker died after chunk 1: only two chunks recorded, the later segments gone.
    marker = json.loads((stored / "resume.json").read_text())
    (stored / "resume.json").write_text(json.dumps({"chunks": marker["chunks"][:2]}))
    for n in (2, 3):
        (stored / "live" / f"{n:05d}.ts").unlink()
    service = server.server.config.app.state.service
    job = service.store.get(job_id)
    chunks = []

    class Recorder:
        def start(self, order, worker):
            return True

        def progress(self, job_id, data):
            pass

        def chunk(self, job_id, data):
            chunks.append(data)

        def finish(self, order, kind, data):
            chunks.append({"outcome": kind, **data})

        def should_cancel(self, job_id):
            return False

    outcome = service.queue.workers[0].run(worker_module.JobOrder(job.id, job.params, job.inputs), Recorder(),
                                           threading.Event())
    assert outcome == "succeeded", chunks[-1]
    assert [c["index"] for c in chunks[:-1]] == [0, 1, 2, 3] and all(c["segment"] for c in chunks[:-1])
    paths = [stored / "live" / f"{n:05d}.ts" for n in range(4)]
    check_continuous(paths, 30)
    for n in (2, 3):  # the soundtrack encoded again: the same audio packets as the first run's
        before = tmp_path / f"first-run-{n}.ts"
        before.write_bytes(first_run[n])
        assert audio_packets(paths[n]) == audio_packets(before)
    api.close()


def audio_packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(audio=0) if p.size]


def test_live_segments_in_s3_are_presigned_urls(live_server, seaweedfs, inputs, tmp_path, monkeypatch) -> None:
    release = hold_after(monkeypatch, 0)
    bucket = seaweedfs["bucket"]
    server = live_server(storage=f"s3://{bucket}/live", s3_endpoint_url=seaweedfs["endpoint"],
                         s3_access_key_id=seaweedfs["key"], s3_secret_access_key=seaweedfs["secret"])
    server.wait_ready()
    api = Api(server.url)
    try:
        job_id = api.submit(inputs, **STREAM)  # 0.6 s: chunks of 9 and 6 new frames
        job = wait_until(lambda: (j := api.job(job_id))["chunks"] and j, 60, 0.1, "the first chunk")
        tags, segments = parse_playlist(api.http.get(job["live_url"]).text)
        assert "#EXT-X-ENDLIST" not in tags and len(segments) == 1
        uri = segments[0][1]
        assert uri.startswith(seaweedfs["endpoint"]) and "X-Amz-Signature" in uri and f"/live/jobs/{job_id}/live/" in uri
        segment = tmp_path / "s3-segment.ts"
        segment.write_bytes(httpx.get(uri).content)  # no API key: the URL carries its own authorization
        assert len(decoded(segment)) == 9
        redirect = api.http.get(f"/v1/jobs/{job_id}/live/00000.ts")
        assert redirect.status_code == 307 and "X-Amz-Signature" in redirect.headers["location"]

        release.set()
        job = api.wait(job_id)
        assert job["status"] == "succeeded"
        tags, segments = parse_playlist(api.http.get(job["live_url"]).text)
        assert tags[-1] == "#EXT-X-ENDLIST" and [d for d, _ in segments] == [Fraction(9, FPS), Fraction(6, FPS)]
        paths = fetch_segments(httpx.Client(), server.url + job["live_url"], segments, tmp_path)
        check_continuous(paths, job["result"]["frames"])
    finally:
        release.set()
        api.close()



def test_the_target_duration_is_fixed_for_the_jobs_life_with_rounded_frame_counts() -> None:
    """HLS forbids a playlist whose EXT-X-TARGETDURATION changes: it is computed from frame_num as
    the engine rounds it (100 -> 101 frames, 4.04 s -> 5 s), before and after the first chunk."""
    from talkgen.service.jobs import Job
    from talkgen.service.live import playlist

    def job(chunks: list[dict]) -> Job:
        return Job(id="j", status="running", created_at=0.0, updated_at=0.0,
                   params={"mode": "streaming", "frame_num": 100}, inputs={}, chunks=chunks)

    first = {"index": 0, "frames": 101, "first_frame": 0, "segment": "s3://b/0.ts"}
    before, after = (playlist(job(c), lambda chunk: "0.ts") for c in ([], [first]))
    assert "#EXT-X-TARGETDURATION:5" in before and "#EXT-X-TARGETDURATION:5" in after
