"""The DiT against the reference's outputs, loaded through the real original-layout loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from talkgen.errors import WeightsError
from talkgen.models.dit import DiTConfig, WanMultiTalkDiT
from talkgen.weights.dit import is_audio_key, load_dit
from talkgen.weights.loading import meta_device

from conftest import golden_params, meta_json, read_golden, rel_err


def write_original_layout(weights: dict[str, torch.Tensor], config: dict, root: Path, shards: int = 2) -> tuple[Path, Path]:
    """Base keys as index + shards in a Wan folder, audio keys in a separate multitalk file."""
    base, audio = root / "Wan2.1-I2V-14B-480P", root / "MeiGen-MultiTalk"
    base.mkdir(parents=True)
    audio.mkdir(parents=True)
    base_keys = sorted(k for k in weights if not is_audio_key(k))
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = base_keys[i::shards]
        save_file({k: weights[k].contiguous() for k in part}, str(base / name))
        weight_map.update({k: name for k in part})
    (base / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (base / "config.json").write_text(json.dumps(config))
    save_file({k: weights[k].contiguous() for k in weights if is_audio_key(k)}, str(audio / "multitalk.safetensors"))
    return base, audio / "multitalk.safetensors"


def golden_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}


@pytest.mark.parametrize("path", golden_params("multitalk_dit_"))
def test_dit_matches_reference(path: Path, tmp_path: Path) -> None:
    tensors, meta = read_golden(path)
    base, audio_file = write_original_layout(golden_weights(tensors), meta_json(meta, "config"), tmp_path)
    model, _ = load_dit(base, audio_file, dtype=torch.float32)
    for case in meta_json(meta, "cases"):
        inputs = {k.split(".inputs.")[1]: v for k, v in tensors.items() if k.startswith(f"{case}.inputs.")}
        audio = inputs["audio"]
        with torch.no_grad():
            tokens = model.embed_audio(audio[None])
            out = model(
                x=inputs["x"][None], t=inputs["t"], y=inputs["y"][None], context=[inputs["context"]],
                clip_fea=inputs["clip_fea"], audio=audio[None], ref_target_masks=inputs["ref_target_masks"],
            )[0]
        people = audio.shape[0]
        expected_tokens = tensors[f"{case}.debug.audio_tokens"]  # [people, T, n, C]
        assert rel_err(tokens[0], expected_tokens.permute(1, 0, 2, 3).flatten(1, 2)) <= 1e-4, case
        err = rel_err(out, tensors[f"{case}.expected.out"])
        assert err <= 1e-4, f"{case} ({people} people): rel err {err:.2e}"


def test_full_size_key_set_and_parameter_count() -> None:
    with meta_device():
        model = WanMultiTalkDiT(DiTConfig.wan_i2v_14b())
    state = model.state_dict()
    assert len(state) == 1633
    assert sum(t.numel() for t in state.values()) == 18_882_046_784
    audio = [k for k in state if is_audio_key(k)]
    assert len(audio) == 330
    assert sum(state[k].numel() for k in audio) == 2_487_168_000
    assert tuple(state["audio_proj.proj1_vf.weight"].shape) == (512, 73728)
    assert tuple(state["blocks.39.audio_cross_attn.kv_linear.weight"].shape) == (10240, 768)
    assert tuple(state["patch_embedding.weight"].shape) == (5120, 36, 1, 2, 2)


@pytest.mark.parametrize("path", golden_params("multitalk_dit_"))
def test_missing_tensor_is_named(path: Path, tmp_path: Path) -> None:
    tensors, meta = read_golden(path)
    weights = golden_weights(tensors)
    del weights["blocks.1.cross_attn.k_img.weight"]
    base, audio_file = write_original_layout(weights, meta_json(meta, "config"), tmp_path)
    with pytest.raises(WeightsError, match=r"blocks\.1\.cross_attn\.k_img\.weight.*Wan2\.1-I2V-14B-480P.*talkgen download"):
        load_dit(base, audio_file, dtype=torch.float32)


@pytest.mark.parametrize("path", golden_params("multitalk_dit_"))
def test_missing_audio_tensor_points_at_the_audio_weights(path: Path, tmp_path: Path) -> None:
    tensors, meta = read_golden(path)
    weights = golden_weights(tensors)
    del weights["blocks.0.norm_x.bias"]
    base, audio_file = write_original_layout(weights, meta_json(meta, "config"), tmp_path)
    with pytest.raises(WeightsError, match=r"blocks\.0\.norm_x\.bias.*MeiGen-MultiTalk"):
        load_dit(base, audio_file, dtype=torch.float32)


@pytest.mark.parametrize("path", golden_params("multitalk_dit_"))
def test_unexpected_tensor_is_named(path: Path, tmp_path: Path) -> None:
    tensors, meta = read_golden(path)
    weights = golden_weights(tensors)
    weights["blocks.0.self_attn.extra.weight"] = torch.zeros(2)
    base, audio_file = write_original_layout(weights, meta_json(meta, "config"), tmp_path)
    with pytest.raises(WeightsError, match=r"blocks\.0\.self_attn\.extra\.weight"):
        load_dit(base, audio_file, dtype=torch.float32)


@pytest.mark.parametrize("path", golden_params("multitalk_dit_"))
def test_loads_in_bfloat16_with_float32_time_path(path: Path, tmp_path: Path) -> None:
    tensors, meta = read_golden(path)
    base, audio_file = write_original_layout(golden_weights(tensors), meta_json(meta, "config"), tmp_path)
    model, report = load_dit(base, audio_file, dtype=torch.bfloat16)
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert model.time_projection[1].weight.dtype == torch.float32
    assert report.source_of["audio_proj.proj1.weight"].endswith("multitalk.safetensors")
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("path", golden_params("multitalk_dit_"))
def test_diffusers_layout_loads_to_the_same_model(path: Path, tmp_path: Path) -> None:
    """The -Diffusers repo's transformer/ (diffusers names) + the separate audio file."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    tensors, meta = read_golden(path)
    weights = golden_weights(tensors)
    base = {k: v for k, v in weights.items() if not is_audio_key(k)}
    converted = convert_wan_transformer_to_diffusers(dict(base))
    assert "blocks.0.attn2.add_k_proj.weight" in converted  # really diffusers names
    transformer = tmp_path / "transformer"
    transformer.mkdir()
    save_file({k: v.contiguous() for k, v in converted.items()}, str(transformer / "diffusion_pytorch_model.safetensors"))
    audio_file = tmp_path / "multitalk.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items() if is_audio_key(k)}, str(audio_file))
    config = DiTConfig.from_dict(meta_json(meta, "config"))
    model, _ = load_dit(transformer, audio_file, config=config, dtype=torch.float32, layout="diffusers")
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name].to(value.dtype)), name


# -- the first block shared between guidance passes ----------------------------------------------


def tiny_random_dit(layers: int = 3) -> WanMultiTalkDiT:
    import dataclasses

    from talkgen.pipeline.tiny import tiny_dit_state

    config = dataclasses.replace(DiTConfig.tiny(), num_layers=layers)
    model = WanMultiTalkDiT(config)
    model.load_state_dict(tiny_dit_state(config, 3))
    return model.eval().requires_grad_(False)


def guidance_pass_inputs(config: DiTConfig, people: int) -> list[dict]:
    """cond, drop-text and uncond of one step: one latent, other texts and audio (the null pass
    one silent speaker, as the pipeline runs it)."""
    g = torch.Generator().manual_seed(5)
    t, h, w = 2, 8, 8
    masks = torch.zeros(3, h, w)
    masks[0, :, : w // 2] = 1
    masks[1, :, w // 2 :] = 1
    audio = torch.randn(1, people, 5, config.audio_window, config.audio_layers, config.audio_channels, generator=g)
    common = dict(x=torch.randn(1, 16, t, h, w, generator=g), t=torch.tensor([640.0]),
                  y=torch.randn(1, 20, t, h, w, generator=g), clip_fea=torch.randn(1, 5, config.image_dim, generator=g))
    text, null_text = (torch.randn(n, config.text_dim, generator=g) for n in (7, 4))
    two = masks if people == 2 else None
    return [
        dict(common, context=[text], audio=audio, ref_target_masks=two),
        dict(common, context=[null_text], audio=audio, ref_target_masks=two),
        dict(common, context=[null_text], audio=torch.zeros_like(audio[:, -1:]), ref_target_masks=None),
    ]


@pytest.mark.parametrize("people", [1, 2])
def test_shared_first_block_gives_each_pass_its_own_output(people: int, monkeypatch) -> None:
    """One step's passes computed with a SharedFirstBlock equal, bit for bit, the passes computed
    alone, while the first block's self-attention runs once (the other blocks' once per pass)."""
    from talkgen.models.dit import DiTBlock, SharedFirstBlock

    model = tiny_random_dit()
    passes = guidance_pass_inputs(model.config, people)
    with torch.no_grad():
        alone = [model(**inputs) for inputs in passes]
    calls = []
    original = DiTBlock.attend_self
    monkeypatch.setattr(DiTBlock, "attend_self", lambda self, *a, **k: calls.append(self) or original(self, *a, **k))
    shared = SharedFirstBlock()
    with torch.no_grad():
        together = [model(**inputs, shared=shared) for inputs in passes]
    for name, a, b in zip(("cond", "drop_text", "uncond"), alone, together):
        assert torch.equal(a, b), name
    assert shared.reused == 2
    assert calls.count(model.blocks[0]) == 1
    assert all(calls.count(block) == 3 for block in model.blocks[1:])


def test_shared_first_block_recomputes_what_it_cannot_reuse() -> None:
    """A pass with another batch than the saved result (rows of a batch are not bit-identical to
    the same rows alone), or one that needs the person map the saved result lacks (the
    one-speaker null pass ran first), computes its own first block, which is saved in turn."""
    from talkgen.models.dit import SharedFirstBlock

    model = tiny_random_dit(layers=2)
    cond, _, uncond = guidance_pass_inputs(model.config, people=2)

    def rows(inputs: dict, n: int) -> dict:
        return dict(inputs, x=inputs["x"].expand(n, -1, -1, -1, -1), y=inputs["y"].expand(n, -1, -1, -1, -1),
                    t=inputs["t"].expand(n), context=inputs["context"] * n, clip_fea=inputs["clip_fea"].expand(n, -1, -1),
                    audio=inputs["audio"].expand(n, -1, -1, -1, -1, -1))

    shared = SharedFirstBlock()
    with torch.no_grad():
        first_uncond = model(**uncond, shared=shared)
        assert torch.equal(model(**cond, shared=shared), model(**cond))  # needs the person map: computes
        assert shared.reused == 0
        assert torch.equal(model(**rows(cond, 2), shared=shared), model(**rows(cond, 2)))  # two rows: computes
        assert shared.reused == 0
        assert torch.equal(model(**uncond, shared=shared), first_uncond)  # batch 1 against 2: computes
        assert shared.reused == 0
        assert torch.equal(model(**cond, shared=shared), model(**cond))  # saved by the uncond: lacks the map
        assert torch.equal(model(**uncond, shared=shared), first_uncond)
    assert shared.reused == 1


def test_pipeline_step_shares_the_first_block(monkeypatch) -> None:
    """The sampling loop hands one SharedFirstBlock to the passes of each step: a 3-pass step runs
    the first block's self-attention once."""
    from talkgen.models.dit import DiTBlock
    from talkgen.pipeline.pipeline import Conditioning, Pipeline
    from talkgen.sampling.guidance import GuidanceConfig

    model = tiny_random_dit(layers=2)
    cond_inputs, _, _ = guidance_pass_inputs(model.config, people=1)
    cond = Conditioning(y=cond_inputs["y"][0], clip_tokens=cond_inputs["clip_fea"], context=cond_inputs["context"][0],
                        context_null=torch.zeros(3, model.config.text_dim), audio=cond_inputs["audio"][0],
                        person_masks=None)
    calls = []
    original = DiTBlock.attend_self
    monkeypatch.setattr(DiTBlock, "attend_self", lambda self, *a, **k: calls.append(self) or original(self, *a, **k))
    pipe = Pipeline(model, vae=None)
    pipe.sample_chunk(cond_inputs["x"][0], cond, steps=2, shift=3.0, guidance=GuidanceConfig(5.0, 4.0))
    assert calls.count(model.blocks[0]) == 2  # once per step
    assert calls.count(model.blocks[1]) == 6  # every pass of both steps


def test_ffn_fuses_bias_and_gelu_into_the_gemm_where_kernels_run(monkeypatch) -> None:
    """In bf16 where talkgen's kernels may run, the FFN's first layer runs as one GEMM with a bias +
    tanh-GELU epilogue (``torch._addmm_activation``): the same result as the Sequential path, to
    bf16 rounding, and the released key names. Elsewhere (float32, the CPU) the plain path runs."""
    import torch.nn.functional as F

    from talkgen.models import dit
    from talkgen.models.dit import FeedForward

    ffn = FeedForward(32, 80)
    assert [k for k, _ in ffn.state_dict().items()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(0))
    calls = []
    original = torch._addmm_activation
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: calls.append(k) or original(*a, **k))
    with torch.no_grad():
        exact = F.linear(F.gelu(F.linear(x, ffn[0].weight, ffn[0].bias), approximate="tanh"), ffn[2].weight, ffn[2].bias)
        assert torch.equal(ffn(x), torch.nn.Sequential(*ffn)(x)) and not calls  # float32 on the CPU: plain
        ffn.to(torch.bfloat16)
        plain = ffn(x.bfloat16())
        assert not calls
        monkeypatch.setattr(dit, "own_kernels_allowed", lambda device_type: True)
        fused = ffn(x.bfloat16())
    assert calls == [{"use_gelu": True}]
    assert fused.shape == plain.shape == x.shape and fused.dtype == torch.bfloat16
    assert rel_err(fused.float(), exact) < 1e-2 and rel_err(plain.float(), exact) < 1e-2


def test_ffn_keeps_the_plain_path_for_converted_layers(monkeypatch) -> None:
    """A layer whose weight is a tensor subclass (torchao's fp8 weights), or that has no bias,
    keeps the torch path: the epilogue GEMM takes plain tensors only."""
    from talkgen.models import dit
    from talkgen.models.dit import FeedForward, _gelu_epilogue_takes

    class Converted(torch.Tensor):
        pass

    monkeypatch.setattr(dit, "own_kernels_allowed", lambda device_type: True)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        ffn = FeedForward(16, 24).to(torch.bfloat16)
        assert _gelu_epilogue_takes(x, ffn[0])
        assert not _gelu_epilogue_takes(x.float(), ffn[0])  # the layer's dtype differs
        ffn[0].weight = torch.nn.Parameter(torch.Tensor._make_subclass(Converted, ffn[0].weight.detach()),
                                           requires_grad=False)
        assert not _gelu_epilogue_takes(x, ffn[0])
        assert not _gelu_epilogue_takes(x, torch.nn.Linear(16, 24, bias=False).to(torch.bfloat16))
