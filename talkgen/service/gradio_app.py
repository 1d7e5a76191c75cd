"""An optional Gradio front end (``talkgen gradio``; ``pip install 'talkgen[gradio]'``).

The built-in page of ``talkgen serve`` is the default web UI; this is for those who want Gradio.
It calls the same :class:`~talkgen.pipeline.pipeline.Pipeline` in-process, loaded once and kept
resident, one generation at a time (Gradio's queue), with the same presets and options as the
HTTP API (:func:`talkgen.service.schemas.generation_values`). Gradio pins ``pillow<13``, which is
why it is its own extra.
"""

from __future__ import annotations

import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from talkgen.errors import InputError, TalkgenError
from talkgen.service.schemas import PRESET_NOTES, PRESETS, generation_values
from talkgen.service.settings import Settings

STAGE_LABELS = {
    "load": "loading weights", "audio": "reading speech", "text": "encoding prompt", "image": "encoding image",
    "condition": "encoding condition frame", "sample": "sampling", "decode": "decoding video", "write": "writing mp4",
    "stored": "chunk stored",
}


class GradioGenerator:
    """The UI's handler: form values -> a GenerationRequest -> the resident pipeline -> an mp4."""

    def __init__(self, settings: Settings, output_dir: Path | None = None):
        self.settings = settings
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="talkgen-gradio-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.pipeline = None
        self._lock = threading.Lock()

    def load(self):
        """Load the pipeline once (the first generation does it when not done before)."""
        with self._lock:
            if self.pipeline is None:
                from talkgen.pipeline.pipeline import Pipeline

                weights = self.settings.weights_dir
                if self.settings.model == "tiny":
                    from talkgen.pipeline.tiny import ensure_tiny_weights

                    ensure_tiny_weights(weights)
                self.pipeline = Pipeline.from_pretrained(weights, self.settings.model, people=self.settings.people,
                                                         device=self.settings.device)
        return self.pipeline

    def run(self, portrait: str | None, video: str | None, speech: str | None, speech2: str | None = None,
            prompt: str = "", preset: str = "quality", mode: str = "clip", audio_type: str = "add",
            seed: float | None = 42, sample_steps: float | None = 0, frame_num: float | None = 0,
            report: Callable[[float, str], None] | None = None) -> tuple[str, str]:
        """Returns (mp4 path, a line describing it). Raises InputError on a bad form."""
        from talkgen.pipeline.request import GenerationRequest
        from talkgen.service.worker import ProgressTracker

        if bool(portrait) == bool(video):
            raise InputError("Give a portrait or a video (one of them).")
        if not speech:
            raise InputError("Give the speech (an audio file or a recording).")
        params: dict = {"prompt": prompt or "", "mode": mode or "clip"}
        if preset:
            params["preset"] = preset
        if seed is not None and str(seed) != "":
            params["seed"] = int(seed)
        if sample_steps:
            params["sample_steps"] = int(sample_steps)
        if frame_num:
            params["frame_num"] = int(frame_num)
        inputs = {"image": portrait} if portrait else {"video": video}
        inputs["audio"] = speech
        if speech2:
            inputs["audio2"] = speech2
            params["audio_type"] = audio_type or "add"
        request = GenerationRequest.parse(generation_values(params, inputs))

        tracker = ProgressTracker(min_interval=0.0)

        def progress(event) -> None:
            if report is not None:
                data = tracker(event)
                label = STAGE_LABELS.get(event.stage, event.stage)
                if event.stage == "sample" and event.total:
                    label = f"{label} {event.step}/{event.total} (chunk {event.chunk + 1})"
                report(data["fraction"], label)

        pipeline = self.load()
        output = self.output_dir / f"talkgen-{uuid.uuid4().hex[:12]}.mp4"
        with self._lock:  # one generation at a time on the one pipeline
            result = pipeline.generate(request, output=output, progress=progress)
        info = f"{result.num_frames} frames, {result.duration:.2f} s at {result.fps} fps, seed {result.seed}"
        if result.notes:
            info += " — " + "; ".join(result.notes)
        return str(output), info


def build_app(generator: GradioGenerator):
    """The gr.Blocks UI: inputs on the left, the video on the right."""
    import gradio as gr

    def handle(portrait, video, speech, speech2, prompt, preset, mode, audio_type, seed, sample_steps, frame_num,
               progress=gr.Progress()):
        try:
            return generator.run(portrait, video, speech, speech2, prompt, preset, mode, audio_type, seed,
                                 sample_steps, frame_num, report=lambda f, label: progress(f, desc=label))
        except TalkgenError as exc:
            raise gr.Error(str(exc)) from None

    presets = [(f"{name} — {PRESET_NOTES.get(name, '')}", name) for name in PRESETS]
    with gr.Blocks(title="talkgen") as demo:
        gr.Markdown("# talkgen\nA portrait (or a video) and speech make a lip-synced talking video.")
        with gr.Row():
            with gr.Column():
                with gr.Tab("Portrait"):
                    portrait = gr.Image(label="Portrait", type="filepath", sources=["upload", "clipboard"])
                with gr.Tab("Video"):
                    video = gr.Video(label="Video (dubbing)", sources=["upload"])
                speech = gr.Audio(label="Speech", type="filepath", sources=["upload", "microphone"])
                with gr.Accordion("Second speaker", open=False):
                    speech2 = gr.Audio(label="Speech of the second speaker", type="filepath",
                                       sources=["upload", "microphone"])
                    audio_type = gr.Radio(["add", "para"], value="add", label="How they speak",
                                          info="add: one after the other; para: at the same time")
                prompt = gr.Textbox(label="Prompt", placeholder="A woman is talking in a bright room.", lines=2)
                preset = gr.Dropdown(presets, value="quality", label="Preset")
                mode = gr.Radio(["clip", "streaming"], value="clip", label="Mode",
                                info="clip: one chunk (about 3 s); streaming: the whole speech")
                with gr.Accordion("Advanced", open=False):
                    seed = gr.Number(42, label="Seed (negative: random)", precision=0)
                    sample_steps = gr.Number(0, label="Sampling steps (0: the preset's)", precision=0, minimum=0)
                    frame_num = gr.Number(0, label="Frames per chunk (0: the preset's)", precision=0, minimum=0)
                run = gr.Button("Generate", variant="primary")
            with gr.Column():
                result = gr.Video(label="Talking video", interactive=False)
                info = gr.Markdown()
        run.click(handle, inputs=[portrait, video, speech, speech2, prompt, preset, mode, audio_type, seed,
                                  sample_steps, frame_num], outputs=[result, info], api_name="generate")
    return demo


def launch(settings: Settings, host: str = "127.0.0.1", port: int = 7860, load_now: bool = True) -> None:
    """Load the model, then serve the UI (blocking). Off loopback a TALKGEN_API_KEYS key is the
    password (any user name), as the HTTP API requires keys there."""
    settings.host = host
    settings.check_exposure()
    generator = GradioGenerator(settings)
    if load_now:
        generator.load()
    demo = build_app(generator)
    keys = {key.get_secret_value() for key in settings.api_keys}
    auth = (lambda _user, password: password in keys) if keys else None
    demo.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, auth=auth,
                                                   allowed_paths=[str(generator.output_dir)])
