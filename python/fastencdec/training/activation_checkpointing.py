"""Activation checkpointing: recompute each transformer block in the backward pass.

The blocks' ``forward`` is replaced on the instances (not wrapped in new modules),
so parameter names, ``state_dict`` keys and ``save_pretrained`` are unchanged.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["enable_activation_checkpointing", "transformer_blocks"]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Modules held directly in an ``nn.ModuleList`` (the encoder/decoder layers)."""
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            blocks.extend(module.children())
    return blocks


def enable_activation_checkpointing(model: nn.Module, blocks: list[nn.Module] | None = None) -> int:
    """Checkpoint every block (default :func:`transformer_blocks`); returns how many."""
    blocks = transformer_blocks(model) if blocks is None else blocks
    for block in blocks:
        if getattr(block, "_fastencdec_checkpointed", False):
            continue
        plain_forward = block.forward

        @functools.wraps(plain_forward)
        def forward(*args, _plain=plain_forward, **kwargs):
            if not _plain.__self__.training:  # nothing to save memory for
                return _plain(*args, **kwargs)
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block._fastencdec_checkpointed = True
    return len(blocks)
