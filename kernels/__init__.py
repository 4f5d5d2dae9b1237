"""Triton kernels (GPU, or the CPU under TRITON_INTERPRET=1). No model code here.

Installed as ``fastencdec.kernels``; importing a kernel module needs Triton.
"""
