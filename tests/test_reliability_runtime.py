"""The shared reliability pieces: loss-scale watch, periodic/SIGTERM saves, checkpoint fallback,
process-group timeout, and a 2-process job whose rank 1 fails (DINO and MoBY)."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_imagefolder
from ssl_runtime import distributed as dist_utils
from ssl_runtime.checkpoint import load_first_readable, prepare_output_dir, previous_path, save_atomic
from ssl_runtime.compat import grad_scaler
from ssl_runtime.errors import UserError
from ssl_runtime.resilience import Interrupted, StepCheckpointer, StepHealth, StopSignal
from tests.reliability_helpers import ROOT, start_ranks


# ---------------------------------------------------------------- 5. fp16 overflow

@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="torch 2.1 has no CPU GradScaler")
def test_fp16_overflow_is_absorbed_by_the_scaler_and_logged():
    scaler = grad_scaler("cpu", init_scale=1024.0)
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    lines: list[str] = []
    health = StepHealth(torch.device("cpu"), "advice", scaler, lines.append)
    health.check(0)  # remembers the starting scale
    for overflow in (True, False):
        factor = torch.tensor([float("inf") if overflow else 1.0, 1.0])
        loss = (weight * factor).sum()
        health.record(torch.tensor(1.0))  # the loss itself is finite, only its gradient overflows
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        if overflow:
            assert torch.equal(weight.detach(), torch.ones(2))  # the step was skipped
    health.check(2)
    assert lines == ["gradient overflow: loss scale reduced from 1024 to 512 by iteration 2 "
                     "(the overflowing steps were skipped)"]
    assert not torch.equal(weight.detach(), torch.ones(2))  # training went on


# ---------------------------------------------------------------- periodic and SIGTERM saves

class FakeStop:
    def __init__(self):
        self.received = None

    def requested(self) -> bool:
        return self.received is not None


def test_step_checkpointer_saves_every_n_steps_and_on_a_stop_request():
    saved: list[tuple[int, int]] = []
    stop = FakeStop()
    checkpointer = StepCheckpointer(lambda e, s: saved.append((e, s)), every_steps=2, stop=stop,
                                    log=lambda _line: None)
    for step in range(1, 7):  # 6 steps per epoch: the step-6 save is left to the epoch end
        checkpointer.after_step(3, step, 6)
    assert saved == [(3, 2), (3, 4)]
    stop.received = 15
    with pytest.raises(Interrupted) as info:
        checkpointer.after_step(4, 6, 6)  # stopped after the last step: resume at the next epoch
    assert info.value.code == 143 and saved[-1] == (5, 0)


def test_stop_is_asked_only_every_check_every_steps_and_at_epoch_end():
    asked: list[int] = []

    class CountingStop(FakeStop):
        def requested(self) -> bool:  # a collective across ranks: kept out of most steps
            asked.append(step)
            return super().requested()

    stop = CountingStop()
    checkpointer = StepCheckpointer(lambda e, s: None, stop=stop, log=lambda _line: None, check_every=3)
    for step in range(1, 8):  # 7 steps per epoch
        checkpointer.after_step(0, step, 7)
    assert asked == [3, 6, 7]
    stop.received = 15
    checkpointer.after_step(1, 1, 7)  # signalled, but step 1 is not a checking step: no stop yet
    with pytest.raises(Interrupted):
        checkpointer.after_step(1, 3, 7)


# ---------------------------------------------------------------- 2. rotation and fallback

def test_rotation_keeps_the_previous_file_and_fallback_skips_broken_ones(tmp_path):
    latest = tmp_path / "checkpoint.pth"
    for epoch in (1, 2):
        save_atomic({"epoch": epoch}, latest, keep_previous=True)
    assert torch.load(previous_path(latest))["epoch"] == 1 and torch.load(latest)["epoch"] == 2
    assert load_first_readable([latest, previous_path(latest)])[0]["epoch"] == 2
    latest.write_bytes(b"\x00" * 10)
    warnings: list[str] = []
    state, path = load_first_readable([latest, tmp_path / "absent.pth", previous_path(latest)], warnings.append)
    assert state["epoch"] == 1 and path == previous_path(latest)
    assert len(warnings) == 1  # no pickle: the check before torch.load says so (ValueError)
    assert re.fullmatch(rf"warning: checkpoint {re.escape(str(latest))} is truncated or corrupt "
                        rf"\(ValueError: [^;]*\); falling back to {re.escape(str(previous_path(latest)))}",
                        warnings[0]), warnings
    assert load_first_readable([tmp_path / "absent.pth"]) is None
    previous_path(latest).write_bytes(b"")
    with pytest.raises(UserError, match="none of the checkpoints in .* can be read"):
        load_first_readable([latest, previous_path(latest)])


# ---------------------------------------------------------------- 6. distributed faults

def test_a_failing_cleanup_never_hides_why_the_save_failed(tmp_path, monkeypatch):
    """On a read-only file system removing the temporary file fails too (EROFS even when it does
    not exist): the error names the first failure, as a UserError."""
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(torch, "save", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(UserError, match=r"could not write checkpoint .*Read-only file system.*untouched"):
        save_atomic({"w": torch.ones(1)}, tmp_path / "checkpoint.pth")


def dead_pid() -> int:
    """The id of a process that has ended (and whose id no running process has taken since)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_writers_are_removed_and_nothing_else(tmp_path, capsys):
    host, dead = socket.gethostname(), dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {f".checkpoint.pth.tmp-{dead}": False,  # the earlier name, without the host
                 f".checkpoint0003.pth.tmp-{host}-{dead}": False,
                 f".encoder.safetensors.tmp-{host}-{dead}": False,
                 f".checkpoint.pth.tmp-{host}-{live.pid}": True,  # a live writer's
                 f".checkpoint.pth.tmp-{os.getppid()}": True,
                 f".checkpoint.pth.tmp-other-host-{dead}": True,  # its process cannot be checked here
                 f".notes.txt.tmp-{dead}": True, f"checkpoint.pth.tmp-{dead}": True, "checkpoint.pth": True}
        for name in names:
            (tmp_path / name).write_bytes(b"x")
        (tmp_path / f".dir.pth.tmp-{dead}").mkdir()
        assert prepare_output_dir(tmp_path) == tmp_path
        kept = {name for name, keep in names.items() if keep} | {f".dir.pth.tmp-{dead}"}
        assert {p.name for p in tmp_path.iterdir()} == kept
        assert capsys.readouterr().out.count("left by a checkpoint write that was killed") == 3
    finally:
        live.kill()
        live.wait()


def test_an_unusable_output_folder_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"output folder .*/file/out .*choose another --output"):
        prepare_output_dir(tmp_path / "file" / "out", "--output")
    fresh = prepare_output_dir(tmp_path / "new" / "out")
    assert fresh.is_dir() and not list(fresh.iterdir())  # the write test is gone


def test_process_group_timeout_from_the_environment(monkeypatch):
    monkeypatch.setenv(dist_utils.TIMEOUT_ENV, "0.5")
    assert dist_utils.process_group_timeout().total_seconds() == 30
    monkeypatch.setenv(dist_utils.TIMEOUT_ENV, "soon")
    with pytest.raises(UserError, match="SSL_DIST_TIMEOUT_MIN='soon' is not a positive number"):
        dist_utils.process_group_timeout()


FAILING_RANK = '''
import os, sys
sys.path.insert(0, {root!r})
method, argv = sys.argv[1], sys.argv[2:]
if method == "dino":
    from dino import main_dino as entry
    owner, name = entry.DINOLoss, "forward"
else:
    from moby import main_moby as entry
    owner, name = entry, "moby_loss"
original, calls = getattr(owner, name), []

def failing(*args, **kwargs):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        raise RuntimeError("injected failure in the second step")
    return original(*args, **kwargs)

setattr(owner, name, failing)
entry.main(argv)
'''


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dino", "moby"])
def test_a_failing_rank_stops_the_whole_job_and_is_named(tmp_path, method):
    data = make_imagefolder(tmp_path / "data", classes=3, per_class=16)
    if method == "dino":
        argv = ["--arch", "vit_pico", "--patch_size", "4", "--img_size", "32", "--local_crop_size", "16",
                "--local_crops_number", "2", "--out_dim", "64", "--batch_size_per_gpu", "4",
                "--warmup_epochs", "0", "--num_workers", "0", "--epochs", "1", "--device", "cpu",
                "--data_path", str(data), "--output_dir", str(tmp_path / "out")]
    else:
        argv = ["--cfg", str(ROOT / "configs" / "moby_swin_cpu.yaml"), "--data-path", str(data),
                "--batch-size", "8", "--output", str(tmp_path / "out"), "--device", "cpu", "--epochs", "1",
                "--opts", "MODEL.SWIN.EMBED_DIM", "12", "MODEL.SWIN.DEPTHS", "[1, 1]",
                "MODEL.SWIN.NUM_HEADS", "[1, 2]", "MODEL.MOBY.CONTRAST_NUM_NEGATIVE", "32",
                "DATA.NUM_WORKERS", "0"]
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK.format(root=str(ROOT)))
    procs = start_ranks([sys.executable, str(script), method, *argv], SSL_DIST_TIMEOUT_MIN="1")
    start = time.time()
    results = [proc.communicate(timeout=180) for proc in procs]
    elapsed = time.time() - start
    codes = [proc.returncode for proc in procs]
    errors = [err for _, err in results]
    assert codes[1] == 1, errors[1][-3000:]
    assert "error: [rank 1] stopped by RuntimeError: injected failure in the second step" in errors[1]
    assert codes[0] != 0, errors[0][-3000:]  # the healthy rank does not carry on or hang
    assert "error: [rank 0]" in errors[0] and "its own 'error: [rank N]' line gives the cause" in errors[0]
    assert elapsed < 60  # well inside the 1-minute process-group timeout: it did not wait for it


def test_sigterm_sets_a_flag_once_and_a_second_one_stops_at_once():
    stop = StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() and stop.received == signal.SIGTERM  # and the process lives on
        handled = []
        signal.signal(signal.SIGTERM, lambda signum, _frame: handled.append(signum))
        stop._previous[signal.SIGTERM] = signal.getsignal(signal.SIGTERM)
        stop._handle(signal.SIGTERM, None)  # the second request goes to the previous handler
        assert handled == [signal.SIGTERM]
    finally:
        stop.restore()
