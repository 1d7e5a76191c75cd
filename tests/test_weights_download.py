"""`talkgen download` / `verify` / weights status against a fake Hub on 127.0.0.1 (tests/hub_server.py).

The real manifest's file sets are reused with their keys, folders and file names (so the
pipeline's `check_weights` sees a real layout); only the repos are swapped for tiny fake ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
from collections import namedtuple

import httpx2
import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download, set_client_factory
from huggingface_hub.utils import _detect_agent
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook
from tqdm.auto import tqdm
from typer.testing import CliRunner

from talkgen.cli import app
from talkgen.errors import InputError, WeightsError
from talkgen.pipeline.loading import check_weights
from talkgen.weights import manifest
from talkgen.weights.download import PARTIAL_DIR, download_weights
from talkgen.weights.manifest import Selection
from talkgen.weights.verify import LOCK_NAME, describe_weights, human_size, read_lock

from hub_server import FakeHub

CHUNK = 64 * 1024  # huggingface_hub writes the body in chunks of this size (patched down from 10 MB)
BIG = 20 * CHUNK + 123  # the file the resume tests interrupt


def _bytes(seed: str, n: int) -> bytes:
    out = b""
    while len(out) < n:
        out += hashlib.sha256(f"{seed}{len(out)}".encode()).digest()
    return out[:n]


BASE = {
    "config.json": b'{"model_type": "i2v", "dim": 16}',
    manifest.T5_FILE: _bytes("t5", 5000),
    "google/umt5-xxl/spiece.model": _bytes("spm", 300),
    "google/umt5-xxl/tokenizer_config.json": b"{}",
    manifest.CLIP_FILE: _bytes("clip", 4000),
    manifest.VAE_FILE: _bytes("vae", 3000),
    manifest.DIT_INDEX: b'{"weight_map": {}}',
    "diffusion_pytorch_model-00001-of-00002.safetensors": _bytes("dit1", BIG),
    "diffusion_pytorch_model-00002-of-00002.safetensors": _bytes("dit2", 2000),
    "xlm-roberta-large/tokenizer.json": b"{} not needed, never downloaded",
}
REPOS = {
    "fake/wan": {"main": BASE},
    "fake/wav2vec2": {
        "main": {"config.json": b"{}", "preprocessor_config.json": b"{}", "pytorch_model.bin": _bytes("bin", 900)},
        "refs/pr/1": {"config.json": b"{}", "model.safetensors": _bytes("w2v", 1500)},
    },
    "fake/multitalk": {"main": {"multitalk.safetensors": _bytes("mt", 1000), "README.md": b"# readme"}},
    "fake/infinitetalk": {"main": {
        "single/infinitetalk.safetensors": _bytes("its", 1100), "multi/infinitetalk.safetensors": _bytes("itm", 1200),
        "quant_models/infinitetalk_single_fp8.safetensors": _bytes("q", 700),
        "quant_models/infinitetalk_single_fp8.json": b'{"map": 1}',
    }},
}  # fmt: skip
FAKE_REPO = {"wan-i2v-480p": "fake/wan", "wan-i2v-480p-dit": "fake/wan", "wav2vec2": "fake/wav2vec2",
             "wav2vec2-safetensors": "fake/wav2vec2", "multitalk": "fake/multitalk",
             "infinitetalk-single": "fake/infinitetalk", "infinitetalk-multi": "fake/infinitetalk",
             "infinitetalk-single-fp8": "fake/infinitetalk"}  # fmt: skip
SHARDS = ("diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors")


def fake_catalog() -> dict[str, manifest.FileSet]:
    """The real file sets, pointed at the fake repos (and at 2 DiT shards instead of 7)."""
    catalog = {}
    for key, repo in FAKE_REPO.items():
        real = manifest.CATALOG[key]
        files = (manifest.DIT_INDEX, *SHARDS) if key == "wan-i2v-480p-dit" else real.files
        catalog[key] = dataclasses.replace(real, repo_id=repo, files=files)
    return catalog


def _local_only(request: httpx2.Request) -> None:
    if request.url.host != "127.0.0.1":
        raise RuntimeError(f"a test tried to reach {request.url}")


@pytest.fixture
def hub(monkeypatch):
    """The fake Hub, with HF_ENDPOINT pointing at it, the fake manifest, and no way out of 127.0.0.1."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("huggingface_hub.utils._auth._get_token_from_file", lambda: None)
    # huggingface_hub fetches an "agent harness" list from huggingface.co for its user agent: not here.
    monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    monkeypatch.setattr(manifest, "CATALOG", fake_catalog())
    set_client_factory(lambda: httpx2.Client(event_hooks={"request": [hf_request_event_hook, _local_only]},
                                             follow_redirects=True, timeout=None))  # fmt: skip
    with FakeHub(REPOS) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server
    set_client_factory(default_client_factory)


def run(*args: str):
    result = CliRunner().invoke(app, list(args))
    result.text = " ".join(result.output.split())  # rich may wrap long lines; compare on words
    return result


def expected_files(selection: Selection) -> dict[str, bytes]:
    """Relative path in the weights directory -> content, from the fake repos."""
    files = {}
    for file_set in manifest.plan(selection):
        repo_files = REPOS[file_set.repo_id][file_set.revision]
        chosen, absent = file_set.expand(sorted(repo_files))
        assert not absent
        files.update({file_set.local_path(p): repo_files[p] for p in chosen})
    return files


MULTI = Selection(model="infinitetalk", people="multi")
MULTI_ARGS = ("--model", "infinitetalk", "--people", "multi")


def test_fresh_download_lands_in_the_layout_and_writes_the_lock(hub, tmp_path):
    weights = tmp_path / "weights"
    result = run("download", *MULTI_ARGS, "--dir", str(weights))
    assert result.exit_code == 0, result.output

    files = expected_files(MULTI)
    assert "Wan2.1-I2V-14B-480P/google/umt5-xxl/spiece.model" in files  # a pattern, expanded
    assert "chinese-wav2vec2-base/model.safetensors" in files  # from refs/pr/1
    for rel, content in files.items():
        assert (weights / rel).read_bytes() == content, rel
    on_disk = {p.relative_to(weights).as_posix() for p in weights.rglob("*") if p.is_file()}
    assert on_disk == set(files) | {LOCK_NAME}  # exactly the needed files: no README, .bin, xlm-roberta, partials
    assert not (weights / PARTIAL_DIR).exists()

    lock = read_lock(weights)
    assert set(lock) == set(files)
    for rel, entry in lock.items():
        assert entry.size == len(files[rel]) and entry.sha256 == hashlib.sha256(files[rel]).hexdigest()
        assert entry.command(weights) == f"talkgen download --model infinitetalk --people multi --dir {weights}"
    assert lock["chinese-wav2vec2-base/model.safetensors"].revision == "refs/pr/1"
    assert lock["chinese-wav2vec2-base/model.safetensors"].commit == hub.commit("fake/wav2vec2", "refs/pr/1")
    check_weights(weights, "infinitetalk", "multi")  # the pipeline's own check passes

    resolves = [r.path for r in hub.requests if "/resolve/" in r.path]
    assert resolves and all(re.search(r"/resolve/[0-9a-f]{40}/", p) for p in resolves)  # at the listed commit
    assert any(r.server == "cdn" for r in hub.requests)  # LFS bytes came from the other origin


def test_xet_stored_files_still_come_over_plain_http(hub, tmp_path):
    """The real Hub announces most large files as Xet-stored; talkgen fetches their resolve location
    over plain HTTP anyway (that is what keeps the cross-run resume), never the Xet protocol."""
    hub.xet = True
    download_weights(MULTI, tmp_path / "weights")
    assert not [r for r in hub.requests if "xet" in r.path]
    assert hub.gets(SHARDS[0])[0].server == "cdn"
    assert (tmp_path / "weights" / manifest.BASE_DIR / SHARDS[0]).read_bytes() == BASE[SHARDS[0]]


def test_second_run_downloads_nothing_and_rewrites_nothing(hub, tmp_path):
    weights = tmp_path / "weights"
    assert run("download", *MULTI_ARGS, "--dir", str(weights)).exit_code == 0
    stamps = {p: p.stat().st_mtime_ns for p in weights.rglob("*") if p.is_file() and p.name != LOCK_NAME}
    hub.requests.clear()

    result = run("download", *MULTI_ARGS, "--dir", str(weights))
    assert result.exit_code == 0, result.output
    assert "0 file(s) downloaded" in result.text
    assert all(r.path.startswith("/api/models/") for r in hub.requests)  # listings only: no HEAD, no GET of files
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_interrupted_download_resumes_with_a_range_request(hub, tmp_path):
    """A connection lost mid-file, and the Hub down for the retry: the run fails, keeping the part it
    got; the next run asks only for the rest."""
    weights = tmp_path / "weights"
    shard = SHARDS[0]
    # huggingface_hub writes whole chunks: 7 reach the disk. Its own immediate retry (with Range) fails too.
    hub.faults[shard] = [("drop", 7 * CHUNK + 1000), ("error", 500)]

    first = run("download", *MULTI_ARGS, "--dir", str(weights))
    assert first.exit_code == 1
    assert f"stopped at {7 * CHUNK} of {BIG} bytes" in first.text
    assert "run the same command again: it resumes from there" in first.text
    partial = list((weights / PARTIAL_DIR).rglob(f"{shard}.*.incomplete"))
    assert len(partial) == 1 and partial[0].stat().st_size == 7 * CHUNK
    assert not (weights / manifest.BASE_DIR / shard).exists()
    hub.requests.clear()

    second = run("download", *MULTI_ARGS, "--dir", str(weights))
    assert second.exit_code == 0, second.output
    (get,) = hub.gets(shard)
    assert get.headers["range"] == f"bytes={7 * CHUNK}-"
    assert get.status == 206 and get.body_bytes == BIG - 7 * CHUNK
    assert (weights / manifest.BASE_DIR / shard).read_bytes() == BASE[shard]
    assert read_lock(weights)[f"{manifest.BASE_DIR}/{shard}"].sha256 == hashlib.sha256(BASE[shard]).hexdigest()
    assert not (weights / PARTIAL_DIR).exists()


class CtrlCAfterTwoChunks(tqdm):
    """A progress bar that presses Ctrl-C when the third chunk of a file arrives (before it is written)."""

    def update(self, n=1):
        super().update(n)
        if self.n > 2 * CHUNK:
            raise KeyboardInterrupt


def test_ctrl_c_then_rerun_resumes(hub, tmp_path):
    weights = tmp_path / "weights"
    with pytest.raises(KeyboardInterrupt):
        download_weights(MULTI, weights, tqdm_class=CtrlCAfterTwoChunks)
    (partial,) = (weights / PARTIAL_DIR).rglob(f"{SHARDS[0]}.*.incomplete")
    assert partial.stat().st_size == 2 * CHUNK
    hub.requests.clear()

    download_weights(MULTI, weights)
    (get,) = hub.gets(SHARDS[0])
    assert get.headers["range"] == f"bytes={2 * CHUNK}-" and get.body_bytes == BIG - 2 * CHUNK
    assert (weights / manifest.BASE_DIR / SHARDS[0]).read_bytes() == BASE[SHARDS[0]]


def test_dropped_connection_is_resumed_within_one_run(hub, tmp_path):
    """huggingface_hub's own retry: a dropped connection is resumed at once with a Range request."""
    shard = SHARDS[0]
    hub.faults[shard] = [("drop", 5 * CHUNK + 10)]
    download_weights(MULTI, tmp_path / "weights")
    first, retry = hub.gets(shard)
    assert "range" not in first.headers and first.body_bytes == 5 * CHUNK + 10
    assert retry.headers["range"] == f"bytes={5 * CHUNK}-" and retry.status == 206
    assert (tmp_path / "weights" / manifest.BASE_DIR / shard).read_bytes() == BASE[shard]


def test_hf_hub_download_alone_keeps_no_partial_file(hub, tmp_path):
    """Why talkgen keeps its own partial files: huggingface_hub 2.4 deletes its temporary file when a
    download fails, so the next run would start from byte 0. If this starts failing, hf resumes
    across runs by itself and talkgen's partial files could go."""
    shard = SHARDS[0]
    hub.faults[shard] = [("drop", 7 * CHUNK + 1000), ("error", 500)]
    with pytest.raises(Exception):
        hf_hub_download("fake/wan", shard, local_dir=tmp_path / "hf", endpoint=hub.url)
    assert [p.name for p in (tmp_path / "hf").rglob("*") if p.is_file() and p.stat().st_size >= CHUNK] == []
    assert [p.name for p in (tmp_path / "hf").rglob("*.incomplete")] == []


def test_verify_reports_corrupted_truncated_and_missing_files(hub, tmp_path):
    weights = tmp_path / "weights"
    assert run("download", *MULTI_ARGS, "--dir", str(weights)).exit_code == 0
    assert run("verify", "--dir", str(weights)).exit_code == 0

    corrupted = weights / manifest.BASE_DIR / manifest.VAE_FILE
    data = bytearray(corrupted.read_bytes())
    data[100] ^= 0xFF  # same size, one bit pattern changed: only the hash can tell
    corrupted.write_bytes(bytes(data))
    truncated = weights / manifest.WAV2VEC2_DIR / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-10])
    missing = weights / manifest.INFINITETALK_DIR / "multi" / manifest.INFINITETALK_FILE
    missing.unlink()

    result = run("verify", "--dir", str(weights))
    assert result.exit_code == 1
    command = f"talkgen download --model infinitetalk --people multi --dir {weights}"
    repair = f"talkgen download --model infinitetalk --people multi --repair --dir {weights}"
    assert f"hash mismatch {manifest.BASE_DIR}/{manifest.VAE_FILE}" in result.text
    assert f"size mismatch chinese-wav2vec2-base/model.safetensors: {1500 - 10} bytes, expected 1500" in result.text
    commit = hub.commit("fake/infinitetalk", "main")[:12]
    assert (f"missing InfiniteTalk/multi/infinitetalk.safetensors (multi/infinitetalk.safetensors from "
            f"fake/infinitetalk at {commit}); get it with `{command}`") in result.text
    assert f"replace it with `{repair}`" in result.text
    assert f"ok {manifest.BASE_DIR}/config.json" in result.text
    assert "3 of" in result.text and "failed verification" in result.text
    assert run("verify", "--dir", str(weights), "--sizes-only").exit_code == 1  # the truncated and missing ones

    # A plain download leaves files that differ alone and says so; --repair replaces them.
    again = run("download", *MULTI_ARGS, "--dir", str(weights))
    assert again.exit_code == 1 and "left untouched" in again.text and repair in again.text
    assert missing.is_file() and corrupted.read_bytes() == bytes(data)
    assert run("download", *MULTI_ARGS, "--repair", "--dir", str(weights)).exit_code == 0
    assert run("verify", "--dir", str(weights)).exit_code == 0


def test_missing_file_names_file_repo_and_exact_command_everywhere(hub, tmp_path):
    weights = tmp_path / "my weights"  # a space: the command must still be copy-pasteable
    assert run("download", *MULTI_ARGS, "--dir", str(weights)).exit_code == 0
    (weights / manifest.BASE_DIR / manifest.CLIP_FILE).unlink()
    command = f"talkgen download --model infinitetalk --people multi --dir '{weights}'"

    with pytest.raises(WeightsError) as error:  # what `generate`, the API and the worker call first
        check_weights(weights, "infinitetalk", "multi")
    message = str(error.value)
    assert manifest.CLIP_FILE in message and "Wan-AI/Wan2.1-I2V-14B-480P" in message and f"`{command}`" in message

    result = run("verify", "--dir", str(weights))
    assert f"missing {manifest.BASE_DIR}/{manifest.CLIP_FILE}" in result.text and f"`{command}`" in result.text
    status = {s.title: s for s in describe_weights(weights)}["Wan2.1-I2V-14B-480P"]
    assert status.state == "partial" and status.missing == (f"{manifest.BASE_DIR}/{manifest.CLIP_FILE}",)


def test_offline_mode_is_a_clear_error_and_downloads_nothing(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = tmp_path / "weights"
    result = run("download", *MULTI_ARGS, "--dir", str(weights))
    assert result.exit_code == 1
    assert "HF_HUB_OFFLINE is set" in result.text and "nothing was downloaded" in result.text
    assert hub.requests == [] and not weights.exists()


def test_disk_space_is_checked_before_downloading(hub, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 5000, 5000))
    weights = tmp_path / "weights"
    result = run("download", *MULTI_ARGS, "--dir", str(weights))
    needed = sum(len(c) for c in expected_files(MULTI).values())
    assert result.exit_code == 1
    assert f"needs {human_size(needed)} ({needed} bytes)" in result.text and "(5000 bytes) is free" in result.text
    assert not [r for r in hub.requests if r.method == "GET" and r.file]  # no file was fetched
    assert not weights.exists()


def test_files_already_there_are_checked_kept_and_locked(hub, tmp_path):
    """A user who fetched some files by hand: the right ones are hashed and kept (never fetched or
    rewritten); a wrong one is left alone and reported."""
    weights = tmp_path / "weights"
    mine = weights / manifest.BASE_DIR / SHARDS[0]
    mine.parent.mkdir(parents=True)
    mine.write_bytes(BASE[SHARDS[0]])
    wrong = weights / manifest.BASE_DIR / manifest.VAE_FILE
    wrong.write_bytes(b"x" * len(BASE[manifest.VAE_FILE]))

    result = run("download", *MULTI_ARGS, "--dir", str(weights))
    assert result.exit_code == 1
    assert f"{manifest.BASE_DIR}/{manifest.VAE_FILE} (sha256" in result.text and "--repair" in result.text
    assert hub.gets(SHARDS[0]) == [] and hub.gets(manifest.VAE_FILE) == []
    assert wrong.read_bytes() == b"x" * len(BASE[manifest.VAE_FILE])
    lock = read_lock(weights)
    assert lock[f"{manifest.BASE_DIR}/{SHARDS[0]}"].sha256 == hashlib.sha256(BASE[SHARDS[0]]).hexdigest()
    assert f"{manifest.BASE_DIR}/{manifest.VAE_FILE}" not in lock
    assert (weights / manifest.INFINITETALK_DIR / "multi" / manifest.INFINITETALK_FILE).is_file()  # the rest came


def test_hf_token_is_sent_to_the_hub_and_not_to_the_cdn(hub, tmp_path, monkeypatch):
    hub.token = "hf_secret"
    result = run("download", "--dir", str(tmp_path / "a"))
    assert result.exit_code == 1 and "HF_TOKEN" in result.text

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    hub.requests.clear()
    assert run("download", "--dir", str(tmp_path / "b")).exit_code == 0
    assert all(r.headers.get("authorization") == "Bearer hf_secret" for r in hub.requests if r.server == "hub")
    assert all("authorization" not in r.headers for r in hub.requests if r.server == "cdn")


def test_pinned_commit_of_the_lock_is_reused(hub, tmp_path):
    """Files added later come from the commit the directory was started with, not from a newer main."""
    weights = tmp_path / "weights"
    assert run("download", "--dir", str(weights)).exit_code == 0  # multitalk
    old_commit = hub.commit("fake/wan", "main")
    hub.repos["fake/wan"]["main"] = dict(BASE, **{"config.json": b'{"changed": true}'})

    hub.repos["fake/wan"][old_commit] = BASE  # the old commit stays reachable by its id, as on the Hub
    assert run("download", *MULTI_ARGS, "--dir", str(weights)).exit_code == 0
    assert {e.commit for e in read_lock(weights).values() if e.repo_id == "fake/wan"} == {old_commit}
    assert (weights / manifest.BASE_DIR / "config.json").read_bytes() == BASE["config.json"]


def test_describe_weights_says_what_is_there_and_what_it_enables(hub, tmp_path):
    weights = tmp_path / "weights"
    assert run("download", *MULTI_ARGS, "--dir", str(weights)).exit_code == 0
    status = {s.title: s for s in describe_weights(weights)}
    assert status["Wan2.1-I2V-14B-480P"].state == "present"
    assert status["chinese-wav2vec2-base"].state == "present"  # main and refs/pr/1 files, shown as one set
    assert status["InfiniteTalk (multi)"].state == "present"
    assert "--people multi" in status["InfiniteTalk (multi)"].enables
    single = status["InfiniteTalk (single)"]
    assert single.state == "missing"
    assert single.command == f"talkgen download --model infinitetalk --people single --dir {weights}"

    from talkgen.weights.cli import weights_report

    lines = weights_report(weights)
    assert any(line.startswith("MeiGen-MultiTalk (fake/multitalk): missing") for line in lines)
    assert not any("fp8" in line for line in lines)  # extras appear only once some file of them is there


def test_dry_run_lists_and_downloads_nothing(hub, tmp_path):
    result = run("download", "--model", "infinitetalk", "--quant", "fp8", "--dry-run", "--dir", str(tmp_path / "w"))
    assert result.exit_code == 0, result.output
    assert "would download InfiniteTalk/quant_models/infinitetalk_single_fp8.safetensors" in result.text
    assert "multitalk.safetensors" not in result.text and SHARDS[0] not in result.text  # the quant file is the DiT
    assert not [r for r in hub.requests if r.file]


def test_unreleased_combination_is_an_input_error(hub, tmp_path):
    result = run("download", "--model", "infinitetalk", "--quant", "int8", "--dir", str(tmp_path))
    assert result.exit_code == 1 and "No released weights match" in result.text and "--quant fp8" in result.text
    assert hub.requests == []


# --- the real manifest, no server ----------------------------------------------------------------------


def test_every_selection_plans_or_names_what_exists():
    for model in manifest.MODELS:
        for people in manifest.PEOPLE:
            for lora in (None, *manifest.LORAS):
                for quant in (None, *manifest.QUANTS):
                    selection = Selection(model=model, people=people, lora=lora, quant=quant)
                    try:
                        sets = manifest.plan(selection)
                    except InputError as exc:
                        assert quant and "pre-quantized weights exist for" in str(exc)
                        continue
                    locals_ = [s.local_path(f) for s in sets for f in s.exact_files()]
                    assert len(locals_) == len(set(locals_))
                    assert any(s.key.startswith(("multitalk", "infinitetalk")) for s in sets)


def test_commands_are_exact():
    assert manifest.download_command("/w", model="infinitetalk", people="multi") == (
        "talkgen download --model infinitetalk --people multi --dir /w")
    assert Selection(people="multi").command("/w") == "talkgen download --model multitalk --dir /w"
    assert manifest.INFINITETALK_MULTI.download_command == (
        "talkgen download --model infinitetalk --people multi --dir DIR")
    with pytest.raises(InputError, match="--quant fp16: choose fp8 | int8"):
        Selection(quant="fp16")
    paths = [s.local_path(f) for s in manifest.CATALOG.values() for f in s.exact_files()]
    assert f"{manifest.INFINITETALK_DIR}/multi/{manifest.INFINITETALK_FILE}" in paths
    assert "Wan2.1_I2V_14B_FusionX_LoRA.safetensors" in paths  # LoRAs land in DIR itself
