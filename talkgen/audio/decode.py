"""Read the samples of any common audio file, or the audio track of a video, as mono float32.

soundfile (libsndfile) first: it reads wav, flac, ogg/vorbis/opus and mp3 directly and exactly.
Anything it cannot open (m4a/aac, the audio of mp4/mov/mkv/webm, wma, ...) goes through PyAV's
ffmpeg decoders. Channels are averaged to mono, as librosa's ``to_mono`` does in the reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from talkgen.errors import InputError


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """``path`` -> (mono float32 samples ``[N]``, sample rate), at the file's own rate."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"Audio file {path} does not exist; check the path.")
    if not path.is_file():
        raise InputError(f"Audio path {path} is not a file; give the path of an audio or video file.")
    decoded = _read_soundfile(path)
    if decoded is None:
        decoded = _read_pyav(path)
    samples, rate = decoded
    if samples.size == 0:
        raise InputError(f"Audio file {path} contains no samples; export the speech again with some sound in it.")
    return samples, rate


def _read_soundfile(path: Path) -> tuple[np.ndarray, int] | None:
    """libsndfile's reading, or None when it does not know the format (PyAV is tried next)."""
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # [N, channels]
    except RuntimeError:  # sf.LibsndfileError: a format libsndfile does not know
        return None
    return data.mean(axis=1, dtype=np.float32), int(rate)


def _read_pyav(path: Path) -> tuple[np.ndarray, int]:
    """The first audio stream of any container ffmpeg knows, decoded to planar float."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise InputError(
            f"{path} could not be read as audio ({_reason(exc)}); give a wav, flac, mp3, m4a, ogg file "
            "or a video with a sound track."
        ) from exc
    with container:
        if not container.streams.audio:
            raise InputError(
                f"{path} has no audio stream; give the speech as an audio file or a video with sound."
            )
        stream = container.streams.audio[0]
        # Keep the file's layout and rate; only the sample format changes, so mixing down to mono
        # and resampling happen here, the same way for every input.
        resampler = av.AudioResampler(format="fltp")
        planes: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                planes.extend(out.to_ndarray() for out in resampler.resample(frame))
            planes.extend(out.to_ndarray() for out in resampler.resample(None))
        except av.error.FFmpegError as exc:
            raise InputError(
                f"The audio of {path} could not be decoded ({_reason(exc)}); the file may be damaged, export it again."
            ) from exc
        rate = stream.codec_context.sample_rate or stream.rate
    if not planes:
        return np.zeros(0, dtype=np.float32), int(rate or 0)
    data = np.concatenate(planes, axis=1)  # [channels, N]
    return data.mean(axis=0, dtype=np.float32), int(rate)


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
