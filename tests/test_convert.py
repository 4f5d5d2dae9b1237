"""Importing the reference checkpoint: its model_config, names, the GQA head
permutation, the state dict checked against the config, safety, clear errors.

Expected logits come from ``mu_reference_model`` (an independent re-implementation
of the reference's forward, DESIGN §1); the parity in every RoPE/GQA mode and for
generation is in ``test_parity_reference.py``.
"""

from __future__ import annotations

import pytest
import torch

import mu_reference_model as mu
from fastencdec import convert
from fastencdec.convert import import_mu_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = mu.model_config(n_head=6, n_kv_head=3, qkv_embd=192)  # head_dim 32


def save(path, state, model_config=None):
    obj = {"model_state_dict": state, "step": 1000}
    if model_config is not None:
        obj["model_config"] = model_config
    torch.save(obj, path)
    return path


@pytest.fixture
def checkpoint(tmp_path, seed):
    gen = torch.Generator().manual_seed(seed)
    state = mu.random_state_dict(CONFIG, gen)
    enc = torch.randint(3, CONFIG["vocab_size"], (2, 9), generator=gen)
    enc[1, 6:] = 0  # right padding, pad id 0 as in the reference
    dec = torch.randint(3, CONFIG["vocab_size"], (2, 5), generator=gen)
    dec[:, 0] = 1  # BOS
    dec[0, 4:] = 0
    return tmp_path, state, enc, dec


# -- without model_config: inferred from the shapes -------------------------------------------
@pytest.mark.filterwarnings("ignore:fastencdec.ops")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_import_matches_reference_math(checkpoint, dtype, tol):
    tmp_path, state, enc, dec = checkpoint
    path = save(tmp_path / "model.pt", state)  # no model_config
    model = import_mu_checkpoint(path, dtype=dtype, head_dim=32, eos_token_id=2)
    c = model.config
    shape = (c.n_heads, c.n_kv_heads, c.n_encoder_layers, c.n_decoder_layers, c.d_ff)
    assert shape == (6, 3, 2, 2, 96)
    assert c.tie_embeddings and model.lm_head.weight is model.embed.weight
    assert model.embed.weight.dtype == dtype
    expected = mu.MuReference(state, CONFIG, dtype=torch.float64).logits(enc, dec)
    with torch.no_grad():
        got = model(enc, enc != 0, decoder_input_ids=dec, decoder_attention_mask=dec != 0).logits
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)


@pytest.mark.filterwarnings("ignore:fastencdec.ops")
def test_head_permutation_is_needed(checkpoint, monkeypatch):
    tmp_path, state, enc, dec = checkpoint
    path = save(tmp_path / "model.pt", state)
    monkeypatch.setattr(convert, "reference_head_order", lambda n, kv: torch.arange(n))
    model = import_mu_checkpoint(path, dtype=torch.float64, head_dim=32, eos_token_id=2)
    with torch.no_grad():
        got = model(enc, enc != 0, decoder_input_ids=dec).logits
    expected = mu.MuReference(state, CONFIG, dtype=torch.float64).logits(enc, dec)
    assert not torch.allclose(got, expected, atol=1e-3)


def test_head_order_maps_to_the_same_kv_head():
    for n_heads, n_kv in [(6, 3), (8, 2), (4, 4), (8, 1), (12, 6)]:
        perm = convert.reference_head_order(n_heads, n_kv)
        assert sorted(perm.tolist()) == list(range(n_heads))
        group = n_heads // n_kv
        assert all(int(perm[j]) % n_kv == j // group for j in range(n_heads))


# -- with model_config -------------------------------------------------------------------------
@pytest.mark.parametrize("interleaved", [False, True])
def test_model_config_sets_the_configuration(tmp_path, seed, interleaved):
    gen = torch.Generator().manual_seed(seed)
    config = mu.model_config(n_head=12, n_kv_head=6, qkv_embd=384, is_interleaved=interleaved,
                             rope_theta=500000, rope_factor=4.0, block_size=48, pad_token_id=5,
                             dropout=0.1)
    state = mu.random_state_dict(config, gen)
    model = import_mu_checkpoint(save(tmp_path / "m.pt", state, config), eos_token_id=2)
    c = model.config
    assert (c.n_heads, c.n_kv_heads, c.head_dim, c.d_model, c.d_ff) == (12, 6, 32, 64, 96)
    assert (c.rope_theta, c.rope_scaling_factor, c.max_position_embeddings) == (5e5, 4.0, 48)
    assert (c.pad_token_id, c.dropout, c.vocab_size) == (5, 0.1, 300)
    # Interleaved K/V heads already use fastencdec's head mapping: nothing is permuted.
    q_ref = state["transformer.e.1.attn.q_linear.weight"].float()
    q_got = model.encoder[1].attn.q_proj.weight
    perm = convert.reference_head_order(12, 6)
    want = q_ref if interleaved else q_ref.view(12, 32, -1)[perm].reshape(q_ref.shape)
    assert torch.equal(q_got, want)
    assert interleaved or not torch.equal(q_got, q_ref)


def test_model_config_missing_fields_take_the_reference_defaults(tmp_path, seed):
    gen = torch.Generator().manual_seed(seed)
    config = mu.model_config(n_head=6, n_kv_head=3, qkv_embd=None, n_embd=192)
    state = mu.random_state_dict({**config, "qkv_embd": 192}, gen)
    partial = {k: v for k, v in config.items()
               if k not in ("is_interleaved", "rope_factor", "dropout", "pad_token_id")}
    c = import_mu_checkpoint(save(tmp_path / "m.pt", state, partial), eos_token_id=2).config
    assert (c.head_dim, c.rope_scaling_factor, c.dropout, c.pad_token_id) == (32, 1.0, 0.1, 0)


@pytest.mark.parametrize("field,value,match", [
    ("n_head", "12", "'n_head' must be an int"),
    ("n_encoder_layer", True, "'n_encoder_layer' must be an int"),
    ("n_decoder_layer", 0, "'n_decoder_layer' must be >= 1"),
    ("block_size", -8, "'block_size' must be >= 1"),
    ("is_interleaved", "false", "'is_interleaved' must be a bool"),
    ("rope_theta", float("inf"), "'rope_theta' must be a finite number"),
    ("rope_factor", "2.0", "'rope_factor' must be a finite number"),
    ("qkv_embd", 100, "qkv_embd=100 is not a multiple of n_head=12"),
    ("n_kv_head", 5, "n_heads .* must be a multiple of n_kv_heads"),
    ("pad_token_id", 300, r"pad_token_id must lie in \[0, vocab_size=300\)"),
    ("use_swiglu", True, r"fields this importer does not know.*\['use_swiglu'\]"),
])
def test_model_config_errors_name_the_field(tmp_path, seed, field, value, match):
    gen = torch.Generator().manual_seed(seed)
    state = mu.random_state_dict(mu.model_config(), gen)
    path = save(tmp_path / "m.pt", state, {**mu.model_config(), field: value})
    with pytest.raises(ValueError, match=match) as info:
        import_mu_checkpoint(path, eos_token_id=2)
    assert str(path) in str(info.value)


def test_model_config_must_be_a_dict(tmp_path, seed):
    state = mu.random_state_dict(mu.model_config(), torch.Generator().manual_seed(seed))
    path = save(tmp_path / "m.pt", state, [1, 2])
    with pytest.raises(ValueError, match="model_config must be a dict"):
        import_mu_checkpoint(path, eos_token_id=2)


def drop_layer(state, prefix):
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


@pytest.mark.parametrize("edit,match", [
    (lambda s: drop_layer(s, "transformer.e.1."),
     r"its model_config says n_encoder_layer=2 but layer 1 \(transformer.e.1.\*\) is absent"),
    (lambda s: drop_layer(s, "transformer.h.0."),
     r"says n_decoder_layer=2 but layer 0 \(transformer.h.0.\*\) is absent"),
    (lambda s: {**s, **{k.replace(".h.1.", ".h.2."): v for k, v in s.items() if ".h.1." in k}},
     r"says n_decoder_layer=2 but the state dict holds extra layers from transformer.h.2.\*"),
    (lambda s: drop_layer(s, "transformer.e.0.mlp.fc2.bias"),
     r"lacks \['transformer.e.0.mlp.fc2.bias'\]"),
    (lambda s: {**s, "transformer.e.1.attn.q_linear.weight": torch.zeros(192, 64)},
     r"'transformer.e.1.attn.q_linear.weight' has shape \[192, 64\]; expected \[384, 64\] "
     r"from its model_config"),
    (lambda s: {**s, "transformer.ln_f.weight": torch.ones(64, dtype=torch.int64)},
     r"'transformer.ln_f.weight' has dtype torch.int64"),
    (lambda s: {**s, "transformer.extra.weight": torch.zeros(2)},
     r"unexpected tensor 'transformer.extra.weight'"),
])
def test_state_dict_is_checked_against_model_config(tmp_path, seed, edit, match):
    config = mu.model_config()
    state = mu.random_state_dict(config, torch.Generator().manual_seed(seed))
    path = save(tmp_path / "m.pt", edit(state), config)
    with pytest.raises(ValueError, match=match):
        import_mu_checkpoint(path, eos_token_id=2)


def test_width_mismatch_with_model_config_names_the_tensor(tmp_path, seed):
    config = mu.model_config()
    state = mu.random_state_dict(config, torch.Generator().manual_seed(seed))
    path = save(tmp_path / "m.pt", state, {**config, "n_embd": 128})
    with pytest.raises(ValueError, match=r"'transformer.wte.weight' has shape \[300, 64\]; "
                                         r"expected \[300, 128\] from its model_config"):
        import_mu_checkpoint(path, eos_token_id=2)


def test_huge_layer_counts_fail_fast(tmp_path, seed):
    config = mu.model_config()
    state = mu.random_state_dict(config, torch.Generator().manual_seed(seed))
    path = save(tmp_path / "m.pt", state, {**config, "n_encoder_layer": 2**31 - 1})
    with pytest.raises(ValueError, match=r"n_encoder_layer=2147483647 but layer 2"):
        import_mu_checkpoint(path, eos_token_id=2)


def test_arguments_must_agree_with_model_config(tmp_path, seed):
    config = mu.model_config()  # 12 heads of 32
    state = mu.random_state_dict(config, torch.Generator().manual_seed(seed))
    path = save(tmp_path / "m.pt", state, config)
    with pytest.raises(ValueError, match=r"head_dim=64 contradicts .* = 32\)"):
        import_mu_checkpoint(path, head_dim=64, eos_token_id=2)
    with pytest.raises(ValueError, match="is_interleaved=True contradicts"):
        import_mu_checkpoint(path, is_interleaved=True, eos_token_id=2)
    with pytest.raises(ValueError, match=r"\['n_heads'\] are set by the checkpoint"):
        import_mu_checkpoint(path, n_heads=6, eos_token_id=2)
    with pytest.raises(ValueError, match="eos_token_id must lie in .*pass e.g. eos_token_id="):
        import_mu_checkpoint(path)  # mu-330m's EOS 32000 does not fit 300 tokens
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        import_mu_checkpoint(path, dtype=torch.int32, eos_token_id=2)
    model = import_mu_checkpoint(path, eos_token_id=2, max_position_embeddings=64,
                                 rope_scaling_factor=2.0)
    assert (model.config.max_position_embeddings, model.config.rope_scaling_factor) == (64, 2.0)


# -- without model_config: consistency still checked -------------------------------------------
@pytest.mark.parametrize("edit,match", [
    (lambda s: drop_layer(s, "transformer.e.0.attn.q_linear.weight"),
     r"lacks 'transformer.e.0.attn.q_linear.weight'"),
    (lambda s: drop_layer(s, "transformer.e.0.mlp.fc1.weight"),
     r"lacks 'transformer.e.0.mlp.fc1.weight'"),
    (lambda s: drop_layer(s, "transformer.e.1.ln2.weight"),
     r"lacks \['transformer.e.1.ln2.weight'\]"),
    (lambda s: drop_layer(s, "transformer.h.0."),
     r"layers transformer.h.\* are numbered with a gap \(layer 0 is absent\)"),
    (lambda s: {**s, "transformer.h.1.mlp.fc1.weight": torch.zeros(50, 64)},
     r"'transformer.h.1.mlp.fc1.weight' has shape \[50, 64\]; expected \[96, 64\] from the "
     r"shapes of its first layer"),
])
def test_without_model_config_the_state_dict_must_be_consistent(tmp_path, seed, edit, match):
    state = mu.random_state_dict(mu.model_config(), torch.Generator().manual_seed(seed))
    path = save(tmp_path / "m.pt", edit(state))
    with pytest.raises(ValueError, match=match):
        import_mu_checkpoint(path, head_dim=32, eos_token_id=2)


def test_without_model_config_head_dim_must_divide(tmp_path, seed):
    state = mu.random_state_dict(mu.model_config(), torch.Generator().manual_seed(seed))
    path = save(tmp_path / "m.pt", state)
    with pytest.raises(ValueError, match="head_dim=80 does not divide the q/k widths 384/192"):
        import_mu_checkpoint(path, head_dim=80, eos_token_id=2)


# -- safety -------------------------------------------------------------------------------------
class NotATensor:
    pass


def test_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {"x": NotATensor()}}, path)
    with pytest.raises(ValueError, match="weights_only"):
        import_mu_checkpoint(path)


def test_rejects_wrong_or_unreadable_contents(tmp_path, seed):
    path = tmp_path / "other.pt"
    torch.save({"model_state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match="not a reference checkpoint"):
        import_mu_checkpoint(path)
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=f"{path} is not a readable torch checkpoint"):
        import_mu_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        import_mu_checkpoint(tmp_path / "missing.pt")
