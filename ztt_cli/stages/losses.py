"""The healing objective: distillation, exit-aware loss and the zero token's exit objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def task_loss(logits, ids, teacher_logits, kd_weight: float, temperature: float):
    """(1 - w) * CE + w * T^2 * KL(teacher || student at T), over next-token positions.

    Returns (loss, ce, kd) with ce and kd detached for logging."""
    logits = logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    if teacher_logits is None or kd_weight == 0:
        return ce, ce.detach(), None
    t = teacher_logits[:, :-1].float() / temperature
    log_p_teacher = t.log_softmax(-1)
    log_p_student = (logits / temperature).log_softmax(-1)
    kd = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1).mean() * temperature**2
    return (1 - kd_weight) * ce + kd_weight * kd, ce.detach(), kd.detach()


def exit_target(exit_logits, full_logits):
    """exp(-KL(exit || full)) per token, from detached logits: 1 when exiting changes nothing."""
    with torch.no_grad():
        log_exit = exit_logits.float().log_softmax(-1)
        log_full = full_logits.float().log_softmax(-1)
        kl = (log_exit.exp() * (log_exit - log_full)).sum(-1)
        return torch.exp(-kl.clamp(min=0))


def exit_objective(signal: torch.Tensor, target: torch.Tensor, form: str = "rank") -> torch.Tensor:
    """How far the zero attention ``signal`` is from ``target`` = exp(-KL(exit || full)), per token.

    ``bce``: binary cross-entropy, pulling p0 to the target's level (its gradient wrt the zero
    logit, p0 - target, does not vanish while p0 is small). Targets are often near 1, and p0 also
    scales its layer's attention output by (1 - p0), so this can damp the block heavily.
    ``rank`` (default): 1 - Pearson correlation of logit(p0) and logit(target) over the batch's
    tokens. It asks p0 to *order* tokens like the target and leaves its level free: the exit
    threshold is calibrated afterwards anyway, and low p0 keeps the block's output intact."""
    signal = signal.float().clamp(1e-6, 1 - 1e-6)
    if form == "bce":
        return F.binary_cross_entropy(signal, target)
    a = torch.logit(signal).flatten()
    b = torch.logit(target.clamp(1e-6, 1 - 1e-6)).flatten()
    a, b = a - a.mean(), b - b.mean()
    return 1 - (a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-9)


class HealingObjective(nn.Module):
    """One forward computes every term, so DDP sees one forward and one backward per micro-batch."""

    def __init__(self, model, kd_weight=0.5, temperature=1.0, exit_aware_weight=0.0, exit_objective_weight=0.0,
                 exit_objective_form="rank"):
        super().__init__()
        self.model = model
        self.exit_objective_form = exit_objective_form
        self.kd_weight, self.temperature = kd_weight, temperature
        self.exit_aware_weight, self.exit_objective_weight = exit_aware_weight, exit_objective_weight

    def forward(self, ids: torch.Tensor, teacher_logits: torch.Tensor | None = None):
        full = self.model(input_ids=ids)
        loss, ce, kd = task_loss(full.logits, ids, teacher_logits, self.kd_weight, self.temperature)
        metrics = {"ce": ce}
        if kd is not None:
            metrics["kd"] = kd
        cycles = self.model.config.cycles
        use_objective = self.exit_objective_weight > 0 and full.zero_attention is not None
        if cycles > 1 and (self.exit_aware_weight > 0 or use_objective):
            exit_terms, objective_terms = [], []
            for c in range(1, cycles):
                with torch.set_grad_enabled(torch.is_grad_enabled() and self.exit_aware_weight > 0):
                    exited = self.model(input_ids=ids, exit_after=c)
                if self.exit_aware_weight > 0:
                    term, exit_ce, _ = task_loss(exited.logits, ids, teacher_logits, self.kd_weight, self.temperature)
                    exit_terms.append(term)
                else:
                    exit_ce = task_loss(exited.logits, ids, None, 0, 1)[1]
                metrics[f"exit{c}_ce"] = exit_ce
                if use_objective:
                    target = exit_target(exited.logits, full.logits)
                    signal = full.zero_attention[:, c - 1].mean(1)  # mean over block layers: [B, T]
                    objective_terms.append(exit_objective(signal, target, self.exit_objective_form))
            if exit_terms:
                loss = loss + self.exit_aware_weight * torch.stack(exit_terms).mean()
            if objective_terms:
                objective = torch.stack(objective_terms).mean()
                loss = loss + self.exit_objective_weight * objective
                metrics["exit_objective"] = objective.detach()
        metrics["loss"] = loss.detach()
        return loss, metrics
