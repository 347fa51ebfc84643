"""The DINO objective: cross-entropy between a centred, sharpened teacher and the student."""

from __future__ import annotations

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

        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the teacher's mean output over the global batch (all ranks)."""
        batch_center = _at_least_float32(teacher_output).sum(dim=0, keepdim=True)
        all_reduce_sum_(batch_center)
        batch_center /= teacher_output.shape[0] * get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
