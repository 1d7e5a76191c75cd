"""Security properties: nothing is unpickled, API keys are compared in constant time, local files
are read only under the configured root, a full disk leaves no half-written file, temporary folders
of killed processes are removed."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from talkgen.errors import InputError
from talkgen.service.settings import Settings

from .harness import REPO, scan_unsafe_loads


def test_nothing_in_the_package_scripts_or_deployment_unpickles() -> None:
    report = scan_unsafe_loads([REPO / "talkgen", REPO / "deploy", REPO / "scripts"])
    assert report["files"] > 50
    assert report["unsafe"] == [], "weights are safetensors, or torch.load(weights_only=True):\n" + \
        "\n".join(report["unsafe"])


def test_api_keys_are_checked_in_constant_time_against_every_key(tmp_path) -> None:
    from fastapi.testclient import TestClient

    from talkgen.service import api

    source = inspect.getsource(api.authorize)
    assert "hmac.compare_digest" in source and "sha256" in source
    loop = source[source.index("for key in keys"):]
    loop = loop[: loop.index("\n    if ")]
    assert "break" not in loop and "return" not in loop, "the key loop must not exit early"

    settings = Settings(model="tiny", workers=0, data_dir=tmp_path, api_keys="k3y-alpha-0001,k3y-bravo-0002")
    with TestClient(api.create_app(settings)) as client:
        for header in (None, "Bearer k3y-alpha-0002", "Bearer k3y-alpha-000", "Bearer k3y-alpha-00011",
                       "Bearer ", "Basic k3y-alpha-0001", "k3y-alpha-0001", "Bearer K3Y-ALPHA-0001",
                       "Bearer k3y-alpha-0001,k3y-bravo-0002", "Bearer \u00e9\u00e9".encode("latin-1")):
            headers = {"Authorization": header} if header is not None else {}
            response = client.get("/v1/jobs", headers=headers)
            assert response.status_code == 401 and response.json()["type"] == "HTTPError", (header, response.text)
        for key in ("k3y-alpha-0001", "k3y-bravo-0002"):
            assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            assert client.get("/v1/jobs", headers={"Authorization": f"bearer  {key} "}).status_code == 200


def test_local_inputs_are_read_only_under_the_input_root(tmp_path) -> None:
    from talkgen.service.intake import resolve_input

    root = tmp_path / "root"
    (root / "in").mkdir(parents=True)
    (root / "in" / "a.wav").write_bytes(b"x")
    (tmp_path / "secret.wav").write_bytes(b"x")
    (root / "in" / "link.wav").symlink_to(tmp_path / "secret.wav")
    (root / "in" / "dir-link").symlink_to(tmp_path)
    settings = Settings(input_root=root, input_buckets="ours")
    inside = (root / "in" / "a.wav").as_uri()
    assert resolve_input("audio", "in/a.wav", settings) == inside
    assert resolve_input("audio", str(root / "in" / "a.wav"), settings) == inside
    assert resolve_input("audio", inside, settings) == inside
    assert resolve_input("audio", "s3://ours/in/a.wav", settings) == "s3://ours/in/a.wav"
    for value in ("../secret.wav", str(tmp_path / "secret.wav"), "in/link.wav", "in/dir-link/secret.wav",
                  "in/../../secret.wav", "/etc/passwd", "file:///etc/passwd", "file://host/etc/passwd", "in",
                  "in/missing.wav", "in/a.wav\0", "s3://theirs/a.wav", "s3://ours/../a.wav", "s3://ours/a/./b.wav",
                  "s3://ours//a.wav", "http://ours/a.wav", "ftp://x/a.wav", "C:\\in\\a.wav"):
        with pytest.raises(InputError, match="audio"):
            resolve_input("audio", value, settings)
    without_root = Settings()
    with pytest.raises(InputError, match="TALKGEN_INPUT_ROOT is not set"):
        resolve_input("image", str(root / "in" / "a.wav"), without_root)
    with pytest.raises(InputError, match="from no bucket"):
        resolve_input("image", "s3://any/a.png", without_root)
    # With S3 storage, its own bucket is allowed by default.
    assert Settings(storage="s3://results-bucket/prefix").allowed_buckets == ["results-bucket"]


def test_a_write_that_fills_the_disk_leaves_no_half_file_and_says_so(tmp_path) -> None:
    """A real limit (RLIMIT_FSIZE, in a child process): the write fails part-way, as on a full disk."""
    script = textwrap.dedent(f"""
        import resource, sys
        from pathlib import Path
        from talkgen.service.faults import failure_reason
        from talkgen.service.settings import Settings
        from talkgen.service.storage import LocalStorage
        source = Path({str(tmp_path / "big.bin")!r})
        source.write_bytes(b"x" * 200_000)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))
        storage = LocalStorage(Path({str(tmp_path / "storage")!r}), Settings())
        try:
            storage.put_file("jobs/j/video.mp4", source)
        except OSError as exc:
            print(failure_reason(exc))
            sys.exit(0)
        sys.exit("the write did not fail")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ulimit" in result.stdout and "video.mp4" in result.stdout, result.stdout
    assert [p.name for p in (tmp_path / "storage").rglob("*") if p.is_file()] == []


def test_temporary_folders_of_killed_processes_are_swept(tmp_path, monkeypatch) -> None:
    import tempfile

    from talkgen.service.faults import sweep_stale_temp, temp_prefix

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"talkgen-job-{dead.pid}-abc-x1"
    mine = tmp_path / (temp_prefix("job", "def") + "x2")
    other = tmp_path / f"talkgen-upload-{os.getppid()}-x3"  # a live process (pytest's parent)
    unrelated = tmp_path / "somebody-else"
    for folder in (stale, mine, other, unrelated):
        folder.mkdir()
        (folder / "file").write_bytes(b"x")
    assert sweep_stale_temp() == 1
    assert not stale.exists() and mine.exists() and other.exists() and unrelated.exists()
    Path(mine / "file").unlink()
