"""Scene-segmented video dubbing (``scene_seg``): each shot of the source video is dubbed on its own.

Recipe::

    source video -> shots               (PySceneDetect, talkgen.media.scenes.detect_shots)
    shots        -> spans of the output  (cut at the same moments as the speech; short shots merged)
    per shot:       Pipeline.stream over the shot's frames and the shot's stretch of the speech
                    features (its own reference frames and colour reference, fresh context)
    chunks       -> one video            (global chunk numbers and frame offsets; the whole speech muxed)

A shot is a stream of its own: chunk 0 of every shot starts from the shot's first frame, not from
the last frames of the shot before, so a cut stays a cut. The chunks are numbered across the
video (shot 2's first chunk follows shot 1's last) and their frame positions are the video's, so
``on_chunk`` and ``resume`` work as for one stream: a stream resumed after chunk k continues in the
shot that chunk belongs to (the shot plan is a function of the source video and the speech's
length, so it is the same in every attempt).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from talkgen.errors import InputError
from talkgen.media.scenes import ShotList, ShotSpan, detect_shots, plan_shots
from talkgen.pipeline.chunks import Chunk, ChunkState, FrameSource, NoiseSource
from talkgen.pipeline.progress import ProgressCallback, ProgressEvent, no_progress

FPS = 25


def detect_request_shots(path: Path, request, speech_seconds: float) -> ShotList:
    """The source video's shots, read only as far as the video to be made needs: the speech's
    length, capped by ``max_frames`` (and by ``frame_num`` in clip mode)."""
    seconds = speech_seconds
    if request.max_frames is not None:
        seconds = min(seconds, request.max_frames / FPS)
    if request.mode != "streaming":
        seconds = min(seconds, request.frame_num / FPS)
    return detect_shots(path, max_seconds=seconds)


def video_frames(audio_frames: int, options) -> int:
    """Frames of the whole video: the speech's, capped by ``max_frames``, and by one chunk in
    clip mode (the rule of :meth:`Pipeline.stream`)."""
    total = audio_frames if options.max_frames is None else min(options.max_frames, audio_frames)
    return total if options.streaming else min(total, options.frame_num)


def chunk_count(frames: int, options) -> int:
    """Chunks :meth:`Pipeline.stream` makes for a shot of ``frames`` frames."""
    if not options.streaming or frames <= options.frame_num:
        return 1
    return 1 + math.ceil((frames - options.frame_num) / (options.frame_num - options.motion_frames))


class ShotFrames:
    """One shot's reference frames: the source's frames at their native index from the shot's first
    frame (as the whole-video dubbing reads them); past the shot's end, its last frame."""

    def __init__(self, frames: FrameSource, span: ShotSpan):
        self.frames, self.span = frames, span

    @property
    def size(self) -> tuple[int, int]:
        return self.frames.size

    def frame(self, index: int) -> np.ndarray:
        source = self.span.source_start + index
        if self.span.source_end is not None:
            source = min(source, self.span.source_end - 1)
        return self.frames.frame(source)


class OffsetNoise:
    """A noise source seen from one shot: its chunk k is the video's chunk ``offset + k``, so every
    chunk of the video has draws of its own, the same in a resumed run."""

    def __init__(self, noise: NoiseSource, offset: int):
        self.noise, self.offset = noise, offset

    def chunk_noise(self, chunk: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self.noise.chunk_noise(self.offset + chunk, shape)

    def motion_noise(self, chunk: int, draw: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self.noise.motion_noise(self.offset + chunk, draw, shape)


def describe_plan(spans: list[ShotSpan], shots: ShotList) -> str:
    """A note for the result: how the video was cut."""
    detected = len(shots.cuts) + 1
    listed = ", ".join(f"{s.first / FPS:.2f}-{s.end / FPS:.2f} s" for s in spans)
    note = f"scene_seg: {len(spans)} shot{'s' if len(spans) != 1 else ''} dubbed one by one ({listed})"
    shown = sum(1 for c in shots.cut_seconds if round(c * FPS) < spans[-1].end)
    merged = shown + 1 - len(spans)
    if merged > 0:
        note += f"; {merged} shot{'s' if merged != 1 else ''} shorter than 0.5 s merged into a neighbour"
    later = detected - shown - 1
    if later > 0:
        note += f"; {later} later shot{'s' if later != 1 else ''} of the source start{'s' if later == 1 else ''} after the video's end"
    return note


def stream_shots(
    pipeline,
    frames: FrameSource,
    shots: ShotList,
    audio_embeddings: list[torch.Tensor],
    *,
    context: torch.Tensor,
    context_null: torch.Tensor,
    options,
    person_masks: torch.Tensor | None = None,
    noise: NoiseSource,
    resume: ChunkState | None = None,
    progress: ProgressCallback = no_progress,
    notes: list[str] | None = None,
) -> Iterator[Chunk]:
    """Yield the video's chunks shot by shot (the same contract as :meth:`Pipeline.stream`:
    ``first_frame`` and ``total_frames`` are the whole video's, chunk numbers run across shots).
    ``progress`` also gets a ``"shot"`` event (step = shot number, total = shots) as each starts."""
    total = video_frames(min(e.shape[0] for e in audio_embeddings), options)
    spans = plan_shots(shots, total, FPS)
    if notes is not None:
        notes.append(describe_plan(spans, shots))
    shot_options = replace(options, max_frames=None)
    offset = 0
    for number, span in enumerate(spans):
        count = chunk_count(span.frames, shot_options)
        local = None
        if resume is not None and resume.frames_done >= span.end:  # finished in an earlier attempt
            offset += count
            continue
        if resume is not None and resume.frames_done > span.first:
            if not offset <= resume.index < offset + count:
                raise InputError(f"Cannot resume after chunk {resume.index}: it does not belong to shot {number + 1} "
                                 "of this video's shot plan (was the source video changed?). Start the job again.")
            local = ChunkState(index=resume.index - offset, start=resume.start - span.first, latent=resume.latent,
                               frames_done=resume.frames_done - span.first)
        progress(ProgressEvent("shot", number + 1, len(spans)))
        base = offset

        def shot_progress(event: ProgressEvent, base: int = base) -> None:
            progress(replace(event, chunk=event.chunk + base))

        made = 0
        for chunk in pipeline.stream(ShotFrames(frames, span), [e[span.first : span.end] for e in audio_embeddings],
                                     context=context, context_null=context_null, options=shot_options,
                                     person_masks=person_masks, noise=OffsetNoise(noise, base), resume=local,
                                     progress=shot_progress):
            made = chunk.index + 1
            state = chunk.state
            yield replace(chunk, index=base + chunk.index, first_frame=span.first + chunk.first_frame, total_frames=total,
                          state=ChunkState(index=base + state.index, start=span.first + state.start, latent=state.latent,
                                           frames_done=span.first + state.frames_done))
        if made != count:  # the numbering across shots relies on chunk_count matching stream()
            raise RuntimeError(f"shot {number + 1} made {made} chunks, {count} were planned")
        offset += count
