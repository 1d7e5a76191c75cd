"""The DiT's FFN at full size (32,928 tokens x 5120 -> 13824 -> 5120, bf16): the up-projection's
bias + tanh-GELU as Inductor's own kernel against cuBLASLt's epilogue (talkgen.models.dit.FeedForward),
alone and with the down projection, compiled, and each GELU output's error against float32.

    python3 benchmarks/bench_ffn.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cuda_time, median, save  # noqa: E402


def main() -> None:
    tokens, dim, ffn_dim = 32928, 5120, 13824
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    up = torch.randn(ffn_dim, dim, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    bias = torch.randn(ffn_dim, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
    down = torch.randn(dim, ffn_dim, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02

    def unfused(x):
        return F.gelu(F.linear(x, up, bias), approximate="tanh")

    def epilogue(x):
        return torch._addmm_activation(bias, x, up.t(), use_gelu=True)

    def timed(fn) -> float:
        compiled = torch.compile(fn)
        return median(cuda_time(lambda: compiled(x), warmup=5, reps=20)) * 1e3

    exact = F.gelu(F.linear(x.float(), up.float(), bias.float()), approximate="tanh")
    record = dict(tokens=tokens, dim=dim, ffn_dim=ffn_dim, gemm_alone_ms=timed(lambda x: F.linear(x, up)))
    for name, fn in (("unfused", unfused), ("epilogue", epilogue)):
        record[f"{name}_up_ms"] = timed(fn)
        record[f"{name}_ffn_ms"] = timed(lambda x, fn=fn: F.linear(fn(x), down))
        out = fn(x).float()
        record[f"{name}_rel_err"] = ((out - exact).norm() / exact.norm()).item()
    save("ffn_gelu_epilogue", record)


if __name__ == "__main__":
    main()
