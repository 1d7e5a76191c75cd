"""Two speakers: one track per person for the model, and their sum as the video's soundtrack."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from talkgen.errors import InputError

AudioType = Literal["add", "para"]


def combine_speakers(
    track1: np.ndarray | None, track2: np.ndarray | None, audio_type: AudioType | str = "add"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lay out two speakers' speech (16 kHz) -> (track1, track2, mix), all the same length.

    * ``"add"``: turns. Person 1 speaks first, then person 2; each track is silent while the
      other person speaks: ``[s1, 0*len(s2)]`` and ``[0*len(s1), s2]``.
    * ``"para"``: both speak at once. The reference needs equal lengths (numpy broadcast error
      otherwise); here the shorter track is padded with trailing silence instead.

    A missing track (``None``, the reference's ``'None'`` path) is silence as long as the other.
    """
    if track1 is None and track2 is None:
        raise InputError("Two-speaker audio needs at least one speech track; give person1 or person2 audio.")
    first = _track(track1, track2)
    second = _track(track2, track1)
    if audio_type == "add":
        first, second = (
            np.concatenate([first, np.zeros_like(second)]),
            np.concatenate([np.zeros_like(first), second]),
        )
    elif audio_type == "para":
        length = max(len(first), len(second))
        first, second = _pad_to(first, length), _pad_to(second, length)
    else:
        raise InputError(f"audio_type must be 'add' (turns) or 'para' (simultaneous), got {audio_type!r}.")
    return first, second, first + second


def write_mix(path: str | Path, mix: np.ndarray, sample_rate: int = 16000) -> Path:
    """Write the soundtrack as a float wav (the sum of two normalised tracks may exceed 1.0,
    which 16-bit PCM would clip; the AAC encoder of the mp4 takes float)."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.asarray(mix, dtype=np.float32), sample_rate, subtype="FLOAT")
    return path


def _track(track: np.ndarray | None, other: np.ndarray | None) -> np.ndarray:
    if track is None:
        return np.zeros(len(other), dtype=np.float32)
    track = np.asarray(track, dtype=np.float32)
    if track.ndim != 1:
        raise InputError(f"A speech track must be mono [N], got shape {track.shape}.")
    return track


def _pad_to(track: np.ndarray, length: int) -> np.ndarray:
    return np.pad(track, (0, length - len(track)))
