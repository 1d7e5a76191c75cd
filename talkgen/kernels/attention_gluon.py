"""Flash-attention forward for Hopper (sm_90a) written in Gluon, Triton's explicit-layout language.

Same contract as :func:`talkgen.kernels.attention_triton.attention_bf16`: non-causal, no mask,
``q``/``k``/``v`` ``[B, H, L, D]`` bf16/fp16 with last stride 1 (the DiT passes ``[B, L, H, D]``
buffers seen through ``transpose(1, 2)``; no copy is made), output written in ``[B, L, H, D]``
order and returned as its ``[B, H, L, D]`` view. head_dim 64 or 128.

Why Gluon: the tl kernel in ``attention_triton.py`` reaches only 0.92-0.94x torch SDPA on an
H100 because Triton 3.6's tl compiler waits for every wgmma right after issuing it and does not
warp-specialize on Hopper, so the softmax never runs while the tensor cores work. Gluon exposes
the asynchronous pieces directly, so this kernel follows FlashAttention-3 (Shah et al., 2024):

* One program owns ``block_m`` (128) query rows of one (batch, head); ``num_warps`` 8 = two
  consumer warpgroups, each the owner of 64 rows (the wgmma layout ``warps_per_cta=[8, 1]``).
  Q stays in shared memory for the whole loop (the A operand of S = Q K^T).
* K and V stream through a ``stages``-deep ring of shared-memory tiles filled by TMA (bulk tensor
  copies, completion tracked by one mbarrier per tile), separate barriers for K and V so that
  S = Q K^T can start before V has landed.
* Intra-warpgroup overlap: in iteration j the program issues S_j = Q K_j^T and O += P_{j-1} V_{j-1}
  as asynchronous wgmmas, waits only for S_j (``num_outstanding=1``), runs the online softmax of
  S_j while the P V product is still on the tensor cores, then waits for it and rescales O
  (so the source says; in the SASS ptxas moved that wait up, see "FA3 loop" below).
  P goes to the second wgmma straight from registers (``DotOperandLayout``), never through
  shared memory.
* Softmax in base 2 with log2(e)/sqrt(D) folded into one multiplier, float32 running max / sum,
  O / l at the end. Columns >= L of the last K tile are masked to -inf (only in that iteration);
  query rows >= L are computed on whatever TMA brought and not stored.
* Three ways to organise the warps (``Config``), all sharing the consumer code:
  - ``split_consumers`` (the default, FA3's layout): ``gl.warp_specialize`` with three partitions,
    a 1-warp TMA producer (24 registers, setmaxnreg) and two 4-warp consumer partitions of 64 rows
    each (256 / 240 registers). The producer waits on per-slot "empty" mbarriers (one arrive per
    consumer) before refilling a slot. Triton puts a partition-wide barrier before each mbarrier
    arrive / wait; with one warpgroup per partition those span 128 threads, so the consumers never
    wait for each other and drift apart: one's softmax overlaps the other's GEMMs (FA3's ping-pong,
    without its explicit ordering). That was the hope; the measured speed (below) says the two
    run in lockstep, hence the explicit ``pingpong`` variants.
  - ``warp_specialize`` only: the producer warp plus one 8-warp consumer partition; its two
    warpgroups meet at those partition-wide barriers twice per K/V tile (no ping-pong).
  - neither: no producer; the consumers issue the TMA loads ``stages`` tiles ahead, after a
    CTA-wide barrier that makes sure both warpgroups finished reading the slot.
* Output: O / l in float32 -> input dtype -> a coalesced blocked layout -> masked ``gl.store``
  into the ``[B, L, H, D]`` buffer (a TMA store over the 2-D view would clip only at the end of
  the whole tensor and so overwrite the next batch's rows).

* FA3 loop (``fa3_loop``, ``_consumer_fa3``, split consumers only), added after the first GPU
  run: reading the SASS of the variants above (ptxas 12.8 of Triton 3.6, same with 3.9) showed
  that ptxas hoists the P V ``wgmma.wait_group 0`` from after the softmax to right behind the row
  max: the PTX ties no register of the softmax to that wait (the ``deps`` exist only at the LLVM
  level), so the "intra-warpgroup overlap" above never happens on the hardware. The FA3 loop puts
  the whole softmax in both arms of the masking branch (``_online_softmax_fenced``); ptxas does not
  hoist the wait above the branch, and the SASS now has all exp2s between the two waits
  (``tests/test_attention_gluon.py`` checks this). It also rescales O between the issues of S_j and
  P_{j-1} V_{j-1} (while S_j runs, FA3's order) and stores O straight from the wgmma layout.
* Ping-pong (``pingpong``): the two consumer partitions issue their wgmmas in strict alternation,
  FA3's warp-scheduler barrier built from two shared-memory mbarriers ("turns", count 1: Triton
  lowers ``mbarrier.arrive`` in a partition to a partition barrier plus one thread's arrive).
  Consumer c waits for its turn (after its K/V data has landed), issues S_j and P_{j-1} V_{j-1},
  and passes the turn, so one consumer's softmax runs while the other's GEMMs occupy the tensor
  cores. Both take n_blocks + 1 turns (S_0 alone, the loop, the last P V); the final pass leaves
  an arrive nobody waits for. The softmax itself was already at the FA3 minimum per score (FMNMX,
  FFMA, MUFU.EX2, FADD, half an F2FP; plus one FMUL per O element per tile for the rescale).

Measured 2026-12-06 on an H100 80GB HBM3 (Triton 3.6.0, torch 2.11; 1 x 40 heads x L x 128 bf16
in the DiT layout; ``python3 benchmarks/bench_attention_gluon.py``, SDPA/cuDNN timed in the same
process at 561-593 TFLOP/s). Every variant is correct (relative error 2.2-2.3e-3 against float32,
as SDPA's). TFLOP/s (x SDPA), three runs on three machines; the first four rows are from the last
run, in one call:

    variant                         L = 32,928     L = 75,600
    ws-split-ppns-lr-m128-n128-s3-w4  690 (1.197)  671 (1.195)   <- DEFAULT_CONFIG (a later run)
    ws-split-ppns-m128-n128-s3-w4   624 (1.085)    610 (1.083)   (630-634 / 614-616 in later runs)
    ws-split-ppnr-m128-n128-s3-w4   609 (1.051)    613 (1.086)
    ws-split-ppn-m128-n128-s3-w4    621 (1.090)    602 (1.073)   (620 / 609 in the run before)
    ws-split-pp-m128-n128-s3-w4     607 (1.052)    590 (1.045)   (616 / 595 in the first run)
    ws-split-pp-m128-n64-s4-w4      540 (0.917)    522 (0.914)
    ws-split-pp-m128-n128-s2-w4     437 (0.739)    439 (0.769)
    ws-split-fa3-m128-n128-s2-w4    412 (0.699)    415 (0.730)
    ws-split-m128-n64-s4-w4         560-564 (0.95-0.98)  547-552 (0.96)
    ws-split-m128-n128-s2-w4        543 (0.926)    532 (0.925)
    ws-m128-n128-s2-w8              513 (0.865)    499 (0.871)
    inline-m128-n128-s2-w8          406 (0.688)    408 (0.704)

``ppns-lr`` (``lazy_rescale``, FlashAttention-4's conditional rescaling) is the default since
(same process as ``ppns`` at 634 / 615). Why it pays: an Nsight Compute source-level profile of
``ppns`` with a tree-reduction softmax (as fast; PC sampling per SASS instruction) showed each
consumer warp busy ~90 % of the time with its own instruction stream (HGMMA issue 23 %, MUFU 23 %,
FMNMX 15 %), waiting for its S product
only ~5 % and for its turn ~4 %: the consumer's serial path from "S_j done" to "next GEMMs issued"
is the limit, and each instruction taken out of it counts. The 64 FMULs per thread that rescale O
every K tile were worth 7.6 % (timed with the rescale deleted: 678 against 630 TFLOP/s). With
``lazy_rescale`` a row's max moves only when a tile raises it by more than 8 (log2 units), so alpha
is exactly 1 for nearly every tile after the first and an inline-PTX block branches over the
multiplies (ptxas keeps the S issue before the branch). Tried the same day and slower or equal,
not kept: the row max / row sum as reduction trees with a per-thread partial sum (FA3's; 627 / 598
against 633 / 616), a quarter / an eighth / half of the exp2s computed on the FMA pipe with a
degree-3 polynomial (FA4's MUFU offload: 613 / 634 / 576 against 630: the MUFU is not the limit,
extra instructions are), the row sums on the tensor cores (P times a block of ones, issued with
P V: 628 / 609, with lazy rescaling 658 / 636, and it spilled). In the DiT, on one machine:
2.924 s per NFE with ``ppns-lr`` against 3.042 with ``ppns`` (-3.9 %).

The ``ppn`` variant (``named_turns``, added after an Nsight Compute profile of ``pp`` showed warps
stalled at partition barriers 30 % of the time) hands the turn over with hardware named barriers as
FA3 does (``bar.sync`` to take it, non-blocking ``bar.arrive`` to pass it) instead of mbarriers,
before each of whose arrives Triton puts a partition-wide barrier. ``ppnr`` (``named_release``)
also releases the K/V slots through named barriers (the producer warp syncs on them), leaving one
partition barrier per K/V tile, the one Triton puts before each ``mbarrier.wait``. ``ppns``
(``named_ready``) moves those waits to a fourth partition, a signaller warp that relays each
tile's TMA completion through named barriers: the consumer loop's SASS has no partition barrier
left. Each step removed barriers from the SASS; the speed moved by 1-2 % per step, within the
spread between processes: in the DiT, ``ppns`` against ``ppn`` in one call, 3.036 against 3.076 s
per NFE (1.3 %). So those barriers were not what separates this kernel from FA3's ~740 TFLOP/s
(the conditional rescaling above was).

Ping-pong pays only with a third K/V stage: with two, a consumer waiting for its turn also holds
the slot the producer needs next. The fenced FA3 loop alone (no ping-pong) is slower than the
original loop: keeping the softmax between the two waits lengthens each consumer's critical path
when nothing else fills the tensor cores. FlashAttention-3 reaches ~740 TFLOP/s at this shape
(its published figure); ``ppns-lr`` reaches 671-690 here, 1.2x SDPA. The Gluon API is
experimental and changes between Triton releases; the two renames between 3.6 and 3.9 (TMA load,
CTA barrier) are resolved at import (``_tma_load``, ``_cta_barrier``), and
``talkgen.models.attention`` falls back to SDPA when the kernel fails to compile under ``auto``.

8-bit variants (``attention_fp8_gluon``, ``FP8_VARIANTS``; first GPU run 2026-12-06, H100: correct,
2.5e-2 on DiT-like inputs with int8 scores, 679-709 TFLOP/s bf16-equivalent with the mbarrier
hand-over, 715 / 730 at 32,928 / 75,600 tokens with the named-barrier one, 728 / 749 with the bf16
default's ``ppns`` scheme = 0.96-1.0x the tl kernel below in the same process; with conditional
rescaling (``fp8-ppns-lr``, P <= 2^8.5 so that e4m3 cannot saturate) 781-802 / 789-812 =
1.07-1.08x the tl kernel; with P handed to the P V product in the accumulator's key order and V^T
stored to match (``fp8-ppns-lr-kp``, no register exchange between threads, ``_p_operand_fp8``)
805-809 / 815-821 = 1.10-1.12x: ``TALKGEN_ATTENTION=gluon-fp8``, opt-in; figures in
docs/performance.md). SageAttention-2's
arithmetic, as the tl kernel's ``attention_fp8(..., FP8_FAST_CONFIG)`` (713-762 TFLOP/s
bf16-equivalent, 2.5e-2 relative error on DiT-like inputs), on the ping-pong layout above:
``attention_triton.quantize_qkv`` (int8 Q per token, int8 K per 128-key block after subtracting
K's mean, V^T in e4m3 per channel after subtracting V's mean; its buffers go to TMA descriptors
unchanged), then S = Q8 K8^T by int8 wgmma (s32, turned into float32 by one integer add: a
magic-number bit trick) or e4m3 wgmma (f32), online softmax in base 2 with the per-(row, K tile)
scale q_scale * k_scale, P = 2^8 exp2(s - m) in e4m3 straight from registers into an e4m3 wgmma
against the K-major V^T tile, O / l * V's scale + V's mean at the end (reasoning in the comments of
``_softmax_core_fp8`` and ``_store_output_fp8``). Producer warp, two ping-pong consumer
warpgroups and the FA3 loop as ``DEFAULT_CONFIG``; the 8-bit K/V stage (32 KB at 128 keys) allows
4-6 stages. ``emulate_fp8_kernel`` replays the kernel's arithmetic in torch (CPU test: 1.6-1.9e-2
relative error on DiT-like inputs with int8 Q K^T, 3.9-4.4e-2 with e4m3 Q K^T, over the 3e-2 bar);
``python3 benchmarks/bench_attention_gluon.py --fp8`` is the GPU check and timing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from talkgen.kernels.layout import view_2d, wgmma_key_column

LOG2E = 1.4426950408889634
P_SHIFT_DEFAULT = 8.0  # the 8-bit kernel's e4m3 P is 2^8 * exp2(s - m), as in attention_triton (its P_SHIFT)
E4M3_MAX = 448.0
# lazy_rescale (bf16 kernel): how far (log2 units) a K tile's row max may exceed the running max
# before the max moves and O is rescaled; P then stays <= 2^8 (FlashAttention-4 uses the same bound).
LAZY_RESCALE_THRESHOLD = 8.0

try:  # Gluon (Triton >= 3.4) with the Hopper module; absent on older Tritons and some platforms
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # The TMA load was renamed after Triton 3.6 (``async_copy_global_to_shared`` -> ``async_load``,
    # the old name now raises): the GPU machine runs 3.6, CI 3.9.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    # Likewise the CTA-wide barrier: ``thread_barrier`` in 3.6, ``barrier`` later.
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

    GLUON_AVAILABLE: bool = True
except Exception:  # noqa: BLE001 - any import failure means "no Gluon here"
    GLUON_AVAILABLE = False


@dataclass(frozen=True)
class Config:
    """Tile and launch options of the Gluon kernel.

    ``block_m`` query rows per program (64 per consumer warpgroup, so ``num_warps = block_m / 16``),
    ``block_n`` keys per K/V tile, ``stages`` K/V tiles in flight in shared memory,
    ``warp_specialize`` a separate 1-warp TMA producer partition (else the consumers load)."""

    block_m: int = 128
    block_n: int = 128
    stages: int = 2
    num_warps: int = 4
    warp_specialize: bool = True
    split_consumers: bool = True
    producer_regs: int = 24  # registers per thread of the producer warp (setmaxnreg)
    consumer_regs: int = 240  # registers per thread of the second consumer warpgroup (split only)
    # FA3's consumer loop (split only): the P V wait pinned after the softmax, O rescaled between
    # the two GEMM issues (``_consumer_fa3``); with ``pingpong`` the two consumers also take turns
    # issuing their GEMMs (mbarrier "turn" handshake).
    fa3_loop: bool = False
    pingpong: bool = False
    # Ping-pong hand-over through two hardware named barriers (FA3's warp scheduler barrier): the
    # consumer waiting for its turn does ``bar.sync``, the one passing it ``bar.arrive``, which does
    # not block. The mbarrier hand-over costs a partition-wide barrier before every arrive and wait
    # (Triton inserts them): Nsight Compute shows warps stalled at such barriers 30 % of the time.
    named_turns: bool = False
    # With named_turns: the consumers release K/V slots with ``bar.arrive`` on two named barriers
    # (tile parity) that the producer warp ``bar.sync``s on before refilling, instead of the
    # kv_empty mbarriers. The consumer loop then has no mbarrier arrive left, so Triton's partition
    # barriers around it (one before the arrive, one before the next tile's waits) go too.
    named_release: bool = False
    # With named_release: a second 1-warp partition (the "signaller") waits for the TMA copies'
    # mbarriers and tells each consumer through a named barrier (``bar.arrive`` / ``bar.sync``) that
    # K/V tile j landed. The consumer loop is then free of mbarrier operations altogether, so the
    # partition barrier Triton puts before every ``mbarrier.wait`` (one per tile with
    # named_release) goes too; the waits and their barriers move to a warp that has nothing else to do.
    named_ready: bool = False
    # FA3 loop: FlashAttention-4's conditional rescaling. A row's running max moves only when a K
    # tile raises it by more than LAZY_RESCALE_THRESHOLD (2^8 in P); otherwise alpha is 1 and the
    # consumer branches over O's 64 multiplies per thread (``_rescale``).
    lazy_rescale: bool = False

    @property
    def name(self) -> str:
        kind = ("ws-split" if self.split_consumers else "ws") if self.warp_specialize else "inline"
        if self.pingpong:
            named = "-ppns" if self.named_ready else "-ppnr" if self.named_release else "-ppn"
            kind += named if self.named_turns else "-pp"
        elif self.fa3_loop:
            kind += "-fa3"
        kind += "-lr" if self.lazy_rescale else ""
        return f"{kind}-m{self.block_m}-n{self.block_n}-s{self.stages}-w{self.num_warps}"


# The variants the GPU benchmark sweeps (all measured; figures in the module docstring).
VARIANTS: tuple[Config, ...] = (
    # Ping-pong consumers + FA3 loop, FA3's tile (128 x 128, 2 stages: 180 KB shared).
    Config(split_consumers=True, num_warps=4, block_n=128, stages=2, fa3_loop=True, pingpong=True),
    # The same with a third K/V stage (224 KB shared, just under the 227 KB limit).
    Config(split_consumers=True, num_warps=4, block_n=128, stages=3, fa3_loop=True, pingpong=True),
    # DEFAULT_CONFIG with the hand-over through named barriers (bar.sync / bar.arrive), as FA3.
    Config(split_consumers=True, num_warps=4, block_n=128, stages=3, fa3_loop=True, pingpong=True, named_turns=True),
    # ... and the K/V slots released through named barriers too: no mbarrier arrive in the consumer loop.
    Config(split_consumers=True, num_warps=4, block_n=128, stages=3, fa3_loop=True, pingpong=True, named_turns=True,
           named_release=True),
    # ... and a signaller warp relays the TMA completions through named barriers: the consumer loop
    # has no mbarrier operation (and so no partition barrier) left.
    Config(split_consumers=True, num_warps=4, block_n=128, stages=3, fa3_loop=True, pingpong=True, named_turns=True,
           named_release=True, named_ready=True),
    # ... and conditional O rescaling (FlashAttention-4's): O's multiplies are branched over while no
    # row max moves by more than LAZY_RESCALE_THRESHOLD.
    Config(split_consumers=True, num_warps=4, block_n=128, stages=3, fa3_loop=True, pingpong=True, named_turns=True,
           named_release=True, named_ready=True, lazy_rescale=True),
    # Ping-pong with the best measured tile of the old loop (64 keys, 4 stages).
    Config(split_consumers=True, num_warps=4, block_n=64, stages=4, fa3_loop=True, pingpong=True),
    # FA3 loop without ping-pong: separates the two changes (compare with the first and with
    # ws-split-m128-n128-s2-w4).
    Config(split_consumers=True, num_warps=4, block_n=128, stages=2, fa3_loop=True, pingpong=False),
    # FA3's layout: a producer warp and two independent 64-row consumer warpgroups.
    Config(warp_specialize=True, split_consumers=True, num_warps=4, stages=2),
    # Smaller K/V tiles, deeper ring: more, shorter softmax steps to interleave.
    Config(warp_specialize=True, split_consumers=True, num_warps=4, block_n=64, stages=4),
    # One 8-warp consumer partition (its warpgroups meet at every mbarrier arrive) + producer warp.
    Config(warp_specialize=True, split_consumers=False, num_warps=8, stages=2),
    # No warp specialization: the consumers issue the TMA loads themselves.
    Config(warp_specialize=False, split_consumers=False, num_warps=8, stages=2),
)

# What the model uses (talkgen.models.attention): the fastest variant measured on a GPU,
# ping-pong consumers, a 3-stage ring of 128-key tiles, every hand-over inside the consumer loop
# through named barriers, O rescaled only when a row max moves by more than 8: 690 / 671 TFLOP/s at
# 32,928 / 75,600 tokens = 1.2x SDPA on an H100 (ppns: 634 / 615 in the same call), and in the DiT
# 2.924 s per NFE against 3.042 s with ppns on one machine (2026-12-06,
# benchmarks/bench_attention_gluon.py and bench_dit.py).
DEFAULT_CONFIG = next(cfg for cfg in VARIANTS if cfg.name == "ws-split-ppns-lr-m128-n128-s3-w4")


@dataclass(frozen=True)
class Fp8Config:
    """Tile and launch options of the 8-bit kernel (:func:`attention_fp8_gluon`). The warp layout is
    always the ping-pong one of ``DEFAULT_CONFIG`` (a 1-warp TMA producer and two 4-warp consumer
    warpgroups of ``block_m / 2`` = 64 query rows taking turns at the tensor cores, FA3 loop);
    ``qk_int8``: S = Q K^T from int8 operands (s32 accumulator), else from e4m3 ones (f32).
    P V is always e4m3 x e4m3 -> f32."""

    block_m: int = 128
    block_n: int = 128
    stages: int = 4
    qk_int8: bool = True
    num_warps: int = 4  # per consumer warpgroup: 64 rows / 16
    producer_regs: int = 24
    consumer_regs: int = 240
    named_turns: bool = False  # the hand-over through named barriers (``Config.named_turns``)
    # With named_turns: slot releases and tile arrivals through named barriers too, a signaller
    # warp relaying the TMA completions (``Config.named_release`` + ``named_ready``, the bf16
    # default's scheme); at most 3 stages.
    named_sync: bool = False
    # Conditional O rescaling (``Config.lazy_rescale``): the row max moves only when a K tile raises
    # it by more than rescale_threshold. P = 2^p_shift * exp2(score - m) must stay within e4m3's
    # 448 = 2^8.8, so p_shift + rescale_threshold <= 8.8 (``_validate_fp8``).
    lazy_rescale: bool = False
    rescale_threshold: float = 0.5
    p_shift: float = P_SHIFT_DEFAULT
    # P V with the keys of every 16 in the order the S accumulator holds them (``_p_operand_fp8``):
    # P goes from the S registers to the wgmma's A operand without crossing threads, and V^T is
    # stored with its columns in the same order (``quantize_qkv(..., wgmma_key_order=True)``).
    key_permuted_v: bool = False

    @property
    def name(self) -> str:
        qk = "i8qk" if self.qk_int8 else "e4qk"
        pp = ("ppns" if self.named_sync else "ppn") if self.named_turns else "pp"
        if self.lazy_rescale:
            pp += "-lr" if self.rescale_threshold == 0.5 else f"-lr{self.rescale_threshold:g}"
        pp += "" if self.p_shift == P_SHIFT_DEFAULT else f"-p{self.p_shift:g}"
        pp += "-kp" if self.key_permuted_v else ""
        return f"fp8-{pp}-{qk}-m{self.block_m}-n{self.block_n}-s{self.stages}-w{self.num_warps}"


# The 8-bit variants (measured 2026-12-06 on an H100, int8 / e4m3 / int8 6 stages / int8 named
# hand-over / ppns / ppns-lr / ppns-lr1.5-p7: 686 / 758 / 700 / 715 / 728 / 781-802 / 803 TFLOP/s at
# 32,928 tokens, errors 2.5e-2 / 6.2e-2 / 2.5e-2 / 2.5e-2 / 2.5e-2 / 2.5e-2 / 2.5e-2 on DiT-like
# inputs; the tl ``triton-fp8-fast`` kernel 726-748 in the same processes; the kp ones below:
# FP8_DEFAULT_CONFIG). The lazy-rescale ones are the first faster than the tl kernel;
# FP8_DEFAULT_CONFIG is opt-in. 8-bit tiles are half
# the bytes of bf16 ones, so a 128-key K/V stage is 32 KB (K 128 x 128 + V^T 128 x 128 bytes) and a
# 4-stage ring + Q (16 KB) takes 144 KB of the 227 KB.
FP8_VARIANTS: tuple[Fp8Config, ...] = (
    # SageAttention-2's choice: int8 Q K^T (exact products; the int32 accumulator cannot round).
    Fp8Config(block_n=128, stages=4, qk_int8=True),
    # e4m3 Q K^T: no int -> float step in the softmax (one integer add per score less), but 2-3x
    # the quantization error of int8 on the scores: emulate_fp8_kernel gives 3.9-4.4e-2 on DiT-like
    # inputs, over the benchmark's 3e-2 bar. Offered to measure what int8 costs in speed.
    Fp8Config(block_n=128, stages=4, qk_int8=False),
    # int8 with a deeper ring: 6 stages of 32 KB + Q = 208 KB.
    Fp8Config(block_n=128, stages=6, qk_int8=True),
    # int8, the hand-over through named barriers: 715 / 730 TFLOP/s against 679 / 692 for the first
    # row in the same call (+5 %), 0.96 / 0.99x triton-fp8-fast.
    Fp8Config(block_n=128, stages=4, qk_int8=True, named_turns=True),
    # int8, the bf16 default's scheme: no mbarrier operation in the consumer loop (3 stages: the
    # named-barrier rotations allow no more): 728-729 / 744-749 TFLOP/s, +2 % over the row above.
    Fp8Config(block_n=128, stages=3, qk_int8=True, named_turns=True, named_sync=True),
    # ... and conditional O rescaling: P <= 2^8.5 (threshold 0.5), or P shifted by 2^7 only and a
    # threshold of 1.5 (fewer rescales, P resolved down to 2^-16 of the row max instead of 2^-17).
    Fp8Config(block_n=128, stages=3, qk_int8=True, named_turns=True, named_sync=True, lazy_rescale=True),
    Fp8Config(block_n=128, stages=3, qk_int8=True, named_turns=True, named_sync=True, lazy_rescale=True,
              rescale_threshold=1.5, p_shift=7.0),
    # ... and P handed to the P V product in the accumulator's key order (V^T stored to match):
    # no register exchange between threads per K tile (``_p_operand_fp8``).
    Fp8Config(block_n=128, stages=3, qk_int8=True, named_turns=True, named_sync=True, lazy_rescale=True,
              key_permuted_v=True),
    Fp8Config(block_n=128, stages=3, qk_int8=True, named_turns=True, named_sync=True, lazy_rescale=True,
              rescale_threshold=1.5, p_shift=7.0, key_permuted_v=True),
)

# What TALKGEN_ATTENTION=gluon-fp8 uses (opt-in): ppns-lr with P handed over in the accumulator's
# key order (``kp``): 805 / 809 TFLOP/s bf16-equivalent at 32,928 tokens, 815 / 821 at 75,600 (two
# processes, the quantization pass included), against 781-782 / 789-791 for ppns-lr in the same
# processes; 1.10-1.12x the tl kernel triton-fp8-fast; the same errors (2.5e-2 on DiT-like inputs;
# 2026-12-06, H100, benchmarks/bench_attention_gluon.py --fp8 --variants 5 7 8 and two variants since
# removed). lr1.5-p7-kp (810-812 / 821) is as fast within the spread. Measured and removed: an eighth /
# a quarter of P's exp2s on the FMA pipe (FlashAttention-4's MUFU offload; 804-808 / 733-735).
FP8_DEFAULT_CONFIG = next(cfg for cfg in FP8_VARIANTS if cfg.name == "fp8-ppns-lr-kp-i8qk-m128-n128-s3-w4")

# ------------------------------------------------------------------------------------------------
# Device code

if GLUON_AVAILABLE:
    RESCALE_THRESHOLD = gl.constexpr(LAZY_RESCALE_THRESHOLD)  # a global a Gluon function may read

    @gluon.jit
    def _online_softmax(s, m_i, l_i, qk_scale, n0, L, BLOCK_N: gl.constexpr, s_layout: gl.constexpr,
                        LAZY: gl.constexpr = False):
        """One block of the online softmax in base 2: P = exp2(S * scale - m), the running max m,
        sum l and the factor alpha that rescales what O accumulated so far (``_softmax_core``). The
        -inf of masked columns stays -inf in the FMA s * scale - m, so their p is 0."""
        if n0 + BLOCK_N > L:  # only the last K tile reaches past the sequence: mask it
            cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where(gl.expand_dims(cols < L, 0), s, -float("inf"))
        return _softmax_core(s, m_i, l_i, qk_scale, LAZY)

    @gluon.jit
    def _softmax_core(s, m_i, l_i, qk_scale, LAZY: gl.constexpr = False):
        """Online softmax of one (already masked) block, base 2: per score one FMNMX (row max of the
        raw scores, scaled once per row), one FFMA (s * scale - m), one MUFU.EX2, one FADD (row sum);
        the bf16 packing (F2FP, one per two scores) follows at the P V issue.

        ``LAZY`` (FlashAttention-4's conditional rescaling): a row's running max moves only when the
        block's max exceeds it by more than ``RESCALE_THRESHOLD``; otherwise P is taken against the
        old max (p <= 2^8, exact in fp32 and as exact in bf16 as any p <= 1) and alpha is exactly 1,
        so ``_rescale`` can skip O."""
        row_max = gl.max(s, axis=1) * qk_scale
        if LAZY:
            m_new = gl.where(row_max > m_i + RESCALE_THRESHOLD, row_max, m_i)  # m_i = -inf: row_max
        else:
            m_new = gl.maximum(m_i, row_max)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)  # m_i = -inf on the first block: alpha = 0; unchanged m: 1
        l_i = l_i * alpha + gl.sum(p, axis=1)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _online_softmax_fenced(s, m_i, l_i, qk_scale, n0, L, BLOCK_N: gl.constexpr, s_layout: gl.constexpr,
                               LAZY: gl.constexpr = False):
        """``_online_softmax`` with the whole softmax inside both arms of the masking branch (two
        copies in the code). The point is the join block after it: ptxas hoists a
        ``wgmma.wait_group`` freely within a basic block (nothing in the PTX ties it to the
        softmax's registers, the ``deps`` of ``warpgroup_mma_wait`` exist only at the LLVM level)
        but, as the SASS shows, not above a branch, so the wait that follows this call stays after
        the exp2s."""
        if n0 + BLOCK_N > L:  # only the last K tile reaches past the sequence: mask it
            cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where(gl.expand_dims(cols < L, 0), s, -float("inf"))
            p, m_new, l_new, alpha = _softmax_core(s, m_i, l_i, qk_scale, LAZY)
        else:
            p, m_new, l_new, alpha = _softmax_core(s, m_i, l_i, qk_scale, LAZY)
        return p, m_new, l_new, alpha

    @gluon.jit
    def _store_output_direct(o, l_i, out_ptr, b, h, m0, L, H, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                             o_layout: gl.constexpr):
        """O / l into the [B, L, H, D] buffer straight from the wgmma layout (4-byte stores): unlike
        ``_store_output`` no shared-memory scratch for a layout conversion (16 KB that would not
        fit next to three 128-key K/V stages). The output is written once per K/V sweep, so the
        less coalesced stores cost nothing measurable."""
        o = o / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
        rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        row_offsets = ((b * L + rows).to(gl.int64) * H + h) * HEAD_DIM
        offsets = gl.expand_dims(row_offsets, 1) + gl.expand_dims(cols, 0)
        gl.store(out_ptr + offsets, o.to(out_ptr.dtype.element_ty), mask=gl.expand_dims(rows < L, 1))

    @gluon.jit
    def _issue_kv_load(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, block, slot, k_row, k_col, v_row,
                       v_col, BLOCK_N: gl.constexpr, pred):
        """TMA copies of K and V tile ``block`` into ring slot ``slot``, each with its own barrier."""
        n0 = block * BLOCK_N
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes, pred=pred)
        _tma_load(k_desc, [k_row + n0, k_col], k_ready.index(slot), k_smem.index(slot), pred=pred)
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes, pred=pred)
        _tma_load(v_desc, [v_row + n0, v_col], v_ready.index(slot), v_smem.index(slot), pred=pred)

    @gluon.jit
    def _store_output(o, l_i, out_ptr, b, h, m0, L, H, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                      NUM_WARPS: gl.constexpr, o_layout: gl.constexpr):
        """O / l into the [B, L, H, D] buffer, valid rows only, 16-byte vectors along D."""
        o = o / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
        store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // HEAD_DIM, HEAD_DIM // 8], [NUM_WARPS, 1],
                                                      [1, 0])
        o = gl.convert_layout(o.to(out_ptr.dtype.element_ty), store_layout)
        rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, store_layout))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, store_layout))
        row_offsets = ((b * L + rows).to(gl.int64) * H + h) * HEAD_DIM
        offsets = gl.expand_dims(row_offsets, 1) + gl.expand_dims(cols, 0)
        gl.store(out_ptr + offsets, o, mask=gl.expand_dims(rows < L, 1))

    @gluon.jit
    def _consumer(q_desc, k_desc, v_desc, out_ptr, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty,
                  q_row, q_col, k_row, k_col, v_row, v_col, b, h, m0, L, H, qk_scale,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                  NUM_WARPS: gl.constexpr, LOADS_INLINE: gl.constexpr):
        """``BLOCK_M`` query rows from ``m0`` on (``NUM_WARPS`` / 4 warpgroups): the K/V loop with S_j
        and P_{j-1} V_{j-1} in flight while the softmax of S_j runs. With ``LOADS_INLINE`` these warps
        also load Q and refill the ring (no producer partition)."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        dtype: gl.constexpr = q_desc.dtype
        n_blocks = gl.cdiv(L, BLOCK_N)

        if LOADS_INLINE:
            mbarrier.expect(q_ready, q_desc.block_type.nbytes)
            _tma_load(q_desc, [q_row + m0, q_col], q_ready, q_smem)
            for i in gl.static_range(STAGES):
                _issue_kv_load(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, i, i, k_row, k_col, v_row, v_col,
                               BLOCK_N, i < n_blocks)

        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        o = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        m_i = gl.full([BLOCK_M], -float("inf"), gl.float32, row_layout)
        l_i = gl.zeros([BLOCK_M], gl.float32, row_layout)

        # Block 0: S_0 alone (nothing to overlap it with yet).
        mbarrier.wait(q_ready, 0)
        mbarrier.wait(k_ready.index(0), 0)
        s_token = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=[s_token])
        p, m_i, l_i, alpha = _online_softmax(s, m_i, l_i, qk_scale, 0, L, BLOCK_N, s_layout)

        for j in range(1, n_blocks):
            slot = j % STAGES
            prev = (j - 1) % STAGES
            # S_j = Q K_j^T, asynchronously.
            mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
            s_token = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False,
                                    is_async=True)
            # O += P_{j-1} V_{j-1}, asynchronously, P straight from registers.
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
            o_token = warpgroup_mma(p_op, v_smem.index(prev), o, is_async=True)
            # wgmma groups complete in issue order: one outstanding = S_j is done, P V may still run.
            s = warpgroup_mma_wait(num_outstanding=1, deps=[s_token])
            p, m_i, l_i, alpha_j = _online_softmax(s, m_i, l_i, qk_scale, j * BLOCK_N, L, BLOCK_N, s_layout)
            o, p_op = warpgroup_mma_wait(num_outstanding=0, deps=[o_token, p_op])
            # Slot ``prev`` (K_{j-1}, V_{j-1}) is free now: refill it or hand it to the producer.
            if LOADS_INLINE:
                _cta_barrier()  # both warpgroups are past their reads of the slot
                _issue_kv_load(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, j - 1 + STAGES, prev, k_row,
                               k_col, v_row, v_col, BLOCK_N, j - 1 + STAGES < n_blocks)
            else:
                mbarrier.arrive(kv_empty.index(prev), count=1)
            o = o * gl.expand_dims(gl.convert_layout(alpha_j, gl.SliceLayout(1, o_layout)), 1)

        # The last P V.
        last = n_blocks - 1
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
        o_token = warpgroup_mma(p_op, v_smem.index(last % STAGES), o, is_async=True)
        o, p_op = warpgroup_mma_wait(num_outstanding=0, deps=[o_token, p_op])
        _store_output(o, l_i, out_ptr, b, h, m0, L, H, HEAD_DIM, BLOCK_M, NUM_WARPS, o_layout)

    @gluon.jit
    def _named_barrier(ASM: gl.constexpr, NUM_WARPS: gl.constexpr):
        """Run ``ASM`` (a ``bar.sync`` / ``bar.arrive``) once in every thread of this 4-warp partition:
        an elementwise inline asm over a tensor that gives each thread exactly one element. Side
        effects on: LLVM keeps it in place relative to the wgmma issues and mbarrier operations."""
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [NUM_WARPS], [0])
        x = gl.full([NUM_WARPS * 32], 0, gl.int32, layout)
        gl.inline_asm_elementwise(ASM, "=r,r", [x], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _take_named_turn(ME: gl.constexpr, NUM_WARPS: gl.constexpr):
        """Named-barrier ping-pong (``named_turns``): barrier 10 + ME completes when this consumer's
        128 threads sync on it and the other consumer's 128 threads have arrived (256 in all).
        Barriers 0-3 are Triton's own (partition and CTA barriers)."""
        if ME == 0:
            _named_barrier("bar.sync 10, 256;\n\tmov.b32 $0, $1;", NUM_WARPS)
        else:
            _named_barrier("bar.sync 11, 256;\n\tmov.b32 $0, $1;", NUM_WARPS)

    @gluon.jit
    def _pass_named_turn(ME: gl.constexpr, NUM_WARPS: gl.constexpr):
        if ME == 0:
            _named_barrier("bar.arrive 11, 256;\n\tmov.b32 $0, $1;", NUM_WARPS)
        else:
            _named_barrier("bar.arrive 10, 256;\n\tmov.b32 $0, $1;", NUM_WARPS)

    @gluon.jit
    def _release_named(tile, NUM_WARPS: gl.constexpr):
        """``named_release``, consumer side: this partition (128 threads) is done with K/V ``tile``.
        Barriers 12 / 13 by the tile's parity complete at 288 arrivals: both consumers' 256 threads
        and the producer warp's 32, which syncs on them in tile order before refilling the slot.
        Two barriers, because a consumer can be one tile ahead of the other (never two: the turns
        alternate), so a single barrier could count one consumer's two releases as one generation.
        Nor can a release of tile t + 2 (same barrier) come before the producer's sync for tile t:
        it happens in iteration t + 3, whose K/V tile the producer loads only after that sync, as
        long as the ring has at most 3 stages (``_validate`` insists)."""
        if (tile & 1) == 0:
            _named_barrier("bar.arrive 12, 288;\n\tmov.b32 $0, $1;", NUM_WARPS)
        else:
            _named_barrier("bar.arrive 13, 288;\n\tmov.b32 $0, $1;", NUM_WARPS)

    @gluon.jit
    def _wait_named_release(tile):
        """``named_release``, producer side (one warp): both consumers released ``tile``."""
        if (tile & 1) == 0:
            _named_barrier("bar.sync 12, 288;\n\tmov.b32 $0, $1;", 1)
        else:
            _named_barrier("bar.sync 13, 288;\n\tmov.b32 $0, $1;", 1)

    @gluon.jit
    def _ready_barrier_id(tile, ME: gl.constexpr):
        """``named_ready``: the named barrier that says K/V ``tile`` landed, for consumer ``ME``.
        Three per consumer, by ``tile % 3`` (consumer 0: 5, 6, 7; consumer 1: 8, 9, 14; 0-4 are
        Triton's, 10-13 the turns and releases): the signaller may run up to two tiles ahead of a
        consumer's sync (tiles 0-2 need no release), never three, because tile t + 3 is loaded only
        after both consumers released tile t, which they do after their sync for tile t + 1."""
        r = tile % 3
        if ME == 0:
            bar_id = 5 + r
        else:
            bar_id = 8 + r + 4 * (r // 2)
        return bar_id

    @gluon.jit
    def _wait_named_ready(tile, ME: gl.constexpr, NUM_WARPS: gl.constexpr):
        """``named_ready``, consumer side: K/V ``tile`` (and Q) are in shared memory. The barrier
        completes at 160 threads: this consumer's 128 (``bar.sync``) and the signaller warp's 32
        (``bar.arrive``); the id is a register operand."""
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [NUM_WARPS], [0])
        bar_id = gl.full([NUM_WARPS * 32], _ready_barrier_id(tile, ME), gl.int32, layout)
        gl.inline_asm_elementwise("bar.sync $1, 160;\n\tmov.b32 $0, $1;", "=r,r", [bar_id], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _signaller(q_ready, k_ready, v_ready, L, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """``named_ready``: a 1-warp partition that waits for each K/V tile's TMA copies (and Q's,
        before tile 0) and passes that on to both consumers through named barriers. The mbarrier
        waits, and the partition barriers Triton puts before them, happen here instead of in the
        consumers' loops (for one warp Triton's partition barrier is a ``bar.warp.sync``)."""
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        mbarrier.wait(q_ready, 0)
        n_blocks = gl.cdiv(L, BLOCK_N)
        for j in range(n_blocks):
            slot = j % STAGES
            phase = (j // STAGES) & 1
            mbarrier.wait(k_ready.index(slot), phase)
            mbarrier.wait(v_ready.index(slot), phase)
            ids0 = gl.full([32], _ready_barrier_id(j, 0), gl.int32, layout)
            ids1 = gl.full([32], _ready_barrier_id(j, 1), gl.int32, layout)
            gl.inline_asm_elementwise("bar.arrive $1, 160;\n\tbar.arrive $2, 160;\n\tmov.b32 $0, $1;", "=r,r,r",
                                      [ids0, ids1], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _take_turn(turn, t, ME: gl.constexpr, PINGPONG: gl.constexpr, NAMED: gl.constexpr = False,
                   NUM_WARPS: gl.constexpr = 4):
        """Ping-pong: consumer ``ME`` waits until it may issue its ``t``-th group of wgmmas. Turns
        alternate 0, 1, 0, 1, ...: consumer 0's turn t needs consumer 1's pass after its turn t-1
        (t = 0 passes at once: the parity before a fresh barrier's first phase), consumer 1's turn t
        needs consumer 0's pass after its turn t. Strict alternation means a barrier never runs two
        phases ahead of its waiter."""
        if PINGPONG:
            if NAMED:
                _take_named_turn(ME, NUM_WARPS)
            else:
                mbarrier.wait(turn.index(ME), (t + 1 + ME) & 1)

    @gluon.jit
    def _pass_turn(turn, ME: gl.constexpr, PINGPONG: gl.constexpr, NAMED: gl.constexpr = False,
                   NUM_WARPS: gl.constexpr = 4):
        """Ping-pong: this consumer's wgmmas are issued, the other one may issue. One arrive per
        partition (Triton lowers it to a partition barrier + one thread's ``mbarrier.arrive``),
        hence ``count=1`` at init."""
        if PINGPONG:
            if NAMED:
                _pass_named_turn(ME, NUM_WARPS)
            else:
                mbarrier.arrive(turn.index(1 - ME), count=1)

    @gluon.jit
    def _open_turns(ME: gl.constexpr, PINGPONG: gl.constexpr, NAMED: gl.constexpr, NUM_WARPS: gl.constexpr):
        """Before turn 0 with named barriers: consumer 1 arrives once for consumer 0's turn 0 (a
        named barrier has no free first phase, unlike the mbarrier's parity trick)."""
        if PINGPONG and NAMED and ME == 1:
            _pass_named_turn(1, NUM_WARPS)

    @gluon.jit
    def _pass_last_turn(turn, ME: gl.constexpr, PINGPONG: gl.constexpr, NAMED: gl.constexpr,
                        NUM_WARPS: gl.constexpr):
        """The pass after turn n_blocks. Consumer 1's has no taker: with named barriers it is skipped,
        so that every arrive meets its sync (the opening arrive of ``_open_turns`` takes its place)."""
        if not (NAMED and ME == 1):
            _pass_turn(turn, ME, PINGPONG, NAMED, NUM_WARPS)

    @gluon.constexpr_function
    def _lazy_rescale_asm(n):
        """PTX for ``_rescale`` with ``LAZY``, one block per thread over its n accumulator registers:
        outputs $0..$n-1 are tied to the O inputs $n..$2n-1 (the same registers), $2n..$3n-1 the
        alphas of each element's row. A thread's registers hold two rows of O: elements 0, 1 row r and
        2, 3 row r + 8, then the same pattern 8 columns on (the wgmma accumulator layout). When both
        alphas are 1 the branch skips the n multiplies; the warp runs them if any lane needs them."""
        n = getattr(n, "value", n)  # a constexpr or a plain int, by Triton version
        lines = ["{", ".reg .pred need;",
                 f"setp.neu.f32 need, ${2 * n}, 0f3F800000;",
                 f"setp.neu.or.f32 need, ${2 * n + 2}, 0f3F800000, need;",
                 "@!need bra SKIP_RESCALE;"]
        lines += [f"mul.f32 ${i}, ${n + i}, ${2 * n + i};" for i in range(n)]
        lines += ["SKIP_RESCALE:", "}"]
        return "\n".join(lines)

    @gluon.constexpr_function
    def _lazy_rescale_constraints(n):
        n = getattr(n, "value", n)  # a constexpr or a plain int, by Triton version
        return ",".join(["=f"] * n + [str(i) for i in range(n)] + ["f"] * n)

    @gluon.constexpr_function
    def _rows_at_elements_0_and_2(reg_bases):
        """Register bit 0 of a [rows, cols] linear layout steps one column, bit 1 eight rows."""
        reg_bases = getattr(reg_bases, "value", reg_bases)
        return [list(b) for b in reg_bases[:2]] == [[0, 1], [8, 0]]

    @gluon.jit
    def _rescale(o, alpha, LAZY: gl.constexpr):
        """O *= alpha, row by row (alpha in O's row layout). ``LAZY``: alpha is exactly 1 for rows
        whose max did not move (``_softmax_core``), and the multiplies are branched over (inline
        PTX: Gluon has no per-thread branch). Measured before writing this: the 64 multiplies per
        thread and K tile cost 7 % of the kernel's time (ws-split-ppns at 630 TFLOP/s, without the
        rescale 678, same process; results wrong, timing only)."""
        a = gl.expand_dims(alpha, 1)
        if LAZY:
            # The PTX block reads a thread's two row alphas from elements 0 and 2: register bit 0 must
            # step one column and bit 1 eight rows (the wgmma accumulator layout); checked when the
            # kernel compiles, so that another layout fails loudly instead of skipping a rescale.
            registers: gl.constexpr = gl.to_linear_layout(o.type.layout, o.shape).reg_bases
            gl.static_assert(_rows_at_elements_0_and_2(registers),
                             "lazy rescale: O's register order is not the wgmma accumulator's")
            o, a = gl.broadcast(o, a)
            n: gl.constexpr = o.shape[0] * o.shape[1] // (32 * gl.num_warps())
            return gl.inline_asm_elementwise(_lazy_rescale_asm(n), _lazy_rescale_constraints(n), [o, a],
                                             dtype=gl.float32, is_pure=True, pack=n)
        else:
            return o * a

    @gluon.jit
    def _consumer_fa3(q_desc, k_desc, v_desc, out_ptr, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty,
                      turn, b, h, m0, L, H, qk_scale,
                      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                      NUM_WARPS: gl.constexpr, ME: gl.constexpr, PINGPONG: gl.constexpr,
                      NAMED_TURNS: gl.constexpr, NAMED_RELEASE: gl.constexpr, NAMED_READY: gl.constexpr,
                      LAZY: gl.constexpr):
        """One 64-row consumer warpgroup with FA3's loop order (``fa3_loop``):

            wait K_j, V_{j-1}; [take turn]; issue S_j = Q K_j^T; O *= alpha_{j-1};
            issue O += P_{j-1} V_{j-1}; [pass turn]; wait S_j; softmax(S_j); wait P V; free slot j-1

        Two differences from ``_consumer``: (1) the wait for P V follows a branch join
        (``_online_softmax_fenced``). In the SASS of ``_consumer`` (ptxas 12.8) that
        ``wgmma.wait_group 0`` sits right after the row max, before all exp2s: nothing in the PTX
        ties the pure-ALU softmax to the wait, so ptxas hoists it and the P V product never
        overlaps the softmax, the intra-warpgroup overlap exists only in the source. (2) O is
        rescaled while S_j is on the tensor cores, not after the wait.
        With ``PINGPONG`` each group of wgmma issues is a turn taken alternately by the two
        consumers (``_take_turn`` / ``_pass_turn``): while one does its softmax the other's GEMMs run.
        Both consumers take the same number of turns (n_blocks + 1), so the last pass only leaves an
        arrive nobody waits for.
        ``LAZY``: conditional rescaling (``_softmax_core``, ``_rescale``)."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        o_row_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
        dtype: gl.constexpr = q_desc.dtype
        n_blocks = gl.cdiv(L, BLOCK_N)

        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        o = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        m_i = gl.full([BLOCK_M], -float("inf"), gl.float32, row_layout)
        l_i = gl.zeros([BLOCK_M], gl.float32, row_layout)

        _open_turns(ME, PINGPONG, NAMED_TURNS, NUM_WARPS)

        # Turn 0: S_0 alone.
        if NAMED_READY:
            _wait_named_ready(0, ME, NUM_WARPS)  # Q, K_0 and V_0
        else:
            mbarrier.wait(q_ready, 0)
            mbarrier.wait(k_ready.index(0), 0)
        _take_turn(turn, 0, ME, PINGPONG, NAMED_TURNS, NUM_WARPS)
        s_token = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        _pass_turn(turn, ME, PINGPONG, NAMED_TURNS, NUM_WARPS)
        s = warpgroup_mma_wait(num_outstanding=0, deps=[s_token])
        p, m_i, l_i, alpha = _online_softmax(s, m_i, l_i, qk_scale, 0, L, BLOCK_N, s_layout, LAZY)

        for j in range(1, n_blocks):  # turn j
            slot = j % STAGES
            prev = (j - 1) % STAGES
            # Data first, then the turn: never hold the turn while a TMA copy is still landing.
            if NAMED_READY:
                _wait_named_ready(j, ME, NUM_WARPS)  # K_j and V_j (V_{j-1} came with tile j-1)
            else:
                mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
                mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
            _take_turn(turn, j, ME, PINGPONG, NAMED_TURNS, NUM_WARPS)
            s_token = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False,
                                    is_async=True)
            # O (all of P_{<j-1} V, waited for) to the running max of block j-1, while S_j runs.
            o = _rescale(o, gl.convert_layout(alpha, o_row_layout), LAZY)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            o_token = warpgroup_mma(p_op, v_smem.index(prev), o, is_async=True)
            _pass_turn(turn, ME, PINGPONG, NAMED_TURNS, NUM_WARPS)
            s = warpgroup_mma_wait(num_outstanding=1, deps=[s_token])
            p, m_i, l_i, alpha = _online_softmax_fenced(s, m_i, l_i, qk_scale, j * BLOCK_N, L, BLOCK_N, s_layout,
                                                        LAZY)
            # After the branch join: ptxas keeps this wait after the softmax (see the docstring).
            o, p_op = warpgroup_mma_wait(num_outstanding=0, deps=[o_token, p_op])
            if NAMED_RELEASE:
                if j - 1 + STAGES < n_blocks:  # the producer waits only for slots it refills
                    _release_named(j - 1, NUM_WARPS)
            else:
                mbarrier.arrive(kv_empty.index(prev), count=1)  # slot j-1 read by this consumer

        # Turn n_blocks: the last P V.
        last = n_blocks - 1
        if not NAMED_READY:  # else V_last came with the signal for tile ``last``
            mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
        _take_turn(turn, n_blocks, ME, PINGPONG, NAMED_TURNS, NUM_WARPS)
        o = _rescale(o, gl.convert_layout(alpha, o_row_layout), LAZY)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        o_token = warpgroup_mma(p_op, v_smem.index(last % STAGES), o, is_async=True)
        _pass_last_turn(turn, ME, PINGPONG, NAMED_TURNS, NUM_WARPS)
        o, p_op = warpgroup_mma_wait(num_outstanding=0, deps=[o_token, p_op])
        _store_output_direct(o, l_i, out_ptr, b, h, m0, L, H, HEAD_DIM, BLOCK_M, o_layout)

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty,
                  q_row, q_col, k_row, k_col, v_row, v_col, m0, L,
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr, Q_TILES: gl.constexpr,
                  NAMED_RELEASE: gl.constexpr = False):
        """The 1-warp TMA partition: the Q tile(s) once, then K/V tiles as soon as their ring slot is
        empty (released by every consumer partition)."""
        q_rows: gl.constexpr = q_desc.block_type.shape[0]
        mbarrier.expect(q_ready, Q_TILES * q_desc.block_type.nbytes)
        for i in gl.static_range(Q_TILES):
            _tma_load(q_desc, [q_row + m0 + i * q_rows, q_col], q_ready, q_smem.index(i))
        n_blocks = gl.cdiv(L, BLOCK_N)
        for j in range(n_blocks):
            slot = j % STAGES
            # Round r of a slot waits for the consumers' r-th release; round 0 passes at once
            # (waiting on the parity before a fresh barrier's phase 0 completes immediately).
            if NAMED_RELEASE:
                if j >= STAGES:
                    _wait_named_release(j - STAGES)
            else:
                mbarrier.wait(kv_empty.index(slot), ((j // STAGES) & 1) ^ 1)
            _issue_kv_load(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, j, slot, k_row, k_col, v_row, v_col,
                           BLOCK_N, True)

    @gluon.jit
    def _attn_fwd_hopper(q_desc, k_desc, v_desc, out_ptr, L, H,
                         q_row_b, q_row_h, q_col_h, k_row_b, k_row_h, k_col_h, v_row_b, v_row_h, v_col_h,
                         qk_scale,
                         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                         NUM_WARPS: gl.constexpr, WARP_SPECIALIZE: gl.constexpr, SPLIT_CONSUMERS: gl.constexpr,
                         PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr, FA3_LOOP: gl.constexpr,
                         PINGPONG: gl.constexpr, NAMED_TURNS: gl.constexpr, NAMED_RELEASE: gl.constexpr,
                         NAMED_READY: gl.constexpr, LAZY_RESCALE: gl.constexpr):
        """Program (query tile, batch * head). Token n of (b, h) is row b*row_b + h*row_h + n, column
        h*col_h of each tensor's 2-D view (see ``talkgen.kernels.layout.view_2d``).

        ``SPLIT_CONSUMERS``: each 64-row half of the tile belongs to its own 4-warp partition (the
        default one and a worker), so the barriers Triton puts around mbarrier arrives and waits
        span one warpgroup, never both: the two drift apart and overlap each other's softmax and
        GEMMs. Otherwise one 8-warp partition owns all rows (``NUM_WARPS`` warps)."""
        pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        m0 = pid_m * BLOCK_M
        q_row = b * q_row_b + h * q_row_h
        k_row = b * k_row_b + h * k_row_h
        v_row = b * v_row_b + h * v_row_h
        q_col = h * q_col_h
        k_col = h * k_col_h
        v_col = h * v_col_h

        dtype: gl.constexpr = q_desc.dtype
        Q_TILES: gl.constexpr = 2 if SPLIT_CONSUMERS else 1
        ROWS: gl.constexpr = BLOCK_M // Q_TILES  # query rows per consumer partition
        q_smem = gl.allocate_shared_memory(dtype, [Q_TILES, ROWS, HEAD_DIM], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # ping-pong only
        mbarrier.init(q_ready, count=1)
        mbarrier.init(turn.index(0), count=1)  # one arrive per pass (per partition, not per thread)
        mbarrier.init(turn.index(1), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=Q_TILES)  # one arrive per consumer partition
        fence_async_shared()  # barrier initialisation visible to the TMA unit before any copy

        # One call per partition layout, the argument lists written out in each: a tuple built once in
        # the kernel body would turn its constexpr members into tensors.
        if FA3_LOOP and NAMED_READY:
            gl.warp_specialize(
                [
                    (_consumer_fa3, (q_desc, k_desc, v_desc, out_ptr, q_smem.index(0), k_smem, v_smem, q_ready,
                                     k_ready, v_ready, kv_empty, turn, b, h, m0, L, H, qk_scale, ROWS, BLOCK_N,
                                     HEAD_DIM, STAGES, NUM_WARPS, 0, PINGPONG, NAMED_TURNS, NAMED_RELEASE, True,
                                     LAZY_RESCALE)),
                    (_consumer_fa3, (q_desc, k_desc, v_desc, out_ptr, q_smem.index(1), k_smem, v_smem, q_ready,
                                     k_ready, v_ready, kv_empty, turn, b, h, m0 + ROWS, L, H, qk_scale, ROWS, BLOCK_N,
                                     HEAD_DIM, STAGES, NUM_WARPS, 1, PINGPONG, NAMED_TURNS, NAMED_RELEASE, True,
                                     LAZY_RESCALE)),
                    (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty,
                                 q_row, q_col, k_row, k_col, v_row, v_col, m0, L, BLOCK_N, STAGES, Q_TILES, True)),
                    (_signaller, (q_ready, k_ready, v_ready, L, BLOCK_N, STAGES)),
                ],
                [NUM_WARPS, 1, 1],
                [CONSUMER_REGS, PRODUCER_REGS, PRODUCER_REGS],
            )
        elif FA3_LOOP:
            gl.warp_specialize(
                [
                    (_consumer_fa3, (q_desc, k_desc, v_desc, out_ptr, q_smem.index(0), k_smem, v_smem, q_ready,
                                     k_ready, v_ready, kv_empty, turn, b, h, m0, L, H, qk_scale, ROWS, BLOCK_N,
                                     HEAD_DIM, STAGES, NUM_WARPS, 0, PINGPONG, NAMED_TURNS, NAMED_RELEASE, False,
                                     LAZY_RESCALE)),
                    (_consumer_fa3, (q_desc, k_desc, v_desc, out_ptr, q_smem.index(1), k_smem, v_smem, q_ready,
                                     k_ready, v_ready, kv_empty, turn, b, h, m0 + ROWS, L, H, qk_scale, ROWS, BLOCK_N,
                                     HEAD_DIM, STAGES, NUM_WARPS, 1, PINGPONG, NAMED_TURNS, NAMED_RELEASE, False,
                                     LAZY_RESCALE)),
                    (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty,
                                 q_row, q_col, k_row, k_col, v_row, v_col, m0, L, BLOCK_N, STAGES, Q_TILES, NAMED_RELEASE)),
                ],
                [NUM_WARPS, 1],
                [CONSUMER_REGS, PRODUCER_REGS],
            )
        elif SPLIT_CONSUMERS:
            gl.warp_specialize(
                [
                    (_consumer, (q_desc, k_desc, v_desc, out_ptr, q_smem.index(0), k_smem, v_smem, q_ready, k_ready,
                                 v_ready, kv_empty, q_row, q_col, k_row, k_col, v_row, v_col, b, h, m0, L, H,
                                 qk_scale, ROWS, BLOCK_N, HEAD_DIM, STAGES, NUM_WARPS, False)),
                    (_consumer, (q_desc, k_desc, v_desc, out_ptr, q_smem.index(1), k_smem, v_smem, q_ready, k_ready,
                                 v_ready, kv_empty, q_row, q_col, k_row, k_col, v_row, v_col, b, h, m0 + ROWS, L, H,
                                 qk_scale, ROWS, BLOCK_N, HEAD_DIM, STAGES, NUM_WARPS, False)),
                    (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty,
                                 q_row, q_col, k_row, k_col, v_row, v_col, m0, L, BLOCK_N, STAGES, Q_TILES)),
                ],
                [NUM_WARPS, 1],
                [CONSUMER_REGS, PRODUCER_REGS],
            )
        elif WARP_SPECIALIZE:
            gl.warp_specialize(
                [
                    (_consumer, (q_desc, k_desc, v_desc, out_ptr, q_smem.index(0), k_smem, v_smem, q_ready, k_ready,
                                 v_ready, kv_empty, q_row, q_col, k_row, k_col, v_row, v_col, b, h, m0, L, H,
                                 qk_scale, ROWS, BLOCK_N, HEAD_DIM, STAGES, NUM_WARPS, False)),
                    (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty,
                                 q_row, q_col, k_row, k_col, v_row, v_col, m0, L, BLOCK_N, STAGES, Q_TILES)),
                ],
                [1],
                [PRODUCER_REGS],
            )
        else:
            _consumer(q_desc, k_desc, v_desc, out_ptr, q_smem.index(0), k_smem, v_smem, q_ready, k_ready, v_ready,
                      kv_empty, q_row, q_col, k_row, k_col, v_row, v_col, b, h, m0, L, H, qk_scale,
                      ROWS, BLOCK_N, HEAD_DIM, STAGES, NUM_WARPS, True)

    # --------------------------------------------------------------------------------------------
    # 8-bit kernel (SageAttention-2 style), ping-pong layout. Inputs are quantize_qkv's buffers:
    #   Q8 [B*H*LP, D] int8/e4m3, Q8[t] = round(q[t] / sq[t]), q_scale[t] = sq[t] * log2(e)/sqrt(D);
    #   K8 [B*H*LP, D] int8/e4m3, K8[t] = round((k[t] - mean_t k) / sk[blk(t)]), k_scale[blk] = sk[blk],
    #       one scale per block of BLOCK_N tokens (the kernel's K tile: LP is a multiple of 256,
    #       so a tile never straddles two heads or two scale blocks);
    #   VT8 [B*H*D, LP] e4m3, VT8[d, t] = (v[t, d] - mean_t v[:, d]) / sv[d];
    # rows / columns past L are zeros. Then, for query t and key u:
    #   score2(t, u) = q[t].k[u] * log2(e)/sqrt(D) (+ a per-row constant q[t].mean k, which the
    #                  softmax ignores: the smoothing) ~= (Q8[t].K8[u]) * q_scale[t] * k_scale[blk(u)]
    # so the raw 8-bit product only needs one per-row factor per K tile: row_scale = q_scale * sk.

    @gluon.jit
    def _softmax_core_fp8(x, m_i, l_i, row_scale, QK_INT8: gl.constexpr, P_SHIFT: gl.constexpr,
                          LAZY_THRESHOLD: gl.constexpr = 0.0):
        """Online softmax of one (already masked) block of 8-bit scores, base 2, float32 state.

        ``x``: int8 path: the float32 whose bits are ``0x4B400000 + s`` with s the int32 product
        (see ``_softmax_fp8``), i.e. exactly x = 1.5 * 2^23 + s (|s| <= 127 * 127 * 128 < 2^22);
        e4m3 path: s itself. Score in log2 units: (x - MAGIC) * row_scale (MAGIC = 1.5 * 2^23 or 0).
        Running max m in those units, unshifted.
        P = 2^P_SHIFT * exp2(score - m) in (0, 2^8]: with the shift, e4m3 (smallest subnormal 2^-9,
        normals from 2^-6, largest 448) keeps probabilities down to 2^-17 instead of flushing
        everything under 2^-9 to zero, and 256 < 448 never saturates. The same 2^8 multiplies l
        (the sum of these p) and O (the sum of p V), so it cancels in O / l.
        One FFMA per score: x * row_scale - off with off = MAGIC * row_scale + m - P_SHIFT per row.
        The FFMA rounds once, after the exact product; off is rounded to float32, an absolute error
        <= 2^-24 * |off| ~ 2^-24 * 6 * max|score| (|s| < 2^21 < MAGIC / 6): 1e-5 for scores of
        30 (log2 units), far below e4m3's 2^-4 relative rounding of P.
        ``LAZY_THRESHOLD`` > 0 (``Fp8Config.rescale_threshold`` with ``lazy_rescale``; 0 turns it off):
        the max moves only by more than that (see ``_softmax_core``)."""
        if QK_INT8:
            # Row max on x (exactly MAGIC + s, monotonic in s), minus MAGIC: exact (Sterbenz).
            row_max = (gl.max(x, axis=1) - 12582912.0) * row_scale
        else:
            row_max = gl.max(x, axis=1) * row_scale
        if LAZY_THRESHOLD > 0:
            m_new = gl.where(row_max > m_i + LAZY_THRESHOLD, row_max, m_i)  # m_i = -inf: row_max
        else:
            m_new = gl.maximum(m_i, row_max)
        if QK_INT8:
            off = row_scale * 12582912.0 + (m_new - P_SHIFT)
        else:
            off = m_new - P_SHIFT
        # -inf (masked column) * positive scale - off = -inf -> p = 0.
        p = gl.exp2(x * gl.expand_dims(row_scale, 1) - gl.expand_dims(off, 1))
        alpha = gl.exp2(m_i - m_new)  # m_i = -inf on the first block: alpha = 0; shift-free
        # l sums the float32 p (before its e4m3 rounding, as the tl kernel; SageAttention-2 too).
        l_i = l_i * alpha + gl.sum(p, axis=1)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _softmax_fp8(s, m_i, l_i, row_scale, n0, L, BLOCK_N: gl.constexpr, s_layout: gl.constexpr,
                     QK_INT8: gl.constexpr, P_SHIFT: gl.constexpr, LAZY_THRESHOLD: gl.constexpr = 0.0):
        """int32 / float32 scores of one K tile -> P (float32, times 2^P_SHIFT) and the new state.
        The whole softmax sits in both arms of the masking branch (the FA3 loop's fence, see
        ``_online_softmax_fenced``): ptxas keeps the P V wait that follows after the exp2s.

        int8 path, int32 -> float32 without the conversion instruction (the magic-number trick of
        the tl kernel's ``_i32_to_f32``): for |s| < 2^22 the int32 0x4B400000 + s is the bit
        pattern of the float 1.5 * 2^23 + s (exponent 23, s added to the mantissa), so one integer
        add gives x = MAGIC + s exactly; the - MAGIC is folded into the per-row offset of
        ``_softmax_core_fp8``."""
        if QK_INT8:
            x = (s + 0x4B400000).to(gl.float32, bitcast=True)
        else:
            x = s
        if n0 + BLOCK_N > L:  # the last K tile: K8 rows past L are zeros (score 0), not -inf: mask
            cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            x = gl.where(gl.expand_dims(cols < L, 0), x, -float("inf"))
            p, m_new, l_new, alpha = _softmax_core_fp8(x, m_i, l_i, row_scale, QK_INT8, P_SHIFT, LAZY_THRESHOLD)
        else:
            p, m_new, l_new, alpha = _softmax_core_fp8(x, m_i, l_i, row_scale, QK_INT8, P_SHIFT, LAZY_THRESHOLD)
        return p, m_new, l_new, alpha

    @gluon.jit
    def _p_operand_fp8(p, p_dtype: gl.constexpr, p_layout: gl.constexpr, KEY_PERMUTED: gl.constexpr):
        """P (float32, the S accumulator's layout) -> the e4m3 A operand of the P V wgmma.

        The accumulator and an 8-bit A operand hold different keys per thread: of each 16 keys, the
        accumulator gives a thread keys 2c, 2c+1, 8+2c, 9+2c (c = lane % 4), the A operand wants
        4c .. 4c+3, so the plain conversion exchanges registers between threads (per K tile and
        thread: 16 SHFL.IDX and 16 PRMT in the SASS). ``KEY_PERMUTED``: relabel the keys instead,
        key 16g + 8b3 + 4b2 + 2b1 + b0 -> 16g + 8b2 + 4b1 + 2b3 + b0 (a bit permutation, so a
        reshape and a permute). That puts every thread's own values where the A operand wants them
        (the conversion is checked to move no data between threads), and P V stays the same sum
        over keys as long as V^T's columns are stored in the same order
        (``quantize_qkv(..., wgmma_key_order=True)``)."""
        p8 = p.to(p_dtype)
        if KEY_PERMUTED:
            rows: gl.constexpr = p.shape[0]
            keys: gl.constexpr = p.shape[1]
            p8 = gl.reshape(p8, [rows, keys // 16, 2, 2, 2, 2])  # [row, g, b3, b2, b1, b0]
            p8 = gl.reshape(gl.permute(p8, [0, 1, 3, 4, 2, 5]), [rows, keys])  # [row, g, b2, b1, b3, b0]
            return gl.convert_layout(p8, p_layout, assert_trivial=True)
        else:
            return gl.convert_layout(p8, p_layout)

    @gluon.jit
    def _store_output_fp8(o, l_i, v_scale_ptr, v_mean_ptr, out_ptr, bh, b, h, m0, L, H, HEAD_DIM: gl.constexpr,
                          BLOCK_M: gl.constexpr, o_layout: gl.constexpr):
        """out[t, d] = O[t, d] / l[t] * sv[d] + mean_v[d], straight from the wgmma layout.

        O = sum_u 2^8 p(t, u) VT8[d, u] and l = sum_u 2^8 p(t, u): the 2^8 cancels, O / l is the
        softmax-weighted mean of the smoothed, scaled V; times sv undoes the scale and, the weights
        summing to 1, adding mean_v undoes the smoothing (exactly so for the float32 p; the e4m3
        rounding of p, whose sum is not l, leaves an error proportional to |mean_v|)."""
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        v_scale = gl.load(v_scale_ptr + bh * HEAD_DIM + cols)
        v_mean = gl.load(v_mean_ptr + bh * HEAD_DIM + cols)
        inv_l = 1.0 / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        o = (o * gl.expand_dims(inv_l, 1)) * gl.expand_dims(v_scale, 0) + gl.expand_dims(v_mean, 0)
        rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        row_offsets = ((b * L + rows).to(gl.int64) * H + h) * HEAD_DIM
        offsets = gl.expand_dims(row_offsets, 1) + gl.expand_dims(cols, 0)
        gl.store(out_ptr + offsets, o.to(out_ptr.dtype.element_ty), mask=gl.expand_dims(rows < L, 1))

    @gluon.jit
    def _consumer_fp8(out_ptr, q_scale_ptr, k_scale_ptr, v_scale_ptr, v_mean_ptr, q_smem, k_smem, v_smem,
                      q_ready, k_ready, v_ready, kv_empty, turn, bh, b, h, m0, L, H, LP,
                      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                      NUM_WARPS: gl.constexpr, ME: gl.constexpr, QK_INT8: gl.constexpr, P_SHIFT: gl.constexpr,
                      NAMED_TURNS: gl.constexpr = False, NAMED_SYNC: gl.constexpr = False,
                      LAZY_THRESHOLD: gl.constexpr = 0.0, KEY_PERMUTED: gl.constexpr = False):
        """One 64-row consumer warpgroup of the 8-bit kernel: ``_consumer_fa3``'s loop with ping-pong
        turns, 8-bit operands (wgmma K = 32 per instruction: ``instr_shape`` [16, N, 32], P's
        register operand packs 4 bytes per 32-bit register: ``k_width=4``):

            S_j = Q8 K8_j^T                      (int8 -> s32, or e4m3 -> f32; both from shared)
            P_j = 2^8 exp2(S_j * q_scale * sk_j - m)   (float32, then e4m3 in registers)
            O  += P_{j-1} VT8_{j-1}^T             (e4m3 x e4m3 -> f32; V^T tile [D, BLOCK_N] in shared,
                                                   permuted to the K-major [BLOCK_N, D] operand that
                                                   8-bit wgmma requires for B)

        O stays in the wgmma's float32 accumulator across all K tiles (the tl kernel's
        ``FP8_FAST_CONFIG``, ``two_level=False``)."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                           instr_shape=[16, BLOCK_N, 32])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                           instr_shape=[16, HEAD_DIM, 32])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        o_row_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
        p_dtype: gl.constexpr = v_smem.dtype
        n_blocks = gl.cdiv(L, BLOCK_N)

        if QK_INT8:
            s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_layout)
        else:
            s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        o = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        m_i = gl.full([BLOCK_M], -float("inf"), gl.float32, row_layout)
        l_i = gl.zeros([BLOCK_M], gl.float32, row_layout)
        # Per-token Q scales of this warpgroup's rows (m0 + 64 <= LP: LP is a multiple of 256) and
        # the per-block K scales of this head (LP / BLOCK_N of them).
        q_scale = gl.load(q_scale_ptr + bh * LP + m0 + gl.arange(0, BLOCK_M, layout=row_layout))
        k_scale_head = k_scale_ptr + bh * (LP // BLOCK_N)

        _open_turns(ME, True, NAMED_TURNS, NUM_WARPS)

        # Turn 0: S_0 alone.
        sk = gl.load(k_scale_head)
        if NAMED_SYNC:
            _wait_named_ready(0, ME, NUM_WARPS)  # Q, K_0 and V_0
        else:
            mbarrier.wait(q_ready, 0)
            mbarrier.wait(k_ready.index(0), 0)
        _take_turn(turn, 0, ME, True, NAMED_TURNS, NUM_WARPS)
        s_token = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        _pass_turn(turn, ME, True, NAMED_TURNS, NUM_WARPS)
        s = warpgroup_mma_wait(num_outstanding=0, deps=[s_token])
        p, m_i, l_i, alpha = _softmax_fp8(s, m_i, l_i, q_scale * sk, 0, L, BLOCK_N, s_layout, QK_INT8, P_SHIFT,
                                          LAZY_THRESHOLD)

        for j in range(1, n_blocks):  # turn j
            slot = j % STAGES
            prev = (j - 1) % STAGES
            sk = gl.load(k_scale_head + j)  # issued early: its latency hides behind the waits and S_j
            if NAMED_SYNC:
                _wait_named_ready(j, ME, NUM_WARPS)  # K_j and V_j
            else:
                mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
                mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
            _take_turn(turn, j, ME, True, NAMED_TURNS, NUM_WARPS)
            s_token = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False,
                                    is_async=True)
            o = _rescale(o, gl.convert_layout(alpha, o_row_layout), LAZY_THRESHOLD > 0)
            # p <= 2^8 < 448: the rounding conversion (cvt.rn.satfinite) never saturates.
            p_op = _p_operand_fp8(p, p_dtype, p_layout, KEY_PERMUTED)
            o_token = warpgroup_mma(p_op, v_smem.index(prev).permute((1, 0)), o, is_async=True)
            _pass_turn(turn, ME, True, NAMED_TURNS, NUM_WARPS)
            s = warpgroup_mma_wait(num_outstanding=1, deps=[s_token])
            p, m_i, l_i, alpha = _softmax_fp8(s, m_i, l_i, q_scale * sk, j * BLOCK_N, L, BLOCK_N, s_layout,
                                              QK_INT8, P_SHIFT, LAZY_THRESHOLD)
            # deps: only the accumulator. Triton (3.6 and 3.9) cannot lower 8-bit register deps
            # ("Unexpected bitwidth in WGMMAWaitGroupOp: 8"). P's registers need no LLVM-level
            # keep-alive: p_op is not used after the issue, its next definition (iteration j + 1)
            # comes after this wait, and ptxas itself keeps a wgmma's register operands allocated
            # until the wait_group that retires it (PTX ISA: modifying them earlier is undefined,
            # so ptxas tracks them, as for CUTLASS's register-A fp8 GEMMs).
            o = warpgroup_mma_wait(num_outstanding=0, deps=[o_token])
            if NAMED_SYNC:
                if j - 1 + STAGES < n_blocks:  # the producer waits only for slots it refills
                    _release_named(j - 1, NUM_WARPS)
            else:
                mbarrier.arrive(kv_empty.index(prev), count=1)  # slot j-1 read by this consumer

        # Turn n_blocks: the last P V.
        last = n_blocks - 1
        if not NAMED_SYNC:  # else V_last came with the signal for tile ``last``
            mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
        _take_turn(turn, n_blocks, ME, True, NAMED_TURNS, NUM_WARPS)
        o = _rescale(o, gl.convert_layout(alpha, o_row_layout), LAZY_THRESHOLD > 0)
        p_op = _p_operand_fp8(p, p_dtype, p_layout, KEY_PERMUTED)
        o_token = warpgroup_mma(p_op, v_smem.index(last % STAGES).permute((1, 0)), o, is_async=True)
        _pass_last_turn(turn, ME, True, NAMED_TURNS, NUM_WARPS)
        o = warpgroup_mma_wait(num_outstanding=0, deps=[o_token])
        _store_output_fp8(o, l_i, v_scale_ptr, v_mean_ptr, out_ptr, bh, b, h, m0, L, H, HEAD_DIM, BLOCK_M,
                          o_layout)

    @gluon.jit
    def _producer_fp8(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty,
                      bh, m0, L, LP, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HEAD_DIM: gl.constexpr,
                      NAMED_RELEASE: gl.constexpr = False):
        """``_producer`` for quantize_qkv's buffers: Q8 / K8 tiles at row bh * LP + token, the V^T
        tile of tokens n0 .. n0 + BLOCK_N at [bh * D, n0] (never out of bounds: L <= LP)."""
        q_rows: gl.constexpr = q_desc.block_type.shape[0]
        mbarrier.expect(q_ready, 2 * q_desc.block_type.nbytes)
        for i in gl.static_range(2):
            _tma_load(q_desc, [bh * LP + m0 + i * q_rows, 0], q_ready, q_smem.index(i))
        n_blocks = gl.cdiv(L, BLOCK_N)
        for j in range(n_blocks):
            slot = j % STAGES
            if NAMED_RELEASE:
                if j >= STAGES:
                    _wait_named_release(j - STAGES)
            else:
                mbarrier.wait(kv_empty.index(slot), ((j // STAGES) & 1) ^ 1)  # round 0 passes at once
            n0 = j * BLOCK_N
            mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
            _tma_load(k_desc, [bh * LP + n0, 0], k_ready.index(slot), k_smem.index(slot))
            mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
            _tma_load(v_desc, [bh * HEAD_DIM, n0], v_ready.index(slot), v_smem.index(slot))

    @gluon.jit
    def _attn_fwd_fp8_hopper(q_desc, k_desc, v_desc, out_ptr, q_scale_ptr, k_scale_ptr, v_scale_ptr, v_mean_ptr,
                             L, H, LP,
                             BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                             STAGES: gl.constexpr, NUM_WARPS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                             CONSUMER_REGS: gl.constexpr, QK_INT8: gl.constexpr, P_SHIFT: gl.constexpr,
                             NAMED_TURNS: gl.constexpr, NAMED_SYNC: gl.constexpr, LAZY_THRESHOLD: gl.constexpr,
                             KEY_PERMUTED: gl.constexpr):
        """Program (query tile, batch * head) of the 8-bit kernel: ``_attn_fwd_hopper``'s ping-pong
        layout (producer warp, two 64-row consumer warpgroups taking turns) on 8-bit tiles."""
        pid_m = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // H
        h = bh % H
        m0 = pid_m * BLOCK_M
        ROWS: gl.constexpr = BLOCK_M // 2
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, ROWS, HEAD_DIM], q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, HEAD_DIM, BLOCK_N], v_desc.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_ready, count=1)
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=2)  # one arrive per consumer partition
        fence_async_shared()

        # The argument lists written out per call, as in _attn_fwd_hopper (constexprs in a shared tuple
        # would become tensors).
        if NAMED_SYNC:
            gl.warp_specialize(
                [
                    (_consumer_fp8, (out_ptr, q_scale_ptr, k_scale_ptr, v_scale_ptr, v_mean_ptr, q_smem.index(0),
                                     k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty, turn, bh, b, h, m0, L, H, LP,
                                     ROWS, BLOCK_N, HEAD_DIM, STAGES, NUM_WARPS, 0, QK_INT8, P_SHIFT, NAMED_TURNS,
                                     True, LAZY_THRESHOLD, KEY_PERMUTED)),
                    (_consumer_fp8, (out_ptr, q_scale_ptr, k_scale_ptr, v_scale_ptr, v_mean_ptr, q_smem.index(1),
                                     k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty, turn, bh, b, h, m0 + ROWS, L,
                                     H, LP, ROWS, BLOCK_N, HEAD_DIM, STAGES, NUM_WARPS, 1, QK_INT8, P_SHIFT,
                                     NAMED_TURNS, True, LAZY_THRESHOLD, KEY_PERMUTED)),
                    (_producer_fp8, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready,
                                     kv_empty, bh, m0, L, LP, BLOCK_N, STAGES, HEAD_DIM, True)),
                    (_signaller, (q_ready, k_ready, v_ready, L, BLOCK_N, STAGES)),
                ],
                [NUM_WARPS, 1, 1],
                [CONSUMER_REGS, PRODUCER_REGS, PRODUCER_REGS],
            )
        else:
            gl.warp_specialize(
                [
                    (_consumer_fp8, (out_ptr, q_scale_ptr, k_scale_ptr, v_scale_ptr, v_mean_ptr, q_smem.index(0),
                                     k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty, turn, bh, b, h, m0, L, H, LP,
                                     ROWS, BLOCK_N, HEAD_DIM, STAGES, NUM_WARPS, 0, QK_INT8, P_SHIFT, NAMED_TURNS,
                                     False, LAZY_THRESHOLD, KEY_PERMUTED)),
                    (_consumer_fp8, (out_ptr, q_scale_ptr, k_scale_ptr, v_scale_ptr, v_mean_ptr, q_smem.index(1),
                                     k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty, turn, bh, b, h, m0 + ROWS, L,
                                     H, LP, ROWS, BLOCK_N, HEAD_DIM, STAGES, NUM_WARPS, 1, QK_INT8, P_SHIFT,
                                     NAMED_TURNS, False, LAZY_THRESHOLD, KEY_PERMUTED)),
                    (_producer_fp8, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready,
                                     kv_empty, bh, m0, L, LP, BLOCK_N, STAGES, HEAD_DIM)),
                ],
                [NUM_WARPS, 1],
                [CONSUMER_REGS, PRODUCER_REGS],
            )


# ------------------------------------------------------------------------------------------------
# Host side


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if not GLUON_AVAILABLE:
        raise RuntimeError("triton.experimental.gluon with the Hopper module is not available")
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"self-attention needs q, k, v of one shape [B, H, L, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] not in (64, 128):
        raise ValueError(f"head_dim {q.shape[-1]} is not supported (64 or 128)")
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one 16-bit float dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def _gl_dtype(dtype: torch.dtype):
    return gl.bfloat16 if dtype == torch.bfloat16 else gl.float16


def _constexprs(config: Config, head_dim: int) -> dict:
    return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, HEAD_DIM=head_dim, STAGES=config.stages,
                NUM_WARPS=config.num_warps, WARP_SPECIALIZE=config.warp_specialize,
                SPLIT_CONSUMERS=config.split_consumers, PRODUCER_REGS=config.producer_regs,
                CONSUMER_REGS=config.consumer_regs, FA3_LOOP=config.fa3_loop, PINGPONG=config.pingpong,
                NAMED_TURNS=config.named_turns, NAMED_RELEASE=config.named_release, NAMED_READY=config.named_ready,
                LAZY_RESCALE=config.lazy_rescale)


def _q_block_rows(config: Config) -> int:
    """Rows of one Q tile: the whole query tile, or its half per consumer partition when split."""
    return config.block_m // 2 if config.split_consumers else config.block_m


def _validate(config: Config) -> None:
    if config.num_warps * 16 != _q_block_rows(config):
        raise ValueError(f"{config}: num_warps must be (rows per consumer partition) / 16: 16 query rows per warp")
    if config.split_consumers and not config.warp_specialize:
        raise ValueError(f"{config}: split_consumers needs warp_specialize")
    if (config.fa3_loop or config.pingpong) and not config.split_consumers:
        raise ValueError(f"{config}: fa3_loop / pingpong need split_consumers")
    if config.pingpong and not config.fa3_loop:
        raise ValueError(f"{config}: pingpong needs fa3_loop")
    if config.named_turns and not (config.pingpong and config.num_warps == 4):
        raise ValueError(f"{config}: named_turns needs pingpong with two 4-warp consumers (256 threads)")
    if config.named_release and not config.named_turns:
        raise ValueError(f"{config}: named_release needs named_turns (its two-barrier rotation relies on the turns)")
    if config.named_release and config.stages > 3:
        # With a 4th slot, a consumer could release tile t + 2 before the producer syncs for tile t
        # on the same named barrier (see _release_named).
        raise ValueError(f"{config}: named_release needs at most 3 stages")
    if config.lazy_rescale and not config.fa3_loop:
        raise ValueError(f"{config}: lazy_rescale exists in the FA3 loop only")
    if config.named_ready and not config.named_release:
        raise ValueError(f"{config}: named_ready needs named_release (the same at-most-3-stages argument)")


def attention_bf16_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         config: Config = DEFAULT_CONFIG) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for bf16/fp16 ``[B, H, L, D]`` CUDA tensors on Hopper; returns
    ``[B, H, L, D]`` (a view of a ``[B, L, H, D]`` buffer)."""
    _check(q, k, v)
    _validate(config)
    # Layouts a 2-D descriptor cannot address are copied to [B, H, L, D] (rare).
    q, k, v = (t if view_2d(t) is not None else t.contiguous() for t in (q, k, v))
    B, H, L, D = q.shape
    out = torch.empty(B, L, H, D, dtype=q.dtype, device=q.device)
    element = _gl_dtype(q.dtype)
    descriptors, coordinates = [], []
    for t, rows in ((q, _q_block_rows(config)), (k, config.block_n), (v, config.block_n)):
        shape, strides, row_b, row_h, col_h = view_2d(t)
        layout = gl.NVMMASharedLayout.get_default_for([rows, D], element)
        descriptors.append(TensorDescriptor(t, shape, strides, [rows, D], layout))
        coordinates += [row_b, row_h, col_h]
    grid = (triton.cdiv(L, config.block_m), B * H)
    _attn_fwd_hopper[grid](*descriptors, out, L, H, *coordinates, LOG2E / math.sqrt(D),
                           **_constexprs(config, D), num_warps=config.num_warps)
    return out.transpose(1, 2)


def compile_for_hopper(config: Config = DEFAULT_CONFIG, head_dim: int = 128, dtype: torch.dtype = torch.bfloat16):
    """Compile the kernel for sm_90a without a GPU (Triton's own ptxas); returns the compiled
    kernel (``.asm['ptx']``, ``.n_regs``, ``.n_spills``, ``.metadata.shared``). For tests and
    for checking register / shared-memory use on machines without a Hopper GPU."""
    if not GLUON_AVAILABLE:
        raise RuntimeError("triton.experimental.gluon with the Hopper module is not available")
    _validate(config)
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    element = _gl_dtype(dtype)
    # A meta tensor stands in for the data: only dtype, shape and strides enter the signature.
    fake = torch.empty(1, dtype=dtype, device="meta")
    signature = {}
    for name, rows in (("q_desc", _q_block_rows(config)), ("k_desc", config.block_n), ("v_desc", config.block_n)):
        layout = gl.NVMMASharedLayout.get_default_for([rows, head_dim], element)
        signature[name] = mangle_type(TensorDescriptor(fake.expand(4096, 5120), [4096, 5120], [5120, 1],
                                                       [rows, head_dim], layout))
    signature["out_ptr"] = mangle_type(fake)
    for name in ("L", "H", "q_row_b", "q_row_h", "q_col_h", "k_row_b", "k_row_h", "k_col_h", "v_row_b", "v_row_h",
                 "v_col_h"):
        signature[name] = "i32"
    signature["qk_scale"] = "fp32"
    constexprs = _constexprs(config, head_dim)
    for name in constexprs:
        signature[name] = "constexpr"
    source = GluonASTSource(_attn_fwd_hopper, signature, constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": config.num_warps})


# ------------------------------------------------------------------------------------------------
# 8-bit kernel, host side

P_SHIFT = P_SHIFT_DEFAULT  # what emulate_fp8_kernel and the tests assume
I32_F32_MAGIC = 0x4B400000  # bits of the float 1.5 * 2^23: bits(MAGIC) + s == float(1.5 * 2^23 + s) for |s| < 2^22
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on an H100


def fp8_shared_bytes(config: Fp8Config, head_dim: int = 128) -> int:
    """Shared memory of the 8-bit kernel: the Q tile (two 64-row halves), ``stages`` K tiles
    [block_n, D] and V^T tiles [D, block_n] of one byte per element, and its 8-byte mbarriers
    (Q, K / V ready and slot-empty per stage, two turns). The compiler may add alignment padding
    (the compile test checks how much)."""
    tiles = config.block_m * head_dim + config.stages * 2 * config.block_n * head_dim
    return tiles + 8 * (1 + 3 * config.stages + 2)


def _validate_fp8(config: Fp8Config, head_dim: int = 128) -> None:
    largest_p = 2 ** (config.p_shift + (config.rescale_threshold if config.lazy_rescale else 0.0))
    if largest_p > E4M3_MAX:
        raise ValueError(f"{config}: P reaches 2^(p_shift + rescale_threshold) = {largest_p:g}, over e4m3's "
                         f"{E4M3_MAX:g}")
    if config.block_m != 128 or config.num_warps != 4:
        raise ValueError(f"{config}: the 8-bit kernel has two 64-row consumer warpgroups: block_m 128, num_warps 4")
    if config.block_n not in (64, 128, 256):
        raise ValueError(f"{config}: block_n must be 64, 128 or 256 (a divisor of quantize_qkv's 256-token padding)")
    if config.stages < 2:
        raise ValueError(f"{config}: the K/V ring needs at least 2 stages")
    if fp8_shared_bytes(config, head_dim) > SHARED_LIMIT:
        raise ValueError(f"{config}: {fp8_shared_bytes(config, head_dim)} B of shared memory > {SHARED_LIMIT}")
    if config.named_sync and not (config.named_turns and config.stages <= 3):
        raise ValueError(f"{config}: named_sync needs named_turns and at most 3 stages (see _release_named)")


def _fp8_constexprs(config: Fp8Config, head_dim: int) -> dict:
    return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, HEAD_DIM=head_dim, STAGES=config.stages,
                NUM_WARPS=config.num_warps, PRODUCER_REGS=config.producer_regs, CONSUMER_REGS=config.consumer_regs,
                QK_INT8=config.qk_int8, P_SHIFT=config.p_shift, NAMED_TURNS=config.named_turns,
                NAMED_SYNC=config.named_sync, LAZY_THRESHOLD=config.rescale_threshold if config.lazy_rescale else 0.0,
                KEY_PERMUTED=config.key_permuted_v)


def _fp8_layouts(config: Fp8Config, head_dim: int):
    """(element type, block shape, shared layout) of the Q8, K8 and VT8 descriptors."""
    qk = gl.int8 if config.qk_int8 else gl.float8e4nv
    blocks = ((qk, [config.block_m // 2, head_dim]), (qk, [config.block_n, head_dim]),
              (gl.float8e4nv, [head_dim, config.block_n]))
    return [(el, block, gl.NVMMASharedLayout.get_default_for(block, el)) for el, block in blocks]


def attention_fp8_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        config: Fp8Config | None = None) -> torch.Tensor:
    """8-bit (SageAttention-2 style) softmax(q k^T / sqrt(D)) v for bf16/fp16 ``[B, H, L, 128]``
    CUDA tensors on Hopper; returns ``[B, H, L, D]`` in the input dtype (a view of a
    ``[B, L, H, D]`` buffer). ``TALKGEN_ATTENTION=gluon-fp8`` calls it with ``FP8_DEFAULT_CONFIG``
    (GPU figures in the module docstring and docs/performance.md).

    Quantization is ``attention_triton.quantize_qkv`` (three small Triton kernels, part of the
    call's time). Its buffers suit TMA descriptors as they are, no adapter: Q8 / K8 are row-major
    [B*H*LP, D] (128-byte rows), VT8 row-major [B*H*D, LP] (LP a multiple of 256, so 16-byte
    aligned rows), contiguous, zero-padded to LP tokens per head, so no tile crosses a head."""
    config = config or FP8_VARIANTS[0]
    _check(q, k, v)
    if q.shape[-1] != 128:
        raise ValueError(f"the 8-bit Gluon kernel supports head_dim 128 only; got {q.shape[-1]}")
    _validate_fp8(config)
    from talkgen.kernels.attention_triton import quantize_qkv  # imports triton's tl at module level

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, L, D = q.shape
    qd = quantize_qkv(q, k, v, config.block_n, qk_int8=config.qk_int8, pv_fp8=True,
                      wgmma_key_order=config.key_permuted_v)
    LP = qd["LP"]
    out = torch.empty(B, L, H, D, dtype=q.dtype, device=q.device)
    (_, q_block, q_layout), (_, k_block, k_layout), (_, v_block, v_layout) = _fp8_layouts(config, D)
    q_desc = TensorDescriptor(qd["q8"], [B * H * LP, D], [D, 1], q_block, q_layout)
    k_desc = TensorDescriptor(qd["k8"], [B * H * LP, D], [D, 1], k_block, k_layout)
    v_desc = TensorDescriptor(qd["vt8"], [B * H * D, LP], [LP, 1], v_block, v_layout)
    grid = (triton.cdiv(L, config.block_m), B * H)
    _attn_fwd_fp8_hopper[grid](q_desc, k_desc, v_desc, out, qd["q_scale"], qd["k_scale"], qd["v_scale"],
                               qd["v_mean"], L, H, LP, **_fp8_constexprs(config, D), num_warps=config.num_warps)
    return out.transpose(1, 2)


def compile_fp8_for_hopper(config: Fp8Config | None = None, head_dim: int = 128,
                           dtype: torch.dtype = torch.bfloat16):
    """``compile_for_hopper`` for the 8-bit kernel (``dtype``: the output's)."""
    config = config or FP8_VARIANTS[0]
    if not GLUON_AVAILABLE:
        raise RuntimeError("triton.experimental.gluon with the Hopper module is not available")
    _validate_fp8(config, head_dim)
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    torch_types = {gl.int8: torch.int8, gl.float8e4nv: torch.float8_e4m3fn}
    signature = {}
    for name, (el, block, layout) in zip(("q_desc", "k_desc", "v_desc"), _fp8_layouts(config, head_dim)):
        fake = torch.empty(1, dtype=torch_types[el], device="meta").expand(4096, 4096)
        signature[name] = mangle_type(TensorDescriptor(fake, [4096, 4096], [4096, 1], block, layout))
    signature["out_ptr"] = mangle_type(torch.empty(1, dtype=dtype, device="meta"))
    for name in ("q_scale_ptr", "k_scale_ptr", "v_scale_ptr", "v_mean_ptr"):
        signature[name] = mangle_type(torch.empty(1, dtype=torch.float32, device="meta"))
    for name in ("L", "H", "LP"):
        signature[name] = "i32"
    constexprs = _fp8_constexprs(config, head_dim)
    for name in constexprs:
        signature[name] = "constexpr"
    source = GluonASTSource(_attn_fwd_fp8_hopper, signature, constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": config.num_warps})


# ------------------------------------------------------------------------------------------------
# The 8-bit kernel's arithmetic in plain torch (CPU tests; on the GPU, a reference that separates
# kernel bugs from quantization error)


def quantize_qkv_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int,
                           qk_int8: bool = True, wgmma_key_order: bool = False) -> dict:
    """torch twin of ``attention_triton.quantize_qkv(..., pv_fp8=True)``: the same buffers (Q8 / K8
    [B*H*LP, D], VT8 [B*H*D, LP], zero-padded to LP = a multiple of 256 tokens; with
    ``wgmma_key_order``, VT8's columns in ``layout.wgmma_key_column``) and scales, computed the same
    way up to float rounding (the Triton pre-pass needs a GPU)."""
    B, H, L, D = q.shape
    LP = -(-L // 256) * 256
    qmax = 127.0 if qk_int8 else 448.0
    qk_dtype = torch.int8 if qk_int8 else torch.float8_e4m3fn

    def pad(x):  # [B, H, L, D] float32 -> [B*H, LP, D], zeros past L
        return torch.nn.functional.pad(x, (0, 0, 0, LP - L)).reshape(B * H, LP, D)

    def to_8bit(x):
        if qk_int8:  # round half away from zero, as _quant_rows
            return torch.where(x >= 0, x + 0.5, x - 0.5).trunc().to(torch.int8)
        return x.to(qk_dtype)

    qf = pad(q.float())
    kf = pad(k.float() - k.float().mean(dim=2, keepdim=True))
    sq = qf.abs().amax(-1).clamp_min(1e-20) / qmax  # [B*H, LP] per token
    sk = kf.reshape(B * H, LP // block_n, block_n * D).abs().amax(-1).clamp_min(1e-20) / qmax  # per block
    q8 = to_8bit(qf / sq[..., None])
    k8 = to_8bit(kf / sk.repeat_interleave(block_n, 1)[..., None])
    v_mean = v.float().mean(dim=2)  # [B, H, D]
    v_min, v_max = torch.aminmax(v, dim=2)
    v_scale = torch.maximum(v_max.float() - v_mean, v_mean - v_min.float()).clamp_min(1e-20) / 448.0
    vt = pad((v.float() - v_mean[:, :, None]) / v_scale[:, :, None])
    vt8 = vt.transpose(1, 2).contiguous().to(torch.float8_e4m3fn)  # [B*H, D, LP]
    if wgmma_key_order:  # column wgmma_key_column(n) holds token n
        bytes_ = vt8.view(torch.uint8)  # index_copy_ has no float8 kernel
        vt8 = torch.empty_like(bytes_).index_copy_(2, wgmma_key_column(torch.arange(LP)), bytes_).view(vt8.dtype)
    return dict(q8=q8.reshape(B * H * LP, D), k8=k8.reshape(B * H * LP, D),
                q_scale=(sq * (LOG2E / math.sqrt(D))).reshape(-1), k_scale=sk.reshape(-1), LP=LP,
                vt8=vt8.reshape(B * H * D, LP), v_mean=v_mean.contiguous(), v_scale=v_scale.contiguous(),
                vt8_key_order="wgmma" if wgmma_key_order else "natural")


def emulate_fp8_kernel(qd: dict, shape: tuple, block_n: int, qk_int8: bool = True,
                       dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """What ``_attn_fwd_fp8_hopper`` computes from quantized buffers ``qd`` (``quantize_qkv`` or
    ``quantize_qkv_reference``), K tile by K tile, in float32 with the kernel's formulas: the
    int32 scores through the magic-number float (``I32_F32_MAGIC``) and the per-row offset, the
    2^8-shifted P rounded to e4m3 for P V but summed unrounded into l, the epilogue
    O / l * sv + mean_v. Differences to the GPU: the tensor cores' fp8 accumulation (P V, and
    Q K^T on the e4m3 path) and the order of float32 sums. Returns [B, H, L, D] in ``dtype``."""
    B, H, L, D = shape
    LP = qd["LP"]
    dev = qd["q8"].device
    q8 = qd["q8"].view(B * H, LP, D)[:, :L].float()  # 8-bit values are exact in float32
    k8 = qd["k8"].view(B * H, LP, D).float()
    vt8 = qd["vt8"].view(B * H, D, LP).float()
    if qd.get("vt8_key_order") == "wgmma":  # back to token order (the sum over keys is the same)
        vt8 = vt8[:, :, wgmma_key_column(torch.arange(LP, device=dev))]
    q_scale = qd["q_scale"].view(B * H, LP)[:, :L]
    k_scale = qd["k_scale"].view(B * H, LP // block_n)
    magic = 12582912.0  # 1.5 * 2^23, the float whose bits are I32_F32_MAGIC
    m = torch.full((B * H, L), -float("inf"), device=dev)
    l = torch.zeros(B * H, L, device=dev)
    o = torch.zeros(B * H, L, D, device=dev)
    for n0 in range(0, L, block_n):
        s = q8 @ k8[:, n0:n0 + block_n].transpose(1, 2)  # integers < 2^22: exact in float32 (int8 path)
        row_scale = q_scale * k_scale[:, n0 // block_n, None]  # [B*H, L]
        if qk_int8:  # the kernel's bit trick, emulated on the integer
            x = (s.to(torch.int32) + I32_F32_MAGIC).view(torch.float32)
        else:
            x = s
        x = x.masked_fill((torch.arange(n0, n0 + block_n, device=dev) >= L)[None, None, :], -float("inf"))
        bias = magic if qk_int8 else 0.0
        m_new = torch.maximum(m, (x.amax(-1) - bias) * row_scale)
        off = row_scale * bias + (m_new - P_SHIFT)
        p = torch.exp2(x * row_scale[..., None] - off[..., None])
        alpha = torch.exp2(m - m_new)
        l = l * alpha + p.sum(-1)
        p8 = p.to(torch.float8_e4m3fn).float()
        o = o * alpha[..., None] + p8 @ vt8[:, :, n0:n0 + block_n].transpose(1, 2)
        m = m_new
    out = o / l[..., None] * qd["v_scale"].view(B * H, 1, D) + qd["v_mean"].view(B * H, 1, D)
    return out.view(B, H, L, D).to(dtype)
