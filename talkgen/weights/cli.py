"""`talkgen download` and `talkgen verify`, plus the weights part of `talkgen info`.

Registered by ``talkgen/cli.py`` (which wraps them in its error reporting). The heavy imports
(torch comes in with the manifest's WeightSet) happen inside the commands, so ``talkgen --help``
stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from talkgen.errors import WeightsError

if TYPE_CHECKING:
    from talkgen.weights.verify import WeightSetStatus

console = Console(stderr=True)
out = Console()


def _say(message: str, *, stdout: bool = False) -> None:
    # soft_wrap: commands and paths in messages are copied by people, so never break them across lines
    (out if stdout else console).print(message, soft_wrap=True, highlight=False, markup=False)


def download(
    weights_dir: Annotated[Path, typer.Option("--dir", "-d", help="weights directory (created if needed)")],
    model: Annotated[str, typer.Option(help="multitalk | infinitetalk")] = "multitalk",
    people: Annotated[str, typer.Option(help="InfiniteTalk weights: single | multi")] = "single",
    lora: Annotated[Optional[str], typer.Option(help="lightx2v | fusionx")] = None,
    quant: Annotated[Optional[str], typer.Option(help="fp8 | int8: upstream's pre-quantized DiT")] = None,
    tts: Annotated[bool, typer.Option("--tts", help="also Kokoro-82M, for speech from text")] = False,
    layout: Annotated[str, typer.Option(help="original | diffusers (the DiT from the -Diffusers repo)")] = "original",
    repair: Annotated[bool, typer.Option("--repair", help="download again files that differ from the Hub's")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say what would be downloaded; download nothing")] = False,
) -> None:
    """Download exactly the weight files a model needs from the Hugging Face Hub.

    Files already in place with the right size and hash are kept.
    An interrupted download resumes where it stopped when run again.
    Free disk space is checked first; HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE are honoured.
    Writes DIR/talkgen-lock.json (sizes and sha256) for `talkgen verify`.
    """
    from talkgen.weights.download import download_weights
    from talkgen.weights.manifest import Selection
    from talkgen.weights.verify import human_size, lock_path

    selection = Selection(model=model, people=people, lora=lora, quant=quant, tts=tts, layout=layout)
    try:
        result = download_weights(selection, weights_dir, repair=repair, dry_run=dry_run, report=_say)
    except KeyboardInterrupt:
        _say(f"stopped; `{selection.command(weights_dir)}` resumes where it stopped")
        raise
    if dry_run:
        for path in result.downloaded:
            _say(f"would download {path}", stdout=True)
        for conflict in result.conflicts:
            _say(f"differs from the Hub's, left untouched without --repair: {conflict}", stdout=True)
        return
    lock = lock_path(weights_dir.expanduser().absolute())
    _say(f"done: {len(result.downloaded)} file(s) downloaded ({human_size(result.needed_bytes)}), "
         f"{len(result.kept)} already in place; hashes in {lock}")  # fmt: skip


def verify(
    weights_dir: Annotated[Path, typer.Option("--dir", "-d", help="weights directory to check")],
    sizes_only: Annotated[bool, typer.Option("--sizes-only", help="check sizes only, skip hashing (fast)")] = False,
) -> None:
    """Re-check every downloaded weight file against DIR/talkgen-lock.json: present, size, sha256.

    Works offline; prints one line per file; exits non-zero when any file is missing or differs.
    """
    from talkgen.weights.verify import read_lock, verify_weights

    weights_dir = weights_dir.expanduser().absolute()
    total = 0 if sizes_only else sum(e.size for e in read_lock(weights_dir).values())
    columns = (TextColumn("hashing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=sizes_only) as bar:
        task = bar.add_task("hashing", total=total)
        checks = verify_weights(weights_dir, hashes=not sizes_only, progress=lambda n: bar.advance(task, n))
    for check in checks:
        _say(check.describe(weights_dir), stdout=True)
    problems = [c for c in checks if not c.ok]
    if problems:
        raise WeightsError(f"{len(problems)} of {len(checks)} weight files in {weights_dir} failed verification "
                           "(see above).")  # fmt: skip
    _say(f"all {len(checks)} files match the lock file{' (sizes only)' if sizes_only else ''}")


def describe_weights(weights_dir: Path) -> list[WeightSetStatus]:
    """For `talkgen info`: every weight set of the manifest, present / partial / missing, and what it enables."""
    from talkgen.weights.verify import describe_weights as describe

    return describe(weights_dir)


def weights_report(weights_dir: Path, *, all_sets: bool = False) -> list[str]:
    """`describe_weights` as lines to print (extras such as LoRAs only when some file is there)."""
    from talkgen.weights.verify import format_weights

    return format_weights(describe_weights(weights_dir), all_sets=all_sets)
