"""Scene-segmented dubbing (``scene_seg``): shot detection on a synthetic video with hard cuts, the
shots laid on the speech's timeline (nothing dropped, short shots merged), and the tiny
InfiniteTalk model dubbing each shot from its own source frames, the video as long as the speech."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from talkgen.errors import InputError
from talkgen.media.samples import sample_portrait, sample_speech
from talkgen.media.scenes import ShotList, ShotSpan, detect_shots, plan_shots
from talkgen.pipeline.request import GenerationRequest

pytest.importorskip("scenedetect")

EXAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "examples"
# One colour per shot, far apart in hue and all bright (below ~12 ThresholdDetector sees a fade).
COLOURS = np.array([(220, 60, 40), (40, 200, 90), (50, 80, 230), (230, 210, 60)], np.float32)
SHOT_LENGTHS = (30, 25, 35, 30)  # 120 frames at 25 fps; cuts at 30, 55, 90


def write_shots(path: Path, lengths=SHOT_LENGTHS, size=(96, 96), fps=25) -> Path:
    """A video of solid-colour shots, each with a stripe that moves, so frames within a shot differ."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.height, stream.width, stream.pix_fmt = *size, "yuv420p"
        for shot, count in enumerate(lengths):
            colour = COLOURS[shot % len(COLOURS)].astype(np.uint8)
            for k in range(count):
                pixels = np.empty((*size, 3), np.uint8)
                pixels[:] = colour
                stripe = (k * 3 + shot * 17) % size[1]
                pixels[:, stripe : stripe + 8] = 255 - colour
                container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def shot_of(frame) -> int:
    """Which source shot a [3, H, W] frame in [-1, 1] shows: the nearest colour (median, so the stripe
    does not count)."""
    rgb = ((frame.float() + 1) / 2 * 255).flatten(1).median(dim=1).values.numpy()
    return int(np.argmin(np.linalg.norm(COLOURS - rgb, axis=1)))


# -- detection -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shots_video(tmp_path_factory) -> Path:
    return write_shots(tmp_path_factory.mktemp("scenes") / "shots.mp4")


def test_detects_the_hard_cuts_at_their_frames(shots_video: Path) -> None:
    shots = detect_shots(shots_video)
    assert shots.cuts == (30, 55, 90)
    assert shots.cut_seconds == pytest.approx((1.2, 2.2, 3.6))
    assert (shots.fps, shots.frames_read, shots.complete) == (25.0, 120, True)
    assert shots.seconds_read == pytest.approx(4.8)
    assert [(s.start, s.end) for s in shots.shots] == [(0, 30), (30, 55), (55, 90), (90, 120)]


def test_detection_stops_after_the_time_needed(shots_video: Path) -> None:
    shots = detect_shots(shots_video, max_seconds=1.0)
    assert shots.cuts[0] == 30  # the cut before the limit is found
    assert not shots.complete and shots.frames_read < 120


def test_a_video_without_cuts_is_one_shot(tmp_path: Path) -> None:
    shots = detect_shots(write_shots(tmp_path / "one.mp4", lengths=(40,)))
    assert shots.cuts == () and len(shots.shots) == 1


# -- the shots on the speech's timeline ------------------------------------------------------------


def shot_list(cut_seconds, fps=25.0, frames=120) -> ShotList:
    cuts = tuple(round(t * fps) for t in cut_seconds)
    return ShotList(cuts=cuts, cut_seconds=tuple(cut_seconds), fps=fps, frames_read=frames,
                    seconds_read=frames / fps, complete=True)


def test_speech_longer_than_the_video_extends_the_last_shot() -> None:
    spans = plan_shots(shot_list((1.2, 2.2, 3.6)), 135)
    assert spans == [ShotSpan(0, 30, 0, 30), ShotSpan(30, 55, 30, 55), ShotSpan(55, 90, 55, 90), ShotSpan(90, 135, 90, None)]


def test_speech_shorter_than_the_video_ends_inside_a_shot() -> None:
    spans = plan_shots(shot_list((1.2, 2.2, 3.6)), 70)
    # The third shot is cut at the speech's end; its source frames still end where it ends.
    assert spans == [ShotSpan(0, 30, 0, 30), ShotSpan(30, 55, 30, 55), ShotSpan(55, 70, 55, 90)]


def test_short_shots_are_merged_not_dropped() -> None:
    # a 0.2 s flash in the middle joins the shot before it; a short first shot joins the next;
    # a short tail (the speech ends 0.2 s after a cut) joins the shot before it
    assert plan_shots(shot_list((2.0, 2.2)), 100) == [ShotSpan(0, 55, 0, 55), ShotSpan(55, 100, 55, None)]
    assert plan_shots(shot_list((0.3, 2.0)), 100) == [ShotSpan(0, 50, 0, 50), ShotSpan(50, 100, 50, None)]
    assert plan_shots(shot_list((2.0, 3.8)), 100) == [ShotSpan(0, 50, 0, 50), ShotSpan(50, 100, 50, None)]
    for spans in (plan_shots(shot_list(c), 100) for c in [(0.1, 0.2, 0.3), (1.0, 1.4, 1.8, 3.0), (3.9,)]):
        assert spans[0].first == 0 and spans[-1].end == 100
        assert all(a.end == b.first for a, b in zip(spans, spans[1:]))  # contiguous: no frame lost
        assert all(s.frames >= 13 for s in spans) or len(spans) == 1


def test_cuts_are_placed_by_time_at_any_source_frame_rate() -> None:
    # 30 fps source: cuts at source frames 45 and 120 are 1.5 s and 4 s, output frames 38 and 100
    spans = plan_shots(shot_list((1.5, 4.0), fps=30.0, frames=200), 150)
    assert [(s.first, s.end, s.source_start, s.source_end) for s in spans] == [(0, 38, 0, 45), (38, 100, 45, 120),
                                                                               (100, 150, 120, None)]


# -- requests ------------------------------------------------------------------------------------


def test_scene_seg_needs_a_video(tmp_path: Path) -> None:
    image, speech = tmp_path / "p.png", tmp_path / "s.wav"
    Image.fromarray(sample_portrait((64, 64))).save(image)
    sf.write(speech, sample_speech(0.5, 16_000), 16_000)
    with pytest.raises(InputError, match="scene_seg: splits a video into shots"):
        GenerationRequest.parse({"cond_image": str(image), "cond_audio": {"person1": str(speech)}, "scene_seg": True})


def test_cli_has_scene_seg(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from talkgen.cli import app

    image, speech = tmp_path / "p.png", tmp_path / "s.wav"
    Image.fromarray(sample_portrait((64, 64))).save(image)
    sf.write(speech, sample_speech(0.5, 16_000), 16_000)
    result = CliRunner().invoke(app, ["generate", "-w", str(tmp_path / "none"), "--model", "infinitetalk",
                                      "--image", str(image), "--audio", str(speech), "--scene-seg"])
    assert result.exit_code != 0
    assert "scene_seg" in result.output and "Traceback" not in result.output


# -- the tiny model end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def infinitetalk(tmp_path_factory):
    from talkgen.pipeline.pipeline import Pipeline
    from talkgen.pipeline.tiny import ensure_tiny_weights

    pipe = Pipeline.from_pretrained(ensure_tiny_weights(tmp_path_factory.mktemp("tiny")), "infinitetalk", device="cpu")
    pipe.bucket_divisor = 8  # small frames: the shot loop is what is tested, not the pixels
    return pipe


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    sf.write(path, sample_speech(5.4, 22_050), 22_050)  # 135 frames: longer than the 120-frame source
    return path


def dub(pipe, source: Path, speech: Path, output: Path | None = None, resume=None, **values):
    values = {"cond_video": str(source), "cond_audio": {"person1": str(speech)}, "scene_seg": True,
              "mode": "streaming", "frame_num": 33, "motion_frame": 9, "sample_steps": 1, "text_guide_scale": 1.0,
              **values}
    shown, chunks, shots = [], [], []
    original = pipe.encode_image

    def encode_image(frame, chunk=0):
        shown.append(shot_of(frame))
        return original(frame, chunk)

    def progress(event):
        if event.stage == "shot":
            shots.append((event.step, event.total))

    pipe.encode_image = encode_image
    try:
        result = pipe.generate(GenerationRequest.parse(values), output=output, progress=progress, resume=resume,
                               on_chunk=chunks.append)
    finally:
        pipe.encode_image = original
    return result, shown, chunks, shots


def test_each_shot_is_dubbed_from_its_own_frames(infinitetalk, shots_video: Path, speech: Path, tmp_path: Path) -> None:
    from test_features_e2e import assert_in_sync

    out = tmp_path / "scenes.mp4"
    result, shown, chunks, shots = dub(infinitetalk, shots_video, speech, out)
    assert result.num_frames == 135  # the speech's length (5.4 s x 25), not the source's 120 frames
    assert_in_sync(out, 135)
    # shots [0, 30) [30, 55) [55, 90) [90, 135): 1, 1, 2 and 2 chunks of 33 frames with 9 of context
    assert [(c.index, c.first_frame, len(c.frames), c.total_frames) for c in chunks] == [
        (0, 0, 30, 135), (1, 30, 25, 135), (2, 55, 33, 135), (3, 88, 2, 135), (4, 90, 33, 135), (5, 123, 12, 135)]
    # every chunk's reference frame (what the image encoder and the VAE condition see) is from
    # its own shot; the last shot runs past the source's end on its last frame
    assert shown == [0, 1, 2, 2, 3, 3]
    assert shots == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert any(note.startswith("scene_seg: 4 shots") for note in result.notes)


def test_clip_mode_makes_one_chunk_per_shot(infinitetalk, shots_video: Path, speech: Path) -> None:
    result, shown, chunks, _ = dub(infinitetalk, shots_video, speech, mode="clip", frame_num=81)
    assert result.num_frames == 81  # clip mode: the first 81 frames, cut where the source is cut
    assert [(c.index, c.first_frame, len(c.frames)) for c in chunks] == [(0, 0, 30), (1, 30, 25), (2, 55, 26)]
    assert shown == [0, 1, 2]
    assert any(note.startswith("scene_seg: 3 shots") and "1 later shot of the source" in note
               for note in result.notes), result.notes


def test_a_stream_resumes_across_shots(infinitetalk, shots_video: Path, speech: Path) -> None:
    whole, _, chunks, _ = dub(infinitetalk, shots_video, speech, max_frames=110)
    assert [c.index for c in chunks] == [0, 1, 2, 3, 4]  # shots [0, 30) [30, 55) [55, 90) [90, 110)
    # after chunk 2 (inside shot 3) and after chunk 1 (the end of shot 2): the rest as in one run
    for after in (2, 1):
        _, shown, rest, _ = dub(infinitetalk, shots_video, speech, max_frames=110, resume=chunks[after].state)
        assert [c.index for c in rest] == [c.index for c in chunks[after + 1 :]]
        for again, first in zip(rest, chunks[after + 1 :]):
            assert again.first_frame == first.first_frame and np.array_equal(again.frames, first.frames)
    assert shown == [2, 2, 3]  # resumed after chunk 1: shot 3 from its start, then shot 4


def test_scene_seg_with_an_image_file_as_the_video(infinitetalk, speech: Path, tmp_path: Path) -> None:
    image = tmp_path / "still.png"
    Image.fromarray(sample_portrait((64, 64))).save(image)
    request = GenerationRequest.parse({"cond_video": str(image), "cond_audio": {"person1": str(speech)}, "scene_seg": True})
    with pytest.raises(InputError, match="is an image: scene_seg"):
        infinitetalk.generate(request)


# -- a real video --------------------------------------------------------------------------------


@pytest.mark.skipif(not (EXAMPLES / "dubbing.json").is_file(), reason=f"no example inputs in {EXAMPLES}")
def test_real_dubbing_example_detection() -> None:
    request = GenerationRequest.from_reference_json(EXAMPLES / "dubbing.json", scene_seg=True, mode="streaming")
    shots = detect_shots(request.cond_video)
    assert (shots.fps, shots.frames_read, shots.complete) == (25.0, 375, True)  # 15 s at 25 fps
    assert shots.cuts == ()  # one continuous take of a talking man: no false cut
    spans = plan_shots(shots, 267)  # the example's 10.7 s speech
    assert spans == [ShotSpan(0, 267, 0, None)]
