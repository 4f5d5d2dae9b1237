"""``from_pretrained`` cannot load silently wrong: the config is checked against the
safetensors header before anything is built, every mismatch names the field or the
tensor, and a stored LM head is never thrown away."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from _helpers import randomize
from fastencdec import DecoderOnlyConfig, DecoderOnlyLM, EncDecConfig, EncoderDecoderLM
from fastencdec.models import pretrained

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = EncDecConfig.preset("tiny")


def saved(tmp_path, model_cls=EncoderDecoderLM, **changes):
    """A randomised tiny model saved under tmp_path/m; returns (model, directory)."""
    config = TINY.replace(**changes)
    if model_cls is DecoderOnlyLM:
        config = DecoderOnlyConfig.twin_of(config)
    model = randomize(model_cls(config))
    model.save_pretrained(tmp_path / "m")
    return model, tmp_path / "m"


def edit_config(directory, **changes):
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_weights(directory, fn):
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


# -- the LM head ------------------------------------------------------------------------------
def test_tied_config_refuses_a_different_stored_head(tmp_path, seed):
    model, directory = saved(tmp_path, tie_embeddings=False)
    edit_config(directory, tie_embeddings=True)
    with pytest.raises(ValueError, match=r"'lm_head.weight' differs from 'embed.weight'.*tied"):
        EncoderDecoderLM.from_pretrained(directory)


def test_tied_config_accepts_a_stored_head_equal_to_the_embedding(tmp_path, seed):
    model, directory = saved(tmp_path)
    edit_weights(directory, lambda t: t.__setitem__("lm_head.weight", t["embed.weight"].clone()))
    loaded = EncoderDecoderLM.from_pretrained(directory)
    assert loaded.lm_head.weight is loaded.embed.weight
    assert torch.equal(loaded.embed.weight, model.embed.weight)


def test_untied_config_needs_a_stored_head(tmp_path, seed):
    _, directory = saved(tmp_path)  # tied: no lm_head.weight in the file
    edit_config(directory, tie_embeddings=False)
    with pytest.raises(ValueError, match=r"lacks the tensors \['lm_head.weight'\].*"
                                         r"tie_embeddings=false"):
        EncoderDecoderLM.from_pretrained(directory)


def test_string_bool_in_config_json_is_refused(tmp_path, seed):
    _, directory = saved(tmp_path, tie_embeddings=False)
    edit_config(directory, tie_embeddings="false")
    with pytest.raises(ValueError, match=r"config.json: tie_embeddings must be a bool"):
        EncoderDecoderLM.from_pretrained(directory)


@pytest.mark.parametrize("model_cls", [EncoderDecoderLM, DecoderOnlyLM])
@pytest.mark.parametrize("tie", [True, False])
def test_load_weights_refuses_a_head_that_differs_when_tied(model_cls, tie, seed):
    base = TINY if model_cls is EncoderDecoderLM else DecoderOnlyConfig.preset("tiny")
    model = randomize(model_cls(base.replace(tie_embeddings=tie)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["embed.weight"] + (0.0 if tie else 1.0)
    fresh = model_cls(model.config)
    if tie:  # equal copies are fine
        assert fresh.load_weights(state).lm_head.weight is fresh.embed.weight
    else:  # untied: the head is its own parameter
        assert torch.equal(fresh.load_weights(state).lm_head.weight, state["lm_head.weight"])
    tied = model_cls(model.config.replace(tie_embeddings=True))
    state["lm_head.weight"] = state["embed.weight"] + 1.0
    with pytest.raises(ValueError, match="differs from 'embed.weight'"):
        tied.load_weights(state)


# -- the config against the header, before building ---------------------------------------------
class BuildRecorder:
    """Records the layer counts of every model built (to show nothing big was built)."""

    def __init__(self, monkeypatch, model_cls):
        self.built = []
        original = model_cls.__init__

        def init(model, config):
            self.built.append(sum(getattr(config, f) for f in config._layer_fields))
            original(model, config)

        monkeypatch.setattr(model_cls, "__init__", init)


@pytest.mark.parametrize("layers", [20_000, 2**31 - 1])
def test_huge_layer_count_fails_before_building(tmp_path, monkeypatch, layers):
    _, directory = saved(tmp_path)
    edit_config(directory, n_encoder_layers=layers)
    recorder = BuildRecorder(monkeypatch, EncoderDecoderLM)
    with pytest.raises(ValueError, match=rf"config.json says n_encoder_layers={layers} but "
                                         r".*model.safetensors holds 2 of them \(encoder\.\*\)"):
        EncoderDecoderLM.from_pretrained(directory)
    assert max(recorder.built, default=0) <= 3  # only the one/two-layer probe


@pytest.mark.parametrize("changes", [dict(d_model=2**30), dict(d_ff=2**31 - 1),
                                     dict(vocab_size=2**31 - 1)])
def test_huge_widths_fail_before_building_anything(tmp_path, monkeypatch, changes):
    _, directory = saved(tmp_path)
    edit_config(directory, **changes)
    recorder = BuildRecorder(monkeypatch, EncoderDecoderLM)
    with pytest.raises(ValueError, match=r"config.json describes layers and embeddings far "
                                         r"larger than .*model.safetensors holds"):
        EncoderDecoderLM.from_pretrained(directory)
    assert recorder.built == []


ENCDEC_MISMATCHES = [
    (dict(d_model=128), r"tensor 'embed.weight' has shape \[512, 64\] but .* implies \[512, 128\]"),
    (dict(vocab_size=1000), r"'embed.weight' has shape \[512, 64\] but .* implies \[1000, 64\]"),
    (dict(d_ff=256), r"'encoder.0.mlp.fc1.weight' has shape \[128, 64\] .* implies \[256, 64\]"),
    (dict(n_heads=2, n_kv_heads=1), r"'encoder.0.attn.q_proj.weight' has shape \[128, 64\]"),
    (dict(head_dim=64), r"'encoder.0.attn.q_proj.weight' has shape \[128, 64\]"),
    (dict(n_kv_heads=4), r"'encoder.0.attn.k_proj.weight' has shape \[64, 64\]"),
    (dict(mlp="swiglu"), r"holds tensors that the EncoderDecoderLM described by .* does not "
                         r"have: \['decoder.0.mlp.fc1.bias'"),
    (dict(attn_bias=False), r"does not have: \['decoder.0.cross_attn.k_proj.bias'"),
    (dict(n_encoder_layers=1), r"n_encoder_layers=1 but .* holds 2 of them \(encoder\.\*\)"),
    (dict(n_decoder_layers=3), r"n_decoder_layers=3 but .* holds 1 of them \(decoder\.\*\)"),
]


@pytest.mark.parametrize("changes,match", ENCDEC_MISMATCHES)
def test_config_mismatches_name_the_tensor(tmp_path, monkeypatch, changes, match):
    _, directory = saved(tmp_path)
    edit_config(directory, **changes)
    recorder = BuildRecorder(monkeypatch, EncoderDecoderLM)
    with pytest.raises(ValueError, match=match):
        EncoderDecoderLM.from_pretrained(directory)
    assert max(recorder.built, default=0) <= 3


@pytest.mark.parametrize("changes,match", [
    (dict(n_layers=1), r"n_layers=1 but .* holds \d+ of them \(layers\.\*\)"),
    (dict(d_model=32), r"'embed.weight' has shape \[512, 64\] but .* implies \[512, 32\]"),
])
def test_decoder_only_mismatches(tmp_path, changes, match):
    _, directory = saved(tmp_path, DecoderOnlyLM)
    edit_config(directory, **changes)
    with pytest.raises(ValueError, match=match):
        DecoderOnlyLM.from_pretrained(directory)


def test_missing_extra_and_misnumbered_tensors_are_named(tmp_path):
    _, directory = saved(tmp_path)
    weights = directory / "model.safetensors"
    original = load_file(str(weights))

    def attempt(fn, match):
        tensors = dict(original)
        fn(tensors)
        save_file(tensors, str(weights))
        with pytest.raises(ValueError, match=match):
            EncoderDecoderLM.from_pretrained(directory)

    attempt(lambda t: t.pop("encoder.1.attn.v_proj.bias"),
            r"lacks the tensors \['encoder.1.attn.v_proj.bias'\]")
    attempt(lambda t: t.__setitem__("encoder.0.extra", torch.zeros(2)),
            r"does not have: \['encoder.0.extra'\]")
    attempt(lambda t: t.__setitem__("decoder_norm.weight", torch.ones(64, dtype=torch.int32)),
            r"'decoder_norm.weight' has dtype I32")

    def renumber(t):
        for name in [n for n in t if n.startswith("encoder.1.")]:
            t["encoder.5." + name[len("encoder.1."):]] = t.pop(name)

    attempt(renumber, r"holds 2 of them \(encoder\.\*\) \(numbered with a gap: layer 1 is absent\)")


def test_unreadable_files_are_named(tmp_path):
    _, directory = saved(tmp_path)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{weights}: not a readable safetensors file"):
        EncoderDecoderLM.from_pretrained(directory)
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        EncoderDecoderLM.from_pretrained(directory)
    (directory / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match=f"{directory / 'config.json'}: invalid JSON"):
        EncoderDecoderLM.from_pretrained(directory)


def test_dtype_argument_is_checked(tmp_path):
    _, directory = saved(tmp_path)
    for bad in (torch.int64, "float16", 16):
        with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
            EncoderDecoderLM.from_pretrained(directory, dtype=bad)


@pytest.mark.parametrize("model_cls", [EncoderDecoderLM, DecoderOnlyLM])
@pytest.mark.parametrize("tie", [True, False])
def test_header_check_accepts_what_save_pretrained_wrote(tmp_path, model_cls, tie, seed):
    """The check is exact, not lenient: a saved model passes it and loads bit-exactly."""
    model, directory = saved(tmp_path, model_cls, tie_embeddings=tie)
    header = pretrained.read_safetensors_header(directory / "model.safetensors")
    pretrained.check_weights_header(model_cls, model.config, header, "w")
    loaded = model_cls.from_pretrained(directory)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_on_meta_builds_without_initialising_and_restores_the_initialisers():
    from torch import nn

    from fastencdec.models.meta_init import on_meta

    before = nn.init.normal_
    with pytest.raises(RuntimeError, match="inside"):
        with on_meta():
            model = EncoderDecoderLM(TINY)
            assert nn.init.normal_ is not before
            raise RuntimeError("inside")
    assert nn.init.normal_ is before
    assert all(p.is_meta for p in model.parameters())
    # a model built afterwards is initialised again
    torch.manual_seed(0)
    assert EncoderDecoderLM(TINY).embed.weight.std() > 0


def test_loading_and_serving_import_neither_dynamo_nor_triton(tmp_path, seed):
    """Building on ``meta`` once ran ``nn.init.normal_`` through PyTorch's Python
    decompositions, importing ``torch._dynamo`` and Triton: ~150 MiB resident in every
    process that only loads a model and generates."""
    import subprocess
    import sys

    _, directory = saved(tmp_path)
    script = (
        "import sys, torch, fastencdec\n"
        "from fastencdec.models.quantize import to_inference, save_inference, load_inference\n"
        f"d = {str(directory)!r}\n"
        "m = fastencdec.EncoderDecoderLM.from_pretrained(d)\n"
        "m = to_inference(m, 'int8'); save_inference(m, d + '-int8')\n"
        "m = load_inference(d + '-int8')\n"
        "m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, eos_token_id=())\n"
        "print(sorted(n for n in ('torch._dynamo', 'triton') if n in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
