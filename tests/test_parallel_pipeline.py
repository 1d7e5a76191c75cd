"""Several processes for one video (gloo, CPU): the pipeline, `talkgen generate --gpus 2` and a
worker spanning two ranks, each against one process, with the tiny model."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
import torch.multiprocessing as mp
from PIL import Image
from typer.testing import CliRunner

from talkgen.media.samples import sample_portrait, sample_speech

from conftest import rel_err

# Two speakers, two streaming chunks (9 frames, then 4 more after 5 of context) and TeaCache
# skipping blocks at step 5 (after its 5 always-computed steps): every path of the parallel DiT in
# one short request. The tiny model's random time embedding moves too much between steps for
# TeaCache ever to skip, so :func:`_still_signal` makes every step look alike, in every process.
STREAM = dict(prompt="Two people talking.", mode="streaming", frame_num=9, motion_frame=5, max_frames=13,
              sample_steps=6, audio_type="para", use_teacache=True, teacache_thresh=10.0, seed=7)


def _still_signal() -> None:
    import talkgen.sampling.teacache as teacache

    teacache.relative_l1 = lambda signal, previous: 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    from talkgen.pipeline.tiny import ensure_tiny_weights

    return ensure_tiny_weights(tmp_path_factory.mktemp("tiny-weights"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    portrait, speech = folder / "portrait.png", folder / "speech.wav"
    Image.fromarray(sample_portrait((300, 400))).save(portrait)
    sf.write(speech, sample_speech(1.3, 22_050), 22_050)
    return {"image": portrait, "audio": speech}


def _stream_request(inputs: dict):
    from talkgen.pipeline.request import GenerationRequest

    return GenerationRequest.parse(dict(STREAM, cond_image=str(inputs["image"]),
                                        cond_audio={"person1": str(inputs["audio"]), "person2": str(inputs["audio"])}))


def _as_rank(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives a rank, as `talkgen ... --gpus N` starts it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TALKGEN_LAUNCHED="1")
    torch.set_num_threads(1)


def _spy_on_encoder_loaders() -> list[str]:
    """Record every load of a text, image or audio encoder or a VAE in this process."""
    from talkgen.models.audio_encoder import AudioEncoder
    from talkgen.models.image_encoder import ImageEncoder
    from talkgen.models.text_encoder import TextEncoder
    from talkgen.models.vae import VideoVAE

    loaded: list[str] = []
    for cls, names in ((TextEncoder, ("from_original", "from_diffusers")), (ImageEncoder, ("from_original", "from_diffusers")),
                       (VideoVAE, ("from_original", "from_diffusers")), (AudioEncoder, ("from_pretrained",))):
        for name in names:
            load = getattr(cls, name).__func__

            def spy(owner, *args, _load=load, _what=f"{cls.__name__}.{name}", **kwargs):
                loaded.append(_what)
                return _load(owner, *args, **kwargs)

            setattr(cls, name, classmethod(spy))
    return loaded


def _generate_rank(rank: int, world: int, port: int, weights: str, inputs: dict, out_dir: str) -> None:
    from talkgen.pipeline.pipeline import Pipeline
    from talkgen.runtime.launch import launched_parallel

    _as_rank(rank, world, port)
    _still_signal()
    loaded = _spy_on_encoder_loaders()
    sp = launched_parallel("cpu")
    pipe = Pipeline.from_pretrained(weights, "tiny", device="cpu", parallel=sp)
    assert (pipe.vae is None) == (rank != 0)  # the VAE and the encoders live on rank 0 only
    # the other ranks do not even read them, and plan their memory for the DiT alone
    assert len(loaded) == (4 if rank == 0 else 0), loaded
    peak = pipe.memory.plan.estimated_peak
    latents, skipped = [], []

    def on_chunk(chunk) -> None:
        latents.append(chunk.latent.clone())
        skipped.append(chunk.teacache.skipped)

    result = pipe.generate(_stream_request(inputs), on_chunk=on_chunk)
    frames = None if result.frames is None else torch.from_numpy(np.ascontiguousarray(result.frames))
    torch.save({"frames": frames, "num_frames": result.num_frames, "seed": result.seed,
                "latents": latents, "skipped": skipped, "peak": peak}, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_pipeline_on_two_ranks_matches_one_process(tiny_weights: Path, inputs: dict, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import talkgen.sampling.teacache as teacache
    from talkgen.pipeline.pipeline import Pipeline

    monkeypatch.setattr(teacache, "relative_l1", lambda signal, previous: 0.0)  # as _still_signal

    pipe = Pipeline.from_pretrained(tiny_weights, "tiny", device="cpu")
    latents = []
    single = pipe.generate(_stream_request(inputs), on_chunk=lambda chunk: latents.append(chunk.latent))
    mp.spawn(_generate_rank, args=(2, _free_port(), str(tiny_weights), inputs, str(tmp_path)), nprocs=2, join=True)

    leader, follower = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert len(leader["latents"]) == len(latents) == 2
    assert all(n > 0 for n in leader["skipped"])  # TeaCache skipped passes, in step on both ranks
    for i, (out, ref) in enumerate(zip(leader["latents"], latents)):
        assert rel_err(out, ref) <= 1e-4, f"chunk {i}: latent rel err {rel_err(out, ref):.2e}"
    assert leader["frames"].shape == single.frames.shape
    assert np.abs(leader["frames"].numpy().astype(int) - single.frames.astype(int)).max() <= 1
    # the other rank made no frames and ran no chunk loop, but gets rank 0's result
    assert follower["frames"] is None and follower["latents"] == []
    assert (follower["num_frames"], follower["seed"]) == (single.num_frames, single.seed) == (13, 7)
    assert 0 < follower["peak"] < leader["peak"]  # the follower's memory plan counts no encoder or VAE


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(int)


@pytest.mark.slow
def test_cli_generate_gpus_2_on_cpu(tiny_weights: Path, inputs: dict, tmp_path: Path, capfd) -> None:
    """`--gpus 2` without GPUs: two CPU processes (torchrun's launcher); the same video, and an
    error stays one sentence with rank 0's exit code."""
    from talkgen.cli import app

    runner = CliRunner()
    common = ["generate", "--weights", tiny_weights, "--model", "tiny", "--image", inputs["image"], "--steps", 2,
              "--frame-num", 9, "--device", "cpu"]
    one, two = tmp_path / "one.mp4", tmp_path / "two.mp4"
    result = runner.invoke(app, [str(a) for a in common + ["--audio", inputs["audio"], "--output", one]])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [str(a) for a in common + ["--audio", inputs["audio"], "--output", two, "--gpus", 2]])
    assert result.exit_code == 0, result.output
    a, b = _frames(one), _frames(two)
    assert a.shape == b.shape == (9, 144, 176, 3)
    # the frames before h264 agree to 1/255 (the pipeline test); h264 may code them differently
    assert np.abs(a - b).mean() < 1.0

    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    capfd.readouterr()
    result = runner.invoke(app, [str(a) for a in common + ["--audio", bad, "--output", tmp_path / "bad.mp4", "--gpus", 2]])
    assert result.exit_code == 1
    # the ranks print to the terminal (stderr): rank 0 says it once; rank 1, which got it from
    # rank 0, does not repeat it
    err = capfd.readouterr().err
    assert err.count("error: ") == 1 and "bad.wav" in err and "rank 1:" not in err, err


# Loaded in every process started with this folder on PYTHONPATH (the ranks the launcher spawns):
# Pipeline.from_pretrained fails on the rank TALKGEN_TEST_FAIL_RANK names.
FAIL_ON_RANK = """
import os

if os.environ.get("TALKGEN_TEST_FAIL_RANK"):
    import torch
    from talkgen.pipeline.pipeline import Pipeline

    _load = Pipeline.from_pretrained.__func__

    def _fail_on_one_rank(cls, *args, **kwargs):
        if os.environ.get("RANK") == os.environ["TALKGEN_TEST_FAIL_RANK"]:
            raise torch.OutOfMemoryError("simulated: out of memory while loading the DiT")
        return _load(cls, *args, **kwargs)

    Pipeline.from_pretrained = classmethod(_fail_on_one_rank)
"""


@pytest.mark.slow
def test_cli_error_on_another_rank_is_shown(tiny_weights: Path, inputs: dict, tmp_path: Path, capfd,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure on rank 1 (whose console is quiet: rank 0 reports progress) still reaches the
    user, on stderr after "rank 1:", while rank 0 waits for it in a collective until the
    launcher ends it; the exit code is not 0."""
    from talkgen.cli import app

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(FAIL_ON_RANK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("TALKGEN_TEST_FAIL_RANK", "1")
    args = ["generate", "--weights", tiny_weights, "--model", "tiny", "--image", inputs["image"], "--audio",
            inputs["audio"], "--steps", 1, "--frame-num", 5, "--device", "cpu", "--output", tmp_path / "out.mp4", "--gpus", 2]
    capfd.readouterr()
    result = CliRunner().invoke(app, [str(a) for a in args])
    err = capfd.readouterr().err
    assert result.exit_code != 0
    assert "rank 1: internal error: OutOfMemoryError: simulated: out of memory while loading the DiT" in err, err
    assert not (tmp_path / "out.mp4").exists()


class RecordingReporter:
    """A worker's reporter that runs every job it is given and records how each ended."""

    def __init__(self) -> None:
        self.outcomes: list[tuple[str, str, dict]] = []

    def start(self, order, worker) -> bool:
        return True

    def progress(self, job_id, data) -> None:
        pass

    def chunk(self, job_id, data) -> None:
        pass

    def finish(self, order, kind, data) -> None:
        self.outcomes.append((order.job_id, kind, data))

    def should_cancel(self, job_id) -> bool:
        return False


def _worker_rank(rank: int, world: int, port: int, weights: str, data_dir: str, inputs: dict, out: str) -> None:
    from talkgen.cli import follow_rank_zero
    from talkgen.runtime.launch import launched_parallel, shutdown
    from talkgen.service.settings import Settings

    _as_rank(rank, world, port)
    sp = launched_parallel("cpu")
    settings = Settings(model="tiny", weights=weights, device="cpu", data_dir=data_dir)
    if rank != 0:
        follow_rank_zero(settings, "cpu", sp)  # returns when rank 0 lets it go
        return
    from talkgen.service.storage import open_storage
    from talkgen.service.worker import GenerationWorker, JobOrder

    import threading

    reporter = RecordingReporter()
    storage = open_storage(settings)
    uris = {name: storage.put_file(f"in/{path.name}", path) for name, path in inputs.items()}
    worker = GenerationWorker(settings, storage, device="cpu")
    worker.load()
    fast = {"sample_steps": 1, "frame_num": 5, "prompt": "A person is talking."}
    not_audio = dict(uris, audio=uris["image"])
    jobs = [JobOrder("ok1", fast, uris), JobOrder("bad", fast, not_audio), JobOrder("ok2", fast, uris)]
    for order in jobs:
        worker.run(order, reporter, threading.Event())
    shutdown()  # releases rank 1, as at the end of `talkgen worker`
    Path(out).write_text(json.dumps(reporter.outcomes))


@pytest.mark.slow
def test_worker_spanning_two_ranks(tiny_weights: Path, inputs: dict, tmp_path: Path) -> None:
    """Rank 0 runs the jobs, rank 1 only DiT shards; a failed job leaves them in step."""
    out = tmp_path / "outcomes.json"
    mp.spawn(_worker_rank, args=(2, _free_port(), str(tiny_weights), str(tmp_path / "data"), inputs, str(out)),
             nprocs=2, join=True)
    outcomes = json.loads(out.read_text())
    assert [(job, kind) for job, kind, _ in outcomes] == [("ok1", "succeeded"), ("bad", "failed"), ("ok2", "succeeded")]
    assert "error" in outcomes[1][2]
    assert outcomes[0][2]["frames"] == outcomes[2][2]["frames"] == 5


def test_worker_takes_no_more_jobs_once_its_gpus_are_out_of_step(inputs: dict, tmp_path: Path) -> None:
    """A DiT forward that fails on rank 0 leaves the other ranks mid-forward: the job fails with
    its reason, and the worker reports itself broken (the embedded loop stops, `talkgen worker`
    exits) instead of failing every later job."""
    from types import SimpleNamespace

    from talkgen.service.settings import Settings
    from talkgen.service.storage import open_storage
    from talkgen.service.worker import GenerationWorker, JobOrder

    settings = Settings(model="tiny", weights=tmp_path / "weights", device="cpu", data_dir=tmp_path / "data")
    storage = open_storage(settings)
    uris = {name: storage.put_file(f"in/{path.name}", path) for name, path in inputs.items()}
    group = SimpleNamespace(broken=None)

    class FailingPipeline:  # stands in for a ParallelPipeline whose forward failed on rank 0
        parallel = group

        def generate(self, request, output, progress, **kwargs):
            group.broken = "RuntimeError: simulated failure inside a DiT forward"
            raise RuntimeError("simulated failure inside a DiT forward")

    import threading

    worker = GenerationWorker(settings, storage, device="cpu")
    worker.pipeline, worker.state = FailingPipeline(), "idle"
    assert worker.broken is None
    reporter = RecordingReporter()
    outcome = worker.run(JobOrder("job1", {"sample_steps": 1, "frame_num": 5}, uris), reporter, threading.Event())
    assert outcome == "failed" and "simulated failure" in reporter.outcomes[0][2]["error"]
    assert worker.broken and worker.state == "failed" and "restart" in worker.error
