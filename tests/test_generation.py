"""Generation: cached decoding equals recomputation, padding/batching invariance,
sampling, EOS, streaming, the cache and cross-K/V contracts, errors."""

from __future__ import annotations

import pytest
import torch

from _helpers import greedy_recompute_decoder_only as greedy_without_cache_decoder_only
from _helpers import greedy_recompute_encdec as greedy_without_cache_encdec
from _helpers import randomize
from fastencdec import (
    DecoderOnlyConfig,
    DecoderOnlyLM,
    EncDecConfig,
    EncoderDecoderLM,
    generation,
    ops,
)
from fastencdec.generation import StaticKVCache, filter_top_k, filter_top_p
from fastencdec.models import ops_backend

TINY = EncDecConfig.preset("tiny")
VOCAB = TINY.vocab_size
NO_EOS = ()  # eos_token_id=() never stops early


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def encdec(seed):
    return randomize(EncoderDecoderLM(TINY))


@pytest.fixture
def deconly(seed):
    return randomize(DecoderOnlyLM(DecoderOnlyConfig.twin_of(TINY)))


def rand_ids(batch, length):
    return torch.randint(3, VOCAB, (batch, length))


# -- cached == recomputed ----------------------------------------------------------------
def test_encdec_cache_equals_recomputation(encdec):
    ids = rand_ids(3, 10)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 4:] = False
    got = encdec.generate(ids, mask, max_new_tokens=12, eos_token_id=NO_EOS)
    expected = greedy_without_cache_encdec(encdec, ids, mask, 12)
    assert torch.equal(got, expected)
    assert len(set(got.flatten().tolist())) > 3  # the test model really varies its output


def test_decoder_only_cache_equals_recomputation(deconly):
    ids = rand_ids(3, 10)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    mask[2, :6] = False
    got = deconly.generate(ids, mask, max_new_tokens=12, eos_token_id=NO_EOS)
    expected = greedy_without_cache_decoder_only(deconly, ids, mask, 12)
    assert torch.equal(got, expected)
    assert len(set(got.flatten().tolist())) > 3


# -- batching and padding ----------------------------------------------------------------
def test_encdec_padded_batch_equals_rows_alone(encdec):
    lengths = [9, 4, 1]
    ids = rand_ids(3, 12)  # extra all-padding columns are trimmed
    mask = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]
    batched = encdec.generate(ids, mask.int(), max_new_tokens=8, eos_token_id=NO_EOS)
    for i, n in enumerate(lengths):
        alone = encdec.generate(ids[i:i + 1, :n], max_new_tokens=8, eos_token_id=NO_EOS)
        assert torch.equal(batched[i:i + 1], alone), i


@pytest.mark.parametrize("side", ["left", "right"])
def test_decoder_only_padded_batch_equals_rows_alone(deconly, side):
    lengths = [7, 3, 1]
    ids = rand_ids(3, 7)
    pos = torch.arange(7)[None, :]
    lens = torch.tensor(lengths)[:, None]
    mask = (pos < lens) if side == "right" else (pos >= 7 - lens)
    batched = deconly.generate(ids, mask, max_new_tokens=8, eos_token_id=NO_EOS)
    for i in range(3):
        alone = deconly.generate(ids[i:i + 1][mask[i:i + 1]][None], max_new_tokens=8,
                                 eos_token_id=NO_EOS)
        assert torch.equal(batched[i:i + 1], alone), i


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_num_return_sequences_rows(arch, request):
    model = request.getfixturevalue(arch)
    ids = rand_ids(2, 5)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 3:] = False
    single = model.generate(ids, mask, max_new_tokens=6, eos_token_id=NO_EOS)
    triple = model.generate(ids, mask, max_new_tokens=6, eos_token_id=NO_EOS,
                            num_return_sequences=3)
    assert torch.equal(triple, single.repeat_interleave(3, dim=0))  # row b * n + i
    sampled = model.generate(ids, mask, max_new_tokens=6, eos_token_id=NO_EOS, do_sample=True,
                             num_return_sequences=4, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (8, 6)


def test_cross_kv_projected_once_and_never_copied(encdec, monkeypatch):
    """Cross-attention sees K/V with the input batch (2), not 2 * 3 rows, at every step."""
    seen, projections = [], []
    real_cross = ops.cross_attention
    real_project = type(encdec.decoder[0].cross_attn).project_kv

    def spy_cross(q, k, v, **kw):
        seen.append((q.shape[0], k.shape[0], k.data_ptr()))
        return real_cross(q, k, v, **kw)

    def spy_project(self, states):
        projections.append(states.shape)
        return real_project(self, states)

    monkeypatch.setattr(ops, "cross_attention", spy_cross)
    monkeypatch.setattr(type(encdec.decoder[0].cross_attn), "project_kv", spy_project)
    encdec.generate(rand_ids(2, 6), max_new_tokens=5, eos_token_id=NO_EOS, num_return_sequences=3)
    assert len(projections) == TINY.n_decoder_layers  # once per layer, not per step
    assert len(seen) == 5 * TINY.n_decoder_layers
    assert all(q_rows == 2 and k_rows == 2 for q_rows, k_rows, _ in seen)
    assert len({ptr for _, _, ptr in seen}) == TINY.n_decoder_layers  # the same tensors


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_cache_is_static_and_filled_by_append(arch, request, monkeypatch):
    model = request.getfixturevalue(arch)
    caches, appends = [], []
    real_init, real_append = StaticKVCache.__init__, ops.append_kv_cache

    def spy_init(self, *args, **kw):
        real_init(self, *args, **kw)
        caches.append(self)

    def spy_append(q, k, v, k_cache, v_cache, lens, **kw):
        appends.append(k_cache.data_ptr())
        return real_append(q, k, v, k_cache, v_cache, lens, **kw)

    monkeypatch.setattr(StaticKVCache, "__init__", spy_init)
    monkeypatch.setattr(ops, "append_kv_cache", spy_append)
    ids = rand_ids(2, 6)
    model.generate(ids, max_new_tokens=7, eos_token_id=NO_EOS)
    (cache,) = caches
    expected_len = 7 if arch == "encdec" else 6 + 7
    assert cache.max_len == expected_len
    assert len(set(appends)) == len(cache.k)  # one cache tensor per layer, reused every step
    assert cache.lens.tolist() == ([7, 7] if arch == "encdec" else [12, 12])


# -- sampling ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_sampling_reproducible_under_seed(arch, request, seed):
    model = request.getfixturevalue(arch)
    ids = rand_ids(2, 6)

    def draw(s, **kw):
        return model.generate(ids, max_new_tokens=10, do_sample=True, eos_token_id=NO_EOS,
                              generator=torch.Generator().manual_seed(s), **kw)

    assert torch.equal(draw(seed), draw(seed))
    assert not torch.equal(draw(seed), draw(seed + 1))
    kw = dict(temperature=0.7, top_k=20, top_p=0.9)
    assert torch.equal(draw(seed, **kw), draw(seed, **kw))
    greedy = model.generate(ids, max_new_tokens=10, eos_token_id=NO_EOS)
    assert torch.equal(draw(seed, top_k=1), greedy)
    assert torch.equal(draw(seed, top_p=1e-6), greedy)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    inf = float("-inf")
    assert filter_top_k(logits, 2).isinf().tolist() == [[False, False, True, True]]
    assert filter_top_p(logits, 0.5).isinf().tolist() == [[False, True, True, True]]
    assert filter_top_p(logits, 0.8).isinf().tolist() == [[False, False, True, True]]
    assert filter_top_p(logits, 0.81).isinf().tolist() == [[False, False, False, True]]
    shuffled = logits[:, [2, 0, 3, 1]]
    assert filter_top_p(shuffled, 0.8).isinf().tolist() == [[True, False, True, False]]
    assert torch.equal(filter_top_k(logits, 10), logits) and inf < 0


# -- EOS and streaming -------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_eos_finishes_rows_and_pads(arch, request):
    model = request.getfixturevalue(arch)
    ids = rand_ids(2, 6)
    free = model.generate(ids, max_new_tokens=10, eos_token_id=NO_EOS)
    eos = int(free[0, 3])
    first = int((free[0] == eos).nonzero()[0])
    out = model.generate(ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    assert out[0, first] == eos and (out[0, first + 1:] == 0).all()
    assert torch.equal(out[0, :first + 1], free[0, :first + 1])
    row1_eos = (free[1] == eos).nonzero()
    if row1_eos.numel() == 0:  # row 1 never ends: it runs to max_new_tokens
        assert torch.equal(out[1], free[1])
    # Every row ended: generation stops early.
    both = model.generate(ids, max_new_tokens=10, eos_token_id=[int(free[0, 0]), int(free[1, 0])])
    assert both.shape == (2, 1)


def test_streamer_gets_each_step(encdec):
    ids = rand_ids(2, 6)
    calls = []
    out = encdec.generate(ids, max_new_tokens=5, eos_token_id=NO_EOS, streamer=calls.append)
    assert len(calls) == 5 and all(c.shape == (2,) for c in calls)
    assert torch.equal(torch.stack(calls, dim=1), out)

    class Streamer:
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, t):
            self.tokens.append(t)

        def end(self):
            self.ended = True

    s = Streamer()
    encdec.generate(ids, max_new_tokens=3, eos_token_id=NO_EOS, streamer=s)
    assert len(s.tokens) == 3 and s.ended


def test_generate_restores_training_mode(deconly):
    deconly.train()
    deconly.generate(rand_ids(1, 3), max_new_tokens=2)
    assert deconly.training


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_cached_step_kernel_path_matches_reference(backend, name, encdec, deconly):
    """Teacher-forced cached decoding (append_kv_cache + decode_attention + cross) logits
    on a kernel backend vs the reference."""
    ids = rand_ids(2, 7)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 5:] = False
    forced = rand_ids(2, 4)

    @torch.no_grad()
    def run():
        states = encdec.encode(ids, mask)
        cross = encdec.cross_kv(states)
        cache = StaticKVCache.for_model(TINY, TINY.n_decoder_layers, 2, 5, states)
        tokens = torch.full((2, 1), TINY.bos_token_id)
        logits = []
        for t in range(5):
            logits.append(encdec.decode_step(tokens, cache, cross, mask))
            cache.advance(1)
            tokens = forced[:, t:t + 1] if t < 4 else tokens
        dcfg = deconly.config
        dcache = StaticKVCache.for_model(dcfg, dcfg.n_layers, 2, 7 + 4, states)
        aligned_mask = torch.arange(7)[None] < mask.sum(1)[:, None]
        logits.append(deconly.prefill(deconly.embed(ids), aligned_mask, dcache))
        dcache.lens.copy_(mask.sum(1))
        for t in range(4):
            logits.append(deconly.decode_step(forced[:, t:t + 1], dcache))
            dcache.advance(1)
        return torch.stack(logits)

    with ops_backend("reference"):
        expected = run()
    backend(name)
    torch.testing.assert_close(run(), expected, atol=2e-4, rtol=2e-4)


# -- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_generate_errors(arch, request):
    model = request.getfixturevalue(arch)
    ids = rand_ids(2, 4)
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="empty batch"):
        model.generate(ids[:0], max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids values"):
        model.generate(ids + VOCAB, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(ids, torch.ones(2, 5), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(ids, torch.full((2, 4), 2), max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids.*max_position_embeddings"):
        model.generate(rand_ids(1, limit + 1), max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens.*max_position_embeddings"):
        model.generate(ids, max_new_tokens=limit + 1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, max_new_tokens=2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids, max_new_tokens=2, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(ids, max_new_tokens=2, do_sample=True, top_k=0)
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(ids, max_new_tokens=2, num_return_sequences=0)
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate(ids, max_new_tokens=2, eos_token_id=VOCAB)
    with pytest.raises(TypeError, match="streamer"):
        model.generate(ids, max_new_tokens=2, streamer=3)
    with pytest.raises(ValueError, match="cuda_graph"):
        model.generate(ids, max_new_tokens=2, cuda_graph=True)


def test_decoder_only_needs_a_prompt_token(deconly):
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match="row 1 has no real token"):
        deconly.generate(rand_ids(2, 4), mask, max_new_tokens=2)


def test_encdec_accepts_an_empty_input_row(encdec):
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1] = False  # nothing to read: cross-attention returns zeros, decoding still runs
    out = encdec.generate(rand_ids(2, 4), mask, max_new_tokens=3, eos_token_id=NO_EOS)
    assert out.shape == (2, 3)


def test_generate_is_one_function_for_both_architectures():
    assert EncoderDecoderLM.generate is generation.generate
    assert DecoderOnlyLM.generate is generation.generate


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_cuda_graph_matches_eager(arch, request):
    model = request.getfixturevalue(arch).cuda()
    ids = rand_ids(2, 6).cuda()
    eager = model.generate(ids, max_new_tokens=8, eos_token_id=NO_EOS, cuda_graph=False)
    graphed = model.generate(ids, max_new_tokens=8, eos_token_id=NO_EOS, cuda_graph=None)
    assert torch.equal(eager, graphed)
