"""Load a local Hugging Face CLIP vision checkpoint folder into a :class:`VisionTower`.

The folder holds ``config.json`` (a ``CLIPVisionConfig``, or a ``CLIPConfig`` with a
``vision_config``) and safetensors weights (``model.safetensors`` or shards listed in
``model.safetensors.index.json``); pickled ``pytorch_model.bin`` files are refused
(DESIGN §6). Names map one to one after dropping the ``vision_model.`` prefix (present
in ``CLIPModel`` files and older ``CLIPVisionModel`` ones) and ``encoder.``; the text
tower, projections, ``post_layernorm`` and layers past the feature layer are skipped.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..models.meta_init import on_meta
from .tower import VisionConfig, VisionTower

__all__ = ["load_hf_clip_vision", "vision_config_from_hf"]

_LAYER = re.compile(r"^layers\.(\d+)\.")


def vision_config_from_hf(hf: dict, *, feature_layer: int = -2) -> VisionConfig:
    """A :class:`VisionConfig` from a Hugging Face CLIP (vision) config dict."""
    if "vision_config" in hf:
        hf = hf["vision_config"]
    defaults = dict(image_size=224, patch_size=32, hidden_size=768, num_hidden_layers=12,
                    num_attention_heads=12, intermediate_size=3072, hidden_act="quick_gelu",
                    layer_norm_eps=1e-5, num_channels=3)
    get = lambda key: hf.get(key, defaults[key])  # noqa: E731
    if get("num_channels") != 3:
        raise ValueError(f"only 3-channel (RGB) towers are supported, got num_channels="
                         f"{get('num_channels')}")
    act = get("hidden_act")
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"unsupported hidden_act {act!r} (quick_gelu or gelu)")
    return VisionConfig(image_size=get("image_size"), patch_size=get("patch_size"),
                        width=get("hidden_size"), n_layers=get("num_hidden_layers"),
                        n_heads=get("num_attention_heads"), mlp_dim=get("intermediate_size"),
                        feature_layer=feature_layer, activation=act,
                        norm_eps=float(get("layer_norm_eps")))


def _weight_files(directory: Path) -> list[Path]:
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
        return [directory / s for s in shards]
    if any((directory / n).is_file() for n in ("pytorch_model.bin", "model.pt")):
        raise ValueError(f"{directory}: holds only pickled weights; fastencdec loads "
                         "safetensors only (re-save the model with safe_serialization=True)")
    raise FileNotFoundError(f"{directory}: no model.safetensors (or safetensors index) found")


def _our_name(key: str, prefix: str) -> str | None:
    """Hugging Face key -> VisionTower key (None: not part of the tower)."""
    if not key.startswith(prefix) or not key[len(prefix):].startswith(
            ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")):
        return None
    key = key[len(prefix):]
    if key.startswith("encoder."):
        key = key[len("encoder."):]
    if key.startswith("post_layernorm.") or key.endswith("position_ids"):
        return None
    return key


def load_hf_clip_vision(directory: str | os.PathLike, *, feature_layer: int = -2,
                        dtype: torch.dtype | None = None, device=None) -> VisionTower:
    """The tower of a saved ``CLIPVisionModel`` / ``CLIPModel`` (strict: every tower
    parameter must be present with its expected shape)."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found (not a Hugging Face model folder?)")
    with open(cfg_path, encoding="utf-8") as fh:
        config = vision_config_from_hf(json.load(fh), feature_layer=feature_layer)
    with on_meta():
        tower = VisionTower(config)
    expected = tower.state_dict()
    state = {}
    files = _weight_files(directory)
    keys = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            keys[path] = list(f.keys())
    prefixed = any(k.startswith("vision_model.") for ks in keys.values() for k in ks)
    prefix = "vision_model." if prefixed else ""
    for path in files:
        with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
            for key in keys[path]:
                name = _our_name(key, prefix)
                if name is None:
                    continue
                layer = _LAYER.match(name)
                if layer and int(layer.group(1)) >= config.layers_used:
                    continue  # past the feature layer: never used
                if name not in expected:
                    raise ValueError(f"{path}: unexpected tensor {key!r} for a CLIP vision tower")
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(expected[name].shape):
                    raise ValueError(f"{path}: {key} has shape {list(tensor.shape)}, expected "
                                     f"{list(expected[name].shape)} from config.json")
                state[name] = tensor if dtype is None else tensor.to(dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{directory}: missing tower tensors {missing[:6]}")
    tower.load_state_dict(state, strict=True, assign=True)
    return tower.eval()
