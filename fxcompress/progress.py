"""Progress bars: tqdm where it is installed (the `criteria` extra), none otherwise, with one warning; shown on a
terminal only, so that logs (a redirected stderr) get no carriage-return updates."""
from __future__ import annotations

import warnings
from typing import Iterable

_warned = False


def bar(iterable: Iterable, label: str, enabled: bool = True, total: int | None = None, leave: bool = False
        ) -> Iterable:
    """`iterable` with a progress bar labelled `label` where `enabled` and tqdm imports; else `iterable` itself."""
    global _warned
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if not _warned:
            warnings.warn("progress bars need tqdm: pip install 'fxcompress[criteria]' (running without them)")
            _warned = True
        return iterable
    return tqdm(iterable, desc=label, total=total, leave=leave, disable=None)  # None: off where stderr is no tty
