"""The DINO objective: cross-entropy between a centred, sharpened teacher and the student."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssl_runtime.distributed import all_reduce_sum_, get_world_size


def teacher_temperature_schedule(warmup_teacher_temp: float, teacher_temp: float,
                                 warmup_epochs: int, epochs: int) -> np.ndarray:
    """One temperature per epoch: linear warm-up, then constant (a hot teacher early is unstable)."""
    warmup = np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)
    return np.concatenate((warmup, np.full(epochs - warmup_epochs, teacher_temp)))


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 network outputs are scored in float32 (as upstream); float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class DINOLoss(nn.Module):
    """Average over (teacher view, student view) pairs with different views of
    H(softmax((t - center) / T_teacher), softmax(s / T_student)).

    The teacher sees the 2 global crops; the student sees all `ncrops`. Instead of upstream's
    Python loop over pairs, every cross-entropy sum is computed at once and the same-view
    (diagonal) terms are subtracted: the result is identical.

    (ours) Each call also leaves the two collapse signals of the DINO paper (section 5.3, which
    splits the cross-entropy as H(P_t, P_s) = h(P_t) + KL(P_t || P_s)) as 0-d device tensors,
    read only when a line is printed:

    - `teacher_entropy`: the mean over the 2 x batch teacher rows of h(P_t) = -sum_k p_k ln p_k,
      P_t = softmax((t - center) / T_teacher) with the centre before this call's update (the
      distribution the loss uses). In nats, between 0 and ln(out_dim) (`max_entropy`).
    - `kl`: the loss minus `teacher_entropy`, i.e. the mean of KL(P_t || P_s) over the loss's
      (teacher view, other student view, sample) terms: every teacher view meets the same number
      (ncrops - 1) of student views, so the pairs' mean of h(P_t) is `teacher_entropy`.

    KL -> 0 means the student reproduces the teacher exactly, which a centred, sharper teacher
    only allows for a constant output: collapse. The entropy tells which one: -> ln(out_dim),
    a uniform teacher (too little sharpening); -> 0, one dimension wins (too little centring).
    See `collapse_kind`.
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temperature_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
        self.max_entropy = math.log(out_dim)
        self.teacher_entropy: torch.Tensor | None = None  # set by forward, see the class docstring
        self.kl: torch.Tensor | None = None

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        n_teacher = 2
        batch = teacher_output.shape[0] // n_teacher
        student_logp = F.log_softmax(_at_least_float32(student_output) / self.student_temp, dim=-1)
        student_logp = student_logp.view(self.ncrops, batch, -1)

        temp = float(self.teacher_temp_schedule[epoch])
        teacher_p = F.softmax((_at_least_float32(teacher_output) - self.center) / temp, dim=-1).detach()
        teacher_p = teacher_p.view(n_teacher, batch, -1)

        # sum_{t, s} <p_t, log q_s> over all pairs, minus the pairs where t and s are the same view
        all_pairs = (teacher_p.sum(0) * student_logp.sum(0)).sum()
        same_view = (teacher_p * student_logp[:n_teacher]).sum()
        n_pairs = n_teacher * self.ncrops - min(n_teacher, self.ncrops)
        loss = -(all_pairs - same_view) / (batch * n_pairs)

        with torch.no_grad():  # one more pass over the teacher's probabilities; no host sync
            self.teacher_entropy = torch.special.entr(teacher_p).sum(-1).mean()  # -p ln p, 0 at p = 0
            self.kl = loss.detach() - self.teacher_entropy
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the teacher's mean output over the global batch (all ranks)."""
        batch_center = _at_least_float32(teacher_output).sum(dim=0, keepdim=True)
        all_reduce_sum_(batch_center)
        batch_center /= teacher_output.shape[0] * get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


# (ours) KL below this fraction of ln(out_dim), the loss of a uniform guess, counts as KL -> 0: the
# student has next to nothing left to learn from the teacher. A run that learns keeps KL at a
# good part of a nat (the 32-px CPU recipe: 0.97 at the start, 0.75 after 50 steps).
COLLAPSE_KL_FRACTION = 0.01


def collapse_kind(teacher_entropy: float, kl: float, max_entropy: float) -> str | None:
    """None, or which collapse the signals show (see DINOLoss): `uniform` (the teacher's entropy
    in the upper half of [0, ln(out_dim)]) or `one dimension` (the lower half), once the KL is
    below COLLAPSE_KL_FRACTION of ln(out_dim)."""
    if not kl < COLLAPSE_KL_FRACTION * max_entropy:  # a NaN KL is the NaN guard's business
        return None
    return "uniform" if teacher_entropy > max_entropy / 2 else "one dimension"
