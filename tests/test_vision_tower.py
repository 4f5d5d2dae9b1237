"""The vision tower: equal to Hugging Face's CLIPVisionModel (second-to-last layer,
patch tokens) when transformers is installed, equal to a plain reference of its own
math otherwise, and the projector."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from fastencdec.vision.hf_clip import load_hf_clip_vision, vision_config_from_hf
from fastencdec.vision.projector import Projector
from fastencdec.vision.tower import VisionConfig, VisionTower

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize(module, std=0.2):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, std)
    return module.eval()


def _plain_reference(tower, pixels):
    """The tower's math written out with torch only (softmax attention, no ops)."""
    cfg = tower.config
    emb = tower.embeddings
    x = F.conv2d(pixels, emb.patch_embedding.weight, stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([emb.class_embedding.expand(len(x), 1, -1), x], 1)
    x = x + emb.position_embedding.weight
    x = F.layer_norm(x, (cfg.width,), tower.pre_layrnorm.weight, tower.pre_layrnorm.bias,
                     cfg.norm_eps)
    for layer in tower.layers:
        h = F.layer_norm(x, (cfg.width,), layer.layer_norm1.weight, layer.layer_norm1.bias,
                         cfg.norm_eps)
        a = layer.self_attn

        def heads(t):
            return t.view(len(t), -1, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        q, k, v = heads(a.q_proj(h)), heads(a.k_proj(h)), heads(a.v_proj(h))
        att = torch.softmax(q @ k.transpose(-1, -2) / cfg.head_dim ** 0.5, -1) @ v
        x = x + a.out_proj(att.transpose(1, 2).reshape(len(x), -1, cfg.width))
        h = F.layer_norm(x, (cfg.width,), layer.layer_norm2.weight, layer.layer_norm2.bias,
                         cfg.norm_eps)
        h = layer.mlp.fc1(h)
        x = x + layer.mlp.fc2(h * torch.sigmoid(1.702 * h))
    return x[:, 1:]


def test_presets_and_shapes(seed):
    big = VisionConfig.preset("clip-vit-l-336")
    assert (big.tokens_per_crop, big.width, big.layers_used, big.head_dim) == (576, 1024, 23, 64)
    cfg = VisionConfig.preset("tiny")
    tower = _randomize(VisionTower(cfg))
    assert len(tower.layers) == cfg.layers_used == 2
    out = tower(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, cfg.tokens_per_crop, cfg.width) == (3, 16, 64)
    with pytest.raises(ValueError, match=r"\[N, 3, 32, 32\]"):
        tower(torch.randn(3, 3, 30, 32))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="unknown vision preset"):
        VisionConfig.preset("nope")


@pytest.mark.parametrize("backend_name", [None, "reference"])
def test_tower_matches_plain_reference(seed, backend, backend_name):
    if backend_name:
        backend(backend_name)
    cfg = VisionConfig(image_size=24, patch_size=6, width=64, n_layers=3, n_heads=2,
                       mlp_dim=96, feature_layer=-2)
    tower = _randomize(VisionTower(cfg))
    pixels = torch.randn(4, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels), _plain_reference(tower, pixels),
                                   atol=2e-5, rtol=2e-5)


def test_tower_gradients_flow(seed):
    tower = _randomize(VisionTower(VisionConfig.preset("tiny"))).train()
    tower(torch.randn(2, 3, 32, 32)).square().mean().backward()
    for name, p in tower.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_projector_is_mlp2x_gelu(seed):
    proj = Projector(64, 48)
    x = torch.randn(5, 7, 64)
    expected = proj.fc2(F.gelu(proj.fc1(x)))
    torch.testing.assert_close(proj(x), expected)
    assert proj.fc1.weight.shape == (48, 64) and proj.fc2.weight.shape == (48, 48)


def _hf_clip(tmp_path, **overrides):
    transformers = pytest.importorskip("transformers")
    settings = dict(hidden_size=64, intermediate_size=96, num_attention_heads=2,
                    num_hidden_layers=3, image_size=32, patch_size=8, hidden_act="quick_gelu")
    settings.update(overrides)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**settings))
    _randomize(model, std=0.1)  # O(1) activations: fp32 rounding stays well under 1e-5
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_clip_equivalence(tmp_path, seed, act):
    hf = _hf_clip(tmp_path, hidden_act=act)
    tower = load_hf_clip_vision(tmp_path)
    assert tower.config.activation == act and len(tower.layers) == 2
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = tower(pixels)
    assert got.shape == want.shape == (3, 16, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # in float64 (the reference attention) the two agree to rounding: the mapping is exact
    hf, tower, pixels = hf.double(), tower.double(), pixels.double()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "float64 inputs have no kernel": the reference runs
        got = tower(pixels)
        want = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_hf_clip_full_model_and_other_feature_layer(tmp_path, seed):
    transformers = pytest.importorskip("transformers")
    vision = dict(hidden_size=64, intermediate_size=96, num_attention_heads=2,
                  num_hidden_layers=3, image_size=32, patch_size=8)
    config = transformers.CLIPConfig(
        vision_config=vision,
        text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_hidden_layers=1, vocab_size=99), projection_dim=16)
    model = _randomize(transformers.CLIPModel(config), std=0.1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tower = load_hf_clip_vision(tmp_path, feature_layer=-1)
    assert len(tower.layers) == 3
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model.vision_model(pixel_values=pixels,
                                  output_hidden_states=True).hidden_states[-1][:, 1:]
        torch.testing.assert_close(tower(pixels), want, atol=1e-5, rtol=1e-5)


def test_hf_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_clip_vision(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(
        {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 2,
         "num_hidden_layers": 3, "image_size": 32, "patch_size": 8}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf_clip_vision(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="safetensors only"):
        load_hf_clip_vision(tmp_path)
    with pytest.raises(ValueError, match="hidden_act"):
        vision_config_from_hf({"hidden_act": "relu"})


def test_hf_loader_rejects_wrong_shapes(tmp_path, seed):
    _hf_clip(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"fc1\.(weight|bias) has shape"):
        load_hf_clip_vision(tmp_path)
