"""Checks on what callers pass to models and ``generate``: clear errors naming the argument."""

from __future__ import annotations

import torch

from .constants import IGNORE_INDEX

_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _values_readable(t: torch.Tensor) -> bool:
    """Value checks read tensors on the host: skipped while a graph is compiled (a
    data-dependent read would break it) or a CUDA graph is captured (it would sync)."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def token_ids(name: str, ids, vocab_size: int) -> torch.Tensor:
    """``ids``: integer ``[batch, seq]`` with batch, seq >= 1 and values in ``[0, vocab_size)``."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(
            f"{name} must be an integer torch.Tensor [batch, seq], got {type(ids).__name__}")
    if ids.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must have an integer dtype, got {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must be 2-D [batch, seq], got shape {list(ids.shape)}")
    if ids.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (shape {list(ids.shape)})")
    if ids.shape[1] == 0:
        raise ValueError(f"{name} has no tokens (shape {list(ids.shape)})")
    if _values_readable(ids):
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"{name} values must lie in [0, vocab_size={vocab_size}), got [{lo}, {hi}]"
            )
    return ids.long()


def attention_mask(name: str, mask, ids: torch.Tensor) -> torch.Tensor | None:
    """``mask``: None, or bool / 0-1 integers of ``ids``' shape (True = real token);
    ``ids`` may be any tensor of the sequence's ``[batch, seq]`` shape."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [batch, seq], got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"{name} must have the shape of its ids {list(ids.shape)}, "
                         f"got {list(mask.shape)}")
    if mask.device != ids.device:
        raise ValueError(f"{name} is on {mask.device} but its ids are on {ids.device}")
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be bool or 0/1 integers, got {mask.dtype}")
    if _values_readable(mask) and mask.numel() and ((mask != 0) & (mask != 1)).any():
        raise ValueError(f"{name} must hold only 0 and 1")
    return mask.bool()


def labels(name: str, lab, ids_shape, vocab_size: int) -> torch.Tensor:
    """``lab``: integer tensor of shape ``ids_shape`` (None: any 2-D), values in
    ``[0, vocab)`` or -100."""
    if not isinstance(lab, torch.Tensor) or lab.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer torch.Tensor")
    if ids_shape is None:
        if lab.dim() != 2 or 0 in lab.shape:
            raise ValueError(f"{name} must be 2-D [batch, seq] and non-empty, "
                             f"got shape {list(lab.shape)}")
    elif tuple(lab.shape) != tuple(ids_shape):
        raise ValueError(f"{name} must have shape {list(ids_shape)}, got {list(lab.shape)}")
    lab = lab.long()
    if _values_readable(lab):
        real = lab[lab != IGNORE_INDEX]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab_size):
            raise ValueError(f"{name} values must lie in [0, vocab_size={vocab_size}) or be "
                             f"{IGNORE_INDEX}, got [{int(real.min())}, {int(real.max())}]")
    return lab


def same_batch(name: str, t: torch.Tensor, batch: int) -> None:
    if t.shape[0] != batch:
        raise ValueError(f"{name} has batch {t.shape[0]}, expected {batch}")


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions that count real tokens only: ``cumsum(mask) - 1`` (0 before the
    first real token), so padding anywhere leaves the real tokens' positions as if the
    row had none."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def embedding_like(embedding) -> torch.Tensor:
    """A tensor with the dtype and device of the vectors ``embedding`` returns: an
    ``nn.Embedding``'s weight, or an empty tensor for an embedding without a float
    table (an int8/bf16 inference model's ``PackedEmbedding``)."""
    weight = getattr(embedding, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    return torch.empty(0, dtype=embedding.dtype, device=embedding.device)


def embedded(name: str, ids, embeds, mask, embedding) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x [B, L, d_model], bool mask or None)`` from token ids (``name``) through
    ``embedding``, or from ``inputs_embeds`` given directly (exactly one of the two)."""
    if (ids is None) == (embeds is None):
        raise ValueError(f"pass exactly one of {name} and inputs_embeds")
    weight, width = embedding_like(embedding), embedding.embedding_dim
    if ids is not None:
        ids = token_ids(name, ids, embedding.num_embeddings)
        if ids.device != weight.device:
            raise ValueError(f"{name} is on {ids.device} but the model is on {weight.device}")
        return embedding(ids), attention_mask("attention_mask", mask, ids)
    if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point():
        raise TypeError("inputs_embeds must be a floating-point torch.Tensor "
                        f"[batch, seq, {width}]")
    if embeds.dim() != 3 or embeds.shape[2] != width or 0 in embeds.shape[:2]:
        raise ValueError(f"inputs_embeds must have shape [batch >= 1, seq >= 1, "
                         f"{width}], got {list(embeds.shape)}")
    if embeds.device != weight.device:
        raise ValueError(f"inputs_embeds is on {embeds.device} but the model is on "
                         f"{weight.device}")
    if embeds.dtype != weight.dtype:
        raise TypeError(f"inputs_embeds has dtype {embeds.dtype} but the model's weights are "
                        f"{weight.dtype}")
    return embeds, attention_mask("attention_mask", mask, embeds[..., 0])
