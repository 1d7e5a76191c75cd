"""The ``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers`` layout: text encoder, image encoder and VAE loaded
from transformers / diffusers folders (against the reference's golden outputs), and a whole weights
directory in that layout through ``Pipeline.from_pretrained``.

The folders are written here from the golden (original-named) weights with the loaders' own key
maps run in reverse, and ``config.json`` is written by transformers / diffusers themselves. Each
folder is also opened by the library it belongs to, so the test folders are what those libraries
read and write.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import golden_params, meta_json, read_golden, rel_err
from PIL import Image
from safetensors.torch import save_file

from talkgen.errors import WeightsError
from talkgen.models.image_encoder import ImageEncoder, ImageEncoderConfig
from talkgen.models.text_encoder import TextEncoder, TextEncoderConfig, checkpoint_key_map
from talkgen.models.vae import VAEConfig, VideoVAE, diffusers_names
from talkgen.weights import manifest
from talkgen.weights.loading import iter_files, meta_device

TOLERANCE = 1e-4


def _weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("weights."): v for k, v in tensors.items() if k.startswith("weights.")}


def _read(path: Path) -> dict[str, torch.Tensor]:
    return {key: getter() for key, getter, _ in iter_files([path])}


def _save_sharded(state: dict[str, torch.Tensor], folder: Path, stem: str, shards: int) -> None:
    """``stem.safetensors``, or ``stem-0000k-of-0000n.safetensors`` + index as save_pretrained shards."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    if shards == 1:
        save_file(state, str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
        return
    keys, weight_map = sorted(state), {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in keys[i::shards]}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys[i::shards]})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


# --- original names -> transformers / diffusers names (the loaders' maps, reversed) ------------------


def write_t5_folder(original: dict[str, torch.Tensor], config: TextEncoderConfig, folder: Path,
                    shards: int = 2, drop: str | None = None) -> Path:  # fmt: skip
    """A ``UMT5EncoderModel.save_pretrained`` folder: the tied embedding as ``shared.weight`` only."""
    key_map = checkpoint_key_map(config)
    state = {f"encoder.{key_map[k]}": v for k, v in original.items()}
    state["shared.weight"] = state.pop("encoder.embed_tokens.weight")
    if drop:
        del state[drop]
    _save_sharded(state, folder, "model", shards)
    hf = config.to_hf()
    hf.architectures = ["UMT5EncoderModel"]
    hf.save_pretrained(str(folder))
    return folder


def clip_hf_state(original: dict[str, torch.Tensor], config: ImageEncoderConfig) -> dict[str, torch.Tensor]:
    """``visual.*`` -> ``CLIPVisionModelWithProjection`` names, every block, post-norm and head included."""
    v, e = "visual", "vision_model.embeddings"
    state = {
        f"{e}.patch_embedding.weight": original[f"{v}.patch_embedding.weight"],
        f"{e}.class_embedding": original[f"{v}.cls_embedding"].reshape(-1),
        f"{e}.position_embedding.weight": original[f"{v}.pos_embedding"].reshape(config.num_tokens, config.dim),
        "vision_model.pre_layrnorm.weight": original[f"{v}.pre_norm.weight"],
        "vision_model.pre_layrnorm.bias": original[f"{v}.pre_norm.bias"],
        "vision_model.post_layernorm.weight": original[f"{v}.post_norm.weight"],
        "vision_model.post_layernorm.bias": original[f"{v}.post_norm.bias"],
        "visual_projection.weight": original[f"{v}.head"].t(),  # the reference stores x @ head
    }
    for i in range(config.num_layers):
        src, dst = f"{v}.transformer.{i}", f"vision_model.encoder.layers.{i}"
        for p in ("weight", "bias"):
            for part, tensor in zip("qkv", original[f"{src}.attn.to_qkv.{p}"].chunk(3, dim=0)):
                state[f"{dst}.self_attn.{part}_proj.{p}"] = tensor
            state[f"{dst}.self_attn.out_proj.{p}"] = original[f"{src}.attn.proj.{p}"]
            state[f"{dst}.layer_norm1.{p}"] = original[f"{src}.norm1.{p}"]
            state[f"{dst}.layer_norm2.{p}"] = original[f"{src}.norm2.{p}"]
            state[f"{dst}.mlp.fc1.{p}"] = original[f"{src}.mlp.0.{p}"]
            state[f"{dst}.mlp.fc2.{p}"] = original[f"{src}.mlp.2.{p}"]
    return state


def write_clip_folder(original: dict[str, torch.Tensor], config: ImageEncoderConfig, folder: Path,
                      drop: tuple[str, ...] = ()) -> Path:  # fmt: skip
    from transformers import CLIPVisionConfig

    state = clip_hf_state(original, config)
    for key in drop:
        del state[key]
    _save_sharded(state, folder, "model", 1)
    hf = CLIPVisionConfig(
        hidden_size=config.dim, intermediate_size=config.mlp_dim, projection_dim=config.out_dim,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads, image_size=config.image_size,
        patch_size=config.patch_size, hidden_act=config.activation, layer_norm_eps=config.eps,
    )  # fmt: skip
    hf.architectures = ["CLIPVisionModelWithProjection"]
    hf.save_pretrained(str(folder))
    return folder


def write_vae_folder(original: dict[str, torch.Tensor], config: VAEConfig, folder: Path, drop: str | None = None) -> Path:
    names = diffusers_names(original)
    state = {names[k]: v for k, v in original.items()}
    if drop:
        del state[drop]
    _save_sharded(state, folder, "diffusion_pytorch_model", 1)
    with meta_device():
        config.build().save_config(str(folder))  # diffusers' own config.json
    return folder


# --- golden comparisons ---------------------------------------------------------------------------


@pytest.mark.parametrize("golden", golden_params("t5_"))
@pytest.mark.parametrize("shards", [1, 2])
def test_text_encoder_from_diffusers(golden: Path, shards: int, tmp_path: Path) -> None:
    tensors, meta = read_golden(golden)
    config = TextEncoderConfig.from_golden_config(meta_json(meta, "config"))
    folder = write_t5_folder(_weights(tensors), config, tmp_path / "text_encoder", shards=shards)
    encoder = TextEncoder.from_diffusers(folder, dtype=torch.float32, tokenizer=False)
    assert encoder.config == config  # read back from transformers' config.json
    ids, mask = tensors["inputs.ids"], tensors["inputs.mask"]
    out, expected = encoder.encode_ids(ids, mask), tensors["expected.out"]
    n = int(mask.sum())
    assert out.shape == expected.shape
    assert rel_err(out[:, :n], expected[:, :n]) <= TOLERANCE


@pytest.mark.parametrize("golden", golden_params("t5_"))
def test_text_encoder_folder_is_what_transformers_reads(golden: Path, tmp_path: Path) -> None:
    from transformers import UMT5EncoderModel

    tensors, meta = read_golden(golden)
    config = TextEncoderConfig.from_golden_config(meta_json(meta, "config"))
    folder = write_t5_folder(_weights(tensors), config, tmp_path / "text_encoder")
    model, info = UMT5EncoderModel.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = TextEncoder.from_diffusers(folder, dtype=torch.float32, tokenizer=False)
    ids, mask = tensors["inputs.ids"], tensors["inputs.mask"]
    with torch.no_grad():
        theirs = model.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(ours.encode_ids(ids, mask), theirs, atol=1e-5)


@pytest.mark.parametrize("golden", golden_params("t5_"))
def test_text_encoder_missing_tensor_is_named(golden: Path, tmp_path: Path) -> None:
    tensors, meta = read_golden(golden)
    config = TextEncoderConfig.from_golden_config(meta_json(meta, "config"))
    name = "encoder.block.1.layer.1.DenseReluDense.wi_0.weight"
    folder = write_t5_folder(_weights(tensors), config, tmp_path / "text_encoder", drop=name)
    with pytest.raises(WeightsError, match=rf"{name.replace('.', '[.]')}.*Diffusers.*talkgen download"):
        TextEncoder.from_diffusers(folder, dtype=torch.float32, tokenizer=False)


def test_text_encoder_tokenizer_from_sibling_folder(tmp_path: Path) -> None:
    from talkgen.models.text_encoder import write_tiny_text_encoder

    config = write_tiny_text_encoder(tmp_path / "orig")
    original = _read(tmp_path / "orig" / "models_t5_umt5-xxl-enc-bf16.pth")
    write_t5_folder(original, config, tmp_path / "repo" / "text_encoder")
    with pytest.raises(WeightsError, match="Tokenizer folder .*tokenizer not found"):
        TextEncoder.from_diffusers(tmp_path / "repo" / "text_encoder")
    shutil.copytree(tmp_path / "orig" / manifest.T5_TOKENIZER_DIR, tmp_path / "repo" / "tokenizer")
    ours = TextEncoder.from_diffusers(tmp_path / "repo" / "text_encoder", dtype=torch.float32)
    ref = TextEncoder.from_original(tmp_path / "orig" / "models_t5_umt5-xxl-enc-bf16.pth",
                                    tmp_path / "orig" / manifest.T5_TOKENIZER_DIR, config, dtype=torch.float32)  # fmt: skip
    prompt = ["a woman talking to the camera", "two people"]
    for a, b in zip(ours.encode(prompt), ref.encode(prompt)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("golden", golden_params("clip_"))
def test_image_encoder_from_diffusers(golden: Path, tmp_path: Path) -> None:
    tensors, meta = read_golden(golden)
    config = ImageEncoderConfig.from_golden_config(meta_json(meta, "config"))
    folder = write_clip_folder(_weights(tensors), config, tmp_path / "image_encoder")
    encoder = ImageEncoder.from_diffusers(folder, dtype=torch.float32)
    assert encoder.config == config
    out = encoder.encode(tensors["inputs.video"])
    assert out.shape == tensors["expected.out"].shape == (1, config.num_tokens, config.dim)
    assert rel_err(out, tensors["expected.out"]) <= TOLERANCE


@pytest.mark.parametrize("golden", golden_params("clip_"))
def test_image_encoder_folder_is_what_transformers_reads(golden: Path, tmp_path: Path) -> None:
    from transformers import CLIPVisionModelWithProjection

    from talkgen.models.image_encoder import preprocess

    tensors, meta = read_golden(golden)
    config = ImageEncoderConfig.from_golden_config(meta_json(meta, "config"))
    folder = write_clip_folder(_weights(tensors), config, tmp_path / "image_encoder")
    model, info = CLIPVisionModelWithProjection.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pixels = preprocess(tensors["inputs.video"], config.image_size)
    with torch.no_grad():
        hidden = model.eval()(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert rel_err(hidden, tensors["expected.out"]) <= TOLERANCE


@pytest.mark.parametrize("golden", golden_params("clip_"))
def test_image_encoder_skips_last_block_post_norm_and_projection(golden: Path, tmp_path: Path) -> None:
    tensors, meta = read_golden(golden)
    config = ImageEncoderConfig.from_golden_config(meta_json(meta, "config"))
    last = f"vision_model.encoder.layers.{config.num_layers - 1}"
    unused = tuple(k for k in clip_hf_state(_weights(tensors), config)
                   if k.startswith((f"{last}.", "vision_model.post_layernorm.", "visual_projection.")))  # fmt: skip
    folder = write_clip_folder(_weights(tensors), config, tmp_path / "image_encoder", drop=unused)
    out = ImageEncoder.from_diffusers(folder, dtype=torch.float32).encode(tensors["inputs.video"])
    assert rel_err(out, tensors["expected.out"]) <= TOLERANCE


@pytest.mark.parametrize("golden", golden_params("clip_"))
def test_image_encoder_missing_and_unexpected_tensors(golden: Path, tmp_path: Path) -> None:
    tensors, meta = read_golden(golden)
    config = ImageEncoderConfig.from_golden_config(meta_json(meta, "config"))
    name = "vision_model.encoder.layers.0.self_attn.k_proj.weight"
    folder = write_clip_folder(_weights(tensors), config, tmp_path / "missing", drop=(name,))
    with pytest.raises(WeightsError, match=rf"{name.replace('.', '[.]')}.*is missing.*talkgen download"):
        ImageEncoder.from_diffusers(folder, dtype=torch.float32)
    folder = write_clip_folder(_weights(tensors), config, tmp_path / "extra")
    state = _read(folder / "model.safetensors")
    state["vision_model.encoder.layers.0.extra.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"Unexpected tensor 'vision_model[.]encoder[.]layers[.]0[.]extra[.]weight'"):
        ImageEncoder.from_diffusers(folder, dtype=torch.float32)


@pytest.fixture(params=golden_params("vae_"))
def vae_golden(request, tmp_path):
    tensors, meta = read_golden(request.param)
    config = VAEConfig.from_dict(meta["config"])
    return tensors, config, write_vae_folder(_weights(tensors), config, tmp_path / "vae")


def test_vae_from_diffusers(vae_golden) -> None:
    tensors, config, folder = vae_golden
    vae = VideoVAE.from_diffusers(folder)
    assert vae.config == config  # read back from diffusers' config.json
    latent = vae.encode(tensors["inputs.video"])
    assert rel_err(latent, tensors["expected.latent"]) <= TOLERANCE
    video = vae.decode(tensors["inputs.latent"])
    assert rel_err(video, tensors["expected.decoded"]) <= TOLERANCE
    assert torch.equal(vae.latents_mean, tensors["const.latents_mean"])
    assert torch.equal(vae.latents_std, tensors["const.latents_std"])


def test_vae_folder_is_what_diffusers_reads(vae_golden) -> None:
    from diffusers import AutoencoderKLWan

    tensors, _, folder = vae_golden
    model = AutoencoderKLWan.from_pretrained(str(folder))  # raises on missing or unexpected keys
    ours = VideoVAE.from_diffusers(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(ours.model.state_dict()[name], tensor), name


@pytest.mark.parametrize("golden", golden_params("vae_"))
def test_vae_missing_tensor_is_named(golden: Path, tmp_path: Path) -> None:
    tensors, meta = read_golden(golden)
    config = VAEConfig.from_dict(meta["config"])
    name = "decoder.up_blocks.1.resnets.0.conv1.weight"
    folder = write_vae_folder(_weights(tensors), config, tmp_path / "vae", drop=name)
    with pytest.raises(WeightsError, match=rf"{name.replace('.', '[.]')}.*is missing.*talkgen download"):
        VideoVAE.from_diffusers(folder)


def test_missing_weight_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "vae").mkdir()
    with pytest.raises(WeightsError, match=r"No weights \(diffusion_pytorch_model.safetensors\)"):
        VideoVAE.from_diffusers(tmp_path / "vae", VAEConfig.tiny())
    with pytest.raises(WeightsError, match="Image encoder folder"):
        ImageEncoder.from_diffusers(tmp_path / "nowhere")


# --- a whole weights directory in the -Diffusers layout --------------------------------------------


def write_diffusers_weights_dir(tiny_dir: Path, target: Path) -> Path:
    """The tiny built-in model re-saved as ``DIR/Wan2.1-I2V-14B-480P-Diffusers/`` (no original folder)."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from talkgen.models.dit import DiTConfig
    from talkgen.weights.dit import base_shards

    base = tiny_dir / manifest.BASE_DIR
    repo = target / manifest.BASE_DIFFUSERS_DIR

    # transformer/: the base DiT keys under diffusers' names (the audio adapter stays in its own file)
    original = {}
    for shard in base_shards(base):
        original.update(_read(shard))
    dit_state = convert_wan_transformer_to_diffusers(original)
    c = DiTConfig.tiny()
    with meta_device():
        reference = WanTransformer3DModel(
            patch_size=c.patch_size, num_attention_heads=c.num_heads, attention_head_dim=c.head_dim,
            in_channels=c.in_dim, out_channels=c.out_dim, text_dim=c.text_dim, freq_dim=c.freq_dim,
            ffn_dim=c.ffn_dim, num_layers=c.num_layers, eps=c.eps, image_dim=c.image_dim, added_kv_proj_dim=c.dim,
        )  # fmt: skip
    assert set(dit_state) == set(reference.state_dict()), "the written transformer/ is not diffusers' layout"
    _save_sharded(dit_state, repo / "transformer", "diffusion_pytorch_model", 2)
    reference.save_config(str(repo / "transformer"))

    write_t5_folder(_read(base / manifest.T5_FILE), TextEncoderConfig.tiny(), repo / "text_encoder")
    shutil.copytree(base / manifest.T5_TOKENIZER_DIR, repo / "tokenizer")
    clip = {k: v for k, v in _read(base / manifest.CLIP_FILE).items() if k.startswith("visual.")}
    write_clip_folder(clip, ImageEncoderConfig.tiny(), repo / "image_encoder")
    write_vae_folder(_read(base / manifest.VAE_FILE), VAEConfig.tiny(), repo / "vae")

    shutil.copytree(tiny_dir / manifest.WAV2VEC2_DIR, target / manifest.WAV2VEC2_DIR)
    shutil.copytree(tiny_dir / manifest.MULTITALK_DIR, target / manifest.MULTITALK_DIR)
    shutil.copyfile(tiny_dir / "talkgen-tiny.json", target / "talkgen-tiny.json")  # same audio sizes, same buckets
    return target


@pytest.fixture(scope="module")
def weights_dirs(tmp_path_factory) -> tuple[Path, Path]:
    from talkgen.pipeline.tiny import ensure_tiny_weights

    tiny = ensure_tiny_weights(tmp_path_factory.mktemp("tiny"))
    return tiny, write_diffusers_weights_dir(tiny, tmp_path_factory.mktemp("diffusers"))


def test_layout_detection_and_required_files(weights_dirs) -> None:
    from talkgen.pipeline.loading import base_layout, check_weights, dit_layout, required_files

    original, diffusers = weights_dirs
    assert (base_layout(original), dit_layout(original)) == ("original", "original")
    assert (base_layout(diffusers), dit_layout(diffusers)) == ("diffusers", "diffusers")
    files = [p.relative_to(diffusers).as_posix() for p, _ in required_files(diffusers, "multitalk")]
    assert "Wan2.1-I2V-14B-480P-Diffusers/text_encoder/config.json" in files
    assert not any(f.startswith("Wan2.1-I2V-14B-480P/") for f in files)
    check_weights(diffusers, "multitalk")


def test_missing_diffusers_component_names_the_repo(weights_dirs, tmp_path: Path) -> None:
    from talkgen.pipeline.loading import check_weights

    _, diffusers = weights_dirs
    broken = tmp_path / "broken"
    shutil.copytree(diffusers, broken)
    shutil.rmtree(broken / manifest.BASE_DIFFUSERS_DIR / "image_encoder")
    with pytest.raises(WeightsError, match=r"image_encoder/config.json is missing.*-Diffusers.*--layout diffusers"):
        check_weights(broken, "multitalk")


def _own_memory(pipe) -> None:
    """Copy every weight into fresh memory. Loaded weights may be views of the memory-mapped files,
    and a kernel's summation order can depend on a tensor's alignment (1/255 on ~0.005% of the
    pixels here); with fresh copies equal weights give bit-identical frames."""
    for component in (pipe.dit, pipe.vae, pipe.text_encoder.model, pipe.image_encoder.model):
        for module in component.modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    module._parameters[name] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)


def test_pipeline_from_diffusers_dir_equals_original(weights_dirs, tmp_path: Path) -> None:
    import soundfile as sf

    from talkgen.media.samples import sample_portrait, sample_speech
    from talkgen.pipeline.pipeline import Pipeline
    from talkgen.pipeline.request import GenerationRequest

    original, diffusers = weights_dirs
    Image.fromarray(sample_portrait((120, 120))).save(tmp_path / "face.png")
    sf.write(tmp_path / "speech.wav", sample_speech(0.4, 22_050), 22_050)
    request = GenerationRequest.parse({
        "cond_image": str(tmp_path / "face.png"), "cond_audio": {"person1": str(tmp_path / "speech.wav")},
        "prompt": "a woman talking", "sample_steps": 1, "text_guide_scale": 1.0, "seed": 7,
    })  # fmt: skip
    results = []
    for weights_dir in (original, diffusers):
        pipe = Pipeline.from_pretrained(weights_dir, "multitalk", device="cpu")
        _own_memory(pipe)
        results.append(pipe.generate(request))
    ref, got = results
    assert ref.frames is not None and ref.num_frames > 0
    assert got.num_frames == ref.num_frames
    assert np.array_equal(got.frames, ref.frames)


def test_original_encoders_with_diffusers_dit(weights_dirs, tmp_path: Path) -> None:
    """What `talkgen download --layout diffusers` writes: the original folder without DiT shards, and
    only `transformer/` of the -Diffusers repo. The DiT comes from there, everything else as before."""
    from talkgen.pipeline.loading import base_layout, dit_layout, load_components

    original, diffusers = weights_dirs
    mixed = tmp_path / "mixed"
    shutil.copytree(original, mixed)
    base = mixed / manifest.BASE_DIR
    for path in [base / manifest.DIT_INDEX, *base.glob(manifest.DIT_SHARD_GLOB)]:
        path.unlink()
    shutil.copytree(diffusers / manifest.BASE_DIFFUSERS_DIR / "transformer",
                    mixed / manifest.BASE_DIFFUSERS_DIR / "transformer")  # fmt: skip
    assert (base_layout(mixed), dit_layout(mixed)) == ("original", "diffusers")
    cpu = torch.device("cpu")
    got = load_components(mixed, "multitalk", device=cpu, dtype=torch.float32)["dit"].state_dict()
    ref = load_components(original, "multitalk", device=cpu, dtype=torch.float32)["dit"].state_dict()
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
