"""Progress bars for long loops (feature extraction, evaluation) on rank 0 at a terminal."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from .distributed import is_main_process

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """tqdm on rank 0 when stdout is a terminal; the plain iterable otherwise (logs stay clean)."""
    if not (is_main_process() and sys.stdout.isatty()):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False)
