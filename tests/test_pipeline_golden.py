"""The whole clip-mode sampling loop against the reference (pipeline_* golden files)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from talkgen.media.image import person_masks, prepare_condition_image
from talkgen.models.vae import VAEConfig, VideoVAE
from talkgen.pipeline.pipeline import Pipeline
from talkgen.sampling.guidance import GuidanceConfig
from talkgen.weights.dit import load_dit

from conftest import golden_dir, golden_params, meta_json, read_golden, rel_err
from test_dit import golden_weights, write_original_layout


def golden_pipeline(meta: dict, tmp_path: Path) -> Pipeline:
    sources = meta_json(meta, "weights_from")
    dit_tensors, dit_meta = read_golden(golden_dir() / sources["dit"])
    base, audio_file = write_original_layout(golden_weights(dit_tensors), meta_json(dit_meta, "config"), tmp_path)
    dit, _ = load_dit(base, audio_file, dtype=torch.float32)
    vae_tensors, vae_meta = read_golden(golden_dir() / sources["vae"])
    vae_path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(golden_weights(vae_tensors), vae_path)
    vae = VideoVAE.from_original(vae_path, VAEConfig.from_dict(meta_json(vae_meta, "config")), dtype=torch.float32)
    return Pipeline(dit, vae)


def case_inputs(tensors: dict, case: str) -> dict:
    prefix = f"{case}.inputs."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.mark.parametrize("path", golden_params("pipeline_"))
def test_clip_loop_matches_reference(path: Path, tmp_path: Path) -> None:
    tensors, meta = read_golden(path)
    pipe = golden_pipeline(meta, tmp_path)
    for case, options in meta_json(meta, "cases").items():
        inputs = case_inputs(tensors, case)
        image = inputs["image_rgb"].numpy()
        tier = int(options.get("bucket_family", "multitalk-480").rsplit("-", 1)[1])
        condition = prepare_condition_image(image, tier)
        assert (torch.from_numpy(condition).permute(2, 0, 1) == tensors[f"{case}.debug.condition_frame_rgb"]).all()
        people = options["people"]
        masks = person_masks(image.shape[0], image.shape[1], condition.shape[:2], people, options.get("bbox"))
        embeddings = [inputs[f"audio_emb.person{i + 1}"] for i in range(people)]
        guidance = GuidanceConfig(
            options["text_guide_scale"], options["audio_guide_scale"], options.get("use_apg", False),
            options.get("apg_momentum", -0.75), options.get("apg_norm_threshold", 55.0),
        )
        latent = pipe.generate_latents(
            condition, embeddings, context=inputs["context"], context_null=inputs["context_null"],
            clip_tokens=inputs["clip_tokens"], noise=inputs["noise"],
            person_masks=masks if people == 2 else None, frame_num=options["frame_num"],
            steps=options["steps"], shift=options["shift"], guidance=guidance,
        )
        y_latent = pipe.condition(
            torch.from_numpy(condition).permute(2, 0, 1)[:, None].float() / 255 * 2 - 1, options["frame_num"]
        )[0][4:]
        assert rel_err(y_latent, tensors[f"{case}.debug.vae_latent_of_condition"]) <= 1e-4, case
        err = rel_err(latent, tensors[f"{case}.expected.latent"])
        assert err <= 1e-4, f"{case}: rel err {err:.2e}"


@pytest.mark.parametrize("path", golden_params("stream_"))
def test_first_chunk_of_streams_is_the_clip_mode_of_each_model(path: Path, tmp_path: Path) -> None:
    """Chunk 0 of the reference's streaming runs is its clip mode: MultiTalk re-noises nothing,
    InfiniteTalk keeps the reference frame's latent clean in latent frame 0."""
    tensors, meta = read_golden(path)
    pipe = golden_pipeline(meta, tmp_path)
    for case, options in meta_json(meta, "cases").items():
        if options["input"] != "image":
            continue  # video dubbing belongs to the streaming features
        inputs = case_inputs(tensors, case)
        pipe.model = options["model"]
        image = inputs["image_rgb"].numpy()
        tier = int(options["bucket_family"].rsplit("-", 1)[1])
        condition = prepare_condition_image(image, tier)
        people = options["people"]
        masks = person_masks(image.shape[0], image.shape[1], condition.shape[:2], people, options.get("bbox"))
        latent = pipe.generate_latents(
            condition, [inputs[f"audio_emb.person{i + 1}"] for i in range(people)],
            context=inputs["context"], context_null=inputs["context_null"], clip_tokens=inputs["clip_tokens.chunk0"],
            noise=inputs["noise.chunk0"], person_masks=masks if people == 2 else None, frame_num=options["frame_num"],
            steps=options["steps"], shift=options["shift"], guidance=GuidanceConfig(options["text"], options["audio"]),
        )
        err = rel_err(latent, tensors[f"{case}.expected.latent.chunk0"])
        assert err <= 1e-4, f"{case}: rel err {err:.2e}"
