"""The tiny model end to end through `Pipeline.generate`: streaming, two speakers, boxes, video
dubbing, text-to-speech, LoRA and a quantized file. Each writes a real mp4 and checks that video
and speech have the same length."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from safetensors.torch import save_file

from talkgen.media.samples import sample_portrait, sample_speech
from talkgen.pipeline.pipeline import Pipeline
from talkgen.pipeline.request import GenerationRequest


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from talkgen.pipeline.tiny import ensure_tiny_weights

    return ensure_tiny_weights(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def multitalk(tiny_dir: Path) -> Pipeline:
    return Pipeline.from_pretrained(tiny_dir, "multitalk", device="cpu")


@pytest.fixture(scope="module")
def infinitetalk(tiny_dir: Path) -> Pipeline:
    return Pipeline.from_pretrained(tiny_dir, "infinitetalk", device="cpu")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    files = {}
    Image.fromarray(sample_portrait((400, 400))).save(files.setdefault("square", root / "square.png"))
    duo = np.concatenate([sample_portrait((360, 320)), sample_portrait((360, 320))[:, ::-1]], axis=1)
    Image.fromarray(duo).save(files.setdefault("duo", root / "duo.png"))
    for name, seconds in (("s1", 1.2), ("s2", 0.8), ("s30", 30.0)):
        sf.write(files.setdefault(name, root / f"{name}.wav"), sample_speech(seconds, 22_050), 22_050)
    return files


def probe(path: Path) -> tuple[int, float, float]:
    """Decoded video frames, video duration and audio duration in seconds."""
    with av.open(str(path)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    with av.open(str(path)) as container:
        audio = container.streams.audio[0]
        samples = sum(f.samples for f in container.decode(audio=0))
        audio_seconds = samples / audio.rate
    return frames, frames / 25, audio_seconds


def assert_in_sync(path: Path, frames: int) -> None:
    decoded, video_seconds, audio_seconds = probe(path)
    assert decoded == frames
    assert abs(audio_seconds - video_seconds) <= 1 / 25 + 1024 / 16_000, (audio_seconds, video_seconds)


def request(**values) -> GenerationRequest:
    values.setdefault("sample_steps", 1)
    values.setdefault("text_guide_scale", 1.0)  # 2 passes a step: the cheapest guidance
    return GenerationRequest.parse({k: str(v) if isinstance(v, Path) else v for k, v in values.items()})


def test_a_failed_stream_leaves_no_file_and_no_writer(multitalk, media, tmp_path: Path, monkeypatch) -> None:
    """The mp4 is encoded on a background thread while the next chunk is made; when a later chunk
    fails, the error reaches the caller, the writer thread ends and no file (final or partial) is
    left behind."""
    import threading

    real_stream = Pipeline.stream

    def failing_stream(self, *args, **kwargs):
        for chunk in real_stream(self, *args, **kwargs):
            yield chunk
            raise RuntimeError("the GPU fell off the bus")

    monkeypatch.setattr(Pipeline, "stream", failing_stream)
    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="fell off"):
        multitalk.generate(request(cond_image=media["square"], cond_audio={"person1": media["s1"]},
                                   mode="streaming", frame_num=9, motion_frame=5), out)
    assert list(tmp_path.iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name == "talkgen-mp4-writer"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["multitalk", "infinitetalk"])
def test_streaming_30_seconds(model: str, multitalk, infinitetalk, media, tmp_path: Path) -> None:
    pipe = multitalk if model == "multitalk" else infinitetalk
    pipe.bucket_divisor = 8  # 80x80 frames: the chunk loop is what is tested here, not the pixels
    chunks = []
    try:
        result = pipe.generate(request(cond_image=media["square"], cond_audio={"person1": media["s30"]}, mode="streaming"),
                               output=tmp_path / "long.mp4", on_chunk=lambda c: chunks.append((c.index, c.first_frame, len(c.frames))))
    finally:
        pipe.bucket_divisor = 4
    assert result.num_frames == 750  # 30 s of speech at 25 fps, no frame dropped or duplicated
    motion = 25 if model == "multitalk" else 9
    assert chunks[0] == (0, 0, 81)
    assert all(n == 81 - motion for _, _, n in chunks[1:-1])
    assert [first for _, first, _ in chunks] == [0] + [81 + (81 - motion) * k for k in range(len(chunks) - 1)]
    assert_in_sync(tmp_path / "long.mp4", 750)


@pytest.mark.parametrize("audio_type, frames", [("add", 50), ("para", 30)])
def test_two_speakers(audio_type: str, frames: int, multitalk, media, tmp_path: Path) -> None:
    out = tmp_path / f"{audio_type}.mp4"
    result = multitalk.generate(request(cond_image=media["duo"], audio_type=audio_type,
                                        cond_audio={"person1": media["s1"], "person2": media["s2"]}), output=out)
    assert result.num_frames == frames  # add: 1.2 s then 0.8 s; para: together, the longer one
    assert_in_sync(out, frames)


def test_two_speakers_with_boxes(multitalk, media, tmp_path: Path) -> None:
    boxes = {"person1": [20, 20, 340, 300], "person2": [20, 340, 340, 620]}
    out = tmp_path / "bbox.mp4"
    result = multitalk.generate(request(cond_image=media["duo"], audio_type="add", bbox=boxes,
                                        cond_audio={"person1": media["s1"], "person2": media["s2"]}), output=out)
    assert result.num_frames == 50
    assert_in_sync(out, 50)


def write_source_video(path: Path, frames: int = 40, size: tuple[int, int] = (120, 160)) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(25))
        stream.height, stream.width, stream.pix_fmt = *size, "yuv420p"
        for i in range(frames):
            pixels = np.zeros((*size, 3), np.uint8)
            pixels[:, : (i * 4) % size[1]] = (200, 120, 80)  # a bar that moves, so frames differ
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode(None))


def test_video_dubbing(infinitetalk, media, tmp_path: Path) -> None:
    source = tmp_path / "source.mp4"
    write_source_video(source)
    shown = []
    out = tmp_path / "dub.mp4"
    request_ = request(cond_video=source, cond_audio={"person1": media["s30"]}, mode="streaming", max_frames=120,
                       frame_num=33, motion_frame=9)
    original = infinitetalk.encode_image
    infinitetalk.encode_image = lambda frame, chunk=0: (shown.append(frame.clone()), original(frame, chunk))[1]
    try:
        result = infinitetalk.generate(request_, output=out)
    finally:
        infinitetalk.encode_image = original
    assert result.num_frames == 120  # capped by max_frames
    assert_in_sync(out, 120)
    # One reference frame per chunk, taken from the source at the chunk's start (24 frames apart);
    # past the source's 40 frames, its last frame.
    assert len(shown) == 5
    assert not torch.equal(shown[0], shown[1])
    assert torch.equal(shown[2], shown[3]) and torch.equal(shown[3], shown[4])


def test_a_video_needs_infinitetalk(multitalk, media, tmp_path: Path) -> None:
    from talkgen.errors import InputError

    source = tmp_path / "source.mp4"
    write_source_video(source, frames=5)
    with pytest.raises(InputError, match="infinitetalk"):
        multitalk.generate(request(cond_video=source, cond_audio={"person1": media["s1"]}))


@pytest.mark.parametrize("text, people", [("Hello, this is a test.", 1), ("(s1) Hello there. (s2) Hi! How are you?", 2)])
def test_text_to_speech_drives_the_video(text: str, people: int, multitalk, media, tmp_path: Path) -> None:
    out = tmp_path / "tts.mp4"
    image = media["duo"] if people == 2 else media["square"]
    result = multitalk.generate(request(cond_image=image, tts_audio={"text": text, "human1_voice": "af_heart",
                                                                      "human2_voice": "am_adam"}), output=out)
    expected = int(len(result.audio) / 22_050 * 25)  # espeak-ng speaks at 22.05 kHz
    assert abs(result.num_frames - min(expected, 81)) <= 1
    assert_in_sync(out, result.num_frames)


@pytest.mark.parametrize("style", ["down_up", "A_B_alpha"])
def test_lora_formats_through_the_pipeline(style: str, tiny_dir: Path, media, tmp_path: Path) -> None:
    base = Pipeline.from_pretrained(tiny_dir, "multitalk", device="cpu")
    weight = base.dit.blocks[0].self_attn.q.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, weight.shape[1], generator=g), torch.randn(weight.shape[0], 4, generator=g)
    if style == "down_up":
        tensors = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
                   "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up}
        factor = 0.5
    else:
        tensors = {"blocks.0.self_attn.q.lora_A.weight": down, "blocks.0.self_attn.q.lora_B.weight": up,
                   "blocks.0.self_attn.q.alpha": torch.tensor(2.0)}
        factor = 0.5 * 2.0 / 4
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path))
    pipe = Pipeline.from_pretrained(tiny_dir, "multitalk", device="cpu", loras=[(path, 0.5)])
    merged = pipe.dit.blocks[0].self_attn.q.weight
    assert torch.allclose(merged, weight + factor * up @ down, atol=1e-5)
    result = pipe.generate(request(cond_image=media["square"], cond_audio={"person1": media["s1"]}))
    assert result.num_frames == 30


def test_quantized_file_through_the_pipeline(tiny_dir: Path, multitalk, media, tmp_path: Path) -> None:
    from test_quant import write_quanto_file

    path, _ = write_quanto_file(multitalk.dit, "qint8", tmp_path / "dit_model_int8.safetensors", torch.float32)
    pipe = Pipeline.from_pretrained(tiny_dir, "multitalk", device="cpu", quant_file=path)
    rel = (pipe.dit.blocks[1].ffn[0].weight - multitalk.dit.blocks[1].ffn[0].weight).norm() / multitalk.dit.blocks[1].ffn[0].weight.norm()
    assert 0 < float(rel) < 1e-2  # int8 per-row rounding, nothing else
    result = pipe.generate(request(cond_image=media["square"], cond_audio={"person1": media["s1"]}))
    assert result.num_frames == 30
