"""Synthetic demo inputs, drawn and synthesised by this code: no bundled photos or recordings.

These are **synthetic**: a cartoon face drawn with PIL shapes and a speech-like buzz made from a
pulse train through vowel formant filters. They let the demo, the CLI and the tests run without
downloading anything; they are not real people or real speech, and the model's output on them
shows the mechanics (lip motion follows the syllables), not the quality reachable with a photo
and a recording. Both are deterministic: the same arguments give the same array, bit for bit.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Drawing happens at this multiple of the requested size, then is downsampled: smooth edges.
_SUPERSAMPLE = 2

_BACKGROUND_TOP = (70, 110, 150)
_BACKGROUND_BOTTOM = (170, 195, 215)
_SKIN = (231, 190, 160)
_SKIN_SHADE = (208, 160, 130)
_HAIR = (72, 48, 34)
_SHIRT = (52, 84, 128)
_EYE_WHITE = (246, 244, 240)
_IRIS = (84, 112, 70)
_PUPIL = (20, 16, 14)
_LIPS = (176, 84, 84)
_MOUTH = (96, 34, 40)


def sample_portrait(size: tuple[int, int] = (512, 512)) -> np.ndarray:
    """A drawn head-and-shoulders portrait, uint8 RGB ``[H, W, 3]`` for ``size = (H, W)``.

    The face sits in the centre, facing the camera, with the mouth slightly open, roughly where a
    talking-head photo would put it, so bucket choice and cropping behave as with a real photo.
    """
    height, width = size
    if height < 16 or width < 16:
        raise ValueError(f"portrait size must be at least 16x16, got {size}")
    canvas_w, canvas_h = width * _SUPERSAMPLE, height * _SUPERSAMPLE
    image = Image.fromarray(_vertical_gradient(canvas_h, canvas_w, _BACKGROUND_TOP, _BACKGROUND_BOTTOM))
    draw = ImageDraw.Draw(image)

    # Everything is laid out in units of the shorter side, centred, so any aspect ratio works.
    unit = min(canvas_w, canvas_h)
    cx, cy = canvas_w / 2, canvas_h / 2

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        return (cx + x0 * unit, cy + y0 * unit, cx + x1 * unit, cy + y1 * unit)

    def point(x: float, y: float) -> tuple[float, float]:
        return (cx + x * unit, cy + y * unit)

    draw.ellipse(box(-0.42, 0.30, 0.42, 0.95), fill=_SHIRT)  # shoulders
    draw.rectangle(box(-0.08, 0.12, 0.08, 0.36), fill=_SKIN_SHADE)  # neck
    draw.ellipse(box(-0.25, -0.36, 0.25, 0.10), fill=_HAIR)  # hair, behind the face
    draw.ellipse(box(-0.25, -0.05, -0.19, 0.06), fill=_SKIN_SHADE)  # ears
    draw.ellipse(box(0.19, -0.05, 0.25, 0.06), fill=_SKIN_SHADE)
    draw.ellipse(box(-0.20, -0.26, 0.20, 0.24), fill=_SKIN)  # face
    draw.chord(box(-0.21, -0.33, 0.21, -0.05), start=180, end=360, fill=_HAIR)  # fringe

    for side in (-1, 1):
        ex = 0.085 * side
        draw.ellipse(box(ex - 0.05, -0.07, ex + 0.05, -0.02), fill=_EYE_WHITE)
        draw.ellipse(box(ex - 0.022, -0.067, ex + 0.022, -0.023), fill=_IRIS)
        draw.ellipse(box(ex - 0.010, -0.055, ex + 0.010, -0.035), fill=_PUPIL)
        brow = box(ex - 0.055, -0.115, ex + 0.055, -0.085)
        draw.arc(brow, start=200, end=340, fill=_HAIR, width=max(1, unit // 80))

    draw.polygon([point(0, -0.02), point(-0.028, 0.06), point(0.028, 0.06)], fill=_SKIN_SHADE)  # nose
    draw.ellipse(box(-0.075, 0.105, 0.075, 0.165), fill=_LIPS)  # lips
    draw.ellipse(box(-0.055, 0.122, 0.055, 0.150), fill=_MOUTH)  # open mouth
    draw.ellipse(box(-0.15, 0.04, -0.09, 0.09), fill=(236, 170, 150))  # cheeks
    draw.ellipse(box(0.09, 0.04, 0.15, 0.09), fill=(236, 170, 150))

    image = image.filter(ImageFilter.GaussianBlur(radius=_SUPERSAMPLE * 0.6))
    image = image.resize((width, height), resample=Image.LANCZOS)
    return np.asarray(image, dtype=np.uint8).copy()


def _vertical_gradient(height: int, width: int, top: tuple[int, ...], bottom: tuple[int, ...]) -> np.ndarray:
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    rows = (1 - t) * np.array(top, float) + t * np.array(bottom, float)
    return np.broadcast_to(rows, (height, width, 3)).round().astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Speech-like audio

# Formant frequencies and bandwidths (Hz) of five vowels, for an adult male voice.
_VOWELS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "a": ((730.0, 1090.0, 2440.0), (90.0, 110.0, 170.0)),
    "e": ((530.0, 1840.0, 2480.0), (70.0, 100.0, 160.0)),
    "i": ((270.0, 2290.0, 3010.0), (60.0, 100.0, 170.0)),
    "o": ((570.0, 840.0, 2410.0), (80.0, 90.0, 160.0)),
    "u": ((300.0, 870.0, 2240.0), (60.0, 90.0, 150.0)),
}
# A fixed, speech-like vowel sequence (cycled), and the syllable rate of ordinary speech.
_SYLLABLES = "aoeiauoeaiouea"
_SYLLABLES_PER_SECOND = 4.0


def sample_speech(seconds: float = 3.0, sample_rate: int = 16000) -> np.ndarray:
    """A speech-like mono float32 signal: syllables of voiced vowels with pauses and fricatives.

    Source-filter synthesis: a glottal pulse train whose pitch glides around 120 Hz (with a
    falling sentence contour) drives a cascade of three formant resonators that move from
    vowel to vowel; a raised-cosine envelope shapes ~4 syllables per second, and short bursts of
    filtered noise stand in for consonants. Peak level 0.5.
    """
    n = int(round(seconds * sample_rate))
    if n <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    t = np.arange(n) / sample_rate
    syllable_pos = t * _SYLLABLES_PER_SECOND  # syllable index + phase within it

    source = _glottal_source(t, sample_rate)
    formants, bandwidths = _formant_tracks(syllable_pos)
    voiced = _formant_cascade(source, formants, bandwidths, sample_rate)
    envelope = _syllable_envelope(syllable_pos)
    signal = voiced / (np.abs(voiced).max() + 1e-9) * envelope + _consonants(syllable_pos, sample_rate)
    return (0.5 * signal / (np.abs(signal).max() + 1e-9)).astype(np.float32)


def _glottal_source(t: np.ndarray, sample_rate: int) -> np.ndarray:
    """Pulse train with a natural pitch contour, spectrally tilted like a glottal flow derivative."""
    duration = max(t[-1], 1e-3)
    # Falling sentence contour, a slow intonation swing, and a little vibrato-like wobble.
    f0 = 125.0 - 25.0 * (t / duration) + 12.0 * np.sin(2 * np.pi * 0.9 * t)
    f0 = f0 + 3.0 * np.sin(2 * np.pi * 5.5 * t)
    phase = np.cumsum(f0 / sample_rate)
    pulses = np.diff(np.floor(phase), prepend=0.0)  # 1 where a new glottal period starts
    # Each pulse becomes a short decaying excitation (one-pole lowpass: the -6 dB/octave tilt);
    # the differencing that follows gives the sharp closure of a glottal flow derivative.
    decay = np.exp(-2 * np.pi * 400.0 / sample_rate)
    flow = _one_pole(pulses, decay)
    return np.diff(flow, prepend=0.0)


def _formant_tracks(syllable_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Formant frequencies and bandwidths [N, 3], gliding from each vowel to the next."""
    freqs = np.array([_VOWELS[v][0] for v in _SYLLABLES])
    bws = np.array([_VOWELS[v][1] for v in _SYLLABLES])
    index = np.floor(syllable_pos).astype(int)
    frac = syllable_pos - index
    glide = np.clip((frac - 0.6) / 0.4, 0.0, 1.0)[:, None]  # hold the vowel, then move on
    cur, nxt = index % len(_SYLLABLES), (index + 1) % len(_SYLLABLES)
    return (1 - glide) * freqs[cur] + glide * freqs[nxt], (1 - glide) * bws[cur] + glide * bws[nxt]


def _formant_cascade(x: np.ndarray, freqs: np.ndarray, bws: np.ndarray, sample_rate: int) -> np.ndarray:
    """Klatt-style cascade of two-pole resonators with time-varying coefficients (unity DC gain)."""
    radius = np.exp(-np.pi * bws / sample_rate)
    b1 = 2 * radius * np.cos(2 * np.pi * freqs / sample_rate)
    b2 = -radius * radius
    a0 = 1 - b1 - b2
    y = x.astype(np.float64)
    for k in range(freqs.shape[1]):
        y = _resonator(y, a0[:, k], b1[:, k], b2[:, k])
    return y


def _resonator(x: np.ndarray, a0: np.ndarray, b1: np.ndarray, b2: np.ndarray) -> np.ndarray:
    # A recursive filter has no vectorised numpy form without scipy; lists keep the loop quick.
    out = [0.0] * len(x)
    y1 = y2 = 0.0
    for i, (xi, g, c1, c2) in enumerate(zip(x.tolist(), a0.tolist(), b1.tolist(), b2.tolist())):
        y = g * xi + c1 * y1 + c2 * y2
        out[i], y2, y1 = y, y1, y
    return np.array(out)


def _one_pole(x: np.ndarray, decay: float) -> np.ndarray:
    out = [0.0] * len(x)
    y = 0.0
    for i, xi in enumerate(x.tolist()):
        y = xi + decay * y
        out[i] = y
    return np.array(out)


def _syllable_envelope(syllable_pos: np.ndarray) -> np.ndarray:
    """Raised-cosine loudness per syllable, a short gap between syllables, a pause every fifth."""
    frac = syllable_pos - np.floor(syllable_pos)
    voiced_part = np.clip(frac / 0.8, 0.0, 1.0)
    env = np.where(frac < 0.8, np.sin(np.pi * voiced_part) ** 0.7, 0.0)
    index = np.floor(syllable_pos).astype(int)
    loudness = 0.75 + 0.25 * np.cos(index * 2.1)  # stressed and unstressed syllables
    pause = (index % 5) == 4
    return np.where(pause, 0.0, env * loudness)


def _consonants(syllable_pos: np.ndarray, sample_rate: int) -> np.ndarray:
    """Short bright noise bursts at syllable onsets, like /s/, /t/ or /k/ (fixed seed)."""
    noise = np.random.default_rng(1234).standard_normal(len(syllable_pos))
    bright = np.diff(noise, prepend=0.0)  # first difference: energy pushed to high frequencies
    frac = syllable_pos - np.floor(syllable_pos)
    index = np.floor(syllable_pos).astype(int)
    burst = (frac > 0.9) & (index % 2 == 0) & ((index % 5) != 3)  # before some syllables
    return 0.08 * bright * burst
