"""A decoder-only int8/bf16 prompt in one C++ call (models/decoder_prefill.py) against the
module path: the same kernels in the same order, so the next-token logits and every
cached key and value must be bitwise equal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _helpers import randomize, record_one_calls
from fastencdec import DecoderOnlyConfig, DecoderOnlyLM, EncDecConfig, inputs
from fastencdec.kv_cache import StaticKVCache
from fastencdec.models import decoder_prefill
from fastencdec.models.quantize import to_inference

_C = pytest.importorskip("fastencdec._C")

TINY = DecoderOnlyConfig.twin_of(EncDecConfig.preset("tiny"))
FORMATS = ["int8", "bf16"]
CASES = [
    dict(),
    dict(n_layers=3, attn_bias=False, d_ff=72),
    dict(n_heads=3, n_kv_heads=1, head_dim=34, d_model=40),
    dict(rope_scaling_factor=2.0, max_position_embeddings=16),  # dynamic NTK (L > 16)
]


def _prefill(model, x, mask, copies, fast, monkeypatch):
    config = model.config
    cache = StaticKVCache.for_model(config, config.n_layers, x.shape[0] * copies,
                                    x.shape[1] + 5, inputs.embedding_like(model.embed))
    with monkeypatch.context() as m, torch.inference_mode():
        if not fast:
            m.setattr(decoder_prefill, "run", lambda *a, **k: None)
        logits = model.prefill(x, mask, cache)
    return logits, cache


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("copies", [1, 2])
def test_one_call_prefill_equals_the_module_path(fmt, case, copies, threads, seed,
                                                 monkeypatch):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = TINY.replace(**CASES[case])
    model = to_inference(randomize(DecoderOnlyLM(config)), fmt)
    assert decoder_prefill.plan(model) is not None
    batch, seq_len = 3, int(torch.randint(17, 40, (1,), generator=gen))
    ids = torch.randint(3, config.vocab_size, (batch, seq_len), generator=gen)
    lens = torch.tensor([seq_len, 1, int(torch.randint(2, seq_len, (1,), generator=gen))])
    mask = torch.arange(seq_len)[None, :] < lens[:, None]  # real tokens first
    with torch.inference_mode():
        x = model.embed(ids)
    for m in (mask, None):
        fast, fast_cache = _prefill(model, x, m, copies, True, monkeypatch)
        slow, slow_cache = _prefill(model, x, m, copies, False, monkeypatch)
        assert torch.equal(fast, slow), f"logits: max diff {(fast - slow).abs().max():.3g}"
        assert torch.equal(fast_cache.k, slow_cache.k)
        assert torch.equal(fast_cache.v, slow_cache.v)


def test_the_module_path_runs_where_the_one_call_cannot(seed, monkeypatch):
    torch.manual_seed(seed)
    assert decoder_prefill.plan(randomize(DecoderOnlyLM(TINY))) is None  # fp32
    assert decoder_prefill.plan(
        to_inference(randomize(DecoderOnlyLM(TINY)), "int8", fuse=False)) is None
    model = to_inference(randomize(DecoderOnlyLM(TINY)), "int8")
    ids = torch.randint(3, TINY.vocab_size, (2, 9))
    calls = record_one_calls(monkeypatch, decoder_prefill)
    model.generate(ids, max_new_tokens=2, eos_token_id=())
    handle = model.layers[0].register_forward_hook(lambda *a: None)
    model.generate(ids, max_new_tokens=2, eos_token_id=())
    handle.remove()
    assert calls == [True, False]


def test_bad_cache_arguments_are_clear_errors(seed):
    torch.manual_seed(seed)
    model = to_inference(randomize(DecoderOnlyLM(TINY)), "int8")
    blocks = decoder_prefill.plan(model)
    c = TINY
    x = np.zeros((2, 5, c.d_model), np.float32)
    states = np.zeros_like(x)
    cache = np.zeros((c.n_layers, 4, 8, c.n_kv_heads, c.head_dim), np.float32)
    blocks.prefill(x, None, 10000.0, cache, cache.copy(), states, 1)  # fine
    with pytest.raises(ValueError, match="positive multiple of the batch"):
        bad = np.zeros((c.n_layers, 3, 8, c.n_kv_heads, c.head_dim), np.float32)
        blocks.prefill(x, None, 10000.0, bad, bad.copy(), states, 1)
    with pytest.raises(ValueError, match="shorter than the prompts"):
        bad = np.zeros((c.n_layers, 4, 4, c.n_kv_heads, c.head_dim), np.float32)
        blocks.prefill(x, None, 10000.0, bad, bad.copy(), states, 1)
    with pytest.raises(ValueError, match="k_cache: dimension 0"):
        bad = np.zeros((c.n_layers + 1, 4, 8, c.n_kv_heads, c.head_dim), np.float32)
        blocks.prefill(x, None, 10000.0, bad, bad.copy(), states, 1)
    with pytest.raises(TypeError, match="k_cache: expected dtype float32"):
        blocks.prefill(x, None, 10000.0, cache.astype(np.float16), cache, states, 1)
