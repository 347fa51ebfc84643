"""Checkpoint files: atomic writes, clear errors on bad files, checked state-dict loading."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from .errors import UserError


def previous_path(path: str | os.PathLike) -> Path:
    """Where save_atomic(keep_previous=True) keeps the file it replaces: checkpoint.previous.pth."""
    path = Path(path)
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def save_atomic(obj, path: str | os.PathLike, keep_previous: bool = False) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over `path`.

    A crash or a full disk never leaves a half-written file under the final name: the previous
    checkpoint stays intact. With keep_previous the replaced file is renamed to
    previous_path(path) first, a fallback should the new one ever turn out unreadable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous and path.is_file():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write checkpoint {path} ({exc}); the previous checkpoint is "
                        "untouched. Free disk space or choose another output folder, then rerun "
                        "the same command to resume") from exc
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """torch.load with one clear message for a missing, truncated or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: check the path")
    try:
        # our checkpoints hold argparse/yacs objects, so the full unpickler is needed
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            AttributeError, ImportError, IndexError) as exc:
        raise UserError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); delete it or "
                        "point at an earlier checkpoint") from None


def load_first_readable(paths: Iterable[str | os.PathLike],
                        warn: Callable[[str], None] = print) -> tuple[dict, Path] | None:
    """The first of `paths` that exists and loads, warning about each unreadable one skipped.

    None when none exists; a UserError when files exist but none of them can be read.
    """
    existing = [Path(p) for p in dict.fromkeys(str(p) for p in paths) if Path(p).is_file()]
    for i, path in enumerate(existing):
        try:
            return load_checkpoint(path), path
        except UserError as exc:
            reason = str(exc).split("; delete it")[0]
            if i + 1 < len(existing):
                warn(f"warning: {reason}; falling back to {existing[i + 1]}")
    if existing:
        raise UserError(f"none of the checkpoints in {existing[0].parent} can be read "
                        f"({', '.join(p.name for p in existing)}): move them away to start from "
                        "scratch, or restore a good copy")
    return None


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> dict:
    """Remove wrapper prefixes (`module.`, `backbone.`, ...) wherever they lead a key."""
    prefixes = tuple(prefixes)
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def load_state_dict_checked(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                            what: str, strict: bool = True,
                            ignore_missing: Iterable[str] = ()) -> list[str]:
    """Load a state dict and explain every mismatch instead of loading part of it silently.

    Keys of the module starting with one of `ignore_missing` may be absent (e.g. a fresh head).
    Returns the list of missing keys that were allowed.
    """
    own = module.state_dict()
    ignore_missing = tuple(ignore_missing)
    missing = [k for k in own if k not in state_dict]
    allowed = [k for k in missing if ignore_missing and k.startswith(ignore_missing)]
    missing = [k for k in missing if k not in allowed]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
                   for k in state_dict if k in own and hasattr(state_dict[k], "shape")
                   and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing and strict:
        problems.append(f"{len(missing)} missing key(s): {_preview(missing)}")
    if unexpected and strict:
        problems.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatch(es) (file vs model): {_preview(wrong_shape)}")
    if problems:
        raise UserError(f"{what} does not match the model: " + "; ".join(problems) +
                        ". Check --arch / --patch_size (or the config) against the checkpoint, and "
                        "--checkpoint_key")
    module.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    return allowed


def _preview(keys: list[str], count: int = 6) -> str:
    shown = ", ".join(keys[:count])
    return shown + (f", ... (+{len(keys) - count} more)" if len(keys) > count else "")
