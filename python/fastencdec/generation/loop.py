"""The decode loop both architectures share: pick a token per row, stop rows at EOS
(later tokens are PAD), stream, and feed the tokens back through the cached step."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .settings import Settings


def decode_loop(first_logits: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor],
                s: Settings) -> torch.Tensor:
    """``first_logits`` ``[R, vocab]`` predict each row's first new token;
    ``step(tokens [R])`` feeds tokens and returns the next logits. Returns the new
    tokens ``[R, T]``, ``T <= max_new_tokens`` (shorter when every row hit EOS)."""
    rows, device = first_logits.shape[0], first_logits.device
    out = torch.full((rows, s.max_new_tokens), s.pad_id, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    logits, n_out = first_logits, s.max_new_tokens
    for t in range(s.max_new_tokens):
        tokens = s.pick(logits).masked_fill(finished, s.pad_id)
        out[:, t] = tokens
        if s.emit is not None:
            s.emit(tokens.cpu())
        if s.eos_ids is not None:
            finished |= torch.isin(tokens, s.eos_ids)
            if bool(finished.all()):
                n_out = t + 1
                break
        if t + 1 < s.max_new_tokens:  # the last token is never fed back
            logits = step(tokens)
    if s.finish is not None:
        s.finish()
    return out[:, :n_out]
