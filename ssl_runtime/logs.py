"""Rank-aware logging: console on rank 0 only, one file per rank."""

from __future__ import annotations

import builtins
import logging
import os
import sys

# Upstream MoBY's record formats (logger.py), kept so that existing log parsers keep working: the
# files' and the console's, which has no space between `]` and `(` (upstream colours the two parts;
# Huawei's collectors count the fields of the console's lines).
MOBY_FORMAT = "[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s"
MOBY_CONSOLE_FORMAT = "[%(asctime)s %(name)s](%(filename)s %(lineno)d): %(levelname)s %(message)s"


def setup_logger(name: str, output_dir: str | None = None, rank: int = 0, fmt: str | None = None,
                 filename: str | None = None) -> logging.Logger:
    """A logger writing to stdout on rank 0 and to <output_dir>/<filename> on every rank (fmt:
    both; by default upstream MoBY's console and file formats)."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for handler in list(logger.handlers):  # calling twice (tests, resume) must not duplicate lines
        logger.removeHandler(handler)
        handler.close()
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setLevel(logging.DEBUG)
        console.setFormatter(logging.Formatter(fmt or MOBY_CONSOLE_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        logger.addHandler(console)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, filename or f"log_rank{rank}.txt")
        file_handler = logging.FileHandler(path, mode="a")
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(logging.Formatter(fmt or MOBY_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        logger.addHandler(file_handler)
    return logger


def silence_non_main(is_main: bool) -> None:
    """Make print() a no-op on ranks other than 0 (as upstream DINO does); print(..., force=True)
    still prints everywhere."""
    original = builtins.print

    def rank_print(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_main or force:
            original(*args, **kwargs)

    builtins.print = rank_print
