"""The Ascend ModelZoo result block, computed from the training and evaluation logs.

The launch scripts (ssl_runtime.launch_scripts) call write_result after a run; by hand:

    python -m ssl_runtime.report --train_log F [--eval_log F] --network N --rank_size R
        --batch_size B --case_name C --e2e_seconds S --out_file PATH [--loss_file PATH]
        [--compile_time]

It prints the block Ascend users know (``Final Performance images/sec : ...``) and writes the
key = value case file that Ascend's tooling collects, and the loss file beside it
(``train_<CaseName>_loss.txt``, one loss per logged step).  Numbers come from the logs:

- FPS and s/step: the last ``Throughput: X images/s (Y s/step ...`` line, printed by every
  pretraining entry point (ssl_runtime.meters.ThroughputMeter).  X already counts the images of
  all ranks, so it is not multiplied by the number of devices.
- losses, as the Ascend scripts take them: DINO's step lines (``eta: ... loss: <median> (<running
  average>)``) give the running average of the epoch, MoBY's (``Train: ... loss <value> (<avg>)``)
  the step's value.  ActualLoss is the last of them.
- CompileTime (``--compile_time``, MoBY's 1-device performance case): the first step's time
  (``Train: [0/..][0/..] ... time <seconds> (``), which holds the operators' compilation.
- accuracy: DINO k-NN ``10-NN classifier result: Top1: x``, MoBY linear ``Max accuracy: x%``,
  or DINO linear ``Top-1 test accuracy: x``.
- random-init accuracy (CPU runs, ``--random_init_accuracy``): the same evaluation of the
  untrained network (ssl_runtime.baseline), printed beside the accuracy.
"""

from __future__ import annotations

import argparse
import math
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ssl_runtime.errors import UserError, main_entry

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"
_ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # MoBY's console logger colours its prefix

THROUGHPUT = re.compile(rf"Throughput:\s*({_NUMBER})\s*images/s\s*\(\s*({_NUMBER})\s*s/step")
# DINO's MetricLogger step line `... eta: 0:01:02  loss: 1.2345 (1.3000) ...` (median, running
# average); MoBY's `Train: [0/300][10/1251] ... time 0.5 (0.6) ... loss 1.2345 (1.3000) ...`.
DINO_LOSS = re.compile(rf"\beta: .*\bloss:\s+{_NUMBER}\s+\(({_NUMBER})\)")
MOBY_LOSS = re.compile(rf"\bTrain: .*\bloss\s+({_NUMBER})\s+\(")
MOBY_TIME = re.compile(rf"\bTrain: .*\btime\s+({_NUMBER})\s+\(")
# Tried in this order; a log holds one kind, and the last line of that kind wins.
ACCURACY = (
    re.compile(rf"\b10-NN classifier result: Top1:\s*({_NUMBER})"),
    re.compile(rf"Max accuracy:\s*({_NUMBER})\s*%"),
    re.compile(rf"Top-1 test accuracy:\s*({_NUMBER})"),
)

RULE = "------------------ Final result ------------------"
_FINITE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def finite_number(value: object) -> str | None:
    """`value` as printed when it is a finite number (a number, or a string that is one and
    nothing else: no spaces, no second line); None otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    text = str(value)
    return text if _FINITE.fullmatch(text) and math.isfinite(float(text)) else None


def _accuracy_arg(text: str) -> str:
    if finite_number(text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    return text


@dataclass
class TrainNumbers:
    images_per_sec: str
    sec_per_step: str
    losses: list[str]
    first_step_time: str | None = None

    @property
    def loss(self) -> str | None:
        return self.losses[-1] if self.losses else None


def _read_log(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist: the run did not start; see the messages above")
    text = path.read_text(errors="replace")
    return _ANSI_COLOUR.sub("", text).splitlines()


def _last_match(lines: list[str], pattern: re.Pattern) -> re.Match | None:
    for line in reversed(lines):
        found = list(pattern.finditer(line))
        if found:
            return found[-1]
    return None


def parse_train_log(path: str | Path) -> TrainNumbers:
    """FPS, s/step and the last loss of a pretraining log."""
    path = Path(path)
    lines = _read_log(path, "training log")
    throughput = _last_match(lines, THROUGHPUT)
    if throughput is None:
        raise UserError(f"no 'Throughput: ... images/s' line in {path}: training did not finish; "
                        f"read {path} for the cause")
    first_step = next((found for found in map(MOBY_TIME.search, lines) if found), None)
    return TrainNumbers(throughput.group(1), throughput.group(2), loss_history(lines),
                        first_step.group(1) if first_step else None)


def loss_history(lines: list[str]) -> list[str]:
    """One loss per logged step, as the Ascend scripts extract them (see the module's doc)."""
    losses = []
    for line in lines:
        found = DINO_LOSS.search(line) or MOBY_LOSS.search(line)
        if found:
            losses.append(found.group(1))
    return losses


def parse_accuracy(path: str | Path) -> str:
    """Top-1 accuracy (percent, as printed) of a k-NN or linear evaluation log."""
    path = Path(path)
    lines = _read_log(path, "evaluation log")
    for pattern in ACCURACY:
        found = _last_match(lines, pattern)
        if found is not None:
            return found.group(1)
    raise UserError(f"no accuracy line ('10-NN classifier result: Top1:' or 'Max accuracy:') in "
                    f"{path}: evaluation did not finish; read {path} for the cause")


def result_lines(train: TrainNumbers, accuracy: str | None, e2e_seconds: str,
                 random_init: str | None = None) -> list[str]:
    """The block printed on stdout."""
    lines = [RULE, f"Final Performance images/sec : {train.images_per_sec}"]
    if accuracy is not None:
        lines.append(f"Final Train Accuracy : {accuracy}")
    if random_init is not None:
        lines.append(f"Random-init Accuracy : {random_init} (the same evaluation of the untrained network)")
    lines.append(f"E2E Training Duration sec : {e2e_seconds}")
    return lines


def case_lines(network: str, rank_size: int, batch_size: int, case_name: str, train: TrainNumbers,
               accuracy: str | None, e2e_seconds: str, compile_time: bool = False,
               random_init: str | None = None) -> list[str]:
    """The `key = value` case file of Ascend's tooling."""
    lines = [
        f"Network = {network}",
        f"RankSize = {rank_size}",
        f"BatchSize = {batch_size}",
        f"DeviceType = {platform.machine()}",
        f"CaseName = {case_name}",
        f"ActualFPS = {train.images_per_sec}",
        f"TrainingTime = {train.sec_per_step}",
    ]
    if accuracy is not None:
        lines.append(f"TrainAccuracy = {accuracy}")
    lines.append(f"ActualLoss = {train.loss if train.loss is not None else 'NA'}")
    lines.append(f"E2ETrainingTime = {e2e_seconds}")
    if compile_time:
        lines.append(f"CompileTime = {train.first_step_time or 'NA'}")
    if random_init is not None:  # (ours, CPU runs) after the port's keys
        lines.append(f"RandomInitAccuracy = {random_init}")
    return lines


def write_result(train_log: str | Path, network: str, rank_size: int, batch_size: int, case_name: str,
                 e2e_seconds: str, out_file: str | Path, eval_log: str | Path | None = None,
                 loss_file: str | Path | None = None, compile_time: bool = False,
                 random_init: str | None = None) -> None:
    """Print the result block of a run and write its case file (and loss file)."""
    train = parse_train_log(train_log)
    if train.images_per_sec.lower() == "nan":
        print("note: no FPS: the run ended within its warm-up steps, so no step was timed; "
              "run more steps (e.g. --steps=20) for a figure", file=sys.stderr, flush=True)
    accuracy = parse_accuracy(eval_log) if eval_log else None
    print("\n".join(result_lines(train, accuracy, e2e_seconds, random_init)), flush=True)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text("\n".join(case_lines(network, rank_size, batch_size, case_name, train, accuracy,
                                             e2e_seconds, compile_time, random_init)) + "\n")
    if loss_file:
        Path(loss_file).write_text("".join(f"{loss}\n" for loss in train.losses))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Print the Ascend result block of a run and "
                                     "write its case file.")
    parser.add_argument("--train_log", help="pretraining log with the final 'Throughput:' line")
    parser.add_argument("--eval_log", help="k-NN / linear evaluation log (accuracy runs)")
    parser.add_argument("--network", help="e.g. DINO_ID3436_for_PyTorch")
    parser.add_argument("--rank_size", type=int, help="number of devices")
    parser.add_argument("--batch_size", type=int, help="batch size per device")
    parser.add_argument("--case_name", help="e.g. DINO_ID3436_for_PyTorch_bs64_8p_acc")
    parser.add_argument("--e2e_seconds", default="0", help="end-to-end wall time in seconds")
    parser.add_argument("--out_file", help="case file to write")
    parser.add_argument("--loss_file", help="loss file to write (train_<CaseName>_loss.txt)")
    parser.add_argument("--compile_time", action="store_true",
                        help="add CompileTime (the first step's time) to the case file")
    parser.add_argument("--random_init_accuracy", default=None, type=_accuracy_arg,
                        help="accuracy of the same evaluation at random initialisation (printed beside)")
    parser.add_argument("--accuracy_only", action="store_true",
                        help="only print 'Final Train Accuracy : X' from --eval_log")
    return parser


@main_entry
def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.accuracy_only:
        if not args.eval_log:
            parser.error("--accuracy_only needs --eval_log")
        print(f"Final Train Accuracy : {parse_accuracy(args.eval_log)}")
        return
    missing = [f"--{name}" for name in ("train_log", "network", "rank_size", "batch_size",
                                        "case_name", "out_file") if getattr(args, name) is None]
    if missing:
        parser.error(f"missing {', '.join(missing)}")

    write_result(args.train_log, args.network, args.rank_size, args.batch_size, args.case_name,
                 args.e2e_seconds, args.out_file, args.eval_log, args.loss_file, args.compile_time,
                 args.random_init_accuracy or None)

if __name__ == "__main__":
    main()
