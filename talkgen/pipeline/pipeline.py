"""The one entry point that the CLI, the service and the deployments call.

Recipe for a clip::

    image  -> prepare_image   (bucket, resize, centre crop)
    speech -> encode_audio    (16 kHz, -23 LUFS, two-speaker layout, wav2vec2 at 25 fps)
    prompt -> encode_text     (umT5, cached by text)
    frame  -> encode_image    (ViT-H tokens)
    frame  -> condition       (VAE latent of [frame, zeros] + 4 mask channels)
    noise  -> sample_chunk    (shifted Euler with text/audio guidance)
    latent -> decode -> write (VAE decode, h264 + AAC mp4 at 25 fps)

Every stage's output can be handed in instead (``context``, ``clip_tokens``, ``audio_embeddings``,
``noise``): the golden tests use that seam, and so can callers that cache encoder outputs.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from talkgen.errors import InputError
from talkgen.models.dit import WanMultiTalkDiT
from talkgen.pipeline.progress import ProgressCallback, ProgressEvent, no_progress
from talkgen.pipeline.request import DEFAULT_NEGATIVE_PROMPT, GenerationRequest
from talkgen.sampling.guidance import Guidance, GuidanceConfig
from talkgen.sampling.schedule import euler_step, shifted_timesteps

FPS = 25
SPEECH_RATE = 16_000
AUDIO_WINDOW_OFFSETS = torch.arange(-2, 3)  # wav2vec2 frames around each video frame
# InfiniteTalk's cond_video is a video when it has one of these suffixes (the reference's list).
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".flv", ".wmv", ".webm", ".mpeg", ".mpg"}


@dataclass
class Result:
    video_path: Path | None
    frames: np.ndarray  # uint8 [F, H, W, 3]
    fps: int
    seed: int
    num_frames: int
    audio: np.ndarray | None = None  # the soundtrack that was muxed (16 kHz mono)

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


@dataclass
class Conditioning:
    """Everything a chunk is sampled from, besides the noise."""

    y: torch.Tensor  # [20, T, h, w]: 4 mask channels + 16 latent channels
    clip_tokens: torch.Tensor  # [1, N, image_dim]
    context: torch.Tensor  # [L, text_dim]
    context_null: torch.Tensor  # [L', text_dim]
    audio: torch.Tensor  # [people, F, window, layers, channels]
    person_masks: torch.Tensor | None  # [3, h, w] for two speakers
    extras: dict = field(default_factory=dict)


def frame_mask(frame_num: int, known_frames: int, lat_h: int, lat_w: int) -> torch.Tensor:
    """The 4 mask channels of ``y``: 1 on known pixel frames, laid out as the VAE packs frames.

    [1, F, h, w] with ones on the first ``known_frames`` -> frame 0 repeated 4 times -> [4, T, h, w].
    """
    mask = torch.ones(1, frame_num, lat_h, lat_w)
    mask[:, known_frames:] = 0
    mask = torch.cat([mask[:, :1].repeat_interleave(4, dim=1), mask[:, 1:]], dim=1)
    return mask.view(mask.shape[1] // 4, 4, lat_h, lat_w).transpose(0, 1)


def audio_windows(embedding: torch.Tensor, start: int, frame_num: int) -> torch.Tensor:
    """[N, layers, channels] per-video-frame features -> [F, 5, layers, channels] windows,
    indices clamped at both ends as the reference does."""
    frames = torch.arange(start, start + frame_num)[:, None] + AUDIO_WINDOW_OFFSETS[None]
    return embedding[frames.clamp(0, embedding.shape[0] - 1)]


def clip_frame_count(audio_frames: int, frame_num: int) -> int:
    """Frames to generate in clip mode: the chunk length, or fewer for short speech (4n+1, >= 5)."""
    if audio_frames >= frame_num:
        return frame_num
    return max(5, 4 * math.ceil((audio_frames - 1) / 4) + 1)


def resolve_seed(seed: int) -> int:
    return seed if seed >= 0 else random.randint(0, 99_999_999)


class Pipeline:
    """MultiTalk / InfiniteTalk generation. Components may be ``None`` when their outputs are
    handed in (the golden tests run with only the DiT and the VAE)."""

    def __init__(
        self,
        dit: WanMultiTalkDiT,
        vae,
        text_encoder=None,
        image_encoder=None,
        audio_encoder=None,
        *,
        model: str = "multitalk",
        device: torch.device | str = "cpu",
        bucket_divisor: int = 1,
    ):
        self.dit = dit
        self.vae = vae
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.audio_encoder = audio_encoder
        self.model = model
        self.device = torch.device(device)
        # The tiny model works on the 480 buckets divided by 4 (still multiples of 16), so a
        # CPU run takes seconds; the real models use the reference's buckets as they are.
        self.bucket_divisor = bucket_divisor
        self._text_cache: dict[str, torch.Tensor] = {}

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        weights_dir: str | Path,
        model: str = "multitalk",
        *,
        people: str = "single",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        progress: ProgressCallback = no_progress,
    ) -> Pipeline:
        """Load every component from a weights directory (see :mod:`talkgen.pipeline.loading`).

        ``model="tiny"`` materialises the built-in tiny model in ``weights_dir`` first.
        """
        from talkgen.pipeline.loading import load_components

        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        components = load_components(Path(weights_dir), model, people=people, device=device, dtype=dtype, progress=progress)
        return cls(**components, model=model, device=device, bucket_divisor=4 if model == "tiny" else 1)

    # -- stages ------------------------------------------------------------------------------

    def encode_text(self, prompt: str, negative_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """umT5 embeddings of the prompt and the negative prompt (cached by text)."""
        negative = negative_prompt or DEFAULT_NEGATIVE_PROMPT
        missing = [t for t in (prompt, negative) if t not in self._text_cache]
        if missing:
            if self.text_encoder is None:
                raise InputError("No text encoder is loaded: pass `context` and `context_null` instead.")
            for text, embedding in zip(missing, self.text_encoder.encode(missing)):
                self._text_cache[text] = embedding
        return self._text_cache[prompt], self._text_cache[negative]

    def encode_audio(self, tracks: list[np.ndarray]) -> list[torch.Tensor]:
        """wav2vec2 features at 25 fps for each speaker's 16 kHz track: [frames, layers, channels]."""
        if self.audio_encoder is None:
            raise InputError("No audio encoder is loaded: pass `audio_embeddings` instead.")
        return [self.audio_encoder.embed(track) for track in tracks]

    def encode_image(self, frame: torch.Tensor) -> torch.Tensor:
        """ViT tokens of one condition frame [3, H, W] in [-1, 1] -> [1, N, image_dim]."""
        if self.image_encoder is None:
            raise InputError("No image encoder is loaded: pass `clip_tokens` instead.")
        return self.image_encoder.encode(frame[:, None])

    def condition(self, frames: torch.Tensor, frame_num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE latent of the known frames followed by zeros, with the mask channels.

        ``frames``: [3, n, H, W] in [-1, 1]. Returns ``y`` [20, T, h, w] and the clean latents of
        the known frames (the context latents of streaming).
        """
        _, known, height, width = frames.shape
        padded = torch.cat([frames, frames.new_zeros(3, frame_num - known, height, width)], dim=1)
        latent = self.vae.encode(padded.to(self.vae.device)).float()
        mask = frame_mask(frame_num, known, height // 8, width // 8).to(latent.device)
        known_latents = 1 + (known - 1) // 4
        return torch.cat([mask, latent], dim=0), latent[:, :known_latents]

    def sample_chunk(
        self,
        noise: torch.Tensor,
        cond: Conditioning,
        *,
        steps: int,
        shift: float,
        guidance: GuidanceConfig,
        clean_prefix: torch.Tensor | None = None,
        progress: ProgressCallback = no_progress,
        chunk: int = 0,
    ) -> torch.Tensor:
        """Integrate the flow ODE from ``noise`` [16, T, h, w] to a clean latent (float32).

        ``clean_prefix`` [16, Tm, h, w] (InfiniteTalk): latents of known frames, written over the
        first ``Tm`` latent frames before every model call and after every update, so the model
        always sees them clean.
        """
        timesteps = shifted_timesteps(steps, shift).to(self.device)
        combiner = Guidance(guidance)
        passes = self._pass_inputs(cond, guidance.passes)
        latent = noise.to(self.device, torch.float32).clone()
        prefix = None if clean_prefix is None else clean_prefix.to(self.device, torch.float32)
        for i in range(steps):
            if prefix is not None:
                latent[:, : prefix.shape[1]] = prefix
            t = timesteps[i : i + 1]
            preds = {name: self._predict(latent, t, cond, **inputs) for name, inputs in passes.items()}
            latent = euler_step(latent, combiner.combine(preds), timesteps[i], timesteps[i + 1])
            if prefix is not None:
                latent[:, : prefix.shape[1]] = prefix
            progress(ProgressEvent("sample", i + 1, steps, chunk))
        return latent

    def _pass_inputs(self, cond: Conditioning, names: tuple[str, ...]) -> dict[str, dict]:
        """Text and audio of each guidance pass. Null audio is one all-zero stream (so even a
        two-speaker clip runs its null passes as one speaker), as in the reference."""
        null_audio = torch.zeros_like(cond.audio[-1:])
        table = {
            "cond": dict(context=cond.context, audio=cond.audio),
            "drop_text": dict(context=cond.context_null, audio=cond.audio),
            "uncond": dict(context=cond.context_null, audio=null_audio),
            "drop_audio": dict(context=cond.context, audio=null_audio),
        }
        return {name: table[name] for name in names}

    def _predict(self, latent: torch.Tensor, t: torch.Tensor, cond: Conditioning, *, context, audio) -> torch.Tensor:
        with torch.no_grad():
            return self.dit(
                x=latent[None], t=t, y=cond.y[None], context=[context], clip_fea=cond.clip_tokens,
                audio=audio[None], ref_target_masks=cond.person_masks if audio.shape[0] == 2 else None,
            )[0]

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent [16, T, h, w] -> video [3, F, H, W] in [-1, 1] (float32)."""
        return self.vae.decode(latent.to(self.vae.device, self.vae.dtype)).float()

    # -- the whole clip ----------------------------------------------------------------------

    def generate_latents(
        self,
        condition_rgb: np.ndarray,
        audio_embeddings: list[torch.Tensor],
        *,
        context: torch.Tensor,
        context_null: torch.Tensor,
        clip_tokens: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        person_masks: torch.Tensor | None = None,
        frame_num: int = 81,
        steps: int = 40,
        shift: float = 7.0,
        guidance: GuidanceConfig | None = None,
        seed: int = 42,
        progress: ProgressCallback = no_progress,
    ) -> torch.Tensor:
        """Clip mode from prepared inputs: the bucketed condition frame (uint8 [H, W, 3]), the
        per-speaker audio features, the text embeddings. Returns the final latent [16, T, h, w]."""
        from talkgen.media.image import to_signed_unit

        guidance = guidance or GuidanceConfig()
        frame = to_signed_unit(condition_rgb).float()  # [3, H, W]
        height, width = frame.shape[-2:]
        progress(ProgressEvent("image"))
        if clip_tokens is None:
            clip_tokens = self.encode_image(frame.to(self.device))
        progress(ProgressEvent("condition"))
        y, _ = self.condition(frame[:, None].to(self.device), frame_num)
        audio = torch.stack([audio_windows(e, 0, frame_num) for e in audio_embeddings])
        cond = Conditioning(
            y=y.to(self.device),
            clip_tokens=clip_tokens.to(self.device),
            context=context.to(self.device),
            context_null=context_null.to(self.device),
            audio=audio.to(self.device),
            person_masks=None if person_masks is None else person_masks.to(self.device),
        )
        clean_prefix = None
        if self.model == "infinitetalk":
            # InfiniteTalk keeps the reference frame's own latent clean in latent frame 0.
            clean_prefix = self.vae.encode(frame[:, None].to(self.vae.device)).float()
        if noise is None:
            generator = torch.Generator().manual_seed(seed)
            noise = torch.randn(16, (frame_num - 1) // 4 + 1, height // 8, width // 8, generator=generator)
        return self.sample_chunk(noise, cond, steps=steps, shift=shift, guidance=guidance,
                                 clean_prefix=clean_prefix, progress=progress)

    def generate(
        self,
        request: GenerationRequest,
        output: str | Path | None = None,
        progress: ProgressCallback = no_progress,
    ) -> Result:
        """Make the talking video a request describes; write it to ``output`` (mp4) if given."""
        from talkgen.audio import load_speech, combine_speakers
        from talkgen.media.image import choose_bucket, load_image, person_masks, resize_and_center_crop
        from talkgen.media.video import write_mp4

        seed = resolve_seed(request.seed)
        if request.cond_video is not None and request.cond_video.suffix.lower() in VIDEO_SUFFIXES:
            raise InputError(
                f"cond_video {request.cond_video} is a video: video dubbing is not available in this version; "
                "give a portrait image as cond_image."
            )
        image = load_image(request.condition_path)
        bucket_h, bucket_w = choose_bucket(image.shape[0], image.shape[1], request.size)
        height, width = bucket_h // self.bucket_divisor, bucket_w // self.bucket_divisor
        condition_rgb = resize_and_center_crop(image, (height, width))
        masks = person_masks(image.shape[0], image.shape[1], (height, width), request.people, request.bbox)

        progress(ProgressEvent("audio"))
        tracks = [load_speech(request.cond_audio[name]) for name in sorted(request.cond_audio)]
        if len(tracks) == 2:
            track1, track2, soundtrack = combine_speakers(tracks[0], tracks[1], request.audio_type)
            tracks = [track1, track2]
        else:
            soundtrack = tracks[0]
        embeddings = self.encode_audio(tracks)
        audio_frames = min(e.shape[0] for e in embeddings)
        if audio_frames < 1:
            raise InputError(
                f"The speech in {request.cond_audio['person1']} is shorter than one video frame (40 ms): give longer speech."
            )
        frame_num = clip_frame_count(audio_frames, request.frame_num)

        progress(ProgressEvent("text"))
        context, context_null = self.encode_text(request.prompt, request.negative_prompt)
        latent = self.generate_latents(
            condition_rgb, embeddings, context=context, context_null=context_null,
            person_masks=masks if request.people == 2 else None, frame_num=frame_num,
            steps=request.sample_steps, shift=request.shift, seed=seed, progress=progress,
            guidance=GuidanceConfig(request.text_guide_scale, request.audio_guide_scale, request.use_apg,
                                    request.apg_momentum, request.apg_norm_threshold),
        )
        progress(ProgressEvent("decode"))
        video = self.decode(latent)[:, : min(frame_num, audio_frames)]
        frames = to_uint8_frames(video)
        path = None
        if output is not None:
            progress(ProgressEvent("write"))
            path = write_mp4(output, frames, soundtrack, SPEECH_RATE, fps=FPS)
        return Result(video_path=path, frames=frames, fps=FPS, seed=seed, num_frames=len(frames), audio=soundtrack)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3], rounded as the reference's writer does."""
    pixels = ((video.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).cpu().numpy()


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
