"""TeaCache: skip the DiT blocks on steps where the timestep modulation has barely moved.

The reference (``WanModel.teacache_init`` / ``forward`` of both MeiGen repositories) keeps, per
guidance pass, an accumulator, the previous modulation signal and the residual the blocks added
last time they ran. At each call::

    rel  = mean|sig - prev_sig| / mean|prev_sig|          # float32 tensors, then a Python float
    acc += poly(rel)                                       # degree-4 polynomial, highest power first
    skip the blocks if acc < thresh (tokens += cached residual), else run them, cache
    residual = out - in and set acc = 0

``sig`` is ``e0`` (the [B, 6, C] time-projection output) with ``use_ret_steps`` (the default and
the only setting the reference CLI uses), else ``e`` (the [B, C] time embedding). The first
``ret_steps`` steps (5 with ret steps, 1 without) and every step from ``cutoff`` on (``steps``
with ret steps, i.e. never; ``steps - 1`` without) always run the blocks and reset ``acc``. The
signal depends on ``t`` only, so the skip pattern is a fixed function of the schedule.

**Per-branch state, the fix for the 2-pass mode.** The reference tells the passes apart by a call
counter ``cnt`` taken modulo 3 (0 = cond, 1 = drop-text, 2 = uncond) that wraps at ``3 * steps``,
and its ``ret_steps``/``cutoff`` are counted in calls (15 and ``3 * steps``). That is right for the
3-pass guidance only. With text guidance 1 (the step-distilled LoRAs) there are 2 passes per step
(cond, drop-audio): the counter then sends cond and drop-audio calls through all three slots in
turn, so a pass is compared with, and is given the cached residual of, the *other* pass; the
always-compute window covers 7.5 steps instead of 5; and the counter does not wrap at the end of a
chunk (``2 * steps`` calls), so the next chunk starts mid-cycle (MeiGen-AI/InfiniteTalk#87). Here
each pass has its own state keyed by its name, and steps are counted per pass: ``step < ret_steps``
or ``step >= cutoff`` always computes, the reference's conditions ``cnt < 3 * ret_steps`` and
``cnt >= 3 * cutoff`` in per-step terms. In the 3-pass mode this is the reference exactly (the
``teacache_*`` golden decisions are reproduced); in the 2-pass mode it is what the reference
intends.

Use: one :class:`TeaCache` per chunk (or call :meth:`TeaCache.reset`), and for each model call
``model(..., block_runner=cache.runner(branch, step))``, or with passes batched into one call
``cache.runner(("cond", "drop_text", "uncond"), step)`` (one name per batch row).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

BRANCHES = ("cond", "drop_text", "uncond", "drop_audio")

# (tier, use_ret_steps) -> polynomial coefficients, highest power first (np.poly1d order).
COEFFICIENTS: dict[tuple[int, bool], tuple[float, ...]] = {
    (480, True): (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    (720, True): (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
    (480, False): (-3.02331670e02, 2.23948934e02, -5.25463970e01, 5.87348440e00, -2.01973289e-01),
    (720, False): (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
}

DEFAULT_THRESH = 0.2  # the reference CLI's --teacache_thresh

BlockRunner = Callable[[Sequence[torch.nn.Module], torch.Tensor, dict], torch.Tensor]


def relative_l1(signal: torch.Tensor, previous: torch.Tensor) -> float:
    """``mean|sig - prev| / mean|prev|``, computed on the tensors' device as the reference does."""
    return ((signal - previous).abs().mean() / previous.abs().mean()).item()


@dataclass
class BranchState:
    accumulated: float = 0.0
    previous_signal: torch.Tensor | None = None
    residual: torch.Tensor | None = None


class TeaCache:
    """TeaCache decisions and residuals for one chunk of ``steps`` sampling steps.

    ``tier``: 480 or 720 (the coefficient set follows the bucket tier, as the reference's
    ``--size``). ``computed[step][branch]`` records, for every pass made, whether the blocks ran.
    """

    def __init__(self, steps: int, thresh: float = DEFAULT_THRESH, tier: int = 480, use_ret_steps: bool = True):
        if (tier, bool(use_ret_steps)) not in COEFFICIENTS:
            raise ValueError(f"TeaCache has coefficients for the 480 and 720 tiers, not {tier}")
        if steps < 1:
            raise ValueError("steps must be at least 1")
        self.steps = steps
        self.thresh = float(thresh)
        self.tier = tier
        self.use_ret_steps = bool(use_ret_steps)
        self.coefficients = COEFFICIENTS[(tier, self.use_ret_steps)]
        self._poly = np.poly1d(self.coefficients)
        self.ret_steps = 5 if self.use_ret_steps else 1
        self.cutoff = steps if self.use_ret_steps else steps - 1
        # Sequence parallel: every rank decides from its own signal, and ``agree(compute)`` (an
        # all-reduce) makes the blocks run on all ranks when any rank would run them; a rank that
        # skipped while another computed would leave the others waiting in the blocks' exchanges.
        self.agree: Callable[[bool], bool] | None = None
        self.reset()

    def reset(self) -> None:
        """Forget all state (start of a new chunk). Not needed for correctness, since every chunk
        starts with always-compute steps, but it frees the cached residuals."""
        self.state: dict[str, BranchState] = {}
        self.computed: dict[int, dict[str, bool]] = {}

    def always_computes(self, step: int) -> bool:
        return step < self.ret_steps or step >= self.cutoff

    def decide(self, branch: str, step: int, signal: torch.Tensor) -> bool:
        """Whether the blocks must run for ``branch`` at ``step`` (updates the branch's state)."""
        if branch not in BRANCHES:
            raise ValueError(f"unknown guidance pass {branch!r}; expected one of {BRANCHES}")
        if not 0 <= step < self.steps:
            raise ValueError(f"step {step} is outside 0..{self.steps - 1}")
        state = self.state.setdefault(branch, BranchState())
        if self.always_computes(step) or state.previous_signal is None:
            compute = True
            state.accumulated = 0.0
        else:
            state.accumulated += float(self._poly(relative_l1(signal, state.previous_signal)))
            compute = not state.accumulated < self.thresh
            if compute:
                state.accumulated = 0.0
        state.previous_signal = signal.detach().clone()
        self.computed.setdefault(step, {})[branch] = compute
        return compute

    def runner(self, branches: str | Sequence[str], step: int, e: torch.Tensor | None = None) -> BlockRunner:
        """A ``block_runner`` for ``WanMultiTalkDiT.forward``.

        ``branches``: the guidance pass of each batch row (one name for an unbatched pass, or e.g.
        ``("cond", "drop_text", "uncond")`` when the passes run as one batch). Each row decides
        from its own modulation signal (``kwargs["e0"][row]`` with ret steps; without, ``e[row]``,
        the time embedding ``model.embed_time(t)[0]``). If every row skips, the blocks do not run
        and each row gets its own cached residual. Otherwise the blocks run on the whole batch;
        rows that decided to skip still take ``input + cached residual`` (and keep their cache),
        so every row is exactly what a per-pass run gives. Rows of one step share ``t``, so in
        practice they always decide alike.
        """
        names = (branches,) if isinstance(branches, str) else tuple(branches)

        def run(blocks: Sequence[torch.nn.Module], tokens: torch.Tensor, kwargs: dict) -> torch.Tensor:
            if self.use_ret_steps:
                signal = kwargs["e0"]
            else:
                signal = e if e is not None else kwargs.get("e")
                if signal is None:
                    raise ValueError(
                        "TeaCache without ret steps needs the time embedding e: runner(branch, step, e=...)"
                    )
            if signal.shape[0] != len(names) or tokens.shape[0] != len(names):
                raise ValueError(f"TeaCache runner for {len(names)} passes got a batch of {tokens.shape[0]}")
            skip = []
            for row, name in enumerate(names):
                compute = self.decide(name, step, signal[row : row + 1])
                # Nothing cached (cannot happen from step 0, which always computes): run the blocks.
                must = compute or self.state[name].residual is None
                if self.agree is not None:
                    must = self.agree(must)
                if must and not compute:
                    self.computed[step][name] = compute = True
                    self.state[name].accumulated = 0.0
                skip.append(not compute)
            if all(skip):
                return tokens + torch.cat([self.state[name].residual for name in names])
            start = tokens
            for block in blocks:
                tokens = block(tokens, **kwargs)
            rows = []
            for row, name in enumerate(names):
                if skip[row]:
                    rows.append(start[row : row + 1] + self.state[name].residual)
                else:
                    self.state[name].residual = tokens[row : row + 1] - start[row : row + 1]
                    rows.append(tokens[row : row + 1])
            return torch.cat(rows) if any(skip) else tokens

        return run

    def table(self, branches: Sequence[str]) -> list[list[bool]]:
        """``computed`` as rows of steps and columns of ``branches`` (the golden's [steps, 3])."""
        return [[self.computed[s][b] for b in branches] for s in sorted(self.computed)]

    @property
    def skipped(self) -> int:
        """How many passes reused the cache so far."""
        return sum(not c for row in self.computed.values() for c in row.values())
