"""Stream a long speech through the tiny model on the CPU and record memory per chunk.

    .venv/bin/python scripts/stream_long.py --minutes 10 --out /tmp/long.mp4

Checks what the features issue asks of long videos: the frame count follows the rule (one frame
per 40 ms of speech), video and audio stay in sync over the whole length, and resident memory
does not grow with the length (frames go to the mp4 as chunks finish).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import soundfile as sf
from PIL import Image


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--model", default="multitalk")
    ap.add_argument("--out", type=Path, default=Path("long.mp4"))
    a = ap.parse_args()

    from talkgen.media.samples import sample_portrait, sample_speech
    from talkgen.media.video import probe_media
    from talkgen.pipeline.pipeline import Pipeline
    from talkgen.pipeline.request import GenerationRequest
    from talkgen.pipeline.tiny import ensure_tiny_weights

    tmp = Path(tempfile.mkdtemp())
    Image.fromarray(sample_portrait((400, 400))).save(tmp / "p.png")
    sf.write(tmp / "s.wav", sample_speech(a.minutes * 60), 16_000)
    pipe = Pipeline.from_pretrained(ensure_tiny_weights(tmp / "tiny"), a.model, device="cpu")
    pipe.bucket_divisor = 8  # 80x80 frames: the loop is measured, not the pixels
    request = GenerationRequest.parse(dict(cond_image=str(tmp / "p.png"), cond_audio={"person1": str(tmp / "s.wav")},
                                           mode="streaming", sample_steps=1, text_guide_scale=1.0))
    samples: list[tuple[int, float]] = []
    start = time.time()
    result = pipe.generate(request, output=a.out,
                           on_chunk=lambda chunk: samples.append((chunk.first_frame + len(chunk.frames), rss_mib())))
    elapsed = time.time() - start
    info = probe_media(a.out)
    expected = int(a.minutes * 60 * 16_000 / 16_000 * 25)
    report = dict(
        minutes=a.minutes, model=a.model, frames=result.num_frames, expected_frames=expected,
        chunks=len(samples), seconds=round(elapsed, 1), video_s=info.video.duration, audio_s=info.audio.duration,
        rss_mib_after_first_chunk=round(samples[0][1]), rss_mib_at_half=round(samples[len(samples) // 2][1]),
        rss_mib_at_end=round(samples[-1][1]),
    )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
