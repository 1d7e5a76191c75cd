"""Host memory while loading: safetensors files are read tensor by tensor with plain reads (a memory
map would count the whole shard as resident), each tensor cast to the run dtype at once, so the
peak stays near the model's bytes in the run dtype. The full-size check is
benchmarks/check_load_rss.py on the GPU machine."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from talkgen.errors import WeightsError
from talkgen.weights.loading import iter_checkpoint


def test_reader_matches_safetensors(tmp_path: Path):
    tensors = {
        "f32": torch.randn(3, 5), "bf16": torch.randn(7).to(torch.bfloat16), "f16": torch.randn(2, 2, 2).half(),
        "i64": torch.arange(6).reshape(2, 3), "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4), "u8": torch.arange(10, dtype=torch.uint8),
        "e4m3": torch.randn(4, 4).to(torch.float8_e4m3fn),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    expected = load_file(path)
    got = {key: getter() for key, getter in iter_checkpoint(path)}
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        as_bytes = lambda t: t.reshape(-1).view(torch.uint8)  # noqa: E731  (fp8 and bool compare bitwise)
        assert torch.equal(as_bytes(got[key]), as_bytes(tensor)), key


def test_truncated_file_is_a_weights_error(tmp_path: Path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightsError, match="truncated"):
        list(iter_checkpoint(path))
    path.write_bytes(b"\x00" * 4)
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        list(iter_checkpoint(path))


def test_a_header_whose_shape_does_not_fill_its_data_is_a_weights_error(tmp_path: Path):
    """A crafted header ([4, 4] float32 over 32 bytes) must not reach the reshape as an internal error."""
    import json

    header = json.dumps({"a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 32)
    with pytest.raises(WeightsError, match="shape does not match its data"):
        list(iter_checkpoint(path))


PROBE = textwrap.dedent("""
    import json, sys, torch
    from torch import nn
    from talkgen.weights.loading import iter_files, load_streaming, meta_device, WeightSet

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    with meta_device():
        model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(8)])
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    load_streaming(model, iter_files([sys.argv[1]]), weight_set=WeightSet("t", "t", "t"), dtype=torch.bfloat16)
    print(json.dumps(dict(before=before, peak=status("VmHWM"), after=status("VmRSS"),
                          model=sum(p.numel() * p.element_size() for p in model.parameters()))))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the RSS peak")
def test_peak_host_memory_is_the_model_in_its_run_dtype(tmp_path: Path):
    path = tmp_path / "model.safetensors"
    state = {f"{i}.weight": torch.randn(2048, 2048) for i in range(8)}  # 128 MiB of float32
    state.update({f"{i}.bias": torch.randn(2048) for i in range(8)})
    save_file(state, path)
    del state
    # glibc hands large blocks back to the system at free() (as the real checkpoints' tensors, tens
    # of MB, always are); fixing its threshold keeps this small probe from depending on its tuning.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20))
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, check=True, env=env)
    import json

    stats = json.loads(out.stdout.strip().splitlines()[-1])
    model = stats["model"]  # 64 MiB of bf16
    one_tensor = 2048 * 2048 * 4  # the float32 tensor in hand
    growth = stats["peak"] - stats["before"]
    assert growth <= 1.1 * model + one_tensor + 8 * 2**20, stats
