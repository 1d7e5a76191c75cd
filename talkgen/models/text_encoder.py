"""The umT5-XXL text encoder, loaded from the released ``models_t5_umt5-xxl-enc-bf16.pth``.

The math is transformers' ``UMT5EncoderModel`` and it equals the reference ``wan/modules/t5.py``
``T5Encoder`` in its umT5 layout (``shared_pos=False``):

- pre-norm blocks with RMSNorm (no mean subtraction, no bias, eps 1e-6, statistics in float32);
- self-attention *without* the 1/sqrt(d) scaling, plus a learned relative-position bias that
  every layer owns (32 buckets, bidirectional, log-spaced up to distance 128); padded keys are
  masked, the softmax runs in float32;
- a gated feed-forward ``fc2(fc1(x) * gelu_tanh(gate(x)))`` (``gelu_new`` in transformers);
- a final RMSNorm; no dropout at inference.

Only the key names differ, so loading is a rename table (:func:`checkpoint_key_map`). Prompts are
cleaned as the reference's ``HuggingfaceTokenizer(clean='whitespace')`` does, tokenized to 512
tokens with ``</s>`` appended, and each output is trimmed to its real token count.
"""

from __future__ import annotations

import html
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from talkgen.errors import WeightsError
from talkgen.weights.loading import (
    WeightSet,
    iter_files,
    load_streaming,
    meta_device,
    read_config_json,
    safetensors_files,
)
from talkgen.weights.manifest import WAN_I2V_480P_DIFFUSERS

CHECKPOINT_NAME = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_SUBDIR = "google/umt5-xxl"
TEXT_LEN = 512  # the reference pads/truncates every prompt to this many tokens

WEIGHT_SET = WeightSet(
    name="Wan2.1-I2V-14B-480P",
    repo_id="Wan-AI/Wan2.1-I2V-14B-480P",
    download_command="talkgen download --model multitalk --dir DIR",
)


@dataclass(frozen=True)
class TextEncoderConfig:
    """Sizes of the umT5 encoder, named as in the reference constructor."""

    vocab_size: int
    dim: int
    dim_attn: int
    dim_ffn: int
    num_heads: int
    num_layers: int
    num_buckets: int
    max_distance: int = 128  # the reference's T5RelativeEmbedding default
    eps: float = 1e-6

    @classmethod
    def umt5_xxl(cls) -> TextEncoderConfig:
        return cls(
            vocab_size=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24, num_buckets=32
        )

    @classmethod
    def tiny(cls) -> TextEncoderConfig:
        """Matches the tokenizer written by :func:`write_tiny_text_encoder`."""
        return cls(
            vocab_size=len(_tiny_vocab()), dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2, num_buckets=32
        )

    @classmethod
    def from_golden_config(cls, cfg: Mapping[str, Any]) -> TextEncoderConfig:
        """From the reference ``T5Encoder`` keyword arguments (the golden files' ``config``)."""
        if cfg.get("shared_pos", False):
            raise ValueError("only the umT5 layout (a relative-position bias per layer, shared_pos=False) is supported")
        return cls(
            vocab_size=int(cfg["vocab"]),
            dim=int(cfg["dim"]),
            dim_attn=int(cfg["dim_attn"]),
            dim_ffn=int(cfg["dim_ffn"]),
            num_heads=int(cfg["num_heads"]),
            num_layers=int(cfg["num_layers"]),
            num_buckets=int(cfg["num_buckets"]),
        )

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> TextEncoderConfig:
        """From a transformers ``UMT5Config`` ``config.json`` (the -Diffusers repo's ``text_encoder/``)."""
        if cfg.get("feed_forward_proj", "gated-gelu") not in ("gated-gelu", "gated-gelu_new"):
            raise ValueError(f"only the gated-gelu feed-forward is supported, got {cfg.get('feed_forward_proj')!r}")
        preset = cls.umt5_xxl()
        num_heads = int(cfg.get("num_heads", preset.num_heads))
        d_kv = int(cfg.get("d_kv", preset.dim_attn // preset.num_heads))
        return cls(
            vocab_size=int(cfg.get("vocab_size", preset.vocab_size)),
            dim=int(cfg.get("d_model", preset.dim)),
            dim_attn=d_kv * num_heads,
            dim_ffn=int(cfg.get("d_ff", preset.dim_ffn)),
            num_heads=num_heads,
            num_layers=int(cfg.get("num_layers", preset.num_layers)),
            num_buckets=int(cfg.get("relative_attention_num_buckets", preset.num_buckets)),
            max_distance=int(cfg.get("relative_attention_max_distance", preset.max_distance)),
            eps=float(cfg.get("layer_norm_epsilon", preset.eps)),
        )

    def to_hf(self, attn_implementation: str = "eager"):  # -> transformers.UMT5Config
        """The transformers config. Eager attention reproduces the reference bit for bit in float32
        (SDPA: 5e-7) and is cheap at <= 512 tokens, run once per video."""
        from transformers import UMT5Config

        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}")
        return UMT5Config(
            vocab_size=self.vocab_size,
            d_model=self.dim,
            d_kv=self.dim_attn // self.num_heads,
            d_ff=self.dim_ffn,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            relative_attention_num_buckets=self.num_buckets,
            relative_attention_max_distance=self.max_distance,
            dropout_rate=0.0,
            layer_norm_epsilon=self.eps,
            feed_forward_proj="gated-gelu",  # gelu_new: the reference's tanh-approximated GELU
            is_encoder_decoder=False,
            use_cache=False,
            attn_implementation=attn_implementation,
        )


def checkpoint_key_map(config: TextEncoderConfig) -> dict[str, str]:
    """Original ``.pth`` key -> parameter name inside ``UMT5EncoderModel.encoder`` (a UMT5Stack).

    The reference's ``gate.0`` is the GELU branch (``wi_0``) and ``fc1`` the linear branch
    (``wi_1``): ``fc2(fc1(x) * gelu(gate(x)))``.
    """
    keys = {"token_embedding.weight": "embed_tokens.weight", "norm.weight": "final_layer_norm.weight"}
    for i in range(config.num_layers):
        attn, ffn = f"block.{i}.layer.0", f"block.{i}.layer.1"
        for p in "qkvo":
            keys[f"blocks.{i}.attn.{p}.weight"] = f"{attn}.SelfAttention.{p}.weight"
        keys[f"blocks.{i}.pos_embedding.embedding.weight"] = f"{attn}.SelfAttention.relative_attention_bias.weight"
        keys[f"blocks.{i}.norm1.weight"] = f"{attn}.layer_norm.weight"
        keys[f"blocks.{i}.ffn.gate.0.weight"] = f"{ffn}.DenseReluDense.wi_0.weight"
        keys[f"blocks.{i}.ffn.fc1.weight"] = f"{ffn}.DenseReluDense.wi_1.weight"
        keys[f"blocks.{i}.ffn.fc2.weight"] = f"{ffn}.DenseReluDense.wo.weight"
        keys[f"blocks.{i}.norm2.weight"] = f"{ffn}.layer_norm.weight"
    return keys


def build_model(config: TextEncoderConfig, attn_implementation: str = "eager") -> nn.Module:
    """``UMT5EncoderModel`` on the meta device (no memory), in eval mode."""
    from transformers import UMT5EncoderModel

    with meta_device():
        model = UMT5EncoderModel(config.to_hf(attn_implementation))
    return model.eval().requires_grad_(False)


def load_original(
    model: nn.Module, path: Path, config: TextEncoderConfig, *, dtype: torch.dtype, device: torch.device | str
) -> None:
    """Stream the original file into ``model`` (built by :func:`build_model`), strictly."""
    key_map = checkpoint_key_map(config)
    _check_present(path, key_map)
    # Load into the encoder stack only: the top-level ``shared`` embedding is the same tensor
    # (tied), and loading it twice would double the 1 GB embedding.
    load_streaming(
        model.encoder,
        iter_files([path]),
        weight_set=WEIGHT_SET,
        dtype=dtype,
        device=device,
        rename=lambda key: key_map.get(key, key),  # unknown keys stay unknown -> reported as unexpected
        expected_files=str(path),
    )
    model.shared = model.encoder.embed_tokens


def load_diffusers(
    model: nn.Module, files: Sequence[Path], *, dtype: torch.dtype, device: torch.device | str
) -> None:
    """Stream a transformers ``UMT5EncoderModel`` checkpoint (``shared.weight``, ``encoder.*``) into
    ``model``, strictly. The tied embedding may be stored as ``shared.weight``,
    ``encoder.embed_tokens.weight`` or both (the same tensor)."""
    expected_files = ", ".join(str(f) for f in files)
    present = {key for key, _, _ in iter_files(files)}
    embed = {"shared.weight", "encoder.embed_tokens.weight"}
    wanted = {f"encoder.{name}" for name in model.encoder.state_dict()} - embed
    missing = sorted(wanted - present) + ([] if present & embed else ["shared.weight"])
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(
            f"Tensor '{missing[0]}'{more} is missing from {expected_files}; {WAN_I2V_480P_DIFFUSERS.advice()}."
        )

    def rename(key: str) -> str | None:
        if key == "shared.weight":
            return None if "encoder.embed_tokens.weight" in present else "embed_tokens.weight"
        if key.startswith("encoder."):
            return key.removeprefix("encoder.")
        return f"\0{key}"  # no parameter has this name -> reported as unexpected under its file key

    load_streaming(
        model.encoder,
        iter_files(files),
        weight_set=WAN_I2V_480P_DIFFUSERS,
        dtype=dtype,
        device=device,
        rename=rename,
        expected_files=expected_files,
    )
    model.shared = model.encoder.embed_tokens


def _check_present(path: Path, key_map: Mapping[str, str]) -> None:
    """Name a missing tensor by its key in the released file, which is what a user can check."""
    present = {key for key, _, _ in iter_files([path])}
    missing = [key for key in key_map if key not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"Tensor '{missing[0]}'{more} is missing from {path}; {WEIGHT_SET.advice()}.")


# ---------------------------------------------------------------------------------------------
# Prompt cleaning (the reference's clean='whitespace')


def clean_prompt(text: str) -> str:
    """ftfy repair, double HTML unescape, then collapse whitespace, as the reference does.

    ftfy matters for exactness: it straightens curly quotes and folds full-width characters,
    which changes the token ids of everyday prompts.
    """
    try:
        import ftfy
    except ImportError as exc:  # pragma: no cover - a packaging problem, not a user one
        raise ImportError("talkgen's text encoder needs ftfy (pip install 'ftfy>=6.1')") from exc
    import regex  # a transformers dependency; its \s is the Unicode White_Space set, as upstream

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------------------
# The encoder


class TextEncoder:
    """Prompts -> umT5 token features, one ``[L_i, dim]`` tensor per prompt."""

    def __init__(self, model: nn.Module, tokenizer: Any | None, config: TextEncoderConfig, text_len: int = TEXT_LEN):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.text_len = text_len

    @classmethod
    def from_original(
        cls,
        pth_path: str | Path,
        tokenizer_dir: str | Path | None,
        config: TextEncoderConfig | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> TextEncoder:
        """Load the released weights; with ``tokenizer_dir=None`` only :meth:`encode_ids` works."""
        config = config or TextEncoderConfig.umt5_xxl()
        pth_path = Path(pth_path)
        if not pth_path.is_file():
            raise WeightsError(f"Text encoder weights {pth_path} not found; {WEIGHT_SET.advice()}.")
        tokenizer = _load_tokenizer(Path(tokenizer_dir)) if tokenizer_dir is not None else None
        if tokenizer is not None:
            _check_vocab(tokenizer, config, tokenizer_dir, WEIGHT_SET)
        model = build_model(config)
        load_original(model, pth_path, config, dtype=dtype, device=device)
        return cls(model, tokenizer, config)

    @classmethod
    def from_diffusers(
        cls,
        folder: str | Path,
        config: TextEncoderConfig | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        *,
        tokenizer_dir: str | Path | None = None,
        tokenizer: bool = True,
    ) -> TextEncoder:
        """Load the ``text_encoder/`` folder of ``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers``.

        transformers' ``UMT5EncoderModel`` layout: ``config.json`` (the default ``config``; the umT5-XXL
        preset without one) and ``model.safetensors`` or shards with their index. The tokenizer is the
        sibling ``tokenizer/`` folder unless ``tokenizer_dir`` names another; ``tokenizer=False`` loads
        none (only :meth:`encode_ids` works then).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise WeightsError(f"Text encoder folder {folder} not found; {WAN_I2V_480P_DIFFUSERS.advice()}.")
        if config is None:
            values = read_config_json(folder / "config.json")
            config = TextEncoderConfig.from_hf_config(values) if values else TextEncoderConfig.umt5_xxl()
        files = safetensors_files(folder, "model", WAN_I2V_480P_DIFFUSERS)
        loaded_tokenizer = None
        if tokenizer:
            tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else folder.parent / "tokenizer"
            loaded_tokenizer = _load_tokenizer(tokenizer_dir, WAN_I2V_480P_DIFFUSERS)
            _check_vocab(loaded_tokenizer, config, tokenizer_dir, WAN_I2V_480P_DIFFUSERS)
        model = build_model(config)
        load_diffusers(model, files, dtype=dtype, device=device)
        return cls(model, loaded_tokenizer, config)

    @property
    def device(self) -> torch.device:
        return self.model.encoder.embed_tokens.weight.device

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)``, each ``[B, text_len]``: cleaned, ``</s>`` appended, padded/truncated."""
        if self.tokenizer is None:
            raise TypeError("this TextEncoder was loaded without a tokenizer; use encode_ids")
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return batch.input_ids, batch.attention_mask

    @torch.inference_mode()
    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` ids and mask (1 = real token) -> ``[B, L, dim]``; padded rows are not meaningful."""
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    def encode(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """One ``[L_i, dim]`` tensor per prompt, ``L_i`` its real token count (``</s>`` included)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            return []
        ids, mask = self.tokenize(prompts)
        lengths = mask.sum(dim=1).tolist()
        # Padded keys are masked and the position bias depends only on i - j, so dropping the
        # padding columns no real token can see changes nothing but the cost (512 -> longest).
        longest = max(lengths)
        out = self.encode_ids(ids[:, :longest], mask[:, :longest])
        return [row[:n] for row, n in zip(out, lengths)]


def _load_tokenizer(tokenizer_dir: Path, weight_set: WeightSet = WEIGHT_SET) -> Any:
    from transformers import AutoTokenizer

    if not tokenizer_dir.is_dir():
        raise WeightsError(f"Tokenizer folder {tokenizer_dir} not found; {weight_set.advice()}.")
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"Tokenizer folder {tokenizer_dir} is incomplete ({exc}); {weight_set.advice()}.") from exc


def _check_vocab(tokenizer: Any, config: TextEncoderConfig, tokenizer_dir: Any, weight_set: WeightSet) -> None:
    if len(tokenizer) > config.vocab_size:
        raise WeightsError(
            f"The tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the text encoder only "
            f"{config.vocab_size}: tokenizer and weights come from different models; {weight_set.advice()}."
        )


# ---------------------------------------------------------------------------------------------
# A tiny stand-in with the released file layout, for tests and demos without the 11 GB file

_TINY_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in umT5
_TINY_WORDS = (
    "a an the and or of to in on at with for from is are was his her their this that it "
    "woman man person people two speaking talking singing smiling looking camera video face "
    "room light background studio close up shot front mouth moving head hands natural"
).split()


def _tiny_vocab() -> list[tuple[str, float]]:
    """Unigram pieces: whole words, then single characters so any ASCII text is covered."""
    chars = string.ascii_letters + string.digits + string.punctuation
    return (
        [(s, 0.0) for s in _TINY_SPECIALS]
        + [("\u2581" + w, -2.0) for w in _TINY_WORDS]
        + [("\u2581", -3.0)]
        + [(c, -5.0) for c in chars]
    )


def _write_tiny_tokenizer(directory: Path) -> int:
    """A T5-shaped tokenizer (Unigram, Metaspace, ``</s>`` appended) saved for AutoTokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram(_tiny_vocab(), unk_id=2))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(directory))
    return len(fast)


def write_tiny_text_encoder(weights_dir: Path, seed: int = 0) -> TextEncoderConfig:
    """Write random tiny weights as ``models_t5_umt5-xxl-enc-bf16.pth`` plus ``google/umt5-xxl/``.

    Same format as the release: ``torch.save`` of a plain dict of bf16 tensors under the
    original key names. Returns the config to load them with (``TextEncoderConfig.tiny()``).
    """
    config = TextEncoderConfig.tiny()
    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in original_shapes(config).items():
        noise = torch.randn(shape, generator=gen)
        if len(shape) == 1:  # RMSNorm gains near 1
            t = 1.0 + 0.1 * noise
        elif key.endswith("embedding.weight"):  # token embeddings and position biases
            t = noise
        else:  # linear layers: unit-variance outputs
            t = noise * shape[1] ** -0.5
        state[key] = t.to(torch.bfloat16)
    torch.save(state, weights_dir / CHECKPOINT_NAME)
    vocab = _write_tiny_tokenizer(weights_dir / TOKENIZER_SUBDIR)
    assert vocab == config.vocab_size, "tiny tokenizer and tiny config disagree"
    return config


def original_shapes(config: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor in the released file for ``config`` (the reference module tree)."""
    c = config
    shapes: dict[str, tuple[int, ...]] = {"token_embedding.weight": (c.vocab_size, c.dim), "norm.weight": (c.dim,)}
    for i in range(c.num_layers):
        b = f"blocks.{i}"
        shapes.update({f"{b}.attn.{p}.weight": (c.dim_attn, c.dim) for p in "qkv"})
        shapes[f"{b}.attn.o.weight"] = (c.dim, c.dim_attn)
        shapes[f"{b}.pos_embedding.embedding.weight"] = (c.num_buckets, c.num_heads)
        shapes[f"{b}.ffn.gate.0.weight"] = (c.dim_ffn, c.dim)
        shapes[f"{b}.ffn.fc1.weight"] = (c.dim_ffn, c.dim)
        shapes[f"{b}.ffn.fc2.weight"] = (c.dim, c.dim_ffn)
        shapes[f"{b}.norm1.weight"] = (c.dim,)
        shapes[f"{b}.norm2.weight"] = (c.dim,)
    return shapes
