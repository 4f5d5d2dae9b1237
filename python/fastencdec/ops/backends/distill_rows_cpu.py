"""The distillation row kernel for the CPU: the math of
``fastencdec.kernels.distill_loss`` in vectorised torch ops over one chunk of rows.

Per row (DESIGN §4, every row here is real)::

    loss = alpha * tau^2 * D + (1 - alpha) * (lse(z) - z[label])
    grad = alpha * dD + (1 - alpha) * (softmax(z) - onehot(label)),  times grad_scale

with ``dD = tau * q * ((log q - log p) - KL)`` (reverse KL) or ``tau * (q - p)``
(forward KL) over the shared prefix. A term whose weight is zero is not computed
(the teacher is not read when ``alpha == 0``). Statistics run in fp32 (float64
stays float64); the gradient is written into ``g`` (which may be ``z``).
"""

from __future__ import annotations

import torch


def distill_rows(z, g, teacher, teacher_rows, labels, losses, *, shared, alpha, temperature,
                 reverse, ignore_index, grad_scale, write_grad):
    rows = z.shape[0]
    if rows == 0:
        return
    compute = torch.promote_types(z.dtype, torch.float32)
    zc = z.to(compute)
    real = labels != ignore_index
    loss = torch.zeros(rows, dtype=compute, device=z.device)
    grad = torch.zeros_like(zc) if write_grad else None
    if alpha > 0.0:
        tau = float(temperature)
        t = teacher.index_select(0, teacher_rows)[:, :shared].to(compute)
        log_q = torch.log_softmax(zc[:, :shared] / tau, dim=-1)
        log_p = torch.log_softmax(t / tau, dim=-1)
        q = log_q.exp()
        if reverse:
            # 0 * log 0 = 0: a vanishing student weight contributes nothing
            ratio = torch.where(q > 0, log_q - log_p, torch.zeros((), dtype=compute))
            kl = (q * ratio).sum(-1)
            d = tau * q * (ratio - kl[:, None])
        else:
            p = log_p.exp()
            kl = (p * torch.where(p > 0, log_p - log_q, torch.zeros((), dtype=compute))).sum(-1)
            d = tau * (q - p)
        loss += alpha * tau * tau * kl
        if write_grad:
            grad[:, :shared] += alpha * d
    if alpha < 1.0:
        safe = torch.where(real, labels, 0).to(torch.int64)
        log_s = torch.log_softmax(zc, dim=-1)
        loss += (1.0 - alpha) * -log_s.gather(1, safe[:, None]).squeeze(1)
        if write_grad:
            soft = log_s.exp_()
            soft.scatter_add_(1, safe[:, None], torch.full((rows, 1), -1.0, dtype=compute))
            grad += (1.0 - alpha) * soft
    losses.copy_(torch.where(real, loss, torch.zeros((), dtype=compute)).to(losses.dtype))
    if write_grad:
        grad.mul_(grad_scale)
        grad.masked_fill_(~real[:, None], 0.0)
        g.copy_(grad)
