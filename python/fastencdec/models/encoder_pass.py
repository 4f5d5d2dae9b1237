"""The int8 / bf16 encoder in one C++ call (``encode`` of ``_C.Int8Blocks`` /
``_C.Bf16Blocks``).

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
path must run instead: training mode (of the model or any encoder module), gradients,
``torch.compile`` tracing, forward hooks on the encoder's modules, a forced backend
other than the C++ one, or a model or input this path does not cover.
"""

from __future__ import annotations

import torch

from .. import inputs
from . import packed_plan


def plan(model):
    """The cached C++ encoder of an int8 or bf16 encoder-decoder (None if it has none)."""
    if not getattr(model, "is_encoder_decoder", False):
        return None
    return packed_plan.cached(model, "encoder", lambda m, fmt: packed_plan.build_blocks(
        m, fmt, "encoder", "encoder_norm", causal=False))


ATTENTION_PRECISIONS = ("bf16", "fp32")


def attention_precision(model) -> str:
    """``model.encoder_attention``: "bf16" (the default) or "fp32"."""
    value = getattr(model, "encoder_attention", "bf16")
    if value not in ATTENTION_PRECISIONS:
        raise ValueError(f"encoder_attention must be one of {ATTENTION_PRECISIONS}, got "
                         f"{value!r}")
    return value


def run(model, x: torch.Tensor, mask: torch.Tensor | None):
    """The final encoder states ``[B, L, d]`` of embedded ``x`` with bool ``mask`` (or
    None), or None when the module path must run."""
    if model.training or torch.compiler.is_compiling():
        return None
    encoder = plan(model)
    if encoder is None or packed_plan.module_path_needed(model, "encoder", x):
        return None
    bf16_attention = attention_precision(model) == "bf16"
    if x.dtype != packed_plan.activation_dtype(encoder) or x.device.type != "cpu":
        return None
    seq_len = x.shape[1]
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
    encoder.encode(packed_plan.bits(x), None if mask is None else mask.contiguous().numpy(),
                    positions.contiguous().numpy(), float(base), packed_plan.bits(states),
                    bf16_attention, torch.get_num_threads())
    return states
