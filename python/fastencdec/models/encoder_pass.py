"""The int8 / bf16 encoder in one C++ call (``_C.Int8Encoder``, ``_C.Bf16Encoder``).

Module by module, a mu-330m int8 encoder pass over 512 tokens spent ~20 ms of its
~390 ms between the GEMMs and the attention: page faults on every freshly allocated
norm, projection and residual output, the q/k/v copies of the fused projection's
split, and the residual adds. For an encoder-decoder converted by
``to_inference(model, "int8" | "bf16")`` (fused QKV, GELU in fc1's epilogue) the whole
encoder -- norms, projections, RoPE attention with the padding mask, MLPs, residuals
and the final norm -- runs as one call to the same kernels in the same order, with its
buffers allocated once, so the states equal the module path's bitwise (tested).

The attention's two products (scores and probability-weighted values) take bf16
operands by default -- q and k after RoPE, v and the probabilities rounded to bf16,
sums, softmax and outputs in fp32, as flash attention does on GPUs -- which runs
AVX512_BF16's ``vdpbf16ps`` where the CPU has it (the mu-330m encoder's attention
1.5x faster than in fp32; the same rounded operands go through fp32 products
elsewhere). ``model.encoder_attention = "fp32"`` keeps the module path's fp32 products,
and then the states equal the module path's bitwise (tested either way).

``EncoderDecoderLM._encode`` calls :func:`run`, which returns None whenever the module
path must run instead: training mode, gradients, ``torch.compile`` tracing, forward
hooks on the encoder's modules, or a model or input this path does not cover.
"""

from __future__ import annotations

import torch

from .. import inputs
from . import packed_plan
from .layers import GeluMLP

try:
    from fastencdec._C import Bf16Encoder, Int8Encoder
except ImportError:  # pragma: no cover - the compiled module is part of the package
    Bf16Encoder = Int8Encoder = None


def _build(model, fmt: str):
    config = model.config
    refs: list = []
    lin = lambda module: packed_plan.linear(module, fmt, refs)  # noqa: E731
    nrm = lambda module: packed_plan.norm(module, config.norm_eps, refs)  # noqa: E731
    layers = []
    for block in model.encoder:
        attn, mlp = block.attn, block.mlp
        refs.append((attn, "causal", attn.causal))
        if (attn.causal or not isinstance(mlp, GeluMLP)
                or not packed_plan.fused_gelu(mlp.fc1, refs)):
            return None, refs
        parts = (nrm(block.norm1), lin(attn._modules.get("qkv_proj")), lin(attn.out_proj),
                 nrm(block.norm2), lin(mlp.fc1), lin(mlp.fc2))
        if any(p is None for p in parts):
            return None, refs
        layers.append(parts)
    final = nrm(model.encoder_norm)
    if final is None or not layers:
        return None, refs
    cls = Int8Encoder if fmt == "int8" else Bf16Encoder
    return cls(config.d_model, config.n_heads, config.n_kv_heads, config.head_dim,
               config.norm_eps, layers, final), refs


def plan(model):
    """The cached C++ encoder of an int8 or bf16 encoder-decoder (None if it has none)."""
    if Int8Encoder is None:
        return None
    return packed_plan.cached(model, "encoder", _build)


ATTENTION_PRECISIONS = ("bf16", "fp32")


def attention_precision(model) -> str:
    """``model.encoder_attention``: "bf16" (the default) or "fp32"."""
    value = getattr(model, "encoder_attention", "bf16")
    if value not in ATTENTION_PRECISIONS:
        raise ValueError(f"encoder_attention must be one of {ATTENTION_PRECISIONS}, got "
                         f"{value!r}")
    return value


def _hooked(model) -> bool:
    """Whether a forward hook would see the encoder's modules (the one call skips them)."""
    from torch.nn.modules import module as nn_module
    if (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
            or nn_module._global_forward_hooks_always_called):
        return True
    mods = [model.encoder, model.encoder_norm, *model.encoder.modules()]
    return any(m._forward_hooks or m._forward_pre_hooks for m in mods)


def run(model, x: torch.Tensor, mask: torch.Tensor | None):
    """The final encoder states ``[B, L, d]`` of embedded ``x`` with bool ``mask`` (or
    None), or None when the module path must run."""
    if model.training or torch.compiler.is_compiling():
        return None
    encoder = plan(model)
    if encoder is None or _hooked(model):
        return None
    bf16_attention = attention_precision(model) == "bf16"
    dtype = torch.bfloat16 if isinstance(encoder, Bf16Encoder) else torch.float32
    if (x.dtype != dtype or x.device.type != "cpu"
            or (torch.is_grad_enabled() and x.requires_grad)):
        return None
    batch, seq_len = x.shape[0], x.shape[1]
    if mask is None:
        positions = torch.arange(seq_len, dtype=torch.int64).view(1, seq_len)
    else:
        positions = inputs.positions_from_mask(mask)
    rope = model.encoder[0].attn.rope
    if model.config.rope_scaling_factor > 1.0:  # dynamic NTK at the padded length (_encode)
        rope = rope.at_length(seq_len)
    head_dim = model.config.head_dim
    base = (rope.base(head_dim, int(positions.max()) + 1) if rope.needs_positions_max()
            else rope.base(head_dim))
    x = x.detach().contiguous()
    states = torch.empty_like(x)
    encoder.forward(packed_plan.bits(x), None if mask is None else mask.contiguous().numpy(),
                    positions.contiguous().numpy(), float(base), packed_plan.bits(states),
                    bf16_attention, torch.get_num_threads())
    return states
