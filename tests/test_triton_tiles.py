"""Every (BLOCK_M, BLOCK_N) of the GPU autotune lists, run under Triton's interpreter at
tiny fp32 shapes (forward + backward vs the float64 reference), so no tile shape a
GPU may pick is unverified. The interpreter otherwise runs fixed small tiles.

Each test sets the forward, dK/dV and dQ tiles at once (the i-th distinct shape of
each kernel's lists, cycling the shorter lists), with lengths that leave a partial
last tile, a left-padded mask (whole padding tiles skipped) and causal + RoPE.
"""

from __future__ import annotations

import pytest
import torch
from fastencdec.kernels import attention_setup

import fastencdec.ops as ops
import fastencdec.reference as ref
from _helpers import assert_close, padding_mask, rand

F32 = torch.float32
KINDS = ("fwd", "dkdv", "dq")


def _distinct_tiles(kind: str) -> list[tuple[int, int, str]]:
    """(BLOCK_M, BLOCK_N, head-dim class) of every config of ``kind``, each shape once
    (a class it appears in: the head_dim it is tried at)."""
    seen, out = set(), []
    for table in (attention_setup.GPU_CONFIGS, attention_setup.FP32_GPU_CONFIGS):
        for (k, size), configs in table.items():
            for bm, bn, *_ in configs:
                if k == kind and (bm, bn) not in seen:
                    seen.add((bm, bn))
                    out.append((bm, bn, size))
    if kind == "fwd" and attention_setup.WIDE_FWD[:2] not in seen:
        out.append((*attention_setup.WIDE_FWD[:2], "small"))
    return out


TILES = {kind: _distinct_tiles(kind) for kind in KINDS}
N_CASES = max(len(t) for t in TILES.values())
HEAD_DIM = {"small": 32, "medium": 80, "large": 256}


def test_lists_are_covered():
    """The cycling below visits every distinct tile of every kernel."""
    for kind in KINDS:
        visited = {TILES[kind][i % len(TILES[kind])][:2] for i in range(N_CASES)}
        assert visited == {t[:2] for t in TILES[kind]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="tiles are autotuned on a GPU")
@pytest.mark.parametrize("index", range(N_CASES))
def test_gpu_tile_shapes_under_interpreter(seed, backend, monkeypatch, one_thread, index):
    backend("triton")
    picks = {kind: TILES[kind][index % len(TILES[kind])] for kind in KINDS}
    monkeypatch.setattr(attention_setup, "INTERPRETER_BLOCKS",
                        {kind: pick[:2] for kind, pick in picks.items()})
    # the forward's class decides the head_dim: the forward tile is the one that varies most
    head_dim = HEAD_DIM[picks["fwd"][2]]
    biggest = max(max(p[0], p[1]) for p in picks.values())
    batch, seq_len = 2, biggest + 19  # a partial last tile for every kernel
    q = rand(batch, seq_len, 2, head_dim)
    k = rand(batch, seq_len, 1, head_dim)
    v = rand(batch, seq_len, 1, head_dim)
    mask = padding_mask(batch, seq_len).flip(1)  # left padding
    mask[0] = True
    grad_out = rand(batch, seq_len, 2, head_dim)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ops.self_attention(*leaves, causal=True, key_padding_mask=mask, positions=3)
    out.backward(grad_out)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    expected = ref.self_attention(*ref_leaves, causal=True, key_padding_mask=mask, positions=3)
    expected.backward(grad_out.double())
    assert_close(out, expected, F32)
    for name, got, want in zip("qkv", leaves, ref_leaves, strict=True):
        assert_close(got.grad, want.grad, F32, grad=True, name=f"d{name} with tiles {picks}")
