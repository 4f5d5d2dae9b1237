"""Every op registered as a ``torch.library`` custom op ``fastencdec::<name>``, so
``torch.compile(fullgraph=True)`` and ``torch.export`` see one opaque node per op.

- The schema of each op comes from ``ops/schema.py`` (``Rope?`` as five scalars).
- Its CPU and CUDA kernels are the same entry: ``dispatch.run`` picks the backend
  (C++ on the CPU, Triton on CUDA, or what ``FASTENCDEC_BACKEND`` forces).
- A fake (meta) implementation gives output shapes for tracing.
- Autograd: ``self_attention_with_lse`` / ``cross_attention_with_lse`` differentiate
  through ``attention_backward``; the losses return their gradients from the
  forward, which the backward scales by ``grad_output``; ``apply_rope``'s backward
  is the inverse rotation.

Eager inference does not go through these ops (the dispatcher costs ~10 us per call,
measured): ``ops.<name>`` calls the backend directly unless it is being compiled or
needs autograd. Both paths run the same ``dispatch.run``.
"""

from __future__ import annotations

import torch

from . import dispatch
from .schema import SCHEMAS, flatten, unflatten

NAMESPACE = "fastencdec"


def _entry(name: str):
    schema = SCHEMAS[name]

    def run(*flat):
        args = unflatten(schema, flat)
        return dispatch.run(name, args[0].device.type, *args)

    run.__name__ = name
    return run


def _define(name: str):
    schema = SCHEMAS[name]
    return torch.library.custom_op(f"{NAMESPACE}::{name}", _entry(name),
                                   mutates_args=schema.mutates, schema=schema.torch_schema())


OPS = {name: _define(name) for name in SCHEMAS}


def call(name: str, *args):
    """Call the custom op ``fastencdec::<name>`` with canonical arguments."""
    return getattr(torch.ops.fastencdec, name)(*flatten(SCHEMAS[name], args))


# --------------------------------------------------------------------------- fakes


def _like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _lse(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


def _loss(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty((), dtype=torch.promote_types(t.dtype, torch.float32))


def _grad_or_empty(t: torch.Tensor, wanted: bool) -> torch.Tensor:
    return _like(t) if wanted else t.new_empty(0)


OPS["apply_rope"].register_fake(lambda x, *rest: _like(x))
OPS["rms_norm"].register_fake(lambda x, *rest: _like(x))
OPS["self_attention"].register_fake(lambda q, *rest: _like(q))
OPS["self_attention_with_lse"].register_fake(lambda q, *rest: (_like(q), _lse(q)))
OPS["cross_attention"].register_fake(lambda q, *rest: _like(q))
OPS["cross_attention_with_lse"].register_fake(lambda q, *rest: (_like(q), _lse(q)))
OPS["decode_attention"].register_fake(lambda q, *rest: _like(q))
OPS["append_kv_cache"].register_fake(lambda q, *rest: _like(q))


@OPS["attention_backward"].register_fake
def _(grad_out, q, k, v, *rest):
    need_dq, need_dkv = rest[-3], rest[-2]  # (..., need_dq, need_dkv, deterministic)
    return (_grad_or_empty(q, need_dq), _grad_or_empty(k, need_dkv),
            _grad_or_empty(v, need_dkv))


@OPS["distill_loss"].register_fake
def _(hidden, weight, *rest):
    return _loss(hidden), _grad_or_empty(hidden, rest[-2]), _grad_or_empty(weight, rest[-1])


@OPS["distill_loss_from_teacher_hidden"].register_fake
def _(hidden, weight, *rest):
    return _loss(hidden), _grad_or_empty(hidden, rest[-2]), _grad_or_empty(weight, rest[-1])


@OPS["distill_loss_from_logits"].register_fake
def _(logits, *rest):
    return _loss(logits), _grad_or_empty(logits, rest[-1])


# --------------------------------------------------------------------------- autograd

_ATTN_BWD = SCHEMAS["attention_backward"]


def _attention_setup(self_attn: bool):
    def setup_context(ctx, inputs, output):
        out, lse = output
        q, k, v = inputs[:3]
        ctx.mark_non_differentiable(lse)
        if self_attn:  # (q, k, v, mask, positions, offset, causal, scale, *rope, deterministic)
            mask, positions = inputs[3], inputs[4]
            ctx.scalars = (inputs[5], inputs[6], inputs[7]) + tuple(inputs[8:13])
            ctx.deterministic = inputs[13]
        else:  # (q, k, v, mask, scale, deterministic)
            mask, positions = inputs[3], None
            ctx.scalars = (0, False, inputs[4], False, 10000.0, 1.0, 0, -1)
            ctx.deterministic = inputs[5]
        ctx.save_for_backward(q, k, v, out, lse, mask, positions)
    return setup_context


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, mask, positions = ctx.saved_tensors
    need_dq = ctx.needs_input_grad[0]
    need_dkv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    offset, causal, scale, *rope = ctx.scalars
    dq, dk, dv = torch.ops.fastencdec.attention_backward(
        grad_out.contiguous(), q, k, v, out, lse, mask, positions, offset, causal, scale,
        *rope, need_dq, need_dkv, ctx.deterministic)
    n_rest = len(ctx.needs_input_grad) - 3
    return ((dq if need_dq else None), (dk if need_dkv else None),
            (dv if need_dkv else None)) + (None,) * n_rest


OPS["self_attention_with_lse"].register_autograd(_attention_backward,
                                                 setup_context=_attention_setup(True))
OPS["cross_attention_with_lse"].register_autograd(_attention_backward,
                                                  setup_context=_attention_setup(False))


def _loss_setup(ctx, inputs, output):
    grads = output[1:]  # in the order of the differentiable inputs
    ctx.mark_non_differentiable(*grads)
    ctx.save_for_backward(*grads)
    ctx.n_inputs = len(inputs)


def _loss_backward(ctx, grad_loss, *unused):
    grads = ctx.saved_tensors
    result = []
    for i in range(ctx.n_inputs):
        if i < len(grads) and ctx.needs_input_grad[i] and grads[i].numel():
            result.append(grads[i] * grad_loss.to(grads[i].dtype))
        else:
            result.append(None)
    return tuple(result)


for _name in ("distill_loss", "distill_loss_from_teacher_hidden", "distill_loss_from_logits"):
    OPS[_name].register_autograd(_loss_backward, setup_context=_loss_setup)


def _rope_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])  # positions
    ctx.scalars = tuple(inputs[2:])  # offset, rope fields..., inverse


def _rope_backward(ctx, grad):
    (positions,) = ctx.saved_tensors
    offset, on, theta, factor, max_pos, seq_len, inverse = ctx.scalars
    # the same positions give the same NTK base: the transpose is the other rotation
    dx = torch.ops.fastencdec.apply_rope(grad.contiguous(), positions, offset, on, theta,
                                         factor, max_pos, seq_len, not inverse)
    return (dx,) + (None,) * (len(ctx.scalars) + 1)


OPS["apply_rope"].register_autograd(_rope_backward, setup_context=_rope_setup)
