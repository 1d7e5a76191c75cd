"""MP4 in and out with PyAV: the generated frames plus the speech, in one encoding pass.

The reference writes the frames with imageio-ffmpeg (libx264 at about CRF 25), cuts the audio with
one ffmpeg call and muxes with another, re-encoding the video a second time at the libx264
default. Here the frames are encoded once (libx264, yuv420p, ``crf`` 18 by default) and the audio
(AAC) is muxed in the same pass, cut or zero-padded to exactly ``frames / fps`` seconds so the
two streams end together.
"""

from __future__ import annotations

from collections.abc import Iterator

import os
import queue
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from talkgen.errors import InputError, ResourceError

VIDEO_CODEC = "libx264"
AUDIO_CODEC = "aac"
DEFAULT_FPS = 25
# Visually lossless for libx264; the reference's double encode lands near CRF 23-25 after two
# generations, so 18 in one generation is at least as good at a moderate size.
DEFAULT_CRF = 18

# ffmpeg's colour-tag values for BT.601 limited range: what swscale's default rgb24 -> yuv420p
# conversion produces, so players that honour tags decode the colours we encoded.
_AVCOL_SPC_SMPTE170M = 6
_AVCOL_RANGE_MPEG = 1


@dataclass(frozen=True)
class StreamInfo:
    """One stream of a media file."""

    index: int
    kind: str  # "video" | "audio" | other ffmpeg media types
    codec: str
    duration: float | None  # seconds
    frames: int  # video frames or audio packets; counted by demuxing when the header lacks it
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    sample_rate: int | None = None
    channels: int | None = None


@dataclass(frozen=True)
class MediaInfo:
    """What :func:`probe_media` reports: container duration and every stream."""

    path: str
    format: str
    duration: float | None  # seconds
    streams: list[StreamInfo] = field(default_factory=list)

    @property
    def video(self) -> StreamInfo | None:
        return next((s for s in self.streams if s.kind == "video"), None)

    @property
    def audio(self) -> StreamInfo | None:
        return next((s for s in self.streams if s.kind == "audio"), None)


# --------------------------------------------------------------------------------------------
# Writing


def write_mp4(
    path: str | Path,
    frames: np.ndarray,
    audio: np.ndarray | None,
    sample_rate: int,
    fps: int = DEFAULT_FPS,
    crf: int = DEFAULT_CRF,
    preset: str = "medium",
    b_frames: bool = True,
) -> Path:
    """Encode uint8 RGB ``frames [F, H, W, 3]`` (h264) and mono float ``audio`` (AAC) into ``path``.

    The audio is cut or zero-padded to exactly ``F / fps`` seconds. Odd frame sizes are padded by
    one edge row/column (yuv420p needs even sizes). The file is written beside ``path`` and
    renamed into place, so a crash never leaves a half-written video under the final name.
    ``b_frames=False`` makes decode order presentation order (what :func:`write_ts_segment`
    needs to join independently encoded pieces without a step back in decode time).
    """
    path = Path(path)
    frames = _check_frames(frames)
    samples = None if audio is None else fit_audio(audio, len(frames), sample_rate, fps)
    _require_encoder(VIDEO_CODEC)
    if samples is not None:
        _require_encoder(AUDIO_CODEC)

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial.mp4")
    try:
        _encode(partial, frames, samples, sample_rate, fps, crf, preset, b_frames)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def fit_audio(audio: np.ndarray, num_frames: int, sample_rate: int, fps: int = DEFAULT_FPS) -> np.ndarray:
    """Mono float32 audio cut or zero-padded to ``num_frames / fps`` seconds."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"expected mono audio [N], got shape {list(audio.shape)}")
    length = round(num_frames * sample_rate / fps)
    if len(audio) >= length:
        return audio[:length]
    return np.concatenate([audio, np.zeros(length - len(audio), dtype=np.float32)])


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(
            f"expected uint8 frames [F, H, W, 3] with F > 0, got {frames.dtype} {list(frames.shape)}"
        )
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:  # repeat the last row/column: invisible, unlike a black line
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def _require_encoder(name: str) -> None:
    try:
        av.codec.Codec(name, "w")
    except Exception:
        raise ResourceError(
            f"The {name} encoder is missing from this PyAV/FFmpeg build: reinstall PyAV from its "
            "official wheels (`pip install --force-reinstall av`), which include it."
        ) from None


def _encode(
    path: Path,
    frames: np.ndarray,
    samples: np.ndarray | None,
    sample_rate: int,
    fps: int,
    crf: int,
    preset: str,
    b_frames: bool = True,
) -> None:
    height, width = frames.shape[1:3]
    with Mp4Writer(path, width, height, samples, sample_rate, fps, crf, preset, b_frames) as writer:
        writer.write(frames)


class Mp4Writer:
    """Encode frames as they come (h264 + AAC, interleaved by time), so a long video is never
    held in memory. ``audio`` is the whole soundtrack; after each frame, the audio up to that
    frame's end is encoded with it. Written to ``path`` directly: callers that need an atomic
    result write to a temporary name (as :func:`write_mp4` does)."""

    def __init__(self, path: Path, width: int, height: int, audio: np.ndarray | None, sample_rate: int,
                 fps: int = DEFAULT_FPS, crf: int = DEFAULT_CRF, preset: str = "medium", b_frames: bool = True):
        _require_encoder(VIDEO_CODEC)
        if audio is not None:
            _require_encoder(AUDIO_CODEC)
        self.width, self.height = width + width % 2, height + height % 2
        self.samples = None if audio is None else np.asarray(audio, dtype=np.float32)
        self.sample_rate, self.fps = sample_rate, fps
        self.frames_written = self.samples_done = 0
        self.container = av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"})
        options = {"crf": str(crf), "preset": preset, **({} if b_frames else {"bf": "0"})}
        self.video = self.container.add_stream(VIDEO_CODEC, rate=Fraction(fps), options=options)
        self.video.width, self.video.height, self.video.pix_fmt = self.width, self.height, "yuv420p"
        self.video.codec_context.colorspace = _AVCOL_SPC_SMPTE170M
        self.video.codec_context.color_range = _AVCOL_RANGE_MPEG
        self.audio = None
        if self.samples is not None:
            self.audio = self.container.add_stream(AUDIO_CODEC, rate=sample_rate, layout="mono")
            # AAC cannot spend more than 6144 bits per channel per 1024 samples.
            self.audio.bit_rate = min(128_000, 6 * sample_rate)

    def write(self, frames: np.ndarray) -> None:
        """Append uint8 RGB frames [F, H, W, 3]."""
        for frame in _check_frames(frames):
            self.container.mux(self.video.encode(_video_frame(frame, self.frames_written)))
            self.frames_written += 1
            if self.audio is not None:
                end = round(self.frames_written * self.sample_rate / self.fps)
                piece = self.samples[self.samples_done:end]
                if len(piece) < end - self.samples_done:  # speech shorter than the video: silence
                    piece = np.concatenate([piece, np.zeros(end - self.samples_done - len(piece), np.float32)])
                self.container.mux(self.audio.encode(_audio_frame(piece, self.samples_done, self.sample_rate)))
                self.samples_done = end

    def close(self) -> None:
        self.container.mux(self.video.encode(None))
        if self.audio is not None:
            self.container.mux(self.audio.encode(None))
        self.container.close()

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.container.close()


class BackgroundWriter:
    """An :class:`Mp4Writer` fed through a queue on a thread of its own, so that encoding one chunk
    overlaps generating the next on the GPU (PyAV releases the GIL while x264 and swscale work: a
    Python loop ran at 0.7x its speed beside an encode on a 2-core machine). The frames of at most
    ``depth`` chunks wait; the encoder sees them in order, so the file is the one
    :class:`Mp4Writer` alone would write. A failure of the encoder is raised by the next
    :meth:`write` or by :meth:`close`."""

    def __init__(self, writer: Mp4Writer, depth: int = 2):
        self.writer = writer
        self._pending: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=depth)
        self._failure: BaseException | None = None
        self._aborted = False
        self._thread = threading.Thread(target=self._drain, name="talkgen-mp4-writer", daemon=True)
        self._thread.start()

    @property
    def frames_written(self) -> int:
        return self.writer.frames_written

    def write(self, frames: np.ndarray) -> None:
        """Queue uint8 RGB frames [F, H, W, 3]; blocks while ``depth`` chunks are waiting. The
        array must not change afterwards (the pipeline hands over a new one per chunk)."""
        self._raise_failure()
        self._pending.put(frames)

    def close(self) -> None:
        """Encode what is queued and finish the file."""
        self._stop()
        self._raise_failure()
        self.writer.close()

    def abort(self) -> None:
        """An error path: drop what is queued, close the container unfinished."""
        self._aborted = True
        self._stop()
        self.writer.container.close()

    def _drain(self) -> None:
        while (frames := self._pending.get()) is not None:
            if self._failure is None and not self._aborted:
                try:
                    self.writer.write(frames)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    self._failure = exc

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._pending.put(None)
            self._thread.join()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure


def _video_frame(rgb: np.ndarray, index: int) -> av.VideoFrame:
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    frame.pts = index  # in units of 1/fps (the stream's codec time base)
    return frame


def _audio_frame(samples: np.ndarray, start: int, sample_rate: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[None, :]), format="fltp", layout="mono")
    frame.sample_rate = sample_rate
    frame.pts = start
    frame.time_base = Fraction(1, sample_rate)
    return frame


# --------------------------------------------------------------------------------------------
# Live segments: a long video watchable while it is made (HLS, MPEG-TS)

# Video time t is at t + SEGMENT_CLOCK_START on the segments' clock: the AAC encoder's priming
# packet starts before the first frame, and an MPEG-TS timestamp cannot be negative.
SEGMENT_CLOCK_START = 1


class AacTrack:
    """A whole soundtrack as one AAC stream, so that the live segments carry consecutive packets
    of it: each segment takes the packets that begin within its frames, and at the joins there is
    no encoder priming, no gap and no sample twice. Encoded as the segments ask for it (in order),
    never more than a packet ahead. The encoder is deterministic: a job resumed elsewhere encodes
    the same packets for the segments still to come."""

    FRAME = 1024  # samples per AAC packet

    def __init__(self, audio: np.ndarray, sample_rate: int, num_frames: int, fps: int = DEFAULT_FPS):
        _require_encoder(AUDIO_CODEC)
        self.samples = fit_audio(audio, num_frames, sample_rate, fps)
        self.sample_rate, self.fps = sample_rate, fps
        self.bit_rate = min(128_000, 6 * sample_rate)  # as Mp4Writer
        self.codec = av.CodecContext.create(AUDIO_CODEC, "w")
        self.codec.sample_rate, self.codec.layout, self.codec.format = sample_rate, "mono", "fltp"
        self.codec.bit_rate, self.codec.time_base = self.bit_rate, Fraction(1, sample_rate)
        self.encoded = 0  # samples given to the encoder
        self.flushed = False
        self.pending: list[tuple[int, bytes]] = []  # (pts in samples, AAC packet) not handed out yet

    def sample_at(self, frame: int) -> int:
        return round(frame * self.sample_rate / self.fps)

    def packets_for(self, first_frame: int, frames: int, last: bool) -> list[tuple[int, bytes]]:
        """The packets that begin within ``frames`` frames from ``first_frame``; the first segment
        also takes the priming packet (it begins before 0), the last one the encoder's tail."""
        start = self.sample_at(first_frame) if first_frame > 0 else None
        end = None if last else self.sample_at(first_frame + frames)
        while not self.flushed and (end is None or not self.pending or self.pending[-1][0] < end):
            self._encode_more()
        taken = [(pts, data) for pts, data in self.pending if end is None or pts < end]
        self.pending = self.pending[len(taken):]
        return [(pts, data) for pts, data in taken if start is None or pts >= start]

    def _encode_more(self) -> None:
        if self.encoded < len(self.samples):
            piece = self.samples[self.encoded:self.encoded + self.FRAME]
            packets = self.codec.encode(_audio_frame(piece, self.encoded, self.sample_rate))
            self.encoded += len(piece)
        else:
            packets, self.flushed = self.codec.encode(None), True
        self.pending.extend((int(p.pts), bytes(p)) for p in packets)


def write_ts_segment(path: str | Path, video: str | Path, first_frame: int, audio: AacTrack | None = None,
                     last: bool = False, fps: int = DEFAULT_FPS) -> Path:
    """One HLS segment (MPEG-TS): the h264 of ``video`` (a chunk's mp4 written with
    ``b_frames=False``) remuxed as it is, no second encode, moved to start at ``first_frame`` of
    the whole video, with the packets of ``audio`` that begin within its frames. Segments made
    this way for consecutive chunks play as one stream: video timestamps run on frame by frame
    across the joins, and the audio is one continuous AAC stream (see :class:`AacTrack`).
    Written beside ``path`` and renamed into place."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial.ts")
    clock = Fraction(SEGMENT_CLOCK_START) + Fraction(first_frame, fps)
    try:
        with av.open(str(video)) as source, av.open(str(partial), mode="w", format="mpegts") as target:
            video_in = source.streams.video[0]
            video_out = target.add_stream_from_template(video_in)
            audio_out = None
            if audio is not None:
                audio_out = target.add_stream(AUDIO_CODEC, rate=audio.sample_rate, layout="mono")
                audio_out.bit_rate = audio.bit_rate  # opened only for its stream parameters
            frames = 0
            for packet in source.demux(video_in):
                if packet.dts is None:  # the demuxer's end-of-stream marker
                    continue
                shift = round(clock / packet.time_base)
                packet.pts, packet.dts = packet.pts + shift, packet.dts + shift
                packet.stream = video_out
                target.mux(packet)
                frames += 1
            if audio_out is not None:
                shift = int(Fraction(SEGMENT_CLOCK_START) * audio.sample_rate)
                for pts, data in audio.packets_for(first_frame, frames, last):
                    packet = av.Packet(data)
                    packet.pts = packet.dts = pts + shift
                    packet.duration = AacTrack.FRAME
                    packet.time_base = Fraction(1, audio.sample_rate)
                    packet.stream = audio_out
                    target.mux(packet)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# Reading


def iter_video_frames(path: str | Path) -> Iterator[np.ndarray]:
    """Decode the first video stream frame by frame as uint8 RGB ``[H, W, 3]``."""
    path = _existing(path, "Video")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(
                    f"Video file {path} has no video stream: give an MP4, MOV, MKV or WebM video."
                )
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            produced = False
            for frame in container.decode(stream):
                produced = True
                yield frame.to_ndarray(format="rgb24")
    except InputError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from None
    if not produced:
        raise InputError(f"Video file {path} contains no decodable frames: re-export the video.")


def read_video(path: str | Path, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode the first video stream as uint8 RGB ``[N, H, W, 3]``; returns the frames and the fps."""
    frames: list[np.ndarray] = []
    for frame in iter_video_frames(path):
        if max_frames is not None and len(frames) >= max_frames:
            break
        frames.append(frame)
    return np.stack(frames), probe_media(path).video.fps


def probe_media(path: str | Path) -> MediaInfo:
    """Container and per-stream facts (codec, fps, frame count, duration, size, sample rate)."""
    path = _existing(path, "Media")
    try:
        with av.open(str(path)) as container:
            streams = [_stream_info(s) for s in container.streams]
            if any(s.frames == 0 for s in streams):
                streams = _count_packets(container, streams)
            duration = container.duration / av.time_base if container.duration is not None else None
            return MediaInfo(str(path), container.format.name, duration, streams)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from None


def _stream_info(stream: av.stream.Stream) -> StreamInfo:
    duration = None
    if stream.duration is not None and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    ctx = stream.codec_context
    codec = ctx.name if ctx else ""
    common = dict(index=stream.index, kind=stream.type, codec=codec, duration=duration, frames=stream.frames)
    if stream.type == "video":
        return StreamInfo(**common, fps=_stream_fps(stream), width=ctx.width, height=ctx.height)
    if stream.type == "audio":
        return StreamInfo(**common, sample_rate=ctx.sample_rate, channels=ctx.channels)
    return StreamInfo(**common)


def _count_packets(container: av.container.InputContainer, streams: list[StreamInfo]) -> list[StreamInfo]:
    """Some containers (MKV, WebM) do not store frame counts: count packets instead."""
    counts = {s.index: 0 for s in streams}
    for packet in container.demux():
        if packet.size:
            counts[packet.stream.index] += 1
    return [s if s.frames else StreamInfo(**{**s.__dict__, "frames": counts[s.index]}) for s in streams]


def _stream_fps(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else float(DEFAULT_FPS)


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist: check the path.")
    return path


def _unreadable(path: Path, exc: Exception) -> InputError:
    return InputError(
        f"File {path} cannot be read as media ({type(exc).__name__}: {exc}): "
        "it is damaged or not audio/video; re-export it as MP4 (h264 + AAC)."
    )
