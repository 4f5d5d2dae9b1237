"""The torch-free runtime (fastencdec.runtime) against the torch model it serves: a model
saved by save_inference, loaded both ways, must give the same tokens and bitwise the
same logits at every step (the same kernels on the same data in the same order)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from _helpers import randomize
from fastencdec import (
    DecoderOnlyConfig,
    DecoderOnlyLM,
    EncDecConfig,
    EncoderDecoderLM,
    generation,
)
from fastencdec.models import load_inference, save_inference, to_inference

rt = pytest.importorskip("fastencdec.runtime")
from fastencdec.runtime import engine, sampling  # noqa: E402
from fastencdec.runtime.safetensors_file import SafetensorsFile  # noqa: E402

TINY = EncDecConfig.preset("tiny").replace(dropout=0.0)
ARCHS = ["encoder_decoder", "decoder_only"]
FORMATS = ["int8", "bf16"]
CASES = [
    dict(),
    dict(attn_bias=False, d_ff=72, n_heads=3, n_kv_heads=1, head_dim=34, d_model=40),
    dict(tie_embeddings=False),
    dict(rope_scaling_factor=2.0, max_position_embeddings=64),  # dynamic NTK, within range
]


def _config(arch: str, case: dict):
    config = TINY if arch == "encoder_decoder" else DecoderOnlyConfig.twin_of(TINY)
    return config.replace(**case)


def _saved(tmp_path, arch, fmt, case=None):
    config = _config(arch, case or {})
    cls = EncoderDecoderLM if arch == "encoder_decoder" else DecoderOnlyLM
    model = to_inference(randomize(cls(config)), fmt)
    save_inference(model, tmp_path)
    return tmp_path, config


def _inputs(config, gen, batch=3):
    seq_len = int(torch.randint(9, 30, (1,), generator=gen))
    ids = torch.randint(3, config.vocab_size, (batch, seq_len), generator=gen)
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    mask[1, seq_len - 4:] = False  # right padding
    if batch > 2:
        mask[2, :3] = False  # left padding
        mask[2, 5] = False  # and inside
    if batch > 3:
        mask[3] = False  # nothing to read (an encoder-decoder takes it)
    return ids, mask


def _record(monkeypatch):
    """Every step's logits as each side's token picker sees them (fp32)."""
    seen = {"torch": [], "runtime": []}
    torch_pick, rt_pick = generation.Settings.pick, engine._Settings.pick

    def pick_torch(self, logits):
        seen["torch"].append(logits.float().numpy().copy())
        return torch_pick(self, logits)

    def pick_rt(self, logits):
        seen["runtime"].append(sampling.as_float(logits).copy())
        return rt_pick(self, logits)

    monkeypatch.setattr(generation.Settings, "pick", pick_torch)
    monkeypatch.setattr(engine._Settings, "pick", pick_rt)
    return seen


def _both(directory, ids, mask, threads, monkeypatch, **kw):
    model = load_inference(directory)
    runtime = rt.load(directory, threads=threads)
    seen = _record(monkeypatch)
    expected = model.generate(ids, attention_mask=mask, **kw).numpy()
    got = runtime.generate(ids.numpy(), attention_mask=None if mask is None else mask.numpy(),
                           **kw)
    return expected, got, seen


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_runtime_equals_the_torch_model_bitwise(arch, fmt, case, threads, seed, tmp_path,
                                                 monkeypatch):
    directory, config = _saved(tmp_path, arch, fmt, CASES[case])
    gen = torch.Generator().manual_seed(seed)
    batch = 4 if arch == "encoder_decoder" else 3
    ids, mask = _inputs(config, gen, batch)
    for m, n in ((mask, 1), (None, 2)):
        expected, got, seen = _both(directory, ids, m, threads, monkeypatch, max_new_tokens=7,
                                    eos_token_id=(), num_return_sequences=n)
        assert got.dtype == np.int64 and got.shape == expected.shape == (batch * n, 7)
        np.testing.assert_array_equal(got, expected)
        assert len(seen["runtime"]) == len(seen["torch"]) == 7
        for step, (a, b) in enumerate(zip(seen["runtime"], seen["torch"], strict=True)):
            assert np.array_equal(a, b, equal_nan=True), \
                f"step {step}: max diff {np.abs(a - b).max():.3g}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_trimmed_and_strided_masks_equal_the_torch_model(fmt, seed, tmp_path, monkeypatch):
    """Every row ending in padding (the trailing columns are dropped), and a mask that is
    a strided view of a larger array."""
    directory, config = _saved(tmp_path, "encoder_decoder", fmt)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size, (3, 14), generator=gen)
    lens = torch.tensor([9, 4, 11])
    mask = torch.arange(14)[None] < lens[:, None]
    expected, got, _ = _both(directory, ids, mask, 2, monkeypatch, max_new_tokens=5,
                             eos_token_id=())
    np.testing.assert_array_equal(got, expected)
    wide = np.zeros((3, 28), dtype=np.bool_)
    wide[:, ::2] = mask.numpy()
    runtime = rt.load(directory, threads=1)
    np.testing.assert_array_equal(runtime.generate(ids.numpy(), attention_mask=wide[:, ::2],
                                                   max_new_tokens=5, eos_token_id=()), expected)


def test_dynamic_ntk_encoder_past_the_trained_length(seed, tmp_path, monkeypatch):
    """The encoder takes its NTK base at its padded length (no recomputation)."""
    directory, config = _saved(tmp_path, "encoder_decoder", "int8",
                               dict(rope_scaling_factor=2.0, max_position_embeddings=12))
    ids, mask = _inputs(config, torch.Generator().manual_seed(seed))
    ids = torch.cat([ids, ids], 1)[:, :max(20, ids.shape[1])]  # > 12 positions
    mask = torch.cat([mask, mask], 1)[:, :ids.shape[1]]
    expected, got, seen = _both(directory, ids, mask, 1, monkeypatch, max_new_tokens=6,
                                eos_token_id=())
    np.testing.assert_array_equal(got, expected)
    assert all(np.array_equal(a, b) for a, b in zip(seen["runtime"], seen["torch"], strict=True))


@pytest.mark.parametrize("arch", ARCHS)
def test_eos_stops_rows_as_the_torch_model(arch, seed, tmp_path, monkeypatch):
    directory, config = _saved(tmp_path, arch, "int8")
    ids, mask = _inputs(config, torch.Generator().manual_seed(seed))
    free = rt.load(directory, threads=1).generate(ids.numpy(), attention_mask=mask.numpy(),
                                                  max_new_tokens=8, eos_token_id=())
    eos = int(free[0, 2])  # row 0 ends at step 3 (or earlier); others may never end
    expected, got, _ = _both(directory, ids, mask, 1, monkeypatch, max_new_tokens=8,
                             eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(got, expected)
    assert eos in got[0] and (got[0, list(got[0]).index(eos) + 1:] == 0).all()


def test_encoder_attention_fp32_equals_the_module_path(seed, tmp_path, monkeypatch):
    directory, config = _saved(tmp_path, "encoder_decoder", "int8")
    ids, mask = _inputs(config, torch.Generator().manual_seed(seed))
    model = load_inference(directory)
    model.encoder_attention = "fp32"
    runtime = rt.load(directory, threads=2, encoder_attention="fp32")
    with torch.inference_mode():
        states = model.encode(ids, mask)
    got = runtime.encode(ids.numpy(), mask.numpy())
    assert np.array_equal(got, states.numpy())
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        runtime.encode(ids.numpy(), mask.numpy()[:, 1:])


def test_sampling_filters_match_torch(seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 50, generator=gen, dtype=torch.float64)
    logits[0, :5] = 3.0  # ties at the threshold
    for k in (1, 3, 5, 50):
        np.testing.assert_array_equal(sampling.filter_top_k(logits.numpy(), k),
                                      generation.filter_top_k(logits, k).numpy())
    untied = logits[1:]  # which of tied tokens top-p keeps depends on the sort
    for p in (0.1, 0.5, 0.9, 1.0):
        np.testing.assert_array_equal(np.isinf(sampling.filter_top_p(untied.numpy(), p)),
                                      np.isinf(generation.filter_top_p(untied, p).numpy()))


def test_sampling_refuses_nan_logits():
    logits = np.zeros((2, 5), np.float32)
    logits[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sampling.next_tokens(logits, do_sample=True, rng=np.random.default_rng(0))


def test_sampling_is_seeded_and_stays_in_the_top_k(seed, tmp_path):
    # int8: fp32 logits (bf16 logits often tie, and top-k keeps ties at the threshold)
    directory, config = _saved(tmp_path, "encoder_decoder", "int8")
    runtime = rt.load(directory, threads=1)
    ids = np.random.default_rng(seed).integers(3, config.vocab_size, (2, 12))
    greedy = runtime.generate(ids, max_new_tokens=6, eos_token_id=())
    one = runtime.generate(ids, max_new_tokens=6, eos_token_id=(), do_sample=True, top_k=1,
                           seed=seed)
    np.testing.assert_array_equal(one, greedy)  # top-k 1 is greedy
    kw = dict(max_new_tokens=6, eos_token_id=(), do_sample=True, temperature=2.0, top_p=0.9)
    np.testing.assert_array_equal(runtime.generate(ids, seed=seed, **kw),
                                  runtime.generate(ids, seed=seed, **kw))
    seen = []
    runtime.generate(ids, streamer=seen.append, **kw)
    assert len(seen) == 6 and all(t.shape == (2,) and t.dtype == np.int64 for t in seen)


def test_runtime_never_imports_torch(tmp_path):
    directory, config = _saved(tmp_path, "encoder_decoder", "int8")
    script = textwrap.dedent(f"""
        import sys
        import fastencdec, fastencdec.runtime as rt
        m = rt.load({str(directory)!r}, threads=1)
        out = m.generate([[5, 6, 7, 8]], max_new_tokens=3, eos_token_id=())
        assert out.shape == (1, 3), out.shape
        print("torch" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_importing_after_torch_registers_the_custom_ops():
    script = ("import torch, fastencdec; "
              "print(hasattr(torch.ops.fastencdec, 'append_kv_cache'))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr


def test_lazy_package_names_still_resolve():
    import fastencdec

    assert fastencdec.EncoderDecoderLM is EncoderDecoderLM
    assert fastencdec._C.active_isa() and fastencdec.models.quantize.to_inference is to_inference
    assert fastencdec.data.tokenizer.Tokenizer is fastencdec.data.Tokenizer
    assert rt.engine.load is rt.load and rt.sampling is sampling
    assert not hasattr(fastencdec.data, "a.b") and not hasattr(fastencdec.models, "nope")
    assert {"ops", "models", "runtime", "Rope", "load_inference"} <= set(dir(fastencdec))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fastencdec.nope  # noqa: B018


# ------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def tiny_runtime(tmp_path_factory):
    directory, _ = _saved(tmp_path_factory.mktemp("rt"), "encoder_decoder", "int8")
    return rt.load(directory, threads=1)


@pytest.mark.parametrize("ids, kw, error, match", [
    ([[1.5, 2.0]], {}, TypeError, "integer token ids"),
    ([1, 2, 3], {}, ValueError, "2-D"),
    (np.zeros((1, 0), np.int64), {}, ValueError, "2-D"),
    ([[3, 10**6]], {}, ValueError, "vocab_size"),
    ([[3, 4]], dict(attention_mask=[[1, 1, 1]]), ValueError, "shape of its ids"),
    ([[3, 4]], dict(attention_mask=[[1, 2]]), ValueError, "only 0 and 1"),
    ([[3, 4]], dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    ([[3, 4]], dict(max_new_tokens=10**6), ValueError, "max_position_embeddings"),
    ([[3, 4]], dict(temperature=0.0), ValueError, "temperature"),
    ([[3, 4]], dict(top_p=1.5), ValueError, "top_p"),
    ([[3, 4]], dict(eos_token_id="x"), TypeError, "eos_token_id"),
    ([[3, 4]], dict(pad_token_id=-1), ValueError, "pad_token_id"),
    ([[3, 4]], dict(streamer=3), TypeError, "streamer"),
])
def test_bad_generate_arguments_are_named(tiny_runtime, ids, kw, error, match):
    with pytest.raises(error, match=match):
        tiny_runtime.generate(ids, **kw)


def test_a_decoder_only_row_without_tokens_is_refused(tmp_path):
    directory, _ = _saved(tmp_path, "decoder_only", "int8")
    with pytest.raises(ValueError, match="row 1 has no real token"):
        rt.load(directory, threads=1).generate([[3, 4], [5, 6]], attention_mask=[[1, 1], [0, 0]])


def test_dynamic_ntk_past_the_trained_length_is_refused(tmp_path):
    directory, _ = _saved(tmp_path, "decoder_only", "int8",
                          dict(rope_scaling_factor=2.0, max_position_embeddings=8))
    with pytest.raises(ValueError, match="needs the torch model"):
        rt.load(directory, threads=1).generate([[3, 4, 5, 6, 7]], max_new_tokens=6)


def test_bad_model_directories_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        rt.load(tmp_path)
    float_dir = tmp_path / "float"
    EncoderDecoderLM(TINY).save_pretrained(float_dir)
    with pytest.raises(ValueError, match="float checkpoint.*to_inference"):
        rt.load(float_dir)
    directory, _ = _saved(tmp_path / "int8", "encoder_decoder", "int8")
    with pytest.raises(ValueError, match="threads"):
        rt.load(directory, threads=0)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "d_ff": config["d_ff"] + 1}))
    with pytest.raises(ValueError, match="fc1.weight is I8 .* expected I8"):
        rt.load(directory)
    (directory / "config.json").write_text(json.dumps(
        {**config, "n_encoder_layers": config["n_encoder_layers"] - 1}))
    with pytest.raises(ValueError, match="tensors the model does not have"):
        rt.load(directory)
    # sizes far beyond the file are refused before anything that large is allocated
    (directory / "config.json").write_text(json.dumps({**config, "d_ff": 2**30}))
    with pytest.raises(ValueError, match="expected I8 .1073741824"):
        rt.load(directory)
    for bad in ("[]", '"x"', "[" * 100_000 + "]" * 100_000):
        (directory / "config.json").write_text(bad)
        with pytest.raises(ValueError, match="config"):
            rt.load(directory)


def test_truncated_or_corrupt_files_are_refused(tmp_path):
    directory, _ = _saved(tmp_path, "encoder_decoder", "int8")
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    for bad, match in ((data[:4], "8-byte"), (data[:-10], "inside the file"),
                       ((10**9).to_bytes(8, "little") + data[8:], "header length"),
                       (data[:8] + b"{" * (len(data) - 8), "JSON")):
        weights.write_bytes(bad)
        with pytest.raises(ValueError, match=match):
            rt.load(directory)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])

    def rewrite(new_header):  # data offsets count from the header's end: they still hold
        text = json.dumps(new_header).encode()
        weights.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])

    name = next(k for k in header if k != "__metadata__")
    for change in ({"dtype": ["F32"]}, {"shape": [-1]}, {"data_offsets": [0, 1]},
                   {"data_offsets": "x"}):
        rewrite({**header, name: {**header[name], **change}})
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            rt.load(directory)
    rewrite({**header, "__metadata__": {**header["__metadata__"],
                                        "fastencdec_tied": json.dumps({"x": ["y"]})}})
    with pytest.raises(ValueError, match="malformed 'fastencdec_tied'"):
        rt.load(directory)
    weights.write_bytes(data)
    with SafetensorsFile(weights) as f:
        name = next(iter(f.entries))
        with pytest.raises(ValueError, match="C-contiguous"):
            f.read(name, np.empty(1, np.float64))
