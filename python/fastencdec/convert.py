"""Import the public reference checkpoint (``model.pt``, DESIGN §1) as an
:class:`~fastencdec.models.EncoderDecoderLM`.

The file is read with ``torch.load(..., weights_only=True)``: a file that needs
more than tensors and plain containers is refused, never unpickled.

The configuration comes from the checkpoint's own ``"model_config"`` when it has
one (layers, widths, heads, K/V heads, ``head_dim = qkv_embd // n_head``,
interleaving, RoPE theta and NTK factor, ``block_size``, pad id; a field it lacks
takes the reference's own default, as the reference's config class would).
Without one, widths and depths are read from the tensor shapes (``head_dim`` and
the interleaving cannot be seen there: they default to mu-330m's 64 and
``False``). Either way the state dict is then checked against the configuration
tensor by tensor, so a missing or extra layer, a wrong width or a stray tensor is
an error naming it, never a smaller or different model.

Names map one to one (``transformer.e.{i}.attn.q_linear`` ->
``encoder.{i}.attn.q_proj``, ...). With ``is_interleaved=False`` (the reference's
default) the reference repeats its K/V heads by concatenation, so its query head
``h`` reads K/V head ``h % n_kv_heads``, while fastencdec's query head ``h`` reads
``h // group``. We reorder the query heads: our head ``j`` is the reference's head
``perm[j] = (j % group) * n_kv_heads + j // group`` (which reads K/V head
``j // group`` in the reference too), permuting the q projection's output rows
(and bias) and the out projection's input columns, so the outputs are identical.
With ``is_interleaved=True`` the reference already uses fastencdec's mapping and
nothing is permuted. Its centred encoder positions need nothing: RoPE only sees
position differences.
"""

from __future__ import annotations

import math
import numbers
import os
import pickle
import re
from typing import Any

import torch

from .argcheck import positive_int
from .models import EncDecConfig, EncoderDecoderLM
from .models.meta_init import on_meta

_ATTN = {"q_linear": "q_proj", "k_linear": "k_proj", "v_linear": "v_proj", "out_linear": "out_proj"}
_RULES = [  # (reference name pattern, fastencdec name template)
    (r"transformer\.wte\.weight", "embed.weight"),
    (r"transformer\.ln_e\.weight", "encoder_norm.weight"),
    (r"transformer\.ln_f\.weight", "decoder_norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"transformer\.e\.(\d+)\.ln([12])\.weight", "encoder.{0}.norm{1}.weight"),
    (r"transformer\.e\.(\d+)\.attn\.(\w+_linear)\.(weight|bias)", "encoder.{0}.attn.{1}.{2}"),
    (r"transformer\.e\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", "encoder.{0}.mlp.{1}.{2}"),
    (r"transformer\.h\.(\d+)\.ln([123])\.weight", "decoder.{0}.norm{1}.weight"),
    (r"transformer\.h\.(\d+)\.causal_attn\.(\w+_linear)\.(weight|bias)",
     "decoder.{0}.self_attn.{1}.{2}"),
    (r"transformer\.h\.(\d+)\.cross_attn\.(\w+_linear)\.(weight|bias)",
     "decoder.{0}.cross_attn.{1}.{2}"),
    (r"transformer\.h\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", "decoder.{0}.mlp.{1}.{2}"),
]

# The reference's model_config fields, their kinds and the reference's own defaults
# (the mu-330m checkpoint's values).
MU_CONFIG_FIELDS: dict[str, tuple[str, Any]] = {
    "n_encoder_layer": ("int", 20), "n_decoder_layer": ("int", 10), "n_embd": ("int", 1024),
    "qkv_embd": ("int", 384),  # None in the reference means n_embd
    "is_interleaved": ("bool", False), "hidden_dim": ("int", 4096),
    "n_head": ("int", 6), "n_kv_head": ("int", 3), "block_size": ("int", 1024),
    "dropout": ("float", 0.1), "rope_theta": ("float", 10000.0), "rope_factor": ("float", 1.0),
    "pad_token_id": ("int", 0), "vocab_size": ("int", 32128),
}
# EncDecConfig fields that the checkpoint's tensors and model_config fix: overriding
# them would describe a different model than the one stored.
_FIXED_BY_CHECKPOINT = ("vocab_size", "d_model", "n_encoder_layers", "n_decoder_layers",
                        "n_heads", "n_kv_heads", "head_dim", "d_ff", "mlp", "attn_bias",
                        "tie_embeddings")


def load_reference_checkpoint(path: str | os.PathLike
                              ) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The reference ``model.pt``'s ``"model_state_dict"`` (a bare state dict is accepted
    too) and its ``"model_config"`` (None when it has none)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} needs more than weights_only loading (it contains pickled code or "
            "objects); refusing to load it. Re-save its state dict with torch.save"
        ) from err
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as err:  # a corrupted zip/pickle fails in many ways; name the file
        raise ValueError(f"{path} is not a readable torch checkpoint "
                         f"({type(err).__name__}: {err})") from err
    state = obj.get("model_state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or "transformer.wte.weight" not in state:
        raise ValueError(f"{path} is not a reference checkpoint: expected a dict whose "
                         "'model_state_dict' holds 'transformer.wte.weight', ...")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: non-tensor entries in the state dict: {bad[:5]}")
    model_config = obj.get("model_config") if state is not obj else None
    if model_config is not None and not isinstance(model_config, dict):
        raise ValueError(f"{path}: model_config must be a dict of plain values, "
                         f"got {type(model_config).__name__}")
    return state, model_config


def load_reference_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The reference ``model.pt``'s ``"model_state_dict"`` (a bare state dict is accepted too)."""
    return load_reference_checkpoint(path)[0]


def read_model_config(raw: dict, source: str = "model_config") -> dict[str, Any]:
    """The reference ``model_config`` checked field by field (types, no unknown fields)
    and completed with the reference's defaults; ``qkv_embd=None`` becomes ``n_embd``."""
    unknown = sorted((k for k in raw if k not in MU_CONFIG_FIELDS), key=str)
    if unknown:
        raise ValueError(f"{source}: model_config has fields this importer does not know "
                         f"(it would ignore them and might build a different model): {unknown}")
    out = {}
    for name, (kind, default) in MU_CONFIG_FIELDS.items():
        value = raw.get(name, default)
        if name == "qkv_embd" and value is None:
            value = raw.get("n_embd", MU_CONFIG_FIELDS["n_embd"][1])
        where = f"{source}: model_config field {name!r}"
        if kind == "bool" and not isinstance(value, bool):
            raise ValueError(f"{where} must be a bool, got {value!r}")
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{where} must be an int, got {value!r}")
            value = int(value)
            if value < (0 if name == "pad_token_id" else 1):
                raise ValueError(f"{where} must be {'>= 0' if name == 'pad_token_id' else '>= 1'}"
                                 f", got {value}")
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value):
                raise ValueError(f"{where} must be a finite number, got {value!r}")
            value = float(value)
        out[name] = value
    if out["qkv_embd"] % out["n_head"]:
        raise ValueError(f"{source}: model_config qkv_embd={out['qkv_embd']} is not a multiple "
                         f"of n_head={out['n_head']}")
    return out


def _encdec_config(fields: dict[str, Any], overrides: dict[str, Any], source: str
                   ) -> EncDecConfig:
    try:
        return EncDecConfig.preset("mu-330m").replace(**{**fields, **overrides})
    except ValueError as err:
        hint = (" (mu-330m's token ids; pass e.g. eos_token_id=... for a smaller vocabulary)"
                if "token_id" in str(err) else "")
        raise ValueError(f"{source}: not a valid configuration: {err}{hint}") from err


def config_from_model_config(model_config: dict[str, Any], *, tie_embeddings: bool = True,
                             source: str = "model_config", **overrides) -> EncDecConfig:
    """The :class:`EncDecConfig` a reference ``model_config`` describes (see
    :func:`read_model_config`); ``overrides`` set the fields it does not fix (token ids,
    RoPE settings, dropout, ...)."""
    mc = read_model_config(model_config, source)
    fixed = sorted(set(overrides) & set(_FIXED_BY_CHECKPOINT))
    if fixed:
        raise ValueError(f"{source}: {fixed} are set by the checkpoint's model_config, "
                         "not by overrides")
    fields = dict(
        vocab_size=mc["vocab_size"], d_model=mc["n_embd"],
        n_encoder_layers=mc["n_encoder_layer"], n_decoder_layers=mc["n_decoder_layer"],
        n_heads=mc["n_head"], n_kv_heads=mc["n_kv_head"], head_dim=mc["qkv_embd"] // mc["n_head"],
        d_ff=mc["hidden_dim"], mlp="gelu", attn_bias=True, tie_embeddings=tie_embeddings,
        rope_theta=mc["rope_theta"],
        # The reference scales only when rope_factor > 1; anything lower means none.
        rope_scaling_factor=max(1.0, mc["rope_factor"]),
        max_position_embeddings=mc["block_size"], pad_token_id=mc["pad_token_id"],
        dropout=mc["dropout"],
    )
    return _encdec_config(fields, overrides, source)


def _layer_indices(state, prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def _require(state, name: str, source: str) -> torch.Tensor:
    if name not in state:
        raise ValueError(f"{source}: the state dict lacks {name!r}")
    return state[name]


def config_from_state_dict(state: dict[str, torch.Tensor], *, head_dim: int = 64,
                           source: str = "state dict", **overrides) -> EncDecConfig:
    """Infer the widths and depths from tensor shapes; ``head_dim`` (not visible in the
    shapes) and the ids/RoPE settings default to the mu-330m preset's. Layers must be
    numbered 0..n-1 without gaps (a checkpoint missing its *last* layer cannot be told
    from a shallower model without a ``model_config``)."""
    wte = _require(state, "transformer.wte.weight", source)
    q_rows = _require(state, "transformer.e.0.attn.q_linear.weight", source).shape[0]
    kv_rows = _require(state, "transformer.e.0.attn.k_linear.weight", source).shape[0]
    if wte.dim() != 2:
        raise ValueError(f"{source}: 'transformer.wte.weight' must be 2-d, got "
                         f"shape {list(wte.shape)}")
    head_dim = positive_int("head_dim", head_dim)
    if q_rows % head_dim or kv_rows % head_dim:
        raise ValueError(f"{source}: head_dim={head_dim} does not divide the q/k widths "
                         f"{q_rows}/{kv_rows}; pass the checkpoint's head_dim")
    counts = {}
    for field, prefix in (("n_encoder_layers", "transformer.e."),
                          ("n_decoder_layers", "transformer.h.")):
        indices = _layer_indices(state, prefix)
        if indices != list(range(len(indices))):
            gap = next(i for i, index in enumerate(indices) if index != i)
            raise ValueError(f"{source}: layers {prefix}* are numbered with a gap "
                             f"(layer {gap} is absent)")
        counts[field] = len(indices)
    inferred = dict(
        vocab_size=wte.shape[0], d_model=wte.shape[1], **counts,
        n_heads=q_rows // head_dim, n_kv_heads=kv_rows // head_dim, head_dim=head_dim,
        d_ff=_require(state, "transformer.e.0.mlp.fc1.weight", source).shape[0], mlp="gelu",
        attn_bias="transformer.e.0.attn.q_linear.bias" in state,
        tie_embeddings=_tied(state),
    )
    return _encdec_config({**inferred}, overrides, source)


def _tied(state) -> bool:
    lm_head, wte = state.get("lm_head.weight"), state["transformer.wte.weight"]
    return lm_head is None or (lm_head.shape == wte.shape and torch.equal(lm_head, wte))


def expected_shapes(config: EncDecConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor (reference name -> shape) a reference checkpoint of ``config`` holds
    (``lm_head.weight`` included; it may be absent when tied)."""
    d, q = config.d_model, config.n_heads * config.head_dim
    kv, ff = config.n_kv_heads * config.head_dim, config.d_ff

    def attn(prefix):
        shapes = {f"{prefix}.q_linear.weight": (q, d), f"{prefix}.k_linear.weight": (kv, d),
                  f"{prefix}.v_linear.weight": (kv, d), f"{prefix}.out_linear.weight": (d, q)}
        if config.attn_bias:
            shapes.update({f"{prefix}.q_linear.bias": (q,), f"{prefix}.k_linear.bias": (kv,),
                           f"{prefix}.v_linear.bias": (kv,), f"{prefix}.out_linear.bias": (d,)})
        return shapes

    def mlp(prefix):
        return {f"{prefix}.fc1.weight": (ff, d), f"{prefix}.fc1.bias": (ff,),
                f"{prefix}.fc2.weight": (d, ff), f"{prefix}.fc2.bias": (d,)}

    shapes = {"transformer.wte.weight": (config.vocab_size, d)}
    for i in range(config.n_encoder_layers):
        p = f"transformer.e.{i}"
        shapes.update({f"{p}.ln1.weight": (d,), f"{p}.ln2.weight": (d,)})
        shapes.update(attn(f"{p}.attn"))
        shapes.update(mlp(f"{p}.mlp"))
    shapes["transformer.ln_e.weight"] = (d,)
    for i in range(config.n_decoder_layers):
        p = f"transformer.h.{i}"
        shapes.update({f"{p}.ln{j}.weight": (d,) for j in (1, 2, 3)})
        shapes.update(attn(f"{p}.causal_attn"))
        shapes.update(attn(f"{p}.cross_attn"))
        shapes.update(mlp(f"{p}.mlp"))
    shapes["transformer.ln_f.weight"] = (d,)
    shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


def check_state_dict(state: dict[str, torch.Tensor], config: EncDecConfig,
                     source: str = "state dict", described_by: str = "the configuration"
                     ) -> None:
    """Refuse ``state`` unless it holds exactly the tensors of ``config`` (layer counts
    first, then every name, dtype and shape), naming what differs."""
    for field, prefix, ref_field in (("n_encoder_layers", "transformer.e.", "n_encoder_layer"),
                                     ("n_decoder_layers", "transformer.h.", "n_decoder_layer")):
        want, indices = getattr(config, field), _layer_indices(state, prefix)
        # Compare without enumerating range(want): a hostile count may be 2**31.
        gap = next((i for i, index in enumerate(indices) if index != i), None)
        if gap is None and len(indices) < want:
            gap = len(indices)
        if gap is not None and gap < want:
            raise ValueError(f"{source}: {described_by} says {ref_field}={want} but layer "
                             f"{gap} ({prefix}{gap}.*) is absent")
        if len(indices) != want:
            raise ValueError(f"{source}: {described_by} says {ref_field}={want} but the state "
                             f"dict holds extra layers from {prefix}{want}.*")
    expected = expected_shapes(config)
    for name, tensor in state.items():
        if name not in expected:
            raise ValueError(f"{source}: unexpected tensor {name!r} in the reference checkpoint "
                             f"({described_by} has no such tensor)")
        if not tensor.is_floating_point():
            raise ValueError(f"{source}: tensor {name!r} has dtype {tensor.dtype}; expected a "
                             "floating-point dtype")
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{source}: tensor {name!r} has shape {list(tensor.shape)}; "
                             f"expected {list(expected[name])} from {described_by}")
    missing = [n for n in expected if n not in state and n != "lm_head.weight"]
    if "lm_head.weight" not in state and not config.tie_embeddings:
        missing.append("lm_head.weight")
    if missing:
        raise ValueError(f"{source}: the state dict lacks {missing[:8]}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))


def reference_head_order(n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """``perm[j]``: the reference query head that becomes fastencdec's head ``j``."""
    group = n_heads // n_kv_heads
    j = torch.arange(n_heads)
    return (j % group) * n_kv_heads + j // group


def _rename(name: str) -> str:
    for pattern, template in _RULES:
        m = re.fullmatch(pattern, name)
        if m:
            groups = [_ATTN.get(g, g) for g in m.groups()]
            return template.format(*groups)
    raise ValueError(f"unexpected tensor {name!r} in the reference checkpoint")


def _permute_heads(name: str, t: torch.Tensor, perm: torch.Tensor, head_dim: int) -> torch.Tensor:
    n = perm.numel()
    if name.endswith("q_proj.weight"):
        return t.reshape(n, head_dim, -1)[perm].reshape(t.shape)
    if name.endswith("q_proj.bias"):
        return t.reshape(n, head_dim)[perm].reshape(t.shape)
    if name.endswith("out_proj.weight"):
        return t.reshape(t.shape[0], n, head_dim)[:, perm].reshape(t.shape)
    return t


def import_mu_checkpoint(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                         device="cpu", head_dim: int | None = None,
                         is_interleaved: bool | None = None,
                         **config_overrides) -> EncoderDecoderLM:
    """Build an :class:`EncoderDecoderLM` from the reference ``model.pt`` (bf16 tensors,
    converted to ``dtype``).

    The configuration is the checkpoint's ``model_config`` when present (then
    ``head_dim``/``is_interleaved``, if given, must agree with it); otherwise it is
    inferred from the shapes with ``head_dim`` (default 64) and ``is_interleaved``
    (default False, the reference's default). ``config_overrides`` set the other fields
    (``eos_token_id``, ``bos_token_id``, ``max_position_embeddings``,
    ``rope_scaling_factor``, ...); the token ids default to mu-330m's tokenizer's.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if is_interleaved is not None and not isinstance(is_interleaved, bool):
        raise ValueError(f"is_interleaved must be a bool or None, got {is_interleaved!r}")
    source = str(path)
    state, model_config = load_reference_checkpoint(path)
    if model_config is not None:
        mc = read_model_config(model_config, source)
        derived = mc["qkv_embd"] // mc["n_head"]
        if head_dim is not None and head_dim != derived:
            raise ValueError(f"head_dim={head_dim} contradicts {source}'s model_config "
                             f"(qkv_embd={mc['qkv_embd']} / n_head={mc['n_head']} = {derived})")
        if is_interleaved is not None and is_interleaved != mc["is_interleaved"]:
            raise ValueError(f"is_interleaved={is_interleaved} contradicts {source}'s "
                             f"model_config (is_interleaved={mc['is_interleaved']})")
        interleaved = mc["is_interleaved"]
        config = config_from_model_config(model_config, tie_embeddings=_tied(state),
                                          source=source, **config_overrides)
        check_state_dict(state, config, source, described_by="its model_config")
    else:
        interleaved = bool(is_interleaved)
        config = config_from_state_dict(state, head_dim=64 if head_dim is None else head_dim,
                                        source=source, **config_overrides)
        check_state_dict(state, config, source, described_by="the shapes of its first layer")
    perm = None if interleaved else reference_head_order(config.n_heads, config.n_kv_heads)
    converted = {}
    for name, tensor in state.items():
        new = _rename(name)
        if new == "lm_head.weight" and config.tie_embeddings:
            continue
        if perm is not None:
            tensor = _permute_heads(new, tensor, perm, config.head_dim)
        converted[new] = tensor.to(device=device, dtype=dtype).contiguous()
    with on_meta():
        model = EncoderDecoderLM(config)
    return model.load_weights(converted, source=source)


__all__ = ["import_mu_checkpoint", "load_reference_checkpoint", "load_reference_state_dict",
           "read_model_config", "config_from_model_config", "config_from_state_dict",
           "check_state_dict", "expected_shapes", "reference_head_order", "MU_CONFIG_FIELDS"]
