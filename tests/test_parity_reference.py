"""Parity with the reference model (DESIGN §1): a reference-layout ``model.pt`` of
random weights, imported with ``import_mu_checkpoint``, gives the logits and the
greedy tokens of an independent re-implementation of the reference's forward
(``mu_reference_model``), in every RoPE/GQA mode: head_dim 32 and 64, GQA by
concatenation and by expansion (``is_interleaved``), ``rope_theta != 10000``, dynamic
NTK scaling (``rope_factor > 1``) inside and past ``block_size``.
"""

from __future__ import annotations

import pytest
import torch

import mu_reference_model as mu
from fastencdec.convert import import_mu_checkpoint

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:fastencdec.ops")]

BOS, EOS = 1, 2  # EOS only has to fit the small vocabulary: generation below never stops
# fp32 on both sides; logits are O(10). Observed differences are ~1e-5 (the reference
# builds its RoPE tables in float32, fastencdec in float64).
ATOL = RTOL = 2e-4
# A greedy choice is "the same" when fastencdec's token has the reference's top logit up
# to rounding: a float tie between two tokens may go either way in either implementation.
# Generation uses sharp attention (qk_std) so that positions matter, which amplifies the
# fp32 differences to ~1e-3 in the logits; a real difference moves them by ~0.1 to 10.
TIE_TOL = 1e-2

MODES = {
    "hd32-12q6kv-concat-theta5e5": dict(n_head=12, n_kv_head=6, qkv_embd=384,
                                        rope_theta=500000.0),
    "hd32-12q6kv-interleaved-ntk": dict(n_head=12, n_kv_head=6, qkv_embd=384,
                                        is_interleaved=True, rope_factor=4.0, block_size=16),
    "hd64-6q3kv-concat-ntk-theta5e4": dict(n_head=6, n_kv_head=3, qkv_embd=384, n_embd=128,
                                           rope_theta=50000.0, rope_factor=2.0, block_size=16),
    "hd64-6q3kv-interleaved": dict(n_head=6, n_kv_head=3, qkv_embd=384, n_embd=96,
                                   is_interleaved=True),
    "hd32-8q2kv-concat-theta1e6": dict(n_head=8, n_kv_head=2, qkv_embd=256, rope_theta=1e6),
    "hd64-4q4kv-interleaved-ntk": dict(n_head=4, n_kv_head=4, qkv_embd=256,
                                       is_interleaved=True, rope_factor=3.0, block_size=16),
}
NTK_MODES = [name for name, fields in MODES.items() if fields.get("rope_factor", 1.0) > 1]


def build(tmp_path, gen, fields, **weights):
    """(imported fastencdec model, reference re-implementation, model_config).

    The pad token's embedding (= its LM-head row, tied) is zero: its logit is then 0,
    far below the top logit, so greedy decoding never emits the pad id here (a
    generated pad id is tested on its own) and padded positions carry nothing."""
    config = mu.model_config(**fields)
    state = mu.random_state_dict(config, gen, **weights)
    state["transformer.wte.weight"][config["pad_token_id"]] = 0
    return save_and_import(tmp_path, state, config), mu.MuReference(state, config), config


def save_and_import(tmp_path, state, config):
    path = tmp_path / "model.pt"
    mu.save_checkpoint(path, state, config)
    return import_mu_checkpoint(path, dtype=torch.float32, eos_token_id=EOS)


def padded_ids(gen, batch, length, vocab, *, min_real=1):
    """Random ids in [3, vocab) with pad id 0: row 0 full, odd rows right-padded, even
    rows (from 2) left-padded, every row with at least ``min_real`` real tokens."""
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    for row in range(1, batch):
        n_pad = int(torch.randint(0, length - min_real + 1, (1,), generator=gen))
        if row % 2:
            ids[row, length - n_pad:] = 0
        else:
            ids[row, :n_pad] = 0
    return ids


def decoder_ids(gen, batch, length, vocab):
    """``[BOS] + random tokens``, rows right-padded (pad id 0) to ``length``."""
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    ids[:, 0] = BOS
    for row in range(1, batch):
        n_real = int(torch.randint(1, length + 1, (1,), generator=gen))
        ids[row, n_real:] = 0
    return ids


def fastencdec_logits(model, enc, dec):
    with torch.no_grad():
        return model(enc, enc != 0, decoder_input_ids=dec, decoder_attention_mask=dec != 0).logits


# -- forward --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_forward_logits_match_reference(tmp_path, seed, mode):
    gen = torch.Generator().manual_seed(seed)
    model, ref, config = build(tmp_path, gen, MODES[mode])
    c = model.config
    assert (c.n_heads, c.n_kv_heads, c.head_dim) == (
        config["n_head"], config["n_kv_head"], config["qkv_embd"] // config["n_head"])
    assert (c.rope_theta, c.rope_scaling_factor, c.max_position_embeddings) == (
        config["rope_theta"], config["rope_factor"], config["block_size"])
    block = config["block_size"]
    enc_len = int(torch.randint(2, block, (1,), generator=gen))
    dec_len = int(torch.randint(2, block, (1,), generator=gen))
    enc = padded_ids(gen, 4, enc_len, config["vocab_size"])
    dec = decoder_ids(gen, 4, dec_len, config["vocab_size"])
    torch.testing.assert_close(fastencdec_logits(model, enc, dec), ref.logits(enc, dec),
                               atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("mode", NTK_MODES)
def test_forward_logits_match_reference_past_block_size(tmp_path, seed, mode):
    """Without a cache both sides rotate every position with the NTK base of the
    sequence's (padded) length, here above ``block_size`` on both sides."""
    gen = torch.Generator().manual_seed(seed)
    model, ref, config = build(tmp_path, gen, MODES[mode])
    block = config["block_size"]
    enc = padded_ids(gen, 3, block + 7, config["vocab_size"])
    dec = decoder_ids(gen, 3, block + 5, config["vocab_size"])
    # The case must exercise the scaling: a rope_factor=1 model gives other logits.
    plain = mu.MuReference(ref.w, {**config, "rope_factor": 1.0}).logits(enc, dec)
    expected = ref.logits(enc, dec)
    assert (plain - expected).abs().max() > 100 * ATOL
    torch.testing.assert_close(fastencdec_logits(model, enc, dec), expected,
                               atol=ATOL, rtol=RTOL)


# -- generation -----------------------------------------------------------------------------
def assert_greedy_matches(tokens, ref, enc):
    """Every token fastencdec chose is the reference's greedy choice after the same
    prefix, recomputed from scratch (up to float ties, see TIE_TOL); with no ties this
    is token-for-token equality with the reference's greedy decoding."""
    steps = ref.step_logits(enc, BOS, tokens)[:, :-1]  # [B, T, V]
    picked = steps.gather(-1, tokens[..., None])[..., 0]
    shortfall = steps.max(-1).values - picked
    bad = (shortfall > TIE_TOL).nonzero().tolist()
    assert not bad, (f"{len(bad)} tokens differ from the reference's greedy choice, first at "
                     f"(row, step) {bad[0]}: fastencdec {tokens[tuple(bad[0])].item()}, "
                     f"reference {steps[tuple(bad[0])].argmax().item()}")


class CaseError(RuntimeError):
    """A test case does not exercise what it claims to (never an expected failure)."""


def require(condition, message: str) -> None:
    if not condition:
        raise CaseError(message)


def generate(model, enc, max_new_tokens):
    tokens = model.generate(enc, attention_mask=enc != 0, max_new_tokens=max_new_tokens,
                            eos_token_id=())
    require(tokens.shape == (enc.shape[0], max_new_tokens),
            f"generate returned {tuple(tokens.shape)} tokens, expected every step")
    return tokens


@pytest.mark.parametrize("mode", ["hd32-12q6kv-concat-theta5e5", "hd64-6q3kv-interleaved",
                                  "hd32-12q6kv-interleaved-ntk"])
def test_generation_matches_reference_within_block_size(tmp_path, seed, mode):
    gen = torch.Generator().manual_seed(seed)
    model, ref, config = build(tmp_path, gen, MODES[mode], qk_std=0.8)
    block = config["block_size"]
    enc = padded_ids(gen, 4, block - 3, config["vocab_size"])
    new = block - 1  # the decoder reads BOS + new - 1 tokens: exactly block_size - 1
    assert_greedy_matches(generate(model, enc, new), ref, enc)


@pytest.mark.parametrize("mode", ["hd32-12q6kv-concat", "hd64-6q3kv-interleaved"])
def test_generation_matches_reference_past_block_size_with_ntk(tmp_path, seed, mode):
    """The reference re-rotates every cached key with the NTK base of the current
    length at each step; generation must give its tokens far past ``block_size``."""
    fields = {"hd32-12q6kv-concat": dict(n_head=12, n_kv_head=6, qkv_embd=384),
              "hd64-6q3kv-interleaved": dict(n_head=6, n_kv_head=3, qkv_embd=384, n_embd=128,
                                             is_interleaved=True)}[mode]
    gen = torch.Generator().manual_seed(seed)
    model, ref, config = build(tmp_path, gen, dict(fields, rope_factor=4.0, block_size=6),
                               qk_std=0.8)
    enc = torch.randint(3, config["vocab_size"], (4, 5), generator=gen)
    tokens = generate(model, enc, 24)
    once = mu.MuReference(ref.w, config, rotate_once=True)
    require((ref.step_logits(enc, BOS, tokens) - once.step_logits(enc, BOS, tokens)
             ).abs().max() > 1.0, "the reference's logits do not depend on re-rotating keys")
    assert_greedy_matches(tokens, ref, enc)


def test_generation_uses_the_padded_encoder_length_for_ntk(tmp_path, seed):
    """The reference's encoder NTK base comes from the padded input length: here it
    exceeds ``block_size`` although every row's real tokens fit in it. The decoder
    stays within ``block_size`` so only the encoder's base is at stake."""
    gen = torch.Generator().manual_seed(seed)
    block = 8
    model, ref, config = build(tmp_path, gen, dict(rope_factor=4.0, block_size=block),
                               qk_std=0.8)
    enc = torch.randint(3, config["vocab_size"], (4, 2 * block), generator=gen)
    enc[:, block - 2:] = 0  # right padding; the real tokens fit in block_size
    tokens = generate(model, enc, block - 1)
    trimmed = ref.step_logits(enc[:, :block - 2], BOS, tokens)
    require((ref.step_logits(enc, BOS, tokens) - trimmed).abs().max() > 1.0,
            "the reference's logits do not depend on the padded length here")
    assert_greedy_matches(tokens, ref, enc)


def test_generated_pad_token_is_masked_in_later_steps(tmp_path, seed):
    """The reference masks every decoder position holding the pad id, including
    generated ones. Token 0's embedding (= its LM-head row) is set so that row 0's
    first greedy token is the pad id; the steps after it must still match."""
    gen = torch.Generator().manual_seed(seed)
    config = mu.model_config(block_size=32)
    state = mu.random_state_dict(config, gen, qk_std=0.8)
    enc = torch.randint(3, config["vocab_size"], (3, 9), generator=gen)
    ref = mu.MuReference(state, config)
    states, mask = ref.encode(enc)
    h0 = ref.decoder_hidden(torch.full((3, 1), BOS), states, mask)[0, -1]
    top = (h0 @ ref.w["lm_head.weight"].T).max()
    # Token 0's logit for row 0 becomes top + 4; nothing else in step 0 depends on it.
    state["transformer.wte.weight"][0] = (h0 * (top + 4) / h0.pow(2).sum()).to(torch.bfloat16)
    require(state["lm_head.weight"] is state["transformer.wte.weight"], "head not tied")
    ref = mu.MuReference(state, config)
    require(ref.greedy(enc, BOS, 1)[0, 0] == 0, "row 0 does not start with the pad id")
    model = save_and_import(tmp_path, state, config)
    tokens = generate(model, enc, 16)
    unmasked = mu.MuReference(state, config, mask_decoder_pads=False)
    require((ref.step_logits(enc, BOS, tokens) - unmasked.step_logits(enc, BOS, tokens)
             ).abs().max() > 1.0, "the reference's logits do not depend on the pad masking")
    assert_greedy_matches(tokens, ref, enc)
