"""CPU inference weight formats: ``to_inference(model, dtype)`` and their safetensors files.

``to_inference(model, "fp32" | "bf16" | "int8")`` converts a model in place for CPU
inference (eval mode, no gradients) and returns it:

``fp32``  every weight fp32, ``nn.Linear`` (MKL sgemm/sgemv); the LM head stays tied.
          Activations fp32.
``bf16``  every ``nn.Linear`` (attention, MLP and the LM head) becomes a
          :class:`Bf16Linear`: bf16 weights held only in the C++ kernel's packed layout
          (AVX512_BF16 where present), bf16 bias, fp32 sums. Activations bf16.
``int8``  every ``nn.Linear`` (the LM head too) becomes an :class:`Int8Linear`: int8
          weights, symmetric per output channel (``scale[n] = max_k |w[n, k]| / 127``,
          zero point 0), held only in the C++ kernel's packed layout; fp32 scales and
          bias. Activations fp32 in and out; each row is quantised to int8 on the fly
          (see :class:`Int8Linear`).

A tied model's embedding then reads its vectors from the packed LM head
(:class:`PackedEmbedding`: int8 rows dequantised, bf16 rows as stored), so the
vocabulary table is held once; an untied model keeps a float embedding (fp32 for int8,
bf16 for bf16).

In every format RMSNorm weights stay fp32 and the norm computes in fp32. The paths were
chosen by measurement (``bench/bench_linear_cpu.py``) at decode (M = 1-8 rows) and
encoder (M = 512) sizes: fp32 runs the fastest path PyTorch ships (MKL); int8 and bf16
run fastencdec's own kernels, which beat PyTorch's int8 paths and oneDNN's bf16 GEMV
at decode sizes and match them at M = 512 (see :class:`Int8Linear`, :class:`Bf16Linear`).
A packed weight is the only copy (no plain weight is kept beside it): ``state_dict()``
unpacks it, loading packs it.

``save_inference(model, dir)`` writes ``model.safetensors`` (int8 weights + scales for
``int8``; a tied head once, as ``embed.*``) with the format in the file's metadata, plus
``config.json``;
``load_inference(dir)`` rebuilds the converted model (never unpickling anything) and
also converts a float checkpoint written by ``save_pretrained`` when given ``dtype``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

# safetensors metadata keys, defined once (torch-free) with the runtime's reader
from ..runtime.weights import FORMAT_KEY, TIED_KEY
from .layers import GeluMLP, SelfAttention
from .meta_init import on_meta
from .pretrained import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    _replace_atomically,
    check_weights_header,
    read_safetensors_header,
)

FORMATS = ("fp32", "bf16", "int8")

try:  # Int8Linear's and Bf16Linear's kernels
    from fastencdec._C import bf16_linear as _bf16_linear
    from fastencdec._C import int8_linear as _int8_linear
except ImportError:  # pragma: no cover - the compiled module is part of the package
    _int8_linear = _bf16_linear = None
INT8_MAX_IN_FEATURES = 65536  # int32 sums stay exact (and the kernel's u8 offset fits)


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


_PACK_VERSION = [0]  # bumped on every pack: plans holding packed views rebuild (decoder_step)


def pack_version() -> int:
    return _PACK_VERSION[0]


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
        _PACK_VERSION[0] += 1

    def unpacked(self) -> dict[str, torch.Tensor]:
        if self._packed is None:  # built empty (e.g. on meta to be loaded), never packed
            return {name: torch.empty(self._shape(name), dtype=dtype, device=self._empty_device)
                    for name, dtype in self.packed_dtypes.items()}
        return self._unpack()

    @property
    def weight(self) -> torch.Tensor:
        """The plain weight ``[out, in]`` (unpacked: a new tensor on every access)."""
        return self.unpacked()["weight"]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Weight rows ``W[ids]`` ``[len(ids), in_features]`` (``ids`` int64 ``[T]``, in
        range) gathered from the panels ``[N / 32, K / g, 32, g]``, in the packed dtype:
        a tied LM head's rows are the token embedding (:class:`PackedEmbedding`)."""
        if self._packed is None:
            self._check_input(torch.empty(0, self.in_features), torch.float32)  # raises
        panels = self._packed["panels"]
        picked = panels[ids // 32, :, ids % 32]  # [T, K / g, g]
        return picked.reshape(ids.shape[0], panels.shape[1] * panels.shape[3])[
            :, :self.in_features]

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


def _inference_only(module: nn.Module, x: torch.Tensor) -> None:
    """The packed layers run C++ kernels: no autograd, no torch.compile tracing."""
    name = type(module).__name__
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{name} is inference-only (no gradient flows through packed "
                           f"weights); call it under torch.no_grad() or train the float model")
    if torch.compiler.is_compiling():
        raise RuntimeError(f"{name} runs a C++ kernel that torch.compile cannot trace; an "
                           f"int8/bf16 model's decode step already runs in one C++ call "
                           f"(compile fp32 models)")


class Int8Linear(_PackedLinear):
    """``y = x @ (q * weight_scale[:, None]).T + bias`` with int8 ``q`` per output channel.

    State: ``weight`` int8 ``[N, K]`` and ``weight_scale`` fp32 ``[N]`` (both held only
    in the kernel's packed layout), ``bias`` fp32 ``[N]`` or None. Input and output
    fp32, any leading dims.

    Each row of ``x`` is quantised on its own symmetric grid (``s = max |x_row| / 127``,
    round half to even), multiplied by the int8 weights with exact int32 sums, and
    ``y = sum * s * weight_scale[n] + bias[n]`` (then GELU-tanh when ``activation`` is
    "gelu_tanh": an MLP's first layer takes over the activation). One C++ call does it
    all (``_C.int8_linear``: AVX512-VNNI, AVX-512/AVX2 or NEON, chosen at run time), for
    decoding (weight streaming) and for the encoder (a blocked GEMM) alike. Since the
    sums are exact, a row's result is bitwise the same alone or in any batch and on any
    thread count; a zero row gives the bias, a row holding NaN/Inf gives NaN.

    Why our own kernel and not PyTorch's int8 linear paths (``bench/bench_linear_cpu.py``
    and ``bench/README.md``): fbgemm's dynamic linear quantises per tensor (rows would
    depend on each other) and costs ~100 us of fixed work per call at M = 1; the
    weights here are packed in panels of 32 output columns read front to back (128
    bytes per 4 k), which streams at the machine's read bandwidth, and the row quantisation
    and epilogue fuse into the same pass.
    """

    packed_dtypes = {"weight": torch.int8, "weight_scale": torch.float32}

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__(in_features, out_features, device)
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
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
        if self.in_features > INT8_MAX_IN_FEATURES:
            raise ValueError(f"Int8Linear: in_features {self.in_features} is above "
                             f"{INT8_MAX_IN_FEATURES} (the int32 sums would overflow)")
        n, k = weight.shape
        n_pad, k_pad = -(-n // 32) * 32, -(-k // 4) * 4
        plain = torch.zeros(n_pad, k_pad, dtype=torch.int8)
        plain[:n, :k] = weight
        # panels[p, q, c, r] = W[32 p + c, 4 q + r]: 32 output columns, 4 k per 128 bytes
        panels = plain.view(n_pad // 32, 32, k_pad // 4, 4).permute(0, 2, 1, 3).contiguous()
        scale = weight_scale.clone()
        return {"panels": panels, "weight_scale": scale,
                # numpy views for the C++ call (the tensors above own the memory)
                "args": (panels.numpy(), scale.numpy())}

    def _unpack(self):
        panels = self._packed["panels"]
        n, k = self.out_features, self.in_features
        plain = panels.permute(0, 2, 1, 3).reshape(panels.shape[0] * 32, panels.shape[1] * 4)
        return {"weight": plain[:n, :k].clone(),
                "weight_scale": self._packed["weight_scale"].clone()}

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.unpacked()["weight_scale"]

    def dequantized_weight(self) -> torch.Tensor:
        plain = self.unpacked()
        return plain["weight"].float() * plain["weight_scale"][:, None]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantised weight rows ``W[ids] * weight_scale[ids]`` (fp32, as
        :meth:`dequantized_weight`'s rows)."""
        return super().rows(ids).float() * self._packed["weight_scale"][ids, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.in_features
        if (x.dtype is not torch.float32 or not x.is_cpu or x.dim() == 0 or x.shape[-1] != k
                or self._packed is None):
            self._check_input(x, torch.float32)  # raises, naming what is wrong
        _inference_only(self, x)
        x2 = x.detach().reshape(-1, k)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = torch.empty(x2.shape[0], self.out_features)
        gelu = self.activation == "gelu_tanh"
        if _int8_linear is None:  # pragma: no cover - the compiled module is part of the package
            y = self.forward_eager(x2)
        elif x2.shape[0]:
            bias = self.bias
            _int8_linear(x2.numpy(), *self._packed["args"],
                         None if bias is None else bias.numpy(), y.numpy(), gelu,
                         torch.get_num_threads())
        return y.view(*x.shape[:-1], self.out_features)

    def forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        """The same computation in torch ops (a reference; the kernel is the fast path):
        ``x`` ``[M, K]`` fp32."""
        plain = self.unpacked()
        amax = x.abs().amax(1, keepdim=True)
        finite = torch.isfinite(x).all(1, keepdim=True)
        ok = finite & (amax > 0)
        inv = torch.full_like(amax, 127.0) / amax  # (127.0 / t is 127 * (1 / t): 2 roundings)
        q = torch.where(ok, torch.round(x * inv), 0.0).clamp_(-127, 127)
        s = torch.where(finite, amax / 127.0, float("nan"))
        acc = (q.double() @ plain["weight"].double().t()).float()  # exact: |sums| < 2^31
        y = acc * (s * plain["weight_scale"]) + (0.0 if self.bias is None else self.bias)
        return F.gelu(y, approximate="tanh") if self.activation == "gelu_tanh" else y

    def extra_repr(self) -> str:
        return super().extra_repr() + ", weight=int8 per-channel (32-column panels)"


class Bf16Linear(_PackedLinear):
    """``y = x @ weight.T + bias`` with bf16 ``x``, ``weight``, ``bias`` and ``y``.

    State: ``weight`` bf16 ``[N, K]`` (held only in the kernel's packed layout),
    ``bias`` bf16 ``[N]`` or None. Input and output bf16, any leading dims.

    Each product is exact in fp32 and the sums run in fp32; the bias is added (and the
    GELU-tanh applied when ``activation`` is "gelu_tanh": an MLP's first layer takes
    over the activation) in fp32 before the one rounding to bf16. One C++ call does it
    all (``_C.bf16_linear``: AVX512_BF16 ``vdpbf16ps`` where the CPU has it, else the
    same sums in the same order through FMAs on AVX-512, AVX2, NEON or scalar code), for
    decoding and the encoder alike; a row's result is bitwise the same alone or in any
    batch and on any thread count, and its sums are bitwise the same on every ISA path.

    Why our own kernel and not oneDNN's bf16 linear (``bench/bench_linear_cpu.py``): the
    weights are packed like :class:`Int8Linear`'s, in panels of 32 output columns read
    front to back, which streams faster than oneDNN's packed GEMV at M = 1-8 (1.2-2.6x
    on mu-330m's layers, measured) and matches it at M = 512; and the one-call decode
    step (``models/decoder_step.py``) runs the same kernel.
    """

    packed_dtypes = {"weight": torch.bfloat16}

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__(in_features, out_features, device)
        bias_t = torch.zeros(out_features, dtype=torch.bfloat16, device=device) if bias else None
        self.register_buffer("bias", bias_t)
        self.activation: str | None = None  # "gelu_tanh": fused into the epilogue

    @classmethod
    def from_float(cls, linear: nn.Linear, name: str = "linear") -> Bf16Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        if linear.bias is not None:
            module.bias = linear.bias.detach().to(torch.bfloat16).clone()
        module.pack(weight=linear.weight.detach().to(torch.bfloat16))
        return module

    def _pack(self, weight):
        n, k = weight.shape
        n_pad, k_pad = -(-n // 32) * 32, -(-k // 2) * 2
        plain = torch.zeros(n_pad, k_pad, dtype=torch.bfloat16)
        plain[:n, :k] = weight
        # panels[p, q, c, r] = W[32 p + c, 2 q + r]: 32 output columns, 2 k per 128 bytes
        panels = plain.view(n_pad // 32, 32, k_pad // 2, 2).permute(0, 2, 1, 3).contiguous()
        return {"panels": panels, "args": (panels.view(torch.uint16).numpy(),)}

    def _unpack(self):
        panels = self._packed["panels"]
        plain = panels.permute(0, 2, 1, 3).reshape(panels.shape[0] * 32, panels.shape[1] * 2)
        return {"weight": plain[:self.out_features, :self.in_features].clone()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.in_features
        if (x.dtype is not torch.bfloat16 or not x.is_cpu or x.dim() == 0 or x.shape[-1] != k
                or self._packed is None):
            self._check_input(x, torch.bfloat16)  # raises, naming what is wrong
        _inference_only(self, x)
        x2 = x.detach().reshape(-1, k)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = torch.empty(x2.shape[0], self.out_features, dtype=torch.bfloat16)
        if _bf16_linear is None:  # pragma: no cover - the compiled module is part of the package
            y = self.forward_eager(x2)
        elif x2.shape[0]:
            bias = self.bias
            _bf16_linear(x2.view(torch.uint16).numpy(), *self._packed["args"],
                         None if bias is None else bias.view(torch.uint16).numpy(),
                         y.view(torch.uint16).numpy(), self.activation == "gelu_tanh",
                         torch.get_num_threads())
        return y.view(*x.shape[:-1], self.out_features)

    def forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        """The same computation in torch ops, in float64 (a reference: the kernel sums in
        fp32, so results agree to fp32 rounding before the final bf16 rounding):
        ``x`` ``[M, K]`` bf16."""
        y = x.double() @ self.unpacked()["weight"].double().t()
        if self.bias is not None:
            y = y + self.bias.double()
        if self.activation == "gelu_tanh":
            y = F.gelu(y, approximate="tanh")
        return y.to(torch.bfloat16)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", weight=bf16 (32-column panels)"


_MODULES = {"bf16": Bf16Linear, "int8": Int8Linear}
_EMBED_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}


class PackedEmbedding(nn.Module):
    """The token embedding of a tied int8/bf16 model, read from its LM head's packed
    rows (:meth:`_PackedLinear.rows`): the vocabulary table is held once, in the LM
    head's format, instead of a second float copy (mu-330m int8: 126 MiB less resident
    memory). int8 rows come back dequantised to fp32 (``q * scale`` per token: the
    embedding is quantised like the head, as CTranslate2's int8 does), bf16 rows as
    stored, which equal the float model's embedding cast to bf16.

    The head is referenced, not registered as a submodule: it owns the weights and the
    state dict holds them once, under ``lm_head.*`` (files store them as ``embed.*``,
    the name a tied float checkpoint uses)."""

    def __init__(self, head: _PackedLinear, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.dtype, self.device = dtype, torch.device("cpu")
        self.__dict__["head"] = head  # not a submodule (see above)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() \
                or ids.dtype is torch.bool:
            raise TypeError(f"PackedEmbedding: ids must be an integer tensor, got "
                            f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        flat = ids.reshape(-1).long()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"PackedEmbedding: ids must lie in [0, {self.num_embeddings}), "
                             f"got values in [{int(flat.min())}, {int(flat.max())}]")
        return self.head.rows(flat).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows of the LM head "
                f"({type(self.head).__name__})")


def _tied_owners(model: nn.Module):
    """(name, module) of each language model in ``model`` whose ``embed`` is tied to its
    ``lm_head`` (``model`` itself, or e.g. a vision-language model's ``lm``)."""
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if ("embed" in module._modules and "lm_head" in module._modules
                and getattr(config, "tie_embeddings", False)):
            yield name, module


def _share_embedding_with_head(model: nn.Module, fmt: str) -> None:
    """Replace the float embedding of each tied language model by its packed LM head's
    rows (int8/bf16 formats)."""
    for _, module in list(_tied_owners(model)):
        head = module._modules["lm_head"]
        if isinstance(head, _MODULES[fmt]) and isinstance(module._modules["embed"], nn.Embedding):
            module.embed = PackedEmbedding(head, _EMBED_DTYPE[fmt])


def _file_names(model: nn.Module) -> dict[str, str]:
    """{state-dict prefix: file prefix}: a packed-tied head's tensors are stored under the
    embedding's name (``lm_head.`` -> ``embed.``), as in a tied float checkpoint."""
    out = {}
    for name, module in _tied_owners(model):
        if isinstance(module._modules["embed"], PackedEmbedding):
            prefix = f"{name}." if name else ""
            out[f"{prefix}lm_head."] = f"{prefix}embed."
    return out


def _rename(state: dict, names: dict[str, str]) -> dict:
    """``state`` with each key starting with a prefix of ``names`` renamed."""
    out = {}
    for key, value in state.items():
        prefix = next((p for p in names if key.startswith(p)), None)
        out[key if prefix is None else names[prefix] + key[len(prefix):]] = value
    return out


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
        if fmt in _MODULES:
            _share_embedding_with_head(model, fmt)
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
    int8/bf16 MLP's first layer also takes over the GELU that follows it (its epilogue)."""
    for module in list(model.modules()):  # the loop edits the module tree
        if isinstance(module, SelfAttention) and _PARTS[0] in module._modules:
            fused = fuse_linears(*(module._modules[name] for name in _PARTS))
            for name in _PARTS:
                delattr(module, name)
            module.qkv_proj = fused
        if isinstance(module, GeluMLP) and isinstance(module.fc1, (Int8Linear, Bf16Linear)):
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
    stored, tied = _split_tied(_rename(_unfused_state_dict(model), _file_names(model)))
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


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16, "I8": torch.int8, "U8": torch.uint8,
                       "I16": torch.int16, "U16": torch.uint16, "I32": torch.int32,
                       "I64": torch.int64, "BOOL": torch.bool}


@contextlib.contextmanager
def _stored_tensors(weights: Path, *, packed: bool):
    """``({name: (torch dtype, shape)}, read(name) -> tensor)`` of a safetensors file.
    ``packed`` (int8/bf16 files): each tensor is read into memory of its own, never
    through a mapping of the file (whose touched pages would stay resident beside the
    packed copies until it closes: a load would peak at twice the weights); otherwise
    tensors are views of the memory-mapped file."""
    from ..runtime.safetensors_file import SafetensorsFile

    with SafetensorsFile(weights) as f:
        stored = {name: (_SAFETENSORS_DTYPES[e.dtype], e.shape) for name, e in f.entries.items()}
        if packed:
            def read(name):
                array = f.read(name)
                if stored[name][0] is torch.bfloat16:  # the bits, through a dtype every torch has
                    return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
                return torch.from_numpy(array)

            yield stored, read
            return
    with safe_open(str(weights), framework="pt") as mapped:
        yield stored, mapped.get_tensor


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
    from ..runtime.safetensors_file import SafetensorsFile

    with SafetensorsFile(weights) as f:  # the header only
        meta = f.metadata
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
        tied = None
    if not isinstance(tied, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise ValueError(f"{weights}: malformed {TIED_KEY!r} metadata")

    config = cls.config_class.load(config_path)
    # Layer counts, names and widths against the file's header before anything is built
    # (a config claiming far more layers than stored fails at once): the float model's
    # check, on the header seen as that model's (int8 weights as floats, scales aside).
    header = read_safetensors_header(weights)
    float_view = {name: ("F32" if dtype == "I8" else dtype, shape)
                  for name, (dtype, shape) in header.items()
                  if not name.endswith(".weight_scale")}
    check_weights_header(cls, config, float_view, str(weights), str(config_path))
    with on_meta():
        model = cls(config)
    _convert(model, stored_fmt, quantize=False)
    if stored_fmt in _MODULES:  # a tied head stored once, as embed.* (files before: twice)
        for name, module in list(_tied_owners(model)):
            if f"{name}.lm_head.weight".lstrip(".") not in header:
                _share_embedding_with_head(module, stored_fmt)
    names = _file_names(model)
    expected = _rename(model.state_dict(), names)
    to_model = {file: key for key, file in names.items()}
    with _stored_tensors(weights, packed=stored_fmt in _MODULES) as (stored, read):
        for alias, source in tied.items():
            if source not in stored or alias in stored:
                raise ValueError(f"{weights}: bad tie {alias!r} -> {source!r}")
        names = set(stored) | set(tied)
        missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
        if missing or unexpected:
            raise ValueError(f"{weights} does not match a {stored_fmt} {cls.__name__}: "
                             f"missing {missing[:8]}, unexpected {unexpected[:8]}")
        for key, (got_dtype, got_shape) in stored.items():
            want = expected[key]
            if got_dtype != want.dtype or got_shape != tuple(want.shape):
                raise ValueError(f"{weights}: {key} is {got_dtype} {got_shape}, "
                                 f"expected {want.dtype} {tuple(want.shape)} for the "
                                 f"{stored_fmt} format")
        # Module by module, reading only that module's tensors: int8/bf16 ones are read
        # into memory of their own (packing then copies the packed weights out and the
        # rest is kept), so at most one module's plain tensors exist beside the packed
        # model; fp32 keeps views of the memory-mapped file (nothing is packed; the file's
        # pages are the model's memory).
        by_owner: dict[str, dict[str, str]] = {}
        for file_key, model_key in _rename({k: k for k in stored}, to_model).items():
            owner, _, attr = file_key.rpartition(".")
            by_owner.setdefault(owner, {})[attr] = model_key
        for owner, attrs in by_owner.items():
            tensors = {attr: read(key) for attr, key in attrs.items()}
            model.get_submodule(owner).load_state_dict(tensors, strict=True, assign=True)
            tensors.clear()
    for alias, source in tied.items():  # the alias shares the source's parameter
        owner, _, attr = alias.rpartition(".")
        src_owner, _, src_attr = source.rpartition(".")
        setattr(model.get_submodule(owner), attr,
                getattr(model.get_submodule(src_owner), src_attr))
    fuse_projections(model)
    model.requires_grad_(False)
    if stored_fmt in _MODULES:
        _return_freed_memory()
    return model.eval()


def _return_freed_memory() -> None:
    """Hand the heap pages freed while packing back to the system: glibc keeps them
    (~175 MiB after loading mu-330m int8, counted in the process's resident memory)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to do
        pass


__all__ = ["FORMATS", "Int8Linear", "Bf16Linear", "PackedEmbedding", "fuse_linears",
           "fuse_projections",
           "quantize_per_channel", "to_inference", "weight_format", "save_inference",
           "load_inference"]
