"""Plot a run's log to a PNG: loss, learning rate, accuracy and collapse signals over epochs.

    python -m ssl_runtime.plot_log out/dino/log.txt --png out/dino/log.png
    python -m ssl_runtime.plot_log output/<MODEL.NAME>/pretrain/log.txt output/<MODEL.NAME>/linear/log.txt

Reads the JSON-lines log.txt that DINO (main_dino.py, eval_linear.py) and MoBY (main_moby.py,
main_linear.py) write once per epoch, and MoBY's text log (log_rank0.txt: its `Train:` lines per
print step and `Acc@1` lines). Several logs are drawn as several series. One panel per quantity
found (loss, lr, accuracy, DINO's teacher entropy and KL with ln(out_dim) dashed, MoBY's
similarities); the picture is 400 x 320 pixels per panel.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from .errors import UserError, main_entry

PANEL_INCHES = (4.0, 3.2)
ENTROPY_PANEL = "teacher entropy, KL (nats)"
DPI = 100

# MoBY: "Train: [e/E][i/N]\teta ... lr 0.000100\ttime ...\tloss 8.1234 (8.2345)\t..."
MOBY_TRAIN = re.compile(r"Train: \[(\d+)/\d+\]\[(\d+)/(\d+)\].*?\blr ([\d.eE+-]+)"
                        r".*?\bloss ([\d.eE+-]+|nan|inf)")
MOBY_SIGNAL = re.compile(r"\t(pos_sim|neg_sim|sim_gap) ([-\d.eE+]+|nan|inf) \(")  # (ours), after `mem`
MOBY_ACC = re.compile(r" \* Acc@1 ([\d.]+) Acc@5 ([\d.]+)")
MOBY_EPOCH_END = re.compile(r"EPOCH (\d+) training takes")


def read_log(path: str | Path) -> list[dict]:
    """Records with an `epoch` (fractional for MoBY step lines) and numeric fields."""
    path = Path(path)
    if path.is_dir():
        path = path / "log.txt"
    if not path.is_file():
        raise UserError(f"{path} does not exist: pass a run's log.txt (or its folder) or log_rank0.txt")
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if lines and lines[0].lstrip().startswith("{"):
        try:
            records = [json.loads(line) for line in lines]
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not a JSON-lines log ({exc})") from None
        return [r for r in records if isinstance(r, dict) and "epoch" in r]
    records = _read_moby_text(lines)
    if not records:
        raise UserError(f"{path} holds neither JSON lines nor MoBY `Train:` lines: nothing to plot")
    return records


def _read_moby_text(lines: list[str]) -> list[dict]:
    records, last_epoch = [], 0
    for line in lines:
        if (match := MOBY_TRAIN.search(line)):
            epoch, step, steps = int(match[1]), int(match[2]), int(match[3])
            last_epoch = epoch
            record = {"epoch": epoch + step / max(steps, 1), "train_lr": float(match[4]),
                      "train_loss": float(match[5])}
            record.update({f"train_{name}": float(value) for name, value in MOBY_SIGNAL.findall(line)})
            records.append(record)
        elif (match := MOBY_EPOCH_END.search(line)):
            last_epoch = int(match[1])
        elif (match := MOBY_ACC.search(line)):
            records.append({"epoch": last_epoch + 1, "test_acc1": float(match[1]),
                            "test_acc5": float(match[2])})
    return records


def panels_of(records: list[dict]) -> dict[str, list[str]]:
    """Which fields go in which panel: loss, lr, accuracy (only panels with data)."""
    fields = sorted({k for r in records for k, v in r.items()
                     if isinstance(v, (int, float)) and k != "epoch"})
    groups = {
        "loss": [f for f in fields if f.endswith("loss")],
        "learning rate": [f for f in fields if f.endswith("_lr") or f == "lr"],
        "accuracy (%)": [f for f in fields if "acc" in f],
        ENTROPY_PANEL: [f for f in fields if f.endswith(("teacher_entropy", "_kl"))],
        "similarity (cosine)": [f for f in fields if f.endswith(("_sim", "sim_gap"))],
    }
    return {title: names for title, names in groups.items() if names}


def plot_logs(logs: dict[str, list[dict]], png: str | Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    all_records = [r for records in logs.values() for r in records]
    panels = panels_of(all_records)
    if not panels:
        raise UserError("the log holds no loss, lr or accuracy fields to plot")
    figure, axes = plt.subplots(1, len(panels), figsize=(PANEL_INCHES[0] * len(panels), PANEL_INCHES[1]),
                                dpi=DPI, squeeze=False)
    for axis, (panel, names) in zip(axes[0], panels.items()):
        for label, records in logs.items():
            for name in names:
                points = [(r["epoch"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
                if points:
                    xs, ys = zip(*points)
                    series = name if len(logs) == 1 else f"{label}: {name}"
                    axis.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=series)
        if panel == ENTROPY_PANEL:  # entropy near this line with KL near 0: uniform collapse
            for value in sorted({r["ln_out_dim"] for r in all_records
                                 if isinstance(r.get("ln_out_dim"), float)}):
                axis.axhline(value, color="grey", linestyle="--", linewidth=1, label="ln(out_dim)")
        axis.set_title(panel)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        if panel == "learning rate":
            axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=DPI)  # no bbox_inches="tight": the size stays 400 x 320 px per panel
    plt.close(figure)
    return png


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Plot training logs (loss, lr, accuracy over epochs) to a PNG")
    parser.add_argument("logs", nargs="+",
                        help="log.txt files (or run folders holding one), or log_rank0.txt")
    parser.add_argument("--png", default=None,
                        help="picture to write (default: log.png beside the first log)")
    parser.add_argument("--title", default=None, help="title above the panels")
    return parser


def plot_main(args: argparse.Namespace) -> Path:
    logs = {}
    for given in args.logs:
        path = Path(given)
        label = (path if path.is_dir() else path.parent).name or str(path)
        while label in logs:
            label += "'"
        logs[label] = read_log(path)
    first = Path(args.logs[0])
    png = args.png or ((first if first.is_dir() else first.parent) / "log.png")
    written = plot_logs(logs, png, args.title)
    print(f"{written} saved ({sum(len(r) for r in logs.values())} records from {len(logs)} log(s)).")
    return written


@main_entry
def main(argv: list[str] | None = None) -> None:
    plot_main(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    main()
