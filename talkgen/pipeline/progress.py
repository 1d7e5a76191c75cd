"""One progress type for everything: the CLI draws it as a bar, the service streams it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    stage: str  # "load", "audio", "text", "image", "condition", "sample", "decode", "write"
    step: int = 0
    total: int = 0
    chunk: int = 0


ProgressCallback = Callable[[ProgressEvent], None]


def no_progress(_event: ProgressEvent) -> None:
    return None
