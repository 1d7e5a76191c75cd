"""Kokoro TTS through the real ``kokoro`` library with random weights.

A ``Kokoro-82M`` folder in the released layout (``config.json`` as hexgrad/Kokoro-82M ships it,
``kokoro-v1_0.pth`` as per-module state dicts, ``voices/*.pt`` packs of [510, 1, 256]) is written
from a seed; ``KModel`` loads it and ``KPipeline`` speaks with it. English goes through misaki's
espeak-ng G2P (``g2p="espeak"``): the reference's G2P needs spaCy's ``en_core_web_sm``, which misaki
fetches from GitHub at run time and these machines cannot reach.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("kokoro", reason="the 'kokoro' package is not installed (pip install 'kokoro>=0.9.4,<0.10')")

from talkgen.audio.tts import (  # noqa: E402 (after the skip: these tests need kokoro)
    KOKORO_REPO, KokoroBackend, _kokoro_pipeline, get_backend, kokoro_available, synthesize_dialogue,
)
from talkgen.errors import InputError, ResourceError  # noqa: E402

pytestmark = pytest.mark.slow  # Kokoro-82M built twice (written, then loaded) and ~5 s of speech decoded

# hexgrad/Kokoro-82M's config.json "vocab": phoneme symbol -> token id (0 is the pad/boundary).
VOCAB = {
    ";": 1, ":": 2, ",": 3, ".": 4, "!": 5, "?": 6, "—": 9, "…": 10, '"': 11, "(": 12, ")": 13, "“": 14, "”": 15,
    " ": 16, "\u0303": 17, "ʣ": 18, "ʥ": 19, "ʦ": 20, "ʨ": 21, "ᵝ": 22, "\uab67": 23, "A": 24, "I": 25, "O": 31,
    "Q": 33, "S": 35, "T": 36, "W": 39, "Y": 41, "ᵊ": 42, "a": 43, "b": 44, "c": 45, "d": 46, "e": 47, "f": 48,
    "h": 50, "i": 51, "j": 52, "k": 53, "l": 54, "m": 55, "n": 56, "o": 57, "p": 58, "q": 59, "r": 60, "s": 61,
    "t": 62, "u": 63, "v": 64, "w": 65, "x": 66, "y": 67, "z": 68, "ɑ": 69, "ɐ": 70, "ɒ": 71, "æ": 72, "β": 75,
    "ɔ": 76, "ɕ": 77, "ç": 78, "ɖ": 80, "ð": 81, "ʤ": 82, "ə": 83, "ɚ": 85, "ɛ": 86, "ɜ": 87, "ɟ": 90, "ɡ": 92,
    "ɥ": 99, "ɨ": 101, "ɪ": 102, "ʝ": 103, "ɯ": 110, "ɰ": 111, "ŋ": 112, "ɳ": 113, "ɲ": 114, "ɴ": 115, "ø": 116,
    "ɸ": 118, "θ": 119, "œ": 120, "ɹ": 123, "ɾ": 125, "ɻ": 126, "ʁ": 128, "ɽ": 129, "ʂ": 130, "ʃ": 131, "ʈ": 132,
    "ʧ": 133, "ʊ": 135, "ʋ": 136, "ʌ": 138, "ɣ": 139, "ɤ": 140, "χ": 142, "ʎ": 143, "ʒ": 147, "ʔ": 148, "ˈ": 156,
    "ˌ": 157, "ː": 158, "ʰ": 162, "ʲ": 164, "↓": 169, "→": 171, "↗": 172, "↘": 173, "ᵻ": 177,
}

# hexgrad/Kokoro-82M's config.json, sizes as released (81.8M parameters). They cannot shrink much:
# the decoder's 1024/512 channels and the voice pack's 128 + 128 split are fixed in kokoro's code.
CONFIG = {
    "istftnet": {
        "upsample_kernel_sizes": [20, 12], "upsample_rates": [10, 6], "gen_istft_hop_size": 5,
        "gen_istft_n_fft": 20, "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        "resblock_kernel_sizes": [3, 7, 11], "upsample_initial_channel": 512,
    },
    "dim_in": 64, "dropout": 0.2, "hidden_dim": 512, "max_conv_dim": 512, "max_dur": 50, "multispeaker": True,
    "n_layer": 3, "n_mels": 80, "n_token": 178, "style_dim": 128, "text_encoder_kernel_size": 5,
    "plbert": {
        "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 2048, "max_position_embeddings": 512,
        "num_hidden_layers": 12, "dropout": 0.1,
    },
    "vocab": VOCAB,
}

VOICES = ("af_heart", "am_adam")  # KokoroBackend's default voices, so scripts without voices work
FRAMES_PER_PHONEME = 3  # 75 ms at Kokoro's 40 frames/s: a speaking pace, and short audio to decode on CPU
SAMPLES_PER_FRAME = 600  # 24 kHz / 40 frames per second


def write_kokoro_folder(folder: Path, seed: int = 0, voices: tuple[str, ...] = VOICES) -> Path:
    """A ``Kokoro-82M`` folder with random weights in the released layout, the same for a seed."""
    from kokoro import KModel

    (folder / "voices").mkdir(parents=True, exist_ok=True)
    config, checkpoint = folder / "config.json", folder / "kokoro-v1_0.pth"
    config.write_text(json.dumps(CONFIG, ensure_ascii=False, indent=2), encoding="utf-8")
    torch.save({}, checkpoint)  # KModel downloads when given no file: an empty one leaves its random init
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = KModel(repo_id=KOKORO_REPO, config=str(config), model=str(checkpoint))
    with torch.no_grad():
        # Untrained, every phoneme would last sigmoid(0) * max_dur = 25 frames (0.6 s): slow to decode
        # and nothing like speech. This bias makes it FRAMES_PER_PHONEME.
        model.predictor.duration_proj.linear_layer.bias.fill_(-math.log(CONFIG["max_dur"] / FRAMES_PER_PHONEME - 1))
    # As released: one state dict per top-level module, keys with DataParallel's "module." prefix
    # (KModel's strict load fails on them and it retries without the prefix).
    torch.save({name: {f"module.{k}": v for k, v in child.state_dict().items()}
                for name, child in model.named_children()}, checkpoint)
    generator = torch.Generator().manual_seed(seed + 1)
    for voice in voices:  # one style vector (128 timbre + 128 prosody) per phoneme count up to 510
        torch.save(torch.randn(510, 1, 256, generator=generator), folder / "voices" / f"{voice}.pt")
    return folder


@pytest.fixture(scope="module")
def kokoro_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = write_kokoro_folder(tmp_path_factory.mktemp("kokoro") / "Kokoro-82M")
    yield folder
    shutil.rmtree(folder)  # 330 MB of weights: not left behind in pytest's kept temp folders


@pytest.fixture(scope="module")
def backend(kokoro_folder: Path) -> KokoroBackend:
    chosen = get_backend("auto", kokoro_folder, g2p="espeak")
    assert isinstance(chosen, KokoroBackend), f"auto chose {type(chosen).__name__} over a complete Kokoro folder"
    return chosen


def speech_frames(samples: np.ndarray) -> int:
    assert len(samples) % SAMPLES_PER_FRAME == 0, len(samples)
    return len(samples) // SAMPLES_PER_FRAME


def test_auto_picks_kokoro_and_loads_the_released_layout(kokoro_folder: Path, backend: KokoroBackend) -> None:
    assert kokoro_available(kokoro_folder)
    assert backend.name == "kokoro" and backend.sample_rate == 24000
    saved = torch.load(kokoro_folder / "kokoro-v1_0.pth", map_location="cpu", weights_only=True)
    model = backend.pipeline.model
    assert sorted(saved) == ["bert", "bert_encoder", "decoder", "predictor", "text_encoder"]
    assert sum(p.numel() for p in model.parameters()) > 80e6  # Kokoro-82M's size
    for name, state in saved.items():  # every tensor arrived (KModel's fallback load is not strict)
        loaded = getattr(model, name).state_dict()
        assert sorted(loaded) == sorted(k.removeprefix("module.") for k in state)
        for key, value in state.items():
            assert torch.equal(loaded[key.removeprefix("module.")].cpu(), value), f"{name}.{key}"
    pack = torch.load(backend.voice_path("af_heart"), weights_only=True)
    assert pack.shape == (510, 1, 256) and pack.dtype == torch.float32


def test_kokoro_speaks_at_24_khz_longer_for_longer_text(backend: KokoroBackend) -> None:
    short, rate = backend.synthesize("Hello.")
    long, long_rate = backend.synthesize("Hello there, how are you today?")
    assert rate == long_rate == 24000
    for samples in (short, long):
        assert samples.dtype == np.float32 and samples.ndim == 1 and samples.size > 0
        assert np.isfinite(samples).all() and np.abs(samples).max() > 0
    # Every phoneme (and the two boundary tokens) lasts FRAMES_PER_PHONEME frames of 600 samples.
    phonemes, _ = backend.pipeline.g2p("Hello.")
    assert phonemes == "həlˈO."  # misaki's espeak-ng English: its symbols (O for oʊ), not espeak's IPA
    assert speech_frames(short) == FRAMES_PER_PHONEME * (len(phonemes) + 2)
    assert speech_frames(long) > 3 * speech_frames(short)


def test_kokoro_dialogue_takes_turns_with_two_voices(backend: KokoroBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    voices: list[str] = []
    voice_path = backend.voice_path
    monkeypatch.setattr(backend, "voice_path", lambda voice: voices.append(voice) or voice_path(voice))
    dialogue = synthesize_dialogue("(s1) Hi there. (s2) Hello, Kokoro!", backend)
    assert voices == list(VOICES)  # the default voices, speaker 1 then speaker 2
    assert dialogue.rate == 24000
    assert len(dialogue.track1) == len(dialogue.track2) == len(dialogue.mix)
    (s1, a, b), (s2, c, d) = dialogue.turns
    assert (s1, s2, a, b, d) == (1, 2, 0, c, len(dialogue.mix))
    assert np.isfinite(dialogue.mix).all()
    assert np.abs(dialogue.track1[a:b]).max() > 0 and not dialogue.track2[a:b].any()
    assert np.abs(dialogue.track2[c:d]).max() > 0 and not dialogue.track1[c:d].any()
    for text, start, end in (("Hi there.", a, b), ("Hello, Kokoro!", c, d)):  # each turn as long as its line
        assert speech_frames(dialogue.mix[start:end]) == FRAMES_PER_PHONEME * (len(backend.pipeline.g2p(text)[0]) + 2)


def test_reference_g2p_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without spaCy's en_core_web_sm, misaki downloads it; offline that fails and we say what to do."""
    import spacy.cli
    import spacy.util

    def offline(name: str, *args, **kwargs) -> None:
        raise ConnectionError(f"cannot fetch {name}")  # a builtin OSError, as requests' errors are

    monkeypatch.setattr(spacy.util, "is_package", lambda name: False)
    monkeypatch.setattr(spacy.cli, "download", offline)
    with pytest.raises(ResourceError, match=r"en_core_web_sm.*g2p='espeak'"):
        _kokoro_pipeline("a", "misaki", model=False)


def spacy_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine that cannot reach GitHub: no en_core_web_sm, and its download fails. (Left
    alone, misaki would pip-install the model into the environment wherever GitHub is reachable.)"""
    import spacy.cli
    import spacy.util

    def offline(name: str, *args, **kwargs) -> None:
        raise ConnectionError(f"cannot fetch {name}")

    monkeypatch.setattr(spacy.util, "is_package", lambda name: False)
    monkeypatch.setattr(spacy.cli, "download", offline)


def test_auto_g2p_falls_back_to_espeak_and_says_so(kokoro_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spacy_offline(monkeypatch)
    chosen = KokoroBackend(kokoro_folder)  # g2p "auto": misaki as the reference, else espeak-ng
    assert chosen.pipeline.g2p("Hello.")[0] == "həlˈO."
    assert len(chosen.notes) == 1 and "espeak-ng" in chosen.notes[0] and "en_core_web_sm" in chosen.notes[0]


def test_reference_voice_paths_find_the_voices_here(backend: KokoroBackend, kokoro_folder: Path) -> None:
    """The reference's requests name voices as paths in its own checkout."""
    assert backend.voice_path("weights/Kokoro-82M/voices/am_adam.pt") == kokoro_folder / "voices" / "am_adam.pt"
    assert backend.voice_path(str(kokoro_folder / "voices" / "af_heart.pt")) == kokoro_folder / "voices" / "af_heart.pt"
    with pytest.raises(InputError, match="bf_nobody"):
        backend.voice_path("weights/Kokoro-82M/voices/bf_nobody.pt")


def test_pipeline_speaks_with_kokoro_from_the_weights_folder(kokoro_folder: Path, tmp_path_factory: pytest.TempPathFactory,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``WEIGHTS/Kokoro-82M`` complete -> text-to-speech is Kokoro's (24 kHz), for the reference's
    two-voice request as it is (voices as its paths), and the video lasts as long as the speech."""
    from PIL import Image

    from talkgen.media.samples import sample_portrait
    from talkgen.pipeline.pipeline import Pipeline
    from talkgen.pipeline.request import GenerationRequest
    from talkgen.pipeline.tiny import ensure_tiny_weights

    spacy_offline(monkeypatch)
    weights = ensure_tiny_weights(tmp_path_factory.mktemp("tiny"))
    (weights / "Kokoro-82M").symlink_to(kokoro_folder, target_is_directory=True)
    image = tmp_path_factory.mktemp("media") / "duo.png"
    Image.fromarray(np.concatenate([sample_portrait((160, 144)), sample_portrait((160, 144))[:, ::-1]], axis=1)).save(image)
    pipe = Pipeline.from_pretrained(weights, "multitalk", device="cpu")
    request = GenerationRequest.parse({
        "prompt": "Two people talk", "cond_image": str(image), "cond_audio": {}, "audio_type": "para",
        "tts_audio": {"text": "(s1) Hi. (s2) Hello!", "human1_voice": "weights/Kokoro-82M/voices/af_heart.pt",
                      "human2_voice": "weights/Kokoro-82M/voices/am_adam.pt"},
        "sample_steps": 1, "frame_num": 81,
    })
    result = pipe.generate(request)
    assert any(note == "speech from text by kokoro" for note in result.notes), result.notes
    phonemes = sum(len(pipe.tts_backend().pipeline.g2p(text)[0]) + 2 for text in ("Hi.", "Hello!"))
    assert len(result.audio) == phonemes * FRAMES_PER_PHONEME * SAMPLES_PER_FRAME  # Kokoro's 24 kHz, both turns
    assert abs(result.num_frames - len(result.audio) / 24000 * 25) <= 1
    assert pipe.tts_backend() is pipe.tts_backend()  # built once per pipeline
