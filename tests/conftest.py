"""Shared fixtures: where the golden files live, and how to compare against them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def golden_dir() -> Path:
    """`TALKGEN_GOLDEN_DIR`, else `../shared/golden` beside the repository."""
    env = os.environ.get("TALKGEN_GOLDEN_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "golden"


def golden_files(prefix: str, suffix: str = ".safetensors") -> list[Path]:
    """Every golden file whose name starts with `prefix`, so dropped-in files are tested too."""
    directory = golden_dir()
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith(prefix) and p.name.endswith(suffix))


def golden_params(prefix: str, suffix: str = ".safetensors"):
    """pytest parameters over golden files; one visible skip (with the reason) when there are none."""
    files = golden_files(prefix, suffix)
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no {prefix}* golden files in {golden_dir()}"))]
    return [pytest.param(p, id=p.name) for p in files]


def read_golden(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (float16 storage upcast to float32, as the README says) and the metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {}
        for key in f.keys():
            t = f.get_tensor(key)
            tensors[key] = t.float() if t.dtype == torch.float16 else t
    return tensors, meta


def meta_json(meta: dict[str, str], key: str):
    return json.loads(meta[key])


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
