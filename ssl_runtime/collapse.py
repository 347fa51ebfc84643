"""Warn once when a run's collapse signals stay in the collapsed range (DINO: teacher entropy and
teacher-student KL, see dino.loss.DINOLoss; MoBY: the positive-negative similarity gap, see
moby.model.similarity_signals).

A loss that hardly moves is what both a slow start and a collapse look like; these signals tell
them apart. The watch is fed the signals' recent values at print steps only (when the host reads
them anyway), ignores the warm-up, and warns when `patience` checks in a row diagnose a collapse:
one noisy reading does not, a run that stays collapsed does.
"""

from __future__ import annotations

from typing import Callable, Mapping

Diagnosis = Callable[[Mapping[str, float]], "str | None"]


class CollapseWatch:
    """`diagnose(values)` returns a message (what is collapsed and what to try) or None."""

    def __init__(self, diagnose: Diagnosis, start_step: int = 0, patience: int = 5,
                 log: Callable[[str], None] = print):
        self.diagnose = diagnose
        self.start_step = start_step
        self.patience = max(int(patience), 1)
        self.log = log
        self.streak = 0
        self.first_step: int | None = None
        self.warned = False

    def observe(self, step: int, values: Mapping[str, float]) -> str | None:
        """Feed one check (host floats); returns the warning when it is given (once per run)."""
        if self.warned or step < self.start_step:
            return None
        message = self.diagnose(values)
        if message is None:
            self.streak, self.first_step = 0, None
            return None
        self.streak += 1
        if self.first_step is None:
            self.first_step = step
        if self.streak < self.patience:
            return None
        self.warned = True
        warning = (f"WARNING: training may have collapsed (steps {self.first_step}-{step}, "
                   f"{self.streak} checks in a row): {message}")
        self.log(warning)
        return warning
