"""The reference distillation loss against an explicit per-row formula (float64)."""

import math

import pytest
import torch

from _helpers import rand
from fastencdec import reference
from fastencdec import reference as ref


def explicit_loss(zs, zt, labels, alpha, tau, divergence, ignore_index=-100):
    """Row by row, element by element, straight from DESIGN §4."""
    total, count = 0.0, 0
    shared = min(zs.shape[1], zt.shape[1])
    for row in range(zs.shape[0]):
        y = int(labels[row])
        if y == ignore_index:
            continue
        s = [float(x) / tau for x in zs[row, :shared]]
        t = [float(x) / tau for x in zt[row, :shared]]
        ls = math.log(sum(math.exp(x - max(s)) for x in s)) + max(s)
        lt = math.log(sum(math.exp(x - max(t)) for x in t)) + max(t)
        log_q = [x - ls for x in s]
        log_p = [x - lt for x in t]
        if divergence == "reverse_kl":
            div = sum(math.exp(a) * (a - b) for a, b in zip(log_q, log_p, strict=True))
        else:
            div = sum(math.exp(b) * (b - a) for a, b in zip(log_q, log_p, strict=True))
        full = [float(x) for x in zs[row]]
        lse = math.log(sum(math.exp(x - max(full)) for x in full)) + max(full)
        ce = lse - full[y]
        total += alpha * tau * tau * div + (1 - alpha) * ce
        count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
@pytest.mark.parametrize("alpha,tau", [(0.0, 1.0), (0.5, 2.0), (1.0, 1.0), (0.3, 0.7)])
@pytest.mark.parametrize("vs,vt", [(13, 13), (13, 19), (17, 11)])
def test_matches_explicit_formula(seed, divergence, alpha, tau, vs, vt):
    n = 9
    zs, zt = rand(n, vs, dtype=torch.float64, scale=3), rand(n, vt, dtype=torch.float64, scale=3)
    labels = torch.randint(0, vs, (n,))
    labels[[1, 4]] = -100
    got = reference.distill_loss_from_logits(zs, zt, labels, alpha=alpha, temperature=tau,
                                             divergence=divergence)
    want = explicit_loss(zs, zt, labels, alpha, tau, divergence)
    assert abs(got.item() - want) <= 1e-10 * max(1.0, abs(want))


def test_linear_head_matches_logits_form(seed):
    hidden, weight = rand(8, 5, dtype=torch.float64), rand(21, 5, dtype=torch.float64)
    zt = rand(8, 30, dtype=torch.float64)
    labels = torch.randint(0, 21, (8,))
    got = reference.distill_loss(hidden, weight, zt, labels, alpha=0.4, temperature=1.5)
    want = reference.distill_loss_from_logits(hidden @ weight.T, zt, labels, alpha=0.4,
                                              temperature=1.5)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_identical_distributions_give_zero_kl(seed):
    z = rand(6, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (6,))
    for div in ("reverse_kl", "forward_kl"):
        loss = reference.distill_loss_from_logits(z, z.clone(), labels, alpha=1.0, divergence=div)
        assert abs(loss.item()) < 1e-12


def test_ignored_rows_with_nan_do_not_leak(seed):
    hidden = rand(5, 4, dtype=torch.float64).requires_grad_()
    weight = rand(7, 4, dtype=torch.float64).requires_grad_()
    zt = rand(5, 7, dtype=torch.float64)
    hidden.data[2] = float("nan")
    zt[2] = float("nan")
    labels = torch.tensor([1, 2, -100, 3, 4])
    loss = reference.distill_loss(hidden, weight, zt, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(weight.grad).all()
    assert (hidden.grad[2] == 0).all()


def test_all_rows_ignored_is_zero_with_zero_grad(seed):
    hidden = rand(3, 4, dtype=torch.float64).requires_grad_()
    weight = rand(7, 4, dtype=torch.float64).requires_grad_()
    loss = reference.distill_loss(hidden, weight, rand(3, 7, dtype=torch.float64),
                                  torch.full((3,), -100))
    loss.backward()
    assert loss.item() == 0.0 and (weight.grad == 0).all() and (hidden.grad == 0).all()


def test_huge_logits_and_one_hot_teacher_are_finite():
    zs = torch.tensor([[1e4, -1e4, 0.0], [5e3, 5e3, -5e3]], dtype=torch.float64)
    zt = torch.tensor([[0.0, 1e4, -1e4], [1e4, -1e4, -1e4]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    for div in ("reverse_kl", "forward_kl"):
        loss = reference.distill_loss_from_logits(zs, zt, labels, divergence=div)
        assert torch.isfinite(loss)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_gradcheck(seed, divergence):
    hidden = rand(6, 4, dtype=torch.float64).requires_grad_()
    weight = rand(9, 4, dtype=torch.float64).requires_grad_()
    zt = rand(6, 12, dtype=torch.float64)
    labels = torch.tensor([0, 8, -100, 3, 4, 5])
    assert torch.autograd.gradcheck(
        lambda h, w: reference.distill_loss(h, w, zt, labels, alpha=0.6, temperature=1.7,
                                            divergence=divergence),
        (hidden, weight))


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
@pytest.mark.parametrize("alpha,tau", [(0.5, 2.0), (0.0, 1.0), (1.0, 0.7)])
def test_written_out_gradient_equals_autograd(seed, divergence, alpha, tau):
    gen = torch.Generator().manual_seed(seed)
    n, v_s, v_t = 11, 40, 33
    logits = rand(n, v_s, dtype=torch.float64, generator=gen, scale=3.0).requires_grad_()
    teacher = rand(n, v_t, dtype=torch.float64, generator=gen, scale=3.0)
    labels = torch.randint(0, v_s, (n,), generator=gen)
    labels[[2, 7]] = -100
    kw = dict(alpha=alpha, temperature=tau, divergence=divergence)
    loss = ref.distill_loss_from_logits(logits, teacher, labels, **kw)
    (expected,) = torch.autograd.grad(loss, logits)
    got_loss, got = ref.distill_grads_from_logits(logits.detach(), teacher, labels, **kw)
    torch.testing.assert_close(got_loss, loss.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
