"""No silent wrong answers: padding anywhere, aliasing caches, NaN in unused inputs,
degenerate temperatures, oversized caches, and generation that equals the reference
model's full recomputation in every RoPE mode (dynamic NTK past the trained length,
a padded input, a generated pad token)."""

from __future__ import annotations

import time

import pytest
import torch

from _helpers import greedy_recompute_decoder_only as recompute_decoder_only
from _helpers import greedy_recompute_encdec as recompute_encdec
from _helpers import randomize
from fastencdec import DecoderOnlyConfig, DecoderOnlyLM, EncDecConfig, EncoderDecoderLM, ops

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = EncDecConfig.preset("tiny")
# dynamic NTK scaling with a short trained context: generation passes it quickly
NTK = TINY.replace(rope_scaling_factor=2.0, max_position_embeddings=8, rope_theta=300.0)
NO_EOS = ()


def _ids(gen, batch, length):
    return torch.randint(3, TINY.vocab_size, (batch, length), generator=gen)


def test_encoder_ignores_interior_padding(seed):
    """Encoder positions count real tokens: a pad inside a row changes nothing."""
    model = randomize(EncoderDecoderLM(TINY))
    gen = torch.Generator().manual_seed(seed)
    real = _ids(gen, 1, 6)
    padded = torch.cat([real[:, :2], torch.zeros(1, 3, dtype=torch.long), real[:, 2:]], dim=1)
    mask = torch.ones_like(padded, dtype=torch.bool)
    mask[:, 2:5] = False
    with torch.no_grad():
        alone = model.encode(real)
        holes = model.encode(padded, mask)
    torch.testing.assert_close(holes[mask][None], alone, atol=1e-5, rtol=1e-5)


def test_decoder_only_ignores_interior_padding(seed):
    model = randomize(DecoderOnlyLM(DecoderOnlyConfig.twin_of(TINY)))
    gen = torch.Generator().manual_seed(seed)
    real = _ids(gen, 1, 5)
    padded = torch.cat([real[:, :3], torch.zeros(1, 2, dtype=torch.long), real[:, 3:]], dim=1)
    mask = torch.ones_like(padded, dtype=torch.bool)
    mask[:, 3:5] = False
    with torch.no_grad():
        torch.testing.assert_close(model.hidden_states(padded, mask)[mask][None],
                                   model.hidden_states(real), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend_name", ["reference", "cpp", "triton"])
def test_expanded_cache_is_refused(backend, backend_name):
    backend(backend_name)
    q, k, v = torch.randn(2, 1, 2, 32), torch.randn(2, 1, 1, 32), torch.randn(2, 1, 1, 32)
    shared = torch.zeros(1, 6, 1, 32).expand(2, 6, 1, 32)
    with pytest.raises(ValueError, match="overlapping memory"):
        ops.append_kv_cache(q, k, v, shared, torch.zeros(2, 6, 1, 32), torch.tensor([0, 1]))


@pytest.mark.parametrize("backend_name", ["reference", "cpp", "triton"])
def test_unused_nan_teacher_does_not_reach_the_loss(backend, backend_name):
    """alpha = 0: the divergence term has weight 0 and the teacher is not read."""
    backend(backend_name)
    hidden, weight = torch.randn(5, 8), torch.randn(20, 8)
    teacher = torch.full((5, 20), float("nan"))
    labels = torch.randint(0, 20, (5,))
    loss = ops.distill_loss(hidden, weight, teacher, labels, alpha=0.0)
    ce = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels)
    torch.testing.assert_close(loss, ce)
    nan_student = ops.distill_loss(hidden, weight, torch.randn(5, 20), labels, alpha=1.0)
    assert torch.isfinite(nan_student)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e-300, 0.0, -1.0])
def test_degenerate_temperatures_are_refused(value):
    model = EncoderDecoderLM(TINY)
    ids = torch.randint(3, 100, (1, 4))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, max_new_tokens=2, do_sample=True, temperature=value)
    with pytest.raises(ValueError, match="temperature"):
        ops.distill_loss(torch.randn(3, 4), torch.randn(9, 4), torch.randn(3, 9),
                         torch.zeros(3, dtype=torch.long), temperature=value)


def test_huge_max_new_tokens_is_refused_before_allocating():
    model = EncoderDecoderLM(NTK)  # dynamic NTK: no context limit on the length itself
    started = time.perf_counter()
    with pytest.raises(ValueError, match="max_new_tokens.*GiB"):
        model.generate(torch.randint(3, 100, (1, 4)), max_new_tokens=10**9)
    assert time.perf_counter() - started < 5.0  # refused, not attempted


@pytest.mark.parametrize("positions", [torch.tensor(-1), torch.empty((), dtype=torch.long, device="meta")])
def test_scalar_positions_are_checked(positions):
    q = torch.randn(1, 3, 2, 8)
    with pytest.raises(ValueError, match="positions"):
        ops.self_attention(q, q, q, causal=True, positions=positions)


# -- generation equals the reference model's recomputation ------------------------------
@pytest.mark.parametrize("backend_name", ["cpp", "reference"])
def test_dynamic_ntk_generation_past_the_trained_length(backend, backend_name, seed):
    """rope_factor > 1, 20 tokens past max_position_embeddings = 8: once past it, every
    position uses the base of the current length, as the full recomputation does (two
    decoder layers, so later layers' keys depend on the base too)."""
    backend(backend_name)
    gen = torch.Generator().manual_seed(seed)
    model = randomize(EncoderDecoderLM(NTK.replace(n_decoder_layers=2)))
    ids, mask = _ids(gen, 2, 11), torch.ones(2, 11, dtype=torch.bool)
    mask[1, 8:] = False  # padded length 11 > 8: the encoder's base uses the padded length
    cached = model.generate(ids, mask, max_new_tokens=20, eos_token_id=NO_EOS)
    torch.testing.assert_close(cached, recompute_encdec(model, ids, mask, 20), rtol=0, atol=0)


def test_dynamic_ntk_decoder_only(seed):
    gen = torch.Generator().manual_seed(seed)
    model = randomize(DecoderOnlyLM(DecoderOnlyConfig.twin_of(NTK)))
    assert model.config.n_layers > 1
    ids = _ids(gen, 2, 6)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :2] = False  # left padding
    cached = model.generate(ids, mask, max_new_tokens=15, eos_token_id=NO_EOS)
    torch.testing.assert_close(cached, recompute_decoder_only(model, ids, mask, 15),
                               rtol=0, atol=0)


def test_generated_pad_token_is_masked_in_later_steps(seed):
    gen = torch.Generator().manual_seed(seed)
    model = randomize(EncoderDecoderLM(TINY.replace(n_decoder_layers=2)))
    ids = _ids(gen, 2, 7)
    first = model.generate(ids, max_new_tokens=6, eos_token_id=NO_EOS)
    # make the token row 0 generates at step 2 the pad id: later steps must mask it
    pad = int(first[0, 2])
    model.config = model.config.replace(pad_token_id=pad)
    cached = model.generate(ids, max_new_tokens=6, eos_token_id=NO_EOS)
    assert (cached == pad).any()
    torch.testing.assert_close(cached, recompute_encdec(model, ids, None, 6), rtol=0, atol=0)
