"""The Triton kernels compile for the GPU (sm_90) on a machine without one: see
tests/triton_gpu_compile.py. (On a GPU the Triton tests compile and run them for real.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "triton_gpu_compile.py"


def _nvidia_backend_available() -> bool:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _nvidia_backend_available(), reason="this triton has no NVIDIA backend")
def test_every_triton_launch_compiles_for_sm90(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    records = tmp_path / "launches.json"
    recorded = subprocess.run([sys.executable, str(SCRIPT), "record", str(records)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
    assert recorded.returncode == 0, recorded.stdout[-3000:] + recorded.stderr[-3000:]
    assert "recorded" in recorded.stdout
    env.pop("TRITON_INTERPRET", None)  # compile: the real JIT (tests/conftest.py sets it without a GPU)
    compiled = subprocess.run([sys.executable, str(SCRIPT), "compile", str(records), "90"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=900)
    assert compiled.returncode == 0, compiled.stdout[-5000:] + compiled.stderr[-3000:]
    count = int(compiled.stdout.split("compiled ")[1].split()[0])
    assert count >= 100, compiled.stdout  # every cell × variant × dtype × bias × projection
