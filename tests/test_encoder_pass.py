"""The int8 and bf16 encoders in one C++ call (models/encoder_pass.py) against the module
path: the same kernels in the same order on the same data, so the states must be
bitwise equal, for every padding pattern, batch, GQA ratio and RoPE setting."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from _helpers import randomize, record_one_calls
from fastencdec import EncDecConfig, EncoderDecoderLM
from fastencdec.models import encoder_pass
from fastencdec.models.quantize import to_inference

_C = pytest.importorskip("fastencdec._C")

TINY = EncDecConfig.preset("tiny")
FORMATS = ["int8", "bf16"]
CASES = [
    dict(),                                                  # GQA 4/2, biases
    dict(n_encoder_layers=3, attn_bias=False, d_ff=72),      # d_ff not a panel multiple
    dict(n_heads=3, n_kv_heads=1, head_dim=34, d_model=40),  # GQA 3/1, odd widths
    dict(rope_scaling_factor=2.0, max_position_embeddings=16),  # dynamic NTK (L > 16)
]


def _both_paths(model, monkeypatch, **inputs):
    """The one-call encoder with the module path's fp32 attention products, and the
    module path."""
    model.encoder_attention = "fp32"
    with torch.inference_mode():
        fast = model.encode(**inputs)
        with monkeypatch.context() as m:
            m.setattr(encoder_pass, "run", lambda *a, **k: None)
            slow = model.encode(**inputs)
    return fast, slow


def _mask(kind: str, batch: int, seq_len: int, gen) -> torch.Tensor | None:
    if kind == "none":
        return None
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    if kind == "mixed":  # right, left and inner padding, and one row of padding only
        mask[0, seq_len - 3:] = False
        mask[1 % batch, :2] = False
        mask[2 % batch, 4:7] = False
        mask[batch - 1] = False
    else:  # random
        mask = torch.rand(batch, seq_len, generator=gen) < 0.7
    return mask


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("mask_kind", ["none", "mixed", "random"])
def test_one_call_encoder_equals_the_module_path(fmt, case, mask_kind, threads, seed,
                                                 monkeypatch):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = to_inference(randomize(EncoderDecoderLM(TINY.replace(**CASES[case]))), fmt)
    assert encoder_pass.plan(model) is not None
    batch, seq_len = 4, int(torch.randint(17, 40, (1,), generator=gen))
    ids = torch.randint(3, TINY.vocab_size, (batch, seq_len), generator=gen)
    mask = _mask(mask_kind, batch, seq_len, gen)
    fast, slow = _both_paths(model, monkeypatch, input_ids=ids, attention_mask=mask)
    assert fast.dtype == slow.dtype == (torch.bfloat16 if fmt == "bf16" else torch.float32)
    assert torch.equal(fast, slow), f"max diff {(fast.float() - slow.float()).abs().max():.3g}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", [0, 2, 3])
def test_bf16_attention_is_as_accurate_and_row_independent(fmt, case, seed, monkeypatch):
    """The default bf16 attention products: against the float model, the converted
    model's states are about as far off as with fp32 products (the int8/bf16 weights
    dominate the error), and each row equals that row encoded alone."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    float_model = randomize(EncoderDecoderLM(TINY.replace(**CASES[case])))
    model = to_inference(copy.deepcopy(float_model), fmt)
    ids = torch.randint(3, TINY.vocab_size, (3, 37), generator=gen)
    mask = _mask("mixed", 3, 37, gen)
    mask[2] = torch.arange(37) < 30  # instead of all padding: errors are measured on it
    with torch.inference_mode():
        want = float_model.encode(ids, attention_mask=mask)
        _, fp32 = _both_paths(model, monkeypatch, input_ids=ids, attention_mask=mask)
        model.encoder_attention = "bf16"
        fast = model.encode(ids, attention_mask=mask)
        rows = [model.encode(ids[b:b + 1], attention_mask=mask[b:b + 1]) for b in range(3)]
    assert not torch.equal(fast, fp32), "bf16 attention products changed nothing"
    keep = mask[:, :, None].expand_as(fast)

    def err(x):
        return ((x.float() - want)[keep].norm() / want[keep].norm()).item()

    assert err(fast) < 1.25 * err(fp32) + 5e-3, (err(fast), err(fp32))
    for b in range(3):
        assert torch.equal(fast[b:b + 1], rows[b])
    model.encoder_attention = "fp16"
    with pytest.raises(ValueError, match="encoder_attention must be one of"):
        model.encode(ids)


@pytest.mark.parametrize("fmt", FORMATS)
def test_more_rows_than_one_mlp_block(fmt, seed, monkeypatch):
    """B * L above the 512 rows the MLP runs at a time: blocks give the same rows."""
    torch.manual_seed(seed)
    model = to_inference(randomize(EncoderDecoderLM(TINY)), fmt)
    ids = torch.randint(3, TINY.vocab_size, (3, 211))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 150:] = False
    fast, slow = _both_paths(model, monkeypatch, input_ids=ids, attention_mask=mask)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("fmt", FORMATS)
def test_inputs_embeds_are_read_not_written(fmt, seed, monkeypatch):
    torch.manual_seed(seed)
    model = to_inference(randomize(EncoderDecoderLM(TINY)), fmt)
    dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
    embeds = torch.randn(2, 13, TINY.d_model).to(dtype)
    before = embeds.clone()
    fast, slow = _both_paths(model, monkeypatch, inputs_embeds=embeds)
    assert torch.equal(embeds, before)
    assert torch.equal(fast, slow)
    # a strided view of a larger tensor is read as its values
    wide = torch.randn(2, 13, 2 * TINY.d_model).to(dtype)
    view = wide[..., ::2]
    fast, slow = _both_paths(model, monkeypatch, inputs_embeds=view)
    assert torch.equal(fast, slow)


def test_the_module_path_runs_where_the_one_call_cannot(seed, monkeypatch):
    torch.manual_seed(seed)
    assert encoder_pass.plan(randomize(EncoderDecoderLM(TINY))) is None  # fp32
    assert encoder_pass.plan(
        to_inference(randomize(EncoderDecoderLM(TINY.replace(mlp="swiglu"))), "int8")) is None
    assert encoder_pass.plan(
        to_inference(randomize(EncoderDecoderLM(TINY)), "int8", fuse=False)) is None
    model = to_inference(randomize(EncoderDecoderLM(TINY)), "int8")
    ids = torch.randint(3, TINY.vocab_size, (2, 9))
    calls = record_one_calls(monkeypatch, encoder_pass)
    with torch.no_grad():
        model.encode(ids)
        seen = []  # a forward hook on an encoder block must see it run
        handle = model.encoder[1].mlp.register_forward_hook(lambda *a: seen.append(1))
        model.encode(ids)
        handle.remove()
        model.train()
        model.encode(ids)
        model.eval()
    assert calls == [True, False, False] and seen == [1]


@pytest.mark.parametrize("fmt", FORMATS)
def test_plan_follows_the_weights(fmt, seed):
    torch.manual_seed(seed)
    model = to_inference(randomize(EncoderDecoderLM(TINY)), fmt)
    plan = encoder_pass.plan(model)
    assert plan is not None and encoder_pass.plan(model) is plan  # cached
    ids = torch.randint(3, TINY.vocab_size, (2, 9))
    with torch.no_grad():
        before = model.encode(ids)
        fc2 = model.encoder[0].mlp.fc2
        plain = fc2.unpacked()
        fc2.pack(**dict(plain, weight=-plain["weight"]))
        assert encoder_pass.plan(model) is not plan
        after = model.encode(ids)
        model.encoder_norm.weight.mul_(2)  # read in place
        doubled = model.encode(ids)
    assert not torch.equal(before, after), "the repacked fc2 was not used"
    assert not torch.equal(after, doubled), "the updated norm weight was not read"
    model.encoder[1].mlp.fc1.activation = None  # GELU back in the module: no one-call path
    assert encoder_pass.plan(model) is None
    model.encoder[1].mlp.fc1.activation = "gelu_tanh"
    assert encoder_pass.plan(model) is not None


def test_bad_arguments_are_clear_errors(seed):
    torch.manual_seed(seed)
    model = to_inference(randomize(EncoderDecoderLM(TINY)), "int8")
    enc = encoder_pass.plan(model)
    d = TINY.d_model
    x = np.zeros((2, 5, d), np.float32)
    pos = np.arange(5, dtype=np.int64)[None]
    states = np.zeros_like(x)
    enc.encode(x, None, pos, 10000.0, states, True, 1)  # fine
    with pytest.raises(ValueError, match="states: dimension 1"):
        enc.encode(x, None, pos, 10000.0, np.zeros((2, 4, d), np.float32), False, 1)
    with pytest.raises(ValueError, match="positions: dimension 0"):
        enc.encode(x, None, np.zeros((3, 5), np.int64), 10000.0, states, False, 1)
    with pytest.raises(TypeError, match="positions: expected dtype int64"):
        enc.encode(x, None, pos.astype(np.int32), 10000.0, states, False, 1)
    with pytest.raises(ValueError, match="key_mask: dimension 1"):
        enc.encode(x, np.ones((2, 4), bool), pos, 10000.0, states, False, 1)
    with pytest.raises(ValueError, match="rope_base"):
        enc.encode(x, None, pos, float("nan"), states, False, 1)
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        enc.encode(x.astype(np.float64), None, pos, 10000.0, states, False, 1)
    big = np.zeros((2 * 5 * d + 1,), np.float32)
    with pytest.raises(ValueError, match="not overlap"):
        enc.encode(big[1:].reshape(2, 5, d), None, pos, 10000.0, big[:-1].reshape(2, 5, d),
                    False, 1)
    with pytest.raises(ValueError, match="each layer is"):
        _C.Int8Blocks(d, 4, 2, 32, 1e-6, [(1, 2)], np.ones(d, np.float32))


def _one_call_taken(model, monkeypatch, **inputs) -> bool:
    with monkeypatch.context() as m:
        calls = record_one_calls(m, encoder_pass)
        model.encode(**inputs)
    return calls == [True]


@pytest.mark.parametrize("change", ["replace_norm", "delete_layer", "swap_layers",
                                    "append_layer", "replace_out_proj", "norm_data",
                                    "share_memory"])
def test_plan_follows_the_structure(change, seed, monkeypatch):
    """Replacing, moving, adding or removing a module, or new storage behind a norm
    weight, rebuilds the plan: the one-call states keep equalling the module path's."""
    import copy as copy_module

    from fastencdec.models.layers import RMSNorm

    torch.manual_seed(seed)
    model = to_inference(randomize(EncoderDecoderLM(TINY.replace(n_encoder_layers=3))), "int8")
    model.encoder_attention = "fp32"
    ids = torch.randint(3, TINY.vocab_size, (2, 11))
    with torch.no_grad():
        model.encode(ids)  # plan built and cached
        if change == "replace_norm":
            norm = RMSNorm(TINY.d_model, TINY.norm_eps)
            norm.weight.uniform_(0.5, 1.5)
            model.encoder_norm = norm
        elif change == "delete_layer":
            del model.encoder[1]
        elif change == "swap_layers":
            model.encoder[0], model.encoder[2] = model.encoder[2], model.encoder[0]
        elif change == "append_layer":
            model.encoder.append(copy_module.deepcopy(model.encoder[0]))
        elif change == "replace_out_proj":
            model.encoder[1].attn.out_proj = copy_module.deepcopy(model.encoder[0].attn.out_proj)
        elif change == "norm_data":
            model.encoder[0].norm1.weight.data = torch.rand(TINY.d_model) + 0.5
        else:
            model.share_memory()
            junk = [torch.full((TINY.d_model,), 1e6) for _ in range(200)]  # noqa: F841
    fast, slow = _both_paths(model, monkeypatch, input_ids=ids)
    assert torch.equal(fast, slow), f"{change}: max diff {(fast - slow).abs().max():.3g}"


def test_the_module_path_runs_when_asked_for(seed, monkeypatch):
    """A fused activation the C++ blocks do not apply, a dropout module left in training
    mode, parameters that want gradients, or a forced non-C++ backend: module path."""
    torch.manual_seed(seed)
    ids = torch.randint(3, TINY.vocab_size, (2, 9))
    model = to_inference(randomize(EncoderDecoderLM(TINY)), "int8")
    assert _one_call_taken(model, monkeypatch, input_ids=ids)
    model.encoder[0].attn.out_proj.activation = "gelu_tanh"
    assert encoder_pass.plan(model) is None
    model.encoder[0].attn.out_proj.activation = None
    model.encoder[1].dropout.train()
    assert not _one_call_taken(model, monkeypatch, input_ids=ids)
    model.encoder[1].dropout.eval()
    model.encoder_norm.weight.requires_grad_(True)
    with torch.enable_grad():
        assert not _one_call_taken(model, monkeypatch, input_ids=ids)
    with torch.no_grad():
        assert _one_call_taken(model, monkeypatch, input_ids=ids)
    model.encoder_norm.weight.requires_grad_(False)
    monkeypatch.setenv("FASTENCDEC_BACKEND", "reference")
    assert not _one_call_taken(model, monkeypatch, input_ids=ids)
    monkeypatch.delenv("FASTENCDEC_BACKEND")
    assert _one_call_taken(model, monkeypatch, input_ids=ids)


def test_empty_or_negative_widths_are_clear_errors():
    d, u16 = TINY.d_model, np.uint16
    norm = np.ones(d, np.float32)
    qkv = (np.zeros((8, d // 2, 32, 2), u16), None, 256)  # 4 heads + 2 x 2 K/V heads of 32
    out = (np.zeros((2, 64, 32, 2), u16), None, d)
    for d_ff in (0, -1):
        fc1 = (np.zeros((0, d // 2, 32, 2), u16), None, d_ff)
        fc2 = (np.zeros((2, 0, 32, 2), u16), None, d)
        with pytest.raises(ValueError, match="at least one input and one output"):
            _C.Bf16Blocks(d, 4, 2, 32, 1e-6, [(norm, qkv, out, norm, fc1, fc2)], norm)
    # the bf16 kernel itself with no inputs: the bias alone (no division by zero)
    x = np.zeros((3, 0), u16)
    bias = torch.tensor([1.5, -2.0]).to(torch.bfloat16)
    y = np.zeros((3, 2), np.float32)
    _C.bf16_linear(x, np.zeros((1, 0, 32, 2), u16), bias.view(torch.int16).numpy().view(u16),
                   y, False, 1)
    assert (y == np.array([1.5, -2.0], np.float32)).all()
