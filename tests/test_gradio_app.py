"""The optional Gradio front end: `talkgen gradio` says how to install the extra when it is
missing; with gradio importable, the UI builds and its handler makes an mp4 on the tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from typer.testing import CliRunner

from talkgen.cli import app

runner = CliRunner()


def test_gradio_command_without_the_extra_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    result = runner.invoke(app, ["gradio", "--model", "tiny"])
    assert result.exit_code == 1
    assert "pip install 'talkgen[gradio]'" in " ".join(result.output.split())


# -- with gradio ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gr():
    return pytest.importorskip("gradio", reason="gradio is not installed (optional extra: pip install 'talkgen[gradio]'; "
                                                "it pins pillow<13, so the main test environment may leave it out)")


@pytest.fixture(scope="module")
def generator(gr, tmp_path_factory):
    from talkgen.service.gradio_app import GradioGenerator
    from talkgen.service.settings import Settings

    folder = tmp_path_factory.mktemp("gradio")
    settings = Settings(model="tiny", weights=folder / "tiny", device="cpu", data_dir=folder / "data")
    return GradioGenerator(settings, output_dir=folder / "out")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from talkgen.media.samples import sample_portrait, sample_speech

    folder = tmp_path_factory.mktemp("gradio-inputs")
    portrait, speech = folder / "portrait.png", folder / "speech.wav"
    Image.fromarray(sample_portrait((256, 256))).save(portrait)
    sf.write(speech, np.asarray(sample_speech(0.6), dtype=np.float32), 16_000)
    return {"image": portrait, "audio": speech}


def frame_count(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_blocks_has_the_form(gr, generator) -> None:
    from talkgen.service.gradio_app import build_app

    demo = build_app(generator)
    assert isinstance(demo, gr.Blocks)
    labels = {getattr(block, "label", None) for block in demo.blocks.values()}
    for label in ("Portrait", "Video (dubbing)", "Speech", "Speech of the second speaker", "Prompt", "Preset", "Mode",
                  "Talking video"):
        assert label in labels, label
    assert generator.pipeline is None  # building the UI loads nothing


def test_handler_makes_the_video(generator, inputs) -> None:
    reports = []
    path, info = generator.run(str(inputs["image"]), None, str(inputs["audio"]), prompt="A person is talking.",
                               preset="fast", mode="clip", seed=3, sample_steps=1, frame_num=5,
                               report=lambda fraction, label: reports.append((fraction, label)))
    assert Path(path).is_file() and frame_count(Path(path)) == 5
    assert info.startswith("5 frames") and "seed 3" in info
    assert any(label.startswith("sampling 1/1") for _, label in reports)
    assert all(0 <= fraction <= 1 for fraction, _ in reports)


def test_handler_rejects_bad_forms(generator, inputs) -> None:
    from talkgen.errors import InputError

    with pytest.raises(InputError, match="portrait or a video"):
        generator.run(None, None, str(inputs["audio"]))
    with pytest.raises(InputError, match="speech"):
        generator.run(str(inputs["image"]), None, None)


def test_the_ui_runs_through_gradio(gr, generator, inputs) -> None:
    """The click handler as Gradio calls it (through the Blocks' own function runner)."""
    from talkgen.service.gradio_app import build_app

    demo = build_app(generator)
    fn = next(dep for dep in demo.fns.values() if dep.api_name == "generate").fn
    path, info = fn(str(inputs["image"]), None, str(inputs["audio"]), None, "A person is talking.", "fast", "clip",
                    "add", 5, 1, 5)
    assert frame_count(Path(path)) == 5 and info.startswith("5 frames")
    with pytest.raises(gr.Error):
        fn(None, None, str(inputs["audio"]), None, "", "fast", "clip", "add", 5, 1, 5)
