"""Model configs cannot hold a wrong type or range, and a config file cannot be read
wrongly: every field is checked at construction; ``from_dict``/``load`` need every
field; every error names the field (and the file)."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import numpy as np
import pytest

from fastencdec.models import size_decoder_only_to, size_encdec_to_budget
from fastencdec.models.config import (
    MAX_CONFIG_FILE_BYTES,
    MAX_INT,
    DecoderOnlyConfig,
    EncDecConfig,
)

TINY = EncDecConfig.preset("tiny")
CONFIGS = [TINY, DecoderOnlyConfig.preset("tiny")]

# Values of the wrong type for each annotation, including the JSON look-alikes.
WRONG_TYPE = {
    "bool": ["false", "true", 0, 1, None, 1.0],
    "int": ["12", 12.5, 12.0, True, None, [12]],
    "float": ["1e-6", "inf", True, None, [1.0]],
    "str": [1, None, True],
}


def field_cases():
    for config in CONFIGS:
        for f in dataclasses.fields(config):
            for bad in WRONG_TYPE[f.type]:
                yield pytest.param(config, f.name, bad,
                                   id=f"{config.architecture}-{f.name}-{bad!r}")


@pytest.mark.parametrize("config,name,bad", field_cases())
def test_every_field_is_type_checked(config, name, bad):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        config.replace(**{name: bad})


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.architecture)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_float_fields_must_be_finite(config, bad):
    for f in dataclasses.fields(config):
        if f.type == "float":
            with pytest.raises(ValueError, match=rf"^{f.name} must be finite"):
                config.replace(**{f.name: bad})


@pytest.mark.parametrize("changes,match", [
    (dict(d_model=0), "d_model must be a positive int"),
    (dict(n_encoder_layers=-1), "n_encoder_layers must be a positive int"),
    (dict(vocab_size=MAX_INT + 1), "vocab_size must be at most"),
    (dict(n_decoder_layers=2**40), "n_decoder_layers must be at most"),
    (dict(max_position_embeddings=0), "max_position_embeddings must be a positive int"),
    (dict(max_position_embeddings=-4, rope_scaling_factor=2.0),
     "max_position_embeddings must be a positive int"),
    (dict(n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(head_dim=31), "head_dim must be even"),
    (dict(head_dim=2, rope_scaling_factor=2.0), "needs head_dim > 2"),
    (dict(mlp="relu"), "mlp must be one of"),
    (dict(norm_eps=0.0), "norm_eps must be > 0"),
    (dict(rope_theta=-1.0), "rope_theta must be > 0"),
    (dict(rope_scaling_factor=0.5), "rope_scaling_factor must be >= 1"),
    (dict(dropout=1.0), r"dropout must lie in \[0, 1\)"),
    (dict(pad_token_id=-1), "pad_token_id must lie in"),
    (dict(eos_token_id=512), "eos_token_id must lie in"),
])
def test_ranges_are_checked_at_construction(changes, match):
    with pytest.raises(ValueError, match=match):
        TINY.replace(**changes)
    with pytest.raises(ValueError, match=match):  # the constructor itself, not just replace
        EncDecConfig(**{**dataclasses.asdict(TINY), **changes})


def test_head_dim_two_is_fine_without_scaling():
    assert TINY.replace(head_dim=2, n_heads=2, n_kv_heads=1).head_dim == 2


def test_numbers_are_normalised():
    c = TINY.replace(rope_theta=500, d_model=np.int64(32), norm_eps=np.float32(1e-5))
    assert type(c.rope_theta) is float and c.rope_theta == 500.0
    assert type(c.d_model) is int and c.d_model == 32
    assert type(c.norm_eps) is float
    assert json.loads(json.dumps(c.to_dict()))["d_model"] == 32


def test_replace_names_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown EncDecConfig fields: \['n_layer'\]"):
        TINY.replace(n_layer=3)


# -- from_dict: every field required ----------------------------------------------------------
@pytest.mark.parametrize("data,match", [
    ({}, "no 'architecture' field"),
    ([], "must be a JSON object"),
    ("encoder_decoder", "must be a JSON object"),
    (None, "must be a JSON object"),
    ({"architecture": "encoder_decoder"}, "config lacks the fields"),
])
def test_from_dict_refuses_empty_or_non_dict(data, match):
    with pytest.raises(ValueError, match=match):
        EncDecConfig.from_dict(data)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.architecture)
def test_from_dict_needs_every_field(config):
    full = config.to_dict()
    assert type(config).from_dict(full) == config
    for name in full:
        partial = {k: v for k, v in full.items() if k != name}
        with pytest.raises(ValueError, match=name):
            type(config).from_dict(partial)


def random_config(rng: random.Random, cls):
    """A random valid config (every field drawn, not from a preset)."""
    n_kv = rng.randint(1, 4)
    vocab = rng.randint(8, 5000)
    fields = dict(
        vocab_size=vocab, d_model=rng.randint(1, 256), n_kv_heads=n_kv,
        n_heads=n_kv * rng.randint(1, 4), head_dim=2 * rng.randint(2, 64),
        d_ff=rng.randint(1, 512), mlp=rng.choice(["gelu", "swiglu"]),
        attn_bias=rng.random() < 0.5, norm_eps=10 ** rng.uniform(-8, -2),
        rope_theta=10 ** rng.uniform(1, 7),
        rope_scaling_factor=rng.choice([1.0, 1 + rng.random() * 8]),
        max_position_embeddings=rng.randint(1, 10**6), pad_token_id=rng.randrange(vocab),
        bos_token_id=rng.randrange(vocab), eos_token_id=rng.randrange(vocab),
        dropout=rng.random() * 0.99, tie_embeddings=rng.random() < 0.5,
    )
    layers = {name: rng.randint(1, 64) for name in cls._layer_fields}
    return cls(**fields, **layers)


@pytest.mark.parametrize("cls", [EncDecConfig, DecoderOnlyConfig])
def test_random_configs_round_trip_exactly(tmp_path, seed, cls):
    rng = random.Random(seed)
    for i in range(20):
        config = random_config(rng, cls)
        assert cls.from_dict(json.loads(json.dumps(config.to_dict()))) == config
        config.save(tmp_path / f"{i}.json")
        loaded = cls.load(tmp_path / f"{i}.json")
        assert loaded == config and loaded.to_dict() == config.to_dict()


# -- load: every error names the file ---------------------------------------------------------
def write(tmp_path, text: str | bytes):
    path = tmp_path / "config.json"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def with_field(name, raw_json_value: str) -> str:
    """TINY's config.json text with one field's JSON value replaced verbatim."""
    data = TINY.to_dict()
    data[name] = "__VALUE__"
    return json.dumps(data).replace('"__VALUE__"', raw_json_value)


@pytest.mark.parametrize("text,match", [
    ("", "invalid JSON"),
    ('{"d_model": ', "invalid JSON"),
    ("{}", "no 'architecture' field"),
    ("[]", "must be a JSON object"),
    ("12", "must be a JSON object"),
    (with_field("tie_embeddings", '"false"'), "tie_embeddings must be a bool"),
    (with_field("d_model", '"12"'), "d_model must be an int, got '12'"),
    (with_field("n_encoder_layers", "2.0"), "n_encoder_layers must be an int"),
    (with_field("rope_theta", "Infinity"), "rope_theta must be finite"),
    (with_field("norm_eps", "NaN"), "norm_eps must be finite"),
    (with_field("rope_scaling_factor", '"2"'), "rope_scaling_factor must be a number"),
    (with_field("n_decoder_layers", "20000000000"), "n_decoder_layers must be at most"),
    (json.dumps(TINY.to_dict())[:-1] + ', "d_model": 64}', "'d_model' appears twice"),
])
def test_load_errors_name_the_file_and_field(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=match) as info:
        EncDecConfig.load(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)  # one line


def test_load_refuses_non_utf8_and_huge_files(tmp_path):
    path = write(tmp_path, b"\xff\xfe{}")
    with pytest.raises(ValueError, match=f"{path}: not UTF-8"):
        EncDecConfig.load(path)
    path = write(tmp_path, "[" * 200_000)
    with pytest.raises(ValueError, match=f"{path}: invalid JSON: nested too deeply"):
        EncDecConfig.load(path)
    path = write(tmp_path, " " * (MAX_CONFIG_FILE_BYTES + 1))
    with pytest.raises(ValueError, match="too large for a model config"):
        EncDecConfig.load(path)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        EncDecConfig.load(tmp_path / "nowhere.json")


# -- sizing: bounded work ---------------------------------------------------------------------
NARROW = dict(d_model=64, d_ff=128, n_heads=2, n_kv_heads=1, head_dim=32, vocab_size=100,
              eos_token_id=2)


@pytest.mark.parametrize("budget", [1e15, 2**62])
def test_sizing_refuses_budgets_needing_absurd_layer_counts(budget):
    with pytest.raises(ValueError, match="would need more than 100,000 layers"):
        size_encdec_to_budget(budget, **NARROW)
    with pytest.raises(ValueError, match=r"would need [\d,]+ layers of these widths"):
        size_decoder_only_to(budget, **NARROW)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, 0, True, "1e9"])
def test_sizing_refuses_bad_budgets(bad):
    with pytest.raises(ValueError, match="n_params must be a positive finite number"):
        size_encdec_to_budget(bad)
    with pytest.raises(ValueError, match="split must be two positive numbers"):
        size_encdec_to_budget(1e8, (1, math.inf))
