"""Constants shared across the project: one home, so that no two copies can disagree."""

from __future__ import annotations

import torch

# Label value that marks a position without a target (as in torch's cross_entropy).
IGNORE_INDEX = -100

# Distillation divergences (DESIGN §4): the paper's reverse KL, the reference code's forward KL.
DIVERGENCES = ("reverse_kl", "forward_kl")

# log2(e): kernels run softmax in base 2 (exp2 is one instruction on GPUs).
LOG2E = 1.4426950408889634

# Head sizes every attention kernel promises (DESIGN §2); others run the reference.
SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128, 256)

# (atol, rtol) for a kernel result in a given dtype against the float64 reference, for
# O(1) values (attention outputs, losses). fp16/bf16 round the inputs and the P@V
# product; bf16 keeps 8 mantissa bits. Used by the tests and by `fastencdec selfcheck`.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-4, 2e-4),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
# Gradients accumulate over the sequence: looser.
GRAD_TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (5e-4, 5e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}
