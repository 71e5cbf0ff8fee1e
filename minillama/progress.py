"""Progress bars for long work (training, evaluation, sweeps), on stderr and only for a person watching.

A bar is shown when stderr is a terminal, unless it was switched off: `progress=False` in the call,
`minillama --no-progress ...` on the command line, or the environment variable MINILLAMA_PROGRESS=0.
So test runs, CI logs and redirected output stay clean, and stdout keeps only the results.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

_enabled = True


def set_progress(enabled: bool) -> None:
    """Switch every progress bar of this process on (where stderr is a terminal) or off."""
    global _enabled
    _enabled = bool(enabled)


def progress_wanted(progress: bool = True) -> bool:
    """Whether a bar should be drawn: asked for, not switched off, and stderr is a terminal."""
    if not (progress and _enabled) or os.environ.get("MINILLAMA_PROGRESS", "1") == "0":
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress_bar(iterable=None, *, desc: str, total=None, progress: bool = True, unit: str = "it", **kwargs):
    """A tqdm bar on stderr (a silent one when `progress_wanted(progress)` is False); iterate or .update()."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=not progress_wanted(progress), **kwargs)
