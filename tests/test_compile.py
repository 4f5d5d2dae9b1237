"""``torch.compile(fullgraph=True)`` and ``torch.export`` through the custom ops: the
models' training forward, the cached decode step and the distillation loss compile
with no graph break and give the eager results."""

from __future__ import annotations

import pytest
import torch

from _helpers import randomize
from fastencdec import DecoderOnlyConfig, DecoderOnlyLM, EncDecConfig, EncoderDecoderLM, ops
from fastencdec.kv_cache import StaticKVCache

TINY = EncDecConfig.preset("tiny")

pytestmark = pytest.mark.usefixtures("one_thread")


def _no_graph_breaks(fn, *args):
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _batch(seed_value, batch=2, src=9, tgt=5):
    gen = torch.Generator().manual_seed(seed_value)
    ids = torch.randint(3, TINY.vocab_size, (batch, src), generator=gen)
    mask = torch.ones(batch, src, dtype=torch.bool)
    mask[1, 6:] = False
    labels = torch.randint(3, TINY.vocab_size, (batch, tgt), generator=gen)
    labels[0, -1] = -100
    return ids, mask, labels


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


# Inductor compiles (C++ codegen) are slow on 2 cores: the encoder-decoder (which holds
# every training op) runs through Inductor, the decoder-only model through AOT autograd.
@pytest.mark.parametrize("arch,compiler", [("encoder_decoder", "inductor"),
                                           ("decoder_only", "aot_eager")])
def test_training_forward_compiles(arch, compiler, seed):
    torch.manual_seed(seed)
    if arch == "encoder_decoder":
        model = randomize(EncoderDecoderLM(TINY)).train()
    else:
        model = randomize(DecoderOnlyLM(DecoderOnlyConfig.twin_of(TINY))).train()
    ids, mask, labels = _batch(seed)
    if arch == "decoder_only":
        labels = torch.cat([torch.full_like(ids, -100), labels], dim=1)
        ids = torch.cat([ids, labels.clamp(min=0)[:, ids.shape[1]:]], dim=1)
        mask = torch.cat([mask, torch.ones_like(labels[:, 9:], dtype=torch.bool)], dim=1)

    def loss_fn(ids, mask, labels):
        return model(ids, mask, labels=labels).loss

    _no_graph_breaks(loss_fn, ids, mask, labels)
    eager = loss_fn(ids, mask, labels)
    eager.backward()
    eager_grads = _grads(model)
    model.zero_grad()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=compiler)(ids, mask, labels)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for got, want in zip(_grads(model), eager_grads, strict=True):
        # fused kernels sum in another order: fp32 rounding of O(1) gradients
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


def _decode_setup(seed_value):
    torch.manual_seed(seed_value)
    model = randomize(EncoderDecoderLM(TINY))
    ids, mask, _ = _batch(seed_value)
    with torch.no_grad():
        states = model.encode(ids, mask)
        cross = model.cross_kv(states)
    return model, mask, cross


def _run_steps(step, cache, tokens):
    logits = []
    for t in range(tokens.shape[1]):
        logits.append(step(tokens[:, t:t + 1]))
        cache.advance(1)
    return torch.stack(logits)


@torch.no_grad()
def test_decode_step_compiles(seed):
    model, mask, cross = _decode_setup(seed)
    tokens = torch.randint(3, TINY.vocab_size, (2, 4))
    tokens[1, 2] = TINY.pad_token_id  # a generated pad: masked in later steps

    def fresh_cache():
        return StaticKVCache.for_model(TINY, TINY.n_decoder_layers, 2, 4, cross[0][0],
                                       mask_generated_pad=True)

    eager_cache = fresh_cache()
    eager = _run_steps(lambda t: model.decode_step(t, eager_cache, cross, mask), eager_cache,
                       tokens)
    cache = fresh_cache()

    def step(t):
        return model.decode_step(t, cache, cross, mask)

    _no_graph_breaks(step, tokens[:, :1])
    cache = fresh_cache()  # explain ran one step
    compiled_step = torch.compile(step, fullgraph=True)
    compiled = _run_steps(compiled_step, cache, tokens)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.k, eager_cache.k)


class _DecodeStep(torch.nn.Module):
    """The decode step with its state as explicit inputs, for torch.export."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, k, v, lens, lens_after, key_mask, enc_mask, *cross):
        cache = StaticKVCache.__new__(StaticKVCache)
        cache.k, cache.v, cache.lens, cache.lens_after, cache.key_mask = k, v, lens, lens_after, key_mask
        cache.mask_generated_pad, cache.recompute_past, cache.history = True, None, None
        cache.total_len = 0
        pairs = list(zip(cross[0::2], cross[1::2], strict=True))
        return self.model.decode_step(tokens, cache, pairs, enc_mask)


@torch.no_grad()
def test_decode_step_exports(seed):
    model, mask, cross = _decode_setup(seed)
    cache = StaticKVCache.for_model(TINY, TINY.n_decoder_layers, 2, 4, cross[0][0])
    cache.lens.fill_(1)
    tokens = torch.randint(3, TINY.vocab_size, (2, 1))
    flat_cross = [t for pair in cross for t in pair]
    args = (tokens, cache.k.clone(), cache.v.clone(), cache.lens, cache.lens_after.clone(),
            cache.key_mask.clone(), mask, *flat_cross)
    exported = torch.export.export(_DecodeStep(model), args)
    assert any("fastencdec" in str(node.target) for node in exported.graph.nodes)
    expected = _DecodeStep(model)(tokens, *[a.clone() for a in args[1:3]], *args[3:])
    got = exported.module()(tokens, *[a.clone() for a in args[1:3]], *args[3:])
    torch.testing.assert_close(got, expected)


def test_distill_loss_compiles(seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(12, 16, generator=gen, requires_grad=True)
    weight = torch.randn(40, 16, generator=gen, requires_grad=True)
    teacher = torch.randn(12, 50, generator=gen)
    labels = torch.randint(0, 40, (12,), generator=gen)
    labels[3] = -100

    def loss_fn(h, w, t, y):
        return ops.distill_loss(h, w, t, y, alpha=0.5, temperature=2.0)

    _no_graph_breaks(loss_fn, hidden, weight, teacher, labels)
    eager = loss_fn(hidden, weight, teacher, labels)
    eager_grads = torch.autograd.grad(eager, (hidden, weight))
    compiled = torch.compile(loss_fn, fullgraph=True)(hidden, weight, teacher, labels)
    grads = torch.autograd.grad(compiled, (hidden, weight))
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want)
