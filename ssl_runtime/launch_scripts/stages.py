"""A launch script's run: flags, device, settings and commands, then the stages (pretraining,
evaluation, the random-init baseline) under ssl_runtime.launch, then the result block.

    python -m ssl_runtime.launch_scripts <mode> <default processes per node> [flags]

test/common.sh runs this once conda, CANN's set_env.sh and the interpreter are in place. The
launcher itself never imports torch, so --dry_run and flag errors are instant.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import baseline, report
from ..errors import UserError
from . import REPO
from .layout import (
    PRETRAINING_LOG,
    Layout,
    case_name,
    decide,
    last_full_checkpoint,
    layout,
    move_aside,
    output_root,
    pretrained_checkpoint,
    resume_point,
    write_state,
)
from .options import USAGE, HelpRequested, Options, parse
from .recipes import (
    CPU_WORK_IMAGES,
    EVAL_LOG_PREFIX,
    MOBY_CFG,
    MOBY_PLACEHOLDER,
    NETWORKS,
    Commands,
    Settings,
    count_images,
    epochs_for_work,
    evaluation_command,
    pretrain_command,
    random_init_command,
    resolve_schedule,
)


@dataclass
class Run:
    options: Options
    settings: Settings
    paths: Layout
    commands: Commands
    launcher: list[str]
    eval_launcher: list[str]  # evaluation runs on one node (node 0, where rank 0 wrote the checkpoint)


def note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


def stamp() -> str:
    return time.strftime("%H:%M:%S")


def launcher(python: str, nproc: int, nnodes: int = 1, node_rank: int = 0, master_addr: str = "",
             master_port: str = "") -> list[str]:
    """ssl_runtime.launch: RANK, LOCAL_RANK, RANK_ID, ASCEND_DEVICE_ID per process, core binding,
    torchrun (standalone on one node; static rendezvous at master_addr:master_port on several)."""
    command = [python, "-m", "ssl_runtime.launch", f"--nproc_per_node={nproc}"]
    if nnodes > 1:
        command += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr}",
                    f"--master_port={master_port}"]
    return command


def check_device(python: str, requested: str) -> str:
    """npu, cuda or cpu for the request, or a stop with ssl_runtime.device's message: an Ascend
    machine whose torch_npu does not import, --device=npu without NPU, --device=cuda without CUDA."""
    done = subprocess.run([python, "-m", "ssl_runtime.device", "--device", requested], cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        if done.returncode != 2:  # 2: ssl_runtime.device printed the reason
            print(f"error: {python} could not tell the device (exit {done.returncode}); see above",
                  file=sys.stderr)
        raise SystemExit(2)
    return done.stdout.strip()


def plan(options: Options, python: str, env: Mapping[str, str] = os.environ) -> Run:
    """Fill in everything the flags left open: device, defaults, names, paths, commands."""
    o = options
    nproc, nnodes, node_rank = o.number("nproc") or o.default_nproc, o.number("nnodes") or 1, int(o.node_rank)
    world = nproc * nnodes
    if nnodes > 1:
        if not o.master_addr:
            raise UserError(f"{nnodes} nodes need the address of node 0: set MASTER_ADDR (or --master_addr=) "
                            "on every node, and NODE_RANK=0 on node 0, 1 on node 1, ...")
        if node_rank >= nnodes:
            raise UserError(f"NODE_RANK={node_rank} is not in 0..{nnodes - 1}")
    device = o.device  # an explicit device is checked before anything starts; a dry run only previews it
    if device == "auto" or (not o.dry_run and device != "cpu"):
        device = check_device(python, device)
    if device != "npu" and o.bin_given:
        note(f"--bin chooses NPU operator binaries: ignored on {device}")
    device_class = "cpu" if device == "cpu" else "accelerator"
    batch_size, epochs, steps = resolve_schedule(o.model, o.mode, device, world, nnodes, o.number("batch_size"),
                                                 o.number("epochs"), o.number("steps"))
    if not o.epochs and device == "cpu" and o.mode == "full" and o.data_path and not o.cfg:
        epochs = epochs_by_work(o.model, Path(o.data_path) / "train", batch_size * world) or epochs
    cfg = o.cfg or (MOBY_CFG[device_class] if o.model == "moby" else "")
    network = NETWORKS[o.model]
    case = case_name(network, batch_size, world, o.mode)
    paths = layout(output_root(env), o.device_id, case, EVAL_LOG_PREFIX[o.model])
    checkpoint = o.checkpoint
    if o.mode == "eval" and not checkpoint:
        found = last_full_checkpoint(paths.log_dir, network, world, o.model)
        if found is None:
            raise UserError(f"no --checkpoint given and no checkpoint of a {world}-device train_full run under "
                            f"{paths.log_dir}: run train_full_{world}p.sh first or pass --checkpoint=FILE")
        checkpoint = str(found)
    settings = Settings(
        MODEL=o.model, NETWORK=network, DEVICE=device, NPROC=nproc, NNODES=nnodes, NODE_RANK=node_rank,
        WORLD=world, BATCH_SIZE=batch_size, EPOCHS=epochs, STEPS=steps, DATA_PATH=o.data_path, CFG=cfg,
        CHECKPOINT=checkpoint, CASE_NAME=case, TRAIN_LOG=str(paths.train_log), EVAL_LOG=str(paths.eval_log),
        LOSS_FILE=str(paths.loss_file), CASE_FILE=str(paths.case_file), RUN_DIR=str(paths.run_dir),
        SSL_PYTHON=python)
    commands = Commands()
    if o.mode in ("full", "perf"):
        commands.pretrain = pretrain_command(settings, o.mode == "perf", o.bin, o.profile, env)
    commands.evaluation = evaluation_command(settings, o.mode, bool(o.batch_size), bool(o.epochs), o.trust,
                                             o.bin, env)
    if o.mode == "full" and device == "cpu":
        commands.random_init = random_init_command(commands.evaluation, o.model)
    return Run(o, settings, paths, commands, launcher(python, nproc, nnodes, node_rank, o.master_addr, o.master_port),
               launcher(python, nproc))


def epochs_by_work(model: str, train: Path, global_batch: int) -> int | None:
    """The CPU recipe's epochs on another dataset (recipes.CPU_WORK_IMAGES), said with the reason."""
    images = count_images(train)
    epochs = epochs_for_work(model, images, global_batch)
    if epochs is not None:  # else the program says what is wrong with the folder
        note(f"--epochs={epochs}: the CPU recipe sees about {CPU_WORK_IMAGES[model]:,} images (its "
             f"Fashion-MNIST run's work); {train} has {images:,} (batches of {global_batch}); pass --epochs=N "
             "to choose")
    return epochs


def print_dry_run(run: Run) -> None:
    for name, value in asdict(run.settings).items():
        print(f"{name}={'' if value is None else value}")
    c = run.commands
    for label, prefix, command in (("PRETRAIN", run.launcher, c.pretrain), ("EVAL", run.eval_launcher, c.evaluation),
                                   ("RANDOM-INIT", run.eval_launcher, c.random_init)):
        if command:
            print(f"{label}: {shlex.join(prefix + command)}")


def exit_status(returncode: int) -> int:
    """A process killed by signal N exits, as the shell reports it, with 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def run_stage(what: str, log: Path, command: list[str]) -> None:
    """Run one stage with all its output in `log` (an earlier one renamed); stop the script if it
    fails. SIGTERM (what a
    scheduler sends before it kills a job) is passed on to the stage, which saves a checkpoint and
    stops; a terminal's Ctrl-C reaches the stage directly (same process group)."""
    print(f"[{stamp()}] {what}: {shlex.join(command)}", flush=True)
    print(f"[{stamp()}] log: {log} (follow it with: tail -f {log})", flush=True)
    move_aside(log)  # an earlier attempt's log is kept
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, _: process.send_signal(signum)),
                    signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: None)}
        try:
            status = exit_status(process.wait())
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    if status != 0:
        lines = log.read_text(errors="replace").splitlines()[-20:]
        print(f"----- last lines of {log} -----", *lines, sep="\n", file=sys.stderr)
        print(f"error: {what} failed (exit {status}); read {log}", file=sys.stderr, flush=True)
        if status in (130, 143):
            print("rerun the same command to resume from the last checkpoint", file=sys.stderr, flush=True)
        raise SystemExit(status)


def prepare_dataset(run: Run) -> None:
    """Convert the default dataset before the clock starts (and before several ranks want it). As
    root, a missing Debian package is installed first (test/setup_env.sh); otherwise the error says how."""
    python = [run.settings.SSL_PYTHON, "-m", "ssl_runtime.fashion_mnist"]
    done = subprocess.run(python, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if done.returncode != 0:
        subprocess.run(["bash", "-c", 'source "$0" && ssl_ensure_dataset', str(REPO / "test" / "setup_env.sh")],
                       stdout=sys.stderr)
        done = subprocess.run(python, cwd=REPO, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise SystemExit(2)
    print(f"dataset: Fashion-MNIST at {done.stdout.strip()} (pass --data_path= for another ImageFolder dataset)")


def fill_moby_checkpoint(run: Run) -> None:
    """After MoBY pretraining: the checkpoint under <output>/<MODEL.NAME>/pretrain/."""
    found = pretrained_checkpoint(run.paths.run_dir, "moby")
    if found is None:
        print(f"error: pretraining wrote no {run.paths.run_dir}/<MODEL.NAME>/pretrain/checkpoint.pth; read "
              f"{run.paths.train_log}", file=sys.stderr)
        raise SystemExit(1)
    placeholder = f"{run.paths.run_dir}/{MOBY_PLACEHOLDER}/pretrain/checkpoint.pth"
    run.commands.evaluation = [str(found) if word == placeholder else word for word in run.commands.evaluation]


def begin_attempt(run: Run, command: list[str], keep_in_place: bool = False) -> tuple[str, ...]:
    """Resume the earlier attempt of this case's run when it ran the same command and did not
    finish; otherwise move it aside (layout.decide). Returns the stages it finished."""
    paths = run.paths
    attempt = decide(paths.run_dir, command, run.options.fresh)
    done: tuple[str, ...] = ()
    if attempt.action == "move_aside" and not keep_in_place:
        print(f"the earlier run in {paths.run_dir}: {attempt.why}; kept as {move_aside(paths.run_dir)}; "
              "starting a new run", flush=True)
    elif attempt.action == "resume":
        done = attempt.done
        print(resume_message(run, done), flush=True)
    kept = [moved.name for moved in map(move_aside, (paths.case_file, paths.loss_file)) if moved]
    if kept:
        print(f"the earlier attempt's results are kept: {', '.join(kept)}", flush=True)
    write_state(paths.run_dir, command, done)
    return done


def resume_message(run: Run, done: tuple[str, ...]) -> str:
    run_dir, model = run.paths.run_dir, run.settings.MODEL
    if run.options.mode.startswith("eval"):
        return f"going on with the unfinished evaluation in {run_dir}; --fresh to start over"
    if "pretraining" in done:
        return f"pretraining in {run_dir} finished earlier: going on from there; --fresh to start over"
    checkpoint = pretrained_checkpoint(run_dir, model)
    if checkpoint is None and run.settings.NODE_RANK > 0:  # rank 0, on node 0, writes the checkpoints
        return (f"no checkpoint in {run_dir}: this node's ranks resume only if they see node 0's checkpoint "
                "there (shared storage); if they do not, rerun on every node with --fresh")
    if checkpoint is None:
        return f"rerunning {run_dir} from the start (it stopped before its first checkpoint); --fresh to start over"
    point = resume_point(model, checkpoint)
    where = f" (epoch {point[0]}, batch {point[1]})" if point else ""
    return f"resuming from {checkpoint}{where}; --fresh to start over"


def mark_done(run: Run, command: list[str], done: tuple[str, ...], stage: str) -> tuple[str, ...]:
    done = (*done, stage)
    write_state(run.paths.run_dir, command, done)
    return done


def pretrain(run: Run, command: list[str], done: tuple[str, ...]) -> tuple[str, ...]:
    """The pretraining stage, unless an earlier attempt finished it: then its log (kept in the run
    folder) is put back in place for the result block."""
    paths, copy = run.paths, run.paths.run_dir / PRETRAINING_LOG
    if "pretraining" in done and copy.is_file():
        move_aside(paths.train_log)
        shutil.copyfile(copy, paths.train_log)
        return done
    run_stage(f"{run.settings.NETWORK} pretraining", paths.train_log, run.launcher + run.commands.pretrain)
    shutil.copyfile(paths.train_log, copy)
    return mark_done(run, command, tuple(stage for stage in done if stage != "pretraining"), "pretraining")


def train(run: Run) -> None:
    s, paths, c = run.settings, run.paths, run.commands
    command = run.launcher[1:] + c.pretrain  # the interpreter's path may change between attempts
    start = time.monotonic()
    done = pretrain(run, command, begin_attempt(run, command))
    if s.NODE_RANK > 0 and s.NNODES > 1:
        mark_done(run, command, done, "complete")
        print(f"node {s.NODE_RANK}: pretraining finished; node 0 evaluates and prints the result")
        return
    if c.evaluation:
        if s.MODEL == "moby":
            fill_moby_checkpoint(run)
        run_stage(f"{s.NETWORK} evaluation", paths.eval_log, run.eval_launcher + c.evaluation)
    e2e = str(int(time.monotonic() - start))
    random_init = None
    if c.random_init:
        print(f"[{stamp()}] random-init baseline (once per recipe, then cached): {shlex.join(c.random_init)}",
              file=sys.stderr, flush=True)
        random_init = baseline.report_random_init(run.eval_launcher + c.random_init,
                                                  paths.log_dir / f"random_init_{run.options.device_id}.log")
    # the MoBY port's 1-device performance case also records the first step's time
    compile_time = run.options.mode == "perf" and s.MODEL == "moby" and s.WORLD == 1
    report.write_result(paths.train_log, s.NETWORK, s.WORLD, s.BATCH_SIZE, s.CASE_NAME, e2e, paths.case_file,
                        paths.eval_log if c.evaluation else None, paths.loss_file, compile_time, random_init)
    mark_done(run, command, done, "complete")


def evaluate(run: Run) -> None:
    paths, s = run.paths, run.settings
    command = run.eval_launcher[1:] + run.commands.evaluation
    # a checkpoint inside the run folder stays where it is: the evaluation runs beside it
    done = begin_attempt(run, command, keep_in_place=s.CHECKPOINT.startswith(f"{paths.run_dir}/"))
    run_stage(f"{s.NETWORK} evaluation of {s.CHECKPOINT}", paths.eval_log, run.eval_launcher + run.commands.evaluation)
    print(f"Final Train Accuracy : {report.parse_accuracy(paths.eval_log)}")
    mark_done(run, command, done, "complete")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        options = parse(argv[0], int(argv[1]), argv[2:])
        for text in options.notes:
            note(text)
        python = os.environ.get("SSL_PYTHON") or sys.executable
        run = plan(options, python)
        if options.dry_run:
            if options.conda_name:
                note(f"--dry_run: conda environment '{options.conda_name}' not activated")
            print_dry_run(run)
            return
        os.chdir(REPO)  # config and program paths are relative to the repository
        os.environ["ASCEND_DEVICE_ID"] = options.device_id  # --device_id wins over the environment
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        run.paths.log_dir.mkdir(parents=True, exist_ok=True)
        if not options.data_path:
            prepare_dataset(run)
        if options.mode in ("full", "perf"):
            train(run)
        else:
            evaluate(run)
    except HelpRequested:
        print(USAGE)
    except UserError as exc:  # not errors.main_entry: that one leaves a process group (imports torch)
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
