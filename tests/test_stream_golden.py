"""Long videos chunk by chunk against the reference (stream_* golden files): MultiTalk's
re-noised context frames, InfiniteTalk's clean context and per-chunk reference frame, colour
matching between chunks, the mirrored audio tail of the last chunk, and video dubbing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from talkgen.media.image import choose_bucket, person_masks
from talkgen.pipeline.chunks import RecordedNoise, StillImage, VideoFrames
from talkgen.pipeline.pipeline import BucketedFrames, StreamOptions
from talkgen.sampling.guidance import GuidanceConfig

from conftest import golden_params, meta_json, read_golden, rel_err
from test_pipeline_golden import case_inputs, golden_pipeline


def recorded_noise(inputs: dict) -> RecordedNoise:
    chunks, motion = {}, {}
    for key, value in inputs.items():
        parts = key.split(".")
        if parts[0] == "noise":
            chunks[int(parts[1].removeprefix("chunk"))] = value
        elif parts[0] == "motion_noise":
            motion[(int(parts[1].removeprefix("chunk")), int(parts[2].removeprefix("draw")))] = value
    return RecordedNoise(chunks, motion)


@pytest.mark.slow
@pytest.mark.parametrize("path", golden_params("stream_"))
def test_streams_match_reference(path: Path, tmp_path: Path) -> None:
    tensors, meta = read_golden(path)
    pipe = golden_pipeline(meta, tmp_path)
    for case, o in meta_json(meta, "cases").items():
        inputs = case_inputs(tensors, case)
        pipe.model = o["model"]
        if o["input"] == "video":
            source = VideoFrames(frames=inputs["video_rgb"].numpy())
        else:
            source = StillImage(inputs["image_rgb"].numpy())
        tier = int(o["bucket_family"].rsplit("-", 1)[1])
        target = choose_bucket(*source.size, tier)
        people = o["people"]
        masks = person_masks(*source.size, target, people, o.get("bbox")) if people == 2 else None
        shown = {}

        def encode_image(frame: torch.Tensor, chunk: int) -> torch.Tensor:
            shown[chunk] = ((frame.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
            return inputs[f"clip_tokens.chunk{chunk}"]

        options = StreamOptions(
            frame_num=o["frame_num"], motion_frames=o["motion_frame"], streaming=True, max_frames=o["max_frames_num"],
            steps=o["steps"], shift=o["shift"], guidance=GuidanceConfig(o["text"], o["audio"]),
            color_strength=o["color"], tier=tier,
        )
        chunks = list(pipe.stream(
            BucketedFrames(source, target), [inputs[f"audio_emb.person{i + 1}"] for i in range(people)],
            context=inputs["context"], context_null=inputs["context_null"], options=options,
            person_masks=masks, noise=recorded_noise(inputs), encode_image=encode_image,
        ))
        assert len(chunks) == o["chunks"], case
        for chunk in chunks:
            err = rel_err(chunk.latent, tensors[f"{case}.expected.latent.chunk{chunk.index}"])
            assert err <= 1e-4, f"{case} chunk {chunk.index}: rel err {err:.2e}"
            expected_frame = tensors[f"{case}.debug.image_encoder_frame.chunk{chunk.index}"]
            assert (shown[chunk.index].int() - expected_frame.int()).abs().max() <= 1, f"{case} chunk {chunk.index}"
        # Our video lasts as long as the speech (the reference MultiTalk trims 3 frames short).
        frames = sum(len(c.frames) for c in chunks)
        assert frames == min(o["audio_len"], o["max_frames_num"])
        if o["model"] == "infinitetalk":
            assert frames == int(tensors[f"{case}.expected.num_frames"])


@pytest.mark.slow
@pytest.mark.parametrize("path", golden_params("stream_multitalk"))
def test_resuming_after_a_chunk_gives_the_same_stream(path: Path, tmp_path: Path) -> None:
    """A stream resumed from a finished chunk's state continues exactly as it would have."""
    tensors, meta = read_golden(path)
    pipe = golden_pipeline(meta, tmp_path)
    case, o = next(iter(meta_json(meta, "cases").items()))
    inputs = case_inputs(tensors, case)
    pipe.model = o["model"]
    source = StillImage(inputs["image_rgb"].numpy())
    target = choose_bucket(*source.size, 480)
    options = StreamOptions(frame_num=o["frame_num"], motion_frames=o["motion_frame"], streaming=True,
                            steps=o["steps"], shift=o["shift"], guidance=GuidanceConfig(o["text"], o["audio"]),
                            color_strength=o["color"])
    kwargs = dict(context=inputs["context"], context_null=inputs["context_null"], options=options,
                  noise=recorded_noise(inputs), encode_image=lambda frame, chunk: inputs[f"clip_tokens.chunk{chunk}"])
    audio = [inputs["audio_emb.person1"]]
    full = list(pipe.stream(BucketedFrames(source, target), audio, **kwargs))
    resumed = list(pipe.stream(BucketedFrames(source, target), audio, resume=full[0].state, **kwargs))
    assert [c.index for c in resumed] == [c.index for c in full[1:]]
    for a, b in zip(full[1:], resumed):
        assert torch.equal(a.latent, b.latent)
        assert (a.frames == b.frames).all() and a.first_frame == b.first_frame
