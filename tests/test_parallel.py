"""Sequence-parallel (Ulysses) DiT on CPU: 2 and 4 gloo processes against one process and the golden."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from talkgen.models.dit import DiTConfig
from talkgen.runtime.parallel import SequenceParallel, frame_segments, pack_tensors, unpack_tensors
from talkgen.weights.dit import load_dit

from conftest import golden_params, meta_json, read_golden, rel_err
from test_dit import golden_weights, write_original_layout


def test_frame_segments() -> None:
    # frames of 10 tokens
    assert frame_segments(0, 30, 10) == [(0, 30, 0, 3)]
    assert frame_segments(5, 30, 10) == [(5, 10, 0, 1), (10, 30, 1, 3)]
    assert frame_segments(5, 27, 10) == [(5, 10, 0, 1), (10, 20, 1, 2), (20, 27, 2, 3)]
    assert frame_segments(12, 17, 10) == [(12, 17, 1, 2)]
    assert frame_segments(10, 20, 10) == [(10, 20, 1, 2)]
    assert frame_segments(7, 7, 10) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cases(tensors: dict, meta: dict) -> dict[str, dict]:
    cases = {}
    for case in meta_json(meta, "cases"):
        inputs = {k.split(".inputs.")[1]: v for k, v in tensors.items() if k.startswith(f"{case}.inputs.")}
        cases[case] = dict(
            x=inputs["x"][None], t=inputs["t"], y=inputs["y"][None], context=[inputs["context"]],
            clip_fea=inputs["clip_fea"], audio=inputs["audio"][None], ref_target_masks=inputs["ref_target_masks"],
        )
        # a grid whose token count (3 frames x 3 x 7 = 63) divides by neither 2 nor 4, so shards
        # are padded and cut frames: compared with one process only
        crop = dict(cases[case], x=inputs["x"][None, :, :, :6, :14], y=inputs["y"][None, :, :, :6, :14])
        cases[f"{case}_cropped"] = crop
    return cases


def _worker(rank: int, world: int, port: int, base: str, audio_file: str, golden: str, mode: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        tensors, meta = read_golden(Path(golden))
        model, _ = load_dit(Path(base), Path(audio_file), dtype=torch.float32)
        sp = SequenceParallel(all_to_all=mode)
        outs = {}
        with torch.no_grad():
            for name, inputs in _cases(tensors, meta).items():
                outs[name] = model(**inputs, parallel=sp)
        torch.save(outs, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,mode", [(2, "native"), (4, "gather")])
@pytest.mark.parametrize("path", golden_params("multitalk_dit_"))
def test_parallel_matches_single_process(path: Path, world: int, mode: str, tmp_path: Path) -> None:
    tensors, meta = read_golden(path)
    config = meta_json(meta, "config")
    assert config["num_heads"] % world == 0
    base, audio_file = write_original_layout(golden_weights(tensors), config, tmp_path / "weights")
    model, _ = load_dit(base, audio_file, dtype=torch.float32)
    cases = _cases(tensors, meta)
    with torch.no_grad():
        single = {name: model(**inputs) for name, inputs in cases.items()}

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mp.spawn(_worker, args=(world, _free_port(), str(base), str(audio_file), str(path), mode, str(out_dir)),
             nprocs=world, join=True)
    for rank in range(world):
        outs = torch.load(out_dir / f"rank{rank}.pt", weights_only=True)
        for name, ref in single.items():
            out = outs[name]
            assert out.shape == ref.shape, name
            err = rel_err(out, ref)
            assert err <= 1e-5, f"{name} rank {rank}/{world}: rel err {err:.2e} vs one process"
            if not name.endswith("_cropped"):
                golden_err = rel_err(out[0], tensors[f"{name}.expected.out"])
                assert golden_err <= 1e-4, f"{name} rank {rank}/{world}: rel err {golden_err:.2e} vs golden"


def test_heads_must_divide() -> None:
    class Fake(SequenceParallel):
        def __init__(self) -> None:  # no process group needed for planning
            self.group, self.rank, self.world, self._plans, self.chunks = None, 0, 3, {}, 2

    with pytest.raises(ValueError, match="4 heads cannot be split over 3"):
        Fake().plan((3, 4, 8), 4)
    plan = Fake().plan((3, 4, 7), 6)  # 84 tokens, 28 each
    assert (plan.local, plan.start, plan.valid, plan.padded) == (28, 0, 28, 84)


# -- 8 ranks, and the head groups of the overlapped exchange -------------------------------------

WIDE_HEADS = DiTConfig(  # the tiny model's shape with 8 heads, so 8 ranks get one each
    dim=64, ffn_dim=128, num_heads=8, num_layers=2, text_dim=64, image_dim=64, audio_layers=3, audio_channels=32,
    intermediate_dim=32, output_dim=32, context_tokens=4,
)


def _random_inputs(config: DiTConfig, grid: tuple[int, int, int], people: int, batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(3)
    t, h, w = grid
    frames = 4 * (t - 1) + 1
    masks = torch.zeros(3, 2 * h, 2 * w)
    masks[0, :, :w], masks[1, :, w:] = 1, 1
    masks[2] = 1 - masks[0] - masks[1]
    return dict(
        x=torch.randn(batch, 16, t, 2 * h, 2 * w, generator=g), y=torch.randn(batch, 20, t, 2 * h, 2 * w, generator=g),
        t=torch.full((batch,), 700.0), context=[torch.randn(7, config.text_dim, generator=g) for _ in range(batch)],
        clip_fea=torch.randn(batch, 5, config.image_dim, generator=g),
        audio=torch.randn(batch, people, frames, config.audio_window, config.audio_layers, config.audio_channels,
                          generator=g),
        ref_target_masks=masks if people == 2 else None,
    )


# (grid, people, batch): 3x4x4 = 48 tokens split evenly; 3x3x7 = 63 tokens padded, shards cut
# frames; a batch of 2 (guidance passes batched in one forward)
WIDE_CASES = [((3, 4, 4), 1, 1), ((3, 3, 7), 2, 1), ((3, 3, 7), 1, 2)]


def _wide_model():
    from talkgen.models.dit import WanMultiTalkDiT
    from talkgen.pipeline.tiny import tiny_dit_state

    model = WanMultiTalkDiT(WIDE_HEADS)
    model.load_state_dict(tiny_dit_state(WIDE_HEADS, seed=5))
    return model.eval()


def _wide_worker(rank: int, world: int, port: int, variants: list[tuple[str, int]], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _wide_model()
        outs = {}
        with torch.no_grad():
            for exchange, chunks in variants:
                sp = SequenceParallel(chunks=chunks, exchange=exchange)
                for case in WIDE_CASES:
                    plan = sp.plan(case[0], WIDE_HEADS.num_heads)
                    outs[(exchange, chunks, *case)] = (model(**_random_inputs(WIDE_HEADS, *case), parallel=sp),
                                                       plan.head_groups)
        torch.save(outs, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


BOTH = [("all_to_all", 1), ("p2p", 1)]
GROUPS = [(exchange, chunks) for exchange in ("all_to_all", "p2p") for chunks in (1, 2, 4)]


@pytest.mark.parametrize("world,variants", [pytest.param(8, BOTH, id="8ranks", marks=pytest.mark.slow),
                                            pytest.param(2, GROUPS, id="2ranks-head-groups")])
def test_wide_model_matches_single_process(world: int, variants: list, tmp_path: Path) -> None:
    """8 ranks (one head each), and 2 ranks with the 4 local heads exchanged as 1, 2 or 4
    groups; all-to-all and point-to-point exchanges."""
    model = _wide_model()
    with torch.no_grad():
        single = {case: model(**_random_inputs(WIDE_HEADS, *case)) for case in WIDE_CASES}
    mp.spawn(_wide_worker, args=(world, _free_port(), variants, str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        outs = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for exchange, chunks in variants:
            for case in WIDE_CASES:
                out, groups = outs[(exchange, chunks, *case)]
                assert groups == min(chunks, WIDE_HEADS.num_heads // world)
                err = rel_err(out, single[case])
                assert err <= 1e-5, f"rank {rank}/{world}, {exchange}, {groups} head groups, {case}: {err:.2e}"


def test_pack_tensors_round_trip() -> None:
    values = dict(x=torch.randn(2, 3), flags=torch.tensor([True, False, True]), none=None,
                  context=[torch.randn(5, 4).to(torch.bfloat16), torch.arange(7, dtype=torch.int64)])
    layout, buffer = pack_tensors(values, torch.device("cpu"))
    assert buffer.dtype == torch.uint8 and buffer.numel() % 16 == 0
    back = unpack_tensors(layout, buffer)
    assert back["none"] is None
    assert torch.equal(back["x"], values["x"]) and torch.equal(back["flags"], values["flags"])
    assert all(torch.equal(a, b) for a, b in zip(back["context"], values["context"]))


# -- TeaCache decisions agreed by every rank -------------------------------------------------------

TEACACHE_STEPS = 10
# Ranks that decided alone: rank 0 (every step looks alike) skips at 5, 6, 7, 9 and computes at 8;
# rank 1 sees a jump at step 6 (its second comparison) and computes there. Agreed (compute if any
# rank computes), both skip at 5, compute at 6 (rank 0's accumulator reset too), then skip 7-9.
AGREED = [True] * 5 + [False, True, False, False, False]


def _teacache_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from datetime import timedelta

    import talkgen.sampling.teacache as teacache
    from talkgen.runtime.parallel import ParallelDiT
    from talkgen.sampling.teacache import TeaCache

    torch.set_num_threads(1)
    calls = iter(range(100))
    # each rank its own signal; apart, rank 0 would skip step 6 while rank 1 enters the blocks'
    # all-to-alls (a hang: the 60 s timeout makes it an error)
    teacache.relative_l1 = lambda signal, previous: 1.0 if rank == 1 and next(calls) == 1 else 0.0
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        dit = ParallelDiT(_wide_model(), SequenceParallel())
        if rank == 0:
            cache = TeaCache(TEACACHE_STEPS, 0.5)
            inputs = _random_inputs(WIDE_HEADS, (3, 4, 4), 1)
            with torch.no_grad():
                for step in range(TEACACHE_STEPS):
                    runner = cache.runner(("cond",), step)
                    runner.teacache = (cache, ("cond",), step)
                    dit(**inputs, block_runner=runner)
            dit.done(result={})
            dit.close()
        else:
            assert dit.follow()[0] == "done"
            cache = next(iter(dit._caches.values()))
            dit.release()
        torch.save(cache.table(["cond"]), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_teacache_decisions_agree_across_ranks(tmp_path: Path) -> None:
    """Ranks whose own TeaCache decisions differ still skip the blocks together."""
    mp.spawn(_teacache_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    tables = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert tables[0] == tables[1] == [[c] for c in AGREED]
