"""TeaCache: the reference's decisions (teacache_* golden files) and its skip rule over 40 steps.

The modulation signal depends on the timestep only, so the decisions follow from the DiT's time
embedding over the shifted timesteps: the blocks need not run to check them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from talkgen.sampling.schedule import shifted_timesteps
from talkgen.sampling.teacache import COEFFICIENTS, TeaCache
from talkgen.weights.dit import load_dit

from conftest import golden_dir, golden_params, meta_json, read_golden, rel_err
from test_dit import golden_weights, write_original_layout

GOLDEN_BRANCHES = ("cond", "drop_text", "uncond")  # the golden's column order


def golden_model(meta: dict, tensors: dict, tmp_path: Path):
    """The tiny DiT the golden names, with its ``weights_override.*`` tensors applied."""
    dit_tensors, dit_meta = read_golden(golden_dir() / meta_json(meta, "weights_from")["dit"])
    base, audio_file = write_original_layout(golden_weights(dit_tensors), meta_json(dit_meta, "config"), tmp_path)
    model, _ = load_dit(base, audio_file, dtype=torch.float32)
    state = model.state_dict()
    for key, value in tensors.items():
        if key.startswith("weights_override."):
            state[key[len("weights_override."):]].copy_(value)
    return model


def time_signals(model, steps: int, shift: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(e, e0) for each sampling step, as the forward computes them."""
    timesteps = shifted_timesteps(steps, shift)
    es, e0s = [], []
    with torch.no_grad():
        for i in range(steps):
            e, e0 = model.embed_time(timesteps[i : i + 1])
            es.append(e)
            e0s.append(e0)
    return es, e0s


@pytest.mark.parametrize("path", golden_params("teacache_"))
def test_decisions_match_reference(path: Path, tmp_path: Path) -> None:
    tensors, meta = read_golden(path)
    model = golden_model(meta, tensors, tmp_path)
    for case, options in meta_json(meta, "cases").items():
        steps = options["steps"]
        tier = int(options.get("bucket_family", "multitalk-480").rsplit("-", 1)[1])
        use_ret = options.get("teacache_use_ret_steps", True)
        cache = TeaCache(steps, options["teacache_thresh"], tier=tier, use_ret_steps=use_ret)
        es, e0s = time_signals(model, steps, options["shift"])
        for step in range(steps):
            for branch in GOLDEN_BRANCHES:
                cache.decide(branch, step, e0s[step] if use_ret else es[step])
        expected = tensors[f"{case}.expected.computed"].tolist()
        assert cache.table(GOLDEN_BRANCHES) == expected, case


# --------------------------------------------------------------------------------------------
# A direct transcription of the reference's rule: one call counter over the passes of a step,
# taken modulo 3 for the slot (0 = cond, 1 = drop-text, 2 = uncond), ret steps and cutoff in calls.


class ReferenceCounterCache:
    def __init__(self, steps: int, thresh: float, tier: int, use_ret_steps: bool):
        self.coefficients = COEFFICIENTS[(tier, use_ret_steps)]
        self.thresh = thresh
        self.num_calls = 3 * steps
        self.ret_calls = 5 * 3 if use_ret_steps else 1 * 3
        self.cutoff_calls = 3 * steps if use_ret_steps else 3 * steps - 3
        self.cnt = 0
        self.acc = [0.0, 0.0, 0.0]
        self.prev: list[torch.Tensor | None] = [None, None, None]

    def call(self, signal: torch.Tensor) -> bool:
        slot = self.cnt % 3
        if self.cnt < self.ret_calls or self.cnt >= self.cutoff_calls:
            compute = True
            self.acc[slot] = 0.0
        else:
            rel = ((signal - self.prev[slot]).abs().mean() / self.prev[slot].abs().mean()).item()
            self.acc[slot] += np.poly1d(self.coefficients)(rel)
            compute = not self.acc[slot] < self.thresh
            if compute:
                self.acc[slot] = 0.0
        self.prev[slot] = signal.clone()
        self.cnt += 1
        if self.cnt >= self.num_calls:
            self.cnt = 0
        return compute


@pytest.fixture(scope="module")
def forty_step_signals(tmp_path_factory) -> dict[str, list[torch.Tensor]]:
    """e and e0 over 40 steps (shift 7) from the golden DiT with the trained-like time projection."""
    files = [p for p in golden_params("teacache_") if p.values[0] is not None]
    if not files:
        pytest.skip(f"no teacache_* golden files in {golden_dir()}")
    tensors, meta = read_golden(files[0].values[0])
    model = golden_model(meta, tensors, tmp_path_factory.mktemp("dit"))
    es, e0s = time_signals(model, 40, 7.0)
    return {"e": es, "e0": e0s}


SETTINGS = [
    pytest.param(480, True, 0.2, id="480-ret-0.2"),
    pytest.param(480, True, 0.3, id="480-ret-0.3"),
    pytest.param(720, True, 0.2, id="720-ret-0.2"),
    pytest.param(480, False, 0.2, id="480-noret-0.2"),
    pytest.param(720, False, 0.5, id="720-noret-0.5"),
]


@pytest.mark.parametrize("tier,use_ret,thresh", SETTINGS)
def test_three_pass_pattern_over_40_steps_is_the_reference_counter(forty_step_signals, tier, use_ret, thresh) -> None:
    """Two chunks of 40 steps: the reference's single counter (state carried over, wrap at 3*steps)
    and our per-branch caches (fresh per chunk) decide the same for every pass."""
    signals = forty_step_signals["e0" if use_ret else "e"]
    reference = ReferenceCounterCache(40, thresh, tier, use_ret)
    expected = [[reference.call(signals[s]) for _ in range(3)] for _chunk in range(2) for s in range(40)]
    ours = []
    for _chunk in range(2):
        cache = TeaCache(40, thresh, tier=tier, use_ret_steps=use_ret)
        for s in range(40):
            for branch in ("cond", "drop_text", "uncond"):
                cache.decide(branch, s, signals[s])
        ours += cache.table(("cond", "drop_text", "uncond"))
    assert ours == expected
    if use_ret:
        assert expected[:5] == [[True] * 3] * 5 and expected[40:45] == [[True] * 3] * 5
    else:  # one always-compute step at each end (the cutoff)
        assert expected[0] == expected[39] == expected[40] == expected[79] == [True] * 3
    assert not all(all(row) for row in expected), "the setting should skip something"


@pytest.mark.parametrize("tier,use_ret,thresh", SETTINGS)
def test_two_pass_pattern_over_40_steps_is_the_reference_rule_per_pass(forty_step_signals, tier, use_ret, thresh) -> None:
    """2-pass guidance (cond, drop-audio): each pass follows the reference's rule on its own, i.e.
    the pattern the reference gives each pass in the 3-pass mode; the reference's own counter,
    fed 2 calls per step, decides differently (MeiGen-AI/InfiniteTalk#87)."""
    signals = forty_step_signals["e0" if use_ret else "e"]
    reference = ReferenceCounterCache(40, thresh, tier, use_ret)
    per_pass = [reference.call(signals[s]) for s in range(40) for _ in range(3)][::3]  # slot 0 of each step
    cache = TeaCache(40, thresh, tier=tier, use_ret_steps=use_ret)
    for s in range(40):
        for branch in ("cond", "drop_audio"):
            cache.decide(branch, s, signals[s])
    assert cache.table(("cond", "drop_audio")) == [[c, c] for c in per_pass]

    broken = ReferenceCounterCache(40, thresh, tier, use_ret)
    broken_pattern = [[broken.call(signals[s]) for _ in range(2)] for s in range(40)]
    if use_ret and not all(per_pass):
        assert broken_pattern != cache.table(("cond", "drop_audio"))


def test_ret_steps_and_cutoff() -> None:
    with_ret, without = TeaCache(40), TeaCache(40, use_ret_steps=False)
    assert (with_ret.ret_steps, with_ret.cutoff) == (5, 40)
    assert (without.ret_steps, without.cutoff) == (1, 39)
    assert [s for s in range(40) if with_ret.always_computes(s)] == [0, 1, 2, 3, 4]
    assert [s for s in range(40) if without.always_computes(s)] == [0, 39]
    with pytest.raises(ValueError, match="480 and 720"):
        TeaCache(40, tier=1080)


class CountingBlock(torch.nn.Module):
    def __init__(self, add: float):
        super().__init__()
        self.add, self.calls = add, 0

    def forward(self, x: torch.Tensor, e0: torch.Tensor, **_: object) -> torch.Tensor:
        self.calls += 1
        return x * 0.5 + self.add + e0.mean(dim=(1, 2), keepdim=True)  # per batch row


def test_runner_reuses_the_residual_of_its_own_pass() -> None:
    """A skipped pass returns its input plus the residual its own last computed call added."""
    blocks = [CountingBlock(1.0), CountingBlock(2.0)]
    cache = TeaCache(3, thresh=1e9)  # every step after the ret steps would skip...
    cache.ret_steps = 1  # ...so keep only step 0 as always-compute to exercise skipping
    signal = torch.ones(1, 6, 4)
    inputs = {"cond": torch.full((1, 5, 4), 3.0), "drop_audio": torch.full((1, 5, 4), -7.0)}
    out0 = {b: cache.runner(b, 0)(blocks, x, {"e0": signal}) for b, x in inputs.items()}
    assert [blk.calls for blk in blocks] == [2, 2]
    later = {b: x + 1.0 for b, x in inputs.items()}
    out1 = {b: cache.runner(b, 1)(blocks, x, {"e0": signal * 1.01}) for b, x in later.items()}
    assert [blk.calls for blk in blocks] == [2, 2]  # skipped: the blocks did not run
    for b in inputs:
        assert torch.equal(out1[b], later[b] + (out0[b] - inputs[b]))
    assert cache.table(("cond", "drop_audio")) == [[True, True], [False, False]]
    assert cache.skipped == 2


def test_agree_makes_a_skip_compute_and_resets_the_accumulator() -> None:
    """``agree`` (a sequence-parallel group's all-reduce) can turn a skip into a compute, never the
    reverse; the cache then records and accumulates as if it had computed itself."""
    blocks = [CountingBlock(1.0)]
    cache = TeaCache(3, thresh=1e9)
    cache.ret_steps = 1
    seen = []
    cache.agree = lambda compute: seen.append(compute) or True  # another rank computes
    signal = torch.ones(1, 6, 4)
    x = torch.full((1, 5, 4), 3.0)
    for step in range(3):
        cache.runner("cond", step)(blocks, x, {"e0": signal * (1 + 0.01 * step)})
    assert seen == [True, False, False]  # this rank alone would have skipped steps 1 and 2
    assert blocks[0].calls == 3 and cache.table(("cond",)) == [[True], [True], [True]]
    assert cache.state["cond"].accumulated == 0.0
    cache.agree = lambda compute: compute  # agreeing ranks: decisions unchanged
    cache.runner("cond", 2)(blocks, x, {"e0": signal * 1.03})
    assert cache.computed[2]["cond"] is False


def test_runner_without_ret_steps_needs_e() -> None:
    cache = TeaCache(4, use_ret_steps=False)
    with pytest.raises(ValueError, match="time embedding"):
        cache.runner("cond", 0)([], torch.zeros(1, 2, 3), {"e0": torch.zeros(1, 6, 3)})
    out = cache.runner("cond", 0, e=torch.ones(1, 3))([], torch.zeros(1, 2, 3), {"e0": torch.zeros(1, 6, 3)})
    assert out.shape == (1, 2, 3)


@pytest.mark.slow
@pytest.mark.parametrize("path", golden_params("teacache_"))
def test_clip_loop_with_teacache_matches_reference_latent(path: Path, tmp_path: Path) -> None:
    """Through the pipeline's own TeaCache wiring: decisions and the final latent."""
    from talkgen.media.image import prepare_condition_image
    from talkgen.pipeline.chunks import RecordedNoise, StillImage
    from talkgen.pipeline.pipeline import StreamOptions
    from talkgen.sampling.guidance import GuidanceConfig
    from test_pipeline_golden import golden_pipeline

    tensors, meta = read_golden(path)
    pipe = golden_pipeline(meta, tmp_path)
    state = pipe.dit.state_dict()
    for key, value in tensors.items():
        if key.startswith("weights_override."):
            state[key[len("weights_override."):]].copy_(value)
    for case, options in meta_json(meta, "cases").items():
        if options.get("people", 1) != 1 or not options["teacache_use_ret_steps"]:
            continue  # the pipeline uses ret steps, as the reference CLI does
        inputs = {k.split(".inputs.")[1]: v for k, v in tensors.items() if k.startswith(f"{case}.inputs.")}
        tier = int(options["bucket_family"].rsplit("-", 1)[1])
        stream = StreamOptions(frame_num=options["frame_num"], steps=options["steps"], shift=options["shift"],
                               guidance=GuidanceConfig(options["text_guide_scale"], options["audio_guide_scale"]),
                               color_strength=0.0, teacache_thresh=options["teacache_thresh"], tier=tier)
        chunk = next(pipe.stream(
            StillImage(prepare_condition_image(inputs["image_rgb"].numpy(), tier)), [inputs["audio_emb.person1"]],
            context=inputs["context"], context_null=inputs["context_null"], options=stream,
            noise=RecordedNoise({0: inputs["noise"]}, {}), encode_image=lambda frame, chunk: inputs["clip_tokens"],
        ))
        assert chunk.teacache.table(GOLDEN_BRANCHES) == tensors[f"{case}.expected.computed"].tolist()
        err = rel_err(chunk.latent, tensors[f"{case}.expected.latent"])
        assert err <= 1e-4, f"{case}: rel err {err:.2e}"


def test_batched_passes_equal_separate_passes() -> None:
    """One runner over a batch of passes gives, row by row, what separate runners give, including
    a step where one pass skips and another computes."""
    blocks = [CountingBlock(1.0), CountingBlock(-0.5)]
    names = ("cond", "drop_text", "uncond")
    separate, batched = TeaCache(4, thresh=0.3), TeaCache(4, thresh=0.3)
    for cache in (separate, batched):
        cache.ret_steps = 1
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(3, 5, 4, generator=g)
        # the middle row jumps once (step 1), so passes decide differently there and alike after
        drift = (0.001 * step, 0.2 * min(step, 1), 0.002 * step)
        e0 = torch.stack([torch.full((6, 4), 1.0 + d) for d in drift])
        one_by_one = torch.cat([separate.runner(n, step)(blocks, x[i : i + 1], {"e0": e0[i : i + 1]})
                                for i, n in enumerate(names)])
        together = batched.runner(names, step)(blocks, x, {"e0": e0})
        assert torch.allclose(together, one_by_one, atol=1e-6, rtol=0), step
    assert batched.table(names) == separate.table(names)
    table = batched.table(names)
    assert any(len(set(row)) > 1 for row in table), f"the test should include a mixed step: {table}"
    assert any(not any(row) for row in table), f"and a step where every pass skips: {table}"
