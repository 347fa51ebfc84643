"""User-facing errors: one clear line instead of a traceback from deep inside."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem the user can fix (bad flag, bad path, bad data). The message names the fix."""


def main_entry(fn: Callable[..., T]) -> Callable[..., T]:
    """Wrap an entry point so that a UserError prints `error: <message>` and exits with code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            print(f"error: {user_message(exc)}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


def user_message(exc: BaseException) -> str:
    """The user's one line, also when a DataLoader worker re-raised it wrapped in its traceback."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split("UserError: ", 1)[-1]
    return text
