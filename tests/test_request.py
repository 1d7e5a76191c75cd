"""The request schema: the reference's JSON as-is, defaults, and errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from talkgen.errors import InputError
from talkgen.pipeline.request import DEFAULT_NEGATIVE_PROMPT, GenerationRequest

EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "examples"


@pytest.mark.parametrize("name", ["single.json", "multi_add_bbox.json", "multi_para_auto.json"])
def test_reference_examples_parse_with_paths_resolved(name: str) -> None:
    if not (EXAMPLES / name).is_file():
        pytest.skip(f"{EXAMPLES / name} is not here")
    request = GenerationRequest.from_reference_json(EXAMPLES / name)
    raw = json.loads((EXAMPLES / name).read_text())
    assert request.prompt == raw["prompt"]
    assert request.cond_image.is_file()
    assert all(p.is_file() for p in request.cond_audio.values())
    assert request.people == len(raw["cond_audio"])
    assert request.audio_type == raw.get("audio_type")
    if "bbox" in raw:
        assert request.bbox == raw["bbox"]


def test_reference_defaults() -> None:
    request = GenerationRequest.parse({"cond_image": "a.png", "cond_audio": {"person1": "a.wav"}})
    assert (request.frame_num, request.sample_steps, request.shift, request.seed) == (81, 40, 7.0, 42)
    assert (request.text_guide_scale, request.audio_guide_scale) == (5.0, 4.0)
    assert GenerationRequest.parse({"cond_image": "a", "cond_audio": {"person1": "a"}, "size": 720}).shift == 11.0
    assert "walking backwards" in DEFAULT_NEGATIVE_PROMPT


@pytest.mark.parametrize("frames, expected", [(81, 81), (80, 81), (82, 85), (5, 5), (6, 9)])
def test_frame_count_is_rounded_to_4n_plus_1(frames: int, expected: int) -> None:
    request = GenerationRequest.parse({"cond_image": "a", "cond_audio": {"person1": "a"}, "frame_num": frames})
    assert request.frame_num == expected


@pytest.mark.parametrize(
    "values, field",
    [
        ({"cond_image": "a", "cond_audio": {}}, "cond_audio"),
        ({"cond_image": "a", "cond_audio": {"person1": "a", "person2": "b"}}, "audio_type"),
        ({"cond_image": "a", "cond_audio": {"person3": "a"}}, "cond_audio"),
        ({"cond_audio": {"person1": "a"}}, "cond_image"),
        ({"cond_image": "a", "cond_audio": {"person1": "a"}, "sample_steps": -3}, "sample_steps"),
        ({"cond_image": "a", "cond_audio": {"person1": "a"}, "sample_stepz": 3}, "sample_stepz"),
        ({"cond_image": "a", "cond_audio": {"person1": "a"}, "audio_type": "mix"}, "audio_type"),
        ({"cond_image": "a", "cond_audio": {"person1": "a"}, "size": 1080}, "size"),
    ],
)
def test_bad_requests_name_the_field(values: dict, field: str) -> None:
    with pytest.raises(InputError, match=field):
        GenerationRequest.parse(values)


def test_bad_json_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        GenerationRequest.from_reference_json(bad)
    with pytest.raises(InputError, match="does not exist"):
        GenerationRequest.from_reference_json(tmp_path / "missing.json")
