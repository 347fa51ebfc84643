"""Surviving long runs: a resumable data order, SIGTERM, mid-epoch checkpoints, step health.

Resuming exactly (the same weights as a run that was never stopped) needs every source of
randomness to be reproducible from the checkpoint:
  * the sample order is DistributedSampler's, a function of (seed, epoch) only, and can start
    part-way through an epoch (ResumableSampler);
  * the augmentations of sample i in epoch e are drawn from generators seeded with
    (seed, e, i) (PerSampleSeeded), so they do not depend on workers, prefetching or restarts;
  * the model's own randomness (drop path) continues from the generator states saved in the
    checkpoint (rng_state / restore_rng_state).
"""

from __future__ import annotations

import random
import signal
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, get_worker_info

from . import distributed as dist_utils
from .compat import device_module

EXIT_INTERRUPTED = 128 + signal.SIGTERM  # what a shell reports for a SIGTERM-ed process
EXIT_NON_FINITE = 1


# ---------------------------------------------------------------- reproducible, resumable data

class ResumableSampler(DistributedSampler):
    """DistributedSampler's order (seed + epoch), yielding (epoch, index) pairs and able to skip
    the samples of the batches a resumed run has already trained on (`skip`, next pass only)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def skip(self, samples: int) -> None:
        self.start = samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self.start = self.start, 0
        indices = list(super().__iter__())
        return iter([(self.epoch, index) for index in indices[start:]])


class PerSampleSeeded(Dataset):
    """Draws the augmentations of item (epoch, index) from generators seeded by (seed, epoch, index).

    In the main process (num_workers 0) the global generators are restored afterwards, so the
    model's randomness does not depend on data loading either. The loader fetches a whole batch
    through __getitems__, which saves and restores them once per batch: numpy's state alone costs
    about 0.1 ms to save and restore, as much as the augmentation of a small image.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str):
        if name.startswith("__") or "dataset" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.dataset, name)  # classes, samples, ... of the wrapped dataset

    def __getitem__(self, key):
        with _global_generators_kept():
            return self._seeded_item(key)

    def __getitems__(self, keys: list) -> list:
        with _global_generators_kept():
            return [self._seeded_item(key) for key in keys]

    def _seeded_item(self, key):
        epoch, index = key
        seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)  # the CPU generator only: transforms run there
        return self.dataset[index]


@contextmanager
def _global_generators_kept():
    """In the main process, put Python's, numpy's and torch's CPU generators back as they were
    (a data worker's generators are its own)."""
    if get_worker_info() is not None:
        yield
        return
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def skip_batches(loader, batches: int) -> None:
    """Make the loader's next pass start after `batches` batches (a mid-epoch resume)."""
    if batches:
        loader.sampler.skip(batches * loader.batch_size)


def rng_state(device_type: str = "cpu") -> dict:
    """Every generator the training step draws from, for the checkpoint, held in types the safe
    (weights-only) unpickler reads: tensors, Python numbers, strings and tuples."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if device_type != "cpu":
        state["device"] = device_module(device_type).get_rng_state()
    return state


def restore_rng_state(state: dict | None, device_type: str = "cpu") -> None:
    if not state:
        return
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]  # keys: a tensor, or a uint32 array in older checkpoints
    np.random.set_state((name, np.asarray(keys).astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if device_type != "cpu" and "device" in state:
        device_module(device_type).set_rng_state(state["device"])


# ---------------------------------------------------------------- SIGTERM and periodic saves

class StopSignal:
    """Turns SIGTERM (what Slurm and Kubernetes send before killing a job) into a flag that the
    loop reads after each step; the step itself is never interrupted."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.received: int | None = None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in signals}

    def _handle(self, signum: int, _frame) -> None:
        if self.received is not None:  # asked twice: stop now, the default way
            self.restore()
            signal.raise_signal(signum)
        self.received = signum

    def restore(self) -> None:
        """Give the signals back to their previous handlers (the run is over)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def requested(self) -> bool:
        """True on every rank once any rank got the signal (ranks must stop at the same step)."""
        return dist_utils.any_rank_true(self.received is not None)


class Interrupted(SystemExit):
    """Stop after saving a checkpoint; exits with 143 like a process killed by SIGTERM."""

    def __init__(self):
        super().__init__(EXIT_INTERRUPTED)


class StepCheckpointer:
    """Called after every optimizer step: saves every `every_steps` steps (0: never) and, when
    SIGTERM arrived, saves and stops.

    save(resume_epoch, resume_step) must write a checkpoint from which a run restarts at batch
    `resume_step` of epoch `resume_epoch` (rank 0 writes; every rank calls). Whether SIGTERM
    arrived is agreed on by all ranks through a collective, so it is asked only every
    `check_every` steps, at epoch ends and when a periodic save is due anyway.
    """

    def __init__(self, save: Callable[[int, int], None], every_steps: int = 0,
                 stop: StopSignal | None = None, log: Callable[[str], None] = print,
                 check_every: int = 1):
        self.save, self.every_steps, self.stop, self.log = save, every_steps, stop, log
        self.check_every = max(int(check_every), 1)

    def close(self) -> None:
        if self.stop is not None:
            self.stop.restore()

    def after_step(self, epoch: int, done_in_epoch: int, steps_per_epoch: int) -> None:
        periodic = self.every_steps > 0 and done_in_epoch % self.every_steps == 0
        ask = periodic or done_in_epoch % self.check_every == 0 or done_in_epoch == steps_per_epoch
        stopping = ask and self.stop is not None and self.stop.requested()
        if not (stopping or periodic) or (periodic and not stopping and done_in_epoch == steps_per_epoch):
            return  # the end-of-epoch checkpoint follows anyway
        resume_at = (epoch + 1, 0) if done_in_epoch == steps_per_epoch else (epoch, done_in_epoch)
        self.save(*resume_at)
        if stopping:
            self.log(f"received signal {self.stop.received or 'on another rank'}: saved a checkpoint "
                     f"after step {done_in_epoch}/{steps_per_epoch} of epoch {epoch}; rerun the same "
                     "command to resume from there")
            raise Interrupted()


# ---------------------------------------------------------------- loss and loss-scale watch

class NonFiniteLoss(SystemExit):
    def __init__(self):
        super().__init__(EXIT_NON_FINITE)


class StepHealth:
    """Counts on the device the losses that were NaN/inf, and watches the fp16 loss scale.

    Both are read only when the host waits anyway (print steps, before saving, end of epoch), so
    the training step never synchronises. A non-finite loss stops the run before the next save,
    which leaves the last good checkpoint in place; with stop=False the loop skips those steps
    instead (see moby/engine.py) and they are only reported.
    """

    def __init__(self, device: torch.device, advice: str, scaler=None,
                 log: Callable[[str], None] = print, stop: bool = True):
        self.seen = torch.zeros((), dtype=torch.int64, device=device)
        self.advice, self.scaler, self.log, self.stop = advice, scaler, log, stop
        self.last_loss: torch.Tensor | None = None
        self.last_scale: float | None = None

    def record(self, loss: torch.Tensor) -> None:
        self.last_loss = loss.detach()
        self.seen += ~torch.isfinite(self.last_loss)

    def check(self, iteration: int, loss: torch.Tensor | None = None) -> None:
        count = int(self.seen)
        if count and not self.stop:
            self.log(f"skipped {count} optimizer step(s) with a non-finite loss by iteration {iteration}")
            self.seen.zero_()
            count = 0
        if count:
            value = (loss if loss is not None else self.last_loss)
            shown = f"{value.item()}" if value is not None else "non-finite"
            # straight to stderr: every rank reports it, even where print() is silenced
            sys.stderr.write(f"Loss is {shown} (non-finite at or before iteration {iteration}), "
                             f"stopping training; the last checkpoint written before it is kept. "
                             f"Try {self.advice}.\n")
            sys.stderr.flush()
            raise NonFiniteLoss()
        self._watch_scale(iteration)

    def _watch_scale(self, iteration: int) -> None:
        if self.scaler is None or not self.scaler.is_enabled():
            return
        scale = float(self.scaler.get_scale())
        if self.last_scale is not None and scale < self.last_scale:
            self.log(f"gradient overflow: loss scale reduced from {self.last_scale:g} to {scale:g} "
                     f"by iteration {iteration} (the overflowing steps were skipped)")
        self.last_scale = scale
