"""Sequence-parallel (Ulysses) DiT on CPU: 2 and 4 gloo processes against one process and the golden."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from talkgen.runtime.parallel import SequenceParallel, frame_segments
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
        outs = torch.load(out_dir / f"rank{rank}.pt")
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
            self.group, self.rank, self.world, self._plans = None, 0, 3, {}

    with pytest.raises(ValueError, match="4 heads cannot be split over 3"):
        Fake().plan((3, 4, 8), 4)
    plan = Fake().plan((3, 4, 7), 6)  # 84 tokens, 28 each
    assert (plan.local, plan.start, plan.valid, plan.padded) == (28, 0, 28, 84)
