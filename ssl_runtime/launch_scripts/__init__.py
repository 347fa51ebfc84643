"""The logic behind the Ascend-ModelZoo-style launch scripts in test/ (train_full_*.sh,
train_performance_*.sh, eval_*.sh).

Each script sources test/common.sh, which does only what must happen in the shell before Python
starts (conda, CANN's set_env.sh, the interpreter), then runs

    python -m ssl_runtime.launch_scripts <mode> <default processes per node> [flags]

- options: the scripts' flags (Huawei's among them), checked before anything starts;
- recipes: per method and device, the defaults, the CPU recipes and the program command lines;
- layout: the output files (test/output/<ID>/...), the case name, and what a rerun does with an
  earlier attempt (resume it, or move it aside: nothing is deleted);
- stages: running pretraining and evaluation under ssl_runtime.launch, the result block.

docs/launch.md describes the flags, the files and the resume rules for users.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # config and program paths are relative to it
