"""The weight sets talkgen reads: Hub repos, revisions, file names, folders and sizes, in one place.

Every error about missing weights names one of these and the exact command that fetches it.

Layout of a weights directory (the reference README's, unchanged)::

    DIR/Wan2.1-I2V-14B-480P/          config, umT5 .pth + google/umt5-xxl/, CLIP .pth, VAE .pth, 7 DiT shards
    DIR/chinese-wav2vec2-base/        config.json, preprocessor_config.json, model.safetensors (refs/pr/1)
    DIR/MeiGen-MultiTalk/multitalk.safetensors
    DIR/InfiniteTalk/{single,multi}/infinitetalk.safetensors
    DIR/InfiniteTalk/quant_models/..., DIR/MeiGen-MultiTalk/quant_models/...   (--quant)
    DIR/<LoRA file>.safetensors                                              (--lora)
    DIR/Kokoro-82M/                                                          (--tts)
    DIR/Wan2.1-I2V-14B-480P-Diffusers/transformer/                           (--layout diffusers)

Revisions: no commit of these Hub repos could be looked up when this was written (no machine here
reaches the Hub), so every set says ``"main"``. The commit that ``main`` resolved to is written
into ``DIR/talkgen-lock.json`` at download time, and later downloads into the same directory reuse
it, so one directory never mixes two revisions of a repo. Sizes are the spec's approximations,
for messages only; the exact sizes and hashes come from the Hub when downloading.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from itertools import product
from pathlib import Path, PurePosixPath

from talkgen.errors import InputError
from talkgen.weights.loading import WeightSet

GB = 10**9

# Folder names inside a weights directory, as the reference's README lays them out.
BASE_DIR = "Wan2.1-I2V-14B-480P"
BASE_DIFFUSERS_DIR = "Wan2.1-I2V-14B-480P-Diffusers"
MULTITALK_DIR = "MeiGen-MultiTalk"
INFINITETALK_DIR = "InfiniteTalk"
WAV2VEC2_DIR = "chinese-wav2vec2-base"
KOKORO_DIR = "Kokoro-82M"

# Files of the base folder (original layout).
DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIT_SHARD_GLOB = "diffusion_pytorch_model-*-of-*.safetensors"
DIT_SHARDS = tuple(f"diffusion_pytorch_model-{i:05d}-of-00007.safetensors" for i in range(1, 8))
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER_DIR = "google/umt5-xxl"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
VAE_FILE = "Wan2.1_VAE.pth"
MULTITALK_FILE = "multitalk.safetensors"
INFINITETALK_FILE = "infinitetalk.safetensors"  # under single/ or multi/

# --- what a user asks for ------------------------------------------------------------------------

MODELS = ("multitalk", "infinitetalk")
PEOPLE = ("single", "multi")
LORAS = ("lightx2v", "fusionx")
QUANTS = ("fp8", "int8")
LAYOUTS = ("original", "diffusers")


@dataclass(frozen=True)
class Selection:
    """The options of ``talkgen download``: which weights one run of a model needs."""

    model: str = "multitalk"
    people: str = "single"
    lora: str | None = None
    quant: str | None = None
    tts: bool = False
    layout: str = "original"

    def __post_init__(self) -> None:
        for option, value, choices in (
            ("model", self.model, MODELS), ("people", self.people, PEOPLE), ("layout", self.layout, LAYOUTS),
            ("lora", self.lora, (None, *LORAS)), ("quant", self.quant, (None, *QUANTS)),
        ):  # fmt: skip
            if value not in choices:
                shown = " | ".join(c for c in choices if c is not None)
                raise InputError(f"--{option} {value}: choose {shown}.")
        if self.model == "multitalk" and self.people != "single":
            # One MultiTalk file serves one and two speakers; normalising keeps commands and locks canonical.
            object.__setattr__(self, "people", "single")

    def command(self, weights_dir: str | Path = "DIR", *, repair: bool = False) -> str:
        """The exact ``talkgen download`` command for this selection (defaults left out)."""
        parts = ["talkgen download", f"--model {self.model}"]
        if self.model == "infinitetalk":
            parts.append(f"--people {self.people}")
        if self.lora:
            parts.append(f"--lora {self.lora}")
        if self.quant:
            parts.append(f"--quant {self.quant}")
        if self.tts:
            parts.append("--tts")
        if self.layout != "original":
            parts.append(f"--layout {self.layout}")
        if repair:
            parts.append("--repair")
        shown_dir = str(weights_dir)
        parts.append(f"--dir {shown_dir if shown_dir == 'DIR' else shlex.quote(shown_dir)}")
        return " ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Selection:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def download_command(weights_dir: str | Path = "DIR", model: str = "multitalk", people: str = "single",
                     **options) -> str:  # fmt: skip
    """``talkgen download ...`` for a model as the loaders name it (used in every missing-weights error)."""
    return Selection(model=model, people=people, **options).command(weights_dir)


# --- the weight sets (kept by name for the loaders' error messages) -------------------------------

WAN_I2V_480P = WeightSet(
    name="Wan2.1-I2V-14B-480P", repo_id="Wan-AI/Wan2.1-I2V-14B-480P", download_command=download_command(),
)
WAN_I2V_480P_DIFFUSERS = WeightSet(
    name="Wan2.1-I2V-14B-480P-Diffusers", repo_id="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
    download_command=download_command(layout="diffusers"),
)
MULTITALK = WeightSet(
    name="MeiGen-MultiTalk", repo_id="MeiGen-AI/MeiGen-MultiTalk", download_command=download_command(),
)
INFINITETALK_SINGLE = WeightSet(
    name="InfiniteTalk (single)", repo_id="MeiGen-AI/InfiniteTalk",
    download_command=download_command(model="infinitetalk", people="single"),
)
INFINITETALK_MULTI = WeightSet(
    name="InfiniteTalk (multi)", repo_id="MeiGen-AI/InfiniteTalk",
    download_command=download_command(model="infinitetalk", people="multi"),
)
WAV2VEC2 = WeightSet(
    name="chinese-wav2vec2-base", repo_id="TencentGameMate/chinese-wav2vec2-base", download_command=download_command(),
)
LIGHTX2V = WeightSet(
    name="lightx2v LoRA", repo_id="Kijai/WanVideo_comfy", download_command=download_command(lora="lightx2v"),
)
FUSIONX = WeightSet(
    name="FusionX LoRA", repo_id="vrgamedevgirl84/Wan14BT2VFusioniX", download_command=download_command(lora="fusionx"),
)
KOKORO = WeightSet(name="Kokoro-82M", repo_id="hexgrad/Kokoro-82M", download_command=download_command(tts=True))


@dataclass(frozen=True)
class FileSet:
    """Files of one Hub repo, at one revision, that land in one folder of the weights directory.

    ``files`` are exact repo paths, or fnmatch patterns (``*``, ``?``, ``[``) where the names are
    not fixed (tokenizer files, voices); patterns are expanded against the repo's file list.
    """

    key: str  # stable id: the lock file and `talkgen info` use it
    title: str  # what `talkgen info` shows; sets with the same title are shown as one
    repo_id: str
    files: tuple[str, ...]
    folder: str  # under the weights directory; "" is the directory itself
    enables: str
    weight_set: WeightSet
    revision: str = "main"
    strip_prefix: str = ""  # removed from repo paths before they are placed under `folder`
    approx_bytes: int | None = None

    def local_path(self, repo_path: str) -> str:
        """Where a repo file lands, relative to the weights directory (POSIX separators)."""
        if self.strip_prefix and repo_path.startswith(self.strip_prefix):
            repo_path = repo_path[len(self.strip_prefix):]
        return str(PurePosixPath(self.folder, repo_path)) if self.folder else repo_path

    def exact_files(self) -> tuple[str, ...]:
        return tuple(f for f in self.files if not is_pattern(f))

    def patterns(self) -> tuple[str, ...]:
        return tuple(f for f in self.files if is_pattern(f))

    def expand(self, repo_files: list[str]) -> tuple[list[str], list[str]]:
        """The repo paths this set needs, and the entries of ``files`` the repo does not have."""
        chosen: list[str] = []
        absent: list[str] = []
        available = set(repo_files)
        for entry in self.files:
            if is_pattern(entry):
                matches = sorted(p for p in repo_files if fnmatchcase(p, entry))
            else:
                matches = [entry] if entry in available else []
            if not matches:
                absent.append(entry)
            chosen.extend(m for m in matches if m not in chosen)
        return chosen, absent


def is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


def _quant_set(model: str, people: str | None, quant: str, lora: str | None, dit: str, qmap: str,
               approx_bytes: int | None = None) -> FileSet:  # fmt: skip
    """A pre-quantized DiT (base + audio, optimum-quanto) and its quantization map."""
    folder, weight_set = (MULTITALK_DIR, MULTITALK) if model == "multitalk" else (
        INFINITETALK_DIR, INFINITETALK_MULTI if people == "multi" else INFINITETALK_SINGLE)
    key = "-".join(p for p in (model, people, quant, lora) if p)
    what = f"{model}{f' ({people})' if people else ''}, {quant}{f' with {lora} merged' if lora else ''}"
    return FileSet(
        key=key, title=f"{weight_set.name} {quant}{f' + {lora}' if lora else ''} DiT",
        repo_id=weight_set.repo_id, files=(f"quant_models/{dit}", f"quant_models/{qmap}"), folder=folder,
        enables=f"--quant {quant}{f' --lora {lora}' if lora else ''}: the whole DiT pre-quantized ({what})",
        weight_set=weight_set, approx_bytes=approx_bytes,
    )


def _infinitetalk_quant(people: str, quant: str, lora: str | None = None) -> FileSet:
    stem = f"infinitetalk_{people}_{quant}{'_lora' if lora else ''}"
    approx = int(19.5 * GB) if (people, quant, lora) == ("single", "fp8", None) else None  # the spec's one size
    return _quant_set("infinitetalk", people, quant, lora, f"{stem}.safetensors", f"{stem}.json", approx)


_SETS = (
    FileSet(
        key="wan-i2v-480p", title="Wan2.1-I2V-14B-480P", repo_id=WAN_I2V_480P.repo_id, folder=BASE_DIR,
        files=("config.json", T5_FILE, f"{T5_TOKENIZER_DIR}/*", CLIP_FILE, VAE_FILE),
        enables="umT5 text encoder, CLIP image encoder, VAE and DiT config: needed by every model",
        weight_set=WAN_I2V_480P, approx_bytes=int((11.4 + 4.77 + 0.508) * GB),
    ),
    FileSet(
        key="wan-i2v-480p-dit", title="Wan2.1-I2V-14B-480P DiT", repo_id=WAN_I2V_480P.repo_id, folder=BASE_DIR,
        files=(DIT_INDEX, *DIT_SHARDS), enables="the 14B DiT in full precision (original layout)",
        weight_set=WAN_I2V_480P, approx_bytes=int(65.6 * GB),
    ),
    FileSet(
        key="wan-i2v-480p-diffusers-dit", title="Wan2.1-I2V-14B-480P-Diffusers DiT",
        repo_id=WAN_I2V_480P_DIFFUSERS.repo_id, folder=BASE_DIFFUSERS_DIR, files=("transformer/*",),
        enables="the 14B DiT in the -Diffusers layout (--layout diffusers)", weight_set=WAN_I2V_480P_DIFFUSERS,
    ),
    FileSet(
        key="wav2vec2", title="chinese-wav2vec2-base", repo_id=WAV2VEC2.repo_id, folder=WAV2VEC2_DIR,
        files=("config.json", "preprocessor_config.json"), enables="the audio encoder: needed by every model",
        weight_set=WAV2VEC2,
    ),
    # The safetensors copy exists only in the Hub PR refs/pr/1 (the reference README fetches it from
    # there); it avoids torch.load of pytorch_model.bin, which talkgen does not download.
    FileSet(
        key="wav2vec2-safetensors", title="chinese-wav2vec2-base", repo_id=WAV2VEC2.repo_id, folder=WAV2VEC2_DIR,
        files=("model.safetensors",), revision="refs/pr/1", enables="the audio encoder: needed by every model",
        weight_set=WAV2VEC2,
    ),
    FileSet(
        key="multitalk", title="MeiGen-MultiTalk", repo_id=MULTITALK.repo_id, folder=MULTITALK_DIR,
        files=(MULTITALK_FILE,), enables="--model multitalk (one or two speakers)", weight_set=MULTITALK,
        approx_bytes=int(9.95 * GB),
    ),
    FileSet(
        key="infinitetalk-single", title="InfiniteTalk (single)", repo_id=INFINITETALK_SINGLE.repo_id,
        folder=INFINITETALK_DIR, files=(f"single/{INFINITETALK_FILE}",),
        enables="--model infinitetalk --people single", weight_set=INFINITETALK_SINGLE, approx_bytes=int(9.95 * GB),
    ),
    FileSet(
        key="infinitetalk-multi", title="InfiniteTalk (multi)", repo_id=INFINITETALK_MULTI.repo_id,
        folder=INFINITETALK_DIR, files=(f"multi/{INFINITETALK_FILE}",),
        enables="--model infinitetalk --people multi (two speakers)", weight_set=INFINITETALK_MULTI,
        approx_bytes=int(9.95 * GB),
    ),
    # Upstream's pre-quantized files (spec 1.4/1.5). MultiTalk documents no fp8 files; InfiniteTalk has
    # no single_fp8_lora; its "_lora" files have FusionX merged (maintainer, MeiGen-AI/InfiniteTalk#43).
    _quant_set("multitalk", None, "int8", None, "dit_model_int8.safetensors", "dit_model_map_int8.json"),
    _quant_set("multitalk", None, "int8", "fusionx", "quant_model_int8_FusionX.safetensors",
               "quantization_map_int8_FusionX.json"),  # fmt: skip
    *(_infinitetalk_quant(p, q) for p, q in product(PEOPLE, QUANTS)),
    _infinitetalk_quant("single", "int8", "fusionx"),
    _infinitetalk_quant("multi", "fp8", "fusionx"),
    _infinitetalk_quant("multi", "int8", "fusionx"),
    # LoRAs land in the weights directory itself, where the reference README puts them.
    FileSet(
        key="lora-lightx2v", title="lightx2v LoRA", repo_id=LIGHTX2V.repo_id, folder="",
        files=("Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors",),
        enables="--lora lightx2v: 4-step sampling", weight_set=LIGHTX2V,
    ),
    FileSet(
        key="lora-fusionx", title="FusionX LoRA", repo_id=FUSIONX.repo_id, folder="",
        files=("FusionX_LoRa/Wan2.1_I2V_14B_FusionX_LoRA.safetensors",), strip_prefix="FusionX_LoRa/",
        enables="--lora fusionx: 8-step sampling", weight_set=FUSIONX,
    ),
    FileSet(
        key="tts-kokoro", title="Kokoro-82M", repo_id=KOKORO.repo_id, folder=KOKORO_DIR,
        files=("config.json", "kokoro-v1_0.pth", "voices/*.pt"), enables="--tts: speech from text (Kokoro TTS)",
        weight_set=KOKORO,
    ),
)

# The manifest. Tests replace it (monkeypatch) with tiny fake repos under the same keys.
CATALOG: dict[str, FileSet] = {s.key: s for s in _SETS}


def set_keys(selection: Selection) -> list[str]:
    """The keys of the file sets a selection needs, in download order (small shared files first)."""
    keys = ["wan-i2v-480p", "wav2vec2", "wav2vec2-safetensors"]
    if selection.quant:
        # A pre-quantized file is the whole DiT (base + audio, LoRA merged if any): nothing else of the DiT.
        people = selection.people if selection.model == "infinitetalk" else None
        keys.append("-".join(p for p in (selection.model, people, selection.quant, selection.lora) if p))
    else:
        keys.append("wan-i2v-480p-dit" if selection.layout == "original" else "wan-i2v-480p-diffusers-dit")
        keys.append("multitalk" if selection.model == "multitalk" else f"infinitetalk-{selection.people}")
        if selection.lora:
            keys.append(f"lora-{selection.lora}")
    if selection.tts:
        keys.append("tts-kokoro")
    return keys


def plan(selection: Selection, catalog: dict[str, FileSet] | None = None) -> list[FileSet]:
    """The file sets to fetch for a selection; an InputError for combinations nobody released."""
    catalog = CATALOG if catalog is None else catalog
    if selection.quant and selection.layout != "original":
        raise InputError("--quant replaces the whole DiT with a pre-quantized file; --layout does not apply to it.")
    keys = set_keys(selection)
    unknown = [k for k in keys if k not in catalog]
    if unknown:
        raise InputError(
            f"No released weights match `{selection.command()}` ({unknown[0]}); {_released_quant(catalog)}."
        )
    return [catalog[k] for k in keys]


def _released_quant(catalog: dict[str, FileSet]) -> str:
    """The --quant combinations that exist, as options (for the error about one that does not)."""
    options = []
    for key in sorted(catalog):
        selection = selection_for(key, catalog) if any(f"-{q}" in key for q in QUANTS) else None
        if selection is not None:
            options.append(selection.command().removeprefix("talkgen download ").removesuffix(" --dir DIR"))
    return f"pre-quantized weights exist for: {'; '.join(options)}" if options else "there are no pre-quantized weights"


def selection_for(key: str, catalog: dict[str, FileSet] | None = None) -> Selection | None:
    """The simplest selection whose download includes the set ``key`` (for 'get it with ...' hints)."""
    catalog = CATALOG if catalog is None else catalog
    for quant, lora, tts, layout, model, people in product(
        (None, *QUANTS), (None, *LORAS), (False, True), LAYOUTS, MODELS, PEOPLE,
    ):  # fmt: skip
        if (quant and layout != "original") or (model == "multitalk" and people != "single"):
            continue
        selection = Selection(model=model, people=people, lora=lora, quant=quant, tts=tts, layout=layout)
        if key in set_keys(selection) and all(k in catalog for k in set_keys(selection)):
            return selection
    return None

