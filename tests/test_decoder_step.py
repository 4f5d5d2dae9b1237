"""The int8 and bf16 decode steps in one C++ call (models/decoder_step.py) against the
module path: the same kernels in the same order, so every step's logits must be bitwise
equal."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from _helpers import randomize, record_one_calls
from fastencdec import DecoderOnlyConfig, DecoderOnlyLM, EncDecConfig, EncoderDecoderLM
from fastencdec.models import decoder_step
from fastencdec.models.quantize import Bf16Linear, Int8Linear, to_inference

pytest.importorskip("fastencdec._C")

TINY = EncDecConfig.preset("tiny")


def _logits_per_step(model, monkeypatch, fast: bool, **kwargs):
    """Each decode step's logits, with the C++ step on or off."""
    seen = []
    cls = type(model)
    original = cls.decode_step

    def recording(self, *args, **kw):
        out = original(self, *args, **kw)
        seen.append(out.clone())
        return out

    with monkeypatch.context() as m:
        m.setattr(cls, "decode_step", recording)
        if not fast:
            m.setattr(decoder_step, "step_plan", lambda model: None)
        tokens = model.generate(**kwargs)
    return tokens, seen


def _assert_paths_agree(model, monkeypatch, seed, x, mask, new_tokens, steps):
    """Sampled generation (different tokens per row, pad included: the cache's key mask),
    two return sequences per prompt: the C++ step and the module path give bitwise-equal
    logits at every step and the same tokens."""
    kwargs = dict(input_ids=x, attention_mask=mask, max_new_tokens=new_tokens,
                  eos_token_id=(), do_sample=True, temperature=1.5, num_return_sequences=2)
    fast_tokens, fast = _logits_per_step(
        model, monkeypatch, True, generator=torch.Generator().manual_seed(seed), **kwargs)
    slow_tokens, slow = _logits_per_step(
        model, monkeypatch, False, generator=torch.Generator().manual_seed(seed), **kwargs)
    assert len(fast) == len(slow) == steps
    for step, (a, b) in enumerate(zip(fast, slow, strict=True)):
        assert torch.equal(a, b), f"step {step}: max diff {(a - b).abs().max():.3g}"
    assert torch.equal(fast_tokens, slow_tokens)


CASES = [
    dict(),                                           # GQA 4/2, biases, 1 decoder layer
    dict(n_decoder_layers=3, attn_bias=False),
    dict(n_heads=2, n_kv_heads=2, n_decoder_layers=2, d_ff=72),
]


FORMATS = ["int8", "bf16"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_cpp_step_equals_the_module_path(case, fmt, threads, seed, monkeypatch):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = to_inference(randomize(EncoderDecoderLM(TINY.replace(**CASES[case]))), fmt)
    assert decoder_step.step_plan(model) is not None
    x = torch.randint(3, TINY.vocab_size, (3, 19), generator=gen)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 11:] = False  # padding: the encoder mask reaches the cross-attention
    mask[2, :4] = False
    _assert_paths_agree(model, monkeypatch, seed, x, mask, new_tokens=9, steps=9)


@pytest.mark.parametrize("fmt", FORMATS)
def test_plan_follows_the_weights(fmt, seed):
    torch.manual_seed(seed)
    model = to_inference(randomize(EncoderDecoderLM(TINY)), fmt)
    plan = decoder_step.step_plan(model)
    assert plan is not None and decoder_step.step_plan(model) is plan  # cached
    model.load_state_dict(model.state_dict())  # packs again: a new plan
    assert decoder_step.step_plan(model) is not plan
    x = torch.randint(3, TINY.vocab_size, (2, 7))
    before = model.generate(x, max_new_tokens=4, eos_token_id=())
    lm_head = model.lm_head
    plain = lm_head.unpacked()
    lm_head.pack(**dict(plain, weight=-plain["weight"]))
    after = model.generate(x, max_new_tokens=4, eos_token_id=())
    assert not torch.equal(before, after), "the repacked LM head was not used"


def test_models_without_a_plan(seed):
    torch.manual_seed(seed)
    float_model = randomize(EncoderDecoderLM(TINY))
    assert decoder_step.step_plan(float_model) is None  # fp32: the module path
    swiglu = to_inference(randomize(EncoderDecoderLM(TINY.replace(mlp="swiglu"))), "int8")
    assert decoder_step.step_plan(swiglu) is None  # no fused activation to run in C++
    unfused = to_inference(randomize(EncoderDecoderLM(TINY)), "int8", fuse=False)
    assert decoder_step.step_plan(unfused) is None
    assert isinstance(unfused.lm_head, Int8Linear)
    unfused = to_inference(randomize(EncoderDecoderLM(TINY)), "bf16", fuse=False)
    assert decoder_step.step_plan(unfused) is None
    assert isinstance(unfused.lm_head, Bf16Linear)


@pytest.mark.parametrize("fmt", FORMATS)
def test_compiling_an_int8_or_bf16_model_is_a_clear_error(fmt, seed):
    torch.manual_seed(seed)
    model = to_inference(randomize(EncoderDecoderLM(TINY)), fmt)
    x = torch.randn(2, 3, TINY.d_model).to(torch.bfloat16 if fmt == "bf16" else torch.float32)
    with pytest.raises(Exception, match="torch.compile cannot trace"):
        torch.compile(model.lm_head, fullgraph=True)(x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_plan_survives_copies_and_follows_replaced_tensors(fmt, seed, monkeypatch):
    torch.manual_seed(seed)
    model = to_inference(randomize(EncoderDecoderLM(TINY)), fmt)
    x = torch.randint(3, TINY.vocab_size, (2, 7))
    tokens = model.generate(x, max_new_tokens=4, eos_token_id=())
    clone = copy.deepcopy(model)  # the plan cache is not part of the model
    assert torch.equal(clone.generate(x, max_new_tokens=4, eos_token_id=()), tokens)
    assert torch.equal(pickle.loads(pickle.dumps(model)).generate(
        x, max_new_tokens=4, eos_token_id=()), tokens)
    plan = decoder_step.step_plan(model)
    norm = model.decoder[0].norm1
    norm.weight = torch.nn.Parameter(torch.rand_like(norm.weight) + 0.5, requires_grad=False)
    assert decoder_step.step_plan(model) is not plan  # a replaced tensor: rebuilt
    kwargs = dict(input_ids=x, max_new_tokens=4, eos_token_id=())
    _, fast = _logits_per_step(model, monkeypatch, True, **kwargs)
    _, slow = _logits_per_step(model, monkeypatch, False, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", [dict(), dict(n_layers=3, attn_bias=False)])
def test_decoder_only_cpp_step_equals_the_module_path(case, fmt, threads, seed, monkeypatch):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = DecoderOnlyConfig.twin_of(TINY).replace(**case)
    model = to_inference(randomize(DecoderOnlyLM(config)), fmt)
    assert decoder_step.step_plan(model) is not None
    x = torch.randint(3, config.vocab_size, (3, 11), generator=gen)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 7:] = False  # prompts of different lengths
    _assert_paths_agree(model, monkeypatch, seed, x, mask, new_tokens=7, steps=6)


def test_hooks_see_their_modules_run(seed, monkeypatch):
    """A forward hook on a module the C++ step replaces makes the step run module by
    module (the hook fires each step); one on a module it does not replace (the
    cross-attention's K/V projection, run once per input) leaves the C++ step on."""
    torch.manual_seed(seed)
    model = to_inference(randomize(EncoderDecoderLM(TINY)), "int8")
    x = torch.randint(3, TINY.vocab_size, (2, 7))
    tokens = model.generate(x, max_new_tokens=4, eos_token_id=())
    seen = []
    handle = model.decoder[0].mlp.fc2.register_forward_hook(lambda *a: seen.append(1))
    assert torch.equal(model.generate(x, max_new_tokens=4, eos_token_id=()), tokens)
    handle.remove()
    assert len(seen) == 4  # the first step and three more, each module by module
    steps = record_one_calls(monkeypatch, decoder_step)
    handle = model.decoder[0].cross_attn.k_proj.register_forward_hook(lambda *a: None)
    model.generate(x, max_new_tokens=4, eos_token_id=())
    handle.remove()
    assert steps and all(steps)
