"""Run a project script with the test doubles: `python tests/doubles/launch.py SCRIPT ARGS...`
(also as torchrun's script). The torch_npu double (the emulated NPU, its hccl backend) becomes
importable, and a CPU run's gloo process group is the device-checking one (see README.md here).

A process that reaches interpreter exit with its process group still alive fails here every
time (exit 3): real gloo aborts in that teardown about one run in four on torch 2.14
("terminate called without an active exception", SIGABRT), and NCCL warns of a leaked group.
A process that ends with os._exit (a rank reporting a failure) never gets here, as with gloo.
"""

import atexit
import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import checked_collectives  # noqa: E402

EXIT_GROUP_LEFT_ALIVE = 3


def _refuse_a_live_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.write(f"{checked_collectives.BACKEND}: the process group was not destroyed before "
                         "interpreter exit (gloo aborts there now and then: SIGABRT)\n")
        sys.stderr.flush()
        os._exit(EXIT_GROUP_LEFT_ALIVE)


checked_collectives.install()
atexit.register(_refuse_a_live_group)
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
