"""Distillation loss rows (DESIGN §4): online softmax statistics, loss, gradient in place.

One program per row of student logits ``z`` (any float dtype, read and upcast to
fp32). Per real row (``label != ignore_index``)::

    loss = alpha * tau^2 * D + (1 - alpha) * (lse(z) - z[label])

``D`` is ``KL(q || p)`` (reverse) or ``KL(p || q)`` (forward) with
``q = softmax(z / tau)`` and ``p = softmax(t / tau)`` over the shared vocabulary
prefix ``[0, shared)``; the CE term uses the untempered student over all ``V_s``.

Loop 1 streams the vocabulary once, keeping running maxima and rescaled sums
(online softmax) for the student, the tempered student and the tempered teacher,
plus ``Σ e^{x-m_x} ((x - m_x) - (y - m_y))`` for the divergence: it is kept
relative to the running maxima, so logits of magnitude 1e4 do not cancel.
Loop 2 (``WRITE_GRAD``) writes ``grad_scale * dloss/dz`` into ``g`` (which may be
``z`` itself: each block is read before it is overwritten)::

    CE:         (1 - alpha) * (softmax(z)_i - [i == label])
    reverse KL: alpha * tau * q_i * ((log q_i - log p_i) - KL)
    forward KL: alpha * tau * (q_i - p_i)            (columns >= shared: CE only)

Ignored rows are skipped before any logit is read: loss 0, gradient row 0.
A label outside ``[0, V_s)`` (labels are not value-checked on CUDA by default) is
never used as an address: with a CE term its row's loss and gradient become NaN.

``grad_scale`` is a float or a one-element fp32 tensor (read on the device, so a
caller that divides by the number of real rows never reads that count on the host).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# A finite "minus infinity": running maxima start here so that differences of
# two of them stay finite (-inf - -inf would be NaN).
NEG_BIG: tl.constexpr = tl.constexpr(-1.0e30)

BLOCK_V_MAX = 4096


@triton.jit
def _load_fp32(ptrs, mask):
    # Masked lanes get a huge finite negative logit, so every exp of them is 0. Applied
    # after the fp32 conversion: in fp16, -1e30 would become -inf (and -inf - -inf = NaN).
    return tl.where(mask, tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), NEG_BIG)


@triton.jit
def _distill_rows_kernel(
    z_ptr, stride_z,                 # student logits [rows, V_s], unit column stride
    g_ptr, stride_g,                 # gradient out [rows, V_s] (may alias z)
    t_ptr, stride_t, stride_tc,      # teacher logits [*, >= shared]
    t_rows_ptr,                      # int64 [rows]: the teacher row of each student row
    labels_ptr, loss_ptr,            # [rows] labels in, fp32 per-row loss out
    V_s, shared, ignore_index,
    inv_tau, tau, alpha, grad_scale, grad_scale_ptr,
    SCALE_PTR: tl.constexpr,         # grad_scale comes from grad_scale_ptr[0]
    REVERSE: tl.constexpr,           # True: KL(q || p), False: KL(p || q)
    HAS_DIV: tl.constexpr,           # alpha > 0
    HAS_CE: tl.constexpr,            # alpha < 1
    TEMPERED: tl.constexpr,          # tau != 1 (else z / tau == z and exps are shared)
    SAME_SOFTMAX: tl.constexpr,      # tau == 1 and shared == V_s: softmax(z) == q
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    z_row = z_ptr + row * stride_z
    g_row = g_ptr + row * stride_g
    label = tl.load(labels_ptr + row).to(tl.int64)

    if label == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, V_s, BLOCK_V):
                cols = start + offs
                zeros = tl.zeros([BLOCK_V], tl.float32).to(g_ptr.dtype.element_ty)
                tl.store(g_row + cols, zeros, mask=cols < V_s)
    else:
        t_row = t_ptr + tl.load(t_rows_ptr + row).to(tl.int64) * stride_t
        # Running statistics. x is the distribution the divergence averages over
        # (tempered student for reverse KL, tempered teacher for forward KL), y the other.
        m_x = NEG_BIG
        s_x = 0.0
        m_y = NEG_BIG
        s_y = 0.0
        acc = 0.0  # Σ e^{x - m_x} ((x - m_x) - (y - m_y))
        m_z = NEG_BIG  # untempered student (CE), over the whole vocabulary
        s_z = 0.0

        # ---- loop 1a: shared prefix --------------------------------------------
        for start in range(0, shared, BLOCK_V):
            cols = start + offs
            mask = cols < shared
            z = _load_fp32(z_row + cols, mask)
            if HAS_DIV:
                t = _load_fp32(t_row + cols * stride_tc, mask)
                if REVERSE:
                    x = z * inv_tau
                    y = t * inv_tau
                else:
                    x = t * inv_tau
                    y = z * inv_tau
                nm_x = tl.maximum(m_x, tl.max(tl.where(mask, x, NEG_BIG), 0))
                nm_y = tl.maximum(m_y, tl.max(tl.where(mask, y, NEG_BIG), 0))
                e_x = tl.where(mask, tl.exp(x - nm_x), 0.0)
                e_y = tl.where(mask, tl.exp(y - nm_y), 0.0)
                # 0 * log 0 = 0: a vanishing weight contributes nothing even if y is -inf.
                terms = tl.where(e_x > 0.0, e_x * ((x - nm_x) - (y - nm_y)), 0.0)
                r_x = tl.exp(m_x - nm_x)
                acc = r_x * (acc + s_x * ((m_x - nm_x) - (m_y - nm_y))) + tl.sum(terms, 0)
                s_x = s_x * r_x + tl.sum(e_x, 0)
                s_y = s_y * tl.exp(m_y - nm_y) + tl.sum(e_y, 0)
                m_x = nm_x
                m_y = nm_y
            if HAS_CE:
                if TEMPERED or not HAS_DIV:
                    nm_z = tl.maximum(m_z, tl.max(tl.where(mask, z, NEG_BIG), 0))
                    e_z = tl.where(mask, tl.exp(z - nm_z), 0.0)
                    s_z = s_z * tl.exp(m_z - nm_z) + tl.sum(e_z, 0)
                    m_z = nm_z

        # Student (q) and teacher (p) statistics over the prefix.
        if REVERSE:
            m_q = m_x
            s_q = s_x
            m_p = m_y
            s_p = s_y
        else:
            m_q = m_y
            s_q = s_y
            m_p = m_x
            s_p = s_x
        if HAS_CE and HAS_DIV and not TEMPERED:
            m_z = m_q  # z / 1 == z: the prefix statistics are the student's
            s_z = s_q

        # ---- loop 1b: student-only columns [shared, V_s) (CE) --------------------
        if HAS_CE:
            for start in range(shared, V_s, BLOCK_V):
                cols = start + offs
                mask = cols < V_s
                z = _load_fp32(z_row + cols, mask)
                nm_z = tl.maximum(m_z, tl.max(tl.where(mask, z, NEG_BIG), 0))
                e_z = tl.where(mask, tl.exp(z - nm_z), 0.0)
                s_z = s_z * tl.exp(m_z - nm_z) + tl.sum(e_z, 0)
                m_z = nm_z

        loss = 0.0
        if HAS_DIV:
            log_s_q = tl.log(s_q)
            log_s_p = tl.log(s_p)
            kl = acc / s_x - tl.log(s_x) + tl.log(s_y)
            loss += alpha * tau * tau * kl
        bad_label = (label < 0) | (label >= V_s)
        if HAS_CE:
            # lse - z_label, kept relative to the max (large logits would cancel)
            log_s_z = tl.log(s_z)
            z_label = tl.load(z_row + tl.where(bad_label, 0, label)).to(tl.float32)
            z_label = tl.where(bad_label, float("nan"), z_label)
            loss += (1.0 - alpha) * ((m_z - z_label) + log_s_z)
        tl.store(loss_ptr + row, loss)

        # ---- loop 2: gradient, in place ------------------------------------------
        if WRITE_GRAD:
            if SCALE_PTR:
                grad_scale = tl.load(grad_scale_ptr).to(tl.float32)
            if HAS_CE:
                grad_scale = tl.where(bad_label, float("nan"), grad_scale)
            for start in range(0, V_s, BLOCK_V):
                cols = start + offs
                mask = cols < V_s
                z = _load_fp32(z_row + cols, mask)
                grad = tl.zeros([BLOCK_V], tl.float32)
                if HAS_DIV:
                    in_prefix = cols < shared
                    log_q = (tl.where(in_prefix, z, NEG_BIG) * inv_tau - m_q) - log_s_q
                    q = tl.exp(log_q)
                    t = _load_fp32(t_row + cols * stride_tc, in_prefix)
                    log_p = (t * inv_tau - m_p) - log_s_p
                    if REVERSE:
                        d = tl.where(q > 0.0, tau * q * ((log_q - log_p) - kl), 0.0)
                    else:
                        d = tau * (q - tl.exp(log_p))
                    grad += alpha * d
                if HAS_CE:
                    if SAME_SOFTMAX and HAS_DIV:
                        soft = q  # tau == 1 and shared == V_s: softmax(z) is q
                    else:
                        soft = tl.exp((z - m_z) - log_s_z)
                    grad += (1.0 - alpha) * (soft - tl.where(cols == label, 1.0, 0.0))
                tl.store(g_row + cols, (grad * grad_scale).to(g_ptr.dtype.element_ty),
                         mask=mask)


def distill_rows(z, g, teacher, teacher_rows, labels, losses, *, shared, alpha, temperature,
                 reverse, ignore_index, grad_scale, write_grad):
    """Launch one program per row of ``z`` ``[rows, V_s]``.

    ``teacher``: a 2-D tensor whose row ``teacher_rows[r]`` holds row r's teacher
    logits (only columns ``< shared`` are read). ``labels`` ``[rows]``. Writes the
    fp32 per-row loss into ``losses`` ``[rows]`` and, if ``write_grad``,
    ``grad_scale * dloss/dz`` into ``g`` (may be ``z``); ``grad_scale``: a float or a
    one-element tensor on z's device.
    """
    rows, vocab = z.shape
    if rows == 0:
        return
    if z.stride(1) != 1 or g.stride(1) != 1:
        raise ValueError("distill_rows needs logit rows with a unit column stride")
    scale_ptr = isinstance(grad_scale, torch.Tensor)
    if scale_ptr and (grad_scale.numel() != 1 or grad_scale.device != z.device):
        raise ValueError("grad_scale must be a float or a one-element tensor on z's device")
    block = min(BLOCK_V_MAX, triton.next_power_of_2(vocab))
    _distill_rows_kernel[(rows,)](
        z, z.stride(0), g, g.stride(0),
        teacher, teacher.stride(0), teacher.stride(1), teacher_rows,
        labels, losses,
        vocab, shared, ignore_index,
        1.0 / temperature, float(temperature), float(alpha),
        1.0 if scale_ptr else float(grad_scale),
        grad_scale.to(torch.float32) if scale_ptr else losses, SCALE_PTR=scale_ptr,
        REVERSE=reverse, HAS_DIV=alpha > 0.0, HAS_CE=alpha < 1.0,
        TEMPERED=float(temperature) != 1.0,
        SAME_SOFTMAX=float(temperature) == 1.0 and shared == vocab, WRITE_GRAD=write_grad,
        BLOCK_V=block, num_warps=16 if block >= 4096 else (8 if block >= 1024 else 4),
    )
