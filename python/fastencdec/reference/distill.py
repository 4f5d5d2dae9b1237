"""Distillation loss (DESIGN §4), plain PyTorch.

Per real target position (``labels != ignore_index``)::

    loss = alpha * tau**2 * D + (1 - alpha) * CE(softmax(z_S), y)

with ``q_S = softmax(z_S / tau)``, ``p_T = softmax(z_T / tau)``, ``D = KL(q_S || p_T)``
(``"reverse_kl"``) or ``KL(p_T || q_S)`` (``"forward_kl"``), averaged over the
real positions (0 when there are none).

Vocabularies: the divergence is taken over the shared prefix ``min(V_s, V_t)``,
each distribution renormalised over it; the CE term uses the student's full
vocabulary (so a label is valid if it is ``< V_s``). Ignored rows are dropped
before any arithmetic, so NaN logits there cannot reach the loss or its gradient.
A term whose weight is zero is not computed: with ``alpha = 0`` the teacher is never
read (NaN teacher logits cannot reach the loss), with ``alpha = 1`` the CE term is
skipped.
"""

from __future__ import annotations

import torch

from ..constants import DIVERGENCES

__all__ = ["distill_loss", "distill_loss_from_logits", "distill_loss_from_teacher_hidden",
           "distill_grads_from_logits", "DIVERGENCES"]


def distill_loss_from_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    divergence: str = "reverse_kl",
    ignore_index: int = -100,
) -> torch.Tensor:
    """``student_logits`` ``[N, V_s]``, ``teacher_logits`` ``[N, V_t]``, ``labels`` ``[N]``."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    compute = torch.promote_types(student_logits.dtype, torch.float32)
    real = labels != ignore_index
    z_s = student_logits[real].to(compute)
    z_t = teacher_logits[real].detach().to(compute)
    y = labels[real].long()
    n_real = z_s.shape[0]
    if n_real == 0:  # keeps the graph (zero gradients) without touching masked rows
        return z_s.sum() * 0.0

    per_row = torch.zeros(n_real, dtype=compute, device=z_s.device)
    if alpha > 0.0:
        shared = min(z_s.shape[-1], z_t.shape[-1])
        tau = float(temperature)
        log_q = torch.log_softmax(z_s[:, :shared] / tau, dim=-1)
        log_p = torch.log_softmax(z_t[:, :shared] / tau, dim=-1)
        if divergence == "reverse_kl":
            div = (log_q.exp() * (log_q - log_p)).sum(-1)
        else:
            div = (log_p.exp() * (log_p - log_q)).sum(-1)
        per_row = per_row + alpha * tau * tau * div
    if alpha < 1.0:
        ce = -torch.log_softmax(z_s, dim=-1).gather(-1, y[:, None]).squeeze(-1)
        per_row = per_row + (1.0 - alpha) * ce
    return (per_row.sum() / n_real).to(compute)


def distill_loss(student_hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                 teacher_logits: torch.Tensor, labels: torch.Tensor, *, chunk_size=None,
                 **settings) -> torch.Tensor:
    """Student logits are ``student_hidden [N, d] @ lm_head_weight[V_s, d].T``; then
    :func:`distill_loss_from_logits` with ``settings`` (``alpha``, ``temperature``,
    ``divergence``, ``ignore_index``). ``chunk_size`` is accepted for signature parity
    with the fused kernels and ignored."""
    del chunk_size
    real = labels != settings.get("ignore_index", -100)
    logits = student_hidden[real] @ lm_head_weight.t()
    return distill_loss_from_logits(logits, teacher_logits[real], labels[real], **settings)


def distill_loss_from_teacher_hidden(student_hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                                     teacher_hidden: torch.Tensor,
                                     teacher_head_weight: torch.Tensor, labels: torch.Tensor,
                                     **settings) -> torch.Tensor:
    """Teacher logits are ``teacher_hidden [N, d_t] @ teacher_head_weight[V_t, d_t].T``
    (no gradient flows to the teacher); then :func:`distill_loss`."""
    teacher_logits = teacher_hidden.detach() @ teacher_head_weight.detach().t()
    return distill_loss(student_hidden, lm_head_weight, teacher_logits, labels, **settings)


def distill_grads_from_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    divergence: str = "reverse_kl",
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, dloss/dstudent_logits)`` of :func:`distill_loss_from_logits`, written out::

        reverse KL: alpha * tau * q * ((log q - log p) - KL(q || p))   (shared prefix)
        forward KL: alpha * tau * (q - p)                              (shared prefix)
        CE:         (1 - alpha) * (softmax(z) - onehot(label))

    divided by the number of real rows; ignored rows get zero gradient."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    compute = torch.promote_types(student_logits.dtype, torch.float32)
    real = labels != ignore_index
    z_s = student_logits[real].to(compute)
    y = labels[real].long()
    n_real = z_s.shape[0]
    grad = torch.zeros(student_logits.shape, dtype=compute, device=student_logits.device)
    if n_real == 0:
        return torch.zeros((), dtype=compute, device=grad.device), grad.to(student_logits.dtype)
    per_row = torch.zeros(n_real, dtype=compute, device=z_s.device)
    g = torch.zeros_like(z_s)
    if alpha > 0.0:
        z_t = teacher_logits[real].detach().to(compute)
        shared = min(z_s.shape[-1], z_t.shape[-1])
        tau = float(temperature)
        log_q = torch.log_softmax(z_s[:, :shared] / tau, dim=-1)
        log_p = torch.log_softmax(z_t[:, :shared] / tau, dim=-1)
        q, p = log_q.exp(), log_p.exp()
        zero = torch.zeros((), dtype=compute, device=z_s.device)
        if divergence == "reverse_kl":
            ratio = torch.where(q > 0, log_q - log_p, zero)
            div = (q * ratio).sum(-1)
            g[:, :shared] += alpha * tau * q * (ratio - div[:, None])
        else:
            div = (p * torch.where(p > 0, log_p - log_q, zero)).sum(-1)
            g[:, :shared] += alpha * tau * (q - p)
        per_row = per_row + alpha * tau * tau * div
    if alpha < 1.0:
        log_s = torch.log_softmax(z_s, dim=-1)
        per_row = per_row + (1.0 - alpha) * -log_s.gather(-1, y[:, None]).squeeze(-1)
        g += (1.0 - alpha) * (log_s.exp() - torch.nn.functional.one_hot(y, z_s.shape[-1]))
    grad[real] = g / n_real
    return per_row.sum() / n_real, grad.to(student_logits.dtype)
