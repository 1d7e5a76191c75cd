"""End to end through the CLI with the tiny model: a real mp4, and bad input as one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from typer.testing import CliRunner

from talkgen.cli import app
from talkgen.media.samples import sample_portrait, sample_speech

runner = CliRunner()


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    from talkgen.pipeline.tiny import ensure_tiny_weights

    return ensure_tiny_weights(tmp_path_factory.mktemp("tiny-weights"))


@pytest.fixture()
def inputs(tmp_path: Path) -> dict[str, Path]:
    portrait, speech = tmp_path / "portrait.png", tmp_path / "speech.wav"
    Image.fromarray(sample_portrait((300, 400))).save(portrait)
    sf.write(speech, sample_speech(1.3, 22_050), 22_050)
    return {"image": portrait, "audio": speech}


def run(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result, result.output


@pytest.mark.slow
def test_demo_writes_h264_aac_mp4_matching_the_speech(tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo.mp4"
    result, output = run("demo", "--output", out, "--seconds", 2.0, "--steps", 2, "--weights-dir", tiny_weights)
    assert result.exit_code == 0, output
    with av.open(str(out)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert video.codec_context.name == "h264" and audio.codec_context.name == "aac"
        assert video.average_rate == 25
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == 50  # 2.0 s of speech at 25 fps
    with av.open(str(out)) as container:
        duration = container.duration / av.time_base
    assert abs(duration - 2.0) < 0.05


@pytest.mark.slow
def test_generate_from_flags_and_from_reference_json(tiny_weights: Path, inputs: dict, tmp_path: Path) -> None:
    out = tmp_path / "flags.mp4"
    result, output = run("generate", "--weights", tiny_weights, "--model", "tiny", "--image", inputs["image"],
                         "--audio", inputs["audio"], "--steps", 1, "--output", out)
    assert result.exit_code == 0, output
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == int(1.3 * 25)
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"prompt": "two people", "cond_image": inputs["image"].name, "audio_type": "add",
                                   "cond_audio": {"person1": inputs["audio"].name, "person2": inputs["audio"].name}}))
    out2 = tmp_path / "json.mp4"
    result, output = run("generate", "--weights", tiny_weights, "--model", "tiny", "--input-json", request,
                         "--steps", 1, "--output", out2)
    assert result.exit_code == 0, output
    with av.open(str(out2)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 2 * int(1.3 * 25) + 1  # 'add': one after the other


def assert_one_sentence_error(result, output: str, *needles: str) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in output
    assert "error:" in output
    flat = " ".join(output.split())
    for needle in needles:
        assert needle in flat, flat


def test_unreadable_audio(tiny_weights: Path, inputs: dict, tmp_path: Path) -> None:
    bogus = tmp_path / "speech.wav"
    bogus.write_text("this is not audio")
    result, output = run("generate", "--weights", tiny_weights, "--model", "tiny", "--image", inputs["image"],
                         "--audio", bogus, "--output", tmp_path / "x.mp4")
    assert_one_sentence_error(result, output, "speech.wav")


def test_zero_length_audio(tiny_weights: Path, inputs: dict, tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16_000)
    result, output = run("generate", "--weights", tiny_weights, "--model", "tiny", "--image", inputs["image"],
                         "--audio", empty, "--output", tmp_path / "x.mp4")
    assert_one_sentence_error(result, output, "empty.wav")


def test_non_image_file(tiny_weights: Path, inputs: dict, tmp_path: Path) -> None:
    fake = tmp_path / "portrait.jpg"
    fake.write_text("not an image")
    result, output = run("generate", "--weights", tiny_weights, "--model", "tiny", "--image", fake,
                         "--audio", inputs["audio"], "--output", tmp_path / "x.mp4")
    assert_one_sentence_error(result, output, "portrait.jpg")


def test_missing_weights_name_the_file_and_the_command(inputs: dict, tmp_path: Path) -> None:
    result, output = run("generate", "--weights", tmp_path, "--image", inputs["image"], "--audio", inputs["audio"],
                         "--output", tmp_path / "x.mp4")
    assert_one_sentence_error(result, output, "talkgen download --model multitalk")


def test_missing_audio_adapter_file(tiny_weights: Path, inputs: dict, tmp_path: Path) -> None:
    import shutil

    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights)
    (weights / "InfiniteTalk" / "multi" / "infinitetalk.safetensors").unlink()
    result, output = run("generate", "--weights", weights, "--model", "infinitetalk", "--people", "multi",
                         "--image", inputs["image"], "--audio", inputs["audio"], "--output", tmp_path / "x.mp4")
    assert_one_sentence_error(result, output, "infinitetalk.safetensors", "--people multi")


def test_info_lists_weights(tiny_weights: Path) -> None:
    result, output = run("info", "--weights", tiny_weights)
    assert result.exit_code == 0, output
    assert "tiny built-in model (random weights): complete" in output and "torch" in output
