"""Speech as the models want it: mono float32 at 16 kHz, loudness-normalised to -23 LUFS.

Reference: ``librosa.load(path, sr=16000)`` (libsndfile + soxr "HQ", length fixed to
``ceil(N * 16000 / sr)``) then pyloudnorm. We resample with soxr at the same quality and fix the
length the same way, so the result matches up to the decoder (e.g. ffmpeg for mp3/aac).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from talkgen.audio.decode import read_audio

SAMPLE_RATE = 16000
TARGET_LUFS = -23.0


def load_speech(path: str | Path) -> np.ndarray:
    """Any audio file (or a video's sound) -> mono float32 ``[N]`` at 16 kHz, at -23 LUFS."""
    samples, rate = read_audio(path)
    return loudness_normalise(resample(samples, rate, SAMPLE_RATE), SAMPLE_RATE)


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """soxr high-quality resampling, length fixed to ``ceil(N * target / rate)`` as librosa does."""
    import soxr

    samples = np.asarray(samples, dtype=np.float32)
    if rate == target:
        return samples
    out = soxr.resample(samples, rate, target, quality="HQ")
    length = math.ceil(len(samples) * target / rate)
    if len(out) < length:
        out = np.pad(out, (0, length - len(out)))
    return np.ascontiguousarray(out[:length], dtype=np.float32)


def loudness_normalise(samples: np.ndarray, rate: int = SAMPLE_RATE, target_lufs: float = TARGET_LUFS) -> np.ndarray:
    """Scale to ``target_lufs`` integrated loudness (ITU-R BS.1770, pyloudnorm).

    Left unchanged, as in the reference, when the measured loudness is beyond +-100 LUFS (silence
    reads as -inf); also left unchanged when the clip is shorter than one 400 ms gating block,
    where pyloudnorm cannot measure (the reference would crash there).
    """
    import pyloudnorm

    samples = np.asarray(samples, dtype=np.float32)
    meter = pyloudnorm.Meter(rate)
    if len(samples) < meter.block_size * rate:
        return samples
    loudness = meter.integrated_loudness(samples)
    if not np.isfinite(loudness) or abs(loudness) > 100:
        return samples
    with warnings.catch_warnings():
        # Peaks above 1.0 are fine: the samples stay float until the AAC encoder.
        warnings.filterwarnings("ignore", message="Possible clipped samples in output")
        normalised = pyloudnorm.normalize.loudness(samples, loudness, target_lufs)
    return np.asarray(normalised, dtype=np.float32)
