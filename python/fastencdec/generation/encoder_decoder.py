"""``EncoderDecoderLM.generate``: encode once, then decode with static caches.

- The encoder runs once per input.
- Each decoder layer's cross-attention K/V are projected once per input and kept
  per batch row; the ``n = num_return_sequences`` output rows of input ``b``
  (rows ``b * n + i``) read them by folding into the query-length axis of
  ``ops.cross_attention`` (see ``CrossAttention.forward``), so nothing is copied.
- The self-attention KV cache is preallocated for ``max_new_tokens`` entries (BOS
  plus the first ``max_new_tokens - 1`` new tokens) and filled with
  ``ops.append_kv_cache``; ``ops.decode_attention`` reads it.
- On CUDA the decode step can run as a CUDA graph (``cuda_graph``).
"""

from __future__ import annotations

import torch

from .common import eval_mode, prepare_inputs, trim_trailing_padding
from .cuda_graph import maybe_graphed
from .kv_cache import StaticKVCache
from .loop import decode_loop
from .settings import check_length, make_settings


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id=None, num_return_sequences: int = 1,
             streamer=None, *, generator: torch.Generator | None = None,
             pad_token_id: int | None = None, cuda_graph: bool | None = None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens for each input row.

    ``input_ids`` ``[B, L]`` with ``attention_mask`` (True/1 = real token; padding
    anywhere, usually on the right). Greedy unless ``do_sample``; sampling uses
    ``temperature``, ``top_k``, ``top_p`` and ``generator`` (a ``torch.Generator`` on
    the model's device, for reproducible draws). ``eos_token_id``: an id or ids ending
    a row (default the config's; ``()`` never stops early); after it a row gets
    ``pad_token_id`` (default the config's). ``streamer``: ``streamer(tokens)`` or
    ``streamer.put(tokens)`` with each step's new tokens (int64 ``[B * n]``, CPU),
    then ``streamer.end()`` if it has one. ``cuda_graph``: None = capture the decode
    step on CUDA when every op runs a Triton kernel; True/False force it.

    Returns the new tokens ``[B * n, T]`` (``n = num_return_sequences``; row
    ``b * n + i`` is input ``b``'s ``i``-th sequence; no BOS), ``T <= max_new_tokens``
    (generation stops once every row has ended).
    """
    config = model.config
    weight = model.embed.weight
    ids, mask = prepare_inputs(model, input_ids, attention_mask)
    s = make_settings(config, weight.device, max_new_tokens=max_new_tokens, do_sample=do_sample,
                      temperature=temperature, top_k=top_k, top_p=top_p,
                      eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                      num_return_sequences=num_return_sequences, streamer=streamer,
                      generator=generator)
    ids, mask = trim_trailing_padding(ids, mask)
    check_length("input_ids", ids.shape[1], config, "the input")
    check_length("max_new_tokens", s.max_new_tokens, config, "the output")
    if mask is not None and bool(mask.all()):
        mask = None  # no padding: the ops' unmasked path

    with eval_mode(model):
        encoder_states = model.encode(ids, mask)
        cross_kv = model.cross_kv(encoder_states)
        rows = ids.shape[0] * s.num_return_sequences
        cache = StaticKVCache.for_model(config, config.n_decoder_layers, rows,
                                        s.max_new_tokens, weight)
        forward = maybe_graphed(lambda tokens: model.decode_step(tokens, cache, cross_kv, mask),
                                cuda_graph, weight.device, weight.dtype)

        def step(tokens: torch.Tensor) -> torch.Tensor:
            logits = forward(tokens[:, None])
            cache.advance(1)
            return logits

        bos = torch.full((rows,), config.bos_token_id, dtype=torch.long, device=weight.device)
        return decode_loop(step(bos), step, s)
