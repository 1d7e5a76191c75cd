"""Condition image: loading, buckets, resize + crop (golden-exact) and person masks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import REPO_ROOT, golden_params, meta_json, read_golden
from talkgen.errors import InputError
from talkgen.media import image as image_mod
from talkgen.media.image import (
    BUCKETS_480,
    BUCKETS_720,
    center_crop_offset,
    choose_bucket,
    cover_size,
    load_image,
    person_masks,
    prepare_condition_image,
    resize_and_center_crop,
    to_signed_unit,
)
from talkgen.media.samples import sample_portrait

EXAMPLES = REPO_ROOT.parent / "shared" / "examples"
EXAMPLE_BBOX = {"person1": [160, 120, 1280, 1080], "person2": [160, 1320, 1280, 2280]}  # multi_add_bbox.json


# ---------------------------------------------------------------------------------- golden


@pytest.mark.parametrize("path", golden_params("pipeline_"))
def test_condition_frame_matches_golden(path: Path) -> None:
    tensors, meta = read_golden(path)
    for case, options in meta_json(meta, "cases").items():
        source = tensors[f"{case}.inputs.image_rgb"].numpy()
        expected = tensors[f"{case}.debug.condition_frame_rgb"].permute(1, 2, 0).numpy()
        out = prepare_condition_image(source, options["bucket_family"])
        assert out.shape == expected.shape, case
        assert np.array_equal(out, expected), case


@pytest.mark.parametrize("path", golden_params("stream_"))
def test_first_image_encoder_frame_matches_golden(path: Path) -> None:
    """Chunk 0 shows the image encoder the prepared condition frame (or the video's frame 0)."""
    tensors, meta = read_golden(path)
    for case, options in meta_json(meta, "cases").items():
        key = f"{case}.inputs.image_rgb"
        source = tensors[key] if key in tensors else tensors[f"{case}.inputs.video_rgb"][0]
        expected = tensors[f"{case}.debug.image_encoder_frame.chunk0"].permute(1, 2, 0).numpy()
        out = prepare_condition_image(source.numpy(), options["bucket_family"])
        assert np.array_equal(out, expected), case


# ---------------------------------------------------------------------------------- buckets


@pytest.mark.parametrize(
    ("height", "width", "tier", "expected"),
    [
        (1080, 1920, 480, (448, 896)),  # 16:9 landscape
        (1440, 2560, 480, (448, 896)),
        (512, 512, 480, (640, 640)),  # square
        (512, 512, 720, (960, 960)),
        (1920, 1080, 480, (832, 448)),  # 9:16 portrait -> key 1.86
        (180, 240, "infinitetalk-480", (576, 704)),  # 0.75 is nearer 0.82 than 0.67
        (1318, 2366, "multitalk-480", (448, 896)),
    ],
)
def test_choose_bucket(height: int, width: int, tier: int | str, expected: tuple[int, int]) -> None:
    assert choose_bucket(height, width, tier) == expected


@pytest.mark.parametrize("table", [BUCKETS_480, BUCKETS_720], ids=["480", "720"])
def test_choose_bucket_matches_reference_rule_on_a_sweep(table) -> None:
    """The reference: ``sorted(keys, key=|float(key) - ratio|)[0]`` over string keys (stable sort)."""
    keys = [f"{ratio:.2f}" for ratio, _ in table]
    sizes = dict(zip(keys, (size for _, size in table)))
    tier = 480 if table is BUCKETS_480 else 720
    midpoints = [(a + b) / 2 for (a, _), (b, _) in zip(table, table[1:])]
    for ratio in [*np.linspace(0.1, 4.5, 997), *midpoints]:
        height, width = ratio * 10_000, 10_000
        expected = sizes[sorted(keys, key=lambda k: abs(float(k) - height / width))[0]]
        assert choose_bucket(height, width, tier) == expected


def test_bucket_tables_are_well_formed() -> None:
    for table in (BUCKETS_480, BUCKETS_720):
        ratios = [r for r, _ in table]
        assert ratios == sorted(ratios)
        assert all(h % 64 == 0 and w % 64 == 0 for _, (h, w) in table)


def test_unknown_tier_is_an_input_error() -> None:
    with pytest.raises(InputError, match="480 or 720"):
        choose_bucket(100, 100, 1080)


# ---------------------------------------------------------------------------------- resize + crop


def test_center_crop_offset_rounds_half_to_even() -> None:
    # torchvision uses Python's round(): 1.5 -> 2, 2.5 -> 2, 0.5 -> 0
    assert [center_crop_offset(s, 2) for s in (2, 3, 4, 5, 6, 7)] == [0, 0, 1, 2, 2, 2]


def test_resize_and_center_crop_is_pil_bilinear_then_crop() -> None:
    source = sample_portrait((300, 530))  # ratio 0.566 -> 448x896, cover 507x896: 59 surplus rows
    target = choose_bucket(300, 530)
    final_h, final_w = cover_size(300, 530, target)
    assert (final_h, final_w) == (math.ceil(896 / 530 * 300), 896)
    resized = np.asarray(Image.fromarray(source).resize((final_w, final_h), Image.BILINEAR))
    top = int(round((final_h - target[0]) / 2.0))
    out = resize_and_center_crop(source, target)
    assert out.shape == (*target, 3) and out.dtype == np.uint8
    assert np.array_equal(out, resized[top : top + target[0], : target[1]])
    # tensors and PIL images give the same pixels
    assert np.array_equal(resize_and_center_crop(torch.from_numpy(source), target), out)
    assert np.array_equal(resize_and_center_crop(Image.fromarray(source), target), out)


def test_to_signed_unit_uses_the_reference_arithmetic() -> None:
    frame = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    out = to_signed_unit(frame)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    reference = (torch.from_numpy(frame).permute(2, 0, 1) / 255 - 0.5) * 2
    assert torch.equal(out, reference)
    assert out.min() == -1 and out.max() == 1


# ---------------------------------------------------------------------------------- masks


def _reference_style_masks(src_h, src_w, target, people, bbox=None) -> torch.Tensor:
    """Full-resolution masks, resized and cropped step by step as the reference does."""
    if people == 1:
        masks = [torch.ones(src_h, src_w)] * 3
    else:
        boxes = list(bbox.values()) if bbox else image_mod.auto_person_boxes(src_h, src_w)
        masks = []
        for top, left, bottom, right in boxes:
            mask = torch.zeros(src_h, src_w)
            mask[int(top) : int(bottom), int(left) : int(right)] = 1
            masks.append(mask)
        masks.append(((masks[0] + masks[1]) == 0).float())
    x = torch.stack(masks)[None]
    final_h, final_w = cover_size(src_h, src_w, target)
    x = F.interpolate(x, size=(final_h, final_w), mode="nearest")
    top, left = int(round((final_h - target[0]) / 2.0)), int(round((final_w - target[1]) / 2.0))
    x = x[:, :, top : top + target[0], left : left + target[1]]
    x = F.interpolate(x, size=(target[0] // 8, target[1] // 8), mode="nearest")[0]
    return (x > 0).float()


@pytest.mark.parametrize(
    ("src_h", "src_w", "bbox"),
    [(1440, 2560, None), (1440, 2560, EXAMPLE_BBOX), (512, 1024, None), (1318, 2366, None), (777, 333, None),
     (1001, 999, {"person1": [10.7, 3, 990, 480.2], "person2": [0, 500, 1001, 999]})],
)
@pytest.mark.parametrize("tier", [480, 720])
def test_person_masks_match_full_resolution_resizing(src_h, src_w, bbox, tier) -> None:
    target = choose_bucket(src_h, src_w, tier)
    out = person_masks(src_h, src_w, target, 2, bbox)
    assert out.shape == (3, target[0] // 8, target[1] // 8) and out.dtype == torch.float32
    assert torch.equal(out, _reference_style_masks(src_h, src_w, target, 2, bbox))


def test_one_person_masks_are_all_ones() -> None:
    out = person_masks(512, 512, (640, 640), 1, bbox=EXAMPLE_BBOX)  # bbox ignored, as upstream
    assert torch.equal(out, torch.ones(3, 80, 80))


def test_automatic_halves() -> None:
    # 2560x1440 -> 448x896: cover 504x896, 28 rows cropped top and bottom; latent 56x112.
    p1, p2, bg = person_masks(1440, 2560, (448, 896), 2)
    assert p1[:, :56].any() and not p1[:, 56:].any()  # person 1: left half only
    assert p2[:, 56:].any() and not p2[:, :56].any()  # person 2: right half only
    assert torch.equal(bg, 1 - torch.maximum(p1, p2))
    # 5 % margins: rows 72..1368 of 1440 land at 25..479 of the 504 cover rows, inside the 28
    # rows cropped off each side, so every latent row is covered; the column margins stay.
    assert p1.any(dim=1).all() and p2.any(dim=1).all()
    cols1, cols2 = p1.any(dim=0).nonzero().flatten(), p2.any(dim=0).nonzero().flatten()
    assert cols1.min() > 0 and cols1.max() < 55 and cols2.min() > 56 and cols2.max() < 111


def test_example_bbox_regions() -> None:
    """multi_add_bbox.json on its 2560x1440 image: [top, left, bottom, right] in source pixels."""
    example = EXAMPLES / "multi_add_bbox.json"
    bbox = json.loads(example.read_text())["bbox"] if example.is_file() else EXAMPLE_BBOX
    p1, p2, bg = person_masks(1440, 2560, (448, 896), 2, bbox)
    # source -> latent: x * 0.35 (cover scale) - 28 (crop) for rows, then / 8
    to_lat_row = lambda y: (y * 0.35 - 28) / 8  # noqa: E731
    to_lat_col = lambda x: x * 0.35 / 8  # noqa: E731
    for mask, (top, left, bottom, right) in ((p1, bbox["person1"]), (p2, bbox["person2"])):
        rows = mask.any(dim=1).nonzero().flatten()
        cols = mask.any(dim=0).nonzero().flatten()
        assert abs(rows.min() - to_lat_row(top)) <= 1 and abs(rows.max() + 1 - to_lat_row(bottom)) <= 1
        assert abs(cols.min() - to_lat_col(left)) <= 1 and abs(cols.max() + 1 - to_lat_col(right)) <= 1
        assert mask.sum() == len(rows) * len(cols)  # a filled rectangle
    assert not (p1 * p2).any()
    assert torch.equal(bg, 1 - torch.maximum(p1, p2))
    assert bg[0].all() and bg[:, 0].all()  # the border is background


@pytest.mark.parametrize(
    ("bbox", "field"),
    [
        ({"person1": [160, 120, 1280, 1080]}, "keys 'person1' and 'person2'"),
        ({"person1": [160, 120, 1280, 1080], "person3": [0, 0, 10, 10]}, "keys 'person1' and 'person2'"),
        ([[160, 120, 1280, 1080], [160, 1320, 1280, 2280]], "keys 'person1' and 'person2'"),
        ({"person1": [160, 120, 1280], "person2": [160, 1320, 1280, 2280]}, "bbox.person1"),
        ({"person1": [160, 120, 1280, 1080], "person2": "160,1320,1280,2280"}, "bbox.person2"),
        ({"person1": [160, 120, 1280, True], "person2": [160, 1320, 1280, 2280]}, "bbox.person1"),
        ({"person1": [160, 120, 1280, float("nan")], "person2": [160, 1320, 1280, 2280]}, "bbox.person1"),
        ({"person1": [160, 120, 1280, 1080], "person2": [160, 1320, 1600, 2280]}, "bbox.person2"),  # below
        ({"person1": [-1, 120, 1280, 1080], "person2": [160, 1320, 1280, 2280]}, "bbox.person1"),
        ({"person1": [160, 1080, 1280, 120], "person2": [160, 1320, 1280, 2280]}, "bbox.person1"),  # empty
        ({"person1": [160, 120, 160.9, 1080], "person2": [160, 1320, 1280, 2280]}, "bbox.person1"),  # empty
        ({"person1": [0, 120, 20, 1080], "person2": [160, 1320, 1280, 2280]}, "bbox.person1"),  # cropped away
    ],
)
def test_bad_bbox_is_an_input_error(bbox, field: str) -> None:
    with pytest.raises(InputError, match=field.replace("[", r"\[")):
        person_masks(1440, 2560, (448, 896), 2, bbox)


def test_unsupported_people_count() -> None:
    with pytest.raises(InputError, match="people = 3"):
        person_masks(512, 512, (640, 640), 3)


# ---------------------------------------------------------------------------------- loading


def test_load_example_image() -> None:
    path = EXAMPLES / "multi" / "multi1.jpg"
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    image = load_image(path)
    assert image.shape == (1440, 2560, 3) and image.dtype == np.uint8


def test_load_image_converts_modes_like_pil(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (40, 30), (10, 20, 30, 0))
    rgba.save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png")[0, 0].tolist() == [10, 20, 30]  # alpha dropped, not composited
    Image.new("L", (40, 30), 77).save(tmp_path / "g.png")
    assert load_image(tmp_path / "g.png")[0, 0].tolist() == [77, 77, 77]
    Image.new("P", (40, 30), 3).save(tmp_path / "p.gif")
    assert load_image(tmp_path / "p.gif").shape == (30, 40, 3)


def test_load_image_ignores_exif_orientation(tmp_path: Path) -> None:
    """The reference does not apply EXIF rotation, so neither do we (the model saw the raw pixels)."""
    image = Image.fromarray(sample_portrait((40, 60)))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW"
    image.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "r.jpg").shape == (40, 60, 3)


def test_load_image_errors(tmp_path: Path) -> None:
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(InputError, match=r"text\.jpg cannot be decoded"):
        load_image(tmp_path / "text.jpg")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(InputError, match=r"dot\.png is only 1x1 pixels"):
        load_image(tmp_path / "dot.png")
    with pytest.raises(InputError, match=r"missing\.png does not exist"):
        load_image(tmp_path / "missing.png")
    data = (EXAMPLES / "multi" / "multi1.jpg").read_bytes() if EXAMPLES.is_dir() else b""
    if data:
        (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
        with pytest.raises(InputError, match=r"cut\.jpg cannot be decoded"):
            load_image(tmp_path / "cut.jpg")


def test_load_image_refuses_decompression_bombs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (200, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(image_mod, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(InputError, match=r"big\.png is too large \(200x100 pixels\)"):
        load_image(tmp_path / "big.png")


# ---------------------------------------------------------------------------------- sample portrait


def test_sample_portrait_is_deterministic_and_usable() -> None:
    portrait = sample_portrait()
    assert portrait.shape == (512, 512, 3) and portrait.dtype == np.uint8
    assert np.array_equal(portrait, sample_portrait())
    assert portrait.std() > 20  # a picture, not a flat colour
    assert sample_portrait((448, 896)).shape == (448, 896, 3)
    assert prepare_condition_image(portrait).shape == (640, 640, 3)
