"""Several GPUs of one host for one pipeline: the processes, and the pipeline every rank calls.

``talkgen generate --gpus N`` (and ``worker`` / ``serve --gpus N``) starts N processes the way
``torchrun --standalone --nproc_per_node N`` does (:func:`launch`, through torch's elastic
launcher in this process, so an error stays one sentence and the exit code is rank 0's; under
``torchrun`` itself the command runs as it is). Each process runs the same command with the
torchrun environment set; :func:`launched_parallel` gives it the
:class:`~talkgen.runtime.parallel.SequenceParallel` group (NCCL on GPU ``LOCAL_RANK``; gloo
where there is no GPU or with ``--device cpu``: N CPU processes, which is how the tests run it).

Every rank loads the model (:meth:`Pipeline.from_pretrained(..., parallel=sp)
<talkgen.pipeline.pipeline.Pipeline.from_pretrained>`); rank 0 keeps the whole pipeline, the
others only the DiT. Every rank calls :meth:`ParallelPipeline.generate` with the same request:
rank 0 reads the inputs, runs the encoders, the sampler and the VAE once, sends each DiT
forward's inputs to the other ranks, writes the mp4 and reports progress; the others run their
token shard of each forward and return the same :class:`Result` without frames. A worker's other
ranks need no request at all: they :meth:`ParallelPipeline.follow` until rank 0 closes.

From Python, under ``torchrun --nproc_per_node 2 script.py``::

    sp = SequenceParallel.from_env()
    pipe = Pipeline.from_pretrained("WEIGHTS", parallel=sp)
    result = pipe.generate(request, output="talk.mp4")      # every rank; rank 0 writes the file
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from talkgen import errors
from talkgen.pipeline.pipeline import Pipeline, Result
from talkgen.runtime.parallel import ParallelError, SequenceParallel, release_all

LAUNCHED = "TALKGEN_LAUNCHED"  # set in the processes :func:`launch` starts


def launched() -> bool:
    """This process is one of the ranks :func:`launch` (or torchrun itself) started."""
    return "RANK" in os.environ and (os.environ.get(LAUNCHED) == "1" or "TORCHELASTIC_RUN_ID" in os.environ)


def uses_cpu(device: str | None) -> bool:
    return (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()


def rank_device(device: str | None) -> str:
    """This rank's device: GPU ``LOCAL_RANK`` (``CUDA_VISIBLE_DEVICES`` picks the set), or the CPU."""
    return "cpu" if uses_cpu(device) else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


_parallel: SequenceParallel | None = None


def launched_parallel(device: str | None = None) -> SequenceParallel | None:
    """The sequence-parallel group of a launched process (created once), else None."""
    global _parallel
    if _parallel is None and launched() and world_size() > 1:
        _parallel = SequenceParallel.from_env(backend="gloo" if uses_cpu(device) else "nccl")
        atexit.register(shutdown)
    return _parallel


def shutdown() -> None:
    """Pair rank 0's last message with the other ranks and take the process group down (at the
    end of a launched command; also at exit, where atexit runs)."""
    release_all()
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # pragma: no cover - a broken group at exit
            pass


# ------------------------------------------------------------------------------------------------
# Starting the processes


def launch(command: str, nprocs: int, params: dict, device: str | None = None) -> int:
    """Run the CLI command ``command`` with ``params`` in ``nprocs`` processes (torchrun
    ``--standalone --nproc_per_node nprocs``); returns the exit code (rank 0's when one fails)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not uses_cpu(device) and torch.cuda.device_count() < nprocs:
        raise errors.ResourceError(f"--gpus {nprocs}: this machine has {torch.cuda.device_count()} visible GPU(s); "
                                   "ask for fewer, or pass --device cpu to run the processes on the CPU.")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", rdzv_configs={"rank": 0},
                          max_restarts=0, monitor_interval=0.5, start_method="spawn")
    quiet = logging.getLogger("torch.distributed.elastic")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the ranks say what went wrong; no launcher report on top
    try:
        elastic_launch(config, _rank_main)(command, params)
    except ChildFailedError as exc:
        failures = exc.failures
        first = failures.get(0) or next(iter(failures.values()))
        return first.exitcode if first.exitcode and first.exitcode > 0 else 1
    except SignalException as exc:  # SIGTERM / SIGINT to this process: the ranks got it too
        return 128 + int(exc.sigval)
    finally:
        quiet.setLevel(level)
    return 0


def _rank_main(command: str, params: dict) -> None:
    """One launched process: the same CLI command, run as this rank (only rank 0 reports progress;
    the errors of another rank go to stderr after "rank N:", see :func:`talkgen.cli.print_error`)."""
    import click

    from talkgen import cli

    os.environ[LAUNCHED] = "1"
    if uses_cpu(params.get("device")):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size()))
    try:
        getattr(cli, command)(**params)
    except click.exceptions.Exit as exc:
        if exc.exit_code:
            raise SystemExit(exc.exit_code) from None
    finally:
        shutdown()  # spawned processes do not run atexit


# ------------------------------------------------------------------------------------------------
# The pipeline every rank calls


def result_summary(result: Result) -> dict:
    return {"video_path": None if result.video_path is None else str(result.video_path), "num_frames": result.num_frames,
            "fps": result.fps, "seed": result.seed, "notes": list(result.notes)}


def raise_leader_error(payload: dict) -> None:
    """Rank 0's error, raised again on another rank (the same TalkgenError class where it is one).
    It is marked ``reported_by_rank_0``: rank 0 prints it, the CLI of the other ranks does not."""
    cls = getattr(errors, payload["error"], None)
    if isinstance(cls, type) and issubclass(cls, errors.TalkgenError):
        error = cls(payload["message"])
    else:
        error = ParallelError(f"rank 0 failed: {payload['error']}: {payload['message']}")
    error.reported_by_rank_0 = True
    raise error


class ParallelPipeline(Pipeline):
    """A pipeline whose DiT runs sequence-parallel: every rank calls :meth:`generate`."""

    @functools.wraps(Pipeline.generate)
    def generate(self, *args, **kwargs):
        if not self.parallel.leads:
            kind, payload = self.parallel.follow()
            if kind == "close":
                raise ParallelError("rank 0 closed the group during generate()")
            if "error" in payload:
                raise_leader_error(payload)
            summary = dict(payload["result"])
            path = summary.pop("video_path")
            return Result(video_path=None if path is None else Path(path), **summary)
        try:
            result = super().generate(*args, **kwargs)
        except BaseException as exc:
            self.parallel.done(error=exc)
            raise
        self.parallel.done(result=result_summary(result))
        return result

    def follow(self) -> None:
        """Ranks other than 0 of a worker: run the DiT shards of every job until rank 0 closes."""
        while True:
            kind, _ = self.parallel.follow()
            if kind == "close":
                return

    def close(self) -> None:
        """Rank 0: release the other ranks (also done at exit)."""
        if self.parallel.leads:
            self.parallel.close()
