"""MP4 writing (h264 + AAC in one pass), reading and probing; the synthetic speech sample."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from conftest import REPO_ROOT
from talkgen.errors import InputError, ResourceError
from talkgen.media import video as video_mod
from talkgen.media.samples import sample_portrait, sample_speech
from talkgen.media.video import fit_audio, probe_media, read_video, write_mp4

EXAMPLE_VIDEO = REPO_ROOT.parent / "shared" / "examples" / "single" / "ref_video.mp4"
SR = 16000
AAC_FRAME = 1024  # samples per AAC frame: the duration granularity of the audio stream


def _moving_portrait(num_frames: int, size: tuple[int, int] = (128, 96)) -> np.ndarray:
    base = sample_portrait(size)
    return np.stack([np.roll(base, shift=i, axis=1) for i in range(num_frames)])


def _decode_audio(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])


def test_write_mp4_streams_duration_and_frames(tmp_path: Path) -> None:
    frames = _moving_portrait(37)
    speech = sample_speech(2.0, SR)  # longer than 37 / 25 s: gets cut
    out = write_mp4(tmp_path / "clip.mp4", frames, speech, SR)
    info = probe_media(out)
    assert info.video.codec == "h264" and info.audio.codec == "aac"
    assert info.video.fps == 25 and info.video.frames == 37
    assert (info.video.width, info.video.height) == (96, 128)
    assert info.audio.sample_rate == SR and info.audio.channels == 1
    expected = 37 / 25
    assert abs(info.video.duration - expected) < 1e-6
    assert abs(info.audio.duration - expected) <= AAC_FRAME / SR
    assert abs(info.duration - expected) <= AAC_FRAME / SR

    decoded, fps = read_video(out)
    assert decoded.shape == frames.shape and fps == 25
    # one generation of CRF 18 on a smooth drawing: close to the input
    assert np.abs(decoded.astype(np.int16) - frames).mean() < 3


def test_audio_is_padded_and_in_sync(tmp_path: Path) -> None:
    audio = np.zeros(SR // 2, np.float32)  # 0.5 s, shorter than the 2 s of video: gets padded
    onset = 4000
    audio[onset : onset + 800] = 0.5 * np.sin(2 * np.pi * 440 * np.arange(800) / SR)
    out = write_mp4(tmp_path / "sync.mp4", np.zeros((50, 64, 64, 3), np.uint8), audio, SR)
    info = probe_media(out)
    assert abs(info.audio.duration - 2.0) <= AAC_FRAME / SR
    decoded = _decode_audio(out)
    assert len(decoded) >= 2 * SR
    # the encoder delay is compensated: the tone starts where it started in the input
    assert abs(int(np.argmax(np.abs(decoded) > 0.1)) - onset) <= 8
    assert np.abs(decoded[SR:]).max() < 0.01  # the padding is silence


def test_odd_sizes_are_padded_to_even(tmp_path: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (5, 33, 47, 3), dtype=np.uint8)
    out = write_mp4(tmp_path / "odd.mp4", frames, None, SR)
    info = probe_media(out)
    assert (info.video.height, info.video.width) == (34, 48) and info.audio is None
    assert read_video(out)[0].shape == (5, 34, 48, 3)


def test_write_mp4_leaves_no_partial_file(tmp_path: Path) -> None:
    write_mp4(tmp_path / "sub" / "a.mp4", np.zeros((3, 16, 16, 3), np.uint8), sample_speech(0.2, SR), SR)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.mp4"]


def test_background_writer_writes_every_chunk_in_order(tmp_path: Path) -> None:
    expected = _moving_portrait(21)  # 21 distinct frames
    chunks = [expected[:9].copy(), expected[9:16].copy(), expected[16:].copy()]
    writer = video_mod.BackgroundWriter(video_mod.Mp4Writer(tmp_path / "queued.mp4", 96, 128, sample_speech(1.0, SR),
                                                            SR), depth=1)
    for frames in chunks:  # depth 1: the second write waits for the first chunk's turn
        writer.write(frames)
    writer.close()
    assert writer.frames_written == 21
    info = probe_media(tmp_path / "queued.mp4")
    assert info.video.frames == 21 and abs(info.audio.duration - 21 / 25) <= AAC_FRAME / SR
    decoded = read_video(tmp_path / "queued.mp4")[0].astype(np.int16)
    # every frame where it belongs (x264's output is not byte-reproducible here, even from one
    # thread, so the frames are compared by content): each decoded frame is nearest its own input
    distance = np.abs(decoded[:, None] - expected[None].astype(np.int16)).mean(axis=(2, 3, 4))
    assert (distance.argmin(axis=1) == np.arange(21)).all()
    assert distance.diagonal().max() < 3


def test_background_writer_raises_the_encoders_failure(tmp_path: Path) -> None:
    writer = video_mod.BackgroundWriter(video_mod.Mp4Writer(tmp_path / "bad.mp4", 64, 64, None, SR))
    writer.write(np.zeros((2, 64, 64), np.uint8))  # no channel axis: fails on the writer's thread
    with pytest.raises(ValueError, match="expected uint8 frames"):
        writer.close()
    writer.abort()  # the pipeline's error path after a failed close: no hang, no second error
    aborted = video_mod.BackgroundWriter(video_mod.Mp4Writer(tmp_path / "dropped.mp4", 64, 64, None, SR))
    aborted.write(np.zeros((3, 64, 64, 3), np.uint8))
    aborted.abort()
    assert not aborted._thread.is_alive()


def test_missing_encoder_is_a_resource_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(video_mod, "VIDEO_CODEC", "no_such_encoder")
    with pytest.raises(ResourceError, match="no_such_encoder encoder is missing"):
        write_mp4(tmp_path / "x.mp4", np.zeros((2, 16, 16, 3), np.uint8), None, SR)
    assert not (tmp_path / "x.mp4").exists()


def test_fit_audio() -> None:
    audio = np.ones(100, np.float32)
    assert len(fit_audio(audio, 81, SR)) == 81 * SR // 25
    assert fit_audio(np.ones(SR, np.float32), 5, SR).shape == (3200,)
    with pytest.raises(ValueError):
        fit_audio(np.ones((2, 100), np.float32), 5, SR)


def test_read_example_video() -> None:
    if not EXAMPLE_VIDEO.is_file():
        pytest.skip(f"{EXAMPLE_VIDEO} is not present")
    frames, fps = read_video(EXAMPLE_VIDEO, max_frames=12)
    assert frames.shape == (12, 458, 458, 3) and frames.dtype == np.uint8 and fps == 25
    info = probe_media(EXAMPLE_VIDEO)
    assert info.video.codec == "h264" and info.video.frames == 375 and info.video.duration == 15
    assert info.audio.codec == "aac" and info.audio.sample_rate == 44100


def test_unreadable_media_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "text.mp4").write_text("not a video")
    with pytest.raises(InputError, match=r"text\.mp4 cannot be read"):
        read_video(tmp_path / "text.mp4")
    with pytest.raises(InputError, match=r"text\.mp4 cannot be read"):
        probe_media(tmp_path / "text.mp4")
    with pytest.raises(InputError, match=r"missing\.mp4 does not exist"):
        read_video(tmp_path / "missing.mp4")
    # a file with audio only has no frames to read
    with av.open(str(tmp_path / "audio.m4a"), "w") as container:
        stream = container.add_stream("aac", rate=SR, layout="mono")
        frame = av.AudioFrame.from_ndarray(sample_speech(0.3, SR)[None], format="fltp", layout="mono")
        frame.sample_rate = SR
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(InputError, match="no video stream"):
        read_video(tmp_path / "audio.m4a")


def test_sample_speech_is_deterministic_and_speech_like() -> None:
    speech = sample_speech(3.0, SR)
    assert speech.shape == (3 * SR,) and speech.dtype == np.float32
    assert np.array_equal(speech, sample_speech(3.0, SR))
    assert 0.45 < np.abs(speech).max() <= 0.5
    # syllables: the 20 ms loudness rises and falls a few times per second, with real pauses
    frame = SR // 50
    rms = np.sqrt((speech[: len(speech) // frame * frame].reshape(-1, frame) ** 2).mean(axis=1))
    loud = rms > 0.25 * rms.max()
    onsets = np.count_nonzero(loud[1:] & ~loud[:-1])
    assert 6 <= onsets <= 15 and (rms < 0.01 * rms.max()).mean() > 0.1
    # voiced: most energy in the 100-4000 Hz speech band
    spectrum = np.abs(np.fft.rfft(speech)) ** 2
    freqs = np.fft.rfftfreq(len(speech), 1 / SR)
    assert spectrum[(freqs > 100) & (freqs < 4000)].sum() > 0.9 * spectrum.sum()


def test_live_segments_of_consecutive_chunks_play_as_one_stream(tmp_path: Path) -> None:
    """Chunks encoded one by one (as a streaming job makes them), remuxed into MPEG-TS segments with
    the packets of one AAC stream: video timestamps run on frame by frame across the joins, every
    audio packet starts where the one before ends, each segment holds its chunk's frames exactly."""
    from fractions import Fraction

    from talkgen.media.video import SEGMENT_CLOCK_START, AacTrack, write_ts_segment

    sizes, fps = [9, 8, 8, 5], 25
    total = sum(sizes)
    frames = _moving_portrait(total, (64, 48))
    speech = sample_speech(total / fps, SR)
    track = AacTrack(speech, SR, total, fps)
    video, audio, first = [], [], 0
    for n, size in enumerate(sizes):
        chunk = write_mp4(tmp_path / f"chunk{n}.mp4", frames[first:first + size], None, SR, b_frames=False)
        segment = write_ts_segment(tmp_path / f"seg{n}.ts", chunk, first, track, last=n == len(sizes) - 1)
        with av.open(str(segment)) as container:  # (packets are read while their container is open)
            assert container.format.name == "mpegts"
            for packet in container.demux():
                if packet.dts is not None:
                    times = video if packet.stream.type == "video" else audio
                    times.append(packet.pts * packet.time_base)
        same, _ = read_video(segment)
        assert np.array_equal(same, read_video(chunk)[0])  # the chunk's h264, not encoded again
        first += size
    assert video == [SEGMENT_CLOCK_START + Fraction(i, fps) for i in range(total)]
    step = Fraction(AAC_FRAME, SR)
    assert audio == [SEGMENT_CLOCK_START - step + i * step for i in range(len(audio))]  # priming first, no gaps
    assert audio[-1] + step >= SEGMENT_CLOCK_START + Fraction(total, fps)  # the audio covers the video


@pytest.mark.parametrize("codec,container", [("libsvtav1", "mp4"), ("libvpx-vp9", "webm"), ("mpeg4", "avi")])
def test_dubbing_sources_in_other_codecs_are_read(tmp_path: Path, codec: str, container: str) -> None:
    """Source videos to dub arrive as AV1 (phones, YouTube downloads), VP9 webm or old AVI: PyAV
    decodes them directly, with the frame count and fps the pipeline plans chunks from."""
    import av

    from talkgen.media.video import iter_video_frames, probe_media

    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    path = tmp_path / f"source.{container}"
    frames = np.zeros((12, 64, 96, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        frame[:, : 8 * (i + 1)] = 200  # a bar that grows one step a frame
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    info = probe_media(path)
    assert info.video.frames == 12 and round(info.video.fps) == 25
    decoded = np.stack(list(iter_video_frames(path)))
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 12  # lossy, but the same pictures
