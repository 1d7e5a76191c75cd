"""The condition image: loading, resolution buckets, resize + centre crop, and person masks.

Everything here reproduces the reference (MeiGen MultiTalk / InfiniteTalk) bit for bit, because
the DiT was trained on frames and masks made this way:

* the image is opened with PIL and ``.convert("RGB")`` (no EXIF rotation, alpha dropped, not
  composited);
* the bucket is the one whose h/w ratio key is nearest to the source's h/w;
* the image is scaled by ``max(th/h, tw/w)`` with ``ceil`` rounding (so it covers the bucket),
  resized with PIL BILINEAR, then centre-cropped with torchvision's offset rule
  ``int(round((size - crop) / 2))`` (Python's round: halves go to the even integer);
* the person masks are drawn at source resolution, resized the same way but with *nearest*
  interpolation, centre-cropped, nearest-resized to the latent grid (H/8, W/8) and binarised.
  That latent-resolution ``[3, H/8, W/8]`` tensor is what the DiT receives as
  ``ref_target_masks``; the DiT itself reduces it to its token grid.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from talkgen.errors import InputError

# PIL raises DecompressionBombError above twice its warning limit; we refuse at the same size
# (about 179 megapixels), with our own message, and stay quiet between the two limits.
MAX_IMAGE_PIXELS = 2 * 89_478_485
# Smaller than this cannot hold a face; the reference would silently upscale it.
MIN_IMAGE_SIDE = 16

# VAE spatial stride: the latent grid the DiT works on is (H/8, W/8).
VAE_STRIDE = 8

# Bucket tables, ratio key (h / w, as the reference writes it) -> (H, W), in the reference's order
# (ascending keys), which is also its tie-break order.
BUCKETS_480: tuple[tuple[float, tuple[int, int]], ...] = (  # the reference's ASPECT_RATIO_627
    (0.26, (320, 1216)), (0.38, (384, 1024)), (0.50, (448, 896)), (0.67, (512, 768)),
    (0.82, (576, 704)), (1.00, (640, 640)), (1.22, (704, 576)), (1.50, (768, 512)),
    (1.86, (832, 448)), (2.00, (896, 448)), (2.50, (960, 384)), (2.83, (1088, 384)),
    (3.60, (1152, 320)), (3.80, (1216, 320)), (4.00, (1280, 320)),
)  # fmt: skip
BUCKETS_720: tuple[tuple[float, tuple[int, int]], ...] = (  # the reference's ASPECT_RATIO_960
    (0.22, (448, 2048)), (0.29, (512, 1792)), (0.36, (576, 1600)), (0.45, (640, 1408)),
    (0.55, (704, 1280)), (0.63, (768, 1216)), (0.76, (832, 1088)), (0.88, (896, 1024)),
    (1.00, (960, 960)), (1.14, (1024, 896)), (1.31, (1088, 832)), (1.50, (1152, 768)),
    (1.58, (1216, 768)), (1.82, (1280, 704)), (1.91, (1344, 704)), (2.20, (1408, 640)),
    (2.30, (1472, 640)), (2.67, (1536, 576)), (2.89, (1664, 576)), (3.62, (1856, 512)),
    (3.75, (1920, 512)),
)  # fmt: skip
BUCKET_TABLES: dict[int, tuple[tuple[float, tuple[int, int]], ...]] = {480: BUCKETS_480, 720: BUCKETS_720}

# Automatic two-person layout: each person gets its half of the width, minus this margin on
# every side (as a fraction of the half width, and of the full height).
FACE_SCALE = 0.05

ImageLike = np.ndarray | torch.Tensor | Image.Image


# --------------------------------------------------------------------------------------------
# Loading


def load_image(path: str | Path) -> np.ndarray:
    """Read any image PIL can open as uint8 RGB ``[H, W, 3]``, the way the reference does.

    Like the reference (``Image.open(p).convert("RGB")``) the EXIF orientation is *not* applied,
    alpha is dropped (not composited over a background) and palette, CMYK, greyscale and 16-bit
    images go through PIL's own conversion to RGB.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Image file {path} does not exist: check the path.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                _check_image_size(path, im.width, im.height)
                rgb = im.convert("RGB")  # decodes the pixels
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(_too_large_message(path)) from None
    except Exception as exc:  # PIL raises many kinds (UnidentifiedImageError, OSError, ValueError...)
        raise InputError(
            f"Image file {path} cannot be decoded ({type(exc).__name__}: {exc}): "
            "it is not an image or it is damaged; re-save it as PNG or JPEG."
        ) from None
    return np.asarray(rgb, dtype=np.uint8).copy()


def _check_image_size(path: Path, width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(_too_large_message(path, width, height))
    if min(width, height) < MIN_IMAGE_SIDE:
        raise InputError(
            f"Image file {path} is only {width}x{height} pixels: give an image at least "
            f"{MIN_IMAGE_SIDE} pixels on each side (a portrait of 512 pixels or more works best)."
        )


def _too_large_message(path: Path, width: int | None = None, height: int | None = None) -> str:
    size = f" ({width}x{height} pixels)" if width else ""
    return (
        f"Image file {path} is too large{size}: the limit is {MAX_IMAGE_PIXELS // 1_000_000} "
        "megapixels; downscale it (the model works at about 0.4 or 0.9 megapixels anyway)."
    )


# --------------------------------------------------------------------------------------------
# Buckets


def bucket_table(tier: int | str) -> tuple[tuple[float, tuple[int, int]], ...]:
    """The bucket table for a tier: 480 / 720, or a size name like ``multitalk-480``."""
    suffix = tier.rsplit("-", 1)[-1] if isinstance(tier, str) else None
    key = int(suffix) if suffix is not None and suffix.isdigit() else tier
    if key not in BUCKET_TABLES:
        raise InputError(f"Resolution tier {tier!r} is unknown: use 480 or 720 (e.g. 'multitalk-480').")
    return BUCKET_TABLES[key]


def choose_bucket(height: int, width: int, tier: int | str = 480) -> tuple[int, int]:
    """The (H, W) bucket whose h/w key is nearest to ``height / width``.

    Ties go to the smaller key, as the reference's stable sort over its ascending keys does.
    """
    ratio = height / width
    _, size = min(bucket_table(tier), key=lambda entry: abs(entry[0] - ratio))
    return size


# --------------------------------------------------------------------------------------------
# Resize + centre crop


def cover_size(src_h: int, src_w: int, target: tuple[int, int]) -> tuple[int, int]:
    """Size after scaling so the image covers ``target``: the reference's float ops, exactly."""
    target_h, target_w = target
    scale = max(target_h / src_h, target_w / src_w)
    return math.ceil(scale * src_h), math.ceil(scale * src_w)


def center_crop_offset(size: int, crop: int) -> int:
    """torchvision's centre-crop start, ``int(round(surplus / 2))``.

    Python's ``round`` sends halves to the even integer: a surplus of 3 starts at 2, of 5 at 2.
    """
    if crop > size:  # cannot happen after cover_size; torchvision would pad instead
        raise ValueError(f"crop {crop} larger than size {size}")
    return int(round((size - crop) / 2.0))


def resize_and_center_crop(image: ImageLike, target: tuple[int, int]) -> np.ndarray:
    """Scale an RGB image to cover ``target`` (PIL BILINEAR) and centre-crop it: uint8 ``[H, W, 3]``.

    ``image`` is a uint8 ``[h, w, 3]`` array or tensor, or a PIL image (converted to RGB).
    """
    pil = _to_pil_rgb(image)
    target_h, target_w = target
    final_h, final_w = cover_size(pil.height, pil.width, target)
    resized = np.asarray(pil.resize((final_w, final_h), resample=Image.BILINEAR))
    top, left = center_crop_offset(final_h, target_h), center_crop_offset(final_w, target_w)
    return np.ascontiguousarray(resized[top : top + target_h, left : left + target_w])


def prepare_condition_image(image: ImageLike, tier: int | str = 480) -> np.ndarray:
    """Bucket choice, resize and centre crop in one call: the reference's condition frame (uint8)."""
    pil = _to_pil_rgb(image)
    return resize_and_center_crop(pil, choose_bucket(pil.height, pil.width, tier))


def to_signed_unit(frame: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` -> float32 ``[..., 3, H, W]`` in [-1, 1], with the reference's ops
    (``x / 255``, then ``(x - 0.5) * 2``) so the values match to the last bit."""
    t = torch.from_numpy(np.array(frame, copy=True)) if not isinstance(frame, torch.Tensor) else frame
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {t.dtype}")
    t = t.movedim(-1, -3) / 255
    return (t - 0.5) * 2


def _to_pil_rgb(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    array = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise TypeError(f"expected a uint8 [H, W, 3] image, got {array.dtype} {list(array.shape)}")
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


# --------------------------------------------------------------------------------------------
# Person masks

BBox = tuple[int, int, int, int]  # top, left, bottom, right (source pixels; end-exclusive)


def person_masks(
    src_h: int,
    src_w: int,
    target: tuple[int, int],
    people: int,
    bbox: Mapping[str, Sequence[float]] | None = None,
    stride: int = VAE_STRIDE,
) -> torch.Tensor:
    """The reference's ``ref_target_masks``: float32 ``[3, H/stride, W/stride]`` of 0/1.

    Channels: person 1, person 2, background (1 where neither person is). One person: all three
    are all ones. Two people: the rectangles of ``bbox`` (``{"person1": [top, left, bottom,
    right], "person2": [...]}`` in source pixels, the order the reference really uses whatever
    its variable names say), else the automatic left/right halves with a 5 % margin. ``bbox`` is
    ignored for one person, as in the reference.

    The masks go through the same cover-resize and centre crop as the image, with nearest
    interpolation, then nearest to the latent grid. Nearest resizing is separable, so instead of
    resizing full-size masks we map every latent row and column back to its source row and
    column (with torch's own nearest rule) and test the rectangles there: identical values, no
    source-size allocation.
    """
    if people not in (1, 2):
        raise InputError(f"people = {people} is not supported: MultiTalk drives one or two people.")
    target_h, target_w = target
    lat_h, lat_w = target_h // stride, target_w // stride
    if people == 1:
        return torch.ones(3, lat_h, lat_w)

    boxes = validate_bbox(bbox, src_h, src_w) if bbox is not None else auto_person_boxes(src_h, src_w)
    final_h, final_w = cover_size(src_h, src_w, target)
    rows = _source_indices(src_h, final_h, target_h, lat_h)  # [lat_h] source row of each latent row
    cols = _source_indices(src_w, final_w, target_w, lat_w)
    masks = [_rect_mask(rows, cols, box) for box in boxes]
    background = ~(masks[0] | masks[1])
    out = torch.stack([masks[0], masks[1], background]).float()
    if bbox is not None:
        for name, mask in zip(("person1", "person2"), masks):
            if not mask.any():
                raise InputError(
                    f"bbox.{name} lies entirely in the part of the image cropped away for the "
                    f"{target_h}x{target_w} frame: move the box onto the visible centre of the image."
                )
    return out


def auto_person_boxes(src_h: int, src_w: int, face_scale: float = FACE_SCALE) -> list[BBox]:
    """The reference's default two-person layout: left half and right half, with margins."""
    top, bottom = int(src_h * face_scale), int(src_h * (1 - face_scale))
    half = src_w // 2
    left1, right1 = int(half * face_scale), int(half * (1 - face_scale))
    left2, right2 = int(half * face_scale + half), int(half * (1 - face_scale) + half)
    return [(top, left1, bottom, right1), (top, left2, bottom, right2)]


def validate_bbox(bbox: Mapping[str, Sequence[float]], src_h: int, src_w: int) -> list[BBox]:
    """Check a two-person ``bbox`` field and return the boxes as ints (truncated, like the reference)."""
    if not isinstance(bbox, Mapping) or set(bbox) != {"person1", "person2"}:
        keys = sorted(bbox) if isinstance(bbox, Mapping) else type(bbox).__name__
        raise InputError(
            f"bbox must have exactly the keys 'person1' and 'person2' (one box per speaker), got {keys}."
        )
    return [_validate_box(f"bbox.{name}", bbox[name], src_h, src_w) for name in ("person1", "person2")]


def _validate_box(field: str, box: Sequence[float], src_h: int, src_w: int) -> BBox:
    numbers = isinstance(box, Sequence) and not isinstance(box, str) and len(box) == 4
    numbers = numbers and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in box
    )
    if not numbers:
        raise InputError(
            f"{field} = {box!r} is not a box: give four numbers [top, left, bottom, right] in pixels."
        )
    top, left, bottom, right = (int(v) for v in box)
    if not (0 <= top < bottom <= src_h and 0 <= left < right <= src_w):
        raise InputError(
            f"{field} = {list(box)} is empty or outside the {src_w}x{src_h} (width x height) image: "
            f"give [top, left, bottom, right] with 0 <= top < bottom <= {src_h} and "
            f"0 <= left < right <= {src_w}."
        )
    return top, left, bottom, right


def _rect_mask(rows: torch.Tensor, cols: torch.Tensor, box: BBox) -> torch.Tensor:
    top, left, bottom, right = box
    in_rows = (rows >= top) & (rows < bottom)
    in_cols = (cols >= left) & (cols < right)
    return in_rows[:, None] & in_cols[None, :]  # [lat_h, lat_w] bool


def _source_indices(src: int, final: int, target: int, latent: int) -> torch.Tensor:
    """Source index of each latent position along one axis.

    The chain is the reference's: nearest ``src -> final`` (the cover size), centre crop to
    ``target``, nearest ``target -> latent``. Both nearest steps use torch's own interpolation on
    an index ramp, so the rounding is torch's, whatever its version does.
    """
    to_final = _nearest_map(src, final)
    to_target = _nearest_map(target, latent)
    return to_final[center_crop_offset(final, target) + to_target]


def _nearest_map(size_in: int, size_out: int) -> torch.Tensor:
    """For each output index, the input index ``F.interpolate(mode="nearest")`` reads.

    float32 like the reference's masks: torch computes the scale in the tensor's dtype, so a float64
    ramp could round differently. Indices stay exact in float32 up to 2**24.
    """
    ramp = torch.arange(size_in, dtype=torch.float32).view(1, 1, size_in, 1)
    return F.interpolate(ramp, size=(size_out, 1), mode="nearest").view(size_out).long()
