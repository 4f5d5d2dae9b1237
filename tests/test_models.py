"""Configs, sizing, the two models' forward/loss, backends, save/load (tiny configs)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from _helpers import randomize
from fastencdec import DecoderOnlyConfig, DecoderOnlyLM, EncDecConfig, EncoderDecoderLM
from fastencdec.models import ops_backend, size_decoder_only_to, size_encdec_to_budget

TINY = EncDecConfig.preset("tiny")


pytestmark = pytest.mark.usefixtures("one_thread")




def tiny_models(**changes):
    enc = EncDecConfig.preset("tiny").replace(**changes)
    return (randomize(EncoderDecoderLM(enc)),
            randomize(DecoderOnlyLM(DecoderOnlyConfig.twin_of(enc))))


def rand_ids(batch, length, vocab=TINY.vocab_size):
    return torch.randint(3, vocab, (batch, length))  # avoid pad/bos/eos ids


# -- configs -------------------------------------------------------------------------------
def test_mu_330m_preset_is_design_section_1():
    c = EncDecConfig.preset("mu-330m")
    assert (c.vocab_size, c.d_model, c.n_encoder_layers, c.n_decoder_layers) == (32128, 1024, 20, 10)
    assert (c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff) == (6, 3, 64, 4096)
    assert (c.mlp, c.attn_bias, c.tie_embeddings, c.rope_theta) == ("gelu", True, True, 10000.0)
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (0, 1, 32000)
    assert c.num_parameters() == 332_042_240  # "about 332.0M"
    with torch.device("meta"):  # no memory: count the real modules
        model = EncoderDecoderLM(c)
    assert model.num_parameters() == c.num_parameters()


@pytest.mark.parametrize("mlp,attn_bias,tie", [("gelu", True, True), ("swiglu", False, False)])
def test_analytic_parameter_count_matches_modules(mlp, attn_bias, tie):
    enc = TINY.replace(mlp=mlp, attn_bias=attn_bias, tie_embeddings=tie)
    dec = DecoderOnlyConfig.twin_of(enc)
    assert EncoderDecoderLM(enc).num_parameters() == enc.num_parameters()
    assert DecoderOnlyLM(dec).num_parameters() == dec.num_parameters()


@pytest.mark.parametrize("cls,preset", [(EncDecConfig, "tiny"), (EncDecConfig, "mu-330m"),
                                        (DecoderOnlyConfig, "tiny")])
def test_config_json_round_trip(tmp_path, cls, preset):
    config = cls.preset(preset).replace(rope_scaling_factor=2.0, dropout=0.25)
    assert cls.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    config.save(tmp_path / "c.json")
    assert cls.load(tmp_path / "c.json") == config
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp file left


def test_config_errors():
    with pytest.raises(ValueError, match="n_kv_heads"):
        TINY.replace(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="mlp"):
        TINY.replace(mlp="relu")
    with pytest.raises(ValueError, match="eos_token_id"):
        TINY.replace(eos_token_id=TINY.vocab_size)
    with pytest.raises(ValueError, match="unknown"):
        EncDecConfig.from_dict({**TINY.to_dict(), "n_layer": 3})
    with pytest.raises(ValueError, match="decoder_only"):
        EncDecConfig.from_dict(DecoderOnlyConfig.preset("tiny").to_dict())
    with pytest.raises(ValueError, match="unknown preset"):
        EncDecConfig.preset("mu-1b")


# -- sizing --------------------------------------------------------------------------------
@pytest.mark.parametrize("split,share", [((2, 1), 2 / 3), ((1, 1), 1 / 2), ((1, 2), 1 / 3)])
@pytest.mark.parametrize("budget", [332e6, 1e9])
def test_size_encdec_to_budget(split, share, budget):
    c = size_encdec_to_budget(budget, split)
    assert abs(c.num_parameters() / budget - 1) < 0.03
    enc, dec = c.encoder_params(), c.decoder_params()
    assert abs(enc / (enc + dec) - share) < 0.04
    twin = DecoderOnlyConfig.twin_of(c)
    assert abs(twin.num_parameters() / c.num_parameters() - 1) < 0.03
    assert (twin.d_model, twin.n_heads, twin.d_ff) == (c.d_model, c.n_heads, c.d_ff)


def test_sizing_with_other_widths_and_errors():
    c = size_encdec_to_budget(40e6, d_model=512, d_ff=2048, n_heads=8, n_kv_heads=4)
    assert abs(c.num_parameters() / 40e6 - 1) < 0.05 and c.d_model == 512
    d = size_decoder_only_to(40e6, d_model=512, d_ff=2048, n_heads=8, n_kv_heads=4)
    assert abs(d.num_parameters() / 40e6 - 1) < 0.05
    assert DecoderOnlyConfig.twin_of(EncDecConfig.preset("mu-330m")).n_layers == 31
    with pytest.raises(ValueError, match="too small"):
        size_encdec_to_budget(1e6)
    with pytest.raises(ValueError, match="split"):
        size_encdec_to_budget(332e6, split=(2, 0))


# -- forward and loss ----------------------------------------------------------------------
def test_encoder_decoder_forward_and_loss(seed):
    model, _ = tiny_models()
    ids, labels = rand_ids(2, 7), rand_ids(2, 5)
    labels[1, 3:] = -100
    out = model(ids, labels=labels)
    assert out.logits.shape == (2, 5, TINY.vocab_size)
    dec_in = model.shift_right(labels)
    assert dec_in[0, 0] == TINY.bos_token_id and dec_in[1, 4] == TINY.pad_token_id
    logits = model(ids, decoder_input_ids=dec_in).logits
    torch.testing.assert_close(logits, out.logits)
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    # A decoder mask removes positions from the loss; none left -> 0, not NaN.
    dmask = torch.zeros(2, 5, dtype=torch.bool)
    assert model(ids, labels=labels, decoder_attention_mask=dmask).loss.item() == 0.0
    out.loss.backward()
    assert model.embed.weight.grad is not None and model.lm_head.weight is model.embed.weight


def test_decoder_only_forward_and_loss(seed):
    _, model = tiny_models()
    ids = rand_ids(2, 6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False  # left padding
    out = model(ids, attention_mask=mask, labels=ids)
    labels = ids.masked_fill(~mask, -100)[:, 1:]
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, TINY.vocab_size),
                               labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_padding_does_not_change_real_rows(seed):
    encdec, deconly = tiny_models()
    ids, dec = rand_ids(2, 6), rand_ids(2, 4)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False  # right-padded encoder input
    # fp32 GEMMs of 2 x 6 and 1 x 4 rows may round differently (seed 877992202: 1.1e-5)
    batched = encdec(ids, mask, decoder_input_ids=dec).logits
    alone = encdec(ids[1:, :4], decoder_input_ids=dec[1:]).logits
    torch.testing.assert_close(batched[1:], alone, atol=5e-5, rtol=5e-5)

    left = torch.ones(2, 6, dtype=torch.bool)
    left[1, :3] = False  # left-padded decoder-only prompt
    batched = deconly(ids, left).logits
    alone = deconly(ids[1:, 3:]).logits
    torch.testing.assert_close(batched[1:, 3:], alone, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_kernel_path_matches_reference(backend, name, seed):
    encdec, deconly = tiny_models()
    ids, dec = rand_ids(2, 9), rand_ids(2, 5)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    with torch.no_grad():
        with ops_backend("reference"):
            ref_ed = encdec(ids, mask, decoder_input_ids=dec).logits
            ref_do = deconly(ids, mask).logits
        backend(name)
        got_ed = encdec(ids, mask, decoder_input_ids=dec).logits
        got_do = deconly(ids, mask).logits
    torch.testing.assert_close(got_ed, ref_ed, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(got_do, ref_do, atol=2e-4, rtol=2e-4)


def test_ops_backend_restores_environment(monkeypatch):
    monkeypatch.setenv("FASTENCDEC_BACKEND", "cpp")
    model = EncoderDecoderLM(TINY)
    with model.ops_backend("reference"):
        assert os.environ["FASTENCDEC_BACKEND"] == "reference"
    assert os.environ["FASTENCDEC_BACKEND"] == "cpp"
    with pytest.raises(ValueError, match="backend"):
        with ops_backend("cuda"):
            pass


def test_dropout_only_in_training(seed):
    model = randomize(EncoderDecoderLM(TINY.replace(dropout=0.5)))
    ids, dec = rand_ids(1, 5), rand_ids(1, 3)
    a, b = model(ids, decoder_input_ids=dec).logits, model(ids, decoder_input_ids=dec).logits
    torch.testing.assert_close(a, b)
    model.train()
    assert not torch.equal(model(ids, decoder_input_ids=dec).logits, a)


def test_forward_errors():
    model, deconly = tiny_models()
    ids = rand_ids(2, 4)
    with pytest.raises(ValueError, match="input_ids values"):
        model(ids + TINY.vocab_size, decoder_input_ids=ids)
    with pytest.raises(ValueError, match="decoder_input_ids or labels"):
        model(ids)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, torch.ones(2, 3, dtype=torch.bool), decoder_input_ids=ids)
    with pytest.raises(ValueError, match="labels"):
        model(ids, decoder_input_ids=ids, labels=ids[:, :2])
    with pytest.raises(ValueError, match="empty batch"):
        deconly(ids[:0])
    with pytest.raises(TypeError, match="integer"):
        deconly(ids.float())


# -- checkpoints ---------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip_is_exact(tmp_path, tie, seed):
    for model in tiny_models(tie_embeddings=tie):
        model.save_pretrained(tmp_path / "m")
        loaded = type(model).from_pretrained(tmp_path / "m")
        assert loaded.config == model.config
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(),
                                     strict=True):
            assert torch.equal(a, b), name
        assert (loaded.lm_head.weight is loaded.embed.weight) == tie
        with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
            assert ("lm_head.weight" in f.keys()) == (not tie)  # tied weights stored once
        ids = rand_ids(1, 5)
        kw = {"decoder_input_ids": ids} if isinstance(model, EncoderDecoderLM) else {}
        assert torch.equal(model(ids, **kw).logits, loaded(ids, **kw).logits)
        assert not [p for p in os.listdir(tmp_path / "m") if p.startswith(".")]


def test_from_pretrained_errors(tmp_path):
    model, _ = tiny_models()
    with pytest.raises(FileNotFoundError):
        EncoderDecoderLM.from_pretrained(tmp_path / "missing")
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="encoder_decoder"):
        DecoderOnlyLM.from_pretrained(tmp_path / "m")
    half = EncoderDecoderLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert half.embed.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_mlp_over_many_rows_runs_in_blocks_without_gradients(mlp, seed, monkeypatch):
    """Inference over more rows than one block: blocks of rows give the rows' values (the
    hidden activations never exist for every row at once); with gradients, one pass."""
    from fastencdec.models import layers

    torch.manual_seed(seed)
    module = layers.make_mlp(EncDecConfig.preset("tiny").replace(mlp=mlp))
    x = torch.randn(3, 701, module.fc1.in_features if mlp == "gelu" else module.gate.in_features)
    sizes = []
    inner = module.fc1 if mlp == "gelu" else module.gate
    inner.register_forward_hook(lambda _m, args, _o: sizes.append(args[0].shape[0]))
    with torch.no_grad():
        blocked = module(x)
    assert sizes == [1024, 1024, 3 * 701 - 2048]
    with torch.enable_grad():
        whole = module(x.requires_grad_())
    assert sizes[-1] == 3  # [3, 701, d]: one call
    torch.testing.assert_close(blocked, whole.detach(), atol=1e-6, rtol=1e-6)
    assert blocked.shape == whole.shape
