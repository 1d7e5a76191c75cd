"""The one entry point that the CLI, the service and the deployments call.

Recipe::

    image / video -> reference frames   (bucket, resize, centre crop)
    speech / text -> encode_audio        (16 kHz, -23 LUFS, two-speaker layout, wav2vec2 at 25 fps)
    prompt        -> encode_text         (umT5, cached by text)
    per chunk:       encode_image, condition (VAE latent + mask), sample_chunk (shifted Euler,
                     text/audio guidance), decode, colour-match, hand the new frames on
    frames        -> mp4                 (h264 + AAC, written as chunks finish)

Clip mode is the one-chunk case of the same loop. MultiTalk continues a chunk from the last 25
decoded frames (their latents re-noised to each step's level); InfiniteTalk from the last 9
(kept clean) plus a reference frame per chunk: the image, or the source video's frame there.

Every stage's output can be handed in instead (text embeddings, image tokens through an
``encode_image`` function, audio features, the random draws): the golden tests use that seam,
and so can callers that cache encoder outputs.
"""

from __future__ import annotations

import os
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from talkgen.audio.tts import TTSBackend
from talkgen.errors import InputError
from talkgen.media.scenes import ShotList
from talkgen.models.dit import SharedFirstBlock, WanMultiTalkDiT
from talkgen.pipeline.chunks import (
    Chunk,
    ChunkCallback,
    ChunkState,
    FrameSource,
    ImageEncoderFn,
    NoiseSource,
    SeededNoise,
    StillImage,
    VideoFrames,
    audio_windows,
    clip_frame_count,
    frame_mask,
    pad_for_last_chunk,
)
from talkgen.pipeline.progress import ProgressCallback, ProgressEvent, no_progress
from talkgen.pipeline.request import DEFAULT_NEGATIVE_PROMPT, GenerationRequest
from talkgen.sampling.guidance import Guidance, GuidanceConfig
from talkgen.sampling.schedule import add_noise, euler_step, shifted_timesteps

FPS = 25
SPEECH_RATE = 16_000
# The reference's number of context frames carried from one chunk to the next.
MOTION_FRAMES = {"multitalk": 25, "infinitetalk": 9, "tiny": 25}
# InfiniteTalk's cond_video is a video when it has one of these suffixes (the reference's list).
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".flv", ".wmv", ".webm", ".mpeg", ".mpg"}


@dataclass
class StreamOptions:
    """How the chunks are sampled (the reference CLI's defaults)."""

    frame_num: int = 81
    motion_frames: int = 25
    streaming: bool = False
    max_frames: int | None = None  # cap on the video's length in frames (None: the whole speech)
    steps: int = 40
    shift: float = 7.0
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    color_strength: float = 1.0
    teacache_thresh: float | None = None
    tier: int = 480


@dataclass
class Result:
    video_path: Path | None
    num_frames: int
    fps: int
    seed: int
    frames: np.ndarray | None = None  # uint8 [F, H, W, 3] when kept in memory (no output file)
    audio: np.ndarray | None = None  # the soundtrack that was muxed
    notes: list[str] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


@dataclass
class Conditioning:
    """Everything one chunk is sampled from, besides the noise."""

    y: torch.Tensor  # [20, T, h, w]: 4 mask channels + 16 latent channels
    clip_tokens: torch.Tensor  # [1, N, image_dim]
    context: torch.Tensor  # [L, text_dim]
    context_null: torch.Tensor  # [L', text_dim]
    audio: torch.Tensor  # [people, F, window, layers, channels]
    person_masks: torch.Tensor | None  # [3, h, w] for two speakers


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
        batch_passes: bool = False,
        parallel=None,
        memory=None,
        text_cache_size: int = 16,
        tts_dir: str | Path | None = None,
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
        # One forward for the guidance passes that share a speaker count. Measured on an H100
        # it gains nothing at 480p and costs memory, so it is off by default.
        self.batch_passes = batch_passes
        # Several GPUs: a talkgen.runtime.parallel.ParallelDiT; rank 0 calls it in place of the DiT.
        self.parallel = parallel
        # A talkgen.runtime.memory.MemoryManager when a memory tier keeps encoders off the GPU
        # between uses (None: everything stays where it was loaded).
        self.memory = memory
        # (prompt, negative prompt) -> umT5 embeddings, least recently used dropped first: a
        # service's repeated prompts skip the text encoder.
        self._text_cache: OrderedDict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.text_cache_size = text_cache_size
        # Kokoro-82M's folder: text-to-speech speaks with Kokoro when it is complete, else with
        # espeak-ng. Backends are built once (Kokoro's model loads in seconds) and kept.
        self.tts_dir = Path(tts_dir) if tts_dir is not None else None
        self._tts_backends: dict[tuple[str, str | None], TTSBackend] = {}

    @property
    def is_infinitetalk(self) -> bool:
        return self.model == "infinitetalk"

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
        loras: list[tuple[str | Path, float]] | None = None,
        quant_file: str | Path | None = None,
        memory: str | None = None,
        vram_budget_gb: float | None = None,
        fp8: bool | str | None = None,
        progress: ProgressCallback = no_progress,
        parallel=None,
    ) -> Pipeline:
        """Load every component from a weights directory (see :mod:`talkgen.pipeline.loading`).

        ``model="tiny"`` materialises the built-in tiny model in ``weights_dir`` first.
        ``loras``: (file, scale) pairs merged into the DiT weights after loading.
        ``quant_file``: one of the reference's quantized DiT files, dequantized at load.
        ``memory``: ``"auto"`` (default), ``"resident"``, ``"offload-encoders"``, ``"fp8"`` or
        ``"stream-blocks"``; ``vram_budget_gb``: peak GPU memory to stay under (GiB); ``fp8``:
        ``"auto"`` (default: on where supported), ``True``/``"on"`` or ``False``/``"off"``. Unset,
        they come from ``TALKGEN_MEMORY``, ``TALKGEN_VRAM_BUDGET_GB``, ``TALKGEN_FP8`` (see
        :mod:`talkgen.runtime.memory`).
        ``parallel``: a :class:`~talkgen.runtime.parallel.SequenceParallel` group; every rank calls
        this and then :meth:`generate` (:class:`talkgen.runtime.launch.ParallelPipeline`): rank 0
        runs the pipeline, the other ranks keep only the DiT and run their shard of its forwards.
        """
        from talkgen.models.attention import check_backend
        from talkgen.pipeline.loading import is_tiny, load_components
        from talkgen.runtime.compile import compile_blocks, compile_enabled

        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        check_backend(device)  # a bad TALKGEN_ATTENTION now, not while compiling the first forward
        if parallel is not None and model == "tiny":  # rank 0 writes the tiny model, once
            from talkgen.pipeline.tiny import ensure_tiny_weights

            if parallel.rank == 0:
                ensure_tiny_weights(Path(weights_dir))
            parallel.barrier()
        from talkgen.runtime.memory import apply_plan, resolve_plan

        # the other ranks run DiT shards only: the encoders and the VAE run once, on rank 0
        follower = parallel is not None and parallel.rank != 0
        tiny = model == "tiny" or is_tiny(Path(weights_dir))
        plan = resolve_plan(device, memory, vram_budget_gb, fp8, tiny=tiny, dtype=dtype, dit_only=follower)
        # Components that will not stay whole on the GPU are loaded on the host first.
        host = torch.device("cpu")
        components = load_components(Path(weights_dir), model, people=people, device=device, dtype=dtype,
                                     quant_file=quant_file, progress=progress,
                                     dit_device=host if plan.tier == "stream-blocks" or plan.fp8 else device,
                                     encoder_device=host if plan.offload_encoders else device, dit_only=follower)
        if loras:
            from talkgen.weights.lora import merge_loras

            merge_loras(components["dit"], [(str(path), scale) for path, scale in loras])
        components["memory"] = apply_plan(components, plan, device)
        if compile_enabled(device.type):
            compile_blocks(components["dit"].blocks)
        extra = {}
        if parallel is not None:
            from talkgen.runtime.launch import ParallelPipeline
            from talkgen.runtime.parallel import ParallelDiT

            cls, extra["parallel"] = ParallelPipeline, ParallelDiT(components["dit"], parallel)
        from talkgen.weights.manifest import KOKORO_DIR

        return cls(**components, model="multitalk" if model == "tiny" else model, device=device,
                   bucket_divisor=4 if is_tiny(Path(weights_dir)) else 1, tts_dir=Path(weights_dir) / KOKORO_DIR, **extra)

    # -- stages ------------------------------------------------------------------------------

    def encode_text(self, prompt: str, negative_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """umT5 embeddings of the prompt and the negative prompt (cached by text)."""
        negative = negative_prompt or DEFAULT_NEGATIVE_PROMPT
        key = (prompt, negative)
        if key in self._text_cache:
            self._text_cache.move_to_end(key)
            return self._text_cache[key]
        if self.text_encoder is None:
            raise InputError("No text encoder is loaded: pass `context` and `context_null` instead.")
        texts = list(dict.fromkeys(key))
        with self._using(self.text_encoder):
            embeddings = dict(zip(texts, self.text_encoder.encode(texts)))
        self._text_cache[key] = (embeddings[prompt], embeddings[negative])
        while len(self._text_cache) > max(self.text_cache_size, 0):
            self._text_cache.popitem(last=False)
        return embeddings[prompt], embeddings[negative]

    def _using(self, component):
        """A context in which ``component`` (an encoder or the VAE) is on the GPU."""
        return self.memory.using(component) if self.memory is not None else nullcontext()

    def tts_backend(self, name: str = "auto", kokoro_dir: str | Path | None = None) -> TTSBackend:
        """The text-to-speech backend ``name`` (``auto``: Kokoro when ``kokoro_dir``, by default the
        weights' ``Kokoro-82M`` folder, is complete, else espeak-ng), built on first use."""
        from talkgen.audio.tts import get_backend

        folder = kokoro_dir if kokoro_dir is not None else self.tts_dir
        key = (name, str(folder) if folder is not None else None)
        if key not in self._tts_backends:
            self._tts_backends[key] = get_backend(name, folder)
        return self._tts_backends[key]

    def encode_audio(self, tracks: list[np.ndarray]) -> list[torch.Tensor]:
        """wav2vec2 features at 25 fps for each speaker's 16 kHz track: [frames, layers, channels]."""
        if self.audio_encoder is None:
            raise InputError("No audio encoder is loaded: pass `audio_embeddings` instead.")
        return [self.audio_encoder.embed(track) for track in tracks]

    def encode_image(self, frame: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        """ViT tokens of one condition frame [3, H, W] in [-1, 1] -> [1, N, image_dim]."""
        if self.image_encoder is None:
            raise InputError("No image encoder is loaded: pass `encode_image` instead.")
        with self._using(self.image_encoder):
            return self.image_encoder.encode(frame[:, None].to(self.device))

    def condition(self, frames: torch.Tensor, frame_num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE latent of the known frames followed by zeros, with the mask channels.

        ``frames``: [3, n, H, W] in [-1, 1]. Returns ``y`` [20, T, h, w] and the latents of the
        known frames (MultiTalk's context latents).
        """
        _, known, height, width = frames.shape
        padded = torch.cat([frames, frames.new_zeros(3, frame_num - known, height, width)], dim=1)
        with self._using(self.vae):
            latent = self.vae.encode(padded.to(self.vae.device)).float()
        mask = frame_mask(frame_num, known, height // 8, width // 8).to(latent.device)
        return torch.cat([mask, latent], dim=0), latent[:, : 1 + (known - 1) // 4]

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """VAE latents of pixel frames [3, n, H, W] on their own (InfiniteTalk's clean context)."""
        with self._using(self.vae):
            return self.vae.encode(frames.to(self.vae.device)).float()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent [16, T, h, w] -> video [3, F, H, W] in [-1, 1] (float32)."""
        with self._using(self.vae):
            return self.vae.decode(latent.to(self.vae.device, self.vae.dtype)).float()

    def sample_chunk(
        self,
        noise: torch.Tensor,
        cond: Conditioning,
        *,
        steps: int,
        shift: float,
        guidance: GuidanceConfig,
        context_latents: torch.Tensor | None = None,
        keep_context_clean: bool = False,
        context_noise=None,
        teacache=None,
        progress: ProgressCallback = no_progress,
        chunk: int = 0,
    ) -> torch.Tensor:
        """Integrate the flow ODE from ``noise`` [16, T, h, w] to a clean latent (float32).

        ``context_latents`` [16, Tm, h, w] are the latents of frames the chunk continues from.
        ``context_noise(draw)`` (streaming chunks after the first) gives fresh noise to re-noise
        them to the current level before the first step (draw 0) and after step i (draw i + 1),
        as MultiTalk does. ``keep_context_clean`` (InfiniteTalk) writes them clean over the first
        latent frames before every model call and after every update. ``teacache``: a
        :class:`~talkgen.sampling.teacache.TeaCache` for this chunk (skips blocks on slow steps).
        """
        timesteps = shifted_timesteps(steps, shift).to(self.device)
        combiner = Guidance(guidance)
        passes = self._pass_inputs(cond, guidance.passes)
        latent = noise.to(self.device, torch.float32).clone()
        context = None if context_latents is None else context_latents.to(self.device, torch.float32)

        def inject(draw: int, t: torch.Tensor) -> None:
            if context is None:
                return
            tm = context.shape[1]
            if context_noise is not None:
                latent[:, :tm] = add_noise(context, context_noise(draw).to(self.device, torch.float32), t)
            if keep_context_clean:
                latent[:, :tm] = context

        inject(0, timesteps[0])
        for i in range(steps):
            preds = self._predict_passes(latent, timesteps[i : i + 1], cond, passes, teacache, i)
            latent = euler_step(latent, combiner.combine(preds), timesteps[i], timesteps[i + 1])
            inject(i + 1, timesteps[i + 1])
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

    def _predict_passes(self, latent: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                        passes: dict[str, dict], cache, step: int) -> dict[str, torch.Tensor]:
        """Run the guidance passes; with ``batch_passes``, those that share a speaker count run
        as one batch (one speaker: all of them; two: cond + drop-text, then the null pass)."""
        groups: dict[object, list[str]] = {}
        for name, inputs in passes.items():
            key = inputs["audio"].shape[0] if self.batch_passes else name
            groups.setdefault(key, []).append(name)
        preds = {}
        forward = self.dit if self.parallel is None else self.parallel
        # The passes feed the first block the same tokens: its self-attention runs once per step.
        shared = {} if self.parallel is not None else dict(shared=SharedFirstBlock())
        for names in groups.values():
            audio = torch.stack([passes[n]["audio"] for n in names])
            batch = len(names)
            runner = None
            if cache is not None:
                runner = cache.runner(names, step)
                runner.teacache = (cache, names, step)  # what the other ranks of a ParallelDiT mirror
            with torch.no_grad():
                out = forward(
                    x=latent[None].expand(batch, *latent.shape), t=t.expand(batch),
                    y=cond.y[None].expand(batch, *cond.y.shape), context=[passes[n]["context"] for n in names],
                    clip_fea=cond.clip_tokens.expand(batch, -1, -1), audio=audio,
                    ref_target_masks=cond.person_masks if audio.shape[1] == 2 else None,
                    block_runner=runner, **shared,
                )
            preds.update(zip(names, out.unbind(0)))
        return preds

    # -- the chunk loop ----------------------------------------------------------------------

    def stream(
        self,
        frames: FrameSource,
        audio_embeddings: list[torch.Tensor],
        *,
        context: torch.Tensor,
        context_null: torch.Tensor,
        options: StreamOptions,
        person_masks: torch.Tensor | None = None,
        noise: NoiseSource | None = None,
        encode_image: ImageEncoderFn | None = None,
        resume: ChunkState | None = None,
        progress: ProgressCallback = no_progress,
    ) -> Iterator[Chunk]:
        """Yield the video chunk by chunk. ``frames`` gives the condition picture at a frame
        index (already bucketed: uint8 [H, W, 3]); ``audio_embeddings`` one [N, layers,
        channels] tensor per speaker. ``resume`` continues after a finished chunk."""
        from talkgen.media.image import to_signed_unit

        noise = noise or SeededNoise(42)
        encode_image = encode_image or self.encode_image
        embeddings = list(audio_embeddings)
        audio_frames = embeddings[0].shape[0]
        total = audio_frames if options.max_frames is None else min(options.max_frames, audio_frames)
        frame_num, motion = options.frame_num, options.motion_frames
        if not options.streaming or total <= frame_num:
            frame_num = clip_frame_count(total, frame_num)
            total = min(total, frame_num)
        stride = frame_num - motion
        if options.streaming and stride <= 0:
            raise InputError(f"motion_frame ({motion}) must be smaller than frame_num ({frame_num}).")

        reference = to_signed_unit(frames.frame(0)).float()  # [3, H, W]; also the colour reference
        height, width = reference.shape[-2:]
        latent_shape = (16, (frame_num - 1) // 4 + 1, height // 8, width // 8)

        index, start, done, previous = 0, 0, 0, None
        if resume is not None:
            index, start, done = resume.index + 1, resume.start + stride, resume.frames_done
            previous = self._finish_video(resume.latent, reference, options)[:, -motion:]
        while done < total:
            if options.streaming and index > 0 and start + frame_num >= total:
                embeddings = [pad_for_last_chunk(e, start + frame_num) for e in embeddings]
            audio = torch.stack([audio_windows(e, start, frame_num) for e in embeddings])
            first = previous is None
            if self.is_infinitetalk:
                anchor = to_signed_unit(frames.frame(start)).float()  # this chunk's reference frame
                progress(ProgressEvent("image", chunk=index))
                clip_tokens = encode_image(anchor, index)
                progress(ProgressEvent("condition", chunk=index))
                y, _ = self.condition(anchor[:, None], frame_num)
                context_latents = self.encode_frames(anchor[:, None] if first else previous)
            else:
                known = reference[:, None] if first else previous
                progress(ProgressEvent("image", chunk=index))
                clip_tokens = encode_image(known[:, -1], index)
                progress(ProgressEvent("condition", chunk=index))
                y, context_latents = self.condition(known, frame_num)
                context_latents = None if first else context_latents
            cond = Conditioning(y=y.to(self.device), clip_tokens=clip_tokens.to(self.device),
                                context=context.to(self.device), context_null=context_null.to(self.device),
                                audio=audio.to(self.device),
                                person_masks=None if person_masks is None else person_masks.to(self.device))
            chunk_index = index
            teacache = None
            if options.teacache_thresh:
                from talkgen.sampling.teacache import TeaCache

                teacache = TeaCache(options.steps, options.teacache_thresh, tier=options.tier)
            latent = self.sample_chunk(
                noise.chunk_noise(index, latent_shape), cond, steps=options.steps, shift=options.shift,
                guidance=options.guidance, context_latents=context_latents, keep_context_clean=self.is_infinitetalk,
                context_noise=None if first else (lambda draw: noise.motion_noise(chunk_index, draw, context_latents.shape)),
                teacache=teacache, progress=progress, chunk=index,
            )
            progress(ProgressEvent("decode", chunk=index))
            video = self._finish_video(latent, reference, options)
            new = video if first else video[:, motion:]
            new = new[:, : total - done]
            state = ChunkState(index=index, start=start, latent=latent.cpu(), frames_done=done + new.shape[1])
            yield Chunk(index=index, frames=to_uint8_frames(new), first_frame=done, total_frames=total,
                        latent=latent, state=state, teacache=teacache)
            done += new.shape[1]
            previous = video[:, -motion:]
            index, start = index + 1, start + stride

    def _finish_video(self, latent: torch.Tensor, reference: torch.Tensor, options: StreamOptions) -> torch.Tensor:
        """Decode a chunk and match its colours to the reference image (before its last frames
        become the next chunk's context, as in the reference); on the GPU where it decoded."""
        video = self.decode(latent)
        if options.color_strength > 0:
            from talkgen.media.color import match_colors

            video = match_colors(video, reference, options.color_strength)
        return video.cpu()

    # -- clip mode from prepared inputs (the golden tests' seam) -----------------------------

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
        teacache_thresh: float | None = None,
        seed: int = 42,
        progress: ProgressCallback = no_progress,
    ) -> torch.Tensor:
        """One chunk from the bucketed condition frame (uint8 [H, W, 3]), per-speaker audio
        features and text embeddings; returns the final latent [16, T, h, w]."""
        from talkgen.pipeline.chunks import RecordedNoise

        options = StreamOptions(frame_num=frame_num, steps=steps, shift=shift, guidance=guidance or GuidanceConfig(),
                                color_strength=0.0, teacache_thresh=teacache_thresh)
        source = RecordedNoise({0: noise}, {}) if noise is not None else SeededNoise(seed)
        encoder = (lambda frame, chunk: clip_tokens) if clip_tokens is not None else None
        chunk = next(self.stream(StillImage(condition_rgb), audio_embeddings, context=context, context_null=context_null,
                                 options=options, person_masks=person_masks, noise=source, encode_image=encoder,
                                 progress=progress))
        return chunk.latent

    # -- a whole request -----------------------------------------------------------------------

    def generate(
        self,
        request: GenerationRequest,
        output: str | Path | None = None,
        progress: ProgressCallback = no_progress,
        on_chunk: ChunkCallback | None = None,
        resume: ChunkState | None = None,
    ) -> Result:
        """Make the talking video a request describes and write it to ``output`` (mp4) as the
        chunks finish; without ``output`` the frames are returned in memory. ``on_chunk`` sees
        every finished chunk (the service persists them); ``resume`` continues a stream after a
        finished chunk (frames before it are not written again)."""
        from talkgen.media.video import BackgroundWriter, Mp4Writer

        seed = resolve_seed(request.seed)
        inputs = self.prepare(request, progress)
        embeddings = self.encode_audio(inputs.tracks)
        audio_frames = min(e.shape[0] for e in embeddings)
        if audio_frames < 1:
            raise InputError(f"The speech of {inputs.speech_name} is shorter than one video frame (40 ms): give longer speech.")
        progress(ProgressEvent("text"))
        context, context_null = self.encode_text(request.prompt, request.negative_prompt)
        options = self.stream_options(request)
        notes = list(inputs.notes)
        if not options.streaming and audio_frames > options.frame_num:
            notes.append(f"the speech lasts {audio_frames / FPS:.2f} s; clip mode made the first "
                         f"{options.frame_num / FPS:.2f} s (use mode 'streaming' for all of it)")
        if inputs.shots is not None:  # scene_seg: every shot of the source dubbed on its own
            from talkgen.pipeline.shots import stream_shots

            chunks = stream_shots(self, inputs.frames, inputs.shots, embeddings, context=context, context_null=context_null,
                                  options=options, person_masks=inputs.person_masks, noise=SeededNoise(seed),
                                  resume=resume, progress=progress, notes=notes)
        else:
            chunks = self.stream(inputs.frames, embeddings, context=context, context_null=context_null, options=options,
                                 person_masks=inputs.person_masks, noise=SeededNoise(seed), resume=resume, progress=progress)
        kept: list[np.ndarray] = []
        total = 0
        writer = partial = None
        try:
            for chunk in chunks:
                if output is not None and writer is None:
                    partial = Path(output).with_name(f".{Path(output).name}.partial.mp4")
                    partial.parent.mkdir(parents=True, exist_ok=True)
                    height, width = chunk.frames.shape[1:3]
                    soundtrack = inputs.soundtrack_from(chunk.first_frame)
                    # Chunk k is encoded while chunk k + 1 is generated.
                    writer = BackgroundWriter(Mp4Writer(partial, width, height, soundtrack, inputs.soundtrack_rate,
                                                        fps=FPS))
                if writer is not None:
                    progress(ProgressEvent("write", chunk=chunk.index))
                    writer.write(chunk.frames)
                else:
                    kept.append(chunk.frames)
                if on_chunk is not None:
                    on_chunk(chunk)
                total = chunk.first_frame + len(chunk.frames)
            if writer is not None:
                writer.close()
                writer = None
                os.replace(partial, output)
        finally:
            if writer is not None:
                writer.abort()
            if partial is not None and partial.exists():
                partial.unlink()
        return Result(video_path=Path(output) if output is not None else None, num_frames=total, fps=FPS, seed=seed,
                      frames=np.concatenate(kept) if kept else None, audio=inputs.soundtrack, notes=notes)

    def stream_options(self, request: GenerationRequest) -> StreamOptions:
        motion = request.motion_frame or MOTION_FRAMES.get(self.model, 25)
        return StreamOptions(
            frame_num=request.frame_num, motion_frames=motion, streaming=request.mode == "streaming",
            max_frames=request.max_frames, steps=request.sample_steps, shift=request.shift,
            guidance=GuidanceConfig(request.text_guide_scale, request.audio_guide_scale, request.use_apg,
                                    request.apg_momentum, request.apg_norm_threshold),
            color_strength=request.color_correction_strength,
            teacache_thresh=request.teacache_thresh if request.use_teacache else None, tier=request.size,
        )

    def prepare(self, request: GenerationRequest, progress: ProgressCallback = no_progress) -> PreparedInputs:
        """Read and check every input of a request before any model runs."""
        from talkgen.media.image import choose_bucket, load_image, person_masks

        path = request.condition_path
        if path.suffix.lower() in VIDEO_SUFFIXES:
            if not self.is_infinitetalk:
                raise InputError(f"{path} is a video: video dubbing needs model 'infinitetalk'; MultiTalk takes a portrait image.")
            source: FrameSource = VideoFrames(path=path)
        else:
            if request.scene_seg:
                raise InputError(f"{path} is an image: scene_seg splits a video into shots; give a video to dub "
                                 "(cond_video) or leave scene_seg off.")
            source = StillImage(load_image(path))
        src_h, src_w = source.size
        bucket_h, bucket_w = choose_bucket(src_h, src_w, request.size)
        target = (bucket_h // self.bucket_divisor, bucket_w // self.bucket_divisor)
        masks = person_masks(src_h, src_w, target, request.people, request.bbox) if request.people == 2 else None
        progress(ProgressEvent("audio"))
        tracks, soundtrack, rate, name, notes = load_request_audio(request, self.tts_backend)
        shots = None
        if request.scene_seg:
            from talkgen.pipeline.shots import detect_request_shots

            progress(ProgressEvent("scenes"))
            shots = detect_request_shots(path, request, min(len(t) for t in tracks) / SPEECH_RATE)
        return PreparedInputs(frames=BucketedFrames(source, target), person_masks=masks, tracks=tracks,
                              soundtrack=soundtrack, soundtrack_rate=rate, speech_name=name, shots=shots, notes=notes)


@dataclass
class PreparedInputs:
    frames: FrameSource
    person_masks: torch.Tensor | None
    tracks: list[np.ndarray]  # per speaker, 16 kHz (what wav2vec2 hears)
    soundtrack: np.ndarray  # what is muxed into the video
    soundtrack_rate: int
    speech_name: str
    shots: ShotList | None = None  # scene_seg: the source video's shots
    notes: list[str] = field(default_factory=list)  # for the result (how the speech was made)

    def soundtrack_from(self, first_frame: int) -> np.ndarray:
        """The soundtrack from the video's ``first_frame`` on (a resumed stream starts later)."""
        start = round(first_frame * self.soundtrack_rate / FPS)
        return self.soundtrack[start:]


class BucketedFrames:
    """A frame source resized and centre-cropped to the bucket, frame by frame (cached)."""

    def __init__(self, source: FrameSource, target: tuple[int, int]):
        self.source, self.target = source, target
        self._cache: tuple[np.ndarray, np.ndarray] | None = None  # (source frame, its bucketed copy)

    @property
    def size(self) -> tuple[int, int]:
        return self.target

    def frame(self, index: int) -> np.ndarray:
        from talkgen.media.image import resize_and_center_crop

        raw = self.source.frame(index)
        if self._cache is None or self._cache[0] is not raw:  # holding `raw` keeps its identity unique
            self._cache = (raw, resize_and_center_crop(raw, self.target))
        return self._cache[1]


def load_request_audio(
    request: GenerationRequest, tts_backend: Callable[..., TTSBackend] | None = None
) -> tuple[list[np.ndarray], np.ndarray, int, str, list[str]]:
    """Per-speaker 16 kHz tracks for the audio encoder, the soundtrack to mux, its rate, the
    speech's name for messages, and notes for the result. ``tts_backend(name, kokoro_dir)`` gives
    the backend for text (default: built anew)."""
    from talkgen.audio import combine_speakers, load_speech
    from talkgen.audio.speech import resample

    if request.tts_audio:
        from talkgen.audio.tts import get_backend, synthesize_dialogue, synthesize_single

        tts = request.tts_audio
        backend = (tts_backend or get_backend)(tts.get("backend", "auto"), tts.get("kokoro_dir"))
        notes = [f"speech from text by {backend.name}", *getattr(backend, "notes", [])]
        if request.people == 2 or "(s2)" in tts["text"]:
            dialogue = synthesize_dialogue(tts["text"], backend, tts.get("human1_voice"), tts.get("human2_voice"))
            tracks = [resample(dialogue.track1, dialogue.rate), resample(dialogue.track2, dialogue.rate)]
            return tracks, dialogue.mix, dialogue.rate, "the text-to-speech", notes
        samples, rate = synthesize_single(tts["text"], backend, tts.get("human1_voice"))
        return [resample(samples, rate)], samples, rate, "the text-to-speech", notes
    names = sorted(request.cond_audio)
    tracks = [load_speech(request.cond_audio[name]) for name in names]
    if len(tracks) == 2:
        track1, track2, mix = combine_speakers(tracks[0], tracks[1], request.audio_type)
        return [track1, track2], mix, SPEECH_RATE, str(request.cond_audio["person1"]), []
    return tracks, tracks[0], SPEECH_RATE, str(request.cond_audio["person1"]), []


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3], rounded as the reference's writer does."""
    pixels = ((video.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).cpu().numpy()


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
