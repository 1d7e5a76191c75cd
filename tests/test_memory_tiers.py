"""Memory tiers on the CPU: the streaming and offload machinery runs with a synchronous stand-in
for the GPU (talkgen.runtime.offload.HostEngine), so these tests check that the same outputs come
out, which blocks stay resident, and the order in which copies and waits are enqueued. The GPU
figures (peak memory, slowdown per NFE) come from benchmarks/check_tiers.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from talkgen.errors import ResourceError
from talkgen.models.dit import DiTConfig, WanMultiTalkDiT
from talkgen.runtime.memory import (
    GiB,
    MemoryPlan,
    estimate_peak,
    estimate_sizes,
    parse_budget,
    parse_memory,
    plan_memory,
    resident_blocks_for,
)
from talkgen.runtime.offload import BlockStreamer, HostEngine, Layout, ModuleOffloader, inner_tensors


def tiny_dit(layers: int = 6, seed: int = 1) -> WanMultiTalkDiT:
    from talkgen.pipeline.tiny import tiny_dit_state

    config = dataclasses.replace(DiTConfig.tiny(), num_layers=layers)
    model = WanMultiTalkDiT(config)
    model.load_state_dict(tiny_dit_state(config, seed))
    return model.eval().requires_grad_(False)


def dit_inputs(config: DiTConfig, people: int = 1, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    t, h, w = 2, 8, 8
    masks = torch.zeros(3, h, w)
    masks[0, :, : w // 2] = 1
    masks[1, :, w // 2 :] = 1
    return dict(
        x=torch.randn(1, 16, t, h, w, generator=g), t=torch.tensor([700.0]), y=torch.randn(1, 20, t, h, w, generator=g),
        context=[torch.randn(7, config.text_dim, generator=g)], clip_fea=torch.randn(1, 5, config.image_dim, generator=g),
        audio=torch.randn(1, people, 5, config.audio_window, config.audio_layers, config.audio_channels, generator=g),
        ref_target_masks=masks if people == 2 else None,
    )


# -- streaming the DiT blocks -------------------------------------------------------------------


@pytest.mark.parametrize("resident", [0, 1, 2, 4, 6])
def test_streamed_blocks_give_the_same_output(resident: int):
    reference, streamed = tiny_dit(), tiny_dit()
    streamer = BlockStreamer(streamed.blocks, HostEngine(), resident=resident, slots=2)
    inputs = dit_inputs(reference.config)
    with torch.no_grad():
        expected = reference(**inputs)
        for _ in range(3):  # the cyclic prefetch carries over from one forward to the next
            assert torch.equal(streamed(**inputs), expected)
    assert len(streamer.resident) + len(streamer.streamed) == 6
    assert len(streamer.streamed) % max(streamer.num_slots, 1) == 0
    assert abs(len(streamer.resident) - resident) <= 1  # one more is streamed when the count is odd


def test_two_speakers_and_teacache_skips_through_streamed_blocks():
    from talkgen.sampling.teacache import TeaCache

    reference, streamed = tiny_dit(), tiny_dit()
    BlockStreamer(streamed.blocks, HostEngine(), resident=2, slots=2)
    inputs = dit_inputs(reference.config, people=2)
    caches = [TeaCache(8, thresh=1e12), TeaCache(8, thresh=1e12)]  # a huge threshold: skips after step 5
    with torch.no_grad():
        for step, t in enumerate(torch.linspace(999, 100, 8)):
            args = dict(inputs, t=t[None])
            out = [model(**args, block_runner=cache.runner("cond", step)) for model, cache in zip((reference, streamed), caches)]
            assert torch.equal(out[0], out[1])
    assert caches[1].skipped > 0 and caches[0].table(["cond"]) == caches[1].table(["cond"])


def test_resident_blocks_and_buffers():
    model = tiny_dit(layers=8)
    block_bytes = Layout(model.blocks[0]).nbytes
    streamer = BlockStreamer(model.blocks, HostEngine(), resident=4, slots=2)
    assert streamer.resident == [0, 1, 2, 3] and streamer.streamed == [4, 5, 6, 7]
    assert streamer.num_slots == 2 and len(streamer.hosts) == 4
    # Streamed blocks 4 and 6 share buffer 0, 5 and 7 buffer 1: their parameters are views of it.
    for a, b in ((4, 6), (5, 7)):
        pa, pb = model.blocks[a].self_attn.q.weight, model.blocks[b].self_attn.q.weight
        assert pa.untyped_storage().data_ptr() == pb.untyped_storage().data_ptr()
    assert model.blocks[4].self_attn.q.weight.untyped_storage().data_ptr() != \
        model.blocks[5].self_attn.q.weight.untyped_storage().data_ptr()
    assert streamer.device_bytes <= 4 * block_bytes + 2 * block_bytes + 4 * 1024  # resident + 2 buffers
    assert streamer.host_bytes == 4 * block_bytes


def test_copies_and_waits_are_ordered_without_host_syncs():
    """Each streamed block waits for an event recorded after its own copy; each copy into a buffer
    waits for the event recorded after the buffer's previous reader; the next copy is enqueued
    right after a block is; the host never waits (the engine's synchronize is logged, and a CUDA
    sync such as ``torch.cuda.synchronize()`` or ``event.synchronize()`` raises on this engine)."""
    model = tiny_dit()
    engine = HostEngine()
    engine.log = []  # from the start: the first fetches are enqueued while the streamer is built
    streamer = BlockStreamer(model.blocks, engine, resident=2, slots=2)
    assert engine.log == [("copy", "blocks:2->slot0", None, "blocks:ready0"), ("copy", "blocks:3->slot1", None, "blocks:ready1")]
    for index, block in enumerate(model.blocks):  # registered after the streamer's hooks: runs after them
        block.register_forward_pre_hook(lambda _m, _a, index=index: engine.log.append(("compute", index)))
    with torch.no_grad():
        model(**dit_inputs(model.config))
        model(**dit_inputs(model.config))
    log = engine.log
    computes = [i for i, entry in enumerate(log) if entry[0] == "compute"]
    assert [log[i][1] for i in computes] == list(range(6)) * 2
    for position in computes:
        index = log[position][1]
        if index in streamer.streamed:
            slot = streamer.streamed.index(index) % 2
            assert log[position - 1] == ("wait", f"blocks:ready{slot}")
            # the event waited for was last recorded (as ``done``) by the copy of this very block
            copy = next(entry for entry in reversed(log[:position]) if entry[0] == "copy" and entry[3] == f"blocks:ready{slot}")
            assert copy[1] == f"blocks:{index}->slot{slot}"
    copies = [position for position, entry in enumerate(log) if entry[0] == "copy"][2:]  # after the first two
    assert all(log[q][2] is not None and log[q][2].startswith("blocks:free") for q in copies)
    for q in copies:  # a copy into a buffer waits for an event recorded after the buffer's last reader
        slot = int(log[q][2][len("blocks:free"):])
        readers = [p for p in computes if p < q and log[p][1] in streamer.streamed
                   and streamer.streamed.index(log[p][1]) % 2 == slot]
        records = [p for p in range(q) if log[p] == ("record", f"blocks:free{slot}")]
        assert readers and records and records[-1] > readers[-1]
    # After block 2 (slot 0) comes the copy of block 4 into slot 0, after block 5 (slot 1) that of block 3.
    assert ("copy", "blocks:4->slot0", "blocks:free0", "blocks:ready0") in log
    assert ("copy", "blocks:3->slot1", "blocks:free1", "blocks:ready1") in log
    assert {entry[0] for entry in log} == {"compute", "wait", "record", "copy"}  # no host sync in the hot path
    engine.synchronize()  # the check above sees a host sync when there is one
    assert log[-1] == ("synchronize",)


def stack_with_different_first_block(n: int = 4) -> nn.ModuleList:
    """Identical blocks, except that block 0 has one more parameter (as T5's first layer has the
    relative-attention bias)."""
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(n))
    blocks[0][0].register_parameter("relative_attention_bias", nn.Parameter(torch.randn(4, 2)))
    return blocks.requires_grad_(False)


@pytest.mark.parametrize("different", [0, 2])
def test_streaming_refuses_differing_blocks_before_touching_any(different: int):
    blocks = stack_with_different_first_block()
    if different != 0:  # also a later block: the blocks before it must not have been rebound
        del blocks[0][0]._parameters["relative_attention_bias"]
        blocks[different][0].register_parameter("extra", nn.Parameter(torch.randn(3)))
    before = [{name: (tensor, tensor.clone()) for name, tensor in block.state_dict(keep_vars=True).items()} for block in blocks]
    with pytest.raises(ValueError, match=f"block {different if different else 1} differs"):
        BlockStreamer(blocks, HostEngine(), resident=0, slots=2, name="umT5")
    for block, original in zip(blocks, before):
        now = block.state_dict(keep_vars=True)
        assert now.keys() == original.keys()
        for name, (tensor, values) in original.items():
            assert now[name] is tensor and torch.equal(now[name], values)  # not rebound, not changed
        assert not block._forward_pre_hooks and not block._forward_hooks


def test_blocks_made_different_by_prepare_are_refused_whole():
    """A ``prepare`` that casts one block differently: refused after preparing, every block still
    holding its own (prepared) weights, none bound to a shared buffer."""
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(4)).requires_grad_(False)
    values = [{name: tensor.clone() for name, tensor in block.state_dict().items()} for block in blocks]
    with pytest.raises(ValueError, match="block 2 differs"):
        BlockStreamer(blocks, HostEngine(), resident=0, slots=2, prepare=lambda block: block.double() if block is blocks[2] else None)
    storages = []
    for block, original in zip(blocks, values):
        for name, tensor in block.state_dict().items():
            assert torch.equal(tensor.float(), original[name])
        storages.append({tensor.untyped_storage().data_ptr() for tensor in block.state_dict().values()})
    assert all(a.isdisjoint(b) for i, a in enumerate(storages) for b in storages[i + 1 :])  # no two blocks share memory


def test_text_encoder_with_differing_blocks_is_offloaded_whole():
    """prepare_encoders falls back to moving umT5 whole when its blocks cannot stream; the fallback
    then runs with the blocks' real weights."""
    from types import SimpleNamespace

    from talkgen.runtime.memory import MemoryManager, prepare_encoders

    model = nn.Module()
    model.encoder = nn.Module()
    model.encoder.block = stack_with_different_first_block()
    x = torch.randn(3, 8)

    def forward(x):
        for block in model.encoder.block:
            x = block(x)
        return x

    expected = forward(x)
    text = SimpleNamespace(model=model)
    plan = MemoryPlan("stream-blocks", offload_encoders=True, stream_text=True, vae_tiling=True)
    manager = MemoryManager(plan, "cpu")
    prepare_encoders({"text_encoder": text}, plan, manager)
    assert "umT5" not in manager.streamers and id(text) in manager.offloaders
    with manager.using(text):
        assert torch.equal(forward(x), expected)
    assert torch.equal(forward(x), expected)


def test_registered_host_memory_is_released_with_its_owner(monkeypatch):
    """cudaHostRegister'ed buffers live as long as their owner: when it is collected, the copies
    are waited for, then the memory is unregistered (CUDA's calls stubbed: no GPU here)."""
    import gc

    from talkgen.runtime import offload

    calls = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, nbytes, flags):
            calls.append(("register", ptr, nbytes))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())

    class Owner:
        pass

    owner = Owner()
    buffer = offload.pinned_buffer(1000, owner, synchronize=lambda: calls.append(("synchronize",)))
    ptr = buffer.data_ptr()
    del buffer
    gc.collect()
    assert calls == [("register", ptr, 1000)]  # the owner lives: still registered (and allocated)
    del owner
    gc.collect()
    assert calls == [("register", ptr, 1000), ("synchronize",), ("unregister", ptr)]


def test_compiled_forward_keeps_weight_movement_outside():
    """The streamed blocks' two halves compile once for all blocks (hooks stay eager) and give the
    same output; Dynamo's eager backend checks the tracing without Inductor's C++ compile."""
    from torch._dynamo.testing import CompileCounter

    from talkgen.runtime.compile import compile_blocks

    torch._dynamo.reset()
    reference, streamed = tiny_dit(), tiny_dit()
    BlockStreamer(streamed.blocks, HostEngine(), resident=2, slots=2)
    counter = CompileCounter()
    compile_blocks(streamed.blocks, backend=counter)
    inputs = dit_inputs(reference.config)
    with torch.no_grad():
        expected = reference(**inputs)
        assert torch.equal(streamed(**inputs), expected)
        assert torch.equal(streamed(**inputs), expected)
    assert counter.frame_count == 2  # one graph per half for the six blocks, resident and streamed alike
    torch._dynamo.reset()


class Scaled(torch.Tensor):
    """A minimal quantized-weight-like subclass: ``data * scale`` with per-row scales (as torchao's
    Float8Tensor holds ``qdata`` and ``scale``), for testing on the CPU without torchao."""

    @staticmethod
    def __new__(cls, data, scale):
        return torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=data.dtype, device=data.device)

    def __init__(self, data, scale):
        self.qdata, self.scale = data, scale

    def __tensor_flatten__(self):
        return ["qdata", "scale"], None

    @staticmethod
    def __tensor_unflatten__(inner, context, size, stride):
        return Scaled(inner["qdata"], inner["scale"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_map

        if func is torch.ops.aten.detach.default:
            return Scaled(args[0].qdata, args[0].scale)
        plain = tree_map(lambda t: t.qdata * t.scale if isinstance(t, Scaled) else t, (args, kwargs or {}))
        return func(*plain[0], **plain[1])


def test_tensor_subclass_weights_stream_by_their_inner_tensors():
    """fp8 weights are tensor subclasses (torchao's Float8Tensor): they stream by their inner tensors."""

    def subclassed(model):
        for block in model.blocks:
            linear = block.ffn[0]
            weight = linear.weight.data
            scale = weight.abs().amax(1, keepdim=True)
            linear.weight = nn.Parameter(Scaled(weight / scale, scale), requires_grad=False)
        return model

    reference, streamed = subclassed(tiny_dit(layers=4)), subclassed(tiny_dit(layers=4))
    streamer = BlockStreamer(streamed.blocks, HostEngine(), resident=0, slots=2)
    assert isinstance(streamed.blocks[3].ffn[0].weight, Scaled)
    assert [path for path, _ in inner_tensors(streamed.blocks[3].ffn[0].weight)] == [("qdata",), ("scale",)]
    inputs = dit_inputs(reference.config)
    with torch.no_grad():
        expected = reference(**inputs)
        assert torch.equal(streamed(**inputs), expected)
        assert torch.equal(streamed(**inputs), expected)
    assert streamer.streamed == [0, 1, 2, 3]


def test_fp8_blocks_stream_when_torchao_is_present():
    """torchao's Float8Tensor on the CPU (weight-only path there): the streamed fp8 model gives
    exactly the resident fp8 model's output."""
    pytest.importorskip("torchao", reason="torchao is the optional fp8 extra (pip install 'talkgen[fp8]')")
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    def to_fp8(model):
        for block in model.blocks:
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    module.weight = nn.Parameter(Float8Tensor.from_hp(module.weight.data, granularity=PerRow()), requires_grad=False)
        return model

    reference, streamed = to_fp8(tiny_dit(layers=4)), to_fp8(tiny_dit(layers=4))
    BlockStreamer(streamed.blocks, HostEngine(), resident=1, slots=2)
    inputs = dit_inputs(reference.config)
    with torch.no_grad():
        expected = reference(**inputs)
        assert torch.equal(streamed(**inputs), expected)


# -- whole modules on the device only while used ------------------------------------------------


def test_module_offloader_round_trip():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    model[1].register_buffer("extra", torch.arange(5.0))
    x = torch.randn(3, 8)
    expected = model(x)
    offloader = ModuleOffloader(model, HostEngine(), name="toy")
    host_ptr = model[0].weight.untyped_storage().data_ptr()
    with offloader.on_device():
        assert offloader.device_flat is not None
        assert model[0].weight.untyped_storage().data_ptr() != host_ptr  # the device copy
        assert torch.equal(model(x), expected)
        with offloader.on_device():  # nested uses keep one copy
            assert offloader.depth == 2
    assert offloader.device_flat is None and offloader.depth == 0
    assert model[0].weight.untyped_storage().data_ptr() == host_ptr
    assert torch.equal(model[1].extra, torch.arange(5.0))


# -- planning ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_sizes():
    return estimate_sizes(tiny=False, dtype=torch.bfloat16, fp8=False)


def test_full_size_estimates(full_sizes):
    s = full_sizes
    assert s.dit_blocks == 40 and s.text_blocks == 24
    assert 34 * GiB < s.dit < 36 * GiB  # 18.88 B parameters in bf16 (modulation in float32)
    assert 0.85 * GiB < s.dit_block < 0.9 * GiB
    assert 10 * GiB < s.text < 11 * GiB
    fp8 = estimate_sizes(tiny=False, dtype=torch.bfloat16, fp8=True)
    assert 0.48 < fp8.dit_block / s.dit_block < 0.52


def test_umt5_buffers_are_counted_in_every_phase(full_sizes):
    """umT5's two streaming buffers stay on the device from load on: they add to the peak even
    where the VAE encode is the largest phase (as it is at full size)."""
    more = dataclasses.replace(full_sizes, text_block=full_sizes.text_block + GiB)
    assert full_sizes.vae + full_sizes.vae_encode_workspace > max(full_sizes.dit_workspace, full_sizes.text_other)
    for resident in (0, 10, 40):
        grown = estimate_peak(more, "stream-blocks", resident) - estimate_peak(full_sizes, "stream-blocks", resident)
        assert grown == 2 * GiB


def test_budget_above_free_memory_is_not_trusted(full_sizes):
    plan = plan_memory("auto", 40, fp8=False, sizes=full_sizes, free_bytes=20 * GiB)
    assert plan.tier == "stream-blocks" and plan.resident_blocks == resident_blocks_for(full_sizes, 20 * GiB)
    assert plan.estimated_peak + GiB // 2 <= 20 * GiB
    assert len(plan.notes) == 1 and "more than the 20.0 GiB free" in plan.notes[0]
    below = plan_memory("auto", 12, fp8=False, sizes=full_sizes, free_bytes=20 * GiB)
    assert below.resident_blocks == resident_blocks_for(full_sizes, 12 * GiB) and not below.notes
    assert "480p" in plan.describe() and "720p" in plan.describe()  # the estimate says what it is for


def test_budget_of_12_gib_keeps_the_peak_under_it(full_sizes):
    budget = 12 * GiB
    resident = resident_blocks_for(full_sizes, budget)
    # bf16: the untiled VAE encode (measured 6.8 GiB of activations) leaves no room for resident
    # blocks under 12 GiB: all 40 stream (which sampled at the resident speed on an H100)
    assert 0 <= resident < 40
    assert estimate_peak(full_sizes, "stream-blocks", resident) <= budget
    assert estimate_peak(full_sizes, "stream-blocks", resident + 1) > budget - GiB // 2
    plan = plan_memory("auto", 12, fp8=False, sizes=full_sizes, free_bytes=80 * GiB)
    assert plan.tier == "stream-blocks" and plan.resident_blocks == resident and plan.vae_tiling
    assert plan.estimated_peak <= budget and not plan.notes


def test_auto_picks_the_first_tier_that_fits(full_sizes):
    def tier(free_gib, fp8=False):
        return plan_memory("auto", None, fp8=fp8, sizes=full_sizes, free_bytes=int(free_gib * GiB)).tier

    assert tier(79) == "resident"
    assert tier(50) == "offload-encoders"
    assert tier(24) == "stream-blocks"
    fp8_sizes = estimate_sizes(tiny=False, dtype=torch.bfloat16, fp8=True)
    auto = plan_memory("auto", None, fp8=True, sizes=fp8_sizes, free_bytes=46 * GiB)
    assert auto.tier == "resident" and auto.fp8  # 41.4 GiB with fp8 blocks
    auto = plan_memory("auto", None, fp8=True, sizes=fp8_sizes, free_bytes=32 * GiB)
    assert auto.tier == "offload-encoders" and auto.fp8  # 29.7 GiB
    assert plan_memory("auto", None, fp8=False, sizes=full_sizes, free_bytes=None).tier == "resident"  # the CPU
    # "fp8" is not a step of "auto": every free size gives one of the three tiers
    assert {plan_memory("auto", None, fp8=True, sizes=fp8_sizes, free_bytes=gib * GiB).tier for gib in range(1, 81)} \
        == {"resident", "offload-encoders", "stream-blocks"}


def test_fp8_setting_is_offload_encoders_with_fp8(full_sizes):
    fp8_sizes = estimate_sizes(tiny=False, dtype=torch.bfloat16, fp8=True)
    plan = plan_memory("fp8", None, fp8=True, sizes=fp8_sizes, free_bytes=80 * GiB)
    assert plan.tier == "offload-encoders" and plan.fp8 and plan.offload_encoders and not plan.stream_text
    assert plan.estimated_peak == estimate_peak(fp8_sizes, "offload-encoders")
    with pytest.raises(ValueError, match="no estimate"):
        estimate_peak(fp8_sizes, "fp8")


@pytest.mark.parametrize("fp8", [None, False, "on"])
def test_fp8_setting_without_fp8_gemms_names_the_tiers_to_choose(fp8):
    """One error, whatever --fp8/--no-fp8 says (not "run with --no-fp8", which then said "drop --no-fp8")."""
    from talkgen.runtime.memory import resolve_plan

    with pytest.raises(ResourceError, match=r"memory tier 'fp8' needs fp8 GEMMs \(.+\); choose offload-encoders or stream-blocks"):
        resolve_plan(torch.device("cpu"), "fp8", None, fp8, tiny=True, dtype=torch.float32)


def test_too_small_budget_is_said_and_explicit_tiers_are_kept(full_sizes):
    plan = plan_memory("stream-blocks", 2, fp8=False, sizes=full_sizes, free_bytes=None)
    assert plan.resident_blocks == 0 and plan.notes and "over the" in plan.notes[0]
    assert plan_memory("offload-encoders", None, fp8=False, sizes=full_sizes, free_bytes=None).offload_encoders
    with pytest.raises(ResourceError, match="fp8"):
        plan_memory("fp8", None, fp8=False, sizes=full_sizes, free_bytes=None)


def test_settings_from_arguments_and_environment(monkeypatch):
    monkeypatch.setenv("TALKGEN_MEMORY", "stream_blocks")
    monkeypatch.setenv("TALKGEN_VRAM_BUDGET_GB", "12")
    assert parse_memory(None) == "stream-blocks" and parse_budget(None) == 12.0
    assert parse_memory("resident") == "resident" and parse_budget(8) == 8.0
    with pytest.raises(ResourceError, match="choose one of"):
        parse_memory("tiny-gpu")
    with pytest.raises(ResourceError, match="GiB"):
        parse_budget("twelve")


# -- the pipeline ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from talkgen.pipeline.tiny import ensure_tiny_weights

    return ensure_tiny_weights(tmp_path_factory.mktemp("tiny"))


def run_clip(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Text, image and condition encodings, 2 sampling steps and the decode of one tiny clip."""
    from talkgen.media.samples import sample_portrait

    frames = np.ascontiguousarray(sample_portrait((64, 64)))
    config = pipe.dit.config
    audio = [torch.randn(5, config.audio_layers, config.audio_channels, generator=torch.Generator().manual_seed(3))]
    context, context_null = pipe.encode_text("A person is talking.")
    latent = pipe.generate_latents(frames, audio, context=context, context_null=context_null, frame_num=5, steps=2)
    return latent, pipe.decode(latent)


@pytest.mark.slow
@pytest.mark.parametrize("tier", ["offload-encoders", "stream-blocks"])
def test_pipeline_tiers_match_resident(tiny_dir: Path, tier: str):
    from talkgen.pipeline.pipeline import Pipeline

    resident = Pipeline.from_pretrained(tiny_dir, "multitalk", device="cpu", memory="resident")
    assert resident.memory.plan.tier == "resident" and not resident.memory.offloaders
    tiered = Pipeline.from_pretrained(tiny_dir, "multitalk", device="cpu", memory=tier, vram_budget_gb=0)
    tiered.memory.trace = []
    if tier == "stream-blocks":
        tiered.vae.set_tiling(False)  # compare like with like: tiling is tested on its own
        streamer = tiered.memory.streamers["DiT"]
        assert streamer.resident == [] and len(streamer.streamed) == 2  # a budget of 0: every block streamed
        assert "umT5" in tiered.memory.streamers
    latent, video = run_clip(tiered)
    expected_latent, expected_video = run_clip(resident)
    assert torch.equal(latent, expected_latent) and torch.equal(video, expected_video)
    names = [name for _, name in tiered.memory.trace]
    assert {"text encoder", "image encoder", "VAE"} <= set(names)
    assert tiered.memory.trace[0] == ("on", "text encoder") and tiered.memory.trace[1] == ("off", "text encoder")
    for offloader in tiered.memory.offloaders.values():  # nothing left on the "device" after use
        assert offloader.device_flat is None


def test_fp8_tier_without_fp8_support_errors_clearly(tiny_dir: Path):
    from talkgen.pipeline.pipeline import Pipeline

    with pytest.raises(ResourceError, match="needs fp8 GEMMs .*choose offload-encoders or stream-blocks"):
        Pipeline.from_pretrained(tiny_dir, "multitalk", device="cpu", memory="fp8")


def test_plan_on_cpu_is_resident_by_default(tiny_dir: Path):
    from talkgen.runtime.memory import resolve_plan

    plan = resolve_plan(torch.device("cpu"), None, None, None, tiny=True, dtype=torch.float32)
    assert isinstance(plan, MemoryPlan) and plan.tier == "resident" and not plan.fp8


# -- the prompt cache -----------------------------------------------------------------------------


class CountingEncoder:
    def __init__(self):
        self.calls: list[list[str]] = []

    def encode(self, texts):
        self.calls.append(list(texts))
        return [torch.full((2, 4), float(len(t))) for t in texts]


def test_prompt_embeddings_are_cached_by_prompt_pair():
    from talkgen.pipeline.pipeline import Pipeline

    pipe = Pipeline(dit=None, vae=None, text_encoder=CountingEncoder(), text_cache_size=2)
    first = pipe.encode_text("hello", "bad")
    assert pipe.encode_text("hello", "bad")[0] is first[0]
    assert len(pipe.text_encoder.calls) == 1 and pipe.text_encoder.calls[0] == ["hello", "bad"]
    pipe.encode_text("hello", "worse")
    pipe.encode_text("bye", "")  # the default negative prompt
    assert len(pipe.text_encoder.calls) == 3
    pipe.encode_text("hello", "bad")  # evicted (least recently used of a cache of 2): encoded again
    assert len(pipe.text_encoder.calls) == 4
    pipe.encode_text("bye", "")
    assert len(pipe.text_encoder.calls) == 4
    same = pipe.encode_text("same", "same")
    assert same[0] is same[1] and pipe.text_encoder.calls[-1] == ["same"]
