"""``DecoderOnlyLM.generate``: prefill the prompt into a static KV cache, then decode.

Prompts may be left- or right-padded: each row's real tokens are first moved to
the front (positions 0..len-1, as if run alone), so ``cache.lens`` can hold each
row's own length and new tokens overwrite that row's padded slots; no key mask
is needed while decoding. The cache holds ``prompt + max_new_tokens`` entries
per row; with ``num_return_sequences = n`` the prompt is prefilled once and its
K/V written into each of its ``n`` rows (they diverge afterwards).
"""

from __future__ import annotations

import torch

from .common import eval_mode, prepare_inputs
from .cuda_graph import maybe_graphed
from .kv_cache import StaticKVCache
from .loop import decode_loop
from .settings import check_length, make_settings


def left_align(ids: torch.Tensor, mask: torch.Tensor):
    """Move each row's real tokens to the front (stable), drop all-padding columns.
    Returns (ids ``[B, L]``, mask or None when nothing is padded, lengths ``[B]``)."""
    lens = mask.sum(dim=1)
    empty = (lens == 0).nonzero()
    if empty.numel():
        raise ValueError(f"attention_mask row {int(empty[0])} has no real token: a decoder-only "
                         "model needs at least one prompt token (e.g. BOS)")
    order = torch.sort((~mask).to(torch.int32), dim=1, stable=True).indices
    max_len = int(lens.max())
    ids = ids.gather(1, order)[:, :max_len]
    aligned = torch.arange(max_len, device=ids.device)[None, :] < lens[:, None]
    return ids, (None if bool(aligned.all()) else aligned), lens


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id=None, num_return_sequences: int = 1,
             streamer=None, *, generator: torch.Generator | None = None,
             pad_token_id: int | None = None, cuda_graph: bool | None = None) -> torch.Tensor:
    """Continue each prompt row by up to ``max_new_tokens`` tokens.

    Same arguments and result as ``EncoderDecoderLM.generate``: returns only the new
    tokens ``[B * n, T]`` (row ``b * n + i``), PAD after a row's EOS. Every row needs
    at least one real prompt token.
    """
    config = model.config
    weight = model.embed.weight
    ids, mask = prepare_inputs(model, input_ids, attention_mask)
    s = make_settings(config, weight.device, max_new_tokens=max_new_tokens, do_sample=do_sample,
                      temperature=temperature, top_k=top_k, top_p=top_p,
                      eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                      num_return_sequences=num_return_sequences, streamer=streamer,
                      generator=generator)
    if mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    ids, mask, lens = left_align(ids, mask)
    prompt_len = ids.shape[1]
    check_length("input_ids", prompt_len, config, "the prompt")
    # The last new token is never fed back: it needs no position.
    check_length("max_new_tokens", prompt_len + s.max_new_tokens - 1, config,
                 "the prompt plus the new tokens")

    with eval_mode(model):
        n = s.num_return_sequences
        cache = StaticKVCache.for_model(config, config.n_layers, ids.shape[0] * n,
                                        prompt_len + s.max_new_tokens, weight)
        first_logits = model.prefill(ids, mask, cache).repeat_interleave(n, dim=0)
        cache.lens.copy_(lens.repeat_interleave(n))
        forward = maybe_graphed(lambda tokens: model.decode_step(tokens, cache),
                                cuda_graph, weight.device, weight.dtype)

        def step(tokens: torch.Tensor) -> torch.Tensor:
            logits = forward(tokens[:, None])
            cache.advance(1)
            return logits

        return decode_loop(first_logits, step, s)
