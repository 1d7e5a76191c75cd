"""`talkgen serve` and `talkgen worker` refuse bad settings in one sentence, before starting anything."""

from __future__ import annotations

from typer.testing import CliRunner

from talkgen.cli import app

runner = CliRunner()


def test_serve_needs_keys_off_loopback_and_weights_for_real_models(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("TALKGEN_API_KEYS", raising=False)
    result = runner.invoke(app, ["serve", "--model", "tiny", "--host", "0.0.0.0", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "TALKGEN_API_KEYS" in result.output
    result = runner.invoke(app, ["serve", "--model", "multitalk", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "--weights" in result.output
    result = runner.invoke(app, ["worker", "--redis", "redis://127.0.0.1:1/0", "--model", "infinitetalk"])
    assert result.exit_code == 1 and "--weights" in result.output
    result = runner.invoke(app, ["serve", "--model", "nope"])
    assert result.exit_code == 1 and "Invalid settings: model" in result.output
