"""Shot detection for video dubbing (InfiniteTalk's ``--scene_seg``) with PySceneDetect, and the
shots laid out on the output video's timeline.

Detection is the reference's: three PySceneDetect detectors with their defaults run over the same
frames and a cut that any of them finds counts (what ``SceneManager`` with all three added does):
``ContentDetector`` (hard cuts: HSV and edge change), ``AdaptiveDetector`` (cuts measured against
a rolling average, so fast motion gives fewer false cuts) and ``ThresholdDetector`` (fades to and
from black). The frames are decoded here with PyAV and handed to the detectors one by one,
downscaled as ``SceneManager`` does, so a cut's frame index is the index at which the pipeline
reads the source (the same decoder, frame for frame) and its time is the frame's own timestamp.

Unlike the reference, shots are never dropped or trimmed (see :func:`plan_shots`): the output
video and the speech stay aligned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from talkgen.errors import InputError, ResourceError

# The reference keeps shots longer than 0.5 s; shorter ones are merged into a neighbour here.
MIN_SHOT_SECONDS = 0.5
# Frames read past the last moment that matters: detectors report a cut up to min_scene_len
# (15) frames after it happened (ContentDetector's flash filter; AdaptiveDetector's window).
DETECTION_MARGIN_FRAMES = 32


@dataclass(frozen=True)
class Shot:
    """One shot of the source: frames [start, end) at the source's own frame rate."""

    start: int
    end: int
    start_seconds: float
    end_seconds: float

    @property
    def frames(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ShotList:
    """What :func:`detect_shots` found: the frames where a new shot begins (never 0)."""

    cuts: tuple[int, ...]  # source frame indices, ascending
    cut_seconds: tuple[float, ...]  # their timestamps, from the first frame
    fps: float  # the source's frame rate (average, for variable frame rate)
    frames_read: int  # frames decoded: the whole video, or up to the limit asked for
    seconds_read: float  # time covered by those frames
    complete: bool  # whether the whole video was read

    @property
    def shots(self) -> list[Shot]:
        starts = [(0, 0.0), *zip(self.cuts, self.cut_seconds)]
        ends = [*zip(self.cuts, self.cut_seconds), (self.frames_read, self.seconds_read)]
        return [Shot(s, e, st, et) for (s, st), (e, et) in zip(starts, ends)]


def detect_shots(path: str | Path, *, max_seconds: float | None = None) -> ShotList:
    """Find the shot cuts of a video with PySceneDetect's content, adaptive and threshold detectors.

    ``max_seconds``: only cuts before this time are needed (the speech's length); decoding stops a
    little after it (detectors report a cut some frames late), so a long source is not read whole.
    """
    import av

    from talkgen.media.video import probe_media

    scenedetect, cv2 = _scenedetect()
    info = probe_media(path)  # a clear InputError for a missing or unreadable file
    if info.video is None:
        raise InputError(f"{path} has no video stream: scene_seg splits a video into shots; give a video to dub.")
    fps = info.video.fps or 25.0
    detectors = [scenedetect.ContentDetector(), scenedetect.AdaptiveDetector(), scenedetect.ThresholdDetector()]
    limit = None if max_seconds is None else math.ceil(max_seconds * fps) + DETECTION_MARGIN_FRAMES
    cuts: set[int] = set()
    times: list[float] = []
    complete = True
    position = None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for index, frame in enumerate(container.decode(stream)):
                if limit is not None and index >= limit:
                    complete = False
                    break
                times.append(frame.time if frame.time is not None else index / fps)
                image = _detection_frame(frame.to_ndarray(format="bgr24"), cv2)
                position = scenedetect.FrameTimecode(index, fps)
                for detector in detectors:
                    cuts.update(cut.frame_num for cut in detector.process_frame(position, image))
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise InputError(f"Video file {path} cannot be decoded for shot detection ({type(exc).__name__}: {exc}): "
                         "re-export it as MP4 (h264).") from None
    if position is None:
        raise InputError(f"Video file {path} contains no decodable frames: re-export the video.")
    for detector in detectors:
        cuts.update(cut.frame_num for cut in detector.post_process(position))
    first = times[0]
    found = sorted(c for c in cuts if 0 < c < len(times))
    step = (times[-1] - first) / (len(times) - 1) if len(times) > 1 else 1 / fps  # one frame's duration
    return ShotList(cuts=tuple(found), cut_seconds=tuple(times[c] - first for c in found), fps=fps,
                    frames_read=len(times), seconds_read=times[-1] - first + step, complete=complete)


def _detection_frame(bgr: np.ndarray, cv2) -> np.ndarray:
    """Downscale as SceneManager's automatic downscale does (to about 256 pixels on the long side)."""
    from scenedetect.scene_manager import compute_downscale_factor

    height, width = bgr.shape[:2]
    factor = compute_downscale_factor(max(width, height))
    if factor <= 1.0:
        return bgr
    size = (max(1, round(width / factor)), max(1, round(height / factor)))
    return cv2.resize(bgr, size, interpolation=cv2.INTER_LINEAR)


def _scenedetect():
    try:
        import cv2
        import scenedetect
    except ImportError as exc:
        raise ResourceError(f"scene_seg needs PySceneDetect and OpenCV ({exc}): "
                            "`pip install 'scenedetect-headless>=0.7,<0.8'` (a talkgen dependency).") from None
    return scenedetect, cv2


# -- the shots on the output timeline -------------------------------------------------------


@dataclass(frozen=True)
class ShotSpan:
    """One shot of the output video: output frames [first, end) (at the output's 25 fps), made
    from the source's frames from ``source_start`` on (native index, as the whole-video dubbing
    reads them); past ``source_end`` (the next shot's first frame) the shot's last frame is held.
    ``source_end`` is None when the shot runs to the end of the source."""

    first: int
    end: int
    source_start: int
    source_end: int | None

    @property
    def frames(self) -> int:
        return self.end - self.first


def plan_shots(shots: ShotList, total_frames: int, fps: float = 25.0,
               min_seconds: float = MIN_SHOT_SECONDS) -> list[ShotSpan]:
    """Lay the source's shots on an output video of ``total_frames`` frames (the speech's length).

    A cut at source time t becomes a cut at output frame ``round(t * fps)``: the speech is split
    at the same moments as the video, so every shot is generated with the speech said over it.
    Shots that start at or past the video's end are not shown (speech shorter than the source);
    the last shot runs to the end of the speech (speech longer than the source holds its last frame, as the
    whole-video dubbing does). A shot shorter than ``min_seconds`` is merged into the shot before
    it (the first one into the next): nothing is dropped, so no frame or sample shifts.
    """
    cuts: list[tuple[int, int]] = []  # (output frame, source frame)
    beyond = None  # the source frame of the first shot that starts after the video's end
    for source, seconds in zip(shots.cuts, shots.cut_seconds):
        out = round(seconds * fps)
        if out >= total_frames:
            beyond = source
            break
        if out > 0:
            if cuts and out == cuts[-1][0]:  # two cuts on one output frame: the later shot starts there
                cuts.pop()
            cuts.append((out, source))
    min_frames = math.ceil(min_seconds * fps)
    while cuts:
        bounds = [0, *(out for out, _ in cuts), total_frames]
        short = next((i for i in range(len(bounds) - 1) if bounds[i + 1] - bounds[i] < min_frames), None)
        if short is None:
            break
        del cuts[short - 1 if short > 0 else 0]  # the cut that starts it (the first shot: its end)
    starts = [(0, 0), *cuts]
    ends = [*(out for out, _ in cuts), total_frames]
    source_ends = [*(source for _, source in cuts), beyond]
    return [ShotSpan(first, end, source_start, source_end)
            for (first, source_start), end, source_end in zip(starts, ends, source_ends)]
