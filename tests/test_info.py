"""Packaging and the ``fastencdec info`` report."""

import subprocess
import sys

import fastencdec


def test_kernels_package_is_importable():
    import fastencdec.kernels  # noqa: F401  (installed from the top-level kernels/ folder)


def test_info_reports_isa_and_backends():
    result = subprocess.run([sys.executable, "-m", "fastencdec.cli", "info"],
                            capture_output=True, text=True, timeout=120, check=True)
    out = result.stdout
    assert f"fastencdec                   {fastencdec.__version__}" in out
    assert "active_isa" in out and "compiled_isas" in out
    for op in ("self_attention", "cross_attention", "decode_attention", "apply_rope",
               "distill_loss"):
        assert op in out
