"""The pieces of the chunk loop that are plain bookkeeping: audio windows, the frame mask,
random draws, reference frames and the state a stream resumes from.

A video is made in chunks of ``frame_num`` frames. Chunk k starts at audio frame
``k * (frame_num - motion_frames)``; its first ``motion_frames`` frames continue the previous
chunk, so each chunk after the first adds ``frame_num - motion_frames`` new frames. Clip mode is
the one-chunk case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

AUDIO_WINDOW_OFFSETS = torch.arange(-2, 3)  # wav2vec2 frames around each video frame


def frame_mask(frame_num: int, known_frames: int, lat_h: int, lat_w: int) -> torch.Tensor:
    """The 4 mask channels of ``y``: 1 on known pixel frames, laid out as the VAE packs frames.

    [1, F, h, w] with ones on the first ``known_frames`` -> frame 0 repeated 4 times -> [4, T, h, w].
    """
    mask = torch.ones(1, frame_num, lat_h, lat_w)
    mask[:, known_frames:] = 0
    mask = torch.cat([mask[:, :1].repeat_interleave(4, dim=1), mask[:, 1:]], dim=1)
    return mask.view(mask.shape[1] // 4, 4, lat_h, lat_w).transpose(0, 1)


def audio_windows(embedding: torch.Tensor, start: int, frame_num: int) -> torch.Tensor:
    """[N, layers, channels] per-video-frame features -> [F, 5, layers, channels] windows,
    indices clamped at both ends as the reference does."""
    frames = torch.arange(start, start + frame_num)[:, None] + AUDIO_WINDOW_OFFSETS[None]
    return embedding[frames.clamp(0, embedding.shape[0] - 1)]


def pad_for_last_chunk(embedding: torch.Tensor, chunk_end: int) -> torch.Tensor:
    """The reference's tail for the last chunk: when a person's features end before the chunk
    does, append the last ``chunk_end - N + 3`` frames in reverse order (a mirror, not silence)."""
    if chunk_end < embedding.shape[0]:
        return embedding
    pad = min(chunk_end - embedding.shape[0] + 3, embedding.shape[0])
    return torch.cat([embedding, embedding[-pad:].flip(0)])


def clip_frame_count(audio_frames: int, frame_num: int) -> int:
    """Frames of a single chunk: the chunk length, or fewer for short speech (4n+1, >= 5)."""
    if audio_frames >= frame_num:
        return frame_num
    return max(5, 4 * ((audio_frames - 1 + 3) // 4) + 1)


# -- random draws ----------------------------------------------------------------------------


class NoiseSource(Protocol):
    """Where the loop's random numbers come from: the initial noise of each chunk, and the fresh
    noise that re-noises the context latents before the first step (draw 0) and after step i
    (draw i + 1) of every chunk after the first."""

    def chunk_noise(self, chunk: int, shape: tuple[int, ...]) -> torch.Tensor: ...

    def motion_noise(self, chunk: int, draw: int, shape: tuple[int, ...]) -> torch.Tensor: ...


class SeededNoise:
    """Deterministic draws from a seed, each (chunk, draw) from its own generator: a stream
    resumed at chunk k draws exactly what an uninterrupted run draws there, on any device."""

    def __init__(self, seed: int):
        self.seed = seed

    def _draw(self, chunk: int, draw: int, shape: tuple[int, ...]) -> torch.Tensor:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + chunk * 10_007 + draw) % 2**63)
        return torch.randn(shape, generator=generator)

    def chunk_noise(self, chunk: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self._draw(chunk, -1, shape)

    def motion_noise(self, chunk: int, draw: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self._draw(chunk, draw, shape)


@dataclass
class RecordedNoise:
    """Draws handed in (the golden files store the reference's)."""

    chunks: dict[int, torch.Tensor]
    motion: dict[tuple[int, int], torch.Tensor]

    def chunk_noise(self, chunk: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self.chunks[chunk]

    def motion_noise(self, chunk: int, draw: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self.motion[(chunk, draw)]


# -- reference frames ------------------------------------------------------------------------


class FrameSource(Protocol):
    """The condition picture at a video frame index: the image itself, or a source-video frame."""

    @property
    def size(self) -> tuple[int, int]: ...  # (height, width) of the source

    def frame(self, index: int) -> np.ndarray: ...  # uint8 [H, W, 3]


class StillImage:
    def __init__(self, image: np.ndarray):
        self.image = image

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]

    def frame(self, index: int) -> np.ndarray:
        return self.image


class VideoFrames:
    """Frames of a source video at their native index (no fps conversion, as the reference);
    past the end, the last frame. Decodes forward once, keeping only the frames asked for next,
    so a long source video is never held in memory."""

    def __init__(self, path: Path | None = None, frames: np.ndarray | None = None):
        self.path, self.array = path, frames
        self._iterator = None
        self._position = -1
        self._current: np.ndarray | None = None
        self._exhausted = False
        first = self.frame(0)
        self._size = (first.shape[0], first.shape[1])

    @property
    def size(self) -> tuple[int, int]:
        return self._size

    def frame(self, index: int) -> np.ndarray:
        if self.array is not None:
            return self.array[min(index, len(self.array) - 1)]
        if index < self._position:  # a rewind (resume): start again
            self._iterator, self._position, self._current, self._exhausted = None, -1, None, False
        if self._iterator is None:
            from talkgen.media.video import iter_video_frames

            self._iterator = iter_video_frames(self.path)
        while self._position < index and not self._exhausted:
            try:
                self._current = next(self._iterator)
                self._position += 1
            except StopIteration:
                self._exhausted = True
        return self._current


# -- chunk results and resume state ----------------------------------------------------------


@dataclass
class ChunkState:
    """Enough to resume a stream after chunk ``index``: its audio start and its final latent
    (decoding it again gives the context frames of the next chunk exactly)."""

    index: int
    start: int
    latent: torch.Tensor
    frames_done: int  # frames of the final video written up to and including this chunk


@dataclass
class Chunk:
    index: int
    frames: np.ndarray  # uint8 [n, H, W, 3]: this chunk's new frames, trimmed to the video's length
    first_frame: int  # position of frames[0] in the final video
    total_frames: int  # length of the final video
    latent: torch.Tensor
    state: ChunkState
    teacache: object | None = None  # the chunk's TeaCache (its .computed table says which passes ran)


ChunkCallback = Callable[[Chunk], None]
ImageEncoderFn = Callable[[torch.Tensor, int], torch.Tensor]  # (frame [3, H, W] in [-1, 1], chunk) -> tokens
