"""deploy/modal_app.py, offline: the Modal app definition imports without an account, and the GPU
class's code runs here through ``.local()`` (``@modal.enter`` then the method) on the tiny model."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

modal = pytest.importorskip("modal", reason="modal is not installed: pip install 'talkgen[deploy]'")

REPO = Path(__file__).resolve().parents[1]
FAST = {"sample_steps": 1, "frame_num": 5, "prompt": "A person is talking."}


@pytest.fixture(scope="module")
def modal_app():
    spec = importlib.util.spec_from_file_location("talkgen_modal_app", REPO / "deploy" / "modal_app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from talkgen.media.samples import sample_portrait, sample_speech

    folder = tmp_path_factory.mktemp("modal-inputs")
    portrait, speech = folder / "portrait.png", folder / "speech.wav"
    Image.fromarray(sample_portrait((256, 256))).save(portrait)
    sf.write(speech, np.asarray(sample_speech(0.6), dtype=np.float32), 16_000)
    return {"image": portrait, "audio": speech}


@pytest.fixture(scope="module")
def generator(modal_app, tmp_path_factory):
    """One Generator object: its @modal.enter runs once, on the first .local() call (model resident)."""
    import os

    folder = tmp_path_factory.mktemp("modal-run")
    env = {"TALKGEN_MODEL": "tiny", "TALKGEN_WEIGHTS": str(folder / "tiny"), "TALKGEN_STORAGE": str(folder / "storage"),
           "TALKGEN_DATA_DIR": str(folder / "data"), "TALKGEN_DEVICE": "cpu"}
    saved = {k: v for k, v in os.environ.items() if k.startswith("TALKGEN_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(env)
    try:
        yield modal_app.Generator(), folder
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.update(saved)


def frame_count(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def call(generator, request: dict) -> dict:
    with warnings.catch_warnings():  # "executing locally and will not have access to the mounted Volume"
        warnings.simplefilter("ignore")
        return generator.generate.local(request)


def test_app_definition(modal_app):
    assert isinstance(modal_app.Generator, modal.Cls) and isinstance(modal_app.download_weights, modal.Function)
    spec = modal_app.Generator._get_class_service_function()._spec_  # what `modal deploy` would send
    assert spec.gpus  # a GPU class
    assert modal_app.WEIGHTS_DIR in spec.volumes  # the weights volume
    assert spec.secrets  # S3 credentials


def test_generate_local_paths_then_bytes(generator, inputs):
    obj, folder = generator
    result = call(obj, {"image": str(inputs["image"]), "audio": inputs["audio"].as_uri(), "params": FAST, "job_id": "j1"})
    assert result["status"] == "succeeded", result
    assert result["id"] == "j1" and result["frames"] == 5 and result["fps"] == 25
    video = Path(result["uri"].removeprefix("file://"))
    assert video == (folder / "storage" / "jobs" / "j1" / "video.mp4").resolve()
    assert frame_count(video) == 5
    assert result["url"] is None  # presigned URLs only for S3 storage

    # bytes in, same resident model (enter ran once: the worker object is reused)
    worker = obj._cached_user_cls_instance().worker  # what @modal.enter loaded
    result = call(obj, {"image": inputs["image"].read_bytes(),
                        "audio": {"data": inputs["audio"].read_bytes(), "name": "speech.wav"},
                        "params": {**FAST, "frame_num": 9}})
    assert result["status"] == "succeeded", result
    assert result["frames"] == 9 and frame_count(Path(result["uri"].removeprefix("file://"))) == 9
    assert obj._cached_user_cls_instance().worker is worker  # not loaded again


def test_generate_rejects_bad_requests(generator, inputs):
    obj, _ = generator
    result = call(obj, {"audio": str(inputs["audio"]), "params": FAST})
    assert result["status"] == "failed" and "'image' (or 'video') and 'audio' are required" in result["error"]
    result = call(obj, {"image": "http://example.com/a.png", "audio": str(inputs["audio"])})
    assert result["status"] == "failed" and "s3://bucket/key" in result["error"]
    result = call(obj, {"image": str(inputs["image"]), "audio": str(inputs["audio"]), "params": {"sample_stepz": 1}})
    assert result["status"] == "failed" and "sample_stepz" in result["error"]
