"""Import the public reference checkpoint (``model.pt``, DESIGN §1) as an
:class:`~fastencdec.models.EncoderDecoderLM`.

The file is read with ``torch.load(..., weights_only=True)``: a file that needs
more than tensors and plain containers is refused, never unpickled.

Names map one to one (``transformer.e.{i}.attn.q_linear`` ->
``encoder.{i}.attn.q_proj``, ...). One thing differs: the reference repeats its
K/V heads by concatenation, so its query head ``h`` reads K/V head
``h % n_kv_heads``, while fastencdec's query head ``h`` reads ``h // group``. We
reorder the query heads: our head ``j`` is the reference's head
``perm[j] = (j % group) * n_kv_heads + j // group`` (which reads K/V head
``j // group`` in the reference too), permuting the q projection's output rows
(and bias) and the out projection's input columns, so the outputs are identical.
Its centred encoder positions need nothing: RoPE only sees position differences.
"""

from __future__ import annotations

import os
import pickle
import re

import torch

from .models import EncDecConfig, EncoderDecoderLM

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


def load_reference_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The reference ``model.pt``'s ``"model_state_dict"`` (a bare state dict is accepted too)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} needs more than weights_only loading (it contains pickled code or "
            "objects); refusing to load it. Re-save its state dict with torch.save"
        ) from err
    state = obj.get("model_state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or "transformer.wte.weight" not in state:
        raise ValueError(f"{path} is not a reference checkpoint: expected a dict whose "
                         "'model_state_dict' holds 'transformer.wte.weight', ...")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: non-tensor entries in the state dict: {bad[:5]}")
    return state


def _rename(name: str) -> str:
    for pattern, template in _RULES:
        m = re.fullmatch(pattern, name)
        if m:
            groups = [_ATTN.get(g, g) for g in m.groups()]
            return template.format(*groups)
    raise ValueError(f"unexpected tensor {name!r} in the reference checkpoint")


def reference_head_order(n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """``perm[j]``: the reference query head that becomes fastencdec's head ``j``."""
    group = n_heads // n_kv_heads
    j = torch.arange(n_heads)
    return (j % group) * n_kv_heads + j // group


def _permute_heads(name: str, t: torch.Tensor, perm: torch.Tensor, head_dim: int) -> torch.Tensor:
    n = perm.numel()
    if name.endswith("q_proj.weight"):
        return t.reshape(n, head_dim, -1)[perm].reshape(t.shape)
    if name.endswith("q_proj.bias"):
        return t.reshape(n, head_dim)[perm].reshape(t.shape)
    if name.endswith("out_proj.weight"):
        return t.reshape(t.shape[0], n, head_dim)[:, perm].reshape(t.shape)
    return t


def config_from_state_dict(state: dict[str, torch.Tensor], *, head_dim: int = 64,
                           **overrides) -> EncDecConfig:
    """Infer the widths and depths from tensor shapes; ``head_dim`` (not visible in the
    shapes) and the ids/RoPE settings default to the mu-330m preset's."""
    d_model = state["transformer.wte.weight"].shape[1]
    q_rows = state["transformer.e.0.attn.q_linear.weight"].shape[0]
    kv_rows = state["transformer.e.0.attn.k_linear.weight"].shape[0]
    if q_rows % head_dim or kv_rows % head_dim:
        raise ValueError(f"head_dim={head_dim} does not divide the q/k widths {q_rows}/{kv_rows}")

    def n_layers(prefix):
        return len({k.split(".")[2] for k in state if k.startswith(prefix)})

    inferred = dict(
        vocab_size=state["transformer.wte.weight"].shape[0], d_model=d_model,
        n_encoder_layers=n_layers("transformer.e."), n_decoder_layers=n_layers("transformer.h."),
        n_heads=q_rows // head_dim, n_kv_heads=kv_rows // head_dim, head_dim=head_dim,
        d_ff=state["transformer.e.0.mlp.fc1.weight"].shape[0], mlp="gelu",
        attn_bias="transformer.e.0.attn.q_linear.bias" in state,
    )
    lm_head = state.get("lm_head.weight")
    if lm_head is not None and not torch.equal(lm_head, state["transformer.wte.weight"]):
        inferred["tie_embeddings"] = False
    inferred.update(overrides)
    return EncDecConfig.preset("mu-330m").replace(**inferred)


def import_mu_checkpoint(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                         device="cpu", head_dim: int = 64, **config_overrides) -> EncoderDecoderLM:
    """Build an :class:`EncoderDecoderLM` from the reference ``model.pt`` (bf16 tensors,
    converted to ``dtype``). The configuration is inferred from the shapes (see
    :func:`config_from_state_dict`); ``config_overrides`` change other fields (e.g.
    ``max_position_embeddings``, ``rope_scaling_factor``)."""
    state = load_reference_state_dict(path)
    config = config_from_state_dict(state, head_dim=head_dim, **config_overrides)
    perm = reference_head_order(config.n_heads, config.n_kv_heads)
    converted = {}
    for name, tensor in state.items():
        new = _rename(name)
        if new == "lm_head.weight" and config.tie_embeddings:
            continue
        converted[new] = _permute_heads(new, tensor, perm, config.head_dim).to(
            device=device, dtype=dtype).contiguous()
    with torch.device("meta"):
        model = EncoderDecoderLM(config)
    return model.load_weights(converted, source=str(path))


__all__ = ["import_mu_checkpoint", "load_reference_state_dict", "config_from_state_dict",
           "reference_head_order"]
