"""How long ``talkgen.media.video.Mp4Writer`` takes to encode one clip's frames (h264 + AAC) with
PyAV's default slice threading (what the writer uses) against x264's frame threading, on this
machine's cores. CPU only.

    python benchmarks/bench_mp4.py                  # 81 frames of 448x896, 5 rounds, alternating
    python benchmarks/bench_mp4.py --frames 81 --height 720 --width 1280
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save  # noqa: E402
from talkgen.media.samples import sample_portrait, sample_speech  # noqa: E402
from talkgen.media.video import DEFAULT_FPS, Mp4Writer  # noqa: E402


def moving_portrait(frames: int, height: int, width: int) -> np.ndarray:
    """The sample portrait drifting a few pixels per frame with a little sensor noise, so x264 sees
    motion and texture as in a generated clip (a still frame would encode almost for free)."""
    still = sample_portrait((height, width + 2 * frames))
    rng = np.random.default_rng(0)
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        shifted = still[:, 2 * t : 2 * t + width].astype(np.int16) + rng.integers(-3, 4, (height, width, 3))
        out[t] = shifted.clip(0, 255)
    return out


def encode(frames: np.ndarray, audio: np.ndarray, threading: str, folder: Path) -> tuple[float, int]:
    path = folder / f"{threading}.mp4"
    start = time.perf_counter()
    writer = Mp4Writer(path, frames.shape[2], frames.shape[1], audio, 16_000)
    writer.video.thread_type = threading
    writer.write(frames)
    writer.close()
    return time.perf_counter() - start, path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=448)
    ap.add_argument("--width", type=int, default=896)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    frames = moving_portrait(a.frames, a.height, a.width)
    audio = sample_speech(a.frames / DEFAULT_FPS)
    times: dict[str, list[float]] = {"FRAME": [], "SLICE": []}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        encode(frames, audio, "FRAME", Path(tmp))  # warm-up: codec libraries, page cache
        for _ in range(a.rounds):  # alternating, so a slower moment of the machine hits both
            for threading in times:
                seconds, sizes[threading] = encode(frames, audio, threading, Path(tmp))
                times[threading].append(seconds)
    for threading, values in times.items():
        print(f"{threading:5s} threading: median {statistics.median(values):.3f} s "
              f"({', '.join(f'{v:.3f}' for v in values)}), {sizes[threading]} bytes")
    save("mp4_encode", dict(frames=a.frames, size=[a.height, a.width], rounds=a.rounds, cpus=os.cpu_count(),
                            frame_threading_s=statistics.median(times["FRAME"]),
                            slice_threading_s=statistics.median(times["SLICE"]), all_s=times, bytes=sizes))


if __name__ == "__main__":
    main()
