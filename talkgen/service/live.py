"""A streaming job's video while it is made: an HLS playlist of its finished chunks.

Every chunk a streaming job finishes is also stored as an HLS segment (MPEG-TS,
``jobs/<id>/live/<index>.ts``, written by the worker with the chunk's mp4: see
:func:`talkgen.media.video.write_ts_segment`). The playlist lists the segments of the chunks
finished so far: an ``EVENT`` playlist that grows while the job runs and gets ``EXT-X-ENDLIST``
when the job has ended, so a player shows a ten-minute video from its first seconds on and keeps
up as it is made. Segment durations are the chunks' frame counts over the frame rate, so they add
up to exactly the frames finished, and the segments' timestamps run on across the joins.

The playlist is built from the job record (the chunks the store knows, whoever made them: an
embedded worker or a ``talkgen worker`` reporting through Redis); segment addresses are the API's
own (``live/<index>.ts``, relative to the playlist) or, when results live in S3, presigned URLs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from talkgen.media.video import DEFAULT_FPS as FPS
from talkgen.pipeline.request import GenerationRequest, round_frame_num
from talkgen.service.jobs import Job
from talkgen.service.schemas import PRESETS

PLAYLIST_TYPE = "application/vnd.apple.mpegurl"
SEGMENT_TYPE = "video/mp2t"


def segment_key(job_id: str, index: int) -> str:
    """Where a chunk's segment is stored (beside ``chunks/<index>.mp4``)."""
    return f"jobs/{job_id}/live/{index:05d}.ts"


def playlist_path(job_id: str) -> str:
    return f"/v1/jobs/{job_id}/live.m3u8"


def is_streaming(job: Job) -> bool:
    """Only streaming jobs are made chunk by chunk (a clip is one piece, ready when it is done)."""
    return job.params.get("mode") == "streaming"


def segments(job: Job) -> list[dict]:
    """The finished chunks that can be played in a row from the start: each has its segment and
    begins where the one before it ends."""
    listed, frames = [], 0
    for chunk in sorted(job.chunks, key=lambda c: c["index"]):
        if not chunk.get("segment") or chunk.get("first_frame", frames) != frames:
            break
        listed.append(chunk)
        frames += chunk["frames"]
    return listed


def target_duration(job: Job, listed: list[dict], fps: int = FPS) -> int:
    """Whole seconds no segment exceeds, fixed for the job's life (a playlist must not change
    it): the longest chunk is the first, ``frame_num`` frames as the engine rounds them (4n+1)."""
    params = {**PRESETS.get(job.params.get("preset"), {}), **job.params}
    frame_num = round_frame_num(int(params.get("frame_num") or GenerationRequest.model_fields["frame_num"].default))
    longest = max([frame_num, *(c["frames"] for c in listed)])
    return max(1, math.ceil(longest / fps))


def seconds(frames: int, fps: int = FPS) -> str:
    """``frames / fps`` as a decimal (exact for 25 fps: multiples of 0.04 s)."""
    return f"{frames / fps:.6f}".rstrip("0").rstrip(".")


def playlist(job: Job, segment_url: Callable[[dict], str], fps: int = FPS) -> str:
    """The HLS playlist (``EVENT``; ``EXT-X-ENDLIST`` once the job has ended) of the part of the
    video finished so far; ``segment_url`` gives each chunk's segment address."""
    listed = segments(job)
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", f"#EXT-X-TARGETDURATION:{target_duration(job, listed, fps)}",
             "#EXT-X-MEDIA-SEQUENCE:0", "#EXT-X-PLAYLIST-TYPE:EVENT", "#EXT-X-INDEPENDENT-SEGMENTS",
             "#EXT-X-START:TIME-OFFSET=0"]  # from the beginning, not the live edge
    for chunk in listed:
        lines += [f"#EXTINF:{seconds(chunk['frames'], fps)},", segment_url(chunk)]
    if job.terminal:
        lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"
