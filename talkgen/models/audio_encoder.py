"""Speech -> per-video-frame features: wav2vec 2.0 (chinese-wav2vec2-base) resampled to 25 fps.

What MultiTalk changes about a stock ``Wav2Vec2Model``: the CNN features (50 Hz at 16 kHz) are
linearly interpolated (``align_corners=True``) to exactly ``int(seconds * 25)`` frames *before*
the feature projection and the transformer, so the transformer itself runs at the video rate.
The output stacks the hidden states after every encoder layer (not the encoder's input):
``[frames, layers, hidden]`` = ``[n, 12, 768]`` for the real model.

We call the model's submodules in order (``feature_extractor`` -> interpolate ->
``feature_projection`` -> ``encoder``) and collect the layer outputs with forward pre-hooks.
Overriding ``forward`` as the reference does silently returns no hidden states on transformers 5,
and ``output_attentions`` is never requested (it breaks SDPA attention).

Long audio: the first CNN layer of the base model writes 512 channels at 3.2 kHz (about 4 GB for
10 minutes in float32, 10.5 GB peak for the whole CNN). Above ``cnn_chunk_seconds`` (30 s) the CNN
runs over time slices of that length with exact receptive-field overlap, and the first layer's
GroupNorm (a per-channel statistic over the *whole* clip) is computed in a first pass. The result
equals the one-shot CNN up to float rounding (relative difference 7.6e-7 on 10 minutes, peak RSS
2.1 GB instead of 10.5 GB, base model on CPU), with none of the edge effects of chunking the audio
itself. ``cnn_chunk_seconds=None`` always runs the CNN in one shot.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from talkgen.errors import InputError, WeightsError
from talkgen.weights.loading import iter_files, load_streaming, meta_device
from talkgen.weights.manifest import WAV2VEC2

SAMPLE_RATE = 16000
VIDEO_FPS = 25  # the reference assumes 25 fps video when sizing the features
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # first one present wins

# Keys of pre-training checkpoints (Wav2Vec2ForPreTraining) that the bare model does not have.
_PRETRAINING_ONLY = ("quantizer.", "project_hid.", "project_q.", "lm_head.", "dropout_features")
# Weight-norm parameters as older transformers saved them -> torch parametrization names.
_WEIGHT_NORM_NAMES = {
    ".weight_g": ".parametrizations.weight.original0",
    ".weight_v": ".parametrizations.weight.original1",
}


def frame_count(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Video frames for a track, floored, computed exactly as the reference does (seconds * 25)."""
    return int(num_samples / sample_rate * VIDEO_FPS)


class AudioEncoder(nn.Module):
    """wav2vec2 producing MultiTalk's 25 fps multi-layer speech features."""

    def __init__(self, model: nn.Module, feature_extractor, cnn_chunk_seconds: float | None = 30.0):
        super().__init__()
        self.model = model
        self.feature_extractor = feature_extractor  # transformers' Wav2Vec2FeatureExtractor
        self.cnn_chunk_seconds = cnn_chunk_seconds

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        cnn_chunk_seconds: float | None = 30.0,
    ) -> AudioEncoder:
        """Load a transformers-layout folder: ``config.json``, ``preprocessor_config.json`` and
        ``model.safetensors`` (or ``pytorch_model.bin``, read with ``weights_only=True``)."""
        from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

        directory = Path(directory)
        for name in ("config.json", "preprocessor_config.json"):
            if not (directory / name).is_file():
                raise WeightsError(f"{directory / name} is missing; {WAV2VEC2.advice()}.")
        weights = next((directory / n for n in WEIGHT_FILES if (directory / n).is_file()), None)
        if weights is None:
            raise WeightsError(f"{directory} has neither {' nor '.join(WEIGHT_FILES)}; {WAV2VEC2.advice()}.")

        config = Wav2Vec2Config.from_pretrained(directory, local_files_only=True)
        with meta_device():
            model = Wav2Vec2Model(config)
        file_keys = {_model_name(key) for key, _, _ in iter_files([weights])}
        if "masked_spec_embed" not in file_keys and model.masked_spec_embed is not None:
            model.masked_spec_embed = None  # only used for training-time masking; some files omit it
        load_streaming(
            model, iter_files([weights]), weight_set=WAV2VEC2, dtype=dtype, device=device,
            rename=_model_name, expected_files=str(weights),
        )  # fmt: skip
        model.eval().requires_grad_(False)
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(directory, local_files_only=True)
        return cls(model, extractor, cnn_chunk_seconds)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @torch.no_grad()
    def embed(self, speech_16k: np.ndarray) -> torch.Tensor:
        """16 kHz mono speech ``[N]`` -> features ``[int(N/16000*25), layers, hidden]`` (float32, CPU)."""
        speech = np.asarray(speech_16k)
        if speech.ndim != 1:
            raise InputError(f"Speech for the audio encoder must be mono [N], got shape {speech.shape}.")
        frames = frame_count(len(speech))
        hidden = self.model.config.hidden_size
        if frames == 0:  # shorter than one video frame; callers report it with the file name
            return torch.zeros(0, self.num_layers, hidden)

        values = self._normalise(speech)
        features = self._cnn_features(values)  # [1, C, T50]
        # The reference's one deviation from wav2vec2: resample the CNN features to the video rate.
        features = F.interpolate(features.float(), size=frames, mode="linear", align_corners=True)
        features = features.to(self.dtype).transpose(1, 2)  # [1, C, n] -> [1, n, C]
        hidden_states, _ = self.model.feature_projection(features)
        with _layer_outputs(self.model.encoder) as outputs:
            outputs.append(self.model.encoder(hidden_states)[0])
        # [layers, 1, n, hidden] -> [n, layers, hidden]
        return torch.stack(outputs, dim=0)[:, 0].transpose(0, 1).float().cpu()

    def _normalise(self, speech: np.ndarray) -> torch.Tensor:
        """The checkpoint's own preprocessing (zero mean, unit variance when ``do_normalize``)."""
        values = self.feature_extractor(speech, sampling_rate=SAMPLE_RATE).input_values
        values = np.asarray(values, dtype=np.float32).reshape(1, -1)
        return torch.from_numpy(values).to(device=self.device, dtype=self.dtype)

    def _cnn_features(self, values: torch.Tensor) -> torch.Tensor:
        """``[1, N]`` samples -> CNN features ``[1, C, T50]``, sliced over time when long."""
        layers = list(self.model.feature_extractor.conv_layers)
        chunk = None if self.cnn_chunk_seconds is None else int(self.cnn_chunk_seconds * SAMPLE_RATE)
        if chunk is None or values.shape[1] <= chunk:
            return self.model.feature_extractor(values)
        return _chunked_cnn(layers, values, _frames_for_samples(layers, chunk))


def _model_name(key: str) -> str | None:
    """A checkpoint key -> the ``Wav2Vec2Model`` parameter name (None: not part of the model)."""
    key = key.removeprefix("wav2vec2.")
    if key.startswith(_PRETRAINING_ONLY):
        return None
    for old, new in _WEIGHT_NORM_NAMES.items():
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


@contextlib.contextmanager
def _layer_outputs(encoder: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect what transformers calls ``hidden_states[1:]``.

    Layer k's output is layer k+1's input, so pre-hooks on layers 1.. see outputs 0..L-2; the
    caller appends the encoder's final output (for the stable-layer-norm variant that is the
    normed last layer, exactly what ``hidden_states[-1]`` holds there).
    """
    outputs: list[torch.Tensor] = []
    handles = [
        layer.register_forward_pre_hook(lambda _module, args: outputs.append(args[0]))
        for layer in list(encoder.layers)[1:]
    ]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


# --- long audio: the CNN over time slices ------------------------------------------------------


def _conv_geometry(layers: list[nn.Module]) -> list[tuple[int, int]]:
    return [(layer.conv.kernel_size[0], layer.conv.stride[0]) for layer in layers]


def _frames_for_samples(layers: list[nn.Module], samples: int) -> int:
    frames = samples
    for kernel, stride in _conv_geometry(layers):
        frames = max(1, (frames - kernel) // stride + 1)
    return frames


def _input_span(geometry: list[tuple[int, int]], start: int, stop: int) -> tuple[int, int]:
    """Input samples [a, b) that output frames [start, stop) of the conv stack depend on (no padding)."""
    for kernel, stride in reversed(geometry):
        start, stop = start * stride, (stop - 1) * stride + kernel
    return start, stop


def _group_norm_stats(layer: nn.Module, values: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of the first conv's output over the whole clip.

    Chunks are merged with Chan's parallel formula in float64, so the statistics match one-shot
    GroupNorm (num_groups == channels) up to rounding.
    """
    kernel, stride = layer.conv.kernel_size[0], layer.conv.stride[0]
    total = (values.shape[1] - kernel) // stride + 1
    count, mean, m2 = 0, None, None
    for start in range(0, total, chunk):
        stop = min(total, start + chunk)
        out = layer.conv(values[:, None, start * stride : (stop - 1) * stride + kernel])[0].float()
        n = out.shape[1]
        # Chunk statistics in float32 (torch reduces pairwise), merged in float64.
        chunk_var, chunk_mean = torch.var_mean(out, dim=1, correction=0)
        chunk_mean, chunk_m2 = chunk_mean.double(), chunk_var.double() * n
        del out
        if mean is None:
            count, mean, m2 = n, chunk_mean, chunk_m2
            continue
        delta = chunk_mean - mean
        mean = mean + delta * n / (count + n)
        m2 = m2 + chunk_m2 + delta**2 * count * n / (count + n)
        count += n
    return mean, m2 / count


def _first_layer(layer: nn.Module, x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    if stats is None:  # per-time-step norm (or none): local, the module itself is exact on a slice
        return layer(x)
    mean, var = stats
    norm = layer.layer_norm
    y = layer.conv(x)
    scale = (norm.weight.double() / torch.sqrt(var + norm.eps)).to(y.dtype)
    shift = (norm.bias.double() - mean * norm.weight.double() / torch.sqrt(var + norm.eps)).to(y.dtype)
    return layer.activation(y * scale[None, :, None] + shift[None, :, None])


def _chunked_cnn(layers: list[nn.Module], values: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    """The feature encoder on ``[1, N]`` samples in slices of ``chunk_frames`` output frames."""
    geometry = _conv_geometry(layers)
    total = _frames_for_samples(layers, values.shape[1])
    first = layers[0]
    global_norm = isinstance(getattr(first, "layer_norm", None), nn.GroupNorm)
    # The first layer's own chunk: as many of its output steps as one slice of the stack uses.
    first_chunk = _input_span(geometry[1:], 0, chunk_frames)[1] if len(geometry) > 1 else chunk_frames
    stats = _group_norm_stats(first, values, first_chunk) if global_norm else None
    pieces = []
    for start in range(0, total, chunk_frames):
        stop = min(total, start + chunk_frames)
        a, b = _input_span(geometry, start, stop)
        x = _first_layer(first, values[:, None, a:b], stats)
        for layer in layers[1:]:
            x = layer(x)
        pieces.append(x)
    return torch.cat(pieces, dim=2)


# --- tiny deterministic model for tests --------------------------------------------------------


def tiny_wav2vec2_config():
    """The golden files' shape of wav2vec2: the base model's layout, 32 wide, 3 layers."""
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=48,
        conv_dim=[16] * 7,
        conv_bias=False,
        feat_extract_norm="group",
        do_stable_layer_norm=False,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        vocab_size=8,
        architectures=["Wav2Vec2Model"],
    )


def write_tiny_wav2vec2(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny wav2vec2 folder (config, preprocessor config, ``model.safetensors``).

    Values come from a seeded generator (not transformers' init, which may change between
    releases): linear/conv weights with std 1/sqrt(fan_in), norm gains near 1, small biases.
    """
    from safetensors.torch import save_file
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_wav2vec2_config()
    with meta_device():
        shapes = {name: tuple(t.shape) for name, t in Wav2Vec2Model(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {name: _tiny_tensor(name, shape, generator) for name, shape in sorted(shapes.items())}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(directory)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True, return_attention_mask=False
    ).save_pretrained(directory)
    return directory


def _tiny_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator)
    if name.endswith("original0"):  # weight-norm gain of the positional conv
        return (1.0 + 0.1 * noise).abs()
    if name == "masked_spec_embed":
        return torch.rand(shape, generator=generator)
    if len(shape) == 1:
        is_gain = name.endswith(".weight")  # a (group/layer) norm gain
        return 1.0 + 0.1 * noise if is_gain else 0.02 * noise
    fan_in = int(np.prod(shape[1:]))
    return (noise / fan_in**0.5).contiguous()
