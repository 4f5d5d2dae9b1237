"""CPU inference weight formats: ``to_inference(model, dtype)`` and their safetensors files.

``to_inference(model, "fp32" | "bf16" | "int8")`` converts a model in place for CPU
inference (eval mode, no gradients) and returns it:

``fp32``  every weight fp32; ``nn.Linear`` (MKL sgemm/sgemv). Activations fp32.
``bf16``  linear and embedding weights bf16 (the tied LM head shares the bf16
          embedding); ``nn.Linear`` on bf16 runs oneDNN's AVX512_BF16 GEMM/GEMV.
          Activations bf16; RMSNorm weights stay fp32 and the norm computes in fp32.
``int8``  every ``nn.Linear`` -- attention projections, MLP and the LM head (its own
          int8 copy; the embedding stays fp32 for the lookup) -- becomes an
          :class:`Int8Linear`: int8 weights, symmetric per output channel
          (``scale[n] = max_k |w[n, k]| / 127``, zero point 0), fp32 scales and bias.
          Activations stay fp32 in and out; inside, the rows are quantised dynamically
          (see :class:`Int8Linear` for the library path per row count).

The paths were chosen by measurement (``bench/bench_linear_cpu.py``): the fastest
path PyTorch ships for each format and regime whose error stays within the format's
own quantisation error.

``save_inference(model, dir)`` writes ``model.safetensors`` (int8 weights + scales
for ``int8``; tied tensors stored once) with the format in the file's metadata, plus
``config.json``; ``load_inference(dir)`` rebuilds the converted model from them
(never unpickling anything) and also converts a float checkpoint written by
``save_pretrained`` when given ``dtype``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .layers import RMSNorm
from .pretrained import CONFIG_NAME, WEIGHTS_NAME, _replace_atomically

FORMATS = ("fp32", "bf16", "int8")
FORMAT_KEY = "fastencdec_weight_format"  # safetensors metadata: the format
TIED_KEY = "fastencdec_tied"  # safetensors metadata: JSON {alias: stored name}
_ACT_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}

# Row counts M (= tokens in one call) up to this run the int8 GEMV path, above it the
# GEMM path; see Int8Linear.
INT8_GEMV_MAX_ROWS = 8


def _quantized_weight_tensor(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A per-channel qint8 tensor over ``q`` (PyTorch's quantized-tensor API, which
    its fbgemm linear ops take; it warns about a future deprecation, not an error)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch._make_per_channel_quantized_tensor(
            q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)


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


class Int8Linear(nn.Module):
    """``y = x @ (q * scale[:, None]).T + bias`` with int8 ``q`` per output channel.

    Buffers (what is saved): ``weight`` int8 ``[N, K]``, ``weight_scale`` fp32 ``[N]``,
    ``bias`` fp32 ``[N]`` or None. Input and output fp32, any leading dims.

    Two paths from the same stored weights, by the number of rows ``M`` in a call
    (measured in ``bench/bench_linear_cpu.py``):

    - ``M <= INT8_GEMV_MAX_ROWS`` (decoding): weight-only. The input is rounded to
      bf16 and PyTorch's int8-weight kernel (``_weight_int8pack_mm``) accumulates in
      fp32; scales and bias are applied in fp32. Memory-bound: it reads 1 byte per
      weight.
    - larger ``M`` (the encoder, cross-attention K/V of a whole input): dynamic
      quantisation. Each row is rounded to uint8 on its own symmetric grid
      (``max |x_row| / 127.5`` per step) and fbgemm's AVX512-VNNI/AVX2 GEMM
      (``quantized.linear_dynamic``, weights packed once, lazily) does int8 x uint8
      with int32 accumulation.

    Either way a row's result does not depend on the other rows (bitwise: a batch
    equals its rows alone, within one path) nor on the thread count; a row holding
    NaN gives NaN, one holding Inf non-finite values (as fp32 ``F.linear``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self._key = self._packed = self._unit_scales = self._anchor_rows = None

    @classmethod
    def from_float(cls, linear: nn.Linear, name: str = "linear") -> Int8Linear:
        q, scale = quantize_per_channel(linear.weight, f"{name}.weight")
        module = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     device=linear.weight.device)
        module.weight, module.weight_scale = q, scale
        if linear.bias is not None:
            module.bias = linear.bias.detach().float().clone()
        return module

    def __getstate__(self):  # copies/pickles repack lazily instead of copying the pack
        state = self.__dict__.copy()
        state["_key"] = state["_packed"] = state["_unit_scales"] = state["_anchor_rows"] = None
        return state

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]

    def _prepare(self) -> None:
        """Derived state, rebuilt only when a buffer was replaced or changed in place:
        the weight made contiguous and 64-byte aligned (the GEMV kernel's aligned loads
        need it; tensors loaded from a file may sit at any offset), the fbgemm pack
        dropped (rebuilt on the next GEMM)."""
        key = tuple((t.data_ptr(), t._version) for t in (self.weight, self.weight_scale))
        if self._key == key:
            return
        if self.weight.device.type != "cpu":
            raise ValueError(f"Int8Linear runs on the CPU; its weight is on "
                             f"{self.weight.device}")
        if self.weight.dtype != torch.int8 or self.weight.shape != (self.out_features,
                                                                    self.in_features):
            raise ValueError(f"Int8Linear: weight must be int8 [{self.out_features}, "
                             f"{self.in_features}], got {self.weight.dtype} "
                             f"{tuple(self.weight.shape)}")
        if not self.weight.is_contiguous() or self.weight.data_ptr() % 64:
            self.weight = self.weight.contiguous().clone()
        self._packed = None
        self._unit_scales = torch.ones(self.out_features, dtype=torch.bfloat16)
        self._anchor_rows = torch.zeros(1 if self.in_features > 1 else 2, self.in_features)
        self._anchor_rows.view(-1)[:2] = torch.tensor([-1.0, 1.0])  # spans exactly [-1, 1]
        self._key = tuple((t.data_ptr(), t._version) for t in (self.weight, self.weight_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.shape[-1:] != (self.in_features,):
            raise ValueError(f"Int8Linear: expected fp32 input [..., {self.in_features}], "
                             f"got {x.dtype} {tuple(x.shape)}")
        self._prepare()
        x2 = x.reshape(-1, self.in_features)
        m = x2.shape[0]
        if m == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        # The GEMV kernel reads 16 values of K at a time with aligned loads.
        gemv = m <= INT8_GEMV_MAX_ROWS and self.in_features % 16 == 0
        y = self._gemv(x2) if gemv else self._gemm(x2)
        return y.view(*x.shape[:-1], self.out_features)

    def _gemv(self, x2: torch.Tensor) -> torch.Tensor:
        """Weight-only: PyTorch's int8-weight kernel (vectorised for bf16 inputs; unit
        scales) streams the int8 weights once per 4 rows and accumulates in fp32; the
        fp32 scales and bias are applied after. The bf16 copy of x is a new (aligned)
        tensor."""
        x_bf16 = x2.to(torch.bfloat16, memory_format=torch.contiguous_format)
        acc = torch._weight_int8pack_mm(x_bf16, self.weight, self._unit_scales)
        if self.bias is None:
            return torch.mul(acc, self.weight_scale)
        return torch.addcmul(self.bias, acc, self.weight_scale)

    def _gemm(self, x2: torch.Tensor) -> torch.Tensor:
        """Dynamic quantisation: uint8 activations x int8 weights in fbgemm's VNNI GEMM.

        Per-row grids through a per-tensor API: each row is scaled to max |x| = 1 and
        anchor rows make the tensor's range exactly [-1, 1], so every row gets the same
        fixed uint8 grid whatever the other rows hold. A NaN/Inf row is zeroed here and
        becomes NaN when scaled back."""
        if self._packed is None:
            self._packed = torch.ops.quantized.linear_prepack(
                _quantized_weight_tensor(self.weight, self.weight_scale), None)
        m = x2.shape[0]
        r = torch.linalg.vector_norm(x2, float("inf"), dim=1, keepdim=True)
        r.clamp_(min=torch.finfo(torch.float32).tiny)
        xs = x2.new_empty(m + self._anchor_rows.shape[0], self.in_features)
        torch.div(x2, r, out=xs[:m]).nan_to_num_(0.0, 0.0, 0.0)
        xs[m:] = self._anchor_rows
        y = torch.ops.quantized.linear_dynamic(xs, self._packed, False)[:m]
        return y.mul_(r) if self.bias is None else torch.addcmul(self.bias, y, r)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight=int8 per-channel")


# -- conversion ---------------------------------------------------------------------------
def _check_dtype_arg(dtype) -> str:
    if dtype not in FORMATS:
        raise ValueError(f"dtype must be one of {FORMATS}, got {dtype!r}")
    return dtype


def weight_format(model: nn.Module) -> str | None:
    """The format a model's weights are in: "int8" if it holds Int8Linear modules,
    else "bf16"/"fp32" when every linear and embedding parameter has that dtype and
    every other parameter (the norms) is fp32; None for any other mix."""
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        return "int8"
    main = {id(p): p.dtype for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))
            for p in m.parameters(recurse=False)}
    rest = {p.dtype for p in model.parameters() if id(p) not in main}
    main = set(main.values())
    if rest <= {torch.float32}:
        for fmt in ("bf16", "fp32"):
            if main == {_ACT_DTYPE[fmt]}:
                return fmt
    return None


def _convert(model: nn.Module, fmt: str, *, quantize: bool) -> None:
    """Swap modules/dtypes for ``fmt``. ``quantize=False`` builds the structure only
    (empty Int8Linear buffers on the weights' device, e.g. ``meta``, for loading)."""
    named = dict(model.named_modules())
    for name, module in named.items():
        if fmt == "int8" and isinstance(module, nn.Linear):
            if quantize:
                new = Int8Linear.from_float(module, name)
            else:
                new = Int8Linear(module.in_features, module.out_features,
                                 module.bias is not None, device=module.weight.device)
            parent_name, _, child = name.rpartition(".")
            setattr(named[parent_name] if parent_name else model, child, new)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
            for p_name, p in list(module.named_parameters(recurse=False)):
                if p.dtype != dtype:  # a tied weight converted once stays shared
                    p.data = p.data.to(dtype)
        elif isinstance(module, RMSNorm) or fmt != "bf16":
            for p in module.parameters(recurse=False):
                p.data = p.data.float()  # norms compute in fp32 whatever the format


def to_inference(model: nn.Module, dtype: str = "int8") -> nn.Module:
    """Convert ``model`` (on the CPU) in place to the inference format ``dtype``
    ("fp32", "bf16" or "int8"; see the module docstring) and return it in eval mode
    with gradients off. An int8 model cannot be converted again."""
    fmt = _check_dtype_arg(dtype)
    devices = {t.device.type for t in list(model.parameters()) + list(model.buffers())}
    if devices - {"cpu"}:
        raise ValueError(f"to_inference: the formats are for CPU inference; the model is "
                         f"on {sorted(devices)} (move it with .cpu() first)")
    current = weight_format(model)
    if current == "int8" and fmt != "int8":
        raise ValueError(f"the model is already int8; convert to {fmt!r} from a float model")
    if current != fmt:
        _convert(model, fmt, quantize=True)
    model.requires_grad_(False)
    return model.eval()


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
        raise ValueError(f"save_inference: the model's weights are not in one of the formats "
                         f"{FORMATS}; convert it with to_inference first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stored, tied = _split_tied(model.state_dict())
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
    except (OSError, ValueError) as e:
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
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata() or {}
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
        if stored_fmt == "int8":
            raise ValueError(f"{directory} holds int8 weights; it cannot be loaded as {dtype!r}")
        return to_inference(load_inference(directory), dtype)
    try:
        tied = json.loads(meta.get(TIED_KEY, "{}"))
    except ValueError:
        raise ValueError(f"{weights}: malformed {TIED_KEY!r} metadata") from None

    config = cls.config_class.load(config_path)
    with torch.device("meta"):
        model = cls(config)
    _convert(model, stored_fmt, quantize=False)
    expected = model.state_dict()
    state = load_file(str(weights), device="cpu")
    for alias, source in tied.items():
        if source not in state:
            raise ValueError(f"{weights}: tied tensor {alias!r} names missing {source!r}")
        state[alias] = state[source]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights} does not match a {stored_fmt} {cls.__name__}: missing "
                         f"{missing[:8]}, unexpected {unexpected[:8]}")
    for key, want in expected.items():
        got = state[key]
        if got.dtype != want.dtype or got.shape != want.shape:
            raise ValueError(f"{weights}: {key} is {got.dtype} {tuple(got.shape)}, expected "
                             f"{want.dtype} {tuple(want.shape)} for the {stored_fmt} format")
    model.load_state_dict(state, strict=True, assign=True)
    for alias, source in tied.items():  # assign=True loaded the same tensor twice: re-share
        _set_tensor(model, alias, _get_tensor(model, source))
    model.requires_grad_(False)
    return model.eval()


def _get_tensor(model: nn.Module, key: str):
    owner, _, attr = key.rpartition(".")
    return getattr(model.get_submodule(owner), attr)


def _set_tensor(model: nn.Module, key: str, value) -> None:
    owner, _, attr = key.rpartition(".")
    setattr(model.get_submodule(owner), attr, value)


__all__ = ["FORMATS", "Int8Linear", "quantize_per_channel", "to_inference", "weight_format",
           "save_inference", "load_inference"]
