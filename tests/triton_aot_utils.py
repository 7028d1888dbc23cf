"""Runs tools/triton_aot.py (ahead-of-time Triton compiles for sm_80 / sm_90, no GPU) from the tests."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "triton_aot.py"


def run_triton_aot(*args, timeout=900):
    """(parsed --json output, stdout) of the tool, run in a subprocess without TRITON_INTERPRET (the
    interpreter compiles nothing) and with a fresh Triton cache (so that ptxas runs and reports spills)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env["TRITON_CACHE_DIR"] = str(Path(tmp) / "cache")
        res = subprocess.run([sys.executable, str(TOOL), *args, "--json", str(out)], env=env,
                             capture_output=True, text=True, timeout=timeout)
        if not out.exists():
            pytest.fail(f"triton_aot.py failed (rc {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        return json.loads(out.read_text()), res.stdout
