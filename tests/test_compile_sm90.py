"""Every Triton kernel of ``fastencdec.kernels`` compiles for Hopper (sm_90) and Ampere
(sm_80) on this CPU-only machine, with the ptxas of the Triton wheel
(``bench/compile_sm90.py``): no spills in 16-bit kernels, shared memory within 227 KiB,
every autotune config. The interpreter the other tests use accepts code the compiler
rejects (an annotated ``tl.constexpr`` module global read in a kernel crashed every
decode step on the first GPU run): this is the check that sees it.

CI compiles a subset (one config per kernel, the worst-case variants, ~25 compiles);
``FASTENCDEC_COMPILE_FULL=1`` compiles everything (every config, dtype, head_dim and
variant; several minutes per process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "bench" / "compile_sm90.py"
FULL_ENV_VAR = "FASTENCDEC_COMPILE_FULL"


def _nvidia_tools_present() -> bool:
    try:
        from triton.backends.nvidia import compiler as nv
    except Exception:
        return False
    bin_dir = Path(nv.__file__).parent / "bin"
    return (bin_dir / "cuobjdump").exists() and any(bin_dir.glob("ptxas*"))


pytestmark = pytest.mark.skipif(not _nvidia_tools_present(),
                                reason="this Triton has no NVIDIA backend/ptxas")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Run the compile tool once (in a process without TRITON_INTERPRET) and load its
    JSON record."""
    out = tmp_path_factory.mktemp("compile") / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, str(TOOL), "--out", str(out)]
    if os.environ.get(FULL_ENV_VAR) == "1":
        args.append("--full")
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=3000,
                          cwd=ROOT)
    assert out.exists(), f"no result (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                         f"{proc.stderr[-3000:]}"
    record = json.loads(out.read_text())
    record["exit_code"] = proc.returncode
    record["output"] = proc.stdout
    return record


def test_every_kernel_compiles_without_spills_within_shared_memory(compiled):
    assert compiled["problems"] == [], "\n".join(compiled["problems"])
    assert compiled["exit_code"] == 0, compiled["output"][-3000:]
    rows = compiled["rows"]
    assert rows and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert r["regs"] and 0 < r["regs"] <= 255
        assert r["regs"] == r["regs_cuobjdump"], "ptxas and cuobjdump disagree on registers"
        if r["arch"] == "sm_90" and r["dtype"] in ("bfloat16", "float16"):
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
            assert r["smem"] <= 227 * 1024, r


def test_every_launched_kernel_is_covered(compiled):
    """Each ``_*_kernel`` JIT function of the package was compiled, for sm_90 and (at
    least the forward and decode kernels) for sm_80."""
    names = set(compiled["launchable_kernels"])
    assert {"_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel",
            "_append_kv_cache_kernel", "_decode_attention_split_kernel", "_rope_kernel",
            "_distill_rows_kernel"} <= names
    by_arch = {arch: {r["kernel"] for r in compiled["rows"] if r["arch"] == arch}
               for arch in ("sm_90", "sm_80")}
    assert names <= by_arch["sm_90"]
    assert {"_attention_fwd_kernel", "_decode_attention_split_kernel"} <= by_arch["sm_80"]


def test_hopper_tile_fits_at_head_dim_128(compiled):
    """With RoPE out of the loop the 128x128, 3-stage forward tile fits at D=128."""
    wide = [r for r in compiled["rows"] if r["kernel"] == "_attention_fwd_kernel"
            and r["arch"] == "sm_90" and r["head_dim"] == 128
            and "BLOCK_M=128 BLOCK_N=128" in r["config"] and r["config"].endswith("w8 s3")]
    assert wide, "no 128x128x3 forward config was compiled at D=128"
    assert all(r["smem"] <= 227 * 1024 and r["spill_stores"] == 0 for r in wide)


def test_annotated_constexpr_global_is_caught(compiled):
    """The regression check: ``X: tl.constexpr = ...`` read in a kernel fails to compile,
    ``X = tl.constexpr(...)`` compiles."""
    check = compiled["constexpr_global_check"]
    assert check["annotated_kernel"] is not None and "ANNOTATED" in check["annotated_kernel"]
    assert check["instance_kernel"] is None


# ---- the SASS/ptxas parsers on fixed text (no compiler needed) ------------------------

sys.path.insert(0, str(ROOT / "bench"))


def test_sass_loop_parser():
    import compile_sm90 as tool

    text = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;           /* 0x000 */
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;   /* 0x0 */
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;          /* 0x0 */
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;  /* 0x0 */
        /*0040*/               @P0 BRA 0x10 ;                      /* 0x0 */
        /*0050*/                   FADD R3, R3, R4 ;                /* 0x0 */
        /*0060*/               @P1 BRA 0x50 ;                      /* 0x0 */
        /*0070*/                   EXIT ;                           /* 0x0 */
    """
    loops = tool.sass_loops(text)
    # the loop at 0x10 has 4 instructions, 2 MMAs; the one at 0x50 has no MMA: not listed
    assert loops == [{"start": 0x10, "instructions": 4, "mma": 2}]


def test_ptxas_log_parser():
    import compile_sm90 as tool

    log = ("ptxas info    : Function properties for k\n"
           "    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert tool.parse_ptxas(log) == {"regs": 255, "spill_stores": 12, "spill_loads": 8,
                                     "stack": 16}
    assert tool.parse_ptxas("") == {"regs": None, "spill_stores": None, "spill_loads": None,
                                    "stack": None}
