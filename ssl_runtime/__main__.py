"""`python -m ssl_runtime`: does this interpreter have what the programs import? If not, print
what is missing and the pip command that adds it while keeping the interpreter's torch (the
launch scripts call this before they would otherwise stop)."""

from __future__ import annotations

import sys

from .torch_stack import install_advice, installed_version, missing_modules, stacks_text


def main() -> None:
    missing = missing_modules()
    if "torch" in missing:
        print(f"error: {sys.executable} has no torch: install one of the supported stacks "
              f"(requirements.txt, or on Ascend {stacks_text()})", file=sys.stderr)
        raise SystemExit(2)
    if missing:
        print("error: " + install_advice(sys.executable, missing), file=sys.stderr)
        raise SystemExit(2)
    print(f"{sys.executable}: torch {installed_version('torch')} and everything the programs import")


if __name__ == "__main__":
    main()
