"""CPU inference weight formats: ``to_inference(model, dtype)`` and their safetensors files.

``to_inference(model, "fp32" | "bf16" | "int8")`` converts a model in place for CPU
inference (eval mode, no gradients) and returns it:

``fp32``  every weight fp32, ``nn.Linear`` (MKL sgemm/sgemv); the LM head stays tied.
          Activations fp32.
``bf16``  every ``nn.Linear`` (attention, MLP and the LM head, which gets its own copy
          of the embedding) becomes a :class:`Bf16Linear`: bf16 weights held only in
          oneDNN's packed layout (AVX512_BF16 GEMM/GEMV), bf16 bias. The embedding is
          bf16 for the lookup. Activations bf16.
``int8``  every ``nn.Linear`` (the LM head too, its own copy; the embedding stays fp32
          for the lookup) becomes an :class:`Int8Linear`: int8 weights, symmetric per
          output channel (``scale[n] = max_k |w[n, k]| / 127``, zero point 0), held
          only in fbgemm's packed layout; fp32 scales and bias. Activations fp32 in and
          out; each row is quantised to uint8 on the fly (see :class:`Int8Linear`).

In every format RMSNorm weights stay fp32 and the norm computes in fp32. The library
paths were chosen by measurement (``bench/bench_linear_cpu.py``): per format the
fastest path PyTorch ships, at decode (M = 1-8 rows) and encoder (M = 512) sizes, whose
error stays within the format's own rounding. A packed weight is the only copy (no
plain weight is kept beside it): ``state_dict()`` unpacks it, loading packs it.

``save_inference(model, dir)`` writes ``model.safetensors`` (int8 weights + scales for
``int8``) with the format in the file's metadata, plus ``config.json``;
``load_inference(dir)`` rebuilds the converted model (never unpickling anything) and
also converts a float checkpoint written by ``save_pretrained`` when given ``dtype``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .layers import GeluMLP, SelfAttention
from .pretrained import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    _replace_atomically,
    check_weights_header,
    read_safetensors_header,
)

FORMATS = ("fp32", "bf16", "int8")

try:  # Int8Linear's fused row preparation and epilogue (torch-only paths remain without)
    from fastencdec._C import rescale_rows as _rescale_rows
    from fastencdec._C import scale_rows as _scale_rows
except ImportError:  # pragma: no cover - the compiled module is part of the package
    _scale_rows = _rescale_rows = None
FORMAT_KEY = "fastencdec_weight_format"  # safetensors metadata: the format
TIED_KEY = "fastencdec_tied"  # safetensors metadata: JSON {alias: stored name}


def quantize_per_channel(weight: torch.Tensor, name: str = "weight"):
    """Symmetric int8 per output row: returns (q int8 ``[N, K]``, scale fp32 ``[N]``)
    with ``|weight - q * scale| <= scale / 2`` elementwise; an all-zero row gets
    scale 1 and zeros."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"{name}: expected a 2-D float weight, got {tuple(weight.shape)} "
                         f"{weight.dtype}")
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name}: weights contain NaN/Inf, which int8 cannot represent")
    amax = w.abs().amax(1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class _PackedLinear(nn.Module):
    """A linear layer whose weights exist only in a library's packed layout.

    ``state_dict()`` holds them unpacked (plain tensors: ``packed_dtypes`` gives their
    names and dtypes) and loading a state dict packs them again, so checkpoints stay
    plain tensors; copies and pickles also go through the plain tensors. Read access:
    ``unpacked()`` (new tensors on every call). Subclasses implement ``_pack(**plain)``
    and ``_unpack() -> dict``."""

    packed_dtypes: dict[str, torch.dtype]

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._packed = None
        self._empty_device = torch.device(device or "cpu")  # for unpacked() before pack()

    def _shape(self, name: str) -> tuple[int, ...]:
        return (self.out_features, self.in_features) if name == "weight" else (self.out_features,)

    def _pack(self, **plain):  # pragma: no cover - abstract
        raise NotImplementedError

    def _unpack(self) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def pack(self, **plain: torch.Tensor) -> None:
        """Set the weights from plain CPU tensors (all of ``packed_dtypes``' names)."""
        if set(plain) != set(self.packed_dtypes):
            raise ValueError(f"{type(self).__name__}.pack takes {sorted(self.packed_dtypes)}, "
                             f"got {sorted(plain)}")
        for name, value in plain.items():
            want = (self.packed_dtypes[name], self._shape(name))
            if not isinstance(value, torch.Tensor) or (value.dtype, tuple(value.shape)) != want:
                got = (value.dtype, tuple(value.shape)) if isinstance(value, torch.Tensor) \
                    else type(value).__name__
                raise ValueError(f"{type(self).__name__}: {name} must be {want[0]} of shape "
                                 f"{want[1]}, got {got}")
            if value.device.type != "cpu":
                raise ValueError(f"{type(self).__name__} runs on the CPU; {name} is on "
                                 f"{value.device}")
        self._packed = self._pack(**{k: v.detach().contiguous() for k, v in plain.items()})

    def unpacked(self) -> dict[str, torch.Tensor]:
        if self._packed is None:  # built empty (e.g. on meta to be loaded), never packed
            return {name: torch.empty(self._shape(name), dtype=dtype, device=self._empty_device)
                    for name, dtype in self.packed_dtypes.items()}
        return self._unpack()

    @property
    def weight(self) -> torch.Tensor:
        """The plain weight ``[out, in]`` (unpacked: a new tensor on every access)."""
        return self.unpacked()["weight"]

    def _check_input(self, x: torch.Tensor, dtype: torch.dtype) -> None:
        if x.dtype != dtype or x.shape[-1:] != (self.in_features,) or x.device.type != "cpu":
            raise ValueError(f"{type(self).__name__}: expected a CPU {dtype} input "
                             f"[..., {self.in_features}], got {x.dtype} {tuple(x.shape)} "
                             f"on {x.device}")
        if self._packed is None:
            raise RuntimeError(f"{type(self).__name__} has no weights (built empty, never "
                               f"loaded)")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, value in self.unpacked().items():
            destination[prefix + name] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        plain = {}
        for name in self.packed_dtypes:
            key = prefix + name
            if key in unexpected_keys:
                unexpected_keys.remove(key)
            if key in state_dict:
                plain[name] = state_dict[key]
            else:
                missing_keys.append(key)
        if len(plain) == len(self.packed_dtypes):
            try:
                self.pack(**plain)
            except ValueError as e:
                error_msgs.append(f"{prefix}: {e}")

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_packed"] = None if self._packed is None else self._unpack()
        return state

    def __setstate__(self, state):
        plain = state.pop("_packed")
        super().__setstate__(state)
        self._packed = None
        if plain is not None:
            self.pack(**plain)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


def _quantized_weight_tensor(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A per-channel qint8 tensor over ``q``: the form fbgemm's linear ops take (quantized
    tensors are slated for deprecation in PyTorch; the ops are what is used here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch._make_per_channel_quantized_tensor(
            q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)


class Int8Linear(_PackedLinear):
    """``y = x @ (q * weight_scale[:, None]).T + bias`` with int8 ``q`` per output channel.

    State: ``weight`` int8 ``[N, K]`` and ``weight_scale`` fp32 ``[N]`` (both held in
    fbgemm's packed weight), ``bias`` fp32 ``[N]`` or None. Input and output fp32, any
    leading dims.

    Each row of ``x`` is rounded to uint8 on its own symmetric grid (step
    ``max |x_row| / 127.5``) and fbgemm's AVX512-VNNI/AVX2 GEMM multiplies the uint8
    activations by the int8 weights with int32 accumulation
    (``quantized.linear_dynamic``). Measured (``bench/bench_linear_cpu.py``): the
    fastest int8 path PyTorch ships at decode sizes (M = 1-8: ~75-85% of copy bandwidth
    on the MLP and LM head GEMVs; the weight-only ``_weight_int8pack_mm`` is 2-3x
    slower there, ``_int_mm`` and oneDNN's int8 paths 1.5-2x), and within ~20% of the
    fastest at M = 512 (oneDNN's engine, which keeps a second copy of the weights).

    That op quantises per tensor, so the rows are first scaled to max |x| = 1 and one
    anchor row spanning [-1, 1] is appended: the tensor's range is then always
    [-1, 1], every row gets the same fixed grid whatever the other rows hold, and the
    results are scaled back. So a row's result is bitwise the same alone or in any
    batch and on any thread count, and a NaN/Inf row gives NaN (fbgemm alone would
    return finite garbage for it, and spread an Inf to the other rows). The price is
    a few elementwise passes over ``x`` and ~10 small eager ops per call (tens of
    microseconds at M = 1: 2-3x the bare GEMV time of the small attention projections,
    ~1.1-1.3x for the MLP and LM head); a fused kernel would remove it.
    """

    packed_dtypes = {"weight": torch.int8, "weight_scale": torch.float32}

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__(in_features, out_features, device)
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self._anchor = None  # built with the pack, on the CPU
        # "gelu_tanh": the GELU that follows (an MLP's fc1) runs in the epilogue
        self.activation: str | None = None

    @classmethod
    def from_float(cls, linear: nn.Linear, name: str = "linear") -> Int8Linear:
        q, scale = quantize_per_channel(linear.weight, f"{name}.weight")
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        if linear.bias is not None:
            module.bias = linear.bias.detach().float().clone()
        module.pack(weight=q, weight_scale=scale)
        return module

    def _pack(self, weight, weight_scale):
        if not bool((weight_scale > 0).all()) or not bool(torch.isfinite(weight_scale).all()):
            raise ValueError("Int8Linear: weight_scale must be finite and > 0")
        anchor = torch.zeros(1 if self.in_features > 1 else 2, self.in_features)
        anchor.view(-1)[:2] = torch.tensor([-1.0, 1.0])  # rows spanning exactly [-1, 1]
        self._anchor = anchor
        return torch.ops.quantized.linear_prepack(_quantized_weight_tensor(weight, weight_scale),
                                                  None)

    def _unpack(self):
        q = torch.ops.quantized.linear_unpack(self._packed)[0]
        return {"weight": q.int_repr(), "weight_scale": q.q_per_channel_scales().float()}

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.unpacked()["weight_scale"]

    def dequantized_weight(self) -> torch.Tensor:
        plain = self.unpacked()
        return plain["weight"].float() * plain["weight_scale"][:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.in_features
        if (x.dtype is not torch.float32 or not x.is_cpu or x.dim() == 0 or x.shape[-1] != k
                or self._packed is None):
            self._check_input(x, torch.float32)  # raises, naming what is wrong
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        if m and k >= 2 and _scale_rows is not None and _rescale_rows is not None:
            # The common case, written out (61 calls per generated mu-330m token):
            # rows scaled into xs (+ the anchor row), the GEMM, y * r + bias (+ GELU).
            if not x2.is_contiguous():
                x2 = x2.contiguous()
            threads = torch.get_num_threads()
            xs = torch.empty(m + 1, k)
            r = torch.empty(m)
            _scale_rows(x2.numpy(), xs.numpy(), r.numpy(), threads)
            y = torch.ops.quantized.linear_dynamic(xs, self._packed, False)[:m]
            bias = self.bias
            _rescale_rows(y.numpy(), r.numpy(), None if bias is None else bias.numpy(),
                          self.activation == "gelu_tanh", threads)
            return y.view(*x.shape[:-1], self.out_features)
        if m == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        # Without the C++ passes (or for a single input feature), in eager ops: x / r lies
        # in [-1, 1]; rows with r = 0, NaN or Inf are zeroed so that they cannot disturb
        # the GEMM, and come back as bias (r = 0) or NaN (r NaN or Inf).
        if x2.numel() <= 1 << 16:  # decoding: fewest ops (each costs microseconds)
            r = x2.abs().amax(1, keepdim=True)
            xs = torch.cat([torch.div(x2, r).nan_to_num_(0.0, 0.0, 0.0), self._anchor])
        else:  # no [M, K] temporaries beyond xs: large ones cost page faults per call
            r = torch.maximum(x2.amax(1, keepdim=True), x2.amin(1, keepdim=True).neg_())
            xs = x2.new_empty(m + self._anchor.shape[0], self.in_features)
            torch.div(x2, r, out=xs[:m]).nan_to_num_(0.0, 0.0, 0.0)
            xs[m:] = self._anchor
        y = torch.ops.quantized.linear_dynamic(xs, self._packed, False)[:m]
        gelu = self.activation == "gelu_tanh"
        if _rescale_rows is not None:  # y * r + bias (+ GELU) in one pass, in place
            _rescale_rows(y.numpy(), r.view(m).numpy(),
                          None if self.bias is None else self.bias.numpy(), gelu,
                          torch.get_num_threads())
        else:
            y = y.mul_(r) if self.bias is None else torch.addcmul(self.bias, y, r)
            if gelu:
                y = F.gelu(y, approximate="tanh")
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", weight=int8 per-channel (fbgemm)"


def _mkldnn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class Bf16Linear(_PackedLinear):
    """``y = x @ weight.T + bias`` in bf16 (fp32 accumulation inside oneDNN).

    State: ``weight`` bf16 ``[N, K]``, ``bias`` bf16 ``[N]`` or None. Input and output
    bf16. The weight is held in oneDNN's packed layout (``mkldnn._linear_pointwise``,
    the path ``torch.compile`` uses on CPU): measured 1.3-1.7x faster than ``F.linear``
    on the same bf16 weights for the MLP, attention and LM head GEMVs (M = 1-8) and
    up to 1.1x for M = 512 GEMMs. On a CPU where oneDNN has no bf16 kernel the weight
    stays plain, for ``F.linear``.
    """

    packed_dtypes = {"weight": torch.bfloat16}
    _BATCH_HINT = 8  # oneDNN picks the packed layout for this M; fine for 1..512 rows

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__(in_features, out_features, device)
        bias_t = torch.zeros(out_features, dtype=torch.bfloat16, device=device) if bias else None
        self.register_buffer("bias", bias_t)

    @classmethod
    def from_float(cls, linear: nn.Linear, name: str = "linear") -> Bf16Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        if linear.bias is not None:
            module.bias = linear.bias.detach().to(torch.bfloat16).clone()
        module.pack(weight=linear.weight.detach().to(torch.bfloat16))
        return module

    def _pack(self, weight):
        if _mkldnn_bf16():
            return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), self._BATCH_HINT)
        return weight.clone()

    def _unpack(self):
        return {"weight": self._packed.to_dense() if self._packed.is_mkldnn
                else self._packed.clone()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, torch.bfloat16)
        if not self._packed.is_mkldnn:
            return F.linear(x, self._packed, self.bias)
        if x.shape[0] == 0 or x.numel() == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return super().extra_repr() + ", weight=bf16 (oneDNN packed)"


_MODULES = {"bf16": Bf16Linear, "int8": Int8Linear}
_EMBED_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}


def fuse_linears(*linears: nn.Module) -> nn.Module:
    """One layer computing ``cat([l(x) for l in linears], -1)`` (e.g. a fused QKV
    projection), of the same kind as the inputs: ``nn.Linear``, ``Bf16Linear`` or
    ``Int8Linear``. The weights are concatenated along the output dim, so per-channel
    int8 scales carry over unchanged, and since Int8Linear quantises each input row on
    its own grid the fused layer's outputs equal the separate layers' bitwise."""
    if not linears:
        raise ValueError("fuse_linears needs at least one layer")
    kinds = {type(m) for m in linears}
    if len(kinds) != 1 or not kinds <= {nn.Linear, Bf16Linear, Int8Linear}:
        raise ValueError(f"fuse_linears takes layers of one kind among nn.Linear, Bf16Linear, "
                         f"Int8Linear; got {sorted(k.__name__ for k in kinds)}")
    in_features = {m.in_features for m in linears}
    biased = {m.bias is not None for m in linears}
    if len(in_features) != 1 or len(biased) != 1:
        raise ValueError(f"fuse_linears: the layers must share in_features and all have a "
                         f"bias or none; got in_features {sorted(in_features)}, bias "
                         f"{sorted(biased)}")
    (cls,), (k,), (bias,) = kinds, in_features, biased
    n = sum(m.out_features for m in linears)
    b = torch.cat([m.bias.detach() for m in linears]) if bias else None
    if cls is nn.Linear:
        w = linears[0].weight
        fused = nn.Linear(k, n, bias=bias, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([m.weight for m in linears]))
            if bias:
                fused.bias.copy_(b)
        return fused.requires_grad_(linears[0].weight.requires_grad)
    fused = cls(k, n, bias=bias)
    if bias:
        fused.bias = b.clone()
    plains = [m.unpacked() for m in linears]
    fused.pack(**{name: torch.cat([p[name] for p in plains]) for name in cls.packed_dtypes})
    return fused


# -- conversion ---------------------------------------------------------------------------
def _check_dtype_arg(dtype) -> str:
    if dtype not in FORMATS:
        raise ValueError(f"dtype must be one of {FORMATS}, got {dtype!r}")
    return dtype


def weight_format(model: nn.Module) -> str | None:
    """The inference format of ``model``: "int8" / "bf16" when it holds Int8Linear /
    Bf16Linear modules, "fp32" when every parameter is fp32, else None (e.g. a model
    cast to bf16 with ``.to()``: a float model, not yet converted)."""
    for fmt, cls in _MODULES.items():
        if any(isinstance(m, cls) for m in model.modules()):
            return fmt
    if all(p.dtype == torch.float32 for p in model.parameters()):
        return "fp32"
    return None


def _convert(model: nn.Module, fmt: str, *, quantize: bool) -> None:
    """Swap modules/dtypes for ``fmt``. ``quantize=False`` builds the structure only:
    empty modules on the model's device (``meta`` when loading), filled by a state dict."""
    named = dict(model.named_modules())
    for name, module in named.items():
        if fmt in _MODULES and isinstance(module, nn.Linear):
            cls = _MODULES[fmt]
            if quantize:
                new = cls.from_float(module, name)
            else:
                new = cls(module.in_features, module.out_features, module.bias is not None,
                          device=module.weight.device)
            parent, _, child = name.rpartition(".")
            setattr(named[parent] if parent else model, child, new)
        else:
            dtype = _EMBED_DTYPE[fmt] if isinstance(module, nn.Embedding) else torch.float32
            for p in module.parameters(recurse=False):
                if p.dtype != dtype:  # a tied weight converted once stays shared
                    p.data = p.data.to(dtype)  # norms (and fp32 linears) in fp32


def _own_memory(model: nn.Module) -> None:
    """Give every tensor the converted model keeps (norms, biases, the embedding) its own
    memory. A model loaded with ``from_pretrained`` holds views of the memory-mapped
    weights file, and one surviving view keeps the whole mapping, float weights
    included, resident: mu-330m int8 otherwise serves with ~2.0 GB RSS instead of ~0.7."""
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for t in table.values():
                if t is not None:
                    t.data = t.data.clone()  # the same Parameter object: ties survive
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not name.startswith("_packed"):
                setattr(module, name, value.clone())


def to_inference(model: nn.Module, dtype: str = "int8", *, fuse: bool = True) -> nn.Module:
    """Convert ``model`` (on the CPU) in place to the inference format ``dtype``
    ("fp32", "bf16" or "int8"; see the module docstring) and return it in eval mode
    with gradients off; ``fuse`` also fuses each self-attention's q/k/v projections
    (:func:`fuse_projections`). A model already in ``dtype`` is left as it is; one in
    another inference format is refused (convert the float model instead)."""
    fmt = _check_dtype_arg(dtype)
    devices = {t.device.type for t in list(model.parameters()) + list(model.buffers())}
    if devices - {"cpu"}:
        raise ValueError(f"to_inference: the formats are for CPU inference; the model is "
                         f"on {sorted(devices)} (move it with .cpu() first)")
    current = weight_format(model)
    if current in _MODULES and current != fmt:
        raise ValueError(f"the model is already converted to {current}; convert the float "
                         f"model to {fmt!r} instead")
    if current != fmt:
        _convert(model, fmt, quantize=True)
        _own_memory(model)
    if fuse:
        fuse_projections(model)
    model.requires_grad_(False)
    return model.eval()


# -- fused projections --------------------------------------------------------------------
_FUSED = "qkv_proj"
_PARTS = ("q_proj", "k_proj", "v_proj")


def fuse_projections(model: nn.Module) -> nn.Module:
    """Replace each self-attention's q/k/v projections by one fused layer (``qkv_proj``):
    one GEMV instead of three per layer in decoding, where the small ones cost more in
    fixed per-call work than in weights. The weights move, they are not copied. An
    int8 MLP's first layer also takes over the GELU that follows it (its epilogue)."""
    for module in list(model.modules()):  # the loop edits the module tree
        if isinstance(module, SelfAttention) and _PARTS[0] in module._modules:
            fused = fuse_linears(*(module._modules[name] for name in _PARTS))
            for name in _PARTS:
                delattr(module, name)
            module.qkv_proj = fused
        if isinstance(module, GeluMLP) and isinstance(module.fc1, Int8Linear):
            module.fc1.activation = "gelu_tanh"
    return model


def _unfused_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every fused ``qkv_proj`` tensor split back into the
    q/k/v entries of the float model (files keep the float model's names)."""
    widths = {}
    for name, module in model.named_modules():
        if isinstance(module, SelfAttention) and _FUSED in module._modules:
            q = module.n_heads * module.head_dim
            kv = module.n_kv_heads * module.head_dim
            widths[f"{name}.{_FUSED}." if name else f"{_FUSED}."] = (q, kv, kv)
    out = {}
    for key, t in model.state_dict().items():
        prefix = next((p for p in widths if key.startswith(p)), None)
        if prefix is None:
            out[key] = t
            continue
        attr = key[len(prefix):]
        for part, piece in zip(_PARTS, t.split(widths[prefix], dim=0), strict=True):
            out[f"{prefix[:-len(_FUSED) - 1]}{part}.{attr}"] = piece
    return out


# -- files --------------------------------------------------------------------------------
def _split_tied(state: dict[str, torch.Tensor]):
    """(tensors stored once, {alias: stored name}) for tensors sharing storage."""
    stored, tied, seen = {}, {}, {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if ident in seen:
            tied[key] = seen[ident]
        else:
            seen[ident] = key
            stored[key] = t.detach().contiguous()
    return stored, tied


def save_inference(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write a model converted by :func:`to_inference` to ``directory``:
    ``model.safetensors`` (format and tied names in its metadata) and ``config.json``.
    The file is written under a temporary name and renamed into place."""
    fmt = weight_format(model)
    if fmt is None:
        raise ValueError(f"save_inference: the model is not in one of the formats {FORMATS}; "
                         f"convert it with to_inference first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stored, tied = _split_tied(_unfused_state_dict(model))
    tmp = directory / f".{WEIGHTS_NAME}.tmp-{os.getpid()}"
    save_file(stored, str(tmp), metadata={"format": "pt", FORMAT_KEY: fmt,
                                          TIED_KEY: json.dumps(tied, sort_keys=True)})
    _replace_atomically(tmp, directory / WEIGHTS_NAME)
    model.config.save(directory / CONFIG_NAME)


def _model_class(config_path: Path):
    from .decoder_only import DecoderOnlyLM
    from .encoder_decoder import EncoderDecoderLM

    try:
        arch = json.loads(config_path.read_text()).get("architecture")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{config_path}: not a readable JSON config ({e})") from None
    classes = {c.config_class.architecture: c for c in (EncoderDecoderLM, DecoderOnlyLM)}
    if arch not in classes:
        raise ValueError(f"{config_path}: architecture {arch!r} is not one of {sorted(classes)}")
    return classes[arch]


def load_inference(directory: str | os.PathLike, dtype: str | None = None) -> nn.Module:
    """Load a model saved by :func:`save_inference` (``dtype`` None or its format), or
    a float checkpoint saved by ``save_pretrained`` and convert it to ``dtype``."""
    directory = Path(directory)
    weights, config_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    for path in (config_path, weights):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (not a saved model?)")
    if dtype is not None:
        _check_dtype_arg(dtype)
    cls = _model_class(config_path)
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as err:
        raise ValueError(f"{weights}: not a readable safetensors file ({err})") from err
    stored_fmt = meta.get(FORMAT_KEY)
    if stored_fmt is None:  # a float checkpoint from save_pretrained
        if dtype is None:
            raise ValueError(f"{weights} is a float checkpoint (no {FORMAT_KEY!r} metadata): "
                             f"pass dtype= to convert it")
        return to_inference(cls.from_pretrained(directory), dtype)
    if stored_fmt not in FORMATS:
        raise ValueError(f"{weights}: unknown weight format {stored_fmt!r}; expected one of "
                         f"{FORMATS}")
    if dtype is not None and dtype != stored_fmt:
        raise ValueError(f"{directory} holds {stored_fmt} weights; it cannot be loaded as "
                         f"{dtype!r} (convert the float checkpoint instead)")
    try:
        tied = json.loads(meta.get(TIED_KEY, "{}"))
    except ValueError:
        raise ValueError(f"{weights}: malformed {TIED_KEY!r} metadata") from None

    config = cls.config_class.load(config_path)
    # Layer counts, names and widths against the file's header before anything is built
    # (a config claiming far more layers than stored fails at once): the float model's
    # check, on the header seen as that model's (int8 weights as floats, scales aside).
    header = read_safetensors_header(weights)
    float_view = {name: ("F32" if dtype == "I8" else dtype, shape)
                  for name, (dtype, shape) in header.items()
                  if not name.endswith(".weight_scale")}
    check_weights_header(cls, config, float_view, str(weights), str(config_path))
    with torch.device("meta"):
        model = cls(config)
    _convert(model, stored_fmt, quantize=False)
    expected = model.state_dict()
    with safe_open(str(weights), framework="pt") as f:
        # Tensors come as views of the memory-mapped file: checking them reads no data.
        stored = {key: f.get_tensor(key) for key in f.keys()}
        for alias, source in tied.items():
            if source not in stored or alias in stored:
                raise ValueError(f"{weights}: bad tie {alias!r} -> {source!r}")
        names = set(stored) | set(tied)
        missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
        if missing or unexpected:
            raise ValueError(f"{weights} does not match a {stored_fmt} {cls.__name__}: "
                             f"missing {missing[:8]}, unexpected {unexpected[:8]}")
        for key, got in stored.items():
            want = expected[key]
            if got.dtype != want.dtype or got.shape != want.shape:
                raise ValueError(f"{weights}: {key} is {got.dtype} {tuple(got.shape)}, "
                                 f"expected {want.dtype} {tuple(want.shape)} for the "
                                 f"{stored_fmt} format")
        # Module by module: packing copies the packed weights out of the file; the other
        # tensors are copied too (int8/bf16), so the mapping is released on return. fp32
        # keeps the views (nothing is packed; the file's pages are the model's memory).
        by_owner: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in stored.items():
            owner, _, attr = key.rpartition(".")
            module = model.get_submodule(owner)
            packed = isinstance(module, _PackedLinear) and attr in module.packed_dtypes
            by_owner.setdefault(owner, {})[attr] = t if packed or stored_fmt == "fp32" \
                else t.clone()
        del stored
        for owner, tensors in by_owner.items():
            model.get_submodule(owner).load_state_dict(tensors, strict=True, assign=True)
            tensors.clear()
    for alias, source in tied.items():  # the alias shares the source's parameter
        owner, _, attr = alias.rpartition(".")
        src_owner, _, src_attr = source.rpartition(".")
        setattr(model.get_submodule(owner), attr,
                getattr(model.get_submodule(src_owner), src_attr))
    fuse_projections(model)
    model.requires_grad_(False)
    return model.eval()


__all__ = ["FORMATS", "Int8Linear", "Bf16Linear", "fuse_linears", "fuse_projections",
           "quantize_per_channel", "to_inference", "weight_format", "save_inference",
           "load_inference"]
