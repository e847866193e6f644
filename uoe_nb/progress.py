"""Progress bars for long loops, silenced with ``UOE_NB_PROGRESS=0`` (tests do this)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_enabled() -> bool:
    return os.environ.get("UOE_NB_PROGRESS", "1") not in ("0", "false", "False", "")


def progress(iterable: Iterable[T], *, desc: str | None = None, total: int | None = None, leave: bool = False):
    """``tqdm`` over ``iterable`` unless progress bars are switched off."""
    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=not progress_enabled())
