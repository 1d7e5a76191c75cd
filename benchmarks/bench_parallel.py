"""Sequence-parallel (Ulysses) DiT across the GPUs of one host vs one GPU of the same machine.

Full-size random weights (same seed on every rank, checked), 448x896x81 by default. In one run,
for each speaker count:

1. rank 0 alone times the single-GPU forward (the other ranks wait);
2. all ranks time the sharded forward once per ``--exchange`` x ``--chunks`` variant: the
   self-attention exchange as all-to-alls (buffers reshaped on arrival) or as batched
   point-to-point sends straight into the layout attention reads ("p2p", fewer copies), in 1
   (q, k and v in one exchange, nothing overlapped), 2 or 4 head groups per rank (each group's
   traffic overlaps its neighbours' attention);
3. the pipeline's path (``ParallelDiT``): rank 0 calls the DiT as the sampler does, sending each
   forward's inputs to the other ranks, which follow.

Rank 0 checks every parallel output against its single-GPU output (bf16, rel err <= 1e-2) and
writes ``$OUT/parallel<tag>_<N>gpu_<eager|compiled>_<people>p.json`` with all of it. On the GPU
machine:

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_parallel.py --compile
"""

from __future__ import annotations

import os

# NVLink multicast stays off on the lent machines (KINDS.md); set before torch initialises NCCL.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_dit import inputs  # noqa: E402
from benchmarks.common import cuda_time, median, peak_rss_gib, random_dit, save  # noqa: E402
from talkgen.models.dit import DiTConfig  # noqa: E402
from talkgen.runtime.compile import compile_blocks  # noqa: E402
from talkgen.runtime.parallel import ParallelDiT, SequenceParallel  # noqa: E402


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def broadcast_inputs(cond: dict) -> dict:
    """Rank 0's inputs on every rank (the same seed would do on identical GPUs; this makes sure)."""
    for value in cond.values():
        for t in value if isinstance(value, list) else [value]:
            if isinstance(t, torch.Tensor):
                dist.broadcast(t, src=0)
    return cond


def weights_agree(model) -> bool:
    """Every rank built the same random weights (a checksum of a few tensors)."""
    names = ["patch_embedding.weight", "blocks.0.self_attn.q.weight", "blocks.0.modulation", "head.head.weight"]
    params = dict(model.named_parameters())
    local = torch.stack([params[n].double().sum() for n in names])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def wall_time(fn, warmup: int = 1, reps: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gpu_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def timed(fn, timer, warmup: int, reps: int) -> dict:
    reset_peak()
    times = timer(fn, warmup=warmup, reps=reps)
    return dict(nfe_s=median(times), nfe_all=times, peak_gpu_gib=peak_gpu_gib())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=448)
    ap.add_argument("--width", type=int, default=896)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--people", default="1,2", help="comma-separated speaker counts to measure")
    ap.add_argument("--chunks", default="1,2,4", help="head groups per rank to measure (comma-separated)")
    ap.add_argument("--exchange", default="all_to_all,p2p", help="self-attention exchanges to measure")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-single", action="store_true", help="parallel timing only")
    ap.add_argument("--skip-pipeline", action="store_true", help="no ParallelDiT (leader/follower) timing")
    ap.add_argument("--all-to-all", default="auto", choices=["auto", "native", "gather"])
    ap.add_argument("--normal-priority", action="store_true", help="NCCL on normal-priority streams")
    ap.add_argument("--tag", default="")

    a = ap.parse_args()

    variants = [(e, int(c)) for e in a.exchange.split(",") for c in a.chunks.split(",")]
    base = SequenceParallel.from_env(all_to_all=a.all_to_all, exchange=variants[0][0], chunks=variants[0][1],
                                     high_priority=not a.normal_priority)
    rank, world = base.rank, base.world
    groups = {f"{e}/{c}": base if (e, c) == variants[0] else SequenceParallel(all_to_all=a.all_to_all, exchange=e,
                                                                             chunks=c)
              for e, c in variants}
    cuda = torch.cuda.is_available()
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"  # cpu: a gloo smoke test only
    timer = cuda_time if cuda else wall_time
    dtype = torch.bfloat16
    config = DiTConfig(num_layers=a.layers)
    model = random_dit(config, dtype, device=device, seed=0)
    same_weights = weights_agree(model)
    if a.compile:
        # one entry per speaker count and path; plans of equal shape share their guards
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        compile_blocks(model.blocks)
    warmup = 2 if a.compile else 1
    tokens = ((a.frames - 1) // 4 + 1) * (a.height // 16) * (a.width // 16)

    for people in [int(p) for p in a.people.split(",")]:
        cond = broadcast_inputs(inputs(config, a.frames, a.height, a.width, people, dtype, device=device))
        record = dict(impl="talkgen-ulysses", gpus=world, compiled=a.compile, dtype="bf16", layers=a.layers,
                      people=people, tokens=tokens, frames=a.frames, size=[a.height, a.width],
                      all_to_all=base.all_to_all_mode, nccl_high_priority=not a.normal_priority,
                      same_weights_all_ranks=same_weights,
                      env={k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")})
        reference = None
        if not a.skip_single:
            if rank == 0:  # one GPU of the same machine, the others idle at the barrier
                def single():
                    with torch.no_grad():
                        return model(**cond)

                record["single"] = timed(single, timer, warmup, a.reps)
                reference = single()
            dist.barrier()

        def check(out: torch.Tensor, entry: dict) -> None:
            if reference is not None:
                err = rel_err(out, reference)
                entry.update(rel_err_vs_single=err, equal_within_bf16=err <= 1e-2,
                             speedup=record["single"]["nfe_s"] / entry["nfe_s"])

        record["parallel"] = {}
        for variant, sp in groups.items():
            def parallel(sp=sp):
                with torch.no_grad():
                    return model(**cond, parallel=sp)

            entry = timed(parallel, timer, warmup, a.reps)
            out = parallel()
            dist.barrier()
            _, _, t_lat, h, w = cond["x"].shape
            entry["head_groups"] = sp.plan((t_lat, h // 2, w // 2), config.num_heads).head_groups
            # every rank holds the same gathered output
            same = torch.tensor([float(out.double().sum())], device=device)
            sums = [torch.empty_like(same) for _ in range(world)]
            dist.all_gather(sums, same)
            entry["same_output_all_ranks"] = all(torch.equal(s, sums[0]) for s in sums)
            check(out, entry)
            record["parallel"][variant] = entry
            del out

        if not a.skip_pipeline:  # the sampler's path: rank 0 leads, the others follow
            best = min(record["parallel"].items(), key=lambda item: item[1]["nfe_s"])[0]
            leader = ParallelDiT(model, groups[best])
            if rank == 0:
                def led():
                    with torch.no_grad():
                        return leader(**cond)

                entry = timed(led, timer, warmup, a.reps)
                check(led(), entry)
                leader.done()
                record["pipeline"] = dict(entry, variant=best)
            else:
                leader.follow()
            dist.barrier()

        if rank == 0:
            if reference is not None:
                fastest = min(record["parallel"].values(), key=lambda e: e["nfe_s"])
                record.update(single_nfe_s=record["single"]["nfe_s"], parallel_nfe_s=fastest["nfe_s"],
                              speedup=fastest.get("speedup"))
            record["peak_rss_gib"] = peak_rss_gib()
            save(f"parallel{a.tag}_{world}gpu_{'compiled' if a.compile else 'eager'}_{people}p", record)
        reference = None  # noqa: F841  (frees the single-GPU output before the next speaker count)
        if cuda:
            torch.cuda.empty_cache()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
