"""Backends: each module maps op names to :class:`~fastencdec.ops.dispatch.Kernel`
entries taking the canonical arguments of ``ops/schema.py``.

- ``reference``: plain PyTorch (``fastencdec.reference``), any dtype and device;
- ``cpp``: the C++ CPU kernels (``fastencdec._C``) and the chunked CPU loss;
- ``triton``: the Triton kernels in ``fastencdec.kernels`` (CUDA, or the CPU
  under ``TRITON_INTERPRET=1``).
"""
