"""Generation for both architectures (``model.generate``), gpt-fast style: prefill once,
then a decode step over static caches, one token per step.

- Encoder-decoder: the encoder reads the input once; each decoder layer's
  cross-attention K/V are projected once per input and kept per batch row (the
  ``n = num_return_sequences`` output rows of input ``b``, rows ``b * n + i``, read
  them by folding into the query-length axis of ``ops.cross_attention``, so nothing
  is copied); the self-attention cache holds only the output tokens.
- Decoder-only: prompts may be left- or right-padded; each row's real tokens are
  moved to the front (positions 0..len-1, as if run alone), so ``cache.lens`` holds
  each row's own length and new tokens overwrite its padded slots. The cache holds
  the prompt plus ``max_new_tokens``; the prompt is prefilled once and its K/V
  written into each of its ``n`` rows.
- Every step appends to the cache with ``ops.append_kv_cache`` and reads it with
  ``ops.decode_attention``; on CUDA the step can run as a CUDA graph
  (``cuda_graph``). Both architectures share the settings, the sampling and the loop.

Matching the reference model's recomputation: a generated pad token is masked as a
key in later steps; with dynamic NTK scaling the encoder keeps its padded length
and cached keys are rotated with the base of the current length (``kv_cache``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import inputs
from .argcheck import positive_int, streamer_hooks, token_id
from .kv_cache import StaticKVCache
from .ops import dispatch, validate

__all__ = ["generate", "next_tokens", "filter_top_k", "filter_top_p", "StaticKVCache"]

# --------------------------------------------------------------------------- sampling


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits per row (ties at the threshold kept)."""
    if top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p``
    (the most likely token always stays)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def next_tokens(logits: torch.Tensor, *, do_sample: bool, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``logits`` ``[R, vocab]`` -> token ids ``[R]`` (int64). Greedy takes the first
    maximum; sampling draws from ``softmax(filtered logits / temperature)`` with
    ``generator`` (on the logits' device) for reproducibility."""
    logits = logits.float()
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None:
        logits = filter_top_p(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """``generate``'s keyword arguments, checked once."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    generator: torch.Generator | None
    eos_ids: torch.Tensor | None  # int64 on the model's device; None = never stop early
    pad_id: int
    num_return_sequences: int
    emit: Callable | None
    finish: Callable | None

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        return next_tokens(logits, do_sample=self.do_sample, temperature=self.temperature,
                           top_k=self.top_k, top_p=self.top_p, generator=self.generator)


def make_settings(config, device: torch.device, *, max_new_tokens, do_sample, temperature,
                  top_k, top_p, eos_token_id, pad_token_id, num_return_sequences, streamer,
                  generator) -> Settings:
    vocab = config.vocab_size
    positive_int("max_new_tokens", max_new_tokens)
    positive_int("num_return_sequences", num_return_sequences)
    temperature = validate.temperature(temperature)
    if top_k is not None:
        positive_int("top_k", top_k)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but the model is on {device}; "
                             "create it with torch.Generator(device=...)")
    if eos_token_id is None:
        eos_token_id = config.eos_token_id
    eos = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    if isinstance(eos, (str, bytes)) or not isinstance(eos, Sequence):
        raise TypeError("eos_token_id must be an int, a sequence of ints or None (config's)")
    eos = [token_id("eos_token_id", e, vocab) for e in eos]
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    pad = token_id("pad_token_id", pad, vocab)
    emit, finish = streamer_hooks(streamer)
    return Settings(
        max_new_tokens=max_new_tokens, do_sample=bool(do_sample), temperature=temperature,
        top_k=top_k, top_p=None if top_p is None else float(top_p), generator=generator,
        eos_ids=torch.tensor(eos, dtype=torch.long, device=device) if eos else None,
        pad_id=pad, num_return_sequences=num_return_sequences, emit=emit, finish=finish,
    )


def check_length(name: str, n_positions: int, config, what: str) -> None:
    """Refuse sequences longer than the model's trained context, unless dynamic NTK
    RoPE scaling (``rope_scaling_factor > 1``) is configured to extend it."""
    if config.rope_scaling_factor == 1.0 and n_positions > config.max_position_embeddings:
        raise ValueError(
            f"{name}: {what} needs {n_positions} positions but the model supports "
            f"max_position_embeddings={config.max_position_embeddings}")


def _memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: no cap


def check_cache_size(config, n_layers: int, rows: int, max_len: int, like: torch.Tensor) -> None:
    """Refuse a KV cache larger than the device's memory before allocating it."""
    nbytes = 2 * n_layers * rows * max_len * config.n_kv_heads * config.head_dim \
        * like.element_size()
    limit = _memory_bytes(like.device)
    if nbytes > limit:
        raise ValueError(
            f"max_new_tokens: the KV cache for {rows} rows x {max_len} positions needs "
            f"{nbytes / 2**30:.1f} GiB, more than this device's {limit / 2**30:.1f} GiB")


# --------------------------------------------------------------------------- CUDA graphs

STEP_OPS = ("append_kv_cache", "decode_attention", "cross_attention")


def _should_capture(requested: bool | None, device: torch.device, dtype: torch.dtype,
                    cache: StaticKVCache) -> bool:
    if requested is None:
        return (device.type == "cuda" and cache.recompute_past is None
                and dtype in (torch.float16, torch.bfloat16, torch.float32)
                and all(dispatch.choose_backend(op, device) == "triton" for op in STEP_OPS))
    if requested and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a model on a CUDA device, not {device}")
    if requested and cache.recompute_past is not None:
        raise ValueError("cuda_graph=True cannot capture a decode step whose RoPE base changes "
                         "with the length (dynamic NTK scaling past max_position_embeddings)")
    return bool(requested)


class GraphedStep:
    """``step(tokens [R, T]) -> logits``, captured on the first call, replayed after.

    The first call warms up on a side stream (Triton compilation, allocator), which
    is harmless because a step is idempotent until the caller advances
    ``cache.lens``. The returned logits live in a static buffer overwritten by the
    next replay (the decode loop consumes them first). A step that cannot be
    captured (a host sync, an op without a Triton kernel) runs eagerly, said once."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], *, strict: bool):
        self.fn, self.strict = fn, strict
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager = False

    def _capture(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.fn(self.tokens)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self.fn(self.tokens)
        self.graph = graph

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.eager:
            return self.fn(tokens)
        if self.graph is None:
            try:
                self._capture(tokens)
            except Exception as err:
                if self.strict:
                    raise
                warnings.warn(f"CUDA graph capture of the decode step failed ({err}); "
                              "decoding eagerly", stacklevel=2)
                self.eager = True
                return self.fn(tokens)
        else:
            self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


# --------------------------------------------------------------------------- the loop


class _EvalMode:
    """Generation runs with dropout off; the model's training flag is restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def _decode_loop(first_logits: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor],
                 s: Settings) -> torch.Tensor:
    """Pick a token per row, stop rows at EOS (later tokens are PAD), stream, feed the
    tokens back. Returns ``[R, T]``, ``T <= max_new_tokens`` (shorter when every row
    hit EOS)."""
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


def _stepper(model_step, cache: StaticKVCache, start_len: int, cuda_graph, weight):
    """``step(tokens [R]) -> logits`` feeding one token per row and advancing the cache;
    ``start_len``: positions already in the longest row (the NTK length bookkeeping)."""
    forward = model_step
    if _should_capture(cuda_graph, weight.device, weight.dtype, cache):
        forward = GraphedStep(model_step, strict=bool(cuda_graph))
    fed = [start_len]

    def step(tokens: torch.Tensor) -> torch.Tensor:
        fed[0] += 1
        cache.total_len = fed[0]
        logits = forward(tokens[:, None])
        cache.advance(1)
        return logits

    return step


def _trim_trailing_padding(x: torch.Tensor, mask: torch.Tensor | None):
    """Drop the columns after the last real token of every row (keeps at least one)."""
    if mask is None:
        return x, None
    real_cols = mask.any(dim=0).nonzero()
    n = int(real_cols.max()) + 1 if real_cols.numel() else 1
    return x[:, :n], mask[:, :n]


def _start_encoder_decoder(model, x, mask, s: Settings, cuda_graph):
    config, weight = model.config, inputs.embedding_like(model.embed)
    if config.rope_scaling_factor == 1.0:  # dynamic NTK takes the base at the padded length
        x, mask = _trim_trailing_padding(x, mask)
    check_length("input_ids", x.shape[1], config, "the input")
    check_length("max_new_tokens", s.max_new_tokens, config, "the output")
    if mask is not None and bool(mask.all()):
        mask = None  # no padding: the ops' unmasked path
    rows = x.shape[0] * s.num_return_sequences
    check_cache_size(config, config.n_decoder_layers, rows, s.max_new_tokens, weight)
    states = model._encode(x, mask)
    cross_kv = model.cross_kv(states)
    cache = StaticKVCache.for_model(config, config.n_decoder_layers, rows,
                                    s.max_new_tokens, weight, mask_generated_pad=True)
    step = _stepper(lambda tokens: model.decode_step(tokens, cache, cross_kv, mask), cache, 0,
                    cuda_graph, weight)
    bos = torch.full((rows,), config.bos_token_id, dtype=torch.long, device=weight.device)
    return step(bos), step


def _left_align(x: torch.Tensor, mask: torch.Tensor):
    """Move each row's real tokens to the front (stable), drop all-padding columns.
    Returns (x ``[B, L, d]``, mask or None when nothing is padded, lengths ``[B]``)."""
    lens = mask.sum(dim=1)
    empty = (lens == 0).nonzero()
    if empty.numel():
        raise ValueError(f"attention_mask row {int(empty[0])} has no real token: a decoder-only "
                         "model needs at least one prompt token (e.g. BOS)")
    order = torch.sort((~mask).to(torch.int32), dim=1, stable=True).indices
    max_len = int(lens.max())
    x = x.gather(1, order[:, :, None].expand(-1, -1, x.shape[2]))[:, :max_len]
    aligned = torch.arange(max_len, device=x.device)[None, :] < lens[:, None]
    return x, (None if bool(aligned.all()) else aligned), lens


def _start_decoder_only(model, x, mask, s: Settings, cuda_graph):
    config, weight = model.config, inputs.embedding_like(model.embed)
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    x, mask, lens = _left_align(x, mask)
    prompt_len = x.shape[1]
    check_length("input_ids", prompt_len, config, "the prompt")
    # The last new token is never fed back: it needs no position.
    check_length("max_new_tokens", prompt_len + s.max_new_tokens - 1, config,
                 "the prompt plus the new tokens")
    n = s.num_return_sequences
    rows = x.shape[0] * n
    check_cache_size(config, config.n_layers, rows, prompt_len + s.max_new_tokens, weight)
    cache = StaticKVCache.for_model(config, config.n_layers, rows,
                                    prompt_len + s.max_new_tokens, weight)
    first_logits = model.prefill(x, mask, cache).repeat_interleave(n, dim=0)
    cache.lens.copy_(lens.repeat_interleave(n))
    step = _stepper(lambda tokens: model.decode_step(tokens, cache), cache, prompt_len,
                    cuda_graph, weight)
    return first_logits, step


@torch.no_grad()
def generate(model, input_ids=None, attention_mask=None, max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id=None, num_return_sequences: int = 1,
             streamer=None, *, generator: torch.Generator | None = None,
             pad_token_id: int | None = None, cuda_graph: bool | None = None,
             inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens for each input row.

    ``input_ids`` ``[B, L]`` (or ``inputs_embeds`` ``[B, L, d_model]``) with
    ``attention_mask`` (True/1 = real token; padding anywhere). Greedy unless
    ``do_sample``; sampling uses ``temperature``, ``top_k``, ``top_p`` and ``generator``
    (a ``torch.Generator`` on the model's device, for reproducible draws).
    ``eos_token_id``: an id or ids ending a row (default the config's; ``()`` never
    stops early); after it a row gets ``pad_token_id`` (default the config's).
    ``streamer``: ``streamer(tokens)`` or ``streamer.put(tokens)`` with each step's new
    tokens (int64 ``[B * n]``, CPU), then ``streamer.end()`` if it has one.
    ``cuda_graph``: None = capture the decode step on CUDA when every op runs a Triton
    kernel; True/False force it. A decoder-only model needs one real prompt token per
    row.

    Returns the new tokens ``[B * n, T]`` (``n = num_return_sequences``; row
    ``b * n + i`` is input ``b``'s ``i``-th sequence; no BOS), ``T <= max_new_tokens``
    (generation stops once every row has ended).
    """
    config, weight = model.config, inputs.embedding_like(model.embed)
    x, mask = inputs.embedded("input_ids", input_ids, inputs_embeds, attention_mask,
                              model.embed)
    s = make_settings(config, weight.device, max_new_tokens=max_new_tokens, do_sample=do_sample,
                      temperature=temperature, top_k=top_k, top_p=top_p,
                      eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                      num_return_sequences=num_return_sequences, streamer=streamer,
                      generator=generator)
    start = _start_encoder_decoder if model.is_encoder_decoder else _start_decoder_only
    with _EvalMode(model):
        first_logits, step = start(model, x, mask, s, cuda_graph)
        return _decode_loop(first_logits, step, s)
