"""Checkpoint files: atomic writes, clear errors on bad files, checked state-dict loading."""

from __future__ import annotations

import contextlib
import os
import pickle
import pickletools
import re
import socket
import zipfile
from collections import deque
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping

import torch

from .errors import UserError


def previous_path(path: str | os.PathLike) -> Path:
    """Where save_atomic(keep_previous=True) keeps the file it replaces: checkpoint.previous.pth."""
    path = Path(path)
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def save_atomic(obj, path: str | os.PathLike, keep_previous: bool = False) -> None:
    """torch.save through atomic_file: a crash or a full disk never leaves a half-written file under
    the final name, the previous checkpoint stays intact. With keep_previous the replaced file is
    kept as previous_path(path), a fallback should the new one ever turn out unreadable."""
    try:
        with atomic_file(path, keep_previous) as handle:
            torch.save(obj, handle)
    except (OSError, RuntimeError) as exc:
        raise UserError(f"could not write checkpoint {path} ({exc}); the previous checkpoint is "
                        "untouched. Free disk space or choose another output folder, then rerun "
                        "the same command to resume") from exc


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, keep_previous: bool = False) -> Iterator[BinaryIO]:
    """A handle on temporary_path(path) that replaces `path` when the block ends: flushed to disk,
    then renamed over it (after renaming the old file to previous_path(path) with keep_previous).
    On any failure the temporary file is removed and the original error propagates: a removal that
    fails too (a read-only file system) never hides it."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous and path.is_file():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def temporary_path(path: Path) -> Path:
    """Hidden, beside `path`, named after the writing host and process, so that a later run can tell
    a killed writer's leftover (remove_stale_temporaries) from a live writer's file."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


# temporary_path's names (and the earlier `.<name>.tmp-<pid>`, without the host) of the files we write
_TEMPORARY = re.compile(r"\.(?P<name>.+\.(?:pth|safetensors))\.tmp-(?:(?P<host>[\w.-]+)-)?(?P<pid>\d+)")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of checkpoint writes whose process is gone (killed mid-write: each
    as large as a checkpoint); returns them. Never a live writer's, another host's (its process
    cannot be checked from here) or any other file."""
    removed = []
    for entry in Path(folder).iterdir():
        match = _TEMPORARY.fullmatch(entry.name)
        if not match or match["host"] not in (None, socket.gethostname()):
            continue
        if entry.is_symlink() or not entry.is_file() or _process_alive(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):  # another rank of this host removed it first
            entry.unlink()
            removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def prepare_output_dir(folder: str | os.PathLike, flag: str = "--output_dir") -> Path:
    """Create the output folder, check at start that files can be written into it (a read-only or
    otherwise unusable folder would first fail when the first checkpoint is saved, after an epoch),
    and remove stale temporaries of killed checkpoint writes."""
    folder = Path(folder)
    probe = folder / f".write-test-{socket.gethostname()}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"ok")
    except OSError as exc:
        raise UserError(f"cannot write into the output folder {folder} ({exc.strerror or exc}): "
                        f"choose another {flag}, or make it writable") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    for stale in remove_stale_temporaries(folder):
        print(f"removed {stale}, left by a checkpoint write that was killed", flush=True)
    return folder


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


TRUST_FLAG = "--trust_checkpoint"  # DINO's spelling; MoBY's tools pass their own

# Every class or function a pickle may import before we hand it to torch.load, read from the
# files this project writes (checkpoints, linear heads, k-NN features, exports: tensors in
# OrderedDicts) and official DINO, Swin/MoBY and timm weight files (the same): tensors, their
# storages and OrderedDict. torch's own weights-only check is the second line; ours holds on every
# torch release, including those whose check could be bypassed (see load_checkpoint).
_STORAGE_KINDS = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
                  "ComplexFloat", "ComplexDouble")
SAFE_GLOBALS = frozenset({"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
                          "collections.OrderedDict", *(f"torch.{kind}Storage" for kind in _STORAGE_KINDS)})


class UntrustedCheckpoint(UserError):
    """A file refused by the safe loader: it holds objects whose rebuilding can run code, or comes in
    a form whose safety cannot be checked."""


def add_trust_arg(parser, flag: str = TRUST_FLAG) -> None:
    """The opt-in to read checkpoints the safe loader refuses."""
    parser.add_argument(flag, action="store_true",
                        help="read checkpoints that the safe loader refuses (older checkpoints of "
                             "this project, official full checkpoints holding an argparse Namespace "
                             "or a yacs config) with the full unpickler, which runs any code the "
                             "file carries: only for files you trust")


def load_checkpoint(path: str | os.PathLike, map_location="cpu", trust: bool = False,
                    trust_flag: str = TRUST_FLAG):
    """Read a checkpoint without running code stored in it; one clear message for a missing,
    truncated, corrupt or refused file.

    .safetensors files hold tensors only. A pickled file (torch.save) is first read with pickletools,
    which executes nothing: it must be torch's zip format, and its pickles may import SAFE_GLOBALS
    only. Then torch's safe (weights-only) unpickler rebuilds it. Both checks are needed: before
    torch 2.6 torch's check could be bypassed (CVE-2025-32434, through the legacy non-zip format),
    so it is not a sandbox on the torch 2.1 stacks this project supports. A refused file (an
    argparse Namespace, a yacs config, numpy arrays, the legacy format, or code planted by an
    attacker) stops with an UntrustedCheckpoint naming why, unless `trust` is set: then it is
    read with the full unpickler, after a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: check the path")
    try:
        if is_safetensors(path):
            return _load_safetensors(path, map_location)
        if path.suffix == ".safetensors":  # torch.load would hand it to safetensors by its name
            raise UserError(f"{path} is named .safetensors but is not a safetensors file (a pickle?): "
                            "rename it to .pth if it is a torch checkpoint, or export it again")
        concern = pickle_concern(path)
        if concern is None:
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as exc:
                found = _refused_globals(exc)
                if not found:  # not a refused type: a damaged file
                    raise
                concern = f"holds objects the safe loader does not rebuild ({', '.join(found)})"
        if not trust:
            raise UntrustedCheckpoint(
                f"checkpoint {path} {concern}: loading it could run code stored in the file. If you "
                "trust the file (e.g. written by an earlier version of this project, or an official "
                f"full checkpoint holding an argparse Namespace or yacs config), pass {trust_flag}")
        print(f"warning: {path} {concern}; reading it with the full unpickler because {trust_flag} "
              "was given (this runs any code the file carries)", flush=True)
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            AttributeError, ImportError, IndexError, OSError) as exc:
        raise UserError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); delete it or "
                        "point at an earlier checkpoint") from None


def _load_safetensors(path: Path, map_location) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=str(map_location))
    except SafetensorError as exc:  # a truncated file, or a bad header
        raise ValueError(f"safetensors: {exc}") from None


def is_safetensors(path: str | os.PathLike) -> bool:
    """A safetensors file: 8-byte little-endian header length, then a JSON header."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 2 ** 32


def pickle_concern(path: str | os.PathLike) -> str | None:
    """Why a torch.save file must not reach torch.load unless trusted, found without unpickling
    anything; None for a zip checkpoint whose pickles import SAFE_GLOBALS only. A file that is no
    complete pickle raises ValueError or EOFError (corrupt)."""
    path = Path(path)
    with open(path, "rb") as handle:
        zipped = handle.read(4) == b"PK\x03\x04"
    if not zipped:
        with open(path, "rb") as handle:
            list(pickletools.genops(handle))  # not a pickle at all: ValueError (corrupt)
        found = unsafe_globals(path)
        return ("is in torch's legacy (non-zip) format, which torch's safe loader does not check "
                "reliably before torch 2.6" + (f", and holds {', '.join(found)}" if found else ""))
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if any(Path(name).name == "constants.pkl" for name in names):
            return ("is a TorchScript archive (torch.jit.save), which torch.load would run through "
                    "torch.jit.load")
        found = []
        for name in (n for n in names if n.endswith(".pkl")):
            with archive.open(name) as stream:
                found += [g for g in _imports(stream) if g not in SAFE_GLOBALS and g not in found]
    return f"holds objects the safe loader does not rebuild ({', '.join(found)})" if found else None


def unsafe_globals(path: str | os.PathLike) -> list[str]:
    """`module.name` of every class or function the file's pickles import beyond SAFE_GLOBALS (the
    legacy format: in the pickles before its raw tensor data); read with pickletools, so nothing is
    executed."""
    path = Path(path)
    found: list[str] = []
    for stream in _pickle_streams(path):
        with stream:
            try:
                while stream.peek(1):  # one pickle after another, until the end or raw tensor data
                    found += [g for g in _imports(stream) if g not in SAFE_GLOBALS and g not in found]
            except (ValueError, EOFError):
                pass
    return found


def _pickle_streams(path: Path):
    if zipfile.is_zipfile(path):
        archive = zipfile.ZipFile(path)
        return [archive.open(name) for name in archive.namelist() if name.endswith(".pkl")]
    return [open(path, "rb")]  # torch's legacy format: several pickles back to back, then data


def _imports(stream) -> list[str]:
    """The classes and functions one pickle imports, as `module.name`: GLOBAL and INST name them;
    STACK_GLOBAL (protocol 4+) pops two strings pushed (or fetched from the memo) by the opcodes
    just before it; an extension code (EXT1/2/4) imports whatever the registry maps it to.
    A name this cannot follow is reported as such, so it is never allowed. ValueError or
    EOFError when the bytes are not one complete pickle."""
    names: list[str] = []
    last = deque([None, None], maxlen=2)  # values of the last two opcodes (strings or None)
    memo: dict = {}
    for op, arg, _pos in pickletools.genops(stream):
        value = None
        if op.name in ("GLOBAL", "INST"):
            names.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            names.append(f"{last[0]}.{last[1]}" if None not in last else "<a name computed in the pickle>")
        elif op.name.startswith("EXT"):
            names.append(f"<extension code {arg}>")
        elif "UNICODE" in op.name or "STRING" in op.name:
            value = arg
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if op.name == "MEMOIZE" else arg] = last[1]
            continue  # stores the top of the stack, pushes nothing
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            value = memo.get(arg)
        last.append(value)
    return names


def _refused_globals(exc: Exception) -> list[str]:
    """The class or function torch's safe unpickler named when it refused a file (torch 2.1:
    "Unsupported class a.B"; later: "... GLOBAL a.B ..."); none for a damaged file."""
    if "weights only load failed" not in str(exc).lower():
        return []
    return list(dict.fromkeys(re.findall(r"(?:GLOBAL|Unsupported class) ([\w.]+)", str(exc))))


def load_first_readable(paths: Iterable[str | os.PathLike], warn: Callable[[str], None] = print,
                        trust: bool = False, trust_flag: str = TRUST_FLAG) -> tuple[dict, Path] | None:
    """The first of `paths` that exists and loads, warning about each unreadable one skipped.

    None when none exists; a UserError when files exist but none of them can be read. A file
    the safe loader refuses stops the search (UntrustedCheckpoint): falling back to an older
    file would hide the choice the user has to make.
    """
    existing = [Path(p) for p in dict.fromkeys(str(p) for p in paths) if Path(p).is_file()]
    for i, path in enumerate(existing):
        try:
            return load_checkpoint(path, trust=trust, trust_flag=trust_flag), path
        except UntrustedCheckpoint:
            raise
        except UserError as exc:
            reason = str(exc).split("; delete it")[0]
            if i + 1 < len(existing):
                warn(f"warning: {reason}; falling back to {existing[i + 1]}")
    if existing:
        raise UserError(f"none of the checkpoints in {existing[0].parent} can be read "
                        f"({', '.join(p.name for p in existing)}): move them away to start from "
                        "scratch, or restore a good copy")
    return None


def require_entries(checkpoint, path: str | os.PathLike, keys: Iterable[str], fix: str) -> Mapping:
    """`checkpoint`, read from `path`, when it is a dict holding every one of `keys`; else a
    UserError saying what the file holds instead, then `fix`."""
    if not isinstance(checkpoint, Mapping):
        raise UserError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict: {fix}")
    missing = [key for key in keys if key not in checkpoint]
    if missing:
        entries = ", ".join(sorted(str(key) for key in checkpoint)[:10]) or "none"
        raise UserError(f"{path} has no {', '.join(map(repr, missing))} entry (its entries: {entries}): "
                        f"{fix}")
    return checkpoint


def is_state_dict(obj) -> bool:
    """Parameter names to tensors, as torch's load_state_dict takes them."""
    return (isinstance(obj, Mapping) and bool(obj)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def require_state_dict(state, what: str, fix: str) -> Mapping:
    """`state` when it is a state dict; else a UserError saying what `what` holds instead, then `fix`."""
    if is_state_dict(state):
        return state
    if not isinstance(state, Mapping):
        found = f"a {type(state).__name__}"
    elif not state:
        found = "an empty dict"
    else:
        key, value = next((k, v) for k, v in state.items()
                          if not isinstance(k, str) or not isinstance(v, torch.Tensor))
        found = (f"a dict with the key {str(key)[:80]} ({type(key).__name__}), not a parameter name"
                 if not isinstance(key, str) else
                 f"a dict whose entry {key[:80]!r} is not a tensor but {type(value).__name__}")
    raise UserError(f"{what} is not a state dict of tensors (it is {found}): {fix}")


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
