"""The random-initialisation figure printed beside a CPU run's accuracy, cached per recipe.

    python -m ssl_runtime.baseline --log LOG -- python -u dino/eval_knn.py --arch vit_pico ...

runs the given evaluation of an untrained network (the command is the run's own evaluation with
the checkpoint left out), prints its accuracy (report.parse_accuracy) and keeps it in
<cache>/random-init/<key>.json beside the converted dataset, so later runs of the same recipe
print it at once. The key covers the command (interpreter excepted), the contents of the files
it names (a MoBY YAML and the YAMLs it inherits from), and the torch and timm versions that
draw the initial weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .errors import UserError, main_entry
from .launch_scripts.layout import move_aside
from .report import finite_number, parse_accuracy


def cache_dir() -> Path:
    """Env SSL_RANDOM_INIT_CACHE, else <dataset cache>/../random-init (~/.cache/ssl_runtime/random-init)."""
    from .fashion_mnist import default_cache_dir

    if os.environ.get("SSL_RANDOM_INIT_CACHE"):
        return Path(os.environ["SSL_RANDOM_INIT_CACHE"]).expanduser()
    return default_cache_dir().parent / "random-init"


def _named_files(command: list[str]) -> list[Path]:
    """Existing files the command names, with the YAML files they inherit from (BASE: [...])."""
    found: list[Path] = []
    pending = [Path(arg) for arg in command if os.path.isfile(arg)]
    while pending:
        path = pending.pop(0).resolve()
        if path in found:
            continue
        found.append(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            with path.open() as handle:
                bases = (yaml.safe_load(handle) or {}).get("BASE") or []
            pending.extend(path.parent / base for base in bases if base)
    return found


OUTPUT_FLAGS = ("--output", "--output_dir")  # where logs go: no part of the recipe


def recipe_key(command: list[str]) -> str:
    """A hash of what decides the random-init accuracy of an evaluation command."""
    import timm
    import torch

    kept = [arg for i, arg in enumerate(command) if i > 0 and command[i - 1] not in OUTPUT_FLAGS]
    digest = hashlib.sha256()
    for part in [*kept, f"torch {torch.__version__}", f"timm {timm.__version__}"]:
        digest.update(part.encode() + b"\0")
    for path in _named_files(command[1:]):
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def random_init_accuracy(command: list[str], log: Path, cache: Path | None = None) -> tuple[str | None, bool]:
    """(accuracy, whether it came from the cache); runs the command into `log` when not cached.
    Only a finite number is taken from the cache or kept in it: a damaged entry is measured again
    (a value with a newline would add lines to the case file), a measured NaN is not kept (None)."""
    cache = cache or cache_dir()
    entry = cache / f"{recipe_key(command)}.json"
    if entry.is_file():
        try:
            cached = json.loads(entry.read_text())["accuracy"]
        except (ValueError, KeyError, TypeError) as exc:
            cached = f"unreadable ({type(exc).__name__})"
        if finite_number(cached) is not None:
            return finite_number(cached), True
        print(f"note: {entry} holds {cached!r}, not a number: measuring the random-init accuracy again",
              file=sys.stderr, flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    move_aside(log)  # an earlier measurement's log is kept
    with log.open("w") as out:
        status = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT)
    if status != 0:
        raise UserError(f"the random-initialisation evaluation failed (exit {status}); read {log}")
    accuracy = finite_number(parse_accuracy(log))
    if accuracy is None:
        print(f"note: the random-init evaluation printed no finite accuracy ({log}): not kept", file=sys.stderr)
        return None, False
    cache.mkdir(parents=True, exist_ok=True)
    partial = entry.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps({"accuracy": accuracy, "command": command[1:],
                                   "date": time.strftime("%Y-%m-%d")}) + "\n")
    os.replace(partial, entry)  # atomic: concurrent runs of one recipe agree on the file
    return accuracy, False


@main_entry
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise UserError("usage: python -m ssl_runtime.baseline --log LOG -- <evaluation command>")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description="Random-initialisation accuracy of an evaluation, cached.")
    parser.add_argument("--log", required=True, help="where the evaluation's output goes when it runs")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        raise UserError("no evaluation command after --")
    print(report_random_init(command, Path(args.log)) or "NA")


def report_random_init(command: list[str], log: Path) -> str | None:
    """random_init_accuracy, saying on stderr whether it was measured now or cached."""
    accuracy, cached = random_init_accuracy(command, log)
    if accuracy is not None:
        print(f"random-init accuracy {accuracy}: {'cached' if cached else 'measured now, kept'} in {cache_dir()}",
              file=sys.stderr, flush=True)
    return accuracy


if __name__ == "__main__":
    main()
