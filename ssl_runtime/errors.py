"""User-facing errors: one clear line instead of a traceback from deep inside.

A leaf of ssl_runtime (it imports none of its modules): what must happen when an entry point ends
(ssl_runtime.distributed's shutdown) is registered here by the module that owns it."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Callable, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2
EXIT_CRASH = 1

_at_end: list[Callable[[], None]] = []  # see at_entry_point_end


class UserError(Exception):
    """A problem the user can fix (bad flag, bad path, bad data). The message names the fix."""


def main_entry(fn: Callable[..., T]) -> Callable[..., T]:
    """Wrap an entry point so that a UserError prints `error: <message>` and exits with code 2.

    In a multi-process job the line names the rank (`error: [rank 1] ...`), any other exception
    is reported the same way after its traceback, and the process exits at once: its peers then
    see their collectives fail (instead of waiting for the process-group timeout) and stop too.
    An entry point that ends (returns, or stops with SystemExit) runs what at_entry_point_end
    registered: it destroys its process group (ssl_runtime.distributed registers its shutdown).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
            _end_entry_point()
            return result
        except SystemExit:  # a deliberate stop (SIGTERM: 143, a NaN loss)
            _end_entry_point()
            raise
        except UserError as exc:
            _report(f"error: {rank_tag()}{user_message(exc)}", EXIT_USER_ERROR)
        except Exception as exc:  # noqa: BLE001 - only re-labelled in multi-process jobs
            if not rank_tag():
                raise
            traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            _report(f"error: {rank_tag()}stopped by {type(exc).__name__}: {first} (when another "
                    "rank failed first, its own 'error: [rank N]' line gives the cause)", EXIT_CRASH)

    return wrapper


def at_entry_point_end(step: Callable[[], None]) -> None:
    """Run `step()` whenever an entry point wrapped by main_entry ends (returns, or SystemExit)."""
    if step not in _at_end:
        _at_end.append(step)


def _end_entry_point() -> None:
    for step in _at_end:
        step()


def _report(line: str, code: int) -> None:
    sys.stderr.write(line + "\n")  # not print(): non-main ranks may have it silenced
    sys.stderr.flush()
    if rank_tag():
        sys.stdout.flush()
        os._exit(code)  # no interpreter teardown that could wait on a dead peer
    sys.exit(code)


def rank_tag() -> str:
    """'[rank N] ' inside a multi-process job, '' otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return f"[rank {dist.get_rank()}] "
    # the group may already be gone (destroyed in a `finally`): ask the launcher's environment
    for rank, size in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if os.environ.get(rank, "").isdigit() and int(os.environ.get(size, "1") or 1) > 1:
            return f"[rank {os.environ[rank]}] "
    return ""


def user_message(exc: BaseException) -> str:
    """The user's one line, also when a DataLoader worker re-raised it wrapped in its traceback."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split("UserError: ", 1)[-1]
    return text
