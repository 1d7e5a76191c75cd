"""Text to speech: one or two voices through a small backend interface.

Backends: ``synthesize(text, voice) -> (samples float32 [N], sample_rate)``.

- :class:`EspeakBackend`, always available: libespeak-ng from the ``espeakng-loader`` wheel
  (called through ctypes; the wheel ships the library and its data), or the Debian ``espeak-ng``
  program when the wheel is absent. Robotic, but real speech with real timing, which is what the
  lip-sync model needs to react to.
- :class:`KokoroBackend`: the reference's TTS (Kokoro-82M, 24 kHz), used when the ``kokoro``
  package imports and a local ``Kokoro-82M`` folder (``config.json``, ``kokoro-v1_0.pth``,
  ``voices/*.pt``) is present; otherwise a clear :class:`~talkgen.errors.InputError` or
  :class:`~talkgen.errors.WeightsError` says what is missing.

Two voices follow the reference (``process_tts_multi`` of ``generate_multitalk.py``): the script is
split with ``(s1) ... (s2) ...`` markers, in order (text before the first marker, and speakers
other than 1 and 2, are ignored); each segment is spoken with its speaker's voice and appended to
that speaker's track while zeros of the same length are appended to the other track, so the two
tracks are equally long and take turns; the soundtrack is their sum. As in the reference, TTS audio
is not loudness-normalised, and the tracks are resampled to 16 kHz for the audio encoder while the
mix is muxed at the backend's rate.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from talkgen.errors import InputError, ResourceError, WeightsError

if TYPE_CHECKING:  # optional: imported where Kokoro is used
    import kokoro

SPEAKER_PATTERN = re.compile(r"\(s(\d+)\)\s*(.*?)(?=\s*\(s\d+\)|$)", re.DOTALL)  # the reference's regex


@runtime_checkable
class TTSBackend(Protocol):
    name: str
    default_voices: tuple[str, str]

    def synthesize(self, text: str, voice: str | None = None) -> tuple[np.ndarray, int]:
        """Mono float32 samples in [-1, 1] and their sample rate."""
        ...


# --------------------------------------------------------------------------------------------
# espeak-ng

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE = 1  # espeakRATE parameter
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _EspeakLibrary:
    """libespeak-ng, initialised once per process; synthesis is serialised (the library is global)."""

    _instance: _EspeakLibrary | None = None
    _lock = threading.Lock()

    def __init__(self, library: str, data: str):
        self.lib = ctypes.CDLL(library)
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                          ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode(), 0)
        if self.rate <= 0:
            raise ResourceError(f"libespeak-ng ({library}) failed to initialise with its data at {data}.")
        self.chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # keep a reference: ctypes would free it
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, count: int, _events) -> int:
        if wav and count > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    @classmethod
    def get(cls) -> _EspeakLibrary | None:
        with cls._lock:
            if cls._instance is None:
                try:
                    import espeakng_loader
                except ImportError:
                    return None
                cls._instance = cls(str(espeakng_loader.get_library_path()), str(espeakng_loader.get_data_path()))
            return cls._instance

    def synthesize(self, text: str, voice: str, words_per_minute: int) -> tuple[np.ndarray, int]:
        with self._lock:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise InputError(f"espeak-ng has no voice '{voice}' (try 'en-us', 'en-us+f3', 'en-gb').")
            self.lib.espeak_SetParameter(_RATE, int(words_per_minute), 0)
            self.chunks = []
            data = text.encode("utf-8") + b"\0"
            self.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            self.lib.espeak_Synchronize()
            pcm = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)
            self.chunks = []
        return (pcm.astype(np.float32) / 32768.0), self.rate


KOKORO_VOICE = re.compile(r"[a-z][fm]_[a-z0-9]+")


class EspeakBackend:
    """espeak-ng: the library from the ``espeakng-loader`` wheel, else the ``espeak-ng`` program."""

    name = "espeak-ng"
    default_voices = ("en-us+f3", "en-us")

    def __init__(self, words_per_minute: int = 175, prefer: str = "library"):  # 175: espeak-ng's default
        self.words_per_minute = words_per_minute
        self.prefer = prefer

    @staticmethod
    def available() -> bool:
        try:
            import espeakng_loader  # noqa: F401

            return True
        except ImportError:
            return shutil.which("espeak-ng") is not None

    def synthesize(self, text: str, voice: str | None = None) -> tuple[np.ndarray, int]:
        voice = self.voice_for(voice)
        library = _EspeakLibrary.get() if self.prefer == "library" else None
        if library is not None:
            return library.synthesize(text, voice, self.words_per_minute)
        program = shutil.which("espeak-ng")
        if program is None:
            raise ResourceError(
                "No espeak-ng here: install the espeakng-loader wheel (pip install espeakng-loader) "
                "or the Debian package (apt-get install espeak-ng)."
            )
        return self._run_program(program, text, voice)

    def voice_for(self, voice: str | None) -> str:
        """espeak-ng voice for a request's voice. Kokoro names (``af_heart``, ``am_adam``: language,
        gender, name) map to a US English female or male voice, so the reference's TTS requests
        still speak where Kokoro's weights are absent."""
        if not voice:
            return self.default_voices[0]
        if KOKORO_VOICE.fullmatch(voice):
            return self.default_voices[0] if voice[1] == "f" else self.default_voices[1]
        return voice

    def _run_program(self, program: str, text: str, voice: str) -> tuple[np.ndarray, int]:
        import soundfile

        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "speech.wav")
            result = subprocess.run(
                [program, "-v", voice, "-s", str(self.words_per_minute), "-w", out], input=text.encode("utf-8"),
                capture_output=True, timeout=600, check=False,
            )
            if result.returncode != 0 or not os.path.isfile(out):
                message = result.stderr.decode(errors="replace").strip()
                raise InputError(f"espeak-ng could not speak with voice '{voice}': {message or 'no output'}.")
            samples, rate = soundfile.read(out, dtype="float32", always_2d=False)
        return np.asarray(samples, dtype=np.float32), int(rate)


# --------------------------------------------------------------------------------------------
# Kokoro


KOKORO_REPO = "hexgrad/Kokoro-82M"
KOKORO_G2P = ("auto", "misaki", "espeak")


class KokoroBackend:
    """The reference's Kokoro-82M (``lang_code='a'``, speed 1, ``split_pattern=r'\\n+'``), 24 kHz.

    ``weights_dir`` is the ``Kokoro-82M`` folder; a voice is a ``.pt`` path or a name in its
    ``voices/`` folder (``af_heart``).

    ``g2p`` picks how English text becomes phonemes. ``"misaki"`` (as the reference): Kokoro's own
    English G2P, misaki's lexicon over spaCy's ``en_core_web_sm`` tagger, which misaki downloads on
    first use (from GitHub, so it needs the network once). ``"espeak"``: misaki's espeak-ng G2P for
    English (espeak-ng's phonemes mapped to the symbols misaki's lexicon uses, as misaki does for
    words its lexicon lacks), through Kokoro's espeak branch; it needs no spaCy model and so works
    offline, at some cost in pronunciation. ``"auto"`` (the default): misaki, and espeak-ng where
    misaki's spaCy model is neither installed nor downloadable (``self.notes`` then says so). Other
    languages (``lang_code`` 'e', 'f', 'h', 'i', 'p') are espeak-based in Kokoro either way."""

    name = "kokoro"
    default_voices = ("af_heart", "am_adam")
    sample_rate = 24000

    def __init__(self, weights_dir: str | Path, lang_code: str = "a", device: str | None = None, g2p: str = "auto"):
        from talkgen.weights import manifest

        if g2p not in KOKORO_G2P:
            raise InputError(f"Unknown Kokoro G2P '{g2p}': choose {' or '.join(KOKORO_G2P)}.")
        self.weights_dir = Path(weights_dir)
        self.config = self.weights_dir / "config.json"
        self.checkpoint = self.weights_dir / "kokoro-v1_0.pth"
        for path in (self.config, self.checkpoint):
            if not path.is_file():
                raise WeightsError(f"Kokoro TTS needs {path}; {manifest.KOKORO.advice()}.")
        try:
            from kokoro import KModel
        except ImportError as exc:
            raise InputError(
                f"Kokoro TTS needs the 'kokoro' package and its English G2P ('misaki[en]'): pip install kokoro "
                f"misaki[en] ({exc}). Without it, use the espeak-ng voices (tts backend 'espeak')."
            ) from exc
        import torch

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = KModel(repo_id=KOKORO_REPO, config=str(self.config), model=str(self.checkpoint)).to(device).eval()
        self.notes: list[str] = []
        try:
            self.pipeline = _kokoro_pipeline(lang_code, "misaki" if g2p == "auto" else g2p, model)
        except ResourceError as exc:
            if g2p != "auto":
                raise
            self.notes.append(f"Kokoro speaks English through espeak-ng's phonemes, not the reference's misaki G2P: {exc}")
            self.pipeline = _kokoro_pipeline(lang_code, "espeak", model)

    def voice_path(self, voice: str) -> Path:
        """A voice name (``af_heart``), or a ``.pt`` path as the reference's requests give them
        (``weights/Kokoro-82M/voices/af_heart.pt``, relative to the reference's checkout): where that
        path does not exist here, the voice of the same name in this folder."""
        path = Path(voice)
        if path.suffix != ".pt" or not path.is_file():
            path = self.weights_dir / "voices" / f"{path.stem if path.suffix == '.pt' else voice}.pt"
        if not path.is_file():
            raise InputError(f"Kokoro voice {path} does not exist (voices are in {self.weights_dir / 'voices'}).")
        return path

    def synthesize(self, text: str, voice: str | None = None) -> tuple[np.ndarray, int]:
        import torch

        pack = torch.load(self.voice_path(voice or self.default_voices[0]), map_location="cpu", weights_only=True)
        pieces = []
        for result in self.pipeline(text, voice=pack, speed=1, split_pattern=r"\n+"):
            audio = result.audio if hasattr(result, "audio") else result[2]
            if audio is not None:
                pieces.append(audio.detach().float().cpu().numpy().reshape(-1))
        samples = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        return samples.astype(np.float32), self.sample_rate


class _EspeakEnglish:
    """misaki's espeak-ng English as a whole-text G2P, ``g2p(text) -> (phonemes, None)``, the call
    Kokoro's espeak branch makes. misaki's ``EspeakFallback`` (rather than its generic ``EspeakG2P``)
    maps espeak-ng's English phonemes to the symbols misaki's lexicon, and so Kokoro's English
    voices, use (``O`` for oʊ, no length marks in US English, flap as ``T``)."""

    def __init__(self, british: bool):
        from misaki.espeak import EspeakFallback

        self.fallback = EspeakFallback(british=british)

    def __call__(self, text: str) -> tuple[str, None]:
        from types import SimpleNamespace

        phonemes, _ = self.fallback(SimpleNamespace(text=text))  # it reads only the token's text
        return phonemes or "", None


def _kokoro_pipeline(lang_code: str, g2p: str, model: kokoro.KModel | bool) -> kokoro.KPipeline:
    """A ``KPipeline`` over ``model`` (False: phonemes only); for English with ``g2p="espeak"``, one on espeak-ng."""
    from kokoro import KPipeline

    english = lang_code.lower() in ("a", "b", "en-us", "en-gb")
    if g2p == "espeak" and english:
        # KPipeline always builds misaki's spaCy G2P for 'a'/'b' and takes no other, so build it for
        # an espeak language (Spanish: cheap, offline) and give it the English espeak G2P: its espeak
        # branch (chunks of at most 400 characters, 510 phonemes) then speaks English.
        pipeline = KPipeline(lang_code="e", repo_id=KOKORO_REPO, model=model)
        pipeline.g2p = _EspeakEnglish(british=lang_code.lower() in ("b", "en-gb"))
        return pipeline
    try:
        return KPipeline(lang_code=lang_code, repo_id=KOKORO_REPO, model=model)
    except (OSError, SystemExit) as exc:  # spaCy's download: requests' errors are OSErrors; pip's exit
        if not english:
            raise
        raise ResourceError(
            "Kokoro's English G2P needs spaCy's en_core_web_sm, which misaki could not download here "
            f"({type(exc).__name__}: {str(exc)[:120]}). Install it once with network (python -m spacy download "
            "en_core_web_sm), or use the espeak-ng G2P (g2p='espeak'), which works offline."
        ) from exc


def kokoro_available(weights_dir: str | Path | None) -> bool:
    if weights_dir is None:
        return False
    folder = Path(weights_dir)
    if not ((folder / "config.json").is_file() and (folder / "kokoro-v1_0.pth").is_file()):
        return False
    try:
        import kokoro  # noqa: F401
    except ImportError:
        return False
    return True


def get_backend(name: str = "auto", kokoro_dir: str | Path | None = None, g2p: str = "auto") -> TTSBackend:
    """``"kokoro"``, ``"espeak"``, or ``"auto"`` (Kokoro when usable, else espeak-ng); ``g2p`` is
    Kokoro's English G2P (see :class:`KokoroBackend`)."""
    if name == "kokoro" or (name == "auto" and kokoro_available(kokoro_dir)):
        if kokoro_dir is None:
            from talkgen.weights import manifest

            raise WeightsError(f"Kokoro TTS needs its weights folder; {manifest.KOKORO.advice()}.")
        return KokoroBackend(kokoro_dir, g2p=g2p)
    if name in ("espeak", "espeak-ng", "auto"):
        return EspeakBackend()
    raise InputError(f"Unknown TTS backend '{name}': choose auto, kokoro or espeak.")


# --------------------------------------------------------------------------------------------
# Scripts


def parse_script(text: str) -> list[tuple[int, str]]:
    """``"(s1) Hi. (s2) Hello!"`` -> ``[(1, "Hi."), (2, "Hello!")]`` with the reference's regex."""
    return [(int(speaker), content) for speaker, content in SPEAKER_PATTERN.findall(text)]


@dataclass
class Dialogue:
    """Two speakers' tracks, equally long and taking turns, and their sum (the soundtrack)."""

    track1: np.ndarray
    track2: np.ndarray
    mix: np.ndarray
    rate: int
    turns: list[tuple[int, int, int]]  # (speaker, start sample, end sample)


def synthesize_single(text: str, backend: TTSBackend, voice: str | None = None) -> tuple[np.ndarray, int]:
    """One voice speaks the whole text (the reference's ``process_tts_single``)."""
    if not text.strip():
        raise InputError("The TTS text is empty.")
    samples, rate = backend.synthesize(text, voice)
    if samples.size == 0:
        raise InputError(f"The TTS backend {backend.name} produced no audio for {text[:60]!r}.")
    return samples, rate


def synthesize_dialogue(
    text: str, backend: TTSBackend, voice1: str | None = None, voice2: str | None = None
) -> Dialogue:
    """Two voices from a ``(s1) ... (s2) ...`` script, turn by turn (``process_tts_multi``)."""
    voices = {1: voice1 or backend.default_voices[0], 2: voice2 or backend.default_voices[1]}
    segments = [(s, c) for s, c in parse_script(text) if s in voices]
    if not segments:
        raise InputError("A two-voice TTS script needs '(s1) ...' and '(s2) ...' markers, e.g. '(s1) Hi. (s2) Hello!'.")
    tracks: dict[int, list[np.ndarray]] = {1: [], 2: []}
    turns, position, rate = [], 0, None
    for speaker, content in segments:
        samples, seg_rate = backend.synthesize(content, voices[speaker])
        if rate is not None and seg_rate != rate:
            raise ResourceError(f"The TTS backend changed its sample rate mid-script ({rate} -> {seg_rate}).")
        rate = seg_rate
        samples = np.asarray(samples, dtype=np.float32)
        tracks[speaker].append(samples)
        tracks[3 - speaker].append(np.zeros_like(samples))
        turns.append((speaker, position, position + len(samples)))
        position += len(samples)
    track1, track2 = np.concatenate(tracks[1]), np.concatenate(tracks[2])
    return Dialogue(track1=track1, track2=track2, mix=track1 + track2, rate=int(rate), turns=turns)
