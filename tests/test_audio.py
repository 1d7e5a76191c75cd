"""Speech loading and wav2vec2 features against the reference's golden outputs."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import golden_params, read_golden, rel_err
from talkgen.audio import combine_speakers, load_speech, loudness_normalise, read_audio, write_mix
from talkgen.errors import InputError, WeightsError
from talkgen.models.audio_encoder import AudioEncoder, frame_count, write_tiny_wav2vec2

TOLERANCE = 1e-4


@pytest.fixture(params=golden_params("audio_"))
def golden(request):
    path: Path = request.param
    tensors, meta = read_golden(path)
    stem = path.name.removesuffix(".safetensors")
    return tensors, path.with_name(f"{stem}_speech.wav"), path.with_name(f"{stem}_wav2vec2")


# --- against the reference ---------------------------------------------------------------------


def test_load_speech_matches_reference(golden):
    tensors, wav, _ = golden
    reference = tensors["speech_16k"].numpy()
    ours = load_speech(wav)
    assert ours.dtype == np.float32 and ours.ndim == 1
    assert abs(len(ours) - len(reference)) <= 4
    n = min(len(ours), len(reference))
    assert np.corrcoef(ours[:n], reference[:n])[0, 1] > 0.99


def test_embedding_matches_reference(golden):
    tensors, _, model_dir = golden
    encoder = AudioEncoder.from_pretrained(model_dir)
    embedding = encoder.embed(tensors["speech_16k"].numpy())
    expected = tensors["expected.embedding"]
    assert embedding.shape == expected.shape
    assert rel_err(embedding, expected) <= TOLERANCE


def test_chunked_cnn_matches_reference(golden):
    """Long-audio path (CNN over time slices, global GroupNorm statistics) forced on short audio."""
    tensors, _, model_dir = golden
    encoder = AudioEncoder.from_pretrained(model_dir, cnn_chunk_seconds=0.25)
    embedding = encoder.embed(tensors["speech_16k"].numpy())
    assert rel_err(embedding, tensors["expected.embedding"]) <= TOLERANCE


# --- the encoder on its own --------------------------------------------------------------------


def test_frame_count_is_floored_seconds_times_25():
    assert frame_count(16000) == 25
    assert frame_count(16000 * 4 + 639) == 100  # 100.998 frames -> 100
    assert frame_count(639) == 0


def test_tiny_wav2vec2_round_trip(tmp_path):
    write_tiny_wav2vec2(tmp_path / "a", seed=0)
    write_tiny_wav2vec2(tmp_path / "b", seed=0)
    encoder = AudioEncoder.from_pretrained(tmp_path / "a")
    speech = _speech_like(16000 * 2)
    first = encoder.embed(speech)
    second = AudioEncoder.from_pretrained(tmp_path / "b").embed(speech)
    assert first.shape == (50, 3, 32)
    assert torch.isfinite(first).all() and 0.1 < first.std() < 10
    assert torch.equal(first, second)
    assert encoder.embed(speech[:500]).shape == (0, 3, 32)  # under one video frame


def test_pretraining_layout_bin_loads(tmp_path):
    """A ``pytorch_model.bin`` as Wav2Vec2ForPreTraining saved it by older transformers:
    ``wav2vec2.`` prefix, ``weight_g``/``weight_v`` weight norm, quantizer heads to skip."""
    from safetensors.torch import load_file

    directory = write_tiny_wav2vec2(tmp_path / "w2v")
    state = load_file(directory / "model.safetensors")
    legacy = {
        "wav2vec2." + k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in state.items()
    }
    legacy["quantizer.codevectors"] = torch.zeros(1, 4, 8)
    legacy["project_q.weight"] = torch.zeros(4, 4)
    speech = _speech_like(16000)
    expected = AudioEncoder.from_pretrained(directory).embed(speech)
    (directory / "model.safetensors").unlink()
    torch.save(legacy, directory / "pytorch_model.bin")
    assert torch.equal(AudioEncoder.from_pretrained(directory).embed(speech), expected)


def test_missing_weights_are_weights_errors(tmp_path):
    directory = write_tiny_wav2vec2(tmp_path / "w2v")
    (directory / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="model.safetensors"):
        AudioEncoder.from_pretrained(directory)


# --- reading files -----------------------------------------------------------------------------


def test_resamples_to_16k_and_normalises_loudness(tmp_path):
    path = tmp_path / "speech.flac"
    sf.write(path, 0.05 * _speech_like(44100 * 2, rate=44100), 44100)
    speech = load_speech(path)
    assert abs(len(speech) - 32000) <= 1
    import pyloudnorm

    assert abs(pyloudnorm.Meter(16000).integrated_loudness(speech) + 23) < 0.1


@pytest.mark.parametrize(
    "suffix, container, codec", [(".mp4", "mp4", "aac"), (".m4a", "ipod", "aac"), (".mkv", "matroska", "libopus")]
)
def test_reads_audio_of_containers(tmp_path, suffix, container, codec):
    path = tmp_path / f"talk{suffix}"
    rate = 48000
    _write_media(path, container, audio=_speech_like(rate * 2, rate=rate), rate=rate, codec=codec, video=True)
    speech = load_speech(path)
    assert speech.dtype == np.float32
    assert abs(len(speech) - 32000) < 0.05 * 32000  # encoder padding/priming moves a few ms
    assert np.isfinite(speech).all() and speech.std() > 0.01


def test_text_file_named_wav_is_input_error(tmp_path):
    path = tmp_path / "speech.wav"
    path.write_text("this is not audio\n" * 20)
    with pytest.raises(InputError, match="speech.wav"):
        load_speech(path)


def test_zero_length_wav_is_input_error(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(InputError, match="no samples"):
        load_speech(path)


def test_missing_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_speech(tmp_path / "nowhere.wav")


def test_video_without_sound_is_input_error(tmp_path):
    path = tmp_path / "silent_film.mp4"
    _write_media(path, "mp4", audio=None, video=True)
    with pytest.raises(InputError, match="no audio stream"):
        read_audio(path)


def test_loudness_leaves_silence_and_short_clips_alone():
    silence = np.zeros(16000, dtype=np.float32)
    assert np.array_equal(loudness_normalise(silence), silence)
    short = 0.1 * _speech_like(3000)  # under pyloudnorm's 400 ms block
    assert np.array_equal(loudness_normalise(short), short)


# --- two speakers ------------------------------------------------------------------------------


def test_add_takes_turns():
    a, b = np.ones(3, np.float32), 2 * np.ones(5, np.float32)
    t1, t2, mix = combine_speakers(a, b, "add")
    assert t1.shape == t2.shape == mix.shape == (8,)
    assert np.array_equal(t1, [1, 1, 1, 0, 0, 0, 0, 0])
    assert np.array_equal(t2, [0, 0, 0, 2, 2, 2, 2, 2])
    assert np.array_equal(mix, t1 + t2)


def test_para_overlaps_and_pads_the_shorter():
    a, b = np.ones(3, np.float32), 2 * np.ones(5, np.float32)
    t1, t2, mix = combine_speakers(a, b, "para")
    assert t1.shape == t2.shape == mix.shape == (5,)
    assert np.array_equal(mix, [3, 3, 3, 2, 2])


def test_missing_speaker_is_silence_and_bad_type_is_error():
    a = np.ones(4, np.float32)
    t1, t2, mix = combine_speakers(None, a, "para")
    assert np.array_equal(t1, np.zeros(4)) and np.array_equal(mix, a)
    with pytest.raises(InputError, match="audio_type"):
        combine_speakers(a, a, "both")


def test_write_mix_keeps_values_above_one(tmp_path):
    mix = np.array([0.0, 1.5, -1.2], dtype=np.float32)
    data, rate = sf.read(write_mix(tmp_path / "sum.wav", mix), dtype="float32")
    assert rate == 16000 and np.allclose(data, mix)


# --- helpers -----------------------------------------------------------------------------------


def _speech_like(n: int, rate: int = 16000) -> np.ndarray:
    """A deterministic voiced-sounding signal: harmonics of a wobbling pitch under a syllable envelope."""
    t = np.arange(n) / rate
    pitch = 140 + 20 * np.sin(2 * np.pi * 3 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    return (0.3 * voice * envelope).astype(np.float32)


def _write_media(
    path: Path, container: str, audio: np.ndarray | None, rate: int = 48000, codec: str = "aac", video: bool = False
) -> None:
    """A small file written with PyAV: optionally 1 s of grey video, optionally mono speech."""
    with av.open(str(path), mode="w", format=container) as out:
        # Every stream must exist before the first packet: the header is written then.
        picture = out.add_stream("mpeg4", rate=25) if video else None
        sound = out.add_stream(codec, rate=rate, layout="mono") if audio is not None else None
        if picture is not None:
            picture.width, picture.height, picture.pix_fmt = 32, 32, "yuv420p"
            for i in range(25):
                frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 128, np.uint8), format="rgb24")
                frame.pts = i
                out.mux(picture.encode(frame))
            out.mux(picture.encode(None))
        if sound is not None:
            frame = av.AudioFrame.from_ndarray(audio[None, :].astype(np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
            out.mux(sound.encode(frame))
            out.mux(sound.encode(None))
