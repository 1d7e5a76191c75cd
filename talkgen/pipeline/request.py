"""What a caller asks for: the reference's input JSON plus the generation options.

The reference's fields (``prompt``, ``cond_image``/``cond_video``, ``cond_audio.person1/2``,
``audio_type``, ``bbox``) are accepted as they are; the options carry the reference CLI's
defaults. Unknown fields are rejected with a message naming them, so a typo is never ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from talkgen.errors import InputError

# The reference config's English negative prompt (used when the request gives none).
DEFAULT_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
    "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, "
    "extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, "
    "fused fingers, still picture, messy background, three legs, many people in the background, "
    "walking backwards"
)

DEFAULT_SHIFT = {480: 7.0, 720: 11.0}


def round_frame_num(value: int) -> int:
    """Frames per chunk as the model makes them: the VAE packs 4 frames per latent after the
    first, so a chunk has 4n+1 frames (rounded up)."""
    return 4 * ((value - 1 + 3) // 4) + 1


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # -- the reference's input JSON ----------------------------------------------------------
    prompt: str = ""
    cond_image: Path | None = None
    cond_video: Path | None = None
    cond_audio: dict[Literal["person1", "person2"], Path] = Field(default_factory=dict)
    audio_type: Literal["add", "para"] | None = None
    bbox: dict[str, list[float]] | None = None
    tts_audio: dict | None = None

    # -- options (the reference CLI's defaults) ----------------------------------------------
    negative_prompt: str = ""
    size: Literal[480, 720] = 480
    frame_num: int = Field(81, ge=5, le=1001, description="frames per chunk; rounded to 4n+1")
    sample_steps: int = Field(40, ge=1, le=1000)
    sample_shift: float | None = Field(None, gt=0, le=100, description="default 7 for 480, 11 for 720")
    text_guide_scale: float = Field(5.0, ge=0, le=50)
    audio_guide_scale: float = Field(4.0, ge=0, le=50)
    use_apg: bool = False
    apg_momentum: float = Field(-0.75, ge=-1, le=1)
    apg_norm_threshold: float = Field(55.0, ge=0)
    seed: int = Field(42, ge=-1, le=2**63 - 1, description="negative: a random seed")
    mode: Literal["clip", "streaming"] = Field("clip", description="clip: one chunk; streaming: the whole speech")
    max_frames: int | None = Field(None, ge=1, description="cap on the video length in frames (reference: 1000)")
    motion_frame: int | None = Field(None, ge=1, le=997, description="context frames per chunk (25 MultiTalk, 9 InfiniteTalk)")
    color_correction_strength: float = Field(1.0, ge=0, le=1)
    use_teacache: bool = False
    teacache_thresh: float = Field(0.2, gt=0, le=10)
    scene_seg: bool = Field(False, description="video dubbing: split the video into shots (PySceneDetect) and dub each on its own")

    @field_validator("frame_num")
    @classmethod
    def _round_frames(cls, value: int) -> int:
        return round_frame_num(value)

    @model_validator(mode="after")
    def _check_people(self) -> GenerationRequest:
        if self.tts_audio:
            if not isinstance(self.tts_audio.get("text"), str) or not self.tts_audio["text"].strip():
                raise ValueError("tts_audio.text: give the text to speak")
            if self.cond_audio:
                raise ValueError("cond_audio: leave it empty ({}) when tts_audio gives the speech")
            return self._check_image()
        if not self.cond_audio:
            raise ValueError("cond_audio: give at least {'person1': <speech file>}")
        if "person1" not in self.cond_audio:
            raise ValueError("cond_audio: the first speaker must be named 'person1'")
        if len(self.cond_audio) == 2 and self.audio_type is None:
            raise ValueError("audio_type: two speakers need 'add' (one after the other) or 'para' (together)")
        return self._check_image()

    def _check_image(self) -> GenerationRequest:
        if self.cond_image is None and self.cond_video is None:
            raise ValueError("cond_image: give the portrait to animate (or cond_video: a video to dub)")
        if self.scene_seg and (self.cond_video is None or self.cond_image is not None):
            raise ValueError("scene_seg: splits a video into shots; give the video to dub as cond_video "
                             "(not a cond_image), or leave scene_seg off")
        if self.motion_frame is not None and self.motion_frame >= self.frame_num:
            raise ValueError(f"motion_frame: must be smaller than frame_num ({self.frame_num})")
        return self

    @property
    def people(self) -> int:
        if self.tts_audio:
            return 2 if "(s2)" in self.tts_audio["text"] else 1
        return len(self.cond_audio)

    @property
    def shift(self) -> float:
        return self.sample_shift if self.sample_shift is not None else DEFAULT_SHIFT[self.size]

    @property
    def condition_path(self) -> Path:
        return self.cond_image if self.cond_image is not None else self.cond_video  # type: ignore[return-value]

    @classmethod
    def parse(cls, values: dict) -> GenerationRequest:
        """Validate, turning pydantic's report into one :class:`InputError` naming the fields."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise InputError(describe_validation_error(exc)) from None

    @classmethod
    def from_reference_json(cls, path: Path, **overrides) -> GenerationRequest:
        """Read the reference's input JSON; relative paths are taken from the JSON file's folder."""
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"Input JSON {path} does not exist.") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"Input JSON {path} is not valid JSON ({exc}).") from None
        if not isinstance(values, dict):
            raise InputError(f"Input JSON {path} must hold an object with 'prompt', 'cond_image' and 'cond_audio'.")
        base = path.parent
        for key in ("cond_image", "cond_video"):
            if isinstance(values.get(key), str):
                values[key] = str(resolve_relative(values[key], base))
        audio = values.get("cond_audio")
        if isinstance(audio, dict):
            values["cond_audio"] = {k: str(resolve_relative(v, base)) if isinstance(v, str) else v for k, v in audio.items()}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.parse(values)


def resolve_relative(value: str, base: Path) -> Path:
    candidate = Path(value)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return base / candidate


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "is not a known field (check its spelling)"
        parts.append(f"{where}: {message}" if where else message)
    return "Invalid request: " + "; ".join(parts) + "."
