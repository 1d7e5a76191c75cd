"""GPU check and timing of the DiT block's fused residual add + LayerNorm + modulation
(``talkgen.kernels.layer_norm``) against the torch ops it replaces, at the DiT's width.

1. Correctness, bf16, batch 1 at a 480p clip's 32,928 tokens and batch 2 at an odd length, for the
   block's four calls: the new residual and the output within one rounding of the torch ops' (the
   output's from the same residual; float32-level differences of the summed terms allowed, where
   an FMA or the statistics' order differs and the terms cancel), nearly all elements equal, and
   the same under ``torch.compile(fullgraph=True)``.
2. Speed at [1, 32,928, 5120]: each call as the fused op and as the torch ops compiled by Inductor
   (what the compiled block ran before), median of 20 CUDA-event-timed calls, with the bytes moved.

    python3 benchmarks/check_layer_norm.py            # both; exits non-zero on a failure
    python3 benchmarks/check_attention.py              # runs part 1 too

The CPU tests (tests/test_layer_norm.py) run the same forms in Triton's interpreter.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from talkgen.models import dit  # noqa: E402

# The block's four calls: (name, residual add: None / "gate" / "plain", LayerNorm affine?, modulated?)
FORMS = (("norm1 + modulation", None, False, True), ("residual 1 (gated) + norm3", "gate", True, False),
         ("residual 2 + norm_x", "plain", True, False), ("residual 3 + norm2 + modulation", "plain", False, True))


def make_norm(form, width: int, dtype: torch.dtype, device, generator: torch.Generator) -> dit.LayerNorm32:
    norm = dit.LayerNorm32(width, eps=1e-6, elementwise_affine=form[2]).to(device)
    if form[2]:
        norm.weight.data = (1 + 0.3 * torch.randn(width, generator=generator, device=device)).to(dtype)
        norm.bias.data = (0.1 * torch.randn(width, generator=generator, device=device)).to(dtype)
    return norm


def run_form(form, norm, x, delta, chunks):
    """(residual, output) of one call through ``talkgen.models.dit`` (fused or not, as
    ``dit.own_kernels_allowed`` says)."""
    _, add, _, modulated = form
    shift, scale, gate = chunks
    if add is None:
        return x, dit.modulated_norm(x, norm, scale, shift)
    mod = dict(scale=scale, shift=shift) if modulated else {}
    return dit.add_and_norm(x, delta, norm, gate=gate if add == "gate" else None, **mod)


def torch_output(form, norm, total, chunks):
    """The torch ops' output for a given residual, and two magnitudes per element that bound how far
    an output computed with the same roundings may lie from it: ``rounding`` (in units of the
    dtype's ulp: one rounding of the normalised row, scaled by the modulation, plus one of the
    output) and ``operands`` (the size of the terms summed in float32, whose order and fused
    multiply-adds may differ at float32's precision: where they cancel, that is more than an ulp of
    the small result)."""
    shift, scale, _ = chunks
    normed = norm(total)
    unit = torch.nn.functional.layer_norm(total.float(), (total.shape[-1],), eps=norm.eps)  # before any affine
    if form[3]:  # modulated: normed * (1 + scale) + shift
        expected = dit._modulate(normed, scale, shift)
        scaled = normed.float().abs() * (1 + scale).abs()
        return expected, scaled + expected.float().abs(), scaled + shift.abs()
    weighted = (unit * norm.weight.float()).abs()  # the other forms are affine: unit * weight + bias
    return normed, normed.float().abs(), weighted + norm.bias.float().abs()


def residual_operands(form, x, delta, chunks) -> torch.Tensor:
    """The magnitude of the residual add's terms (see :func:`torch_output`)."""
    gate = chunks[2] if form[1] == "gate" else 1.0
    return x.float().abs() + (delta.float() * gate).abs()


FLOAT32_SLACK = 2 ** -16  # differences at float32 precision (2^-24), with room for the statistics' own


def inputs(batch: int, tokens: int, width: int, dtype, device, generator):
    x = (2 * torch.randn(batch, tokens, width, generator=generator, device=device)).to(dtype)
    x[0, tokens // 2] += 30.0  # an outlier row
    delta = torch.randn(batch, tokens, width, generator=generator, device=device).to(dtype)
    chunks = torch.randn(batch, 6, width, generator=generator, device=device).chunk(6, dim=1)[:3]  # strided views
    return x, delta, chunks


@contextmanager
def kernels_allowed(allowed: bool):
    """Inside: whether ``talkgen.models.dit`` may use talkgen's kernels (``own_kernels_allowed``
    patched); the original is back afterwards, also after an error."""
    original = dit.own_kernels_allowed
    dit.own_kernels_allowed = lambda device_type: allowed
    try:
        yield
    finally:
        dit.own_kernels_allowed = original


@torch.no_grad()
def check() -> list:
    failures = []
    g = torch.Generator(device="cuda").manual_seed(5)
    ulp = 2 ** -7
    for batch, tokens in ((1, 32928), (2, 1001)):
        x, delta, chunks = inputs(batch, tokens, 5120, torch.bfloat16, "cuda", g)
        for form in FORMS:
            norm = make_norm(form, 5120, torch.bfloat16, "cuda", g)
            with kernels_allowed(False):
                want_total, _ = run_form(form, norm, x, delta, chunks)
            with kernels_allowed(True):
                total, out = run_form(form, norm, x, delta, chunks)
                torch._dynamo.reset()  # a fresh compile per form (one lambda's code would hit the recompile limit)
                compiled = torch.compile(lambda *a: tuple(t * 1 for t in run_form(form, norm, *a)), fullgraph=True)(
                    x, delta, chunks)
            expected, rounding, operands = torch_output(form, norm, total, chunks)
            total_allowed = ulp * want_total.float().abs() + FLOAT32_SLACK * residual_operands(form, x, delta, chunks)
            total_worst = ((total.float() - want_total.float()).abs() / total_allowed.clamp_min(1e-30)).max().item()
            allowed = ulp * rounding + FLOAT32_SLACK * operands
            worst = ((out.float() - expected.float()).abs() / allowed.clamp_min(1e-30)).max().item()
            differing = (out != expected).float().mean().item()
            same_compiled = torch.equal(compiled[0], total) and torch.equal(compiled[1], out)
            ok = total_worst <= 1 and worst <= 1 and differing < 0.02 and same_compiled
            print(f"{'ok  ' if ok else 'FAIL'} {form[0]}, B{batch} L{tokens}: worst difference of the residual "
                  f"{total_worst:.2f}, of the output {worst:.2f} of what the roundings allow, {differing:.4%} of "
                  f"output elements differ, compiled == eager: {same_compiled}", flush=True)
            if not ok:
                failures.append((form[0], batch, total_worst, worst, differing, same_compiled))
    return failures


def time_forms() -> None:
    from benchmarks.common import cuda_time, median

    g = torch.Generator(device="cuda").manual_seed(6)
    x, delta, chunks = inputs(1, 32928, 5120, torch.bfloat16, "cuda", g)
    row_bytes = x.numel() * x.element_size()
    for form in FORMS:
        norm = make_norm(form, 5120, torch.bfloat16, "cuda", g)
        moved = row_bytes * (2 if form[1] is None else 4)  # read x (+ delta), write output (+ residual)
        times = {}
        for fused in (False, True):
            torch._dynamo.reset()
            fn = torch.compile(lambda *a: run_form(form, norm, *a), fullgraph=True)
            with kernels_allowed(fused), torch.no_grad():
                times[fused] = median(cuda_time(lambda: fn(x, delta, chunks), warmup=3, reps=20))
        print(f"{form[0]}: Inductor {times[False] * 1e3:.3f} ms ({moved / times[False] / 1e12:.2f} TB/s), fused "
              f"{times[True] * 1e3:.3f} ms ({moved / times[True] / 1e12:.2f} TB/s)", flush=True)


if __name__ == "__main__":
    failed = check()
    if "--check-only" not in sys.argv:
        time_forms()
    print("FAILED:", failed if failed else "none")
    sys.exit(1 if failed else 0)
