"""Text to speech: espeak-ng speaks, two-voice scripts take turns as in the reference, Kokoro's
absence is a clear error."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

from talkgen.audio.tts import (
    EspeakBackend, KokoroBackend, get_backend, parse_script, synthesize_dialogue, synthesize_single,
)
from talkgen.errors import InputError, WeightsError

SENTENCE = "Welcome to multi talk, this is an audio driven video generation model for several people."


def frame_rms(samples: np.ndarray, rate: int, seconds: float = 0.05) -> np.ndarray:
    n = int(rate * seconds)
    frames = samples[: len(samples) // n * n].reshape(-1, n)
    return np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1))


def assert_speech(samples: np.ndarray, rate: int, words: int) -> None:
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert np.abs(samples).max() <= 1.0
    seconds = len(samples) / rate
    assert words / 5.0 < seconds < words / 1.2, f"{seconds:.2f} s for {words} words"  # 1.2-5 words per second
    rms = frame_rms(samples, rate)
    voiced = rms > 0.02
    assert voiced.mean() > 0.5, "mostly silent"
    assert (~voiced).any(), "speech has pauses between words"


@pytest.mark.parametrize("prefer", ["library", "program"])
def test_espeak_speaks(prefer: str) -> None:
    if prefer == "library":
        pytest.importorskip("espeakng_loader", reason="the espeakng-loader wheel is not installed")
    elif shutil.which("espeak-ng") is None:
        pytest.skip("the Debian espeak-ng program is not installed (apt-get install espeak-ng)")
    samples, rate = EspeakBackend(prefer=prefer).synthesize(SENTENCE)
    assert rate == 22050
    assert_speech(samples, rate, len(SENTENCE.split()))


def test_espeak_voices_differ_and_bad_voice_is_an_input_error() -> None:
    if not EspeakBackend.available():
        pytest.skip("no espeak-ng (wheel or program) here")
    backend = EspeakBackend()
    a, _ = backend.synthesize("Hello there.", "en-us+f3")
    b, _ = backend.synthesize("Hello there.", "en-us")
    assert len(a) != len(b) or not np.array_equal(a, b)
    with pytest.raises(InputError, match="voice"):
        backend.synthesize("Hello.", "xx-nonexistent-voice")


def test_parse_script_follows_the_reference_regex() -> None:
    text = "intro ignored (s1) do you know multi-talk? (s2) yes, I know it,\nthat's amazing! (s3) who? (s1)  Me too."
    assert parse_script(text) == [
        (1, "do you know multi-talk?"), (2, "yes, I know it,\nthat's amazing!"), (3, "who?"), (1, "Me too."),
    ]
    assert parse_script("no markers at all") == []


class ToneBackend:
    """Deterministic stand-in: a tone whose length depends on the text and the voice."""

    name = "tone"
    default_voices = ("low", "high")

    def synthesize(self, text, voice=None):
        n = 100 * len(text) + (7 if voice == "high" else 0)
        return (0.5 * np.sin(np.arange(n) * (0.1 if voice == "low" else 0.3))).astype(np.float32), 16000


def test_dialogue_takes_turns_with_zeros_of_the_others_length() -> None:
    dialogue = synthesize_dialogue("(s1) Hi there. (s2) Hello! (s1) Bye.", ToneBackend())
    lengths = [100 * len("Hi there."), 100 * len("Hello!") + 7, 100 * len("Bye.")]
    assert dialogue.rate == 16000
    assert len(dialogue.track1) == len(dialogue.track2) == len(dialogue.mix) == sum(lengths)
    starts = np.cumsum([0] + lengths)
    assert dialogue.turns == [(1, starts[0], starts[1]), (2, starts[1], starts[2]), (1, starts[2], starts[3])]
    for speaker, start, end in dialogue.turns:
        own, other = (dialogue.track1, dialogue.track2) if speaker == 1 else (dialogue.track2, dialogue.track1)
        assert np.abs(own[start:end]).max() > 0.4
        assert not other[start:end].any()
    assert np.array_equal(dialogue.mix, dialogue.track1 + dialogue.track2)
    low, _ = ToneBackend().synthesize("Hi there.", "low")
    assert np.array_equal(dialogue.track1[: len(low)], low)  # speaker 1 gets voice 1


def test_dialogue_with_espeak() -> None:
    if not EspeakBackend.available():
        pytest.skip("no espeak-ng (wheel or program) here")
    dialogue = synthesize_dialogue("(s1) Do you know multi talk? (s2) Yes, I know it, that is amazing!", EspeakBackend())
    (s1, a, b), (s2, c, d) = dialogue.turns
    assert (s1, s2, b) == (1, 2, c)
    assert_speech(dialogue.track1[a:b], dialogue.rate, 5)
    assert_speech(dialogue.track2[c:d], dialogue.rate, 7)
    assert not dialogue.track1[c:d].any() and not dialogue.track2[a:b].any()


def test_empty_inputs_are_input_errors() -> None:
    with pytest.raises(InputError, match="markers"):
        synthesize_dialogue("nobody speaks", ToneBackend())
    with pytest.raises(InputError, match="empty"):
        synthesize_single("  ", ToneBackend())
    samples, rate = synthesize_single("Hello.", ToneBackend(), "low")
    assert len(samples) == 600 and rate == 16000


def test_kokoro_without_weights_names_the_download(tmp_path) -> None:
    with pytest.raises(WeightsError, match=r"kokoro-v1_0\.pth|config\.json"):
        KokoroBackend(tmp_path / "Kokoro-82M")
    with pytest.raises(WeightsError, match="Kokoro-82M"):
        get_backend("kokoro")


def test_kokoro_without_the_package_is_a_clear_error(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "Kokoro-82M"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "kokoro-v1_0.pth").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "kokoro", None)  # import kokoro -> ImportError
    with pytest.raises(InputError, match="pip install kokoro"):
        KokoroBackend(folder)
    assert isinstance(get_backend("auto", folder), EspeakBackend)  # auto falls back to espeak-ng
    with pytest.raises(InputError, match="Unknown TTS backend"):
        get_backend("festival")
