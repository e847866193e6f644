"""Progress bars for long loops, silenced with ``UOE_NB_PROGRESS=0`` (tests do this) or ``TQDM_DISABLE=1``."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


_OFF = ("0", "false", "False", "")


def progress_enabled() -> bool:
    """Off when ``UOE_NB_PROGRESS`` is 0/false/empty or tqdm's own ``TQDM_DISABLE`` is set to a true value
    (tqdm reads that variable only when ``disable`` is not passed, and here it always is)."""
    if os.environ.get("TQDM_DISABLE", "0") not in _OFF:
        return False
    return os.environ.get("UOE_NB_PROGRESS", "1") not in _OFF


def progress(iterable: Iterable[T], *, desc: str | None = None, total: int | None = None, leave: bool = False):
    """``tqdm`` over ``iterable`` unless progress bars are switched off."""
    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=not progress_enabled())
