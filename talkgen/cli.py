"""`talkgen`: demo, generate, info.

Every command reports a :class:`~talkgen.errors.TalkgenError` as one sentence and exits 1;
anything else is a bug, reported in one line (``TALKGEN_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from talkgen.errors import TalkgenError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Portrait + speech -> lip-synced talking video.")
console = Console(stderr=True)
# A rank other than 0 of a multi-process run (``--gpus N``): its console is quiet (rank 0 reports
# progress and notes), its errors go to stderr after "rank N:" (:func:`print_error`).
follower_rank: int | None = None

STAGE_LABELS = {
    "load": "loading weights", "audio": "reading speech", "text": "encoding prompt", "image": "encoding image",
    "condition": "encoding condition frame", "sample": "sampling", "decode": "decoding video", "write": "writing mp4",
    "scenes": "detecting shots", "shot": "shots",
}


def print_error(*parts) -> None:
    """One error line (``Text.assemble`` parts). On a rank other than 0 of a multi-process run,
    whose console is quiet, it goes to stderr after ``rank N:``: rank 0 may be waiting for that
    rank in a collective, so this line is all the user gets to see of the failure."""
    if follower_rank is None:
        console.print(Text.assemble(*parts), highlight=False, soft_wrap=True)
    else:
        Console(stderr=True).print(Text.assemble((f"rank {follower_rank}: ", "bold"), *parts), highlight=False,
                                   soft_wrap=True)


def repeats_rank_0(exc: BaseException) -> bool:
    """On another rank, an error rank 0 had and has printed (``raise_leader_error``): said once."""
    return follower_rank is not None and getattr(exc, "reported_by_rank_0", False)


def reports_errors(command):
    """Turn errors into one sentence and a non-zero exit instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TalkgenError as exc:
            if not repeats_rank_0(exc):
                print_error(("error: ", "bold red"), str(exc))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:  # a bug: say so plainly
            if os.environ.get("TALKGEN_DEBUG"):
                raise
            if not repeats_rank_0(exc):
                print_error(("internal error: ", "bold red"),
                            f"{type(exc).__name__}: {exc} (run with TALKGEN_DEBUG=1 for the traceback)")
            raise typer.Exit(2) from None

    return wrapper


class ProgressBar:
    """Draws the pipeline's progress events as one rich bar per stage."""

    def __init__(self):
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
        self.tasks: dict[tuple[str, int], int] = {}

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def __call__(self, event) -> None:
        key = (event.stage, event.chunk)
        label = STAGE_LABELS.get(event.stage, event.stage)
        if event.stage == "sample":
            label = f"{label} (chunk {event.chunk + 1})"
        if key not in self.tasks:
            self.tasks[key] = self.bar.add_task(label, total=event.total or 1)
        self.bar.update(self.tasks[key], completed=event.step if event.total else 1, total=event.total or 1)


def default_cache_dir() -> Path:
    root = os.environ.get("TALKGEN_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "talkgen"


@app.command()
@reports_errors
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="where to write the mp4")] = Path("demo.mp4"),
    seconds: Annotated[float, typer.Option(min=0.5, max=20, help="length of the sample speech")] = 3.0,
    steps: Annotated[int, typer.Option(min=1, max=50)] = 8,
    weights_dir: Annotated[Optional[Path], typer.Option(help="where the tiny model is written")] = None,
) -> None:
    """Make a real mp4 on the CPU with the tiny built-in model (random weights) from a sample
    portrait and sample speech made by talkgen itself."""
    import numpy as np
    import soundfile as sf
    from PIL import Image

    from talkgen.media.samples import sample_portrait, sample_speech
    from talkgen.pipeline.pipeline import Pipeline
    from talkgen.pipeline.request import GenerationRequest

    weights_dir = weights_dir or default_cache_dir() / "tiny"
    with tempfile.TemporaryDirectory(prefix="talkgen-demo-") as tmp:
        portrait, speech = Path(tmp) / "portrait.png", Path(tmp) / "speech.wav"
        Image.fromarray(sample_portrait()).save(portrait)
        sf.write(speech, np.asarray(sample_speech(seconds), dtype=np.float32), 16_000)
        request = GenerationRequest.parse(dict(
            prompt="A person is talking to the camera.", cond_image=str(portrait),
            cond_audio={"person1": str(speech)}, sample_steps=steps,
        ))
        with ProgressBar() as bar:
            pipe = Pipeline.from_pretrained(weights_dir, "tiny", device="cpu", progress=bar)
            result = pipe.generate(request, output=output, progress=bar)
    console.print(f"wrote {result.video_path}: {result.num_frames} frames at {result.fps} fps "
                  f"({result.duration:.2f} s), tiny random-weight model, seed {result.seed}")


def parse_lora(spec: str) -> tuple[str, float]:
    """``file.safetensors`` or ``file.safetensors:0.8``."""
    path, _, scale = spec.rpartition(":")
    try:
        return path, float(scale)
    except ValueError:
        return spec, 1.0


def parse_box(spec: str | None) -> list[float] | None:
    if spec is None:
        return None
    try:
        return [float(v) for v in spec.split(",")]
    except ValueError:
        raise TalkgenError(f"--bbox {spec!r}: give four numbers top,left,bottom,right in pixels.") from None


GPUS_HELP = ("GPUs of this host for one video, sequence parallel (torchrun underneath); "
             "with --device cpu or no GPU: that many CPU processes")


def ranks(command: str, gpus: int, device: str | None, arguments: dict):
    """``--gpus N``: start N processes running ``command`` with the same ``arguments`` (its
    ``locals()`` before anything else) and exit with rank 0's code; in one of those processes,
    return its sequence-parallel group and device. ``(None, device)`` for one GPU."""
    if gpus == 1:
        return None, device
    import inspect

    from talkgen.runtime.launch import launch, launched, launched_parallel, rank_device, world_size

    if not launched():
        names = inspect.signature(globals()[command]).parameters
        raise SystemExit(launch(command, gpus, {name: arguments[name] for name in names}, device))
    global follower_rank
    rank = int(os.environ.get("RANK", 0))
    if rank != 0:  # rank 0 reports progress and notes; errors still show (print_error)
        follower_rank, console.quiet = rank, True
    if world_size() != gpus:
        raise TalkgenError(f"--gpus {gpus}, but this process is one of {world_size()} (torchrun): make them agree.")
    parallel = launched_parallel(device)
    return parallel, rank_device(device)


def follow_rank_zero(settings, device: str, parallel) -> None:
    """A rank other than 0 of a worker: load the DiT, run its shard of rank 0's forwards until
    rank 0 exits (signals are rank 0's to handle: it finishes or hands back its job first)."""
    import signal

    from talkgen.pipeline.pipeline import Pipeline

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    pipe = Pipeline.from_pretrained(settings.weights_dir, settings.model, people=settings.people, device=device,
                                    parallel=parallel)
    pipe.follow()


@app.command()
@reports_errors
def generate(
    weights_dir: Annotated[Path, typer.Option("--weights", "-w", help="weights directory (see README)")],
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("output.mp4"),
    input_json: Annotated[Optional[Path], typer.Option("--input-json", help="a request in the reference's JSON format")] = None,
    model: Annotated[str, typer.Option(help="multitalk | infinitetalk | tiny")] = "multitalk",
    people: Annotated[str, typer.Option(help="InfiniteTalk weights: single | multi")] = "single",
    image: Annotated[Optional[Path], typer.Option(help="portrait (cond_image)")] = None,
    video: Annotated[Optional[Path], typer.Option(help="video to dub (InfiniteTalk cond_video)")] = None,
    audio: Annotated[Optional[Path], typer.Option(help="speech of person 1")] = None,
    audio2: Annotated[Optional[Path], typer.Option(help="speech of person 2")] = None,
    audio_type: Annotated[Optional[str], typer.Option(help="two speakers: add (turns) | para (together)")] = None,
    bbox1: Annotated[Optional[str], typer.Option(help="person 1's box: top,left,bottom,right (pixels)")] = None,
    bbox2: Annotated[Optional[str], typer.Option(help="person 2's box: top,left,bottom,right (pixels)")] = None,
    tts_text: Annotated[Optional[str], typer.Option(help="speak this text instead of --audio ('(s1) ... (s2) ...' for two)")] = None,
    voice1: Annotated[Optional[str], typer.Option(help="TTS voice of person 1")] = None,
    voice2: Annotated[Optional[str], typer.Option(help="TTS voice of person 2")] = None,
    prompt: Annotated[Optional[str], typer.Option()] = None,
    negative_prompt: Annotated[Optional[str], typer.Option()] = None,
    mode: Annotated[Optional[str], typer.Option(help="clip (one chunk, default) | streaming (the whole speech)")] = None,
    max_frames: Annotated[Optional[int], typer.Option(help="cap on the video length in frames")] = None,
    motion_frame: Annotated[Optional[int], typer.Option(help="context frames per chunk (25 MultiTalk, 9 InfiniteTalk)")] = None,
    size: Annotated[Optional[int], typer.Option(help="480 | 720 bucket tier")] = None,
    frame_num: Annotated[Optional[int], typer.Option(help="frames per chunk (4n+1), default 81")] = None,
    steps: Annotated[Optional[int], typer.Option(help="sampling steps, default 40")] = None,
    shift: Annotated[Optional[float], typer.Option(help="timestep shift, default 7 (480) / 11 (720)")] = None,
    text_scale: Annotated[Optional[float], typer.Option(help="text guidance, default 5 (1 = 2-pass mode)")] = None,
    audio_scale: Annotated[Optional[float], typer.Option(help="audio guidance, default 4")] = None,
    use_apg: Annotated[Optional[bool], typer.Option("--apg/--no-apg")] = None,
    color_strength: Annotated[Optional[float], typer.Option(help="colour correction 0..1, default 1")] = None,
    teacache: Annotated[Optional[float], typer.Option(help="TeaCache threshold (e.g. 0.2); off by default")] = None,
    scene_seg: Annotated[Optional[bool], typer.Option("--scene-seg/--no-scene-seg", help="dubbing: detect the video's shots and dub each on its own")] = None,
    lora: Annotated[Optional[list[str]], typer.Option(help="LoRA file[:scale], repeatable")] = None,
    preset: Annotated[Optional[str], typer.Option(help="step-distilled settings: lightx2v (4 steps) | fusionx (8 steps)")] = None,
    quant_file: Annotated[Optional[Path], typer.Option(help="a quantized DiT file of the reference (int8/fp8)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="default 42; negative = random")] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda | cpu (default: cuda if present)")] = None,
    memory: Annotated[Optional[str], typer.Option(help="auto | resident | offload-encoders | fp8 | stream-blocks (default auto: from free GPU memory; TALKGEN_MEMORY)")] = None,
    vram_budget: Annotated[Optional[float], typer.Option("--vram-budget", min=0, help="peak GPU memory to stay under, GiB (TALKGEN_VRAM_BUDGET_GB)")] = None,
    fp8: Annotated[Optional[bool], typer.Option("--fp8/--no-fp8", help="fp8 GEMMs in the DiT blocks (default: on where the GPU and torchao support it; TALKGEN_FP8)")] = None,
    gpus: Annotated[int, typer.Option(min=1, help=GPUS_HELP)] = 1,
) -> None:
    """Generate a talking video from a portrait (or a video to dub) and speech."""
    from talkgen.pipeline.pipeline import Pipeline
    from talkgen.pipeline.request import GenerationRequest

    parallel, device = ranks("generate", gpus, device, locals())

    options = dict(prompt=prompt, negative_prompt=negative_prompt, size=size, frame_num=frame_num, sample_steps=steps,
                   sample_shift=shift, text_guide_scale=text_scale, audio_guide_scale=audio_scale, use_apg=use_apg,
                   seed=seed, audio_type=audio_type, mode=mode, max_frames=max_frames, motion_frame=motion_frame,
                   color_correction_strength=color_strength)
    if teacache is not None:
        options.update(use_teacache=True, teacache_thresh=teacache)
    options["scene_seg"] = scene_seg
    if preset is not None:
        from talkgen.weights.lora import PRESETS

        if preset not in PRESETS:
            raise TalkgenError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}.")
        chosen = PRESETS[preset]
        for key, value in dict(sample_steps=chosen.steps, sample_shift=chosen.shift, text_guide_scale=chosen.text_guide_scale,
                               audio_guide_scale=chosen.audio_guide_scale).items():
            options[key] = value if options.get(key) is None else options[key]
    if input_json is not None:
        request = GenerationRequest.from_reference_json(input_json, **options)
    else:
        values = {k: v for k, v in options.items() if v is not None}
        cond_audio = {"person1": str(audio)} if audio else {}
        if audio2:
            cond_audio["person2"] = str(audio2)
        boxes = {k: v for k, v in (("person1", parse_box(bbox1)), ("person2", parse_box(bbox2))) if v is not None}
        if boxes:
            values["bbox"] = boxes
        if tts_text is not None:
            values["tts_audio"] = {"text": tts_text, "human1_voice": voice1, "human2_voice": voice2}
        values.update(cond_image=str(image) if image else None, cond_video=str(video) if video else None,
                      cond_audio=cond_audio)
        request = GenerationRequest.parse(values)
    with ProgressBar() as bar:
        pipe = Pipeline.from_pretrained(weights_dir, model, people=people, device=device, progress=bar,
                                        loras=[parse_lora(spec) for spec in lora or []], quant_file=quant_file,
                                        parallel=parallel, memory=memory, vram_budget_gb=vram_budget, fp8=fp8)
        if getattr(pipe, "memory", None) is not None and pipe.device.type == "cuda":
            console.print(f"memory: {pipe.memory.describe()}", soft_wrap=True, highlight=False)
        result = pipe.generate(request, output=output, progress=bar)
    for note in result.notes:
        console.print(f"note: {note}", soft_wrap=True, highlight=False)
    console.print(f"wrote {result.video_path}: {result.num_frames} frames ({result.duration:.2f} s), seed {result.seed}")


@app.command()
@reports_errors
def info(
    weights_dir: Annotated[Optional[Path], typer.Option("--weights", "-w", help="weights directory to inspect")] = None,
) -> None:
    """What is installed, which weights are present, which GPU."""
    import torch

    from talkgen import __version__
    from talkgen.pipeline.loading import required_files

    console.print(f"talkgen {__version__}, Python {platform.python_version()}, torch {torch.__version__}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            console.print(f"GPU {i}: {props.name}, {props.total_memory / 2**30:.1f} GiB")
    else:
        console.print("GPU: none (CUDA not available); generation runs on the CPU")
    from talkgen.models.attention import describe_backend

    console.print(f"attention backend: {describe_backend()}", highlight=False)
    from talkgen.weights.cli import weights_report

    weights_dir = weights_dir or default_cache_dir() / "tiny"
    console.print(f"weights directory: {weights_dir}")
    for line in weights_report(weights_dir):
        console.print(f"  {line}", soft_wrap=True, highlight=False, markup=False)
    if (weights_dir / "talkgen-tiny.json").is_file():
        missing = [path for path, _ in required_files(weights_dir, "tiny") if not path.exists()]
        console.print(f"  tiny built-in model (random weights): {'complete' if not missing else f'missing {missing[0]}'}",
                      soft_wrap=True, highlight=False)


from talkgen.weights.cli import download, verify  # noqa: E402  (light: heavy imports happen inside the commands)

app.command()(reports_errors(download))
app.command()(reports_errors(verify))


def _service_settings(**flags):
    """The service's settings: TALKGEN_* environment variables, overridden by the flags given."""
    try:
        from talkgen.service.settings import Settings
        import fastapi  # noqa: F401
    except ImportError as exc:
        raise TalkgenError(f"The service needs its extra ({exc.name} is missing): "
                           "pip install 'talkgen[service]' (or TALKGEN_EXTRAS=service,test bash scripts/setup.sh).") from None
    import logging

    from pydantic import ValidationError

    from talkgen.pipeline.request import describe_validation_error

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:  # names the setting (flag or TALKGEN_ variable) and the problem
        raise TalkgenError(describe_validation_error(exc).replace("Invalid request", "Invalid settings")) from None


@app.command()
@reports_errors
def serve(
    host: Annotated[Optional[str], typer.Option(help="address to listen on (default 127.0.0.1; elsewhere needs TALKGEN_API_KEYS)")] = None,
    port: Annotated[Optional[int], typer.Option(help="default 8000")] = None,
    model: Annotated[Optional[str], typer.Option(help="tiny | multitalk | infinitetalk (default multitalk)")] = None,
    weights_dir: Annotated[Optional[Path], typer.Option("--weights", "-w", help="weights directory")] = None,
    people: Annotated[Optional[str], typer.Option(help="InfiniteTalk weights: single | multi")] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda | cuda:N | cpu (default: every GPU, else CPU)")] = None,
    workers: Annotated[Optional[int], typer.Option(help="embedded workers (default one per GPU; 0 = none; not with --redis)")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="job store and local storage")] = None,
    storage: Annotated[Optional[str], typer.Option(help="a directory or s3://bucket/prefix")] = None,
    redis: Annotated[Optional[str], typer.Option(help="queue jobs in Redis for `talkgen worker`s instead of running them here")] = None,
    gpus: Annotated[int, typer.Option(min=1, help="one embedded worker over this many GPUs (sequence parallel)")] = 1,
) -> None:
    """The HTTP API, the web page at /, the job store and the workers, in one process."""
    if gpus > 1 and (redis or workers not in (None, 1)):
        raise TalkgenError(f"--gpus {gpus} makes one embedded worker over {gpus} GPUs: leave out --workers and --redis "
                           f"(with Redis, run `talkgen worker --gpus {gpus}` for each GPU set instead).")
    parallel, device = ranks("serve", gpus, device, locals())
    workers = 1 if parallel is not None else workers
    settings = _service_settings(host=host, port=port, model=model, weights=weights_dir, people=people, device=device,
                                 workers=workers, data_dir=data_dir, storage=storage, redis_url=redis)
    if settings.workers != 0 and not settings.redis_url:
        settings.weights_dir  # noqa: B018  (says which flag is missing before anything starts)
    if parallel is not None and parallel.rank != 0:  # the other GPUs of the worker: DiT shards only
        return follow_rank_zero(settings, device, parallel)
    from talkgen.service.api import serve as run_server

    console.print(f"talkgen service on http://{settings.host}:{settings.port}/ (model {settings.model}, "
                  f"{'Redis queue ' + settings.redis_url if settings.redis_url else 'embedded worker'})")
    run_server(settings)


@app.command()
@reports_errors
def worker(
    redis: Annotated[str, typer.Option(help="Redis URL shared with `talkgen serve --redis`")],
    model: Annotated[Optional[str], typer.Option(help="tiny | multitalk | infinitetalk")] = None,
    weights_dir: Annotated[Optional[Path], typer.Option("--weights", "-w", help="weights directory")] = None,
    people: Annotated[Optional[str], typer.Option(help="InfiniteTalk weights: single | multi")] = None,
    device: Annotated[Optional[str], typer.Option(help="the GPU set of this worker, e.g. cuda:0 (one job at a time)")] = None,
    storage: Annotated[Optional[str], typer.Option(help="the server's storage: a shared directory or s3://bucket/prefix")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="where local storage lives when --storage is not given")] = None,
    gpus: Annotated[int, typer.Option(min=1, help=GPUS_HELP)] = 1,
) -> None:
    """Take jobs from Redis, one at a time, with the model kept loaded. Run one per GPU set, on any
    number of machines; SIGTERM hands a running job back to the queue. With --gpus N the worker
    spans N GPUs of this host (CUDA_VISIBLE_DEVICES picks them); its first process takes the jobs."""
    import signal
    import threading

    parallel, device = ranks("worker", gpus, device, locals())

    settings = _service_settings(redis_url=redis, model=model, weights=weights_dir, people=people, device=device,
                                 storage=storage, data_dir=data_dir)
    settings.weights_dir  # noqa: B018  (says which flag is missing before anything starts)
    if parallel is not None and parallel.rank != 0:  # the other GPUs of the worker: DiT shards only
        return follow_rank_zero(settings, device, parallel)
    from talkgen.service.queue import run_redis_worker
    from talkgen.service.storage import open_storage

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run_redis_worker(settings, open_storage(settings), stop)


@app.command("gradio")
def gradio_ui(
    model: Annotated[Optional[str], typer.Option(help="tiny | multitalk | infinitetalk (default multitalk)")] = None,
    weights_dir: Annotated[Optional[Path], typer.Option("--weights", "-w", help="weights directory")] = None,
    people: Annotated[Optional[str], typer.Option(help="InfiniteTalk weights: single | multi")] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda | cuda:N | cpu (default: the first GPU, else CPU)")] = None,
    host: Annotated[str, typer.Option(help="address to listen on (elsewhere than loopback needs TALKGEN_API_KEYS)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port of the Gradio UI")] = 7860,
) -> None:
    """An optional Gradio UI calling the same pipeline (needs `pip install 'talkgen[gradio]'`;
    `talkgen serve` has the built-in page and needs no extra)."""
    try:
        import gradio  # noqa: F401
    except ImportError:  # printed here, without rich markup (which would swallow "[gradio]")
        console.print("error: The Gradio front end needs its extra: pip install 'talkgen[gradio]' (Gradio pins "
                      "pillow<13; `talkgen serve` has a built-in web page that needs no extra).", markup=False,
                      highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    reports_errors(_launch_gradio)(model=model, weights=weights_dir, people=people, device=device, host=host, port=port)


def _launch_gradio(host: str, port: int, **flags) -> None:
    from pydantic import ValidationError

    from talkgen.pipeline.request import describe_validation_error
    from talkgen.service.gradio_app import launch
    from talkgen.service.settings import Settings

    try:
        settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        raise TalkgenError(describe_validation_error(exc).replace("Invalid request", "Invalid settings")) from None
    console.print(f"talkgen Gradio UI on http://{host}:{port}/ (model {settings.model}; loading it first)")
    launch(settings, host=host, port=port)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
