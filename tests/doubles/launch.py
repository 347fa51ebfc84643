"""Run a project script with the test doubles: `python tests/doubles/launch.py SCRIPT ARGS...`
(also as torchrun's script). The fake torch_npu becomes importable and the default process group
is the device-checking gloo group (see README.md here)."""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import checked_collectives  # noqa: E402

checked_collectives.install()
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
