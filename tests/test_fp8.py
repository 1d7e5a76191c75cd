"""The fp8 switch: parsed from arguments, the CLI and TALKGEN_FP8; on where it cannot run (the CPU,
an older GPU, no torchao) it is off under "auto" and a clear error under "on". The fp8 numbers
themselves (quality against bf16, speed) need an sm89+ GPU: benchmarks/check_fp8.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from talkgen.errors import ResourceError
from talkgen.runtime.fp8 import fp8_unsupported_reason, parse_fp8, resolve_fp8


def test_parse_fp8(monkeypatch):
    assert parse_fp8(True) == "on" and parse_fp8(False) == "off"
    assert parse_fp8("AUTO") == "auto" and parse_fp8("1") == "on" and parse_fp8("no") == "off"
    monkeypatch.delenv("TALKGEN_FP8", raising=False)
    assert parse_fp8(None) == "auto"
    monkeypatch.setenv("TALKGEN_FP8", "off")
    assert parse_fp8(None) == "off"
    with pytest.raises(ResourceError, match="auto, on or off"):
        parse_fp8("maybe")


def test_fp8_on_the_cpu_is_off_by_default_and_an_error_when_asked_for():
    cpu = torch.device("cpu")
    assert "compute capability 8.9" in fp8_unsupported_reason(cpu)
    assert resolve_fp8("auto", cpu) is False and resolve_fp8(False, cpu) is False
    with pytest.raises(ResourceError, match=r"fp8 was asked for .*--no-fp8"):
        resolve_fp8(True, cpu)


def test_missing_torchao_names_the_extra(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    reason = fp8_unsupported_reason(torch.device("cuda", 0))
    assert "talkgen[fp8]" in reason
    with pytest.raises(ResourceError, match=r"talkgen\[fp8\]"):
        resolve_fp8("on", torch.device("cuda", 0))
    assert resolve_fp8("auto", torch.device("cuda", 0)) is False


def test_old_gpu_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    assert "A100 has 8.0" in fp8_unsupported_reason(torch.device("cuda", 0))


def test_pipeline_with_fp8_on_the_cpu_errors(tmp_path: Path):
    from talkgen.pipeline.pipeline import Pipeline
    from talkgen.pipeline.tiny import ensure_tiny_weights

    with pytest.raises(ResourceError, match="fp8"):
        Pipeline.from_pretrained(ensure_tiny_weights(tmp_path / "tiny"), "tiny", device="cpu", fp8=True)


def test_cli_passes_memory_and_fp8_options(tmp_path: Path, monkeypatch):
    """`talkgen generate --memory --vram-budget --fp8/--no-fp8` reach Pipeline.from_pretrained."""
    import numpy as np
    import soundfile as sf
    from PIL import Image
    from typer.testing import CliRunner

    from talkgen.cli import app
    from talkgen.pipeline.pipeline import Pipeline

    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    sf.write(tmp_path / "s.wav", np.zeros(16_000, dtype=np.float32), 16_000)
    seen = []

    def fake_from_pretrained(*args, **kwargs):
        seen.append(kwargs)
        raise ResourceError("stop here")

    monkeypatch.setattr(Pipeline, "from_pretrained", fake_from_pretrained)
    base = ["generate", "--weights", str(tmp_path / "w"), "--model", "tiny", "--device", "cpu",
            "--image", str(tmp_path / "p.png"), "--audio", str(tmp_path / "s.wav")]
    for extra, expected in (
        (["--memory", "stream-blocks", "--vram-budget", "12", "--fp8"], dict(memory="stream-blocks", vram_budget_gb=12.0, fp8=True)),
        (["--no-fp8"], dict(memory=None, vram_budget_gb=None, fp8=False)),
        ([], dict(memory=None, vram_budget_gb=None, fp8=None)),
    ):
        result = CliRunner().invoke(app, base + extra)
        assert result.exit_code == 1 and "stop here" in result.output, result.output
        assert {k: seen[-1][k] for k in expected} == expected
