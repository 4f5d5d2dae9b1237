"""Generation with an int8/bf16 model on the C++ kernels alone: numpy arrays in,
numpy arrays out, no torch in the process.

The steps are the torch model's (``fastencdec.generation``), in the same order, on the
same kernels and the same data, so greedy tokens -- and the logits of every step --
equal ``model.generate``'s bitwise for a model loaded with ``load_inference`` from the
same directory (tested):

- encoder-decoder: the encoder in one call (``Int8Blocks``/``Bf16Blocks.encode``),
  every decoder layer's cross-attention K/V from one stacked projection, then one
  ``Int8DecoderStep``/``Bf16DecoderStep`` call per token over a static KV cache;
- decoder-only: prompts left-aligned, prefilled in one call (``prefill``), then the
  same steps.

What the runtime leaves to the torch model: training, fp32 weights (the torch model
runs them on MKL), SwiGLU MLPs, ``inputs_embeds`` (image tokens), and dynamic NTK
scaling past ``max_position_embeddings`` (which recomputes the decoder every step).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np

from .. import _C
from ..argcheck import int_at_least, streamer_hooks, token_id
from ..argcheck import temperature as check_temperature
from ..rope_math import rope_base
from . import sampling
from .weights import Linear, WeightReader, open_weights


def default_threads() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _token_ids(name: str, ids, vocab: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{name} must hold integer token ids [batch, seq], got dtype "
                        f"{ids.dtype}")
    if ids.ndim != 2 or 0 in ids.shape:
        raise ValueError(f"{name} must be 2-D [batch >= 1, seq >= 1], got shape "
                         f"{list(ids.shape)}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"{name} values must lie in [0, vocab_size={vocab}), got [{lo}, {hi}]")
    return ids.astype(np.int64)


def _mask(mask, ids: np.ndarray) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask must have the shape of its ids {list(ids.shape)}, "
                         f"got {list(mask.shape)}")
    if mask.dtype == np.bool_:
        return np.ascontiguousarray(mask)  # the kernels read dense rows
    if not np.issubdtype(mask.dtype, np.integer):
        raise TypeError(f"attention_mask must be bool or 0/1 integers, got {mask.dtype}")
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("attention_mask must hold only 0 and 1")
    return mask.astype(np.bool_)


class _Settings:
    """``generate``'s keyword arguments, checked once (as ``generation.make_settings``)."""

    def __init__(self, config, *, max_new_tokens, do_sample, temperature, top_k, top_p,
                 eos_token_id, pad_token_id, num_return_sequences, streamer, seed):
        vocab = config.vocab_size
        self.max_new_tokens = int_at_least("max_new_tokens", max_new_tokens, 1)
        self.n = int_at_least("num_return_sequences", num_return_sequences, 1)
        temperature = check_temperature(temperature)
        if top_k is not None:
            int_at_least("top_k", top_k, 1)
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                                  or not 0 < top_p <= 1):
            raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
        eos = config.eos_token_id if eos_token_id is None else eos_token_id
        eos = [eos] if isinstance(eos, (int, np.integer)) else eos
        if isinstance(eos, (str, bytes)) or not isinstance(eos, Sequence):
            raise TypeError("eos_token_id must be an int, a sequence of ints or None (config's)")
        eos = [token_id("eos_token_id", e, vocab) for e in eos]
        pad = config.pad_token_id if pad_token_id is None else pad_token_id
        self.pad = token_id("pad_token_id", pad, vocab)
        self.eos = np.asarray(eos, dtype=np.int64) if eos else None
        self.do_sample, self.temperature = bool(do_sample), float(temperature)
        self.top_k, self.top_p = top_k, None if top_p is None else float(top_p)
        self.rng = np.random.default_rng(seed) if do_sample else None
        self.emit, self.finish = streamer_hooks(streamer)

    def pick(self, logits: np.ndarray) -> np.ndarray:
        return sampling.next_tokens(logits, do_sample=self.do_sample,
                                    temperature=self.temperature, top_k=self.top_k,
                                    top_p=self.top_p, rng=self.rng)


def _decode_loop(first_logits: np.ndarray, step: Callable[[np.ndarray], np.ndarray],
                 s: _Settings) -> np.ndarray:
    """As ``generation._decode_loop``: rows stop at EOS (later tokens are PAD); the last
    token is never fed back."""
    rows = first_logits.shape[0]
    out = np.full((rows, s.max_new_tokens), s.pad, dtype=np.int64)
    finished = np.zeros(rows, dtype=np.bool_)
    logits, n_out = first_logits, s.max_new_tokens
    for t in range(s.max_new_tokens):
        tokens = np.where(finished, s.pad, s.pick(logits))
        out[:, t] = tokens
        if s.emit is not None:
            s.emit(tokens.copy())
        if s.eos is not None:
            finished |= np.isin(tokens, s.eos)
            if finished.all():
                n_out = t + 1
                break
        if t + 1 < s.max_new_tokens:
            logits = step(tokens)
    if s.finish is not None:
        s.finish()
    return out[:, :n_out]


class _Runtime:
    """What both architectures share: the config, the format, the embedding and the
    LM head, the thread count, the KV cache and the decode step."""

    is_encoder_decoder: bool

    def __init__(self, config, fmt: str, head: Linear, embed_table: np.ndarray | None,
                 embed_scale: np.ndarray | None, threads: int | None):
        self.config, self.format = config, fmt
        self.head = head
        # an untied model's own table (int8 files: fp32, or int8 rows with a scale); a
        # tied model reads the head's panels
        self._embed_table, self._embed_scale = embed_table, embed_scale
        self.act_dtype = np.float32 if fmt == "int8" else np.uint16  # bf16 as its bits
        self.threads = default_threads() if threads is None else threads

    @property
    def threads(self) -> int:
        return self._threads

    @threads.setter
    def threads(self, value: int) -> None:
        self._threads = int_at_least("threads", value, 1)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token vectors ``[*ids.shape, d_model]`` in the activations' dtype."""
        flat = ids.reshape(-1)
        if self._embed_table is None:
            rows = self.head.rows(flat)
        elif self._embed_scale is not None:
            rows = self._embed_table[flat].astype(np.float32) * self._embed_scale[flat, None]
        else:
            rows = self._embed_table[flat]
        return np.ascontiguousarray(rows).reshape(*ids.shape, self.config.d_model)

    def _linear(self, layer: Linear, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x.reshape(-1, layer.in_features))
        out = np.empty((x.shape[0], layer.out_features), dtype=self.act_dtype)
        if self.format == "int8":
            _C.int8_linear(x, layer.panels, layer.scale, layer.bias, out, False, self.threads)
        else:
            _C.bf16_linear(x, layer.panels, layer.bias, out, False, self.threads)
        return out

    def _rms_norm(self, weight: np.ndarray, x: np.ndarray) -> np.ndarray:
        out = np.empty_like(x)
        _C.rms_norm(x, weight, out, self.config.norm_eps,
                    "float32" if self.format == "int8" else "bfloat16", self.threads)
        return out

    def _check_length(self, name: str, n_positions: int, what: str) -> None:
        """As ``generation.check_length``; dynamic NTK past the trained length changes
        the RoPE base every step, which the torch model handles by recomputing."""
        c = self.config
        if n_positions > c.max_position_embeddings:
            if c.rope_scaling_factor == 1.0:
                raise ValueError(f"{name}: {what} needs {n_positions} positions but the model "
                                 f"supports max_position_embeddings={c.max_position_embeddings}")
            raise ValueError(f"{name}: {what} needs {n_positions} positions, past "
                             f"max_position_embeddings={c.max_position_embeddings}; dynamic NTK "
                             f"scaling beyond it needs the torch model (load_inference)")

    def _base(self, seq_len: int) -> float:
        c = self.config
        return rope_base(c.rope_theta, c.head_dim, seq_len, c.rope_scaling_factor,
                         c.max_position_embeddings)

    def _cache(self, n_layers: int, rows: int, max_len: int):
        c = self.config
        shape = (n_layers, rows, max_len, c.n_kv_heads, c.head_dim)
        nbytes = 2 * math.prod(shape) * np.dtype(self.act_dtype).itemsize
        try:
            limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            limit = 1 << 62
        if nbytes > limit:
            raise ValueError(f"max_new_tokens: the KV cache for {rows} rows x {max_len} "
                             f"positions needs {nbytes / 2**30:.1f} GiB, more than this "
                             f"machine's {limit / 2**30:.1f} GiB")
        return {"k": np.zeros(shape, self.act_dtype), "v": np.zeros(shape, self.act_dtype),
                "lens": np.zeros(rows, np.int32), "lens_after": np.zeros(rows, np.int32),
                "key_mask": np.ones((rows, max_len), np.bool_)}

    def _stepper(self, cache: dict, cross_k: list, cross_v: list, encoder_mask,
                 mask_generated_pad: bool):
        """``step(tokens [R]) -> logits [R, vocab]``: one token per row through the C++
        step, advancing the cache (``StaticKVCache.begin_step`` / ``advance``)."""
        rows = cache["lens"].shape[0]
        logits = np.empty((rows, self.config.vocab_size), dtype=self.act_dtype)
        max_len = cache["k"].shape[2]

        def step(tokens: np.ndarray) -> np.ndarray:
            np.add(cache["lens"], 1, out=cache["lens_after"])
            if mask_generated_pad:
                where = np.minimum(cache["lens"], max_len - 1)
                cache["key_mask"][np.arange(rows), where] = tokens != self.config.pad_token_id
            x = self.embed(tokens).reshape(rows, -1)
            self._step.step(x, cache["k"], cache["v"], cache["lens"], cache["lens_after"],
                            cache["key_mask"], cross_k, cross_v, encoder_mask,
                            self._base(int(cache["lens"].max()) + 1), logits, self.threads)
            cache["lens"] += 1
            return logits

        return step

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id=None, num_return_sequences: int = 1,
                 streamer=None, *, seed: int | None = None,
                 pad_token_id: int | None = None) -> np.ndarray:
        """Up to ``max_new_tokens`` new tokens per input row, as the torch model's
        ``generate`` (same arguments; ``seed`` seeds numpy's generator for sampling).

        ``input_ids``: integer ``[B, L]`` (numpy array or nested lists);
        ``attention_mask``: bool or 0/1 of the same shape (True = real token), or None.
        Returns int64 ``[B * n, T]``, ``T <= max_new_tokens``; row ``b * n + i`` is input
        ``b``'s ``i``-th sequence; after EOS a row holds the pad id."""
        ids = _token_ids("input_ids", input_ids, self.config.vocab_size)
        mask = _mask(attention_mask, ids)
        s = _Settings(self.config, max_new_tokens=max_new_tokens, do_sample=do_sample,
                      temperature=temperature, top_k=top_k, top_p=top_p,
                      eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                      num_return_sequences=num_return_sequences, streamer=streamer, seed=seed)
        first_logits, step = self._start(ids, mask, s)
        return _decode_loop(first_logits, step, s)

    def _start(self, ids, mask, s):  # pragma: no cover - abstract
        raise NotImplementedError


class EncoderDecoderRuntime(_Runtime):
    """An encoder-decoder (``EncoderDecoderLM``) saved in int8 or bf16."""

    is_encoder_decoder = True

    def __init__(self, config, fmt, reader: WeightReader, threads, *, bf16_attention=True):
        c = config
        d, q_w, kv_w = c.d_model, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        head, table, scale = _head_and_embedding(reader, c)
        super().__init__(c, fmt, head, table, scale, threads)
        dims = (d, c.n_heads, c.n_kv_heads, c.head_dim, c.norm_eps)
        layers = []
        for i in range(c.n_encoder_layers):
            p = f"encoder.{i}"
            layers.append(_block(reader, p, "attn", c))
        blocks = _C.Int8Blocks if fmt == "int8" else _C.Bf16Blocks
        self._encoder = blocks(*dims, layers, reader.norm("encoder_norm", d))
        step_layers, kv_names = [], []
        for i in range(c.n_decoder_layers):
            p = f"decoder.{i}"
            norm1, qkv, out = _self_attention(reader, p, "self_attn", c)
            step_layers.append((
                norm1, qkv, out, reader.norm(f"{p}.norm2", d),
                reader.linear([f"{p}.cross_attn.q_proj"], d, [q_w]).args,
                reader.linear([f"{p}.cross_attn.out_proj"], q_w, [d]).args,
                reader.norm(f"{p}.norm3", d), *_mlp(reader, p, c)))
            kv_names += [f"{p}.cross_attn.k_proj", f"{p}.cross_attn.v_proj"]
        # every layer's cross K and V in one projection (rows are quantised on their own
        # grid, so each output equals its own layer's projection bitwise)
        self._cross_kv = reader.linear(kv_names, d, [kv_w] * len(kv_names))
        step = _C.Int8DecoderStep if fmt == "int8" else _C.Bf16DecoderStep
        self._step = step(*dims, step_layers, reader.norm("decoder_norm", d), head.args)
        # "bf16": the encoder attention's products on bf16 operands (the torch model's
        # default, EncoderDecoderLM.encoder_attention); "fp32": the module path's
        self.encoder_attention = "bf16" if bf16_attention else "fp32"

    def encode(self, input_ids, attention_mask=None) -> np.ndarray:
        """Final encoder states ``[B, L, d]`` of ``input_ids`` (after the encoder's final
        norm; fp32, or bf16 bits as uint16), as ``EncoderDecoderLM.encode``."""
        ids = _token_ids("input_ids", input_ids, self.config.vocab_size)
        return self._encode(ids, _mask(attention_mask, ids))

    def _encode(self, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        if self.encoder_attention not in ("bf16", "fp32"):
            raise ValueError(f"encoder_attention must be 'bf16' or 'fp32', got "
                             f"{self.encoder_attention!r}")
        x = self.embed(ids)
        seq_len = ids.shape[1]
        if mask is None:
            positions = np.arange(seq_len, dtype=np.int64)[None]
        else:
            positions = np.maximum(np.cumsum(mask, 1, dtype=np.int64) - 1, 0)
        base = self._base(seq_len)  # dynamic NTK: at the padded length, as the torch model
        states = np.empty_like(x)
        self._encoder.encode(x, mask, positions, base, states,
                             self.encoder_attention == "bf16", self.threads)
        return states

    def cross_kv(self, states: np.ndarray) -> tuple[list, list]:
        """Every decoder layer's cross-attention K and V ``[B, Lx, Hkv, D]``."""
        c = self.config
        b, n = states.shape[:2]
        kv = self._linear(self._cross_kv, states).reshape(b, n, c.n_decoder_layers, 2,
                                                          c.n_kv_heads, c.head_dim)
        ks = [np.ascontiguousarray(kv[:, :, i, 0]) for i in range(c.n_decoder_layers)]
        vs = [np.ascontiguousarray(kv[:, :, i, 1]) for i in range(c.n_decoder_layers)]
        return ks, vs

    def _start(self, ids, mask, s):
        c = self.config
        if mask is not None and c.rope_scaling_factor == 1.0:  # trim trailing padding
            real = np.flatnonzero(mask.any(0))
            n = int(real[-1]) + 1 if real.size else 1
            ids, mask = ids[:, :n], np.ascontiguousarray(mask[:, :n])
        if c.rope_scaling_factor == 1.0:  # dynamic NTK: the encoder's base at its length
            self._check_length("input_ids", ids.shape[1], "the input")
        self._check_length("max_new_tokens", s.max_new_tokens, "the output")
        if mask is not None and mask.all():
            mask = None
        rows = ids.shape[0] * s.n
        cache = self._cache(c.n_decoder_layers, rows, s.max_new_tokens)
        states = self._encode(ids, mask)
        ks, vs = self.cross_kv(states)
        del states
        step = self._stepper(cache, ks, vs, mask, mask_generated_pad=True)
        return step(np.full(rows, c.bos_token_id, dtype=np.int64)), step


class DecoderOnlyRuntime(_Runtime):
    """A decoder-only model (``DecoderOnlyLM``) saved in int8 or bf16."""

    is_encoder_decoder = False

    def __init__(self, config, fmt, reader: WeightReader, threads):
        c = config
        head, table, scale = _head_and_embedding(reader, c)
        super().__init__(c, fmt, head, table, scale, threads)
        dims = (c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.norm_eps)
        layers = [_block(reader, f"layers.{i}", "attn", c) for i in range(c.n_layers)]
        self._norm = reader.norm("norm", c.d_model)
        blocks = _C.Int8Blocks if fmt == "int8" else _C.Bf16Blocks
        self._blocks = blocks(*dims, layers, self._norm)
        step = _C.Int8DecoderStep if fmt == "int8" else _C.Bf16DecoderStep
        self._step = step(*dims, layers, self._norm, head.args)

    def _start(self, ids, mask, s):
        c = self.config
        if mask is None:
            mask = np.ones(ids.shape, dtype=np.bool_)
        lens = mask.sum(1)
        empty = np.flatnonzero(lens == 0)
        if empty.size:
            raise ValueError(f"attention_mask row {int(empty[0])} has no real token: a "
                             "decoder-only model needs at least one prompt token (e.g. BOS)")
        # each row's real tokens first (stable), as generation._left_align
        order = np.argsort(~mask, axis=1, kind="stable")
        prompt_len = int(lens.max())
        ids = np.take_along_axis(ids, order, 1)[:, :prompt_len]
        aligned = np.arange(prompt_len)[None] < lens[:, None]
        mask = None if aligned.all() else aligned
        self._check_length("input_ids", prompt_len, "the prompt")
        self._check_length("max_new_tokens", prompt_len + s.max_new_tokens - 1,
                           "the prompt plus the new tokens")
        rows = ids.shape[0] * s.n
        cache = self._cache(c.n_layers, rows, prompt_len + s.max_new_tokens)
        x = self.embed(ids)
        states = np.empty_like(x)
        self._blocks.prefill(x, mask, self._base(prompt_len), cache["k"], cache["v"], states,
                             self.threads)
        last = np.ascontiguousarray(states[np.arange(ids.shape[0]), lens - 1])
        first = self._linear(self.head, self._rms_norm(self._norm, last))
        cache["lens"][:] = np.repeat(lens, s.n)
        step = self._stepper(cache, [], [], None, mask_generated_pad=False)
        return np.repeat(first, s.n, axis=0), step


def _self_attention(reader: WeightReader, prefix: str, attn: str, c):
    """(norm1, fused qkv args, out args) of block ``prefix``."""
    d, q_w, kv_w = c.d_model, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    a = f"{prefix}.{attn}"
    qkv = reader.linear([f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"], d, [q_w, kv_w, kv_w])
    return (reader.norm(f"{prefix}.norm1", d), qkv.args,
            reader.linear([f"{a}.out_proj"], q_w, [d]).args)


def _mlp(reader: WeightReader, prefix: str, c):
    return (reader.linear([f"{prefix}.mlp.fc1"], c.d_model, [c.d_ff]).args,
            reader.linear([f"{prefix}.mlp.fc2"], c.d_ff, [c.d_model]).args)


def _block(reader: WeightReader, prefix: str, attn: str, c) -> tuple:
    """(norm1, qkv, out, norm2, fc1, fc2) of a pre-norm block (layers.Block)."""
    norm1, qkv, out = _self_attention(reader, prefix, attn, c)
    return (norm1, qkv, out, reader.norm(f"{prefix}.norm2", c.d_model), *_mlp(reader, prefix, c))


def _head_and_embedding(reader: WeightReader, c):
    """(the LM head, an untied embedding table or None, its int8 scale or None). A tied
    head is stored once as ``embed.*`` and the embedding reads its panels."""
    d, v = c.d_model, c.vocab_size
    if reader.stored("lm_head.weight") is None:  # tied: one table, the head's format
        return reader.linear(["embed"], d, [v]), None, None
    head = reader.linear(["lm_head"], d, [v])
    stored = reader.f.entries.get(reader.stored("embed.weight") or "", None)
    if stored is not None and stored.dtype == "I8":  # int8 rows with a per-row scale
        return (head, reader.read("embed.weight", "I8", (v, d)),
                reader.read("embed.weight_scale", "F32", (v,)))
    return head, reader.read("embed.weight", "F32" if reader.fmt == "int8" else "BF16",
                             (v, d)), None


def load(directory: str | os.PathLike, *, threads: int | None = None,
         encoder_attention: str = "bf16") -> EncoderDecoderRuntime | DecoderOnlyRuntime:
    """The model ``save_inference`` wrote to ``directory`` (int8 or bf16), ready to
    ``generate``. ``threads``: the kernels' thread count (default: the cores this
    process may use). ``encoder_attention``: "bf16" (default, as the torch model) or
    "fp32" products in the encoder's attention."""
    if encoder_attention not in ("bf16", "fp32"):
        raise ValueError(f"encoder_attention must be 'bf16' or 'fp32', got {encoder_attention!r}")
    if threads is not None:
        int_at_least("threads", threads, 1)
    config, fmt, f, tied = open_weights(directory)
    with f:
        reader = WeightReader(f, tied, fmt)
        if config.architecture == "encoder_decoder":
            runtime = EncoderDecoderRuntime(config, fmt, reader, threads,
                                            bf16_attention=encoder_attention == "bf16")
        else:
            runtime = DecoderOnlyRuntime(config, fmt, reader, threads)
        unused = reader.unused()
    if unused:
        raise ValueError(f"{f.path}: tensors the model does not have: {unused[:5]}"
                         + (" ..." if len(unused) > 5 else ""))
    return runtime
